#!/usr/bin/env bash
# peers-tls.sh - the whole-proxy baseline of ../shared/bench/peers.sh, with TLS on the client side.
#
# Starts 3 nginx backends (127.0.0.1:15001-15003, plain HTTP, GET /data -> 200, 100-byte JSON),
# makes a self-signed ECDSA P-256 certificate (run/tls/cert.pem, key.pem), then, for each target,
# starts that target terminating TLS on 127.0.0.1:18443 (one at a time), checks it answers 200
# over TLS, measures it with wrk over https, stops it by PID, and prints one summary line per
# target and scenario with ratios to the best nginx / haproxy variant (and to "direct" if run).
# Same methodology as peers.sh: load gate per round, interleaved rounds, medians, foreign-CPU
# flag, cleanup of every process started. peers.sh itself cannot be reused (it runs its main
# part when sourced and hard-codes plain HTTP on :18080), hence this standalone copy.
#
# Usage:
#   bench/peers-tls.sh                 # nginx-w1 nginx-w2 haproxy-t1 haproxy-t2
#   PROXY_CMD='... data-plane --listen 127.0.0.1:18443 --tls-cert "$CERT" --tls-key "$KEY" ...' \
#     bench/peers-tls.sh               # adds target "ours" (PROXY_NAME) to the same run
#   TARGETS="nginx-w2 haproxy-t2 ours" SCENARIOS=ka64 REPS=1 PROXY_CMD=... bench/peers-tls.sh  # quick check
#
# TLS: every target gets the same certificate and TLS 1.2 + 1.3 (as our data plane); wrk
# (OpenSSL) negotiates TLS 1.3 everywhere (checked per target, see tls.tsv). ALPN: the targets
# offer h2 + http/1.1; wrk sends no ALPN at all (it cannot), so every target speaks HTTP/1.1 to
# it; the start check uses curl --http1.1 (ALPN http/1.1).
#
# Scenarios (wrk, WRK_THREADS threads, pinned to WRK_CPUS):
#   kaN    keep-alive, N connections: one handshake per connection, then requests only.
#   closeN "Connection: close", N connections: a new TCP + TLS connection per request, and wrk
#          RESUMES the TLS session (it keeps the SSL object, whose session survives SSL_clear):
#          a TLS 1.3 PSK handshake from the server's ticket (ECDHE still done, no certificate
#          signature). Checked at start against nginx; per target, tls.tsv says whether the
#          server resumes (openssl s_client -sess_out / -sess_in).
#   fullN  the same with the session dropped on every reconnect (LD_PRELOAD shim
#          wrk-noresume.c, built with cc into run/): a FULL handshake per request, the
#          expensive case for a TLS terminator. Skipped (warning) when no C compiler.
#   p50/p99 are wrk's (request write to response end): they EXCLUDE connect and handshake time,
#   so for closeN/fullN judge requests/s. wrk's OpenSSL 3.0 client spends about as much CPU per
#   handshake as the server: each line gives wrk_cores (wrk's CPU during the run) and says
#   CLIENT_BOUND when wrk used >= 85% of what it may use (WRK_THREADS / WRK_CPUS); then the ratio
#   compares wrk more than the targets.
#
# Environment knobs (defaults in brackets):
#   TARGETS      [nginx-w1 nginx-w2 haproxy-t1 haproxy-t2]  (+PROXY_NAME if PROXY_CMD set)
#                nginx-wN = nginx worker_processes N; haproxy-tN = haproxy nbthread N.
#                direct (opt-in) = one nginx worker answering /data itself over TLS, no proxying.
#                x_nginx / x_haproxy compare with the best nginx-wN / haproxy-tN of the run.
#   PROXY_CMD    command that runs a proxy IN THE FOREGROUND terminating TLS on 127.0.0.1:18443
#                and forwarding to 127.0.0.1:15001-15003 (bash -c, own process group, killed
#                after each measurement). It gets CERT and KEY (PEM paths) in its environment.
#   PROXY_NAME   [ours]  label for the PROXY_CMD target
#   PROXY_START_TIMEOUT [30] seconds to wait for https://127.0.0.1:18443/data to answer 200
#   SCENARIOS    [ka64 ka256 close64 full64]
#   REPS [3]  DURATION [10] (s)  WARMUP [2] (s, unmeasured wrk run before each measurement)
#   WRK_THREADS [1]  WRK_CPUS [1] ("" = unpinned)  BACKEND_CPUS [""]  PROXY_CPUS [""]
#   LOAD_MAX [0.5] cores of other work allowed before each round (5 s sample; before the first
#                round the 1-min load average too); LOAD_WAIT_MAX [600] s per round,
#                LOAD_RECHECK [60] s, LOAD_WAIT_TOTAL [1200] s; past them the round runs, noisy=1
#   FOREIGN_MAX  [0.15] cores used by other processes during a run above which it is "noisy"
#   MAX_RUNTIME  [auto] hard bound for the whole run (s)
#   OUT_DIR      [<script dir>/results/tls-<timestamp>]
#
# Configs next to this script: backend-nginx.conf (copy of the shared one), lb-tls-nginx.conf,
# lb-tls-haproxy.cfg, tls-direct-nginx.conf, wrk-report.lua, wrk-noresume.c.
# Output: OUT_DIR/summary.txt, results.tsv (every run, with wrk_cores), rounds.tsv, tls.tsv (per target:
#         protocol, cipher, key exchange, ALPN, resumption), meta.txt, raw/, run/.
# Exit status: 0 ok, 1 some measurement failed (FAIL in the summary), 2 setup error.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

