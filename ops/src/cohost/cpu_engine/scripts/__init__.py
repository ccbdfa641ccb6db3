"""Scripts that run inside the CPU engine's virtualenv, with its python (torch, transformers)."""
