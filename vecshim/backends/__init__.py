"""Built-in backends; each module registers itself through the `register_backends` hook."""
