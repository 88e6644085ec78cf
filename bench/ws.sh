#!/usr/bin/env bash
# ws.sh - interleaved WebSocket echo benchmark: the proxy against nginx on a 2-core box.
#
#   bench/ws.sh [--conns N] [--messages M] [--size BYTES] [--rounds R]
#               [--proxy-cmd 'CMD' --proxy-port P] [--debug]
#
# --debug builds and runs the dev profile: a quick check that the script works (try
# --rounds 1 --conns 4 --messages 50), not a measurement.
# Echo backends: `ws_bench echo` on 127.0.0.1:9111-9113 (examples/ws_bench.rs: GET /health
# answers 200, a WebSocket upgrade echoes every message). Load: `ws_bench load` opens N
# WebSockets through the target, then each sends M binary messages of BYTES bytes one after
# the other, awaiting each echo (a message = one round trip through the proxy).
# Targets, each measured once per round (rounds interleaved, start rotated each round):
#   direct - the load straight at 127.0.0.1:9111 (limit of the load+backend side)
#   nginx  - nginx round-robin on 127.0.0.1:8090, one worker, with
#            proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection "upgrade";
#   proxy  - CMD (default: target/release/examples/standalone bench/ws-config.json, port 8090)
# Pinning as in ../shared/bench/compare.sh: the proxy (nginx or ours) alone on CPU 0; the
# load generator, the backends and this script on CPU 1. Each proxy is started fresh per run.
# Per run: messages/s, cpu0% and us/msg0 (CPU-0 busy microseconds per message: the
# proxy's cost incl. kernel work), other% (CPU of foreign processes; should be ~0).
# Table: medians over rounds, and paired = median of same-round ratios against nginx.
# Raw output: /tmp/lbbench/ws-<timestamp>/.
set -uo pipefail

CONNS=64; MESSAGES=2000; SIZE=64; ROUNDS=5; PROFILE=release
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/.." && pwd)
PROXY_CMD=""; PROXY_PORT=8090

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --conns)      CONNS=$2; shift 2 ;;
    --messages)   MESSAGES=$2; shift 2 ;;
    --size)       SIZE=$2; shift 2 ;;
    --rounds)     ROUNDS=$2; shift 2 ;;
    --proxy-cmd)  PROXY_CMD=$2; shift 2 ;;
    --proxy-port) PROXY_PORT=$2; shift 2 ;;
    --debug)      PROFILE=debug; shift ;;
    -h|--help)    usage; exit 0 ;;
    *)            usage >&2; exit 2 ;;
  esac
done

if ! command -v nginx >/dev/null || ! command -v curl >/dev/null; then
  echo "installing nginx, curl (apt)..." >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx curl; } >/dev/null \
    || { echo "could not install nginx and curl" >&2; exit 2; }
fi
if [ "$PROFILE" = release ]; then
  (cd "$ROOT" && cargo build --release --example standalone --example ws_bench) || exit 2
else
  (cd "$ROOT" && cargo build --example standalone --example ws_bench) || exit 2
fi
BENCH=$ROOT/target/$PROFILE/examples/ws_bench
[ -n "$PROXY_CMD" ] || PROXY_CMD="$ROOT/target/$PROFILE/examples/standalone $HERE/ws-config.json"

RUN=/tmp/lbbench
RES=$RUN/ws-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN/tmp" "$RES"

# ---------------------------------------------------------------- process handling (as compare.sh)
PIDS=(); LASTPID=""
start() {
  local cpu=$1 name=$2; shift 2
  setsid taskset -c "$cpu" "$@" >>"$RES/$name.log" 2>&1 &
  LASTPID=$!
  PIDS+=("$LASTPID")
}
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) || return 1; [[ $s != Z* ]]; }
stop() {
  local p=$1 i q keep=()
  kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null
  for i in $(seq 50); do alive "$p" || break; sleep 0.1; done
  kill -KILL -- "-$p" 2>/dev/null
  wait "$p" 2>/dev/null
  for q in "${PIDS[@]}"; do [ "$q" != "$p" ] && keep+=("$q"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}
cleanup() { local p; for p in "${PIDS[@]+"${PIDS[@]}"}"; do stop "$p"; done; }
trap cleanup EXIT
trap 'exit 130' INT TERM
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_http() {
  local port=$1 path=$2 t=$3 pid=$4 i
  for i in $(seq $((t * 10))); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$port$path")" = 200 ] && return 0
    alive "$pid" || { echo "process $pid died, see $RES/*.log" >&2; return 1; }
    sleep 0.1
  done
  echo "timeout waiting for 127.0.0.1:$port$path" >&2; return 1
}

