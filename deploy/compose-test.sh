#!/usr/bin/env bash
# End-to-end test of the docker compose cluster (docker-compose.yml), runnable on a machine with
# a Docker engine but NO container registry:
#
#   1. builds a Debian bookworm base image locally once (deploy/build-local-base.sh: debootstrap
#      + docker import; skipped when it exists),
#   2. builds imaged and imagectl on the host (cargo build --release --bins) and hands them to
#      deploy/Dockerfile through target/docker-prebuilt/,
#   3. brings the cluster up with docker-compose.yml + deploy/compose.local-base.yml under a
#      unique project name, and waits until every service is healthy,
#   4. drives it from the host with `imagectl --cluster deploy/compose/cluster.json`: public
#      images, an instance, a 200 MiB write, an image, a copy to ap-shanghai compared byte for
#      byte, a copy whose destination region is killed mid-copy (it must resume and complete),
#      and a Redis kill -9 + restart (no ownership or share entry, image or instance may be lost),
#   5. `down -v`, also on failure (trap).
#
# Usage: deploy/compose-test.sh          (as root, or a user allowed to run docker and apt-get)
# Environment:
#   IMAGEFLEET_BASE_IMAGE          local base image (default imagefleet-test-base:bookworm)
#   IMAGEFLEET_COMPOSE_TEST_MIB    size of each written payload in MiB (default 200)
#   IMAGEFLEET_COMPOSE_TEST_PROFILE release (default) or debug: which cargo build goes into the
#                                  image (debug reuses what `cargo test` already built)
#   IMAGEFLEET_COMPOSE_TEST_KEEP=1 leave the cluster running on failure, for a look
# Exits non-zero on any failure. Publishes 127.0.0.1:7100, 7101, 7110-7112: they must be free.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

T0=$(date +%s)
STEP=0
step() {
    STEP=$((STEP + 1))
    printf '\n=== [%3ss] step %d: %s\n' "$(($(date +%s) - T0))" "$STEP" "$*"
}
info() { printf '    %s\n' "$*"; }
fail() {
    printf '\nFAIL (step %d): %s\n' "$STEP" "$*" >&2
    exit 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

export IMAGEFLEET_BASE_IMAGE="${IMAGEFLEET_BASE_IMAGE:-imagefleet-test-base:bookworm}"
PAYLOAD_MIB="${IMAGEFLEET_COMPOSE_TEST_MIB:-200}"
PROFILE="${IMAGEFLEET_COMPOSE_TEST_PROFILE:-release}"
case "$PROFILE" in
    release) CARGO_PROFILE_FLAG=--release ;;
    debug) CARGO_PROFILE_FLAG="" ;;
    *)
        echo "IMAGEFLEET_COMPOSE_TEST_PROFILE must be release or debug" >&2
        exit 2
        ;;
esac
PROJECT_PREFIX=imagefleet-ctest
PROJECT="$PROJECT_PREFIX-$(date +%Y%m%d%H%M%S)-$$"
# The image every imagefleet service runs (docker-compose.yml reads IMAGEFLEET_IMAGE).
export IMAGEFLEET_IMAGE="$PROJECT_PREFIX:${PROJECT#"$PROJECT_PREFIX"-}"
# Settings from the caller's environment that would change what compose does.
unset COMPOSE_FILE COMPOSE_PROJECT_NAME COMPOSE_PATH_SEPARATOR DOCKER_DEFAULT_PLATFORM
CLUSTER_FILE="$ROOT/deploy/compose/cluster.json"
# The CA and client certificate imagectl uses (cluster.json names them, relative to itself).
TLS_DIR="$ROOT/deploy/compose/tls"
PREBUILT="$ROOT/target/docker-prebuilt"
PORTS="7100 7101 7110 7111 7112"
OWNER=100000000001
OWNER_KEYS='imagefleet:{img-*}:owner' # services/sharing/src/redis_maps.rs
WORK=$(mktemp -d "${TMPDIR:-/tmp}/imagefleet-ctest.XXXXXX")
COMPOSE=()
CLUSTER_UP=0

