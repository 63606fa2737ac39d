#!/usr/bin/env bash
# protocols.sh - gRPC and WebSocket through the data plane, against nginx and HAProxy, in one run
# with interleaved rounds and medians.
#
# Backends: three mock backends (`target/release/mock-backends`, one process, ports
# 15001-15003), which answer `lb.mock.v1.Echo/Unary` over HTTP/2 in clear text and echo
# WebSocket messages on `/ws`; for the h2 scenario, three one-worker nginx backends answering
# `GET /data` over HTTP/2 in clear text (ports 15011-15013, `backend-nginx.conf` with `http2`).
# Each target listens on 127.0.0.1:18080 and balances round robin over the three:
#   direct    the load on backend 15001 itself (the backend's own limit, no proxy)
#   nginx     nginx 2 workers (gRPC: grpc_pass with upstream keepalive; WebSocket: proxy_pass
#             with the Upgrade and Connection fields; not in h2: nginx speaks HTTP/2 to
#             backends only for gRPC)
#   haproxy   HAProxy 2 threads (gRPC and h2: `proto h2` on the bind and the servers)
#   ours      control plane + data plane (gRPC and h2: backends named h2c://)
# Scenarios:
#   h2        h2load, C connections of M concurrent streams, `GET /data`, HTTP/2 end to end.
#   grpc      h2load, C connections of M concurrent streams, each a unary call of a 7-byte
#             message, for DURATION s after WARMUP s. Before measuring, one call through the
#             target must come back with grpc-status 0 (checked in curl's trailer dump).
#   ws        WS_CONNECTIONS WebSockets, each sending a 64-byte message and waiting for its
#             echo, over and over, for DURATION s (`mock-backends/examples/ws_load.rs`).
# The load generator is pinned to CPU LOAD_CPUS.
#
# Run from the project root after
#   cargo build --release && cargo build --release -p mock-backends --example ws_load
#   bench/protocols.sh
# Settings (environment): SCENARIOS [h2 grpc ws] TARGETS [direct nginx haproxy ours] REPS [3]
#   DURATION [10] WARMUP [2] C [16] M [8] WS_CONNECTIONS [64] LOAD_CPUS [1] ("" = unpinned)
# Needs nginx, haproxy, h2load (nghttp2-client), curl. Prints one line per scenario and target:
# the median rate, and the ratio to nginx and HAProxy; raw output in $OUT_DIR.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SCENARIOS=${SCENARIOS:-"h2 grpc ws"} TARGETS=${TARGETS:-"direct nginx haproxy ours"}
REPS=${REPS:-3} DURATION=${DURATION:-10} WARMUP=${WARMUP:-2} C=${C:-16} M=${M:-8}
WS_CONNECTIONS=${WS_CONNECTIONS:-64} LOAD_CPUS=${LOAD_CPUS-1}
OUT_DIR=${OUT_DIR:-$HERE/results/protocols-$(date +%Y%m%d-%H%M%S)}
BIN=${BIN:-target/release}
RUN=$OUT_DIR/run
mkdir -p "$RUN"
export LB_ADMIN_TOKEN=bench-admin-token-0123456789 LB_CLUSTER_TOKEN=bench-cluster-token-0123456789

