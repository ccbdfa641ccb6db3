"""The `cohost` command: plan GPU sharing, launch vLLM servers, check status, run locally.

plan/      size two (or more) vLLM servers to fit one GPU and write the env file
launch/    the vLLM containers' entrypoint: preflight, ordered start gate, exec vLLM
status/    engines, worker and GPU against the plan, at a glance
k8s/       what a Kubernetes overlay reads from a plan: ConfigMap, GPU shares, scaling
stack      `cohost up`: everything on one machine without a GPU
cpu_engine the CPU build of vLLM and its small models (for `up`, tests and benchmarks)
"""
