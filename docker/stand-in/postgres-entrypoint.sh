#!/bin/sh
# The entrypoint of docker/compose-check.sh's stand-in for the official postgres image (used
# only where no registry serves that image): the same contract for what compose.yaml uses.
# On first start (empty $PGDATA) it creates the cluster with superuser $POSTGRES_USER, password
# $POSTGRES_PASSWORD (scram-sha-256 over TCP) and database $POSTGRES_DB; then it runs
# `postgres` listening on all of the container's addresses.
set -eu
PGDATA=${PGDATA:-/var/lib/postgresql/data}
case "${1:-postgres}" in
  postgres) [ "$#" -gt 0 ] && shift ;;
  -*) ;;
  *) exec "$@" ;;  # another command (psql, bash, ...): as the official image does
esac
if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /run/postgresql
  chown -R postgres:postgres "$PGDATA" /run/postgresql
  chmod 0700 "$PGDATA"
  # setpriv execs (runuser would stay as PID 1 and not pass the stop signal on).
  exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$0" "$@"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  : "${POSTGRES_PASSWORD:?the postgres stand-in needs POSTGRES_PASSWORD}"
  user=${POSTGRES_USER:-postgres}
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" --auth-local=trust \
    --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  if [ "${POSTGRES_DB:-$user}" != postgres ]; then
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    createdb -U "$user" "${POSTGRES_DB:-$user}"
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  fi
  echo "stand-in: created the cluster in $PGDATA (user $user, database ${POSTGRES_DB:-$user})"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
