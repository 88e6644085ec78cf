#!/usr/bin/env bash
# soak.sh - the release standalone under wrk load while its config.json is rewritten.
#
#   bench/soak.sh MINUTES [demo|external|both]      (default: 10 both)
#
# demo:     spawn_backends true, servers on 127.0.0.1:9201-9204: every 1-2 s config.json (a
#           temporary copy) is rewritten with another server set (each transition keeps one
#           server, so a healthy backend is always there; every server leaves and comes
#           back, its demo backend stopped and started), weights 1-3 and the next
#           algorithm (round_robin, least_connections, hashing).
# external: the same with spawn_backends false and three nginx backends on 9101-9103 (one
#           nginx each, as ../shared/bench/conf/backends.nginx.conf configures them);
#           every 10 s the one on 9103 is killed (SIGKILL) and 4 s later started again.
# Load: wrk -t1 -c64 (CONNS=N to change; BIN=PATH runs that binary instead of building) on GET / for the whole run. Prints total requests,
# failed requests (wrk's non-2xx/3xx answers plus its socket errors, and the proxy's own
# 5xx log lines), reloads applied (the proxy's "configuration applied" log lines), the
# proxy's RSS and open descriptors every 10 s, and a verdict: no failure, at least 30
# reloads a minute, and RSS and descriptors grown at most 5% from minute 2 to the last
# minute, compared where the configuration cycle (15 rewrites) is back at its start.
# Pinning, as ../shared/bench/compare.sh does: the proxy alone on CPU 0; wrk, backends and
# this script on CPU 1. Everything started here leads its own process group and is stopped
# by PID on exit. Files: /tmp/tower-lb-soak/<timestamp>/<mode>/.
set -uo pipefail

MINUTES=${1:-10}
MODE=${2:-both}
CONNS=${CONNS:-64}
PORT=${PORT:-8095}
case "$MODE" in demo|external|both) ;; *) sed -n '2,4p' "$0" >&2; exit 2 ;; esac
[[ $MINUTES =~ ^[0-9]+$ ]] && [ "$MINUTES" -ge 1 ] || { echo "MINUTES: a whole number >= 1" >&2; exit 2; }
DURATION=$((MINUTES * 60))

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-}   # a standalone binary to run instead of building this tree's
OUT=/tmp/tower-lb-soak/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
if [ "$MODE" != demo ] && ! command -v nginx >/dev/null; then need+=(nginx); fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} (apt)..." >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } >/dev/null \
    || { echo "could not install ${need[*]}" >&2; exit 2; }
fi

if [ -z "$BIN" ]; then
  echo "building the release standalone..." >&2
  (cd "$ROOT" && cargo build --release --example standalone -q) || exit 1
  BIN=$ROOT/target/release/examples/standalone
fi

# CPU 0 for the proxy, CPU 1 for the rest, when there are two.
if [ "$(nproc)" -ge 2 ]; then
  PROXY_CPU=(taskset -c 0); LOAD_CPU=(taskset -c 1)
  taskset -pc 1 $$ >/dev/null
else
  PROXY_CPU=(); LOAD_CPU=()
fi

