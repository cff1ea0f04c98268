# A stand-in for the prom/prometheus image, made from Debian's package where no image registry is
# reachable (scripts/compose-test.sh builds it on the debootstrap base). Debian bookworm ships
# Prometheus 2.42; wget is there for the compose file's healthcheck.
ARG BASE_IMAGE=npcbus-base:bookworm
FROM ${BASE_IMAGE}
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus wget; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; \
    mkdir -p /prometheus /etc/prometheus; \
    chown -R prometheus:prometheus /prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
USER prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
