#!/usr/bin/env bash
# The test command: installs what the tests need (a real Redis, strace, Garage), then checks formatting
# and lints, and runs every unit and integration test. Safe to run again and again.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v redis-server >/dev/null 2>&1; then
  echo "== installing redis-server (the integration tests start real Redis processes)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
# The tests start their own redis-server processes (AOF, appendfsync always) on free ports;
# a system Redis is not needed.
if ! command -v strace >/dev/null 2>&1; then
  echo "== installing strace (a durability test watches a region's renames and fsyncs)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null
fi

if ! command -v sqlite3 >/dev/null 2>&1; then
  echo "== installing sqlite3 (a hostile-input test plants text the API refuses, as old data)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sqlite3 >/dev/null
fi

if ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-io >/dev/null 2>&1; then
  echo "== installing qemu-utils (the image inspector's tests build and judge images with qemu-img)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null
fi

# Garage (S3-compatible object store) for the object-store tests; installed once.
echo "== garage: $(bash deploy/garage/ensure.sh)"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
