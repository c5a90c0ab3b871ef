#!/usr/bin/env bash
# End-to-end demo on the local brokers (make demo starts them): runs every service, publishes
# a burst of simulated telemetry over MQTT, and prints what each hop counted.
#   DEVICES=200 MESSAGES=50 dev/demo.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="${IOTP_RUN_DIR:-$ROOT/.run}"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
DEVICES="${DEVICES:-200}"
MESSAGES="${MESSAGES:-50}"
RAW_TOPIC=iotp.raw
mkdir -p "$RUN/logs"
cd "$ROOT"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  local failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  [ "$failed" = 0 ] && echo "all services stopped cleanly (SIGTERM, exit 0)" || echo "a service exited non-zero: see $RUN/logs"
}
trap stop_all EXIT

port=9101
for svc in mqtt-bridge parser enricher upserter aggregator dlq-handler; do
  IOTP__COMMON__REPLICA="demo-$svc-0" IOTP__COMMON__ADMIN_LISTEN="127.0.0.1:$port" IOTP__COMMON__LOG_FORMAT=json \
    "$BIN/iotp-$svc" >"$RUN/logs/$svc.log" 2>&1 &
  pids+=($!)
  eval "PORT_${svc//-/_}=$port"
  port=$((port + 1))
done

metric() { curl -fsS "http://127.0.0.1:$1/metrics" 2>/dev/null | awk -v m="$2" '$1==m {print $2}'; }
wait_ready() {
  for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "service on admin port $1 not ready; logs in $RUN/logs"; exit 1
}
for p in $(seq 9101 9106); do wait_ready "$p"; done
echo "services ready (admin ports 9101-9106: /metrics /healthz /readyz)"

raw_before=$("$BIN/iotp-topology" count "$RAW_TOPIC")
echo "publishing $DEVICES devices x $MESSAGES messages (QoS 1) to mqtt://127.0.0.1:1884 ..."
summary=$("$BIN/iotp-simulator" --port 1884 --tenant demo --devices "$DEVICES" --messages "$MESSAGES")
published=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['acked'])" "$summary")

bridged=0
for _ in $(seq 120); do
  bridged=$(( $("$BIN/iotp-topology" count "$RAW_TOPIC") - raw_before ))
  [ "$bridged" -ge "$published" ] && break
  sleep 0.5
done
received_by_bridge=$(metric "$PORT_mqtt_bridge" iotp_mqtt_received_messages_total)
acked_by_bridge=$(metric "$PORT_mqtt_bridge" iotp_mqtt_acked_messages_total)
dropped=$(metric "$PORT_mqtt_bridge" iotp_mqtt_broker_dropped_messages)

cat <<REPORT

== demo ==
published (PUBACKed by Mosquitto):      $published
bridged   (new records on $RAW_TOPIC):  $bridged   (bridge received ${received_by_bridge:-0}, PUBACKed after Kafka confirmed ${acked_by_bridge:-0})
broker-dropped messages (\$SYS):        ${dropped:-0}
validated / enriched / stored / dead-lettered: stages not implemented yet (issues 3 and 4)
simulator: $summary
REPORT
[ "$bridged" -ge "$published" ] || { echo "demo: $((published - bridged)) published messages did not reach Kafka"; exit 1; }
