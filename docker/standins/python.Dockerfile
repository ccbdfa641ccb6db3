# Stand-in for python:3.11.13-slim-bookworm where Docker Hub cannot be reached: Debian
# bookworm (the debootstrap image cohost.images imports) with Debian's own Python 3.11
# (3.11.2, at /usr/bin) instead of python.org's 3.11.13 at /usr/local/bin. It also trusts
# the building machine's own CAs (/usr/local/share/ca-certificates, staged as ca/), so uv in
# a build reaches PyPI through a TLS-inspecting proxy as the machine itself does.
ARG DEBIAN_IMAGE=cohost-standin/debian:bookworm-slim
FROM ${DEBIAN_IMAGE}
COPY ca/ /usr/local/share/ca-certificates/
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.11.* ca-certificates=2023* \
    && ln -s /usr/bin/python3 /usr/local/bin/python \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
