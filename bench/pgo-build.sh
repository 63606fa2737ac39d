#!/usr/bin/env bash
# pgo-build.sh - release binaries with the data plane built from a profile of its own hot path
# (profile-guided optimisation). Builds an instrumented data plane, runs it under the load of
# ../shared/bench/peers.sh (three nginx backends, 64 keep-alive connections, then 64 with a new
# connection per request), and builds it again with the profile recorded: the compiler then lays
# out and inlines the forwarding path by how often each branch ran. The control plane is built
# as usual. The profile covers forwarding; paths the load never took (TLS, the cache, rate
# limits on Redis) are built as in a plain release build or slightly smaller.
#
# Run from the project root; needs nginx, wrk, curl and rustup's llvm-tools component
# (`rustup component add llvm-tools`). Uses the benchmark's ports (15001-15003, 15050, 15051,
# 18080, 19901), so nothing else may listen there.
# Settings (environment): OUT [target/pgo] where the binaries go; TARGET [${CARGO_TARGET_DIR:-target}]
#   cargo's target directory (the two data plane builds go to pgo-gen/ and pgo-use/ inside it,
#   since their compiler flags differ from a plain build's); TRAIN_SECS [15] seconds of each load.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TARGET=${TARGET:-${CARGO_TARGET_DIR:-$ROOT/target}}
OUT=${OUT:-$ROOT/target/pgo}
TRAIN_SECS=${TRAIN_SECS:-15}
URL=http://127.0.0.1:18080/data

for c in nginx wrk curl cargo rustc; do
  command -v "$c" >/dev/null || { echo "missing $c (apt-get install nginx wrk curl)" >&2; exit 2; }
done
PROFDATA="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata"
[[ -x $PROFDATA ]] || { echo "missing llvm-profdata (rustup component add llvm-tools)" >&2; exit 2; }

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "building the control plane and an instrumented data plane" >&2
cd "$ROOT"
CARGO_TARGET_DIR=$TARGET cargo build --release --locked -p control-plane
# A fixed profile directory keeps the flags, and so cargo's builds, the same from run to run.
PROFILE=$TARGET/pgo-profile
rm -rf "$PROFILE"
mkdir -p "$PROFILE"
RUSTFLAGS="-Cprofile-generate=$PROFILE" CARGO_TARGET_DIR=$TARGET/pgo-gen \
  cargo build --release --locked -p data-plane

for port in 15001 15002 15003; do
  mkdir -p "$WORK/tmp-backend-$port"
  sed -e "s#@RUN@#$WORK#g" -e "s#@PORT@#$port#g" "$HERE/backend-nginx.conf" >"$WORK/backend-$port.conf"
  nginx -p "$WORK" -c "$WORK/backend-$port.conf" -g 'daemon off;' >"$WORK/backend-$port.log" 2>&1 &
  PIDS+=($!)
done
# The planes' credential (control-plane serve requires one).
export LB_CLUSTER_TOKEN=${LB_CLUSTER_TOKEN:-pgo-build-cluster-token}
"$TARGET/release/control-plane" serve --config "$HERE/peers-control-plane.toml" \
  --grpc-listen 127.0.0.1:15051 --http-listen 127.0.0.1:15050 \
  --backends 127.0.0.1:15001,127.0.0.1:15002,127.0.0.1:15003 --ip-limit 0 >"$WORK/control-plane.log" 2>&1 &
PIDS+=($!)
LB_ADMIN_TOKEN=${LB_ADMIN_TOKEN:-pgo-build} "$TARGET/pgo-gen/release/data-plane" \
  --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:19901 \
  --control-plane http://127.0.0.1:15051 >"$WORK/data-plane.log" 2>&1 &
DP=$!
PIDS+=("$DP")

deadline=$(( $(date +%s) + 30 ))
until curl -fsS -m 2 "$URL" 2>/dev/null | grep -q '"status":"ok"'; do
  (( $(date +%s) < deadline )) && kill -0 "$DP" 2>/dev/null || {
    echo "the instrumented data plane did not forward within 30 s; its log:" >&2
    cat "$WORK/data-plane.log" >&2
    exit 1
  }
  sleep 0.1
done

echo "recording the profile: ${TRAIN_SECS}s keep-alive, ${TRAIN_SECS}s a connection per request" >&2
wrk -t1 -c64 -d"${TRAIN_SECS}s" "$URL" | grep 'Requests/sec' >&2
wrk -t1 -c64 -d"${TRAIN_SECS}s" -H 'Connection: close' "$URL" | grep 'Requests/sec' >&2
# The profile is written when the process exits, after its graceful stop.
kill -TERM "$DP"
wait "$DP" || true
compgen -G "$PROFILE/*.profraw" >/dev/null || { echo "no profile was written" >&2; exit 1; }
"$PROFDATA" merge -o "$PROFILE/merged.profdata" "$PROFILE"/*.profraw
# Named by its content: a new profile changes the flags, so cargo rebuilds every crate with it.
MERGED=$PROFILE/$(sha256sum "$PROFILE/merged.profdata" | cut -c1-16).profdata
mv "$PROFILE/merged.profdata" "$MERGED"

echo "building the data plane from the profile" >&2
RUSTFLAGS="-Cprofile-use=$MERGED" CARGO_TARGET_DIR=$TARGET/pgo-use \
  cargo build --release --locked -p data-plane
mkdir -p "$OUT"
cp "$TARGET/pgo-use/release/data-plane" "$TARGET/release/control-plane" "$OUT/"
echo "built $OUT/data-plane and $OUT/control-plane" >&2
