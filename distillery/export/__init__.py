"""Exports: one module per output target (merge, gguf, hub, ollama)."""