TARGETS=${TARGETS:-"nginx-w1 nginx-w2 haproxy-t1 haproxy-t2"}
PROXY_CMD=${PROXY_CMD:-}
PROXY_NAME=${PROXY_NAME:-ours}
PROXY_START_TIMEOUT=${PROXY_START_TIMEOUT:-30}
SCENARIOS=${SCENARIOS:-"ka64 ka256 close64 full64"}
REPS=${REPS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
WRK_THREADS=${WRK_THREADS:-1}
WRK_CPUS=${WRK_CPUS-1}
BACKEND_CPUS=${BACKEND_CPUS-}
PROXY_CPUS=${PROXY_CPUS-}
LOAD_MAX=${LOAD_MAX:-0.5}
LOAD_WAIT_MAX=${LOAD_WAIT_MAX:-600}
LOAD_WAIT_TOTAL=${LOAD_WAIT_TOTAL:-1200}
LOAD_RECHECK=${LOAD_RECHECK:-60}
FOREIGN_MAX=${FOREIGN_MAX:-0.15}
MAX_RUNTIME=${MAX_RUNTIME:-auto}
if [ -z "${OUT_DIR:-}" ]; then
  if [ -w "$HERE" ]; then OUT_DIR=$HERE/results/tls-$(date +%Y%m%d-%H%M%S)
  else OUT_DIR=${TMPDIR:-/tmp}/peers-tls-results/$(date +%Y%m%d-%H%M%S); fi
fi

readonly HOST=127.0.0.1
readonly BACKEND_PORTS="15001 15002 15003"
readonly LB_PORT=18443
readonly PATH_Q=/data

RUN=$OUT_DIR/run
RAW=$OUT_DIR/raw
TLSD=$RUN/tls
CERT=$TLSD/cert.pem
KEY=$TLSD/key.pem
SHIM=$RUN/wrk-noresume.so
declare -A PIDS=()
declare -A RESUMES=()   # target -> yes/no (server resumes a TLS 1.3 session), from tls_probe
WRK_PID=""
FAILS=0
T0=$(date +%s)

log() { printf '[%s +%4ss] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

# ---------------------------------------------------------------- processes (as peers.sh)
spawn() {  # spawn NAME CPUS CMD...   (own process group via setsid, output to run/NAME.log)
  local name=$1 cpus=$2; shift 2
  local pre=()
  [[ -n $cpus ]] && pre=(taskset -c "$cpus")
  setsid "${pre[@]}" "$@" >"$RUN/$name.log" 2>&1 </dev/null &
  PIDS[$name]=$!
  echo "$!" >"$RUN/$name.pid"
}

stop() {  # stop NAME: TERM the process group, KILL after 5 s, reap
  local name=$1 pid=${PIDS[$1]:-} i
  [[ -z $pid ]] && return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  for i in $(seq 50); do
    kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null; then
    log "stop $name: still alive after 5 s, sending KILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
  unset "PIDS[$name]"
  rm -f "$RUN/$name.pid"
}

cleanup() {
  local rc=$? n
  trap - EXIT INT TERM
  if [[ -n $WRK_PID ]]; then kill -TERM "$WRK_PID" 2>/dev/null; wait "$WRK_PID" 2>/dev/null; fi
  for n in "${!PIDS[@]}"; do stop "$n"; done
  log "cleanup done (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated (MAX_RUNTIME or signal)"; exit 143' TERM

port_listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
wait_port_free() { local i; for i in $(seq 100); do port_listening "$1" || return 0; sleep 0.1; done; return 1; }

get_data() {  # get_data PORT: GET /data, plain for backends, https (ALPN http/1.1) for LB_PORT
  if [[ $1 == "$LB_PORT" ]]; then curl -k --http1.1 -fsS -m 2 "https://$HOST:$1$PATH_Q"
  else curl -fsS -m 2 "http://$HOST:$1$PATH_Q"; fi
}

wait_http() {  # wait_http PORT TIMEOUT_S PID -> 0 when GET /data answers 200 with the JSON
  local port=$1 deadline=$(( $(date +%s) + $2 )) pid=$3
  while (( $(date +%s) < deadline )); do
    kill -0 "$pid" 2>/dev/null || return 1
    get_data "$port" 2>/dev/null | grep -q '"status":"ok"' && return 0
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- load gate (as peers.sh)
cpu_busy() {  # cpu_busy SECONDS -> "busy_cores steal_cores"
  local a b
  a=$(head -1 /proc/stat); sleep "$1" & wait $!; b=$(head -1 /proc/stat)
  printf '%s\n%s\n' "$a" "$b" | awk -v n="$(nproc)" '
    { u[NR]=$2+$3+$4+$7+$8; st[NR]=$9; t[NR]=$2+$3+$4+$5+$6+$7+$8+$9 }
    END { dt=t[2]-t[1]; if (dt<=0) dt=1;
          printf "%.2f %.2f\n", (u[2]-u[1])/dt*n, (st[2]-st[1])/dt*n }'
}

LOAD_WAITED_TOTAL=0
FIRST_ROUND=1
gate_load() {  # gate_load LABEL -> sets ROUND_INFO
  local label=$1 waited=0 noisy=0 load1 busy steal ok
  while :; do
    load1=$(cut -d' ' -f1 /proc/loadavg)
    read -r busy steal < <(cpu_busy 5)
    ok=$(awk -v b="$busy" -v l="$load1" -v m="$LOAD_MAX" -v f="$FIRST_ROUND" \
         'BEGIN { print (b <= m && (f == 0 || l <= m)) ? 1 : 0 }')
    (( ok )) && break
    if (( waited >= LOAD_WAIT_MAX || LOAD_WAITED_TOTAL >= LOAD_WAIT_TOTAL )); then
      noisy=1; log "round $label: load still high (load1=$load1 busy=$busy cores), running anyway, flagged noisy"
      break
    fi
    log "round $label: load high (load1=$load1, other work=$busy cores), re-check in ${LOAD_RECHECK}s"
    sleep "$LOAD_RECHECK" & wait $!
    waited=$(( waited + LOAD_RECHECK )); LOAD_WAITED_TOTAL=$(( LOAD_WAITED_TOTAL + LOAD_RECHECK ))
  done
  FIRST_ROUND=0
  ROUND_INFO="$label	$load1	$busy	$steal	$waited	$noisy"
  log "round $label: load1=$load1 busy=$busy steal=$steal waited=${waited}s noisy=$noisy | $(uptime)"
}

# ---------------------------------------------------------------- TLS material and checks
make_cert() {
  mkdir -p "$TLSD"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 \
    -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$KEY" -out "$CERT" >"$TLSD/openssl.log" 2>&1 || die "openssl req failed (see $TLSD/openssl.log)"
  cat "$CERT" "$KEY" >"$TLSD/haproxy.pem"     # HAProxy wants certificate and key in one file
  chmod 600 "$KEY" "$TLSD/haproxy.pem"
  log "certificate: ECDSA P-256, self-signed, $CERT ($(openssl x509 -in "$CERT" -noout -fingerprint -sha256 | cut -d= -f2 | cut -c1-23)...)"
}

build_shim() {  # for fullN: returns 1 (and says why) when it cannot be built
  local cc
  cc=$(command -v cc || command -v gcc) || { log "no C compiler (cc/gcc): fullN scenarios skipped"; return 1; }
  "$cc" -O2 -shared -fPIC -o "$SHIM" "$HERE/wrk-noresume.c" -ldl >"$RUN/shim-build.log" 2>&1 ||
    { log "building wrk-noresume.so failed (see $RUN/shim-build.log): fullN scenarios skipped"; return 1; }
}

tls_probe() {  # tls_probe TARGET: protocol, cipher, key exchange, ALPN and resumption -> tls.tsv
  local t=$1 req out h2 reused proto cipher kx alpn
  req="GET $PATH_Q HTTP/1.1\r\nHost: $HOST\r\nConnection: close\r\n\r\n"
  # -ign_eof: read until the server closes, so the TLS 1.3 tickets (sent after the handshake) arrive
  out=$(printf "$req" | timeout 10 openssl s_client -connect "$HOST:$LB_PORT" -alpn http/1.1 -ign_eof \
        -sess_out "$TLSD/probe-$t.sess" 2>&1)
  proto=$(awk '/^New, /    { sub(/,$/, "", $2); print $2; exit }' <<<"$out")
  cipher=$(awk '/^New, / { print $NF; exit }' <<<"$out")
  kx=$(awk -F': ' '/^Server Temp Key/ { sub(/,.*/, "", $2); print $2; exit }' <<<"$out")
  alpn=$(awk -F': ' '/^ALPN protocol/ { print $2; exit }' <<<"$out")
  reused=$(printf "$req" | timeout 10 openssl s_client -connect "$HOST:$LB_PORT" -alpn http/1.1 -ign_eof \
           -sess_in "$TLSD/probe-$t.sess" 2>&1 | awk '/^Reused, / { r = 1 } END { print r ? "yes" : "no" }')
  h2=$(printf '' | timeout 10 openssl s_client -connect "$HOST:$LB_PORT" -alpn h2,http/1.1 2>&1 |
       awk -F': ' '/^ALPN protocol/ { p = $2 } END { print p ? p : "none" }')
  RESUMES[$t]=$reused
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "${proto:-?}" "${cipher:-?}" "${kx:-?}" "${alpn:-none}" "$h2" "$reused" >>"$OUT_DIR/tls.tsv"
  log "tls $t: ${proto:-?} ${cipher:-?} kx=${kx:-?} alpn(http/1.1 offered)=${alpn:-none} alpn(h2,http/1.1 offered)=$h2 resumes=$reused"
  [[ $proto == TLSv1.3 ]] || log "warning: $t negotiated '${proto:-nothing}', not TLSv1.3"
}

resume_check() {  # how wrk's closeN / fullN handshakes really go, counted by an nginx access log
  local log_f=$RUN/resume-check.access.log mode n_full n_res
  mkdir -p "$RUN/tmp-resume-check"
  render "$HERE/tls-direct-nginx.conf" "$RUN/resume-check.conf" RUN="$RUN" NAME=resume-check \
    CERT="$CERT" KEY="$KEY" ACCESS_LOG="$log_f resume"
  spawn proxy "" nginx -p "$RUN" -c "$RUN/resume-check.conf" -g 'daemon off;'
  wait_http "$LB_PORT" 10 "${PIDS[proxy]}" || { stop proxy; die "TLS check server did not start (see $RUN/proxy.log)"; }
  for mode in close full; do
    [[ $mode == full && ! -f $SHIM ]] && continue
    : >"$log_f"   # nginx keeps its log fd (O_APPEND): truncating restarts the count
    WRK_CPUS="" run_wrk 4 1 "$([[ $mode == full ]] && echo 1 || echo 0)" 1 "$RAW/resume-check-$mode.txt"
    sleep 0.3
    n_res=$(grep -c '^r ' "$log_f"); n_full=$(grep -c '^\. ' "$log_f")
    RESUME_CHECK="${RESUME_CHECK:+$RESUME_CHECK; }$mode: $n_res of $((n_res + n_full)) handshakes resumed"
  done
  stop proxy
  wait_port_free "$LB_PORT" || die "port $LB_PORT still in use after the TLS check"
  log "wrk TLS session resumption against nginx (1 s, 4 conns, Connection: close): $RESUME_CHECK"
}

# ---------------------------------------------------------------- targets
render() {  # render TEMPLATE OUT key=value...
  local tpl=$1 out=$2 args=() kv; shift 2
  for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
  sed "${args[@]}" "$tpl" >"$out"
}

start_backends() {
  local p
  for p in $BACKEND_PORTS; do
    port_listening "$p" && die "port $p already in use (not started by this script; is another benchmark running?)"
    mkdir -p "$RUN/tmp-backend-$p"
    render "$HERE/backend-nginx.conf" "$RUN/backend-$p.conf" RUN="$RUN" PORT="$p"
    spawn "backend-$p" "$BACKEND_CPUS" nginx -p "$RUN" -c "$RUN/backend-$p.conf" -g 'daemon off;'
  done
  for p in $BACKEND_PORTS; do
    wait_http "$p" 10 "${PIDS[backend-$p]}" || die "backend $p did not start (see $RUN/backend-$p.log)"
  done
  log "backends up: $BACKEND_PORTS"
}

start_target() {  # start_target NAME -> TLS proxy "proxy" on LB_PORT, checked to answer 200
  local t=$1 to=10 seen
  port_listening "$LB_PORT" && { log "port $LB_PORT busy before starting $t"; return 1; }
  case $t in
    direct)
      mkdir -p "$RUN/tmp-direct"
      render "$HERE/tls-direct-nginx.conf" "$RUN/direct.conf" RUN="$RUN" NAME=direct CERT="$CERT" KEY="$KEY" ACCESS_LOG=off
      spawn proxy "$PROXY_CPUS" nginx -p "$RUN" -c "$RUN/direct.conf" -g 'daemon off;' ;;
    nginx-w[0-9]*)
      mkdir -p "$RUN/tmp-lb"
      render "$HERE/lb-tls-nginx.conf" "$RUN/lb-$t.conf" RUN="$RUN" WORKERS="${t#nginx-w}" CERT="$CERT" KEY="$KEY"
      spawn proxy "$PROXY_CPUS" nginx -p "$RUN" -c "$RUN/lb-$t.conf" -g 'daemon off;' ;;
    haproxy-t[0-9]*)
      render "$HERE/lb-tls-haproxy.cfg" "$RUN/lb-$t.cfg" NBTHREAD="${t#haproxy-t}" PEM="$TLSD/haproxy.pem"
      spawn proxy "$PROXY_CPUS" haproxy -db -f "$RUN/lb-$t.cfg" ;;
    "$PROXY_NAME")
      [[ -n $PROXY_CMD ]] || { log "target $t needs PROXY_CMD"; return 1; }
      to=$PROXY_START_TIMEOUT
      spawn proxy "$PROXY_CPUS" env CERT="$CERT" KEY="$KEY" bash -c "$PROXY_CMD" ;;
    *) log "unknown target $t"; return 1 ;;
  esac
  if ! wait_http "$LB_PORT" "$to" "${PIDS[proxy]}"; then
    log "target $t did not answer 200 on https://$HOST:$LB_PORT$PATH_Q within ${to}s (log: $RUN/proxy.log)"
    cp "$RUN/proxy.log" "$RAW/start-fail-$t-$(date +%s).log" 2>/dev/null
    stop proxy; return 1
  fi
  if [[ -z ${RESUMES[$t]:-} ]]; then   # first start of this target: what does it negotiate?
    log "$t answers 200 over TLS: $(curl -k --http1.1 -sS -m 2 -o /dev/null -w 'HTTP/%{http_version} %{http_code}' "https://$HOST:$LB_PORT$PATH_Q")"
    tls_probe "$t"
  fi
  [[ $t == direct ]] && return 0
  seen=$(for _ in 1 2 3 4 5 6; do get_data "$LB_PORT"; echo; done | grep -o '"port":[0-9]*' | sort -u | wc -l)
  (( seen < 2 )) && log "warning: $t answered from only $seen distinct backend(s) in 6 requests"
  return 0
}

