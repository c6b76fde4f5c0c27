# Private services for the test runner and the dev stack. Source this file; it defines
# functions and starts nothing by itself.
#
#   pg_start DIR        initdb into DIR/data (once), start postgres on a Unix socket in DIR/run
#   pg_stop DIR
#   registry_start DIR  start docker-registry on a free loopback port, storage in DIR/storage;
#                       prints 127.0.0.1:PORT
#   registry_stop DIR

PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}

# PostgreSQL refuses to run as root, so as root the cluster belongs to the postgres user.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_start() {
  local dir=$1
  mkdir -p "$dir/run"
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$dir" "$dir/run"
  fi
  if [ ! -s "$dir/data/PG_VERSION" ]; then
    as_pg "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 ||
      { cat "$dir/initdb.log" >&2; return 1; }
  fi
  # Unix socket only: no TCP port, so it never collides with a system cluster on 5432.
  as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
    -o "-c listen_addresses='' -c unix_socket_directories='$dir/run' -c max_connections=300 -c fsync=${PG_FSYNC:-on}" \
    start >/dev/null
}

pg_stop() {
  local dir=$1
  if [ -s "$dir/data/postmaster.pid" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

registry_start() {
  local dir=$1 port
  mkdir -p "$dir/storage"
  port=$(free_port)
  cat >"$dir/config.yml" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
YAML
  docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
  echo $! >"$dir/registry.pid"
  for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null 2>&1; then
      echo "127.0.0.1:$port"
      return 0
    fi
    sleep 0.1
  done
  echo "docker-registry did not respond on 127.0.0.1:$port within 10 s; see $dir/registry.log" >&2
  return 1
}

registry_stop() {
  local dir=$1
  if [ -s "$dir/registry.pid" ]; then
    kill "$(cat "$dir/registry.pid")" 2>/dev/null || true
    rm -f "$dir/registry.pid"
  fi
}
