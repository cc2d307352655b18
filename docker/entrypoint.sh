#!/bin/sh
# The image's entrypoint. `docker run IMAGE [overrides...]` runs `mlp-train [overrides...]`;
# `docker run IMAGE COMMAND [args...]` runs COMMAND when it is a program on PATH
# (mlp-train -m ..., mlp-gradcheck, mlflow server, python, bash).
set -eu

# The image has no .git: the commit it was built from (build arg GIT_COMMIT) and the thread
# counts become tags of every MLflow run through MLflow's MLFLOW_RUN_CONTEXT (JSON tags).
if [ -z "${MLFLOW_RUN_CONTEXT:-}" ]; then
  threads="OMP_NUM_THREADS=${OMP_NUM_THREADS:-} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-}"
  context=$(printf '"docker.threads": "%s"' "$threads")
  if [ -n "${MLP_LAB_GIT_COMMIT:-}" ]; then
    context=$(printf '%s, "mlflow.source.git.commit": "%s"' "$context" "$MLP_LAB_GIT_COMMIT")
  fi
  if [ -n "${MLP_LAB_GIT_DIRTY:-}" ]; then
    context=$(printf '%s, "mlp.git.dirty": "%s"' "$context" "$MLP_LAB_GIT_DIRTY")
  fi
  MLFLOW_RUN_CONTEXT="{$context}"
  export MLFLOW_RUN_CONTEXT
fi

# A tracking server on a database whose password is the example's placeholder (or empty) is
# refused: docker/.env.example leaves POSTGRES_PASSWORD for the user to set.
placeholder=change-me
case "${MLFLOW_BACKEND_STORE_URI:-}" in
  *://*:"$placeholder"@* | *://*:@*)
    echo "mlp-entrypoint: the database password in MLFLOW_BACKEND_STORE_URI is empty or the" \
      "placeholder '$placeholder': set a real POSTGRES_PASSWORD in docker/.env" \
      "(e.g. openssl rand -hex 24) and start again" >&2
    exit 2 ;;
esac

# The hash of the lock the image was installed from, when the build did not announce it.
if [ -z "${MLP_LAB_LOCK_HASH:-}" ] && [ -r /opt/mlp-lab/requirements.lock ]; then
  MLP_LAB_LOCK_HASH=$(sha256sum /opt/mlp-lab/requirements.lock | cut -d' ' -f1)
  export MLP_LAB_LOCK_HASH
fi

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ] && command -v "$1" >/dev/null 2>&1; then
  exec "$@"
fi
exec mlp-train "$@"