stop_target() {
  stop proxy
  wait_port_free "$LB_PORT" || log "warning: port $LB_PORT still listening after stopping $1"
}

# ---------------------------------------------------------------- measuring (as peers.sh)
HZ=$(getconf CLK_TCK)
sys_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat; }
our_ticks() {
  local pgs=" ${PIDS[*]} "
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v pgs="$pgs" '
    { s = $0; sub(/^[0-9]+ \(.*\) /, "", s); split(s, f, " ")
      if (index(pgs, " " f[3] " ")) t += f[12] + f[13] }
    END { print t + 0 }'
}
child_secs() {  # child_secs VAR: user+sys seconds of all reaped children of THIS shell
  times >"$RUN/times.tmp"
  printf -v "$1" '%s' "$(awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); sub(/s$/, "", a[2]); t += a[1] * 60 + a[2] }; print t }' "$RUN/times.tmp")"
}
run_wrk() {  # run_wrk CONNS CLOSE(0/1) FULL(0/1) SECONDS OUTFILE
  local pre=() envs=("WRK_CLOSE=$2")
  [[ -n $WRK_CPUS ]] && pre=(taskset -c "$WRK_CPUS")
  [[ $3 == 1 ]] && envs+=("LD_PRELOAD=$SHIM")
  env "${envs[@]}" timeout -k 5 $(( $4 + 30 )) "${pre[@]}" \
    wrk -t"$WRK_THREADS" -c"$1" -d"$4"s --latency -s "$HERE/wrk-report.lua" "https://$HOST:$LB_PORT$PATH_Q" >"$5" 2>&1 &
  WRK_PID=$!
  wait "$WRK_PID"; local rc=$?
  WRK_PID=""
  return $rc
}

