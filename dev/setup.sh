#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine of this kind: the C
# toolchain bits librdkafka's build uses, promtool, and a Python venv with fastavro (the second Avro
# implementation the contract tests decode with; the manifest checker's libraries). Safe to
# run twice.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IOTP_VENV:-$HOME/.cache/iotp/venv}"
export PATH="$HOME/.cargo/bin:$PATH"

need=()
for tool in cc make perl python3; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] installing build tools (missing: ${need[*]})" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential perl python3 python3-venv >/dev/null
fi
# rdkafka's `ssl` feature builds librdkafka against the system OpenSSL, found by pkg-config
# (not vendored: that would compile OpenSSL from source in every clean build).
if ! command -v pkg-config >/dev/null || ! pkg-config --exists openssl 2>/dev/null; then
  echo "[setup] installing libssl-dev and pkg-config (Kafka TLS: librdkafka links OpenSSL)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev pkg-config >/dev/null
fi
command -v cargo >/dev/null || { echo "[setup] cargo not found: install the Rust toolchain (rustup)" >&2; exit 1; }
# cargo-deny checks the dependency graph's licences, bans and sources (`make lint`, deny.toml).
# Built from crates.io once per machine (325 s here, beside other builds).
if ! command -v cargo-deny >/dev/null; then
  echo "[setup] installing cargo-deny (cargo install --locked; a few minutes, once)" >&2
  cargo install --locked cargo-deny
fi

# fastavro for the contract's interop test; PyYAML and jsonschema for dev/check_manifests.py.
if ! "$VENV/bin/python" -c "import fastavro, yaml, jsonschema" 2>/dev/null; then
  echo "[setup] preparing $VENV (fastavro, PyYAML, jsonschema)" >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$ROOT/schemas/interop/requirements.txt" -r "$ROOT/dev/requirements-check.txt"
fi
# checkov and kubernetes-validate for dev/k8s_lint.sh (the rendered k8s overlays).
if ! [ -x "$VENV/bin/checkov" ] || ! [ -x "$VENV/bin/kubernetes-validate" ]; then
  echo "[setup] installing checkov and kubernetes-validate into $VENV" >&2
  "$VENV/bin/pip" install -q -r "$ROOT/dev/requirements-k8s.txt"
fi
# promtool checks and unit-tests the alert rules and the dashboard's queries
# (dev/check_monitoring.py). It comes in Debian's prometheus package, whose server must not
# run here (port 9090 stays free; docker-compose.yml has its own): a policy-rc.d keeps the
# package from starting it, and it is disabled at boot.
if ! command -v promtool >/dev/null; then
  echo "[setup] installing promtool (Debian package prometheus; its service is not started)" >&2
  policy=/usr/sbin/policy-rc.d
  own_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# dev/setup.sh: no service starts during this install\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    own_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || { [ -z "$own_policy" ] || rm -f "$policy"; exit 1; }
  [ -z "$own_policy" ] || rm -f "$policy"
  if command -v systemctl >/dev/null; then
    systemctl disable prometheus >/dev/null 2>&1 || true
    systemctl stop prometheus >/dev/null 2>&1 || true
  fi
fi
# kubectl renders the k8s overlays (kustomize) for the manifest checks and the boot test.
command -v kubectl >/dev/null || echo "[setup] kubectl not found: the k8s manifest checks need it (apt-get install kubectl, from the Kubernetes apt repository)" >&2
