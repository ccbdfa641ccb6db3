# Stand-in for gcr.io/google.com/cloudsdktool/google-cloud-cli:528.0.0-emulators: Java, curl
# and the Pub/Sub emulator at the path google-cloud-cli installs it to, copied from this
# machine's google-cloud-cli (cohost.images stages it as the build context). No gcloud.
ARG JDK_IMAGE=cohost-standin/jdk:17
FROM ${JDK_IMAGE}
COPY pubsub-emulator /usr/lib/google-cloud-sdk/platform/pubsub-emulator
