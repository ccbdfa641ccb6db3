"""`cohost launch SERVICE`: the vLLM containers' entrypoint (`main.run`).

settings   the service's planned settings (`<SERVICE>_ENGINE_*`, `COHOST_*`)
preflight  the planned card, free memory, this card's utilization
gate       the GPU's start gate: one server starts at a time
mps        vLLM as an MPS client with its share, or kept out of MPS under time-slicing
watchdog   once healthy: kill a server that stopped answering, so its container restarts
command    the vLLM command line and environment
exits      exit codes, refusals and the launcher's notes on stderr
backoff    waiting longer after each refusal in a row, so restarts never loop tightly
refusing   while a refusal waits: 503 and the reason on the server's port, for `cohost status`
"""
