#!/usr/bin/env bash
# Drain benchmark (not a test): how fast workers empty a backlog, beside how fast the
# receivers fill it, in one run.
#
# Each case stores EVENTS distinct events through a real hyper_receiver with no worker
# running (signed batches of 100, eight requests at a time: that rate is printed as the
# receivers' ingest rate), stops the receiver, then starts the workers and times them to
# the last event handled:
#   spool        the spool's worker (the receiver's in-process worker, in-memory gate)
#   redis x1     one `drain work` process on a Redis stream (AOF, appendfsync always)
#   redis x2     two of them on the same stream
#   rabbit x1    one `drain work` process on a RabbitMQ quorum queue (a throwaway node)
# each with a handler that does nothing (noop) and one that awaits 5 ms (5ms), at the
# default concurrency (COMAPI_CONCURRENCY to change it). A third word `fail` makes 1 %
# of the events (every 100th, the first included) fail always, `fail1` the first
# event alone, with the default retry policy: drained/s then counts the healthy
# events, to the last one handled, and the summary gives its ratio to the same case
# without failures. Cases take turns for ROUNDS rounds;
# the summary gives each case's median events/s and its ratio to the ingest rate.
#
#   scripts/drain.sh                  # EVENTS=20000 ROUNDS=3
#   EVENTS=50000 ROUNDS=5 COMAPI_CONCURRENCY=64 scripts/drain.sh
#   CASES="spool noop,spool noop fail" scripts/drain.sh
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS=${EVENTS:-20000}
ROUNDS=${ROUNDS:-3}
SECRET=drain-benchmark-secret-0123456789
export COMAPI_WEBHOOK_SECRET=$SECRET RUST_LOG=warn

command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install redis-server" >&2; exit 1; }
cargo build --release --features binaries,redis,rabbitmq,actix --bins --examples --quiet
bin=target/release/examples

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ -n "${redis_pid:-}" ]; then kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
  if declare -F rabbit_node_stop >/dev/null; then rabbit_node_stop; fi
  rm -rf "$work"
}
trap cleanup EXIT

redis_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$work/redis"
redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly yes --appendfsync always \
  --dir "$work/redis" --logfile "$work/redis/redis.log" &
redis_pid=$!
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis_url="redis://127.0.0.1:$redis_port/"

# fill STORE: a hyper_receiver without a worker, into the spool folder or Redis named
# by the environment; prints the ingest rate (events/s).
fill() {
  rm -f "$work/receiver.out"
  COMAPI_WORKER=false PORT=0 target/release/hyper_receiver >"$work/receiver.out" 2>"$work/receiver.err" &
  local pid=$!
  pids+=("$pid")
  local url=
  for _ in $(seq 100); do
    url=$(grep -o 'http://[0-9.:]*' "$work/receiver.out" 2>/dev/null || true)
    [ -n "$url" ] && break
    sleep 0.1
  done
  [ -n "$url" ] || { echo "the receiver did not start" >&2; cat "$work/receiver.err" >&2; exit 1; }
  "$bin/drain" store "$url/" "$EVENTS" | awk '{print $(NF-1)}'
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
}

# drain WORKERS EVENTS: that many `drain work` processes at once, until EVENTS were
# handled; prints events/s over all of them (the events they handled, over the
# slowest one's time to its last event).
drain() {
  local n=$1 events=$2 i
  local started=()
  for i in $(seq "$n"); do
    "$bin/drain" work "$events" >"$work/drain-$i.out" 2>"$work/drain-$i.err" &
    started+=($!)
  done
  for pid in "${started[@]}"; do wait "$pid" || { cat "$work"/drain-*.err >&2; exit 1; }; done
  cat "$work"/drain-*.out | python3 -c '
import re, sys
counts, times = 0, []
for line in sys.stdin:
    m = re.match(r"handled (\d+) events in ([\d.]+)(\w+):", line)
    scale = {"s": 1, "ms": 1e-3, "µs": 1e-6}[m.group(3)]
    counts += int(m.group(1)); times.append(float(m.group(2)) * scale)
print(f"{counts / max(times):.0f}")'
  rm -f "$work"/drain-*.out "$work"/drain-*.err
}

