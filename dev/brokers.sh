#!/usr/bin/env bash
# Local brokers for the pipeline: Mosquitto (the project's own, port 1884), RabbitMQ (5672)
# and Tansu, a Kafka-protocol broker (9092). Installs what is missing, reuses what runs,
# declares topics, exchanges and queues. Safe to run twice.
#   dev/brokers.sh up | down | status
# Env: TANSU_STORAGE=sqlite (default, survives restarts) | memory (fast, forgets on restart)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="${IOTP_RUN_DIR:-$ROOT/.run}"
TANSU_VERSION=0.6.0
TANSU_HOME="${TANSU_HOME:-$HOME/.cache/iotp/tansu-$TANSU_VERSION}"
TANSU="$TANSU_HOME/bin/tansu"
MOSQUITTO_VERSION=2.0.21
MOSQUITTO_HOME="${MOSQUITTO_HOME:-$HOME/.cache/iotp/mosquitto-$MOSQUITTO_VERSION}"
MOSQUITTO="$MOSQUITTO_HOME/usr/sbin/mosquitto"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
MQTT_PORT="${IOTP_MQTT_PORT:-1884}"
KAFKA_PORT="${IOTP_KAFKA_PORT:-9092}"
TANSU_STORAGE="${TANSU_STORAGE:-sqlite}"
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '[brokers] %s\n' "$*" >&2; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  local port=$1 name=$2 tries=${3:-120}
  for _ in $(seq "$tries"); do listening "$port" && return 0; sleep 0.5; done
  log "$name did not open port $port"; return 1
}

