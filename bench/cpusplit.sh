#!/usr/bin/env bash
# cpusplit.sh - where a proxy's CPU per request goes: user space, kernel, interrupts.
#
#   bench/cpusplit.sh [--conns N] [--duration S] [--rounds R] [--proxy-cmd 'CMD']
#
# Runs nginx (../shared/bench/conf/nginx-lb.conf) and the proxy under test (default: the
# release standalone with bench/config.json) in turn, each alone on CPU 0 and listening on
# 127.0.0.1:8090, with wrk and the three nginx backends on CPU 1, as compare.sh does. For
# each run it prints microseconds per request of the proxy's processes in user space and in
# the kernel (utime and stime from /proc/PID/stat, in clock ticks), and of CPU 0 in all
# (busy time from /proc/stat) and in interrupts and softirqs, where the loopback network
# work of both sides of a connection is done. The rounds alternate between the two.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SHARED=$(cd "$ROOT/../shared/bench" && pwd)
CONNS=64; DURATION=5; ROUNDS=3
PROXY_CMD="$ROOT/target/release/examples/standalone $ROOT/bench/config.json"
while [ $# -gt 0 ]; do
  case "$1" in
    --conns) CONNS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --proxy-cmd) PROXY_CMD=$2; shift 2 ;;
    *) sed -n '2,4p' "$0" >&2; exit 2 ;;
  esac
done
RUN=/tmp/lbbench/cpusplit; mkdir -p "$RUN/nginx"
HZ=$(getconf CLK_TCK)
PIDS=()
cleanup() { local p; for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill -TERM -- "-$p" 2>/dev/null; wait "$p" 2>/dev/null; done; }
trap cleanup EXIT
trap 'exit 130' INT TERM

setsid taskset -c 1 nginx -p "$RUN/nginx/" -e "$RUN/nginx/backends.err" \
  -c "$SHARED/conf/backends.nginx.conf" -g 'daemon off;' >/dev/null 2>&1 &
PIDS+=("$!")

# ticks PIDS...: "utime stime" summed over the processes, then CPU 0's "busy irq+softirq".
ticks() {
  local u=0 s=0 p uu ss
  for p in "$@"; do
    read -r uu ss < <(awk '{sub(/^.*\) /, ""); print $12, $13}' "/proc/$p/stat" 2>/dev/null || echo "0 0")
    u=$((u + uu)); s=$((s + ss))
  done
  echo "$u $s $(awk '/^cpu0 /{print $2+$3+$4+$7+$8, $7+$8}' /proc/stat)"
}

# measure NAME CMD...: one run of CMD pinned to CPU 0.
measure() {
  local name=$1; shift
  setsid taskset -c 0 "$@" >/dev/null 2>&1 &
  local leader=$! i
  for i in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:8090/ && break; sleep 0.1; done
  taskset -c 1 wrk -t1 -c"$CONNS" -d1s http://127.0.0.1:8090/ >/dev/null 2>&1
  local pids; pids=$(pgrep -g "$leader" | tr '\n' ' ')
  local before after out reqs
  # shellcheck disable=SC2086
  before=$(ticks $pids)
  out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" http://127.0.0.1:8090/ 2>&1)
  # shellcheck disable=SC2086
  after=$(ticks $pids)
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  kill -TERM -- "-$leader" 2>/dev/null; wait "$leader" 2>/dev/null
  python3 - "$name" "$reqs" "$DURATION" "$HZ" $before $after <<'PY'
import sys
name, reqs, duration, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
b = list(map(int, sys.argv[5:9])); a = list(map(int, sys.argv[9:13]))
us = lambda ticks: ticks / hz * 1e6 / reqs
print(f"{name:8} {reqs / duration:8.0f} req/s  user {us(a[0] - b[0]):6.2f}  kernel {us(a[1] - b[1]):6.2f}"
      f"  cpu0 busy {us(a[2] - b[2]):6.2f} (irq+softirq {us(a[3] - b[3]):5.2f}) us/req")
PY
}

for r in $(seq "$ROUNDS"); do
  measure nginx nginx -p "$RUN/nginx/" -e "$RUN/nginx/lb.err" -c "$SHARED/conf/nginx-lb.conf" -g 'daemon off;'
  # shellcheck disable=SC2086
  measure proxy $PROXY_CMD
done
