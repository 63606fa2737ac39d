#!/usr/bin/env bash
# connections.sh - memory per client connection, ours against HAProxy and nginx, in one run.
#
# For each target in turn (listening on 127.0.0.1:18080, forwarding to three one-worker nginx
# backends on 15001-15003, as in ../shared/bench/peers.sh) it measures the resident memory (RSS,
# summed over the target's processes: our data plane alone, not its control plane) at:
#   idle      the target started and warmed by 1,000 requests on one connection
#   open      N client connections open, none has sent anything
#   request   each of them has sent one keep-alive GET /data and read the answer (still open)
#   closed    SETTLE seconds after they all closed
# and prints one line per target with the RSS at each point and the growth per connection.
#
# Run from the project root with the release binaries:
#   bench/connections.sh                 # N=9000, TARGETS="ours haproxy nginx"
# Settings (environment): N [9000] TARGETS [ours haproxy nginx] SETTLE [30] (s)
#   HOLD [0] (s) to wait after the requests before measuring them (past the allocator's
#   collection, which runs every 5 s in our data plane, the figure is what the idle keep-alive
#   connections hold rather than what the requests' peak left in the allocator)
#   OURS_ARGS [""] more data-plane flags; OURS_BIN [target/release/data-plane]
#   CP_BIN [target/release/control-plane]
# Needs nginx, haproxy, python3, curl; ulimit -n above 2N + 100 (it raises the soft limit).
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SHARED=$(cd "$HERE/../../shared/bench" 2>/dev/null && pwd || echo "")
N=${N:-9000} TARGETS=${TARGETS:-"ours haproxy nginx"} SETTLE=${SETTLE:-30} HOLD=${HOLD:-0}
OURS_BIN=${OURS_BIN:-target/release/data-plane} CP_BIN=${CP_BIN:-target/release/control-plane}
OURS_ARGS=${OURS_ARGS:-}
RUN=$(mktemp -d /tmp/lb-connections.XXXXXX)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[[ $(ulimit -n) -gt $((2 * N + 100)) ]] || { echo "ulimit -n $(ulimit -n) is too low for N=$N" >&2; exit 2; }

declare -a PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null; done
  wait 2>/dev/null
}
trap cleanup EXIT

wait_http() { # url seconds
  local i
  for ((i = 0; i < $2 * 10; i++)); do curl -fsS -o /dev/null -m 1 "$1" 2>/dev/null && return 0; sleep 0.1; done
  return 1
}

# RSS in KiB of a process and its children (the process group of `pid`).
rss() {
  local pgid=$1 total=0 p
  for p in $(pgrep -g "$pgid"); do
    total=$((total + $(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

# The backends: one-worker nginx instances.
for port in 15001 15002 15003; do
  mkdir -p "$RUN/tmp-backend-$port"
  sed -e "s|@RUN@|$RUN|g" -e "s|@PORT@|$port|g" "$HERE/backend-nginx.conf" >"$RUN/backend-$port.conf"
  setsid nginx -e "$RUN/backend-$port.error.log" -c "$RUN/backend-$port.conf" -g 'daemon off;' &
  PIDS+=($!)
done
for port in 15001 15002 15003; do
  wait_http "http://127.0.0.1:$port/data" 10 || { echo "backend $port did not start" >&2; exit 2; }
done

start() { # target -> sets TARGET_PGID, MEASURED_PID
  case $1 in
    ours)
      export LB_ADMIN_TOKEN=connections-bench-admin LB_CLUSTER_TOKEN=connections-bench
      setsid "$CP_BIN" serve --config "$HERE/peers-control-plane.toml" \
        --grpc-listen 127.0.0.1:15051 --http-listen 127.0.0.1:15050 \
        --backends 127.0.0.1:15001,127.0.0.1:15002,127.0.0.1:15003 --ip-limit 0 \
        >"$RUN/control-plane.log" 2>&1 &
      PIDS+=($!)
      CP_PGID=$!
      # shellcheck disable=SC2086
      setsid "$OURS_BIN" --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:19901 \
        --control-plane http://127.0.0.1:15051 --max-connections $((N + 1000)) $OURS_ARGS \
        >"$RUN/data-plane.log" 2>&1 &
      ;;
    haproxy)
      # HAProxy asks for about two descriptors per maxconn at start and refuses to run when the
      # hard limit is below that: a margin of 200 keeps N = 9000 under a hard limit of 20000.
      sed -e "s|@MAXCONN@|$((N + 200))|g" "$HERE/lb-haproxy-connections.cfg" >"$RUN/haproxy.cfg"
      setsid haproxy -db -f "$RUN/haproxy.cfg" >"$RUN/haproxy.log" 2>&1 &
      ;;
    nginx)
      mkdir -p "$RUN/tmp-lb"
      sed -e "s|@RUN@|$RUN|g" -e "s|@CONNS@|$((2 * N + 1000))|g" "$HERE/lb-nginx-connections.conf" >"$RUN/lb-nginx.conf"
      setsid nginx -e "$RUN/lb-nginx.error.log" -c "$RUN/lb-nginx.conf" -g 'daemon off;' &
      ;;
    *) echo "unknown target $1" >&2; return 1 ;;
  esac
  TARGET_PGID=$!
  PIDS+=("$TARGET_PGID")
  wait_http "http://127.0.0.1:18080/data" 30 || { echo "$1 did not start" >&2; return 1; }
  # Warm: allocate what serving costs anyway, so the growth measured is per connection.
  for _ in $(seq 10); do curl -fsS -o /dev/null "http://127.0.0.1:18080/data?[1-100]" 2>/dev/null; done
}

stop() {
  kill -- "-$TARGET_PGID" 2>/dev/null
  [[ -n ${CP_PGID:-} ]] && kill -- "-$CP_PGID" 2>/dev/null
  wait "$TARGET_PGID" 2>/dev/null
  CP_PGID=
  sleep 1
}

printf '%-8s %8s %8s %9s %8s %11s %11s %9s\n' target idle_MB open_MB request_MB closed_MB open_B/conn req_B/conn kept_MB
for t in $TARGETS; do
  start "$t" || { stop; continue; }
  idle=$(rss "$TARGET_PGID")
  coproc HOLD { python3 "$HERE/hold-connections.py" "$N" 127.0.0.1 18080; }
  step() {
    echo "$1" >&"${HOLD[1]}"
    local reply
    read -r reply <&"${HOLD[0]}"
    [[ $reply == ok* ]] || { echo "$t: $reply" >&2; return 1; }
  }
  step open && open=$(rss "$TARGET_PGID") &&
    step request && sleep "$HOLD" && request=$(rss "$TARGET_PGID") &&
    step close || { exec {HOLD[1]}>&-; stop; continue; }
  exec {HOLD[1]}>&-
  wait "$HOLD_PID" 2>/dev/null
  sleep "$SETTLE"
  closed=$(rss "$TARGET_PGID")
  printf '%-8s %8.1f %8.1f %9.1f %8.1f %11d %11d %9.1f\n' "$t" \
    "$(bc -l <<<"$idle/1024")" "$(bc -l <<<"$open/1024")" "$(bc -l <<<"$request/1024")" \
    "$(bc -l <<<"$closed/1024")" $(((open - idle) * 1024 / N)) $(((request - idle) * 1024 / N)) \
    "$(bc -l <<<"($closed-$idle)/1024")"
  stop
done