declare -A PIDS=()
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
spawn() { # spawn NAME CMD...: own process group, output in run/NAME.log
  local name=$1; shift
  setsid "$@" >"$RUN/$name.log" 2>&1 </dev/null &
  PIDS[$name]=$!
}
stop() {
  local pid=${PIDS[$1]:-}
  [[ -z $pid ]] && return 0
  kill -TERM -- "-$pid" 2>/dev/null
  for _ in $(seq 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  unset "PIDS[$1]"
}
cleanup() { for n in "${!PIDS[@]}"; do stop "$n"; done; }
trap cleanup EXIT
pinned() { if [[ -n $LOAD_CPUS ]]; then taskset -c "$LOAD_CPUS" "$@"; else "$@"; fi; }

# The body of one call: no compression, length 7, EchoRequest { message: "hello" }.
printf '\x00\x00\x00\x00\x07\x0a\x05hello' >"$RUN/call.bin"

# One call through PORT: 0 when the answer carries grpc-status 0.
call_ok() {
  curl -sS --http2-prior-knowledge -m 2 -o /dev/null -D "$RUN/check.headers" \
    -H 'content-type: application/grpc' -H 'te: trailers' --data-binary @"$RUN/call.bin" \
    "http://127.0.0.1:$1/lb.mock.v1.Echo/Unary" 2>/dev/null &&
    grep -qi '^grpc-status: *0' "$RUN/check.headers"
}
# A WebSocket upgrade through PORT: 0 when answered 101.
upgrade_ok() {
  local code
  # The tunnel stays open after the 101: curl ends at its time limit, the code printed.
  code=$(curl -sS -m 1 -o /dev/null -w '%{http_code}' -H 'Connection: Upgrade' \
    -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' \
    -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' "http://127.0.0.1:$1/ws" 2>/dev/null)
  [[ $code == 101 ]]
}
# A GET /data over HTTP/2 through PORT: 0 when answered 200.
get_ok() {
  local code
  code=$(curl -sS --http2-prior-knowledge -m 2 -o /dev/null -w '%{http_code}' \
    "http://127.0.0.1:$1/data" 2>/dev/null)
  [[ $code == 200 ]]
}
wait_ok() { # CHECK PORT SECONDS
  for ((i = 0; i < $3 * 10; i++)); do "$1" "$2" && return 0; sleep 0.1; done
  return 1
}
check() { case $1 in h2) echo get_ok ;; grpc) echo call_ok ;; ws) echo upgrade_ok ;; esac; }
ports() { case $1 in h2) echo 15011 15012 15013 ;; *) echo 15001 15002 15003 ;; esac; }

spawn backends "$BIN/mock-backends" --ports 15001,15002,15003
for p in 15001 15002 15003; do
  wait_ok call_ok "$p" 10 || { log "mock backend $p does not answer gRPC"; exit 2; }
done
if [[ " $SCENARIOS " == *" h2 "* ]]; then
  for p in 15011 15012 15013; do
    mkdir -p "$RUN/tmp-backend-$p"
    sed -e "s#@RUN@#$RUN#g" -e "s#@PORT@#$p#g" -e "s#listen 127.0.0.1:$p #listen 127.0.0.1:$p http2 #" \
      "$HERE/backend-nginx.conf" >"$RUN/backend-$p.conf"
    spawn "backend-$p" nginx -p "$RUN" -c "$RUN/backend-$p.conf" -g 'daemon off;'
    wait_ok get_ok "$p" 10 || { log "nginx backend $p does not answer HTTP/2"; exit 2; }
  done
fi

nginx_conf() { # SCENARIO
  local listen=127.0.0.1:18080 location
  case $1 in
    grpc) listen="$listen http2"; location='location / { grpc_pass grpc://backends; }' ;;
    ws) location='location / { proxy_pass http://backends; proxy_http_version 1.1;
          proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection "upgrade";
          proxy_read_timeout 1h; }' ;;
  esac
  cat <<EOF
worker_processes 2;
pid $RUN/nginx/nginx.pid;
error_log $RUN/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $RUN/nginx;
  keepalive_requests 10000000;
  upstream backends {
$(for p in $(ports "$1"); do echo "    server 127.0.0.1:$p;"; done)
    keepalive 64;
    keepalive_requests 10000000;
  }
  server {
    listen $listen;
    $location
  }
}
EOF
}

haproxy_conf() { # SCENARIO
  local proto="" p i=0
  [[ $1 != ws ]] && proto="proto h2"
  cat <<EOF
global
  nbthread 2
  maxconn 4000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:18080 $proto
  default_backend be
backend be
  balance roundrobin
EOF
  for p in $(ports "$1"); do i=$((i + 1)); echo "  server s$i 127.0.0.1:$p $proto"; done
}

