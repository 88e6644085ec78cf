#!/usr/bin/env bash
# h2load.sh - HTTP/2 (h2c, prior knowledge) through the proxy and through nginx, on a
# 2-core box, interleaved and pinned as ../shared/bench/compare.sh does for HTTP/1.1.
#
#   bench/h2load.sh [--duration S] [--rounds R] [--proxy-cmd 'CMD'] [--smoke]
#
# Backends: one nginx worker answering HTTP/1.1 on 127.0.0.1:9101-9103 (body = own address,
# /health -> 200), pinned to CPU 1 with h2load. Proxies on 127.0.0.1:8090, pinned alone to
# CPU 0, started fresh for every run:
#   nginx - `listen 127.0.0.1:8090 http2;` (h2c in nginx 1.22), round robin over the
#           backends with upstream keep-alive and X-Forwarded-For, one worker;
#   proxy - CMD (default: target/release/examples/standalone bench/config.json), which
#           must stay in the foreground and serve h2c on 127.0.0.1:8090.
# Loads: h2load -c 8 -m 32 (few connections, many streams each) and -c 64 -m 8; each run
# warms up 1 s, then measures for S seconds (default 5). Rounds (default 5) rotate the start.
# Per run: req/s, failed requests, CPU-0 busy % and CPU-0 microseconds per request (the
# proxy's whole cost, kernel included). The table gives medians and `paired`, the median
# of same-round ratios proxy / nginx (robust to drift between rounds).
# --smoke: one round of 1 s per load, to check that the script works.
# Everything started here leads its own process group and is stopped by PID on exit.
# Files and raw h2load output: /tmp/lbbench/h2-<timestamp>/.
set -uo pipefail

DURATION=5; ROUNDS=5; WARMUP=1
PROXY_CMD="target/release/examples/standalone bench/config.json"
LOADS=("8 32" "64 8")

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --duration)  DURATION=$2; shift 2 ;;
    --rounds)    ROUNDS=$2; shift 2 ;;
    --proxy-cmd) PROXY_CMD=$2; shift 2 ;;
    --smoke)     DURATION=1; ROUNDS=1; shift ;;
    -h|--help)   usage; exit 0 ;;
    *)           usage >&2; exit 2 ;;
  esac
done

# h2load (Debian's nghttp2-client) and nginx, installed once where missing.
if ! command -v h2load >/dev/null || ! command -v nginx >/dev/null || ! command -v curl >/dev/null; then
  echo "installing nghttp2-client, nginx, curl (apt)..." >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nghttp2-client nginx curl; } >/dev/null \
    || { echo "could not install h2load and nginx" >&2; exit 2; }
fi

RUN=/tmp/lbbench
RES=$RUN/h2-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN/tmp" "$RES"

# ---------------------------------------------------------------- configurations
cat >"$RES/backends.nginx.conf" <<EOF
worker_processes 1;
pid $RES/backends.pid;
error_log $RES/backends.err warn;
events { worker_connections 8192; }
http {
    access_log off;
    default_type text/plain;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path $RUN/tmp/b_body;
    proxy_temp_path       $RUN/tmp/b_proxy;
    fastcgi_temp_path     $RUN/tmp/b_fcgi;
    uwsgi_temp_path       $RUN/tmp/b_uwsgi;
    scgi_temp_path        $RUN/tmp/b_scgi;
    server { listen 127.0.0.1:9101 backlog=4096;
             location = /health { return 200 "ok"; }
             location /         { return 200 "127.0.0.1:9101"; } }
    server { listen 127.0.0.1:9102 backlog=4096;
             location = /health { return 200 "ok"; }
             location /         { return 200 "127.0.0.1:9102"; } }
    server { listen 127.0.0.1:9103 backlog=4096;
             location = /health { return 200 "ok"; }
             location /         { return 200 "127.0.0.1:9103"; } }
}
EOF
cat >"$RES/nginx-h2.conf" <<EOF
worker_processes 1;
pid $RES/nginx-h2.pid;
error_log $RES/nginx-h2.err warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    http2_max_concurrent_streams 256;
    client_body_temp_path $RUN/tmp/n_body;
    proxy_temp_path       $RUN/tmp/n_proxy;
    fastcgi_temp_path     $RUN/tmp/n_fcgi;
    uwsgi_temp_path       $RUN/tmp/n_uwsgi;
    scgi_temp_path        $RUN/tmp/n_scgi;
    upstream backends {
        server 127.0.0.1:9101;
        server 127.0.0.1:9102;
        server 127.0.0.1:9103;
        keepalive 512;
        keepalive_requests 10000000;
    }
    server {
        listen 127.0.0.1:8090 http2 backlog=4096;
        location / {
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }
}
EOF

