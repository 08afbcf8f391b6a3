#!/usr/bin/env bash
# Load benchmark (not a test): wrk with 64 connections POSTs the signed ~760-byte
# documented message.sent event to a bare hyper server (the HTTP ceiling), to the
# same server verifying and parsing each body but storing nothing (verify_parse_only:
# what the receive step costs before the spool), then to hyper_receiver and
# actix_receiver with their durable spool on, all in one run.
# Prints requests per second, p50/p99 latency, the ratio to the ceiling, non-2xx
# answers, and the spool's event count beside the answered requests (the spool keeps
# every segment here, COMAPI_SPOOL_KEEP=true, so that it can be counted), and how much
# of the machine's CPU was left idle during each run (Linux: /proc/stat).
#
# With redis-server on PATH, hyper_redis joins the rotation: hyper_receiver storing
# into a Redis stream (COMAPI_REDIS_URL) on a redis-server of this script's own with
# appendonly yes and appendfsync always, and its ratio to the spool's hyper_receiver
# is printed. With rabbitmq-server installed, a throwaway node of this script's own
# (scripts/rabbit-node.sh) adds rabbit_ceiling (the broker alone: the receivers'
# records published with confirms by examples/rabbit_ceiling.rs, CONNECTIONS at once,
# no HTTP) and hyper_rabbitmq (hyper_receiver storing into a quorum queue), with their
# ratios. With perf on PATH, fsyncs/s counts the fdatasync calls a second of the
# process that syncs: the receiver for the spool, redis-server for hyper_redis, the
# broker's Erlang VM for the RabbitMQ rows.
#
# The targets take turns for ROUNDS rounds, each with a fresh process and spool, so
# a noisy neighbour on a shared machine hits them all alike; the ratios use each
# target's median rate.
#
# BASELINE=<git revision> also builds both receivers at that revision (in a
# temporary worktree) and puts them in the same rotation, then prints each
# receiver's ratio to its baseline build: an A/B of a change, measured in one run.
#
#   scripts/loadtest.sh    # ROUNDS=3 DURATION=5s CONNECTIONS=64 THREADS=2 by default
#   BASELINE=HEAD~1 ROUNDS=7 scripts/loadtest.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
BASELINE=${BASELINE:-}
SECRET=load-test-secret-0123456789abcdef
BODY=tests/fixtures/events/message_sent_sms.json

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
cargo build --release --all-features --bins --examples --quiet

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ -n "${redis_pid:-}" ]; then kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
  if declare -F rabbit_node_stop >/dev/null; then rabbit_node_stop; fi
  rm -rf "$work"
  if [ -n "$BASELINE" ]; then git worktree prune; fi
}
trap cleanup EXIT

# The targets in the order they take turns, and the binary each runs.
targets=(http_ceiling verify_parse_only hyper_receiver actix_receiver)
declare -A binary mode
binary[http_ceiling]=target/release/examples/http_ceiling
binary[verify_parse_only]=target/release/examples/http_ceiling
binary[hyper_receiver]=target/release/hyper_receiver
binary[actix_receiver]=target/release/actix_receiver
mode[verify_parse_only]=verify
redis_pid=
if command -v redis-server >/dev/null; then
  redis_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$work/redis"
  redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly yes --appendfsync always \
    --dir "$work/redis" --logfile "$work/redis/redis.log" &
  redis_pid=$!
  for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  targets+=(hyper_redis)
  binary[hyper_redis]=target/release/hyper_receiver
else
  echo "no redis-server on PATH: hyper_redis is left out (apt-get install redis-server)"
fi
if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  # shellcheck source=scripts/rabbit-node.sh
  . scripts/rabbit-node.sh
  rabbit_node_start "$work/rabbit"
  targets+=(rabbit_ceiling hyper_rabbitmq)
  binary[hyper_rabbitmq]=target/release/hyper_receiver
else
  echo "no rabbitmq-server: hyper_rabbitmq is left out (apt-get install rabbitmq-server)"
fi
if [ -n "$BASELINE" ]; then
  rev=$(git rev-parse --short "$BASELINE^{commit}")
  git worktree add --quiet --detach "$work/baseline" "$rev"
  echo "building the receivers at $rev for the baseline"
  (cd "$work/baseline" && cargo build --release --all-features --bins --examples --quiet --target-dir "$work/baseline-target")
  for name in hyper_receiver actix_receiver; do
    targets+=("$name@$rev")
    # Bins since the feature `binaries`; examples before.
    binary[$name@$rev]="$work/baseline-target/release/$name"
    [ -x "${binary[$name@$rev]}" ] || binary[$name@$rev]="$work/baseline-target/release/examples/$name"
  done
fi

# The documented event, raised now: inside the receivers' replay window, so their worker
# decides on it as on live traffic rather than setting it aside as expired.
sed "s/\"timestamp\":\"2017-08-31T09:26:14.604Z\"/\"timestamp\":\"$(date -u +%Y-%m-%dT%H:%M:%S.000Z)\"/" \
  "$BODY" > "$work/body.json"
