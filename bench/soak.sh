#!/usr/bin/env bash
# Soak: `imagectl load mixed` against `imaged dev` for $SOAK (default 10m), sampling the resident
# memory (VmRSS) of imaged, its redis-server and imagectl every $SAMPLE seconds (default 10).
# At the end it prints the load summary's errors and, per process, RSS at the start (the first
# sample of the measured window, after set-up and warm-up), at the end and at its highest, so a
# reader can judge whether memory stays flat.
#
# Builds nothing: run `cargo build --release` first. From the repository root:
#   bench/soak.sh                 # 10 minutes
#   SOAK=1m bench/soak.sh         # a quick check
# Environment: SCENARIO (default mixed), SOAK (load --duration), WARMUP (load --warmup,
# default 330s: longer than the 5-minute window for which the services remember accepted
# requests, so the measured window starts with that memory at its level), CONCURRENCY
# (default 8), SAMPLE (seconds between samples, default 10), KEEP=1 keeps the data directory,
# BIN (where imaged and imagectl are; default target/release).
# Outputs (in the data directory, printed at the end): load.json, soak.html, rss.tsv, logs.
set -euo pipefail

SCENARIO="${SCENARIO:-mixed}"
SOAK="${SOAK:-10m}"
WARMUP="${WARMUP:-330s}"
CONCURRENCY="${CONCURRENCY:-8}"
SAMPLE="${SAMPLE:-10}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/target/release}"
IMAGED="$BIN/imaged"
IMAGECTL="$BIN/imagectl"
for bin in "$IMAGED" "$IMAGECTL"; do
    [[ -x "$bin" ]] || { echo "soak: $bin missing: run cargo build --release first" >&2; exit 1; }
done
command -v jq >/dev/null || { echo "soak: jq is needed to read the summary" >&2; exit 1; }