# ---------------------------------------------------------------- process handling
PIDS=(); LASTPID=""
start() {   # start CPU NAME CMD...: in the background, own process group, pinned
  local cpu=$1 name=$2; shift 2
  setsid taskset -c "$cpu" "$@" >>"$RES/$name.log" 2>&1 &
  LASTPID=$!
  PIDS+=("$LASTPID")
}
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) || return 1; [[ $s != Z* ]]; }
stop() {    # stop PID: TERM its group, up to 5 s, then KILL
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
wait_http() {   # wait_http PORT PATH TIMEOUT_S PID [curl options]: until GET answers 200
  local port=$1 path=$2 t=$3 pid=$4 i; shift 4
  for i in $(seq $((t * 10))); do
    [ "$(curl -s "$@" -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$port$path")" = 200 ] && return 0
    alive "$pid" || { echo "process $pid died, see $RES/*.log" >&2; return 1; }
    sleep 0.1
  done
  echo "timeout waiting for 127.0.0.1:$port$path" >&2; return 1
}

# ---------------------------------------------------------------- measurement
cpu0() { awk '$1 == "cpu0" { t = 0; for (i = 2; i <= 9; i++) t += $i; print t, $5 + $6 + $9 }' /proc/stat; }

# measure ROUND NAME C M -> one line of runs.tsv:
#   round name load rps succeeded failed cpu0% us/req0
measure() {
  local round=$1 name=$2 c=$3 m=$4 out="$RES/$2.c$3m$4.r$1.txt" t0 i0 t1 i1
  timeout --foreground $((WARMUP + 10)) taskset -c 1 h2load -c "$c" -m "$m" -D "$WARMUP" http://127.0.0.1:8090/ >/dev/null 2>&1
  read -r t0 i0 < <(cpu0)
  timeout --foreground $((DURATION + 15)) taskset -c 1 h2load -c "$c" -m "$m" -D "$DURATION" http://127.0.0.1:8090/ >"$out" 2>&1
  read -r t1 i1 < <(cpu0)
  # jiffies are 1/100 s: busy share of CPU 0 over the window, and its busy time per request
  awk -v r="$round" -v n="$name" -v l="c${c}m${m}" -v dt=$((t1 - t0)) -v di=$((i1 - i0)) '
    /^finished in/ { gsub(",", ""); rps = $4 }
    /^requests:/   { gsub(",", ""); ok = $8; failed = $10 + $12 }
    END { busy = dt > 0 ? (dt - di) / dt : 0
          us = ok > 0 ? (dt - di) * 1e4 / ok : 0
          printf "%s\t%s\t%s\t%.0f\t%d\t%d\t%.1f\t%.2f\n", r, n, l, rps, ok, failed, 100 * busy, us }
  ' "$out" | tee -a "$RES/runs.tsv" | awk -F'\t' '{ printf \
    "  round %s %-6s %-7s %8s req/s  ok %s  failed %s  cpu0 %5s%%  %6s us/req0\n", $1, $2, $3, $4, $5, $6, $7, $8 }'
}

run() {     # run ROUND NAME: start that proxy on CPU 0, measure every load, stop it
  local round=$1 name=$2 load
  for load in "${LOADS[@]}"; do
    case "$name" in
      nginx) start 0 nginx-h2 nginx -p "$RUN/" -e "$RES/nginx-h2.err" -c "$RES/nginx-h2.conf" -g 'daemon off;' ;;
      proxy) start 0 proxy bash -c "exec $PROXY_CMD" ;;
    esac
    local pid=$LASTPID
    wait_http 8090 / 60 "$pid" --http2-prior-knowledge || exit 1
    measure "$round" "$name" $load
    stop "$pid"
    for _ in $(seq 50); do listening 8090 || break; sleep 0.1; done
  done
}

