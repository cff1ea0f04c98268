#!/usr/bin/env bash
# Install, make sure RabbitMQ runs, build the offline default model, and run the whole system
# locally (gateway, inference consumer, aggregator, training worker) until Ctrl-C.
# Extra arguments go to `npcbus run` (see `npcbus run --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/ensure-rabbitmq.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec npcbus run "$@"
