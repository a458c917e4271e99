"""Inference engines behind the OpenAI server: `hf` (transformers, CPU) and `vllm` (AsyncLLM)."""
