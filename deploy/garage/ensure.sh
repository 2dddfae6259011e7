#!/usr/bin/env bash
# Makes sure the `garage` binary (Garage, an S3-compatible object store) is available for the
# object-store tests: found on PATH or in ~/.cargo/bin, else installed with
# `cargo install garage --locked` (into ~/.cargo/bin) with only what the tests use (bundled
# libraries and the LMDB metadata engine; no metrics exporter, no K2V API), which cuts the cold
# build. Prints where it is. Safe to run again: a second run finds it and installs nothing.
set -euo pipefail

if command -v garage >/dev/null 2>&1; then
  command -v garage
  exit 0
fi
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin/garage"
if [ -x "$cargo_bin" ]; then
  echo "$cargo_bin"
  exit 0
fi
echo "== installing garage (the object-store tests start real Garage servers): cargo install garage --locked" >&2
cargo install garage --locked --no-default-features --features bundled-libs,lmdb >&2
echo "$cargo_bin"