measure() {  # measure REP SCENARIO TARGET
  local rep=$1 sc=$2 t=$3 conns close=0 full=0 out line f status=ok rc foreign wcores
  case $sc in
    ka[0-9]*)    conns=${sc#ka} ;;
    close[0-9]*) conns=${sc#close}; close=1 ;;
    full[0-9]*)  conns=${sc#full};  close=1; full=1 ;;
  esac
  out="$RAW/r$rep-$sc-$t.txt"
  if ! start_target "$t"; then
    printf '%s\t%s\t%s\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tFAIL_START\n' "$rep" "$sc" "$t" >>"$OUT_DIR/results.tsv"
    FAILS=$((FAILS + 1)); return
  fi
  (( WARMUP > 0 )) && run_wrk "$conns" "$close" "$full" "$WARMUP" "$out.warmup"
  local s0 o0 c0 w0 s1 o1 c1 w1
  s0=$(sys_ticks); o0=$(our_ticks); child_secs c0; w0=$(date +%s.%N)
  run_wrk "$conns" "$close" "$full" "$DURATION" "$out"; rc=$?
  s1=$(sys_ticks); o1=$(our_ticks); child_secs c1; w1=$(date +%s.%N)
  foreign=$(awk -v s="$((s1 - s0))" -v o="$((o1 - o0))" -v c0="$c0" -v c1="$c1" -v w0="$w0" -v w1="$w1" -v hz="$HZ" \
            'BEGIN { f = ((s - o) / hz - (c1 - c0)) / (w1 - w0); printf "%.2f", (f < 0 ? 0 : f) }')
  wcores=$(awk -v c0="$c0" -v c1="$c1" -v w0="$w0" -v w1="$w1" 'BEGIN { printf "%.2f", (c1 - c0) / (w1 - w0) }')
  kill -0 "${PIDS[proxy]:-0}" 2>/dev/null || status=PROXY_DIED
  stop_target "$t"
  line=$(grep '^RESULT ' "$out" | tail -1)
  if (( rc != 0 )) || [[ -z $line ]]; then
    log "r$rep $sc $t: wrk failed (rc=$rc), see $out"
    printf '%s\t%s\t%s\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tFAIL_WRK\n' "$rep" "$sc" "$t" >>"$OUT_DIR/results.tsv"
    FAILS=$((FAILS + 1)); return
  fi
  f=$(awk '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
             e = v["err_connect"] + v["err_read"] + v["err_write"] + v["err_status"] + v["err_timeout"]
             printf "%s\t%s\t%s\t%s\t%s\t%d", v["rps"], v["p50_us"], v["p90_us"], v["p99_us"], v["max_us"], e }' <<<"$line")
  [[ $status == ok && $(cut -f6 <<<"$f") != 0 ]] && status=errors
  [[ $status == ok ]] && awk -v f="$foreign" -v m="$FOREIGN_MAX" 'BEGIN { exit !(f > m) }' && status=noisy
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$sc" "$t" "$f" "$foreign" "$wcores" "$status" >>"$OUT_DIR/results.tsv"
  log "r$rep $sc $t: $(awk -F'\t' '{ printf "rps=%.0f p50_ms=%.3f p99_ms=%.3f errors=%s", $1, $2/1000, $4/1000, $6 }' <<<"$f") foreign_cores=$foreign wrk_cores=$wcores $status"
}

