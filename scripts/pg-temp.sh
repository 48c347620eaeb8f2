#!/usr/bin/env bash
# A throw-away PostgreSQL cluster on a free loopback port, for tests.
#   pg-temp.sh start DIR   -> initdb + start in DIR, prints postgres://postgres@127.0.0.1:PORT/postgres
#   pg-temp.sh stop DIR    -> stops it and removes DIR
# Runs the server as the 'postgres' user when invoked as root (initdb refuses root).
set -euo pipefail
cmd=${1:?start|stop}
dir=${2:?directory}

bin=""
for d in $(command -v pg_ctl 2>/dev/null | xargs -r dirname) /usr/lib/postgresql/*/bin; do
  if [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ]; then bin=$d; break; fi
done
if [ -z "$bin" ]; then
  echo "pg-temp: PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql" >&2
  exit 3
fi

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# initdb refuses to run as root: as root, run PostgreSQL as 'postgres' (created if missing).
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin postgres
fi

case "$cmd" in
start)
  rm -rf "$dir"; mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$dir"; fi
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null \
    || { cat "$dir/server.log" >&2; exit 1; }
  echo "postgres://postgres@127.0.0.1:$port/postgres"
  ;;
stop)
  if [ -d "$dir/data" ]; then as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true; fi
  rm -rf "$dir"
  ;;
*) echo "usage: pg-temp.sh start|stop DIR" >&2; exit 2 ;;
esac
