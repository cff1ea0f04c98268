# A stand-in for the official rabbitmq:*-management image, made from Debian's packages where no
# image registry is reachable (scripts/compose-test.sh builds it on the debootstrap base).
# Same conventions as the official image: config in /etc/rabbitmq (conf.d/ included), plugins in
# /etc/rabbitmq/enabled_plugins, data in /var/lib/rabbitmq, the node runs in the foreground as the
# rabbitmq user and logs to the console. Debian bookworm ships RabbitMQ 3.10 (the compose file's
# default, rabbitmq:4.1-management, is the one users get from a registry).
ARG BASE_IMAGE=npcbus-base:bookworm
FROM ${BASE_IMAGE}
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; \
    rm -f /etc/rabbitmq/rabbitmq-env.conf; \
    mkdir -p /etc/rabbitmq/conf.d /var/lib/rabbitmq /var/log/rabbitmq; \
    chown -R rabbitmq:rabbitmq /etc/rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
ENV HOME=/var/lib/rabbitmq RABBITMQ_LOGS=- LANG=C.UTF-8
VOLUME ["/var/lib/rabbitmq"]
EXPOSE 5672 15672 15692
USER rabbitmq
CMD ["rabbitmq-server"]