apt_install() {
  log "installing $*"
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_tansu() {
  if [ -x "$TANSU" ] && "$TANSU" --version 2>/dev/null | grep -q " $TANSU_VERSION\$"; then return; fi
  log "building tansu $TANSU_VERSION with its SQLite engine (about 12 minutes, once per machine)"
  command -v cc >/dev/null || apt_install build-essential
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql \
    --root "$TANSU_HOME" >"$RUN/tansu-build.log" 2>&1 || { tail -30 "$RUN/tansu-build.log"; exit 1; }
}

# Mosquitto 2.0.11 (Debian 12's) moves up to a whole receive maximum of queued messages into
# flight on every PUBACK (db__message_delete_outgoing counts only the in-flight messages ahead
# of the acknowledged one), so under a flood it sends hundreds of thousands unacknowledged,
# reuses packet ids, and leaves most of them in the session to be sent again at the next
# connect (docs/performance.md). Fixed in 2.0.13; the project runs Debian's backport.
# `mosquitto -h` exits non-zero; its first line names the version.
mosquitto_is_pinned() { [ -x "$MOSQUITTO" ] && { "$MOSQUITTO" -h 2>&1 || true; } | grep -q "^mosquitto version $MOSQUITTO_VERSION\$"; }

ensure_mosquitto() {
  if mosquitto_is_pinned; then return; fi
  log "installing mosquitto $MOSQUITTO_VERSION from Debian bookworm-backports into $MOSQUITTO_HOME"
  command -v curl >/dev/null || apt_install curl
  command -v xz >/dev/null || apt_install xz-utils
  local index entry file sum tmp
  tmp=$(mktemp -d)
  curl -fsSL "$DEBIAN_MIRROR/dists/bookworm-backports/main/binary-amd64/Packages.xz" -o "$tmp/Packages.xz"
  entry=$(xz -dc "$tmp/Packages.xz" | awk 'BEGIN { RS = "" } /^Package: mosquitto\n/')
  echo "$entry" | grep -q "^Version: $MOSQUITTO_VERSION-" || { log "bookworm-backports has no mosquitto $MOSQUITTO_VERSION:"; echo "$entry" | grep ^Version >&2; exit 1; }
  file=$(echo "$entry" | awk '/^Filename:/{print $2}')
  sum=$(echo "$entry" | awk '/^SHA256:/{print $2}')
  curl -fsSL "$DEBIAN_MIRROR/$file" -o "$tmp/mosquitto.deb"
  echo "$sum  $tmp/mosquitto.deb" | sha256sum -c --quiet - || { log "checksum mismatch for $file"; exit 1; }
  rm -rf "$MOSQUITTO_HOME" && mkdir -p "$MOSQUITTO_HOME"
  dpkg-deb -x "$tmp/mosquitto.deb" "$MOSQUITTO_HOME"
  rm -rf "$tmp"
  # Its shared libraries are Debian 12's own packages.
  local missing
  missing=$(ldd "$MOSQUITTO" | awk '/not found/{print $1}')
  if [ -n "$missing" ]; then apt_install libcjson1 libdlt2 libwebsockets17 libwrap0 libssl3; fi
  mosquitto_is_pinned || { log "mosquitto $MOSQUITTO_VERSION does not start"; "$MOSQUITTO" -h 2>&1 | head -3 >&2; exit 1; }
}

up_mosquitto() {
  ensure_mosquitto
  if listening "$MQTT_PORT"; then
    local pid=""
    [ -f "$RUN/mosquitto/mosquitto.pid" ] && pid=$(cat "$RUN/mosquitto/mosquitto.pid")
    if [ -n "$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" != "$(readlink -f "$MOSQUITTO")" ] \
       && readlink "/proc/$pid/exe" 2>/dev/null | grep -q mosquitto; then
      log "mosquitto on :$MQTT_PORT is not $MOSQUITTO_VERSION; restarting it"
      stop_pidfile "$RUN/mosquitto/mosquitto.pid" mosquitto
    else
      log "mosquitto on :$MQTT_PORT already running"; return
    fi
  fi
  mkdir -p "$RUN/mosquitto"
  sed -e "s|@PORT@|$MQTT_PORT|" -e "s|@BIND@|127.0.0.1|" -e "s|@USER@|$(id -un)|" -e "s|@DIR@|$RUN/mosquitto|" "$ROOT/dev/mosquitto.conf" >"$RUN/mosquitto/mosquitto.conf"
  "$MOSQUITTO" -d -c "$RUN/mosquitto/mosquitto.conf"
  wait_port "$MQTT_PORT" mosquitto
  log "mosquitto on :$MQTT_PORT (config $RUN/mosquitto/mosquitto.conf)"
}

up_rabbitmq() {
  if listening 5672; then log "rabbitmq on :5672 already running"; return; fi
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  rabbitmq-server -detached
  wait_port 5672 rabbitmq 240
  log "rabbitmq on :5672"
}

up_tansu() {
  if listening "$KAFKA_PORT"; then log "kafka-protocol broker on :$KAFKA_PORT already running"; return; fi
  ensure_tansu
  mkdir -p "$RUN/tansu"
  local engine
  case "$TANSU_STORAGE" in
    sqlite) engine="sqlite://tansu.db" ;;  # relative to its working directory
    memory) engine="memory://tansu/" ;;
    *) log "TANSU_STORAGE must be sqlite or memory"; exit 2 ;;
  esac
  (cd "$RUN/tansu" && exec nohup "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine "$engine" >"$RUN/tansu/tansu.log" 2>&1) &
  echo $! >"$RUN/tansu/tansu.pid"
  wait_port "$KAFKA_PORT" tansu
  log "tansu $TANSU_VERSION on :$KAFKA_PORT ($engine)"
}

apply_topology() {
  log "declaring topics, exchanges and queues"
  (cd "$ROOT" && cargo run -q --locked -p iotp-core --bin iotp-topology -- apply --brokers "127.0.0.1:$KAFKA_PORT")
}

stop_pidfile() {
  local file=$1 name=$2
  [ -f "$file" ] || return 0
  local pid; pid=$(cat "$file")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    log "stopped $name ($pid)"
  fi
  rm -f "$file"
}

case "${1:-up}" in
  up)
    mkdir -p "$RUN"
    up_mosquitto
    up_rabbitmq
    up_tansu
    apply_topology
    ;;
  down)
    # Only what this script started; system services stay as they are.
    stop_pidfile "$RUN/tansu/tansu.pid" tansu
    stop_pidfile "$RUN/mosquitto/mosquitto.pid" mosquitto
    ;;
  status)
    for p in "$MQTT_PORT:mosquitto" "5672:rabbitmq" "$KAFKA_PORT:kafka"; do
      if listening "${p%%:*}"; then echo "${p#*:} up (:${p%%:*})"; else echo "${p#*:} down (:${p%%:*})"; fi
    done
    ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
