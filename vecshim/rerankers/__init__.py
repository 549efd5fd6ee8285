"""Built-in rerankers, registered through `register_rerankers` like any plugin."""
