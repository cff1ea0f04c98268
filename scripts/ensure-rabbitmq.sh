#!/usr/bin/env bash
# Make sure RabbitMQ answers on 127.0.0.1:5672; start it with `rabbitmq-server -detached` if not.
set -euo pipefail
up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if up; then exit 0; fi
if ! command -v rabbitmq-server >/dev/null; then
  echo "RabbitMQ is not running on 127.0.0.1:5672 and rabbitmq-server is not installed" >&2
  exit 1
fi
echo "[rabbitmq] starting rabbitmq-server -detached"
rabbitmq-server -detached || true
for _ in $(seq 1 90); do
  if up && rabbitmqctl -q status >/dev/null 2>&1; then echo "[rabbitmq] up"; exit 0; fi
  sleep 1
done
echo "RabbitMQ did not come up within 90 s" >&2
exit 1
