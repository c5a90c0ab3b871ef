#!/usr/bin/env bash
# The k8s overlays as they would be applied (`kubectl kustomize`), through checkov's
# Kubernetes policies and `kubernetes-validate --strict` (the core objects; KEDA's are checked
# against KEDA's CRDs by dev/check_manifests.py and typed by k8s/iotp-manifests, as are
# prometheus-operator's). A checkov
# finding that is a choice carries its reason in a `checkov.io/skipN` annotation on the object.
# Run by `make lint`; dev/setup.sh installs both tools into the venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IOTP_VENV:-$HOME/.cache/iotp/venv}"
# The Kubernetes version the manifests target (k8s-openapi's feature in Cargo.toml).
K8S_VERSION=1.35.0
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for overlay in dev prod; do
  kubectl kustomize "$ROOT/k8s/overlays/$overlay" > "$out/$overlay.yaml"
  "$VENV/bin/python" - "$out/$overlay.yaml" "$out/$overlay-core.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
# Custom resources (KEDA's, prometheus-operator's) are not in Kubernetes' own schemas.
yaml.safe_dump_all([d for d in docs
                    if not d["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/"))],
                   open(sys.argv[2], "w"), sort_keys=False)
PY
  if "$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$out/$overlay-core.yaml"; then
    echo "PASS kubernetes-validate --strict (Kubernetes $K8S_VERSION) of k8s/overlays/$overlay"
  else
    echo "FAIL kubernetes-validate --strict of k8s/overlays/$overlay"; status=1
  fi
  if report=$("$VENV/bin/checkov" -f "$out/$overlay.yaml" --framework kubernetes --compact --quiet 2>&1); then
    echo "PASS checkov of k8s/overlays/$overlay (justified findings are skipped by annotation)"
  else
    echo "FAIL checkov of k8s/overlays/$overlay:"; echo "$report"; status=1
  fi
done
exit "$status"
