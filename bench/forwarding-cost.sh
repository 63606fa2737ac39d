#!/usr/bin/env bash
# forwarding-cost.sh - where the CPU of a proxied request goes: this data plane against HAProxy
# stock (forwards the request as it came) and HAProxy doing the same forwarding work as this
# data plane (X-Forwarded-For/-Proto/-Host and X-Request-Id set on every request).
#
# Same backends and load as ../shared/bench/peers.sh (three one-worker nginx backends on
# 15001-15003, wrk pinned to one CPU, keep-alive). Rounds are interleaved: every round runs each
# target once, in turn. Per run it counts CPU time (user + system, from /proc) of the proxy's
# process group, of the backends and of wrk, and divides it by the requests served.
#
# Run from the project root with the release binaries and the same PROXY_CMD as peers.sh:
#   LB_ADMIN_TOKEN=bench-admin-token LB_CLUSTER_TOKEN=bench-cluster-token PROXY_CMD='...' bench/forwarding-cost.sh
# Settings (environment): ROUNDS [5] DURATION [8] (s) WARMUP [2] (s) CONNS [64] WRK_CPUS [1]
#   NBTHREAD [nproc] TARGETS ["haproxy haproxy-fwd ours"]
#   BASE_CMD: a second command like PROXY_CMD (an earlier build, say), run as target `base`:
#   TARGETS="base ours haproxy" BASE_CMD='...' PROXY_CMD='...' compares two builds in one run.
# Output: one line per run, then medians per target, with the median of each round's ratio of
# requests/s to the first target's; all runs in bench/results/forwarding-<time>/runs.tsv.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROUNDS=${ROUNDS:-5} DURATION=${DURATION:-8} WARMUP=${WARMUP:-2} CONNS=${CONNS:-64}
WRK_CPUS=${WRK_CPUS:-1} NBTHREAD=${NBTHREAD:-$(nproc)}
TARGETS=${TARGETS:-"haproxy haproxy-fwd ours"}
URL=http://127.0.0.1:18080/data
HZ=$(getconf CLK_TCK)

for c in nginx haproxy wrk curl setsid taskset ss; do
  command -v "$c" >/dev/null || { echo "missing $c (apt-get install nginx haproxy wrk curl iproute2 util-linux)" >&2; exit 2; }
done
[[ " $TARGETS " != *" ours "* || -n ${PROXY_CMD:-} ]] || { echo "target ours needs PROXY_CMD" >&2; exit 2; }
[[ " $TARGETS " != *" base "* || -n ${BASE_CMD:-} ]] || { echo "target base needs BASE_CMD" >&2; exit 2; }

OUT=$HERE/results/forwarding-$(date +%Y%m%d-%H%M%S)
RUN=$OUT/run
mkdir -p "$RUN"
declare -A PGID=()

spawn() {  # spawn NAME CMD...: own process group, output to run/NAME.log
  local name=$1; shift
  setsid "$@" >"$RUN/$name.log" 2>&1 </dev/null &
  PGID[$name]=$!
}

stop() {  # stop NAME: TERM the process group, KILL after 5 s
  local pid=${PGID[$1]:-} i
  [[ -z $pid ]] && return 0
  kill -TERM -- "-$pid" 2>/dev/null
  for i in $(seq 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  unset "PGID[$1]"
}

cleanup() {
  local n
  for n in "${!PGID[@]}"; do stop "$n"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

group_ticks() {  # group_ticks PGID...: user + system ticks of every process in those groups
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v groups=" $* " '
    { s = $0; sub(/^[0-9]+ \(.*\) /, "", s); split(s, f, " ")
      if (index(groups, " " f[3] " ")) t += f[12] + f[13] }
    END { print t + 0 }'
}

wait_ok() {  # wait_ok PID: until GET /data answers from a backend, for at most 30 s
  local deadline=$(( $(date +%s) + 30 ))
  while (( $(date +%s) < deadline )); do
    kill -0 "$1" 2>/dev/null || return 1
    curl -fsS -m 2 "$URL" 2>/dev/null | grep -q '"status":"ok"' && return 0
    sleep 0.1
  done
  return 1
}

wait_port_free() {
  local i
  for i in $(seq 100); do
    ss -Hltn 'sport = :18080' 2>/dev/null | grep -q . || return 0
    sleep 0.1
  done
  return 1
}

start_target() {
  case $1 in
    haproxy)
      sed "s/@NBTHREAD@/$NBTHREAD/" "$HERE/lb-haproxy-forwarding.cfg" | grep -v '# fwd$' >"$RUN/haproxy.cfg"
      spawn proxy haproxy -db -f "$RUN/haproxy.cfg" ;;
    haproxy-fwd)
      sed "s/@NBTHREAD@/$NBTHREAD/" "$HERE/lb-haproxy-forwarding.cfg" >"$RUN/haproxy-fwd.cfg"
      spawn proxy haproxy -db -f "$RUN/haproxy-fwd.cfg" ;;
    ours) spawn proxy bash -c "$PROXY_CMD" ;;
    base) spawn proxy bash -c "$BASE_CMD" ;;
    *) echo "unknown target $1" >&2; return 1 ;;
  esac
  wait_ok "${PGID[proxy]}" || { echo "target $1 did not answer (log: $RUN/proxy.log)" >&2; stop proxy; return 1; }
}

