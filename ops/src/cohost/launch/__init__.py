"""`cohost launch SERVICE`: the vLLM containers' entrypoint (`main.run`).

settings   the service's planned settings (`<SERVICE>_ENGINE_*`, `COHOST_*`)
preflight  the planned card, free memory, this card's utilization
gate       the GPU's start gate: one server starts at a time
command    the vLLM command line and environment
exits      exit codes, refusals and the launcher's notes on stderr
"""
