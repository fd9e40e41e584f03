#!/bin/sh
# The published postgres image's start-up, for infra/podman/postgres.Dockerfile: on an empty data
# folder, initdb with POSTGRES_USER (password POSTGRES_PASSWORD, scram-sha-256 over the network),
# create POSTGRES_DB and run /docker-entrypoint-initdb.d/*.sql; then run the server as `postgres`.
# The password goes to initdb through a file removed at once; it is never echoed.
set -eu
: "${POSTGRES_USER:?set POSTGRES_USER}" "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
db=${POSTGRES_DB:-$POSTGRES_USER}
as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
mkdir -p "$PGDATA" /run/postgresql
chown postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  chown postgres "$pwfile"
  as_pg initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust \
    --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  as_pg pg_ctl --wait --silent -o "-c listen_addresses=''" start
  if [ "$db" != postgres ]; then
    as_pg psql -v ON_ERROR_STOP=1 -q -U "$POSTGRES_USER" -d postgres -c "CREATE DATABASE \"$db\""
  fi
  for f in /docker-entrypoint-initdb.d/*.sql; do
    [ -e "$f" ] || continue
    echo "running $f"
    as_pg psql -v ON_ERROR_STOP=1 -q -U "$POSTGRES_USER" -d "$db" -f "$f"
  done
  as_pg pg_ctl --wait --silent -m fast stop
  echo "database initialised: user $POSTGRES_USER, database $db"
fi
if [ "$1" = postgres ]; then
  shift
  exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -c listen_addresses='*' "$@"
fi
exec "$@"