compose() {
    "${COMPOSE[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" \
        -f "$ROOT/deploy/compose.local-base.yml" "$@"
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ "$CLUSTER_UP" = 1 ]; then
        if [ "$rc" != 0 ]; then
            printf '\n=== state at failure\n'
            compose ps
            printf '\n=== last service logs\n'
            compose logs --no-color --tail 60 2>&1 | tail -n 400
        fi
        if [ "$rc" != 0 ] && [ "${IMAGEFLEET_COMPOSE_TEST_KEEP:-0}" = 1 ]; then
            printf '\nkept running (IMAGEFLEET_COMPOSE_TEST_KEEP=1): %s -p %s -f docker-compose.yml -f deploy/compose.local-base.yml down -v\n' \
                "${COMPOSE[*]}" "$PROJECT"
        else
            printf '\n=== cleanup: down -v (%s)\n' "$PROJECT"
            compose down -v --remove-orphans --timeout 10 >/dev/null 2>&1
        fi
    fi
    if [ "$rc" = 0 ] || [ "${IMAGEFLEET_COMPOSE_TEST_KEEP:-0}" != 1 ]; then
        docker image rm -f "$IMAGEFLEET_IMAGE" >/dev/null 2>&1
        # Build-stage leftovers of this test's image builds (untagged, labelled in the Dockerfile).
        docker image prune -f --filter label=org.imagefleet.stage=build >/dev/null 2>&1
    fi
    # Never leave host binaries where a later `docker compose build` would pick them up.
    rm -rf "$PREBUILT"
    rm -rf "$TLS_DIR"
    rm -rf "$WORK"
    if [ "$rc" = 0 ]; then
        printf '\ncompose test: PASSED in %ss\n' "$(($(date +%s) - T0))"
    else
        printf '\ncompose test: FAILED (exit %s) after %ss\n' "$rc" "$(($(date +%s) - T0))" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

IMAGECTL=""
# imagectl from the host, against the compose cluster; every call is bounded in time.
ictl() { timeout 600 "$IMAGECTL" --cluster "$CLUSTER_FILE" "$@"; }
# imagectl ... --output json, failing the test with imagectl's message if it fails.
ictl_json() {
    local out
    if ! out=$(ictl "$@" --output json 2>"$WORK/ictl.err"); then
        cat "$WORK/ictl.err" >&2
        fail "imagectl $* failed"
    fi
    printf '%s' "$out"
}
# jget PATH: a field of the JSON document on stdin ("imageSet.0.imageId"); proto3 JSON leaves
# out default values, so a missing field prints as empty.
jget() {
    python3 -c '
import json, sys
d = json.load(sys.stdin)
for part in sys.argv[1].split("."):
    if isinstance(d, list):
        d = d[int(part)] if int(part) < len(d) else ""
    elif isinstance(d, dict):
        d = d.get(part, "")
    else:
        d = ""
print(json.dumps(d) if isinstance(d, (dict, list)) else d)' "$1"
}

# jfields PATH...: several fields of the JSON document on stdin, on one line, separated by |
# (not a tab: read would merge the empty fields proto3 JSON leaves out).
jfields() {
    python3 -c '
import json, sys
doc = json.load(sys.stdin)
out = []
for path in sys.argv[1:]:
    d = doc
    for part in path.split("."):
        d = d.get(part, "") if isinstance(d, dict) else ""
    out.append(str(d))
print("|".join(out))' "$@"
}

service_id() { compose ps -q "$1"; }

health_of() {
    docker inspect -f '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' \
        "$1" 2>/dev/null || echo "missing/none"
}