start() { # start TARGET SCENARIO: sets PORT
  local scheme="" p backends=""
  [[ $2 != ws ]] && scheme="h2c://"
  for p in $(ports "$2"); do backends+="${backends:+,}${scheme}127.0.0.1:$p"; done
  case $1 in
    direct) read -r PORT _ < <(ports "$2"); return 0 ;;
    nginx)
      PORT=18080
      mkdir -p "$RUN/nginx"
      nginx_conf "$2" >"$RUN/nginx.conf"
      spawn nginx nginx -e "$RUN/nginx/error.log" -c "$RUN/nginx.conf" -g 'daemon off;' ;;
    haproxy)
      PORT=18080
      haproxy_conf "$2" >"$RUN/haproxy.cfg"
      spawn haproxy haproxy -db -f "$RUN/haproxy.cfg" ;;
    ours)
      PORT=18080
      spawn ours bash -c "$BIN/control-plane serve --config $HERE/peers-control-plane.toml \
          --grpc-listen 127.0.0.1:15051 --http-listen 127.0.0.1:15050 --ip-limit 0 \
          --backends $backends & \
        exec $BIN/data-plane --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:19901 \
          --control-plane http://127.0.0.1:15051" ;;
    *) log "unknown target $1"; exit 2 ;;
  esac
  wait_ok "$(check "$2")" "$PORT" 30 || {
    log "$1 does not answer $2 on $PORT"; tail -5 "$RUN/$1.log" >&2; exit 2; }
}

measure() { # measure TARGET SCENARIO ROUND: "rate mean failed"
  local out=$OUT_DIR/$2-$1-$3.txt
  case $2 in
    h2 | grpc)
      local call=(/data)
      [[ $2 == grpc ]] && call=(/lb.mock.v1.Echo/Unary -d "$RUN/call.bin"
        -H 'content-type: application/grpc' -H 'te: trailers')
      pinned h2load -c "$C" -m "$M" -D "$DURATION" --warm-up-time "$WARMUP" "${call[@]:1}" \
        "http://127.0.0.1:$PORT${call[0]}" >"$out" 2>&1
      awk '/^finished in/ { rate = $4 }
           /^requests:/ { failed = $10 + $12 }
           /^time for request:/ { mean = $6 }
           END { printf "%s %s %s\n", rate, mean, failed }' "$out" ;;
    ws)
      pinned "$BIN/examples/ws_load" "ws://127.0.0.1:$PORT/ws" "$WS_CONNECTIONS" "$DURATION" \
        >"$out" 2>&1
      awk '/^messages/ { printf "%s %sus %s\n", $2, $4, $6 }' "$out" ;;
  esac
}

declare -A RESULTS=()
for round in $(seq "$REPS"); do
  for scenario in $SCENARIOS; do
    for t in $TARGETS; do
      [[ $scenario == h2 && $t == nginx ]] && continue
      start "$t" "$scenario"
      read -r rate mean failed < <(measure "$t" "$scenario" "$round")
      log "round $round $scenario $t: $rate/s, mean $mean, failed $failed"
      RESULTS[$scenario.$t]+="$rate "
      stop "$t"
    done
  done
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
{
  printf '%-9s %-8s %12s %8s %10s   %s\n' scenario target rate/s x_nginx x_haproxy rounds
  for scenario in $SCENARIOS; do
    n=$(echo "${RESULTS[$scenario.nginx]:-}" | median)
    h=$(echo "${RESULTS[$scenario.haproxy]:-}" | median)
    for t in $TARGETS; do
      [[ -n ${RESULTS[$scenario.$t]:-} ]] || continue
      m=$(echo "${RESULTS[$scenario.$t]}" | median)
      awk -v s="$scenario" -v t="$t" -v m="$m" -v n="${n:-0}" -v h="${h:-0}" -v r="${RESULTS[$scenario.$t]}" \
        'BEGIN { xn = (n > 0) ? sprintf("%.2f", m / n) : "-"; xh = (h > 0) ? sprintf("%.2f", m / h) : "-"
                 printf "%-9s %-8s %12.0f %8s %10s   %s\n", s, t, m, xn, xh, r }'
    done
  done
} | tee "$OUT_DIR/summary.txt"
