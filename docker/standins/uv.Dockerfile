# Stand-in for ghcr.io/astral-sh/uv:0.13.9: the same two static binaries at /uv and /uvx,
# taken from uv's wheel on PyPI (cohost.images stages them as the build context).
FROM scratch
COPY uv uvx /
ENTRYPOINT ["/uv"]