# ---------------------------------------------------------------- processes
PIDS=()
LASTPID=""
start() {  # start LOG CMD...: in the background, leading its own process group
  local log=$1; shift
  setsid "$@" >>"$log" 2>&1 &
  LASTPID=$!
  PIDS+=("$LASTPID")
}
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) || return 1; [[ $s != Z* ]]; }
stop() {  # stop PID: TERM its group, up to 5 s, then KILL
  local p=$1 i q keep=()
  kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null
  for i in $(seq 50); do alive "$p" || break; sleep 0.1; done
  kill -KILL -- "-$p" 2>/dev/null
  wait "$p" 2>/dev/null
  for q in "${PIDS[@]}"; do [ "$q" != "$p" ] && keep+=("$q"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}
stop_nginx() {  # the backends' nginx, started by this script or by its churn loop
  local f p
  for f in "$1"/nginx-*.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f" 2>/dev/null) && [ -n "$p" ] && kill -KILL "$p" 2>/dev/null
    rm -f "$f"
  done
}
cleanup() {
  local p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do stop "$p"; done
  for d in "$OUT"/*/; do [ -d "$d" ] && stop_nginx "$d"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- configuration
# write_config DIR PORTS ALGORITHM SPAWN STEP: config.json replaced by rename, as editors
# do; weights 1-3, a function of the port and the step.
write_config() {
  local dir=$1 ports=$2 algorithm=$3 spawn=$4 step=$5 servers="" p
  for p in $ports; do
    servers+="${servers:+, }{ \"host\": \"127.0.0.1\", \"port\": $p, \"weight\": $(((p + step) % 3 + 1)) }"
  done
  cat >"$dir/config.json.tmp" <<EOF
{
  "listen": "127.0.0.1:$PORT",
  "servers": [ $servers ],
  "algorithm": "$algorithm",
  "health_check_interval": 1,
  "health_check_timeout": 0.5,
  "spawn_backends": $spawn
}
EOF
  mv "$dir/config.json.tmp" "$dir/config.json"
}

# One nginx per backend port, so that one can be killed alone.
nginx_conf() {  # nginx_conf DIR PORT
  mkdir -p "$1/nginx-tmp"
  # One process (no master): killing it takes the backend down at once.
  cat >"$1/nginx-$2.conf" <<EOF
master_process off;
worker_processes 1;
pid $1/nginx-$2.pid;
error_log $1/nginx-$2.err warn;
events { worker_connections 8192; }
http {
    access_log off;
    default_type text/plain;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path $1/nginx-tmp/body;
    proxy_temp_path       $1/nginx-tmp/proxy;
    fastcgi_temp_path     $1/nginx-tmp/fcgi;
    uwsgi_temp_path       $1/nginx-tmp/uwsgi;
    scgi_temp_path        $1/nginx-tmp/scgi;
    server { listen 127.0.0.1:$2 backlog=4096;
             location = /health { return 200 "ok"; }
             location /         { return 200 "127.0.0.1:$2"; } }
}
EOF
}
start_nginx() {  # start_nginx DIR PORT: returns once it listens
  local i
  "${LOAD_CPU[@]}" nginx -p "$1" -c "$1/nginx-$2.conf" -g 'daemon on;' 2>>"$1/nginx-$2.err"
  for i in $(seq 50); do listening "$2" && return 0; sleep 0.1; done
  echo "nginx on $2 did not start" >&2; return 1
}

# churn DIR SETS SPAWN KILL PROXY: rewrites the config every 1-2 s until killed; with KILL, kills
# the nginx on 9103 every 10 s and starts it again 4 s later. Logs what it did to DIR/churn.log.
churn() {
  local dir=$1 spawn=$3 kill=$4 proxy=$5 i=0 n algorithms=(round_robin least_connections hashing)
  local -a sets
  IFS=';' read -r -a sets <<<"$2"
  local t0=$SECONDS down_at=-1
  while true; do
    sleep "1.$((RANDOM % 1000))"
    i=$((i + 1))
    n=${#sets[@]}
    # Every 15 steps the configuration cycle (5 server sets, 3 algorithms) is back where it
    # started: the proxy is sampled there, in the same state each time, for the verdict.
    [ $((i % 15)) -eq 0 ] && echo "$((SECONDS - t0)) $(usage "$proxy")" >>"$dir/cycle"
    write_config "$dir" "${sets[$((i % n))]}" "${algorithms[$((i % 3))]}" "$spawn" "$i"
    echo "$((SECONDS - t0)) write ${sets[$((i % n))]} ${algorithms[$((i % 3))]}" >>"$dir/churn.log"
    if [ "$kill" = 1 ]; then
      if [ $down_at -lt 0 ] && [ $(((SECONDS - t0) % 10)) -lt 2 ] && [ $((SECONDS - t0)) -ge 5 ]; then
        kill -KILL "$(cat "$dir/nginx-9103.pid")" 2>/dev/null
        rm -f "$dir/nginx-9103.pid"
        down_at=$SECONDS
        echo "$((SECONDS - t0)) killed 9103" >>"$dir/churn.log"
      elif [ $down_at -ge 0 ] && [ $((SECONDS - down_at)) -ge 4 ]; then
        for _ in $(seq 50); do listening 9103 || break; sleep 0.1; done
        start_nginx "$dir" 9103 && echo "$((SECONDS - t0)) restarted 9103" >>"$dir/churn.log"
        down_at=-1
      fi
    fi
  done
}

# usage PID: "rss_kB fds"
usage() {
  echo "$(awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null) $(ls "/proc/$1/fd" 2>/dev/null | wc -l)"
}

# sample PID FILE: "seconds rss_kB fds" every 10 s
sample() {
  local pid=$1 file=$2 t0=$SECONDS
  while alive "$pid"; do
    echo "$((SECONDS - t0)) $(usage "$pid")" >>"$file"
    sleep 10
  done
}

# ---------------------------------------------------------------- one mode
VERDICTS=()
run_mode() {
  local mode=$1 dir=$OUT/$1 sets spawn kill=0 ports p proxy churner sampler
  mkdir -p "$dir"
  if [ "$mode" = demo ]; then
    ports="9201 9202 9203 9204"; spawn=true
    sets="9201 9202 9203;9202 9203 9204;9203 9204;9201 9204;9201 9202"
  else
    ports="9101 9102 9103"; spawn=false; kill=1
    sets="9101 9102 9103;9101 9103;9101 9102;9102 9103;9102"
  fi
  for p in $ports $PORT; do
    listening "$p" && { echo "port $p already in use; stop whatever listens there" >&2; return 1; }
  done
  if [ "$mode" = external ]; then
    for p in $ports; do nginx_conf "$dir" "$p"; start_nginx "$dir" "$p" || return 1; done
  fi
  write_config "$dir" "${sets%%;*}" round_robin "$spawn" 0
  RUST_LOG=info start "$dir/proxy.log" "${PROXY_CPU[@]}" "$BIN" "$dir/config.json"
  proxy=$LASTPID
  for _ in $(seq 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$PORT/")" = 200 ] && break
    alive "$proxy" || { echo "the proxy died; see $dir/proxy.log" >&2; return 1; }
    sleep 0.1
  done
  echo "== $mode: $MINUTES min, wrk -c$CONNS, config rewritten every 1-2 s$([ $kill = 1 ] && echo ', nginx on 9103 killed every 10 s')" >&2
  sample "$proxy" "$dir/samples" & sampler=$!
  churn "$dir" "$sets" "$spawn" "$kill" "$proxy" & churner=$!
  "${LOAD_CPU[@]}" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$PORT/" >"$dir/wrk.txt" 2>&1
  kill "$churner" "$sampler" 2>/dev/null; wait "$churner" "$sampler" 2>/dev/null
  local survived=yes; alive "$proxy" || survived=no
  stop "$proxy"
  stop_nginx "$dir"
  report "$mode" "$dir" "$survived"
}

# report MODE DIR SURVIVED: the numbers and the verdict line
report() {
  local mode=$1 dir=$2 survived=$3 requests non2xx sockerr logged reloads writes
  requests=$(awk '/requests in/ { print $1 }' "$dir/wrk.txt")
  non2xx=$(awk '/Non-2xx or 3xx responses:/ { n += $5 } END { print n + 0 }' "$dir/wrk.txt")
  sockerr=$(awk '/Socket errors:/ { gsub(",", ""); n += $4 + $6 + $8 + $10 } END { print n + 0 }' "$dir/wrk.txt")
  logged=$(grep -cE '(502 Bad Gateway|503 Service Unavailable|504 Gateway Timeout)' "$dir/proxy.log")
  reloads=$(grep -c 'configuration applied' "$dir/proxy.log")
  writes=$(grep -c ' write ' "$dir/churn.log" 2>/dev/null)
  echo "-- $mode"
  echo "requests:        ${requests:-0} ($(awk '/^Requests\/sec:/ { print $2 }' "$dir/wrk.txt") req/s)"
  echo "failed:          $non2xx non-2xx answers, $sockerr socket errors (wrk); $logged 5xx logged by the proxy"
  echo "reloads applied: $reloads (of $writes rewrites)$([ "$mode" = external ] && echo ", 9103 killed $(grep -c killed "$dir/churn.log") times")"
  echo "proxy every 10 s (s, RSS MiB, fds):"
  awk '{ printf "  %5d %7.1f %5d\n", $1, $2 / 1024, $3 }' "$dir/samples" | paste - - - - | sed 's/^/ /'
  # Growth, from the samples taken each time the configuration cycle was back at its start
  # (the same server set, weights and algorithm, after the same sequence of reloads):
  # descriptors follow the set in force and its pools (in demo mode the demo backends'
  # ends of those connections too), so samples at arbitrary moments jump by 40% with the
  # churn. Minute 2 against the last minute (mean of the samples in each); runs under 4
  # minutes: the first sample after 20 s against the last.
  local growth
  growth=$(awk -v d="$DURATION" '
    { t[NR] = $1; r[NR] = $2; f[NR] = $3 }
    END {
      for (i = 1; i <= NR; i++) {
        if (d >= 240 && t[i] >= 60 && t[i] < 120) { rb += r[i]; fb += f[i]; nb++ }
        if (d >= 240 && t[i] >= d - 60)           { re += r[i]; fe += f[i]; ne++ }
        if (d < 240 && !nb && t[i] >= 20)         { rb = r[i]; fb = f[i]; nb = 1 }
      }
      if (d < 240) { re = r[NR]; fe = f[NR]; ne = 1 }
      if (!nb || !ne) { print "0 0 0 0 0 0 too_few_samples"; exit }
      rb /= nb; fb /= nb; re /= ne; fe /= ne
      printf "%.1f %.1f %d %d %.1f %.1f %s", rb / 1024, re / 1024, fb, fe,
             100 * (re - rb) / rb, 100 * (fe - fb) / fb,
             (d >= 240 ? "minute_2->last_minute" : "first->last") }' "$dir/cycle")
  local rb re fb fe rg fg window
  read -r rb re fb fe rg fg window <<<"$growth"
  echo "growth at the start of the config cycle ($(wc -l <"$dir/cycle") samples, ${window//_/ }): RSS $rb -> $re MiB ($rg%), fds $fb -> $fe ($fg%)"
  # The proxy logs each 5xx it answers, which wrk counts too: the larger of the two.
  local failures=$(((non2xx > logged ? non2xx : logged) + sockerr)) verdict=PASS why=()
  [ "$failures" -eq 0 ] || why+=("$failures failures")
  [ "$survived" = yes ] || why+=("the proxy died")
  awk -v g="$rg" 'BEGIN { exit !(g > 5) }' && why+=("RSS grew $rg%")
  awk -v g="$fg" 'BEGIN { exit !(g > 5) }' && why+=("fds grew $fg%")
  [ "$reloads" -ge $((MINUTES * 30)) ] || why+=("only $reloads reloads")
  [ ${#why[@]} -eq 0 ] || verdict="FAIL (${why[*]})"
  local line="verdict $mode: $verdict: ${requests:-0} requests, $failures failed, $reloads reloads in $MINUTES min, RSS $rg%, fds $fg%"
  echo "$line"
  VERDICTS+=("$line")
}

[ "$MODE" = demo ] || [ "$MODE" = both ] && run_mode demo
[ "$MODE" = external ] || [ "$MODE" = both ] && run_mode external
echo
printf '%s\n' "${VERDICTS[@]}"
echo "files: $OUT"
[[ "${VERDICTS[*]}" != *FAIL* ]] && [ ${#VERDICTS[@]} -gt 0 ]