# ---------------------------------------------------------------- main
taskset -pc 1 $$ >/dev/null
for p in 9101 9102 9103 8090; do
  listening "$p" && { echo "port $p already in use; stop whatever listens there" >&2; exit 1; }
done
# results mean something only on an otherwise idle machine: warn if it is not
read -r t0 i0 < <(cpu0); sleep 1; read -r t1 i1 < <(cpu0)
if [ $((t1 - t0)) -gt 0 ] && [ $(( 100 * (t1 - t0 - (i1 - i0)) / (t1 - t0) )) -gt 5 ]; then
  echo "WARNING: CPU 0 is $(( 100 * (t1 - t0 - (i1 - i0)) / (t1 - t0) ))% busy before the start: results are suspect" >&2
fi
{ echo "date: $(date -Is)"; uname -r; nginx -v 2>&1; h2load --version | head -1
  echo "duration=$DURATION rounds=$ROUNDS warmup=$WARMUP loads=${LOADS[*]}"
  echo "proxy_cmd=$PROXY_CMD"; } >"$RES/env.txt"

start 1 backends nginx -p "$RUN/" -e "$RES/backends.err" -c "$RES/backends.nginx.conf" -g 'daemon off;'
for p in 9101 9102 9103; do wait_http "$p" /health 10 "$LASTPID" || exit 1; done

TARGETS=(nginx proxy)
echo "duration=${DURATION}s rounds=$ROUNDS loads: -c/-m ${LOADS[*]}; raw results: $RES"
for ((r = 1; r <= ROUNDS; r++)); do
  for ((k = 0; k < 2; k++)); do run "$r" "${TARGETS[$(( (k + r - 1) % 2 ))]}"; done
done

# ---------------------------------------------------------------- table
echo
{
  printf "%-8s %-6s %8s %8s %7s %9s %8s %7s\n" load name "req/s" paired failed "us/req0" paired "cpu0%"
  med() { sort -g | awk '{ a[NR] = $1 } END { if (NR) print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; else print 0 }'; }
  for load in "${LOADS[@]}"; do
    set -- $load; l="c$1m$2"
    for t in "${TARGETS[@]}"; do
      col() { awk -F'\t' -v n="$t" -v l="$l" -v c="$1" '$2 == n && $3 == l { print $c }' "$RES/runs.tsv" | med; }
      pair() { awk -F'\t' -v n="$t" -v l="$l" -v c="$1" '$3 == l && $2 == "nginx" { N[$1] = $c } $3 == l && $2 == n { T[$1] = $c }
                END { for (r in T) if (N[r] > 0) print T[r] / N[r] }' "$RES/runs.tsv" | med; }
      failed=$(awk -F'\t' -v n="$t" -v l="$l" '$2 == n && $3 == l { f += $6 } END { print f + 0 }' "$RES/runs.tsv")
      printf "%-8s %-6s %8.0f %7.2fx %7d %9.2f %7.2fx %7.1f\n" "$l" "$t" "$(col 4)" "$(pair 4)" "$failed" "$(col 8)" "$(pair 8)" "$(col 7)"
    done
  done
  echo "medians of $ROUNDS rounds; paired = median of same-round ratios to nginx (req/s: higher is"
  echo "better; us/req0, CPU-0 busy microseconds per request: lower is cheaper); failed = sum."
} | tee "$RES/table.txt"