BODY="$work/body.json"
signature=$(python3 -c 'import hashlib, hmac, sys
print(hmac.new(sys.argv[1].encode(), open(sys.argv[2], "rb").read(), hashlib.sha1).hexdigest())' "$SECRET" "$BODY")
cat > "$work/post.lua" <<LUA
wrk.method = "POST"
local f = io.open("$BODY", "rb"); wrk.body = f:read("*a"); f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Comapi-Signature"] = "$signature"
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT %d %d %d %.1f %.3f %.3f\n", summary.requests, summary.errors.status, errors,
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
LUA

# start NAME: runs the target's binary on a free port; sets $url and $pid.
start() {
  local name=$1 out="$work/$1.out"
  # The previous round's address must not be read before this process rewrites the file.
  rm -f "$out"
  local redis_url= amqp_url=
  if [ "$name" = hyper_redis ]; then redis_url="redis://127.0.0.1:$redis_port/"; fi
  if [ "$name" = hyper_rabbitmq ]; then amqp_url=$RABBIT_URL; fi
  COMAPI_REDIS_URL=$redis_url COMAPI_AMQP_URL=$amqp_url COMAPI_AMQP_QUEUE="loadtest.$name.$round" CEILING=${mode[$name]:-bare} COMAPI_WEBHOOK_SECRET=$SECRET PORT=0 COMAPI_SPOOL_DIR="$work/spool-$name" COMAPI_SPOOL_KEEP=true RUST_LOG=warn \
    "${binary[$name]}" >"$out" 2>"$work/$name.err" &
  pids+=($!)
  pid=$!
  for _ in $(seq 100); do
    url=$(grep -o 'http://[0-9.:]*' "$out" 2>/dev/null || true)
    [ -n "$url" ] && return 0
    sleep 0.1
  done
  echo "$name did not start" >&2; cat "$work/$name.err" >&2; exit 1
}

# The spool's receivers depend on the disk, the ceiling does not: say what a sync
# costs right now (1,000 data-only syncs of 16 KiB, as the spool's group commits do).
python3 - "$work" <<'PY'
import os, sys, time
path = os.path.join(sys.argv[1], "sync-probe")
fd = os.open(path, os.O_RDWR | os.O_CREAT)
os.write(fd, bytes(1000 * 16384)); os.fsync(fd); os.lseek(fd, 0, 0)
cpu = time.process_time(); start = time.perf_counter()
for _ in range(1000):
    os.write(fd, b"x" * 16384); os.fdatasync(fd)
wall = (time.perf_counter() - start) * 1000
print(f"disk: fdatasync of 16 KiB takes {wall:.0f} us of wall time, {(time.process_time() - cpu) * 1000:.0f} us of this process's CPU")
os.close(fd); os.unlink(path)
PY
# cpu_times: the machine's total CPU time and its idle part (idle plus I/O wait), in
# clock ticks, from /proc/stat.
cpu_times() {
  awk '/^cpu /{total = 0; for (i = 2; i <= 9; i++) total += $i; print total, $5 + $6; exit}' /proc/stat
}

echo
declare -A rates
printf '%-24s %5s %10s %9s %9s %8s %8s %10s %10s %8s %6s %9s\n' target round req/s p50_ms p99_ms non2xx errors answered spooled exit_ms idle% fsyncs/s
for round in $(seq "$ROUNDS"); do
  for name in "${targets[@]}"; do
    if [ "$name" = rabbit_ceiling ]; then
      # The broker alone: the same records, confirmed, from one process, no HTTP.
      rabbit_beam=$(pgrep -f -- "-home $RABBIT_DIR" | head -1)
      perf_pid=
      if command -v perf >/dev/null && [ -n "$rabbit_beam" ]; then
        perf stat -x, -e syscalls:sys_enter_fdatasync -p "$rabbit_beam" -o "$work/perf.out" 2>/dev/null &
        perf_pid=$!
      fi
      read -r _ requests non2xx errors rate p50 p99 < <(target/release/examples/rabbit_ceiling "$RABBIT_URL" \
        "loadtest.ceiling.$round" "$CONNECTIONS" "${DURATION%s}" 2>/dev/null | grep '^RESULT')
      fsyncs=-
      if [ -n "$perf_pid" ]; then
        kill -INT "$perf_pid" 2>/dev/null || true; wait "$perf_pid" 2>/dev/null || true
        count=$(awk -F, '/fdatasync/{print $1}' "$work/perf.out" 2>/dev/null || true)
        if [[ "$count" =~ ^[0-9]+$ ]]; then fsyncs=$(( count / ${DURATION%s} )); fi
      fi
      rates[$name]="${rates[$name]:-} $rate"
      printf '%-24s %5d %10.0f %9.2f %9.2f %8d %8d %10d %10s %8s %6s %9s\n' "$name" "$round" "$rate" "$p50" "$p99" "$non2xx" "$errors" "$requests" - - - "$fsyncs"
      continue
    fi
    rm -rf "$work/spool-$name"
    if [ "$name" = hyper_redis ]; then redis-cli -p "$redis_port" flushall >/dev/null; fi
    start "$name"
    # Count the fdatasync calls of the process that syncs, while wrk runs.
    syncing=$pid
    if [ "$name" = hyper_redis ]; then syncing=$redis_pid; fi
    if [ "$name" = hyper_rabbitmq ]; then syncing=$(pgrep -f -- "-home $RABBIT_DIR" | head -1); fi
    perf_pid=
    if command -v perf >/dev/null && [ "$name" != http_ceiling ] && [ "$name" != verify_parse_only ]; then
      perf stat -x, -e syscalls:sys_enter_fdatasync -p "$syncing" -o "$work/perf.out" 2>/dev/null &
      perf_pid=$!
    fi
    read -r total0 idle0 < <(cpu_times)
    read -r _ requests non2xx errors rate p50 p99 < <(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" \
      -s "$work/post.lua" "$url/" | grep '^RESULT')
    read -r total1 idle1 < <(cpu_times)
    fsyncs=-
    if [ -n "$perf_pid" ]; then
      kill -INT "$perf_pid" 2>/dev/null || true; wait "$perf_pid" 2>/dev/null || true
      count=$(awk -F, '/fdatasync/{print $1}' "$work/perf.out" 2>/dev/null || true)
      if [[ "$count" =~ ^[0-9]+$ ]]; then fsyncs=$(( count / ${DURATION%s} )); fi
    fi
    idle=$(( 100 * (idle1 - idle0) / (total1 - total0 > 0 ? total1 - total0 : 1) ))
    stopping=$(date +%s%N)
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    exit_ms=$(( ($(date +%s%N) - stopping) / 1000000 ))
    spooled=-
    if [ "$name" = hyper_redis ]; then
      spooled=$(redis-cli -p "$redis_port" xlen comapi-webhook:events)
    elif [ -d "$work/spool-$name" ]; then
      spooled=$(cat "$work/spool-$name"/segment-*.jsonl | wc -l)
    fi
    rates[$name]="${rates[$name]:-} $rate"
    printf '%-24s %5d %10.0f %9.2f %9.2f %8d %8d %10d %10s %8d %6d %9s\n' "$name" "$round" "$rate" "$p50" "$p99" "$non2xx" "$errors" "$requests" "$spooled" "$exit_ms" "$idle" "$fsyncs"
  done
done
echo
for name in "${targets[@]}"; do echo "$name:${rates[$name]}"; done >"$work/rates"
python3 - "$work/rates" <<'PY'
import statistics, sys
rates = {}
for line in open(sys.argv[1]):
    name, values = line.rstrip("\n").split(":")
    rates[name] = [float(r) for r in values.split()]

def rounds(a, b):
    return " ".join(f"{x / y:.2f}" for x, y in zip(a, b))

ceiling = rates.pop("http_ceiling")
base = statistics.median(ceiling)
print(f"{'http_ceiling':<24} median {base:10.0f} req/s")
for name, values in rates.items():
    median = statistics.median(values)
    print(f"{name:<24} median {median:10.0f} req/s  {median / base:.2f}x the HTTP ceiling (per round: {rounds(values, ceiling)})")
if "hyper_redis" in rates:
    ratio = statistics.median(rates["hyper_redis"]) / statistics.median(rates["hyper_receiver"])
    print(f"{'hyper_redis':<24} {ratio:.2f}x hyper_receiver on the spool (per round: {rounds(rates['hyper_redis'], rates['hyper_receiver'])})")
if "hyper_rabbitmq" in rates:
    ratio = statistics.median(rates["hyper_rabbitmq"]) / statistics.median(rates["rabbit_ceiling"])
    print(f"{'hyper_rabbitmq':<24} {ratio:.2f}x the broker's own ceiling, confirmed publishes without HTTP (per round: {rounds(rates['hyper_rabbitmq'], rates['rabbit_ceiling'])})")
    ratio = statistics.median(rates["hyper_rabbitmq"]) / statistics.median(rates["hyper_receiver"])
    print(f"{'hyper_rabbitmq':<24} {ratio:.2f}x hyper_receiver on the spool (per round: {rounds(rates['hyper_rabbitmq'], rates['hyper_receiver'])})")
for name, values in rates.items():
    if "@" in name:
        receiver, rev = name.split("@")
        ratio = statistics.median(rates[receiver]) / statistics.median(values)
        print(f"{receiver:<24} {ratio:.2f}x its build at {rev} (per round: {rounds(rates[receiver], values)})")
PY

echo "(answered = responses wrk counted; spooled may exceed it by the requests in flight when wrk stopped, at most $CONNECTIONS;"
echo " exit_ms = SIGTERM to exit, which includes the worker processing what it had not yet when the load stopped;"
echo " idle% = the machine's CPU left idle or waiting for I/O while wrk ran: near 0 means CPU-bound, more means"
echo " the requests were waiting, for a sync or for each other)"
