# Sourced by scripts/check.sh and scripts/loadtest.sh: a throwaway RabbitMQ node,
# Debian's rabbitmq-server without a service manager (its own HOME and cookie, free
# loopback ports, its folders under DIR).
#
#   rabbit_node_start DIR [management]
#                           starts it, waits until it speaks AMQP, sets RABBIT_URL;
#                           with `management`, also its management API (statistics
#                           sampled every 500 ms), sets RABBIT_MANAGEMENT_URL
#   rabbit_node_stop        stops it and its epmd, never failing

rabbit_free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

rabbit_node_start() {
  RABBIT_DIR=$1
  RABBIT_PORT=$(rabbit_free_port)
  RABBIT_EPMD_PORT=$(rabbit_free_port)
  RABBIT_DIST_PORT=$(rabbit_free_port)
  mkdir -p "$RABBIT_DIR"
  printf 'NODE%s' "$$" > "$RABBIT_DIR/.erlang.cookie"
  chmod 400 "$RABBIT_DIR/.erlang.cookie"
  echo 'log.console = false' > "$RABBIT_DIR/rabbitmq.conf"
  RABBIT_MANAGEMENT_URL=
  if [ "${2:-}" = management ]; then
    local management_port
    management_port=$(rabbit_free_port)
    echo '[rabbitmq_management].' > "$RABBIT_DIR/enabled_plugins"
    printf 'management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = %s\ncollect_statistics_interval = 500\n' \
      "$management_port" >> "$RABBIT_DIR/rabbitmq.conf"
    RABBIT_MANAGEMENT_URL="http://127.0.0.1:$management_port"
  else
    echo '[].' > "$RABBIT_DIR/enabled_plugins"
  fi
  HOME=$RABBIT_DIR RABBITMQ_NODENAME="node$RABBIT_PORT@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT=$RABBIT_PORT RABBITMQ_DIST_PORT=$RABBIT_DIST_PORT ERL_EPMD_PORT=$RABBIT_EPMD_PORT \
    ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    RABBITMQ_MNESIA_BASE="$RABBIT_DIR/mnesia" RABBITMQ_LOG_BASE="$RABBIT_DIR/log" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$RABBIT_DIR/enabled_plugins" RABBITMQ_CONFIG_FILE="$RABBIT_DIR/rabbitmq.conf" \
    setsid /usr/lib/rabbitmq/bin/rabbitmq-server >"$RABBIT_DIR/server.out" 2>&1 &
  RABBIT_PID=$!
  for _ in $(seq 600); do
    python3 -c "import socket,sys; s=socket.create_connection(('127.0.0.1',$RABBIT_PORT),1); s.sendall(b'AMQP\x00\x00\x09\x01'); sys.exit(0 if s.recv(1)==b'\x01' else 1)" 2>/dev/null && break
    sleep 0.2
  done
  if [ -n "$RABBIT_MANAGEMENT_URL" ]; then
    for _ in $(seq 300); do
      python3 -c "import urllib.request; urllib.request.urlopen('$RABBIT_MANAGEMENT_URL/api/overview', timeout=1)" 2>&1 |
        grep -q 'HTTP Error 401' && break
      sleep 0.2
    done
  fi
  RABBIT_URL="amqp://guest:guest@127.0.0.1:$RABBIT_PORT/%2f"
  rabbit_node_on_loopback
}

# Fails, naming the port, when the node or its epmd listens anywhere but on loopback
# (anyone who reaches the distribution port with the cookie runs code on the node).
rabbit_node_on_loopback() {
  command -v ss >/dev/null || return 0
  local port listening
  for port in "$RABBIT_PORT" "$RABBIT_DIST_PORT" "$RABBIT_EPMD_PORT"; do
    listening=$(ss -Hltn "sport = :$port" | awk '{print $4}')
    if [ -z "$listening" ] || echo "$listening" | grep -qvE '^(127\.0\.0\.1|\[::1\]):'; then
      echo "rabbit-node: port $port listens on ${listening:-nothing}, not on loopback alone" >&2
      return 1
    fi
  done
}

rabbit_node_stop() {
  [ -n "${RABBIT_PID:-}" ] || return 0
  # The shell's kill with `--`: the whole session setsid started.
  kill -TERM -- "-$RABBIT_PID" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$RABBIT_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$RABBIT_PID" 2>/dev/null || true
  # epmd refuses -kill while the node is still registered, for a moment after its death.
  for _ in $(seq 100); do
    epmd -port "$RABBIT_EPMD_PORT" -kill 2>/dev/null | grep -q Killed && break
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $RABBIT_EPMD_PORT), 1)" 2>/dev/null || break
    sleep 0.1
  done
  rm -rf "$RABBIT_DIR" 2>/dev/null || true
  RABBIT_PID=
}
