"""Workers: launching vLLM OpenAI servers, their LoRA admin API, and the pool that picks one per request."""
