"""The feedback worker: Pub/Sub requests -> vLLM (OpenAI API) -> Pub/Sub results."""