backends=()
for port in 15001 15002 15003; do
  mkdir -p "$RUN/tmp-backend-$port"
  sed -e "s#@RUN@#$RUN#g" -e "s#@PORT@#$port#g" "$HERE/backend-nginx.conf" >"$RUN/backend-$port.conf"
  spawn "backend-$port" nginx -p "$RUN" -c "$RUN/backend-$port.conf" -g 'daemon off;'
  backends+=("${PGID[backend-$port]}")
done

wrk_pre=()
[[ -n $WRK_CPUS ]] && wrk_pre=(taskset -c "$WRK_CPUS")
printf 'round\ttarget\trps\tp99_ms\tproxy_us\tbackends_us\twrk_us\n' >"$OUT/runs.tsv"
for round in $(seq "$ROUNDS"); do
  for t in $TARGETS; do
    start_target "$t" || exit 1
    "${wrk_pre[@]}" wrk -t1 -c"$CONNS" -d"$WARMUP"s "$URL" >/dev/null 2>&1
    p0=$(group_ticks "${PGID[proxy]}"); b0=$(group_ticks "${backends[@]}")
    TIMEFORMAT='%U %S'
    { time "${wrk_pre[@]}" wrk -t1 -c"$CONNS" -d"$DURATION"s --latency "$URL" >"$RUN/wrk.txt" 2>&1; } 2>"$RUN/wrk.time"
    p1=$(group_ticks "${PGID[proxy]}"); b1=$(group_ticks "${backends[@]}")
    stop proxy
    wait_port_free || echo "warning: port 18080 still listening after stopping $t" >&2
    awk -v r="$round" -v t="$t" -v hz="$HZ" -v d="$DURATION" -v p=$((p1 - p0)) -v b=$((b1 - b0)) \
        -v w="$(cat "$RUN/wrk.time")" '
      /Requests\/sec/ { rps = $2 }
      $1 == "99%" { v = $2; ms = v + 0; if (v ~ /us$/) ms /= 1000; else if (v ~ /[0-9]s$/) ms *= 1000; p99 = ms }
      END { n = rps * d; split(w, c, " ")
            printf "%s\t%s\t%.0f\t%.2f\t%.2f\t%.2f\t%.2f\n", r, t, rps, p99,
                   p / hz * 1e6 / n, b / hz * 1e6 / n, (c[1] + c[2]) * 1e6 / n }' "$RUN/wrk.txt" |
      tee -a "$OUT/runs.tsv"
  done
done

echo
echo "medians over $ROUNDS rounds (CPU in microseconds per request):"
for t in $TARGETS; do
  awk -F'\t' -v t="$t" 'NR > 1 && $2 == t' "$OUT/runs.tsv" | sort -t$'\t' -k1,1n >"$RUN/$t.tsv"
  med() { cut -f"$1" "$RUN/$t.tsv" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
  # Each round's requests/s over the first target's in the same round.
  ratio=$(awk -F'\t' -v t="$t" -v first="${TARGETS%% *}" '
      NR > 1 && $2 == first { f[$1] = $3 }
      NR > 1 && $2 == t { r[$1] = $3 }
      END { for (k in r) if (f[k] > 0) print r[k] / f[k] }' "$OUT/runs.tsv" |
    sort -g | awk '{ v[NR] = $1 } END { if (NR) printf "%.3f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
  printf '%-12s rps=%s x_%s=%s p99_ms=%s proxy_us=%s backends_us=%s wrk_us=%s\n' \
    "$t" "$(med 3)" "${TARGETS%% *}" "$ratio" "$(med 4)" "$(med 5)" "$(med 6)" "$(med 7)"
done
echo "runs: $OUT/runs.tsv"
