#!/usr/bin/env bash
# Bring docker/compose.yaml up for real and prove that the team's tracking stack keeps what it
# is sent: PostgreSQL healthy, the MLflow server healthy and published on 127.0.0.1 only, a
# trainer container logging a run to it, the run visible through the server's REST API; then
# the stack down (volumes kept) and up again, and the same run still there. Also: compose
# refuses an empty POSTGRES_PASSWORD. Prints the times; exits non-zero on any failure.
#
#   docker/compose-check.sh          # MLP_LAB_COMPOSE_KEEP=1 leaves the stack's volumes
#
# It runs as its own compose project (mlp-lab-check) with a generated env file (a random
# password), so a developer's docker/.env and volumes are not touched. Engine: `docker
# compose` when a Docker engine answers, else podman with podman-compose (from PyPI, into a
# scratch venv, when not on PATH). Images no registry serves here are stood in for from Debian
# packages (docker/engine.sh): python (the mlp-lab image's base) and postgres (PostgreSQL 15
# with docker/stand-in/postgres-entrypoint.sh).
set -euo pipefail
SECONDS=0
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
tmp=$(mktemp -d)
cleanup() {
  if [ -s "$tmp/compose.env" ]; then
    if [ "${MLP_LAB_COMPOSE_KEEP:-}" = 1 ]; then
      run_compose down >/dev/null 2>&1 || true
    else
      run_compose down -v >/dev/null 2>&1 || true
    fi
    # The anonymous volumes of the image's VOLUMEs (/data, /runs of the mlflow service), which
    # podman-compose's `down -v` leaves behind; they hold nothing of the stack's.
    if [ -s "$tmp/anonymous" ]; then
      sort -u "$tmp/anonymous" | xargs -r "$engine" volume rm >/dev/null 2>&1 || true
    fi
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
project=mlp-lab-check
say() { printf '[compose-check %4ds] %s\n' "$SECONDS" "$*"; }
fail() { say "FAILED: $*" >&2; exit 1; }
# shellcheck source=docker/engine.sh
. docker/engine.sh

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
image=mlp-lab:$version
pick_engine
if [ "$engine" = docker ]; then
  compose=(docker compose)
elif command -v podman-compose >/dev/null 2>&1; then
  compose=(podman-compose)
else
  say "pip install podman-compose (scratch venv)"
  python3 -m venv "$tmp/podman-compose"
  "$tmp/podman-compose/bin/pip" install --quiet 'podman-compose>=1.1,<2' >"$tmp/pip.log" 2>&1 \
    || { cat "$tmp/pip.log"; fail "pip install podman-compose"; }
  compose=("$tmp/podman-compose/bin/podman-compose")
fi
say "compose: $("${compose[@]}" version 2>/dev/null | head -1)"

# -- images ------------------------------------------------------------------------------------
postgres_image=$(awk '/^  postgres:/ { inside = 1 } inside && $1 == "image:" { print $2; exit }' \
  docker/compose.yaml)
postgres_major=${postgres_image#*:}
postgres_major=${postgres_major%%[-.]*}
postgres_setup() {
  install -m 0755 docker/stand-in/postgres-entrypoint.sh "$1/usr/local/bin/docker-entrypoint.sh"
}
stand_in "$postgres_image" "postgresql-$postgres_major" postgres_setup \
  --change "ENV PATH=/usr/lib/postgresql/$postgres_major/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  --change 'ENV PGDATA=/var/lib/postgresql/data' \
  --change 'ENTRYPOINT ["docker-entrypoint.sh"]' \
  --change 'CMD ["postgres"]' \
  --change 'STOPSIGNAL SIGINT'
stand_in_base=$(awk 'toupper($1) == "FROM" { print $2; exit }' docker/Dockerfile)
python_stand_in "$stand_in_base"
build_image "$image" "$version"  # from the build cache when nothing changed

# -- the env file: compose's secrets and settings ------------------------------------------------
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
password=$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')
sed -e "s/^POSTGRES_PASSWORD=.*/POSTGRES_PASSWORD=$password/" -e "s/^MLFLOW_PORT=.*/MLFLOW_PORT=$port/" \
  docker/.env.example > "$tmp/compose.env"
run_compose() { "${compose[@]}" --env-file "$tmp/compose.env" -p "$project" -f docker/compose.yaml "$@"; }

# compose itself refuses the example's empty password.
if "${compose[@]}" --env-file docker/.env.example -p "$project" -f docker/compose.yaml config \
    >"$tmp/refused.log" 2>&1; then
  fail "compose accepted docker/.env.example's empty POSTGRES_PASSWORD"
fi
grep -q "set POSTGRES_PASSWORD in docker/.env" "$tmp/refused.log" \
  || { cat "$tmp/refused.log"; fail "compose refused the empty password without saying why"; }
say "compose refuses an empty POSTGRES_PASSWORD: $(grep -o 'set POSTGRES_PASSWORD[^"]*' "$tmp/refused.log" | head -1)"

run_compose down -v >/dev/null 2>&1 || true  # what an earlier, failed check left

container_of() {  # the container of service $1 in this project
  $engine ps --all --filter "label=com.docker.compose.project=$project" \
    --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -1
}
wait_healthy() {  # service...: run their healthchecks until each passes (podman runs no timer
  local service name deadline=$((SECONDS + 300))  # for them without systemd), at most 300 s
  for service in "$@"; do
    while :; do
      name=$(container_of "$service")
      if [ -n "$name" ]; then
        if [ "$engine" = podman ]; then
          podman healthcheck run "$name" >/dev/null 2>&1 && break
        else
          [ "$(docker inspect --format '{{.State.Health.Status}}' "$name")" = healthy ] && break
        fi
      fi
      [ "$SECONDS" -lt "$deadline" ] || { run_compose logs "$service" | tail -30; fail "$service not healthy"; }
      sleep 2
    done
    say "$service healthy ($name)"
    $engine inspect --format '{{range .Mounts}}{{.Name}}{{"\n"}}{{end}}' "$name" \
      | grep -E '^[0-9a-f]{64}$' >> "$tmp/anonymous" || true
  done
}

up() {
  local start=$SECONDS
  run_compose up -d postgres >"$tmp/up.log" 2>&1 || { tail -30 "$tmp/up.log"; fail "up postgres"; }
  wait_healthy postgres
  run_compose up -d mlflow >>"$tmp/up.log" 2>&1 || { tail -30 "$tmp/up.log"; fail "up mlflow"; }
  wait_healthy mlflow
  say "stack up in $((SECONDS - start)) s"
}

rest() {  # rest EXPERIMENT: the experiment's runs through the REST API, as JSON on stdout
  python3 - "http://127.0.0.1:$port" "$1" <<'PY'
import json, sys, urllib.parse, urllib.request
url, name = sys.argv[1], sys.argv[2]
api = f"{url}/api/2.0/mlflow"
with urllib.request.urlopen(f"{api}/experiments/get-by-name?"
                            + urllib.parse.urlencode({"experiment_name": name}), timeout=30) as r:
    experiment_id = json.load(r)["experiment"]["experiment_id"]
request = urllib.request.Request(f"{api}/runs/search", method="POST",
                                 data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=30) as r:
    runs = json.load(r).get("runs", [])

def artifacts(run_id, path=""):  # every file of the run: path -> size, through the server
    query = urllib.parse.urlencode({"run_id": run_id, "path": path})
    with urllib.request.urlopen(f"{api}/artifacts/list?{query}", timeout=30) as r:
        files = json.load(r).get("files", [])
    found = {}
    for f in files:
        found |= artifacts(run_id, f["path"]) if f["is_dir"] else {f["path"]: f["file_size"]}
    return found

print(json.dumps(sorted(
    [{"run_id": run["info"]["run_id"], "status": run["info"]["status"],
      "metrics": {m["key"]: m["value"] for m in run["data"].get("metrics", [])},
      "artifacts": artifacts(run["info"]["run_id"])}
     for run in runs], key=lambda run: run["run_id"])))
PY
}

# -- up, train, read back ----------------------------------------------------------------------------
up
mlflow_name=$(container_of mlflow)
published=$($engine port "$mlflow_name")
say "mlflow publishes: $published"
[ "$published" = "5000/tcp -> 127.0.0.1:$port" ] \
  || fail "the MLflow server is published as '$published', not on 127.0.0.1:$port only"

say "training: compose run --rm trainer data=synthetic trainer.epochs=2"
train_start=$SECONDS
run_compose --profile train run --rm trainer data=synthetic trainer.epochs=2 \
  trainer.progress=false tracking.experiment=compose-check >"$tmp/train.log" 2>&1 \
  || { tail -40 "$tmp/train.log"; fail "the training container"; }
say "trained in $((SECONDS - train_start)) s"
before=$(rest compose-check)
python3 - "$before" <<'PY' || fail "the run through the REST API"
import json, sys
runs = json.loads(sys.argv[1])
assert len(runs) == 1 and runs[0]["status"] == "FINISHED", runs
assert len(runs[0]["metrics"]) > 5, runs[0]["metrics"]
assert any(path.endswith(".png") for path in runs[0]["artifacts"]), runs[0]["artifacts"]
print(f"REST API: run {runs[0]['run_id']} FINISHED with {len(runs[0]['metrics'])} metrics "
      f"and {len(runs[0]['artifacts'])} artifacts")
PY

# -- down (volumes kept), up again: the run is still there ---------------------------------------------
say "down (volumes kept)"
run_compose down >/dev/null 2>&1 || fail "down"
[ -z "$(container_of mlflow)" ] || fail "containers left after down"
up
after=$(rest compose-check)
[ "$after" = "$before" ] || fail "after the restart the server returned another record: $after"
say "durable: after down and up the server returns the same run, status, metrics and artifacts"
say "OK: compose stack healthy on 127.0.0.1:$port, run logged and kept across a restart; total ${SECONDS} s"