# ---------------------------------------------------------------- measurement
# snapshot: cpu0/cpu1 jiffies and the CPU ticks of processes not started here (as compare.sh)
snapshot() {
  grep -E '^cpu[01] ' /proc/stat
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v ours=" $(ps -o pgid= -p $$ | tr -d ' ') ${PIDS[*]-} 0 " '
    { pid = $1; sub(/^.*\) /, ""); if (index(ours, " " $3 " ") == 0) print "p", pid, $12 + $13 + $14 + $15 }'
}
# delta BEFORE AFTER -> "cpu0busy% cpu1busy% cpu0busy_us other%"
delta() {
  local hz; hz=$(getconf CLK_TCK)
  printf '%s\n%s\n' "$1" "$2" | awk -v hz="$hz" '
    $1 == "cpu0" { k++ }
    /^cpu/   { t=0; for (i=2;i<=9;i++) t+=$i; idle=$5+$6+$9
               if (k == 1) { T[$1]=t; I[$1]=idle }
               else { dt=t-T[$1]; busy=dt-(idle-I[$1]); U[$1]=busy*1e6/hz
                      B[$1]=(dt > 0 ? 100*busy/dt : 0); D=dt } }
    /^p /    { if (k == 1) P[$2]=$3
               else if ($2 in P) f += ($3 > P[$2] ? $3 - P[$2] : 0); else f += $3 }
    END      { printf "%.1f %.1f %.0f %.1f\n", B["cpu0"], B["cpu1"], U["cpu0"], (D > 0 ? 100*f/D : 0) }'
}

# measure ROUND NAME PORT -> one line in $RES/runs.tsv:
#   round name msgs/s messages errors cpu0% cpu1% us/msg0 other%
measure() {
  local round=$1 name=$2 port=$3 out="$RES/$2.r$1.out" b a c0 c1 u0 ot
  # warm-up: connections, pools, memory; not recorded
  taskset -c 1 "$BENCH" load "ws://127.0.0.1:$port/" --conns "$CONNS" --messages 50 --size "$SIZE" >/dev/null 2>&1
  b=$(snapshot)
  timeout --foreground 600 taskset -c 1 "$BENCH" load "ws://127.0.0.1:$port/" \
    --conns "$CONNS" --messages "$MESSAGES" --size "$SIZE" >"$out" 2>&1
  a=$(snapshot)
  read -r c0 c1 u0 ot < <(delta "$b" "$a")
  tr ' ' '\n' <"$out" | awk -F= -v r="$round" -v n="$name" -v c0="$c0" -v c1="$c1" -v u0="$u0" -v ot="$ot" '
    $1 == "messages" { m=$2 } $1 == "messages_per_s" { mps=$2 } $1 == "errors" { e=$2 }
    END { printf "%s\t%s\t%.0f\t%d\t%d\t%s\t%s\t%.2f\t%s\n", r, n, mps, m, (e == "" ? -1 : e),
                 c0, c1, (m > 0 ? u0 / m : 0), ot }' | tee -a "$RES/runs.tsv" | awk -F'\t' '{ printf \
    "  round %s %-7s %8s msg/s  messages %s  err %s  cpu0 %5s%%  cpu1 %5s%%  %6.2f us/msg0  other %s%%\n",
    $1, $2, $3, $4, $5, $6, $7, $8, $9 }'
}

run_target() {
  local round=$1 name=$2 port=8090 pid="" tmo=10
  case "$name" in
    direct) port=9111 ;;
    nginx)  start 0 nginx-ws nginx -p "$RUN/" -e "$RUN/nginx-ws.err" -c "$RES/nginx-ws.conf" -g 'daemon off;' ;;
    proxy)  port=$PROXY_PORT; tmo=60
            start 0 proxy bash -c "exec $PROXY_CMD" ;;
  esac
  if [ "$name" != direct ]; then
    pid=$LASTPID
    wait_http "$port" / "$tmo" "$pid" || exit 1
  fi
  measure "$round" "$name" "$port"
  if [ -n "$pid" ]; then
    stop "$pid"
    for _ in $(seq 50); do listening "$port" || break; sleep 0.1; done
  fi
}

