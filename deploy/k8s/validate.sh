#!/usr/bin/env bash
# Renders every overlay under deploy/k8s/overlays with `kubectl kustomize`, validates every
# object against the Kubernetes schema (kubernetes-validate, strict), and checks what the
# manifests promise (docs/kubernetes.md):
#   - every container and init container has resource requests and limits (cpu and memory);
#   - every imagefleet container has readiness and liveness probes on gRPC health (a `grpc:`
#     probe, or `imaged health` in the container, which speaks mutual TLS), regions also a
#     startup probe; every other long-running container has readiness and liveness probes;
#   - containers run as non-root, without privilege escalation, with every capability dropped
#     and a read-only root filesystem;
#   - each region of IMAGEFLEET_CLUSTER_REGIONS is a StatefulSet (with a data volume claim and
#     its data directory on it), the catalog and the sharing service are Deployments, Redis a
#     StatefulSet with AOF fsynced on every write;
#   - a PodDisruptionBudget selects the pods of the catalog, the sharing service and each region;
#   - the copies of deploy/price-book.toml and deploy/compose/accounts.json are up to date.
# Exits non-zero with a message naming the overlay and object on any failure.
#
# kubernetes-validate is installed once into a virtualenv under
# ${XDG_CACHE_HOME:-~/.cache}/imagefleet/k8s-venv (IMAGEFLEET_K8S_VENV overrides the path).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
deploy="$(dirname "$here")"

KUBERNETES_VALIDATE_VERSION=1.37.0
# The Kubernetes release whose schema the objects must satisfy.
KUBERNETES_SCHEMA_VERSION=1.37.0
venv="${IMAGEFLEET_K8S_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/imagefleet/k8s-venv}"

fail() {
  echo "deploy/k8s/validate.sh: $*" >&2
  exit 1
}

command -v kubectl >/dev/null || fail "kubectl is not installed (it renders the overlays)"

cmp -s "$deploy/price-book.toml" "$here/base/price-book.toml" ||
  fail "deploy/k8s/base/price-book.toml differs from deploy/price-book.toml: copy it again"
cmp -s "$deploy/compose/accounts.json" "$here/overlays/dev/accounts.json" ||
  fail "deploy/k8s/overlays/dev/accounts.json differs from deploy/compose/accounts.json: copy it again"

if [ "$("$venv/bin/kubernetes-validate" --version 2>/dev/null || true)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
  echo "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $venv" >&2
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    [ "$(id -u)" = 0 ] || fail "python3 venv support is missing: install python3-venv and python3-pip as root"
    apt-get install -y python3-venv python3-pip >&2 ||
      { apt-get update >&2 && apt-get install -y python3-venv python3-pip >&2; } ||
      fail "cannot install python3-venv and python3-pip"
  fi
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv" || fail "python3 -m venv $venv failed"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2 ||
    fail "pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION failed"
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

overlays=()
for dir in "$here"/overlays/*/; do
  [ -f "$dir/kustomization.yaml" ] || continue
  name="$(basename "$dir")"
  overlays+=("$name")
  kubectl kustomize "$dir" >"$out/$name.yaml" 2>"$out/$name.err" ||
    fail "overlay $name does not render: $(cat "$out/$name.err")"
done
[ "${#overlays[@]}" -gt 0 ] || fail "no overlay under deploy/k8s/overlays"

for name in "${overlays[@]}"; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$KUBERNETES_SCHEMA_VERSION" "$out/$name.yaml" >"$out/$name.schema" 2>&1 || {
    cat "$out/$name.schema" >&2
    fail "overlay $name: objects fail the Kubernetes $KUBERNETES_SCHEMA_VERSION schema (above)"
  }
  # A kind or apiVersion the schema does not know is only a warning to kubernetes-validate.
  if grep -q . "$out/$name.schema"; then
    cat "$out/$name.schema" >&2
    fail "overlay $name: objects the Kubernetes $KUBERNETES_SCHEMA_VERSION schema does not know (above)"
  fi
done

"$venv/bin/python" "$here/check_manifests.py" "$out" "${overlays[@]}" ||
  fail "the rendered manifests break the rules above (details before this line)"

for name in "${overlays[@]}"; do
  echo "deploy/k8s: overlay $name: $(grep -c '^kind: ' "$out/$name.yaml") objects render, pass the Kubernetes $KUBERNETES_SCHEMA_VERSION schema and the checks"
done
