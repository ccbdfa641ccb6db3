# Stand-in for eclipse-temurin:17-jdk-jammy (compiles the emulator's gRPC fix) and the base of
# the emulator stand-in: Debian bookworm's OpenJDK 17 and curl.
ARG DEBIAN_IMAGE=cohost-standin/debian:bookworm-slim
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jdk-headless=17.* curl=7.88.* ca-certificates=2023* \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
