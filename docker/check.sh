#!/usr/bin/env bash
# Build the mlp-lab image and prove that it trains reproducibly and records its runs:
# two one-epoch runs on the synthetic data set in two containers (no network), into a SQLite
# store on a bind mount; both must be FINISHED in MLflow, with acc/val, the image's tags, and
# the same metric points (mlp-reproduce's comparison). Prints the total time; exits non-zero on any failure.
#
#   docker/check.sh        # the image is tagged mlp-lab:<version>; MLP_LAB_CHECK_IMAGE renames it
#
# Engine, build and the stand-in for the base image when no registry serves it: docker/engine.sh.
set -euo pipefail
SECONDS=0
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
say() { printf '[check %4ds] %s\n' "$SECONDS" "$*"; }
fail() { say "FAILED: $*" >&2; exit 1; }

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
image=${MLP_LAB_CHECK_IMAGE:-mlp-lab:$version}
base=$(awk 'toupper($1) == "FROM" { print $2; exit }' docker/Dockerfile)

# shellcheck source=docker/engine.sh
. docker/engine.sh
pick_engine
python_stand_in "$base"
build_image "$image" "$version"

# -- two one-epoch runs, then the check of what MLflow recorded --------------------------------
work="$tmp/work"
mkdir -m 0777 "$work"
run=(run --rm --network none -v "$work:/work" -w /work -e "MLP_LAB_IMAGE_DIGEST=$image_id")
for i in 1 2; do
  say "training run $i: mlp-train data=synthetic trainer.epochs=1 (in the container)"
  $engine "${run[@]}" "$image" data=synthetic trainer.epochs=1 trainer.progress=false \
    tracking.experiment=docker-check "hydra.run.dir=/work/outputs/run$i" \
    >"$tmp/train$i.log" 2>&1 || { tail -40 "$tmp/train$i.log"; fail "training run $i"; }
done

$engine "${run[@]}" -i -e "EXPECT_IMAGE=$image" -e "EXPECT_LOCK=$lock_sha" \
  -e "EXPECT_COMMIT=$commit" "$image" python3 - <<'PY' || fail "MLflow records"
import os
from mlflow import MlflowClient

from mlp.tracking.reproduce import compare_runs, difference_table

client = MlflowClient("sqlite:////work/mlflow.db")
exp = client.get_experiment_by_name("docker-check")
runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
assert len(runs) == 2, f"expected 2 runs, found {len(runs)}"
expected_tags = {"docker.image": os.environ["EXPECT_IMAGE"],
                 "docker.lock_hash": os.environ["EXPECT_LOCK"],
                 "docker.digest": os.environ["MLP_LAB_IMAGE_DIGEST"],
                 "mlflow.source.git.commit": os.environ["EXPECT_COMMIT"] or None}
for run in runs:
    assert run.info.status == "FINISHED", (run.info.run_id, run.info.status)
    assert "acc/val" in run.data.metrics, sorted(run.data.metrics)
    for tag, value in expected_tags.items():
        assert run.data.tags.get(tag) == value, (tag, run.data.tags.get(tag), value)
# mlp-reproduce's rules: every metric point step by step, timing and system metrics aside.
compared, diffs = compare_runs(client, runs[0].info.run_id, runs[1].info.run_id)
assert not diffs, f"same image, config and seed, different points:\n{difference_table(diffs)}"
m = runs[0].data.metrics
print(f"2 runs FINISHED, {compared} identical metric points (acc/val={m['acc/val']:.4f}, "
      f"acc/test={m['acc/test']:.4f}); tags docker.image={expected_tags['docker.image']} "
      f"docker.lock_hash={expected_tags['docker.lock_hash'][:12]}... "
      f"mlflow.source.git.commit={(expected_tags['mlflow.source.git.commit'] or '-')[:12]}")
PY

size=$($engine image inspect --format '{{.Size}}' "$image")
say "OK: $image ($((size / 1000000)) MB) trains and records reproducibly; total ${SECONDS} s"