summarize() {  # medians per (scenario, target); ratios to direct (if run) and best nginx / haproxy
  local resumes="" t
  for t in "${!RESUMES[@]}"; do resumes="$resumes $t=${RESUMES[$t]}"; done
  echo "# TLS on 127.0.0.1:$LB_PORT, same self-signed ECDSA P-256 certificate for all; negotiated per target: tls.tsv"
  echo "# wrk sends no ALPN: HTTP/1.1 everywhere. ka: one handshake per connection. close: new connection per"
  echo "#   request with TLS 1.3 session RESUMPTION where the server allows it (tls_resume=yes). full: new"
  echo "#   connection per request, FULL handshake (session dropped on the client). Check: ${RESUME_CHECK:-not run}"
  echo "# p50/p99 are wrk's: request write to response end, WITHOUT connect and handshake time (close/full: judge rps)."
  echo "# wrk_cores = CPU used by wrk (max $WRK_MAX_CORES); CLIENT_BOUND (>= 85%) means wrk, not the target, may be the limit."
  awk -F'\t' -v order="$TARGETS" -v scens="$SCENARIOS" -v resumes="$resumes" -v wmax="$WRK_MAX_CORES" '
    function median(s,   a, n, i, j, x) {
      n = split(s, a, " ")
      for (i = 2; i <= n; i++) { x = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > x; j--) a[j+1] = a[j]; a[j+1] = x }
      return (n % 2) ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2
    }
    function mn(s,  a, n, i, m) { n = split(s, a, " "); m = a[1] + 0; for (i = 2; i <= n; i++) if (a[i] + 0 < m) m = a[i] + 0; return m }
    function mx(s,  a, n, i, m) { n = split(s, a, " "); m = a[1] + 0; for (i = 2; i <= n; i++) if (a[i] + 0 > m) m = a[i] + 0; return m }
    function r(x, y) { return (y > 0) ? sprintf("%.2f", x / y) : "-" }
    BEGIN { n = split(resumes, R, " "); for (i = 1; i <= n; i++) { split(R[i], kv, "="); res[kv[1]] = kv[2] } }
    NR > 1 && $4 != "NA" {
      k = $2 SUBSEP $3
      rps[k] = rps[k] " " $4; p50[k] = p50[k] " " $5; p99[k] = p99[k] " " $7; wc[k] = wc[k] " " $11; cnt[k]++; err[k] += $9
      if ($12 == "noisy") noisy[k]++
    }
    NR > 1 && $4 == "NA" { bad[$2 SUBSEP $3]++ }
    END {
      ns = split(scens, S, " "); nt = split(order, T, " ")
      for (i = 1; i <= ns; i++) {
        s = S[i]; bn = 0; bh = 0
        for (j = 1; j <= nt; j++) { k = s SUBSEP T[j]; if (!(k in cnt)) continue
          m = median(rps[k]); med[k] = m
          if (T[j] ~ /^nginx-w[0-9]+$/ && m > bn) bn = m
          if (T[j] ~ /^haproxy-t[0-9]+$/ && m > bh) bh = m }
        d = med[s SUBSEP "direct"] + 0
        tr = (s ~ /^close/) ? "" : (s ~ /^full/ ? "no" : "-")
        for (j = 1; j <= nt; j++) { k = s SUBSEP T[j]
          if (!(k in cnt)) { printf "target=%s scenario=%s FAIL (no successful run)\n", T[j], s; continue }
          m = med[k]; lo = mn(rps[k]); hi = mx(rps[k])
          w = median(wc[k])
          printf "target=%s scenario=%s rps=%.0f p50_ms=%.3f p99_ms=%.3f runs=%d rps_min=%.0f rps_max=%.0f spread=%.1f%% errors=%d%s%s x_nginx=%s x_haproxy=%s tls_resume=%s wrk_cores=%.2f%s\n",
            T[j], s, m, median(p50[k]) / 1000, median(p99[k]) / 1000, cnt[k], lo, hi, (m > 0 ? (hi - lo) / m * 100 : 0),
            err[k], ((k in bad) ? " failed_runs=" bad[k] : "") ((k in noisy) ? " noisy_runs=" noisy[k] : ""),
            (d > 0 ? " x_direct=" r(m, d) : ""), r(m, bn), r(m, bh), (tr != "" ? tr : ((T[j] in res) ? res[T[j]] : "?")),
            w, (w >= 0.85 * wmax ? " CLIENT_BOUND" : "") }
      }
    }' "$OUT_DIR/results.tsv"
}