cases=("spool noop" "spool 5ms" "redis-x1 noop" "redis-x2 noop" "redis-x1 5ms" "redis-x2 5ms"
  "rabbit-x1 noop" "spool noop fail1" "redis-x1 noop fail1" "rabbit-x1 noop fail1"
  "spool noop fail" "redis-x1 noop fail" "rabbit-x1 noop fail")
if [ -n "${CASES:-}" ]; then IFS=, read -r -a cases <<<"$CASES"; fi
if printf '%s\n' "${cases[@]}" | grep -q '^rabbit'; then
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || { echo "rabbitmq-server is missing: apt-get install rabbitmq-server" >&2; exit 1; }
  # shellcheck source=scripts/rabbit-node.sh
  . scripts/rabbit-node.sh
  rabbit_node_start "$work/rabbit"
fi
declare -A rates ingest
printf '%-19s %5s %12s %12s\n' case round ingest/s drained/s
for round in $(seq "$ROUNDS"); do
  for case in "${cases[@]}"; do
    read -r store handler failing <<<"$case"
    workers=1
    if [ "$store" = redis-x2 ]; then workers=2; fi
    case $handler in noop) export DRAIN_HANDLER_MS=0 ;; 5ms) export DRAIN_HANDLER_MS=5 ;; esac
    unset COMAPI_REDIS_URL COMAPI_SPOOL_DIR COMAPI_AMQP_URL COMAPI_AMQP_QUEUE DRAIN_FAIL_EVERY
    healthy=$EVENTS
    case ${failing:-} in
      fail) export DRAIN_FAIL_EVERY=100; healthy=$((EVENTS - (EVENTS + 99) / 100)) ;;
      fail1) export DRAIN_FAIL_EVERY=$EVENTS; healthy=$((EVENTS - 1)) ;;
    esac
    case $store in
      spool)
        rm -rf "$work/spool"
        export COMAPI_SPOOL_DIR="$work/spool" ;;
      rabbit*)
        export COMAPI_AMQP_URL=$RABBIT_URL COMAPI_AMQP_QUEUE="drain.$round.$RANDOM" ;;
      *)
        redis-cli -p "$redis_port" flushall >/dev/null
        export COMAPI_REDIS_URL=$redis_url ;;
    esac
    stored=$(fill)
    drained=$(drain "$workers" "$healthy")
    kind=${store%%-*}
    ingest[$kind]="${ingest[$kind]:-} $stored"
    rates[$case]="${rates[$case]:-} $drained"
    printf '%-19s %5d %12.0f %12.0f\n' "$case" "$round" "$stored" "$drained"
  done
done
echo
{
  echo "ingest spool:${ingest[spool]:-}"
  echo "ingest redis:${ingest[redis]:-}"
  echo "ingest rabbit:${ingest[rabbit]:-}"
  for case in "${cases[@]}"; do echo "$case:${rates[$case]}"; done
} >"$work/rates"
python3 - "$work/rates" "$EVENTS" <<'PY'
import statistics, sys
ingest, drained = {}, {}
for line in open(sys.argv[1]).read().splitlines():
    name, values = line.split(":")
    values = [float(x) for x in values.split()]
    if not values:
        continue
    if name.startswith("ingest "):
        ingest[name.split()[1]] = values
    else:
        drained[name] = values
def show(values):
    return " ".join(f"{v:.0f}" for v in values)
for kind, values in ingest.items():
    print(f"{'ingest ' + kind:<16} median {statistics.median(values):8.0f} events/s  (rounds: {show(values)}): hyper_receiver storing")
for name, values in drained.items():
    base = statistics.median(ingest[name.split("-")[0].split()[0]])
    median = statistics.median(values)
    line = f"{name:<19} median {median:8.0f} events/s  {median / base:.2f}x its store's ingest"
    clean = name.removesuffix(" fail").removesuffix(" fail1")
    if clean != name and clean in drained:
        ratios = [f / c for f, c in zip(values, drained[clean])]
        line += f", {statistics.median(ratios):.2f}x clean (rounds: {' '.join(f'{r:.2f}' for r in ratios)})"
    print(f"{line}  (rounds: {show(values)})")
print(f"({sys.argv[2]} events a case; drained/s counts to the last event handled)")
PY
