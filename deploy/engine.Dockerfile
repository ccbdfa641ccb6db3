# syntax=docker/dockerfile:1
# The vLLM engine image: the official vLLM image plus the cohost preflight launcher.
# One image serves both vLLM containers (chatbot and feedback); the service is the argument:
#   cohost launch chatbot | cohost launch feedback
# which reads <SERVICE>_ENGINE_* (the plan's env file, deploy/*.env), checks the GPU, takes
# the GPU's start gate ($COHOST_LOCK_DIR/<gpu uuid>.lock, a volume both containers share),
# checks free memory and execs `vllm serve` with the planned flags.
# Build context is the repository root:
#   docker build -f deploy/engine.Dockerfile -t cohost/engine .

# What the memory plans were calibrated on (shared/src/cohost/memory.py); change both together.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.26.0

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# ---- build: cohost in its own virtual environment at /opt/cohost, from uv.lock.
# Built on the vLLM image itself so the venv's interpreter is the image's python3.
# A separate venv leaves vLLM's own packages exactly as the vLLM image ships them
# (cohost's pydantic/httpx/nvidia-ml-py pins never replace vLLM's).
FROM ${VLLM_IMAGE} AS build
COPY --from=uv /uv /opt/uv/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/cohost
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY shared/pyproject.toml shared/
COPY services/feedback/pyproject.toml services/feedback/
COPY services/chatbot/pyproject.toml services/chatbot/
RUN --mount=type=cache,target=/root/.cache/uv \
    /opt/uv/uv sync --frozen --no-dev --package cohost --no-install-workspace --python python3
COPY shared/src shared/src
RUN --mount=type=cache,target=/root/.cache/uv \
    /opt/uv/uv sync --frozen --no-dev --package cohost --no-editable --python python3

# ---- runtime: the vLLM image, cohost launcher as entrypoint, a non-root user
FROM ${VLLM_IMAGE}
COPY --from=build /opt/cohost /opt/cohost
# The cache and lock directories exist in the image owned by the runtime user, so an empty
# named volume mounted on them starts with that owner (Docker copies the mount point's
# ownership into a new volume). Bind mounts must be made writable for UID 10001 by hand.
RUN groupadd --system --gid 10001 cohost \
    && useradd --system --uid 10001 --gid cohost --create-home --home-dir /home/cohost \
        --shell /bin/bash cohost \
    && mkdir -p /home/cohost/.cache/huggingface /home/cohost/.cache/vllm /var/lock/cohost \
    && chown -R 10001:10001 /home/cohost /var/lock/cohost
ENV HOME=/home/cohost \
    HF_HOME=/home/cohost/.cache/huggingface \
    VLLM_CACHE_ROOT=/home/cohost/.cache/vllm \
    TRITON_CACHE_DIR=/home/cohost/.cache/vllm/triton \
    COHOST_LOCK_DIR=/var/lock/cohost
WORKDIR /home/cohost
USER 10001:10001
EXPOSE 8000
# vLLM becomes this process (exec), so it receives the container's signals.
ENTRYPOINT ["/opt/cohost/bin/cohost", "launch"]
CMD ["chatbot"]