# ---------------------------------------------------------------- main
[[ ${1:-} == -h || ${1:-} == --help ]] && { sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; trap - EXIT; exit 0; }
(( $# == 0 )) || { echo "usage: [KNOB=value ...] $0 [--help]   (settings are environment variables)" >&2; trap - EXIT; exit 2; }
for c in nginx haproxy wrk curl openssl ss taskset setsid timeout; do
  command -v "$c" >/dev/null || die "missing $c (apt-get install nginx haproxy wrk curl openssl iproute2 util-linux)"
done
if [[ -n $PROXY_CMD ]] && [[ " $TARGETS " != *" $PROXY_NAME "* ]]; then TARGETS="$TARGETS $PROXY_NAME"; fi
[[ $PROXY_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "PROXY_NAME may only contain letters, digits, _ . -"
[[ $PROXY_NAME =~ ^(direct|nginx-w[0-9]+|haproxy-t[0-9]+)$ ]] && die "PROXY_NAME must not shadow a built-in target"
for t in $TARGETS; do
  [[ $t =~ ^(direct|nginx-w[1-9][0-9]*|haproxy-t[1-9][0-9]*)$ || $t == "$PROXY_NAME" ]] || die "unknown target '$t'"
  [[ $t == "$PROXY_NAME" && -z $PROXY_CMD ]] && die "target $t needs PROXY_CMD"
done
for n in REPS DURATION WARMUP WRK_THREADS LOAD_WAIT_MAX LOAD_WAIT_TOTAL LOAD_RECHECK PROXY_START_TIMEOUT; do
  [[ ${!n} =~ ^[0-9]+$ ]] || die "$n must be an integer"
done
for sc in $SCENARIOS; do [[ $sc =~ ^(ka|close|full)[1-9][0-9]*$ ]] || die "bad scenario '$sc' (use kaN, closeN or fullN)"; done

ntg=$(wc -w <<<"$TARGETS"); nsc=$(wc -w <<<"$SCENARIOS")
WRK_MAX_CORES=$WRK_THREADS   # what wrk can use at most: its threads, or fewer pinned CPUs
if [[ -n $WRK_CPUS ]]; then
  ncpu=$(awk -v l="$WRK_CPUS" 'BEGIN { n = split(l, a, ","); for (i = 1; i <= n; i++) { if (split(a[i], b, "-") == 2) c += b[2] - b[1] + 1; else c++ }; print c }')
  (( ncpu < WRK_MAX_CORES )) && WRK_MAX_CORES=$ncpu
fi
if [[ $MAX_RUNTIME == auto ]]; then
  MAX_RUNTIME=$(( REPS * nsc * ntg * (DURATION + WARMUP + 15 + PROXY_START_TIMEOUT / 3) + REPS * nsc * 10 + ntg * 40 + LOAD_WAIT_TOTAL + LOAD_WAIT_MAX + 180 ))
fi
[[ $MAX_RUNTIME =~ ^[0-9]+$ ]] || die "MAX_RUNTIME must be an integer or auto"
mkdir -p "$RUN" "$RAW" || die "cannot create $OUT_DIR"
spawn watchdog "" bash -c 'sleep "$1" && kill -TERM "$2"' _ "$MAX_RUNTIME" "$$"
port_listening "$LB_PORT" && die "port $LB_PORT already in use (not started by this script)"

make_cert
if [[ " $SCENARIOS " == *" full"* ]] && ! build_shim; then
  SCENARIOS=$(tr ' ' '\n' <<<"$SCENARIOS" | grep -v '^full' | xargs)
  [[ -n $SCENARIOS ]] || die "no scenario left"
fi
{
  echo "date: $(date -Is)"
  echo "host: $(nproc) cpus, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
  echo "nginx: $(nginx -v 2>&1)"
  echo "haproxy: $(haproxy -v | head -1)"
  echo "wrk: $(wrk -v 2>&1 | head -1) ($(ldd "$(command -v wrk)" | awk '/libssl/ { print $1 }'))"
  echo "openssl: $(openssl version)"
  echo "packages: $(dpkg-query -W -f '${Package}=${Version} ' nginx-core nginx haproxy wrk openssl libssl3 2>/dev/null)"
  echo "certificate: ECDSA P-256 self-signed, $(openssl x509 -in "$CERT" -noout -fingerprint -sha256)"
  echo "targets: $TARGETS"; echo "scenarios: $SCENARIOS"
  echo "reps=$REPS duration=${DURATION}s warmup=${WARMUP}s wrk_threads=$WRK_THREADS"
  echo "pinning: wrk='${WRK_CPUS:-none}' backends='${BACKEND_CPUS:-none}' proxy='${PROXY_CPUS:-none}'"
  echo "proxy_cmd: ${PROXY_CMD:-none} (name $PROXY_NAME; CERT=$CERT KEY=$KEY)"
  echo "max_runtime=${MAX_RUNTIME}s load_max=$LOAD_MAX foreign_max=$FOREIGN_MAX"
  echo "uptime_start: $(uptime)"
} >"$OUT_DIR/meta.txt"
printf 'rep\tscenario\ttarget\trps\tp50_us\tp90_us\tp99_us\tmax_us\terrors\tforeign_cores\twrk_cores\tstatus\n' >"$OUT_DIR/results.tsv"
printf 'round\tload1\tbusy_cores\tsteal_cores\twaited_s\tnoisy\tload1_after\n' >"$OUT_DIR/rounds.tsv"
printf 'target\tprotocol\tcipher\tkey_exchange\talpn_http1_offered\talpn_h2_offered\tresumes\n' >"$OUT_DIR/tls.tsv"
log "output: $OUT_DIR (bound ${MAX_RUNTIME}s)"

start_backends
if [[ " $SCENARIOS " == *" close"* || " $SCENARIOS " == *" full"* ]]; then
  resume_check; echo "resume_check: $RESUME_CHECK" >>"$OUT_DIR/meta.txt"
fi
for rep in $(seq "$REPS"); do
  for sc in $SCENARIOS; do
    gate_load "r$rep-$sc"
    for t in $TARGETS; do measure "$rep" "$sc" "$t"; done
    printf '%s\t%s\n' "$ROUND_INFO" "$(cut -d' ' -f1 /proc/loadavg)" >>"$OUT_DIR/rounds.tsv"
  done
done
for p in $BACKEND_PORTS; do stop "backend-$p"; done
echo "uptime_end: $(uptime)" >>"$OUT_DIR/meta.txt"; rm -f "$RUN/times.tmp"
log "end: $(uptime)"

summarize | tee "$OUT_DIR/summary.txt"
log "results in $OUT_DIR (summary.txt, results.tsv, rounds.tsv, tls.tsv); failures: $FAILS"
(( FAILS == 0 )) || exit 1
exit 0
