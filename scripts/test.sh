#!/usr/bin/env bash
# Install what the tests need, make sure RabbitMQ runs, run the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k bus -x).
# Tests run in a fixed order; to look for order dependence, shuffle them (pytest-random-order):
#   scripts/test.sh --random-order-seed=N [--random-order-bucket=global]; or in reverse: --reverse-order
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/ensure-rabbitmq.sh
if ! command -v chromium >/dev/null && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "[setup] installing Debian's chromium for the playground browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "[setup] chromium could not be installed; the browser test will be skipped"
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# the offline default model the tests share, built before they start (about ten minutes the first
# time, with progress; cached in .npcbus/test-model) so that no test's time limit includes the build
python -c "from npcbus.logs import setup_logging; setup_logging(); from npcbus.model import ensure_test_model; print('[test] model:', ensure_test_model())"
set +e
python -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" = "5" ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
