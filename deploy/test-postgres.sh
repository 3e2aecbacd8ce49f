#!/usr/bin/env bash
# Run a command (the test suite) against PostgreSQL: usage `bash deploy/test-postgres.sh CMD ARGS...`.
#
# With FPENODE_TEST_POSTGRES_URL set, CMD runs against that server unchanged. Without it, a
# throw-away cluster of the installed server is made for CMD alone: initdb into a temporary
# folder, pg_ctl start on a free port listening on 127.0.0.1 only (trust authentication, the
# socket in that folder), a database fpenode_test, FPENODE_TEST_POSTGRES_URL exported to CMD;
# when CMD ends (success, failure, Ctrl-C, TERM) the cluster is stopped and its folder removed.
# As root the server runs as the `postgres` system user, which owns the folder (initdb refuses
# root). The machine's own clusters (pg_lsclusters) are never touched.
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi
if [ -n "${FPENODE_TEST_POSTGRES_URL:-}" ]; then
  exec "$@"
fi

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  echo "test-postgres: no PostgreSQL server under /usr/lib/postgresql/*/bin (install 'postgresql')" >&2
  exit 1
fi

as_server=()
if [ "$(id -u)" -eq 0 ]; then
  as_server=(runuser -u postgres --)
fi

folder=$(mktemp -d "${TMPDIR:-/tmp}/fpenode-pgtest.XXXXXX")
chmod 700 "$folder"
if [ "${#as_server[@]}" -gt 0 ]; then
  chown postgres: "$folder"
fi

stop_cluster() {
  if [ -f "$folder/data/postmaster.pid" ]; then
    "${as_server[@]}" "$bindir/pg_ctl" -D "$folder/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$folder"
}
trap stop_cluster EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"${as_server[@]}" "$bindir/initdb" -D "$folder/data" -U fpenode --auth=trust --encoding=UTF8 --no-locale \
  --no-sync >"$folder/initdb.log" 2>&1 || { cat "$folder/initdb.log" >&2; exit 1; }
# Throw-away data: no fsync; loopback only; the socket stays in the folder.
"${as_server[@]}" "$bindir/pg_ctl" -D "$folder/data" -l "$folder/server.log" -w -t 60 \
  -o "-p $port -c listen_addresses=127.0.0.1 -k $folder -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
  start >/dev/null || { cat "$folder/server.log" >&2; exit 1; }
"${as_server[@]}" "$bindir/createdb" -h 127.0.0.1 -p "$port" -U fpenode fpenode_test

export FPENODE_TEST_POSTGRES_URL="postgresql+psycopg://fpenode:fpenode@127.0.0.1:$port/fpenode_test"
echo "test-postgres: throw-away PostgreSQL $(basename "$(dirname "$bindir")") on 127.0.0.1:$port ($folder)" >&2
status=0
"$@" || status=$?
exit "$status"
