"""HTTP blueprints: weaviate (transformers contract), openai, ops."""
