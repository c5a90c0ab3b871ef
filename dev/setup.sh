#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine of this kind: the C
# toolchain bits librdkafka's build uses, and a Python venv with fastavro (the second Avro
# implementation the contract tests decode with). Safe to run twice.
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
command -v cargo >/dev/null || { echo "[setup] cargo not found: install the Rust toolchain (rustup)" >&2; exit 1; }

if ! "$VENV/bin/python" -c "import fastavro" 2>/dev/null; then
  echo "[setup] creating $VENV with fastavro" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$ROOT/schemas/interop/requirements.txt"
fi