# wait_healthy TIMEOUT SERVICE...: every service's container running and healthy.
wait_healthy() {
    local timeout=$1
    shift
    local deadline=$(($(date +%s) + timeout)) svc id state pending
    while :; do
        pending=""
        for svc in "$@"; do
            id=$(service_id "$svc")
            state=$(health_of "${id:-none}")
            case "$state" in
                running/healthy) ;;
                exited/* | dead/*)
                    compose logs --no-color --tail 40 "$svc" >&2 || true
                    fail "$svc stopped ($state)"
                    ;;
                *) pending="$pending $svc=$state" ;;
            esac
        done
        [ -z "$pending" ] && return 0
        [ "$(date +%s)" -ge "$deadline" ] && fail "not healthy after ${timeout}s:$pending"
        sleep 1
    done
}

# describe_image REGION IMAGE: the Image as JSON (images describe prints DescribeImagesResponse)
describe_image() {
    ictl_json images describe --region "$1" --image "$2" | jget imageSet.0
}

# image_field REGION IMAGE FIELD
image_field() {
    describe_image "$1" "$2" | jget "$3"
}

# wait_image_state REGION IMAGE STATE TIMEOUT
wait_image_state() {
    local deadline=$(($(date +%s) + $4)) state
    while :; do
        state=$(image_field "$1" "$2" imageState)
        [ "$state" = "$3" ] && return 0
        case "$state" in CREATEFAILED | IMPORTFAILED)
            fail "$2 in $1 ended $state: $(image_field "$1" "$2" stateReason)" ;;
        esac
        [ "$(date +%s)" -ge "$deadline" ] && fail "$2 in $1 still $state after $4s (wanted $3)"
        sleep 0.5
    done
}

# run_instance REGION IMAGE -> instance id, once RUNNING
run_instance() {
    local id state
    id=$(ictl_json instances run --region "$1" --image "$2" --type S5.MEDIUM4 | jget instanceSet.0.instanceId)
    [ -n "$id" ] || fail "instances run in $1 returned no id"
    for _ in $(seq 1 120); do
        state=$(ictl_json instances list --region "$1" --instance "$id" | jget instanceSet.0.instanceState)
        [ "$state" = RUNNING ] && {
            printf '%s' "$id"
            return 0
        }
        sleep 0.5
    done
    fail "instance $id in $1 never reached RUNNING (last: $state)"
}

# A sparse-aware byte comparison of two raw disk files: same size, and the same bytes in the
# union of their data extents (holes read as zeros in both).
same_disk_bytes() {
    python3 - "$1" "$2" <<'PY'
import os, sys
a, b = sys.argv[1], sys.argv[2]
fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
sa, sb = os.fstat(fa).st_size, os.fstat(fb).st_size
if sa != sb:
    sys.exit(f"sizes differ: {a} {sa} bytes, {b} {sb} bytes")
def extents(fd, size):
    out, off = [], 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        off = end
    return out
compared = 0
for start, end in extents(fa, sa) + extents(fb, sb):
    pos = start
    while pos < end:
        n = min(4 << 20, end - pos)
        if os.pread(fa, n, pos) != os.pread(fb, n, pos):
            sys.exit(f"bytes differ in [{pos}, {pos + n})")
        pos += n
        compared += n
print(f"{sa} bytes each (virtual), {compared} data bytes compared, identical")
PY
}

# Every ownership map the sharing service keeps (keys under imagefleet:, see
# services/sharing/src/redis_maps.rs) as sorted lines: "key<TAB>field<TAB>value" for the share
# hashes and reverse indexes, "key<TAB>owner" for the owner keys.
redis_maps() {
    local id key
    id=$(service_id redis)
    for key in $(docker exec "$id" redis-cli --raw KEYS 'imagefleet:{*}:*'); do
        case "$key" in
        *:owner) printf '%s\t%s\n' "$key" "$(docker exec "$id" redis-cli --raw GET "$key")" ;;
        *) docker exec "$id" redis-cli --raw HGETALL "$key" | paste - - | sed "s|^|$key	|" ;;
        esac
    done | sort
}

# "image<TAB>owner" for every image with an owner key (imagefleet:{<image id>}:owner).
owner_map() {
    local id key img
    id=$(service_id redis)
    for key in $(docker exec "$id" redis-cli --raw KEYS "$OWNER_KEYS"); do
        img=${key#imagefleet:\{}
        img=${img%\}:owner}
        printf '%s\t%s\n' "$img" "$(docker exec "$id" redis-cli --raw GET "$key")"
    done | sort
}

# ---------------------------------------------------------------------------------------------
step "prerequisites"
# ---------------------------------------------------------------------------------------------
command -v docker >/dev/null || fail "docker is not installed"
docker info >/dev/null 2>&1 || fail "the Docker engine does not answer (docker info)"
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
else
    info "installing docker-compose (Debian)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
    COMPOSE=(docker-compose)
fi
info "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version | head -n1))"
command -v python3 >/dev/null || fail "python3 is needed to read imagectl's JSON"
command -v cargo >/dev/null || fail "cargo is needed to build imaged and imagectl"
command -v objcopy >/dev/null || fail "objcopy (binutils) is needed"
info "project: $PROJECT, image: $IMAGEFLEET_IMAGE, base: $IMAGEFLEET_BASE_IMAGE"

# Earlier runs of this test that were killed before their trap ran hold the ports: remove them.
for stale in $(docker ps -a --format '{{.Label "com.docker.compose.project"}}' |
    grep "^$PROJECT_PREFIX-" | sort -u); do
    info "removing a stale test cluster: $stale"
    "${COMPOSE[@]}" -p "$stale" -f "$ROOT/docker-compose.yml" down -v --remove-orphans >/dev/null 2>&1 || true
done
for stale in $(docker images --format '{{.Repository}}:{{.Tag}}' "$PROJECT_PREFIX"); do
    docker image rm -f "$stale" >/dev/null 2>&1 || true
done
for port in $PORTS; do
    python3 -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$port" || fail "127.0.0.1:$port is in use (the compose cluster publishes $PORTS): stop what holds it"
done

# ---------------------------------------------------------------------------------------------
step "local base image $IMAGEFLEET_BASE_IMAGE (debootstrap once, then cached)"
# ---------------------------------------------------------------------------------------------
"$ROOT/deploy/build-local-base.sh" "$IMAGEFLEET_BASE_IMAGE"

# ---------------------------------------------------------------------------------------------
step "host binaries: cargo build $CARGO_PROFILE_FLAG --bins"
# ---------------------------------------------------------------------------------------------
# shellcheck disable=SC2086 # CARGO_PROFILE_FLAG is one flag or nothing
cargo build $CARGO_PROFILE_FLAG --bins
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
IMAGECTL="$TARGET_DIR/$PROFILE/imagectl"
IMAGED_HOST="$TARGET_DIR/$PROFILE/imaged"
rm -rf "$PREBUILT"
mkdir -p "$PREBUILT"
for bin in imaged imagectl; do
    # Without debug info: a smaller build context and image (symbols stay for backtraces).
    objcopy --strip-debug "$TARGET_DIR/$PROFILE/$bin" "$PREBUILT/$bin"
done
info "copied $PROFILE imaged and imagectl to target/docker-prebuilt/ (removed again at the end)"

# ---------------------------------------------------------------------------------------------
step "compose config and image build"
# ---------------------------------------------------------------------------------------------
# The regions read their emulated links from a file (docs/links.md); this run gives them one
# with a mainland link, and checks below that both ends of it applied it.
LINK_ENTRY="ap-guangzhou,ap-shanghai=rtt:20ms"
printf '# compose test\n%s\n' "$LINK_ENTRY" >"$WORK/links.conf"
chmod 644 "$WORK/links.conf"
export IMAGEFLEET_COMPOSE_LINKS="$WORK/links.conf"
compose config -q
# Every imagefleet service has the same build and image name: building one builds the image.
if ! compose build catalog >"$WORK/build.log" 2>&1; then
    tail -n 60 "$WORK/build.log" >&2
    fail "compose build failed"
fi
grep -h "using prebuilt binaries" "$WORK/build.log" | sort -u | sed 's/^/    /' || true
docker image inspect "$IMAGEFLEET_IMAGE" --format '    image {{.Id}}, user {{.Config.User}}, entrypoint {{.Config.Entrypoint}}'

# ---------------------------------------------------------------------------------------------
step "up -d, wait until every service is healthy"
# ---------------------------------------------------------------------------------------------
CLUSTER_UP=1
compose up -d --no-build
wait_healthy 240 redis catalog sharing region-guangzhou region-shanghai region-singapore
compose ps
for svc in region-guangzhou region-shanghai; do
    compose logs --no-color "$svc" 2>&1 | grep "emulated link" | grep -qF "$LINK_ENTRY" ||
        fail "$svc did not apply the link $LINK_ENTRY from the mounted links file"
done
info "both regions applied $LINK_ENTRY from the mounted links file"

# ---------------------------------------------------------------------------------------------
step "TLS: the host gets the cluster CA and the client certificate; plaintext is refused"
# ---------------------------------------------------------------------------------------------
CERTS_ID=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=certs" | head -n 1)
[ -n "$CERTS_ID" ] || fail "no certs container"
rm -rf "$TLS_DIR"
mkdir -p "$TLS_DIR"
chmod 0700 "$TLS_DIR"
for f in ca.pem client.pem client.key; do
    docker cp "$CERTS_ID:/tls/$f" "$TLS_DIR/$f" >/dev/null
done
chmod 0600 "$TLS_DIR/client.key"
for port in 7100 7101 7110; do
    # Health is open to any caller, so an answer over plaintext would mean plaintext is served.
    if timeout 20 "$IMAGED_HOST" health --url "http://127.0.0.1:$port" >/dev/null 2>&1; then
        fail "127.0.0.1:$port answered plaintext"
    fi
    # Over TLS, without a client certificate: refused by mutual TLS.
    if IMAGEFLEET_TLS_CA="$TLS_DIR/ca.pem" timeout 20 "$IMAGED_HOST" health \
        --url "https://127.0.0.1:$port" >/dev/null 2>&1; then
        fail "127.0.0.1:$port served a client without a certificate"
    fi
    IMAGEFLEET_TLS_CA="$TLS_DIR/ca.pem" IMAGEFLEET_TLS_CERT="$TLS_DIR/client.pem" \
        IMAGEFLEET_TLS_KEY="$TLS_DIR/client.key" timeout 20 "$IMAGED_HOST" health \
        --url "https://127.0.0.1:$port" >/dev/null || fail "127.0.0.1:$port: no answer over mutual TLS"
done
info "ok: TLS only, client certificates demanded, CA and client certificate in $TLS_DIR"

# ---------------------------------------------------------------------------------------------
step "regions: the catalog hands the host the published (public) URLs"
# ---------------------------------------------------------------------------------------------
ictl regions list
REGIONS=$(ictl_json regions list)
for pair in ap-guangzhou=7110 ap-shanghai=7111 ap-singapore=7112; do
    region=${pair%=*}
    want="https://127.0.0.1:${pair#*=}"
    got=$(printf '%s' "$REGIONS" | python3 -c '
import json, sys
for r in json.load(sys.stdin).get("regionSet", []):
    if r.get("region") == sys.argv[1]:
        print(r.get("endpoint", ""))' "$region")
    [ "$got" = "$want" ] || fail "$region: endpoint '$got', expected the public URL $want"
done
info "ok: 3 regions, public endpoints"

# ---------------------------------------------------------------------------------------------
step "public images in ap-guangzhou"
# ---------------------------------------------------------------------------------------------
PUBLIC=$(ictl_json images list --region ap-guangzhou --type PUBLIC_IMAGE --limit 100)
count=$(printf '%s' "$PUBLIC" | jget totalCount)
[ "${count:-0}" -gt 0 ] || fail "no public images in ap-guangzhou"
DEBIAN=$(ictl_json images list --region ap-guangzhou --type PUBLIC_IMAGE --platform Debian | jget imageSet.0.imageId)
[ -n "$DEBIAN" ] || fail "no public Debian image"
info "$count public images; Debian: $DEBIAN"

# ---------------------------------------------------------------------------------------------
step "launch an instance, write $PAYLOAD_MIB MiB to its disk, create an image (--wait)"
# ---------------------------------------------------------------------------------------------
OFFSET=$((1 << 20))
head -c $((PAYLOAD_MIB << 20)) /dev/urandom >"$WORK/a.bin"
INS_A=$(run_instance ap-guangzhou "$DEBIAN")
info "instance $INS_A RUNNING"
t=$(date +%s)
ictl instances write --region ap-guangzhou --instance "$INS_A" --offset "$OFFSET" --file "$WORK/a.bin" >/dev/null
info "wrote $PAYLOAD_MIB MiB at offset $OFFSET in $(($(date +%s) - t))s"
IMG_A=$(ictl_json images create --region ap-guangzhou --instance "$INS_A" --name ctest-a --wait | jget imageSet.0.imageId)
[ -n "$IMG_A" ] || fail "images create returned no image id"
[ "$(image_field ap-guangzhou "$IMG_A" imageState)" = NORMAL ] || fail "$IMG_A is not NORMAL after --wait"
DIGEST_A=$(image_field ap-guangzhou "$IMG_A" contentDigest)
info "image $IMG_A NORMAL, digest $DIGEST_A"

# ---------------------------------------------------------------------------------------------
step "copy $IMG_A to ap-shanghai (images sync --wait) and compare the bytes"
# ---------------------------------------------------------------------------------------------
t=$(date +%s)
SYNC=$(ictl_json images sync --region ap-guangzhou --image "$IMG_A" --to ap-shanghai --wait)
COPY_A=$(printf '%s' "$SYNC" | jget imageSet.0.imageId)
[ -n "$COPY_A" ] || fail "images sync returned no destination image"
[ "$(printf '%s' "$SYNC" | jget imageSet.0.imageState)" = NORMAL ] || fail "copy $COPY_A is not NORMAL: $SYNC"
info "copy $COPY_A in ap-shanghai NORMAL after $(($(date +%s) - t))s"
[ "$(image_field ap-shanghai "$COPY_A" contentDigest)" = "$DIGEST_A" ] || fail "content digests differ"
info "content digests equal"
ictl images export --region ap-guangzhou --image "$IMG_A" --format raw --out "$WORK/a-src.raw" >/dev/null
ictl images export --region ap-shanghai --image "$COPY_A" --format raw --out "$WORK/a-copy.raw" >/dev/null
same_disk_bytes "$WORK/a-src.raw" "$WORK/a-copy.raw" | sed 's/^/    exports: /'
cmp --ignore-initial="$OFFSET:0" --bytes=$((PAYLOAD_MIB << 20)) "$WORK/a-copy.raw" "$WORK/a.bin" ||
    fail "the exported copy does not hold the written bytes"
rm -f "$WORK/a-src.raw" "$WORK/a-copy.raw"
INS_A2=$(run_instance ap-shanghai "$COPY_A")
ictl instances read --region ap-shanghai --instance "$INS_A2" --offset "$OFFSET" \
    --length $((PAYLOAD_MIB << 20)) --out "$WORK/a-back.bin" >/dev/null
cmp "$WORK/a-back.bin" "$WORK/a.bin" || fail "an instance launched from the copy reads other bytes"
rm -f "$WORK/a-back.bin"
info "ok: exports identical, and instance $INS_A2 (from the copy) reads back the $PAYLOAD_MIB MiB written"

# ---------------------------------------------------------------------------------------------
step "kill the destination region (ap-shanghai) mid-copy; the copy must resume and complete"
# ---------------------------------------------------------------------------------------------
INS_B=$(run_instance ap-guangzhou "$DEBIAN")
SHANGHAI=$(service_id region-shanghai)
# A copy of 200 MiB takes about a second here, and the progress an image reports lags the
# transfer, so the kill is timed on the destination's own log line "copy starting" for this
# image (the attempt is recorded by then). The copy must then report a second attempt; if the
# first one finished before the kill landed, try again with new data.
interrupted=""
for try in 1 2 3; do
    head -c $((PAYLOAD_MIB << 20)) /dev/urandom >"$WORK/b.bin"
    ictl instances write --region ap-guangzhou --instance "$INS_B" --offset "$OFFSET" --file "$WORK/b.bin" >/dev/null
    IMG_B=$(ictl_json images create --region ap-guangzhou --instance "$INS_B" --name "ctest-b$try" --wait | jget imageSet.0.imageId)
    DIGEST_B=$(image_field ap-guangzhou "$IMG_B" contentDigest)
    info "try $try: image $IMG_B ($PAYLOAD_MIB MiB of new data) NORMAL"
    since=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    COPY_B=$(ictl_json images sync --region ap-guangzhou --image "$IMG_B" --to ap-shanghai | jget imageSet.0.imageId)
    [ -n "$COPY_B" ] || fail "images sync returned no destination image"
    for _ in $(seq 1 500); do
        docker logs --since "$since" "$SHANGHAI" 2>&1 | grep -q "copy starting.*image=$COPY_B" && break
        sleep 0.02
    done
    docker kill --signal KILL "$SHANGHAI" >/dev/null
    info "try $try: killed region-shanghai (SIGKILL) once copy $COPY_B had started"
    sleep 1
    docker start "$SHANGHAI" >/dev/null
    wait_healthy 120 region-shanghai
    info "try $try: region-shanghai started again and healthy"
    wait_image_state ap-shanghai "$COPY_B" NORMAL 300
    IFS='|' read -r attempts transferred digest < <(describe_image ap-shanghai "$COPY_B" |
        jfields syncProgress.attempts syncProgress.bytesTransferred contentDigest)
    info "try $try: copy $COPY_B NORMAL: ${attempts:-?} attempts, ${transferred:-?} bytes over the wire"
    [ "$digest" = "$DIGEST_B" ] || fail "content digests differ after the interrupted copy"
    if [ "${attempts:-0}" -ge 2 ]; then
        interrupted=1
        break
    fi
    info "try $try: the copy had finished before the kill landed; again with new data"
done
[ -n "$interrupted" ] || fail "could not kill the destination mid-copy in 3 tries (raise IMAGEFLEET_COMPOSE_TEST_MIB)"
INS_B2=$(run_instance ap-shanghai "$COPY_B")
ictl instances read --region ap-shanghai --instance "$INS_B2" --offset "$OFFSET" \
    --length $((PAYLOAD_MIB << 20)) --out "$WORK/b-back.bin" >/dev/null
cmp "$WORK/b-back.bin" "$WORK/b.bin" || fail "an instance launched from the resumed copy reads other bytes"
rm -f "$WORK/b-back.bin"
[ "$(image_field ap-shanghai "$COPY_A" contentDigest)" = "$DIGEST_A" ] || fail "the earlier copy changed across the kill"
info "ok: digests equal, bytes read back from instance $INS_B2, the earlier copy intact"

# ---------------------------------------------------------------------------------------------
step "kill -9 and restart Redis: nothing acknowledged is lost (owners, shares, images, instances)"
# ---------------------------------------------------------------------------------------------
OTHER=100000000002
ictl images share --region ap-guangzhou --image "$IMG_A" --accounts "$OTHER" >/dev/null
[ "$(ictl_json images list --region ap-guangzhou --account "$OTHER" --type SHARED_IMAGE | jget imageSet.0.imageId)" = "$IMG_A" ] ||
    fail "$OTHER does not see $IMG_A as shared with it"
info "shared $IMG_A with $OTHER"
owner_map >"$WORK/owners-before.txt"
for img in "$IMG_A" "$COPY_A" "$IMG_B" "$COPY_B"; do
    grep -q "^$img	$OWNER\$" "$WORK/owners-before.txt" || fail "$img has no owner key ($OWNER_KEYS)"
done
redis_maps >"$WORK/maps-before.txt"
grep -q "^imagefleet:{$IMG_A}:shares	$OTHER	" "$WORK/maps-before.txt" || fail "no share entry for $IMG_A"
grep -q "^imagefleet:{account-$OTHER}:shared-with	$IMG_A	" "$WORK/maps-before.txt" || fail "no reverse-index entry for $OTHER"
info "$(wc -l <"$WORK/owners-before.txt") owner keys (our 4 images owned by $OWNER); $(wc -l <"$WORK/maps-before.txt") map entries in all"
REDIS=$(service_id redis)
docker kill --signal KILL "$REDIS" >/dev/null
info "killed redis (SIGKILL)"
docker start "$REDIS" >/dev/null
wait_healthy 120 redis sharing
redis_maps >"$WORK/maps-after.txt"
missing=$(comm -23 "$WORK/maps-before.txt" "$WORK/maps-after.txt")
[ -z "$missing" ] || fail "map entries lost across the Redis restart: $missing"
info "all $(wc -l <"$WORK/maps-before.txt") map entries (owners and shares) still there"
[ "$(ictl_json images list --region ap-guangzhou --account "$OTHER" --type SHARED_IMAGE | jget imageSet.0.imageId)" = "$IMG_A" ] ||
    fail "$OTHER no longer sees $IMG_A as shared with it"
info "$OTHER still sees $IMG_A shared with it"
for pair in "ap-guangzhou $IMG_A" "ap-guangzhou $IMG_B" "ap-shanghai $COPY_A" "ap-shanghai $COPY_B"; do
    read -r region id <<<"$pair"
    [ "$(image_field "$region" "$id" imageState)" = NORMAL ] || fail "$id in $region is no longer NORMAL"
done
for pair in "ap-guangzhou $INS_A" "ap-guangzhou $INS_B" "ap-shanghai $INS_A2" "ap-shanghai $INS_B2"; do
    read -r region id <<<"$pair"
    state=$(ictl_json instances list --region "$region" --instance "$id" | jget instanceSet.0.instanceState)
    [ "$state" = RUNNING ] || fail "instance $id in $region is '$state'"
done
[ "$(image_field ap-guangzhou "$IMG_A" contentDigest)" = "$DIGEST_A" ] || fail "$IMG_A changed"
info "images and instances still listed, $IMG_A intact"
# The sharing service reconnects: a new image gets its owner entry, and deleting it removes it.
IMG_C=""
for _ in $(seq 1 30); do
    if IMG_C=$(ictl images create --region ap-guangzhou --instance "$INS_A" --name ctest-c --wait \
        --output json 2>"$WORK/ictl.err" | jget imageSet.0.imageId) && [ -n "$IMG_C" ]; then
        break
    fi
    IMG_C=""
    sleep 1
done
[ -n "$IMG_C" ] || { cat "$WORK/ictl.err" >&2; fail "images create after the Redis restart failed"; }
owner_map | grep -q "^$IMG_C	$OWNER\$" || fail "$IMG_C has no owner entry after the Redis restart"
ictl images delete --region ap-guangzhou --image "$IMG_C" >/dev/null
for _ in $(seq 1 60); do
    listed=$(ictl_json images list --region ap-guangzhou --name ctest-c | jget totalCount)
    [ "${listed:-0}" = 0 ] && break
    sleep 0.5
done
[ "${listed:-0}" = 0 ] || fail "$IMG_C still listed after delete"
owner_map | grep -q "^$IMG_C	" && fail "$IMG_C still has an owner entry after delete"
info "ok: created and deleted $IMG_C after the restart; owner map follows"

# ---------------------------------------------------------------------------------------------
step "billing: the mounted price book is in force, and the run's usage is billed"
# ---------------------------------------------------------------------------------------------
want=$(python3 -c 'import sys, tomllib; b = tomllib.load(open(sys.argv[1], "rb")); print(b["regions"]["ap-singapore"]["instance_hour"]["S5.LARGE8"])' deploy/price-book.toml)
got=$(ictl_json billing prices --region ap-singapore | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(next(p["hourly"] for p in d["regionSet"][0]["instanceHour"] if p["instanceType"] == "S5.LARGE8"))')
[ "$(python3 -c 'import sys; print(float(sys.argv[1]) == float(sys.argv[2]))' "$want" "$got")" = True ] \
    || fail "S5.LARGE8 in ap-singapore: the service says $got, the mounted book $want"
BILLED=""
for _ in $(seq 1 60); do
    BILLED=$(ictl_json billing report | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(" ".join(sorted({r for l in d.get("lineItems", []) if l["kind"] == "INSTANCE" for r in l["resourceIds"]})))')
    case " $BILLED " in *" $INS_A "*) break ;; esac
    sleep 1
done
case " $BILLED " in *" $INS_A "*) ;; *) fail "the bill has no instance line for $INS_A (billed: $BILLED)" ;; esac
info "ok: prices from the mounted book; $INS_A billed (instances billed: $BILLED)"

# ---------------------------------------------------------------------------------------------
step "down -v"
# ---------------------------------------------------------------------------------------------
compose down -v --remove-orphans --timeout 10
CLUSTER_UP=0
left=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
[ -z "$left" ] || fail "volumes left behind: $left"
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
[ -z "$left" ] || fail "containers left behind: $left"
info "no containers or volumes left"