DIR="$(mktemp -d "${TMPDIR:-/tmp}/imagefleet-soak.XXXXXX")"
DEV_PID=""
LOAD_PID=""
cleanup() {
    [[ -n "$LOAD_PID" ]] && kill "$LOAD_PID" 2>/dev/null || true
    if [[ -n "$DEV_PID" ]]; then
        kill "$DEV_PID" 2>/dev/null || true
        wait "$DEV_PID" 2>/dev/null || true
    fi
    if [[ "${KEEP:-0}" != 1 ]]; then
        # Keep what the reader looks at; drop the cluster's data.
        rm -rf "$DIR/regions" "$DIR/catalog" "$DIR/redis" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# The cluster, on free ports.
"$IMAGED" dev --base-port 0 --data-dir "$DIR" >"$DIR/imaged.out" 2>"$DIR/imaged.log" &
DEV_PID=$!
for _ in $(seq 1 600); do
    grep -q ready "$DIR/imaged.out" 2>/dev/null && break
    kill -0 "$DEV_PID" 2>/dev/null || { echo "soak: imaged dev exited; see $DIR/imaged.log" >&2; exit 1; }
    sleep 0.2
done
grep -q ready "$DIR/imaged.out" || { echo "soak: imaged dev not ready after 120 s" >&2; exit 1; }
echo "soak: cluster ready ($DIR); load $SCENARIO for $SOAK after $WARMUP of warm-up" >&2

"$IMAGECTL" --cluster "$DIR/cluster.json" load "$SCENARIO" --duration "$SOAK" --warmup "$WARMUP" \
    --concurrency "$CONCURRENCY" --output json --report "$DIR/soak.html" \
    >"$DIR/load.json" 2>"$DIR/load.log" &
LOAD_PID=$!

# The processes to watch: imaged dev and its descendants (redis-server), and imagectl.
descendants() {
    local pid=$1 child
    echo "$pid"
    for child in $(pgrep -P "$pid" 2>/dev/null || true); do
        descendants "$child"
    done
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || true; }
# SQLite's heap inside imaged (page caches and statements of every store), from the first
# region's metrics: the part of imaged's RSS that is a cache filling up to its bound.
METRICS_URL=$(jq -r '[.regions[].metrics // empty][0] // empty' "$DIR/cluster.json" 2>/dev/null || true)
# Requests every service's replay protection remembers (each for the 5-minute timestamp window).
METRICS_URLS=$(jq -r '[.catalog.metrics, .sharing.metrics, .regions[].metrics] | map(select(. != null)) | .[]' "$DIR/cluster.json" 2>/dev/null || true)
replay_entries() {
    local url total=0 n
    for url in $METRICS_URLS; do
        n=$(curl -sf --max-time 2 "$url" 2>/dev/null | awk '/^imagefleet_replay_cache_entries / {print $2}' || true)
        total=$((total + ${n:-0}))
    done
    echo "$total"
}
sqlite_kib() {
    [[ -n "$METRICS_URL" ]] || return 0
    curl -sf --max-time 2 "$METRICS_URL" 2>/dev/null |
        awk '/^imagefleet_sqlite_memory_bytes / {printf "%d\n", $2 / 1024}' || true
}

printf 'seconds\tphase\tpid\tprocess\trss_kib\n' >"$DIR/rss.tsv"
printf 'seconds\tphase\treplay_entries\n' >"$DIR/replay.tsv"
start=$(date +%s)
while kill -0 "$LOAD_PID" 2>/dev/null; do
    now=$(( $(date +%s) - start ))
    # The load's plain status lines say when the measured window has begun.
    phase=setup
    grep -q measuring "$DIR/load.log" 2>/dev/null && phase=measuring
    for pid in $(descendants "$DEV_PID") "$LOAD_PID"; do
        rss=$(rss_kib "$pid")
        [[ -n "$rss" ]] || continue
        name=$(cat "/proc/$pid/comm" 2>/dev/null || echo "?")
        printf '%s\t%s\t%s\t%s\t%s\n' "$now" "$phase" "$pid" "$name" "$rss" >>"$DIR/rss.tsv"
    done
    printf '%s\t%s\t%s\n' "$now" "$phase" "$(replay_entries)" >>"$DIR/replay.tsv"
    sqlite=$(sqlite_kib)
    [[ -z "$sqlite" ]] || printf '%s\t%s\t%s\t%s\t%s\n' "$now" "$phase" "$DEV_PID" "sqlite-heap" "$sqlite" >>"$DIR/rss.tsv"
    sleep "$SAMPLE"
done
status=0
wait "$LOAD_PID" || status=$?
LOAD_PID=""
if [[ $status -ne 0 ]]; then
    echo "soak: imagectl load failed ($status):" >&2
    tail -n 20 "$DIR/load.log" >&2
    exit 1
fi

echo "== load summary: errors"
jq -r '"total: \(.total.count) calls, \(.total.errors) errors, \(.total.throughput_per_s)/s over \(.measured_s) s",
       (.operations | to_entries[] | "\(.key): \(.value.count) calls, \(.value.errors) errors, p99 \(.value.p99_ms) ms"
         + (if (.value.errors_by_reason | length) > 0
            then " (" + ([.value.errors_by_reason[] | "\(.code) \(.reason): \(.count)"] | join(", ")) + ")"
            else "" end)),
       (if (.cleanup_problems | length) > 0 then "not cleaned up: " + (.cleanup_problems | join("; ")) else empty end)' \
    "$DIR/load.json"

echo "== RSS (MiB) per process: at the start of the measured window, half-way, at the end, highest"
echo "   (sqlite-heap: the part of imaged's RSS that is SQLite's page caches and statements)"
awk -F'\t' 'NR > 1 {
    key = $4 " (pid " $3 ")"
    if (!(key in first) && $2 == "measuring") first[key] = $5
    if ($2 == "measuring") seen[key, ++count[key]] = $5
    last[key] = $5
    if ($5 > max[key]) max[key] = $5
    if (!(key in order)) { order[key] = ++n; keys[n] = key }
}
END {
    printf "%-28s %10s %10s %10s %10s %8s %8s\n", "PROCESS", "START", "HALF", "END", "MAX", "END/START", "END/HALF"
    for (i = 1; i <= n; i++) {
        k = keys[i]
        s = (k in first) ? first[k] : last[k]
        h = (count[k] > 0) ? seen[k, int((count[k] + 1) / 2)] : last[k]
        printf "%-28s %10.1f %10.1f %10.1f %10.1f %8.2f %8.2f\n", k, s / 1024, h / 1024, last[k] / 1024, max[k] / 1024, (s > 0 ? last[k] / s : 0), (h > 0 ? last[k] / h : 0)
    }
}' "$DIR/rss.tsv"
awk -F'\t' '$2 == "measuring" { v[++n] = $3 }
END { if (n) printf "== replay memory: %d requests remembered at the start, %d half-way, %d at the end (each kept for the 5-minute timestamp window, about 40 bytes)\n", v[1], v[int((n + 1) / 2)], v[n] }' "$DIR/replay.tsv"
echo "== files: $DIR/load.json $DIR/soak.html $DIR/rss.tsv"