# ---------------------------------------------------------------- main
taskset -pc 1 $$ >/dev/null
for p in 9111 9112 9113 8090 "$PROXY_PORT"; do
  listening "$p" && { echo "port $p already in use; stop whatever listens there" >&2; exit 1; }
done

cat >"$RES/nginx-ws.conf" <<EOF
worker_processes 1;
pid $RUN/nginx-ws.pid;
error_log $RUN/nginx-ws.err warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $RUN/tmp/n_body;
    proxy_temp_path       $RUN/tmp/n_proxy;
    fastcgi_temp_path     $RUN/tmp/n_fcgi;
    uwsgi_temp_path       $RUN/tmp/n_uwsgi;
    scgi_temp_path        $RUN/tmp/n_scgi;
    upstream backends {
        server 127.0.0.1:9111;
        server 127.0.0.1:9112;
        server 127.0.0.1:9113;
    }
    server {
        listen 127.0.0.1:8090 backlog=4096;
        location / {
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_read_timeout 3600s;
        }
    }
}
EOF

{ echo "date: $(date -Is)"; uname -r; nginx -v 2>&1
  echo "conns=$CONNS messages=$MESSAGES size=$SIZE rounds=$ROUNDS"
  echo "proxy_cmd=$PROXY_CMD proxy_port=$PROXY_PORT"
} >"$RES/env.txt"

start 1 backends "$BENCH" echo 127.0.0.1:9111 127.0.0.1:9112 127.0.0.1:9113
for p in 9111 9112 9113; do wait_http "$p" /health 10 "$LASTPID" || exit 1; done

TARGETS=(direct nginx proxy); NT=${#TARGETS[@]}
echo "conns=$CONNS messages=$MESSAGES size=${SIZE}B rounds=$ROUNDS targets=${TARGETS[*]}"
echo "raw results: $RES"
for ((r = 1; r <= ROUNDS; r++)); do
  for ((k = 0; k < NT; k++)); do
    run_target "$r" "${TARGETS[$(( (k + r - 1) % NT ))]}"
  done
done

echo
{
  printf "%-7s %9s %7s %9s %9s %6s %5s %5s %8s %9s %6s\n" name "msg/s" spread vs_nginx paired errors \
         cpu0% cpu1% "us/msg0" "paired_us" other%
  med() { sort -g | awk '{a[NR]=$1} END { print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2 }'; }
  col() { awk -F'\t' -v n="$1" -v c="$2" '$2==n { print $c }' "$RES/runs.tsv" | med; }
  # paired RATIO_COLUMN NAME: median over rounds of NAME's value / nginx's in the same round
  paired() { awk -F'\t' -v n="$2" -v c="$1" '$2=="nginx" { N[$1]=$c } $2==n { T[$1]=$c }
                    END { for (r in T) if (N[r] > 0) print T[r]/N[r] }' "$RES/runs.tsv" | med; }
  ngx=$(col nginx 3)
  for t in "${TARGETS[@]}"; do
    read -r lo hi err ot < <(awk -F'\t' -v n="$t" '$2==n { if (lo=="" || $3<lo) lo=$3; if ($3>hi) hi=$3
                                e+=$5; if ($9>o) o=$9 } END { print lo, hi, e+0, o+0 }' "$RES/runs.tsv")
    awk -v n="$t" -v mps="$(col "$t" 3)" -v pr="$(paired 3 "$t")" -v pu="$(paired 8 "$t")" \
        -v c0="$(col "$t" 6)" -v c1="$(col "$t" 7)" -v u="$(col "$t" 8)" \
        -v lo="$lo" -v hi="$hi" -v e="$err" -v ot="$ot" -v ngx="$ngx" 'BEGIN {
      printf "%-7s %9.0f %6.0f%% %8.2fx %8.2fx %6d %5.0f %5.0f %8.2f", n, mps, (mps > 0 ? 100*(hi-lo)/mps : 0),
             (ngx > 0 ? mps/ngx : 0), pr, e, c0, c1, u
      if (n == "direct") printf " %9s", "-"; else printf " %8.2fx", pu
      printf " %6.1f\n", ot }'
  done
  echo "medians of $ROUNDS rounds; a message = one echo round trip; spread=(max-min)/median msg/s;"
  echo "paired = median of same-round ratios to nginx (msg/s; paired_us: CPU-0 us per message, lower is cheaper);"
  echo "us/msg0 for direct is the idle CPU 0 (nothing runs there); other% should be ~0."
} | tee "$RES/table.txt"
