#!/usr/bin/env bash
# Build the mlp-lab image and prove that it trains reproducibly and records its runs:
# two one-epoch runs on the synthetic data set in two containers (no network), into a SQLite
# store on a bind mount; both must be FINISHED in MLflow, with val_acc, the image's tags, and
# the same metrics. Prints the total time; exits non-zero on any failure.
#
#   docker/check.sh        # the image is tagged mlp-lab:<version>; MLP_LAB_CHECK_IMAGE renames it
#
# Engine: `docker` when a Docker engine answers, else podman (apt-get installs podman, buildah
# and runc when missing; that needs root), run with runc and explicit ulimits. When podman
# cannot find the Dockerfile's base image (no container registry reachable), it builds a
# stand-in: a minimal Debian of the same release (debootstrap, from the Debian mirror that apt
# is configured with) with Python, pip and venv, imported under the base image's name.
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
lock_sha=$(sha256sum docker/requirements.lock | cut -d' ' -f1)
commit=$(git rev-parse HEAD 2>/dev/null || true)
dirty=""
if [ -n "$commit" ]; then
  if [ -n "$(git status --porcelain)" ]; then dirty=True; else dirty=False; fi
fi

apt_install() {
  [ "$(id -u)" = 0 ] || fail "missing $*: install them (as root: apt-get install $*)"
  say "apt-get install $*"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# -- the engine -------------------------------------------------------------------------------
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  engine=docker
else
  missing=()
  for tool in podman buildah runc; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
  cat > "$tmp/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
EOF
  export CONTAINERS_CONF="$tmp/containers.conf"
  engine=podman
fi
say "engine: $engine ($($engine --version))"

# -- a stand-in for the base image when no registry has it --------------------------------------
debian_mirror() {  # the first URI apt uses for suite $1 (deb822 .sources, then one-line lists)
  python3 - "$1" <<'PY'
import glob, re, sys
suite = sys.argv[1]
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = dict(re.findall(r"^([\w-]+):\s*(.*)$", stanza, re.M))
        if ("deb" in fields.get("Types", "").split() and suite in fields.get("Suites", "").split()
                and fields.get("Enabled", "yes") != "no" and fields.get("URIs")):
            print(fields["URIs"].split()[0]); sys.exit(0)
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
            print(words[1]); sys.exit(0)
sys.exit(f"no Debian mirror for {suite} in /etc/apt/sources.list(.d)")
PY
}

make_stand_in() {
  local tag=${base##*:} suite python_minor rootfs
  python_minor=$(sed -E 's/^([0-9]+\.[0-9]+).*/\1/' <<<"$tag")
  suite=$(sed -nE 's/.*-(bookworm|trixie|bullseye)$/\1/p' <<<"$tag")
  [ -n "$suite" ] || suite=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)
  command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
  say "building a stand-in for $base: Debian $suite minbase + python3 (debootstrap)"
  rootfs="$tmp/rootfs"
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    "$suite" "$rootfs" "$(debian_mirror "$suite")" >"$tmp/debootstrap.log" 2>&1 \
    || { tail -20 "$tmp/debootstrap.log"; fail "debootstrap"; }
  local found
  found=$(chroot "$rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ "$found" = "$python_minor" ] \
    || fail "Debian $suite has Python $found, the Dockerfile's base $base wants $python_minor"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change "LABEL mlp-lab.stand-in=\"debootstrap $suite minbase, not the official image\"" \
    - "$base" >/dev/null
  say "stand-in imported as $(podman image inspect --format '{{index .RepoTags 0}}' "$base")"
}

if [ "$engine" = podman ] && ! podman image exists "$base"; then
  make_stand_in
fi

# -- build --------------------------------------------------------------------------------------
build=(build -f docker/Dockerfile -t "$image"
  --build-arg "VERSION=$version" --build-arg "IMAGE=$image" --build-arg "LOCK_SHA256=$lock_sha"
  --build-arg "GIT_COMMIT=$commit" --build-arg "GIT_DIRTY=$dirty")
# This machine's pip setup, passed the optional way the Dockerfile allows (build secrets, never
# baked into a layer): its CA bundle, and its package index when that is an http(s) URL.
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
  build+=(--secret "id=ca,src=/etc/ssl/certs/ca-certificates.crt")
fi
index=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
if [[ $index == http* ]]; then
  printf '[global]\nindex-url = %s\n' "$index" > "$tmp/pip.conf"
  build+=(--secret "id=pipconf,src=$tmp/pip.conf")
fi
say "building $image from docker/Dockerfile"
build_start=$SECONDS
$engine "${build[@]}" . >"$tmp/build.log" 2>&1 || { tail -40 "$tmp/build.log"; fail "build"; }
image_id=$($engine image inspect --format '{{.Id}}' "$image")
say "built $image (${image_id:0:19}) in $((SECONDS - build_start)) s"

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
    assert "val_acc" in run.data.metrics, sorted(run.data.metrics)
    for tag, value in expected_tags.items():
        assert run.data.tags.get(tag) == value, (tag, run.data.tags.get(tag), value)
timing = {"epoch_time", "images_per_sec"}
first, second = ({k: v for k, v in r.data.metrics.items() if k not in timing} for r in runs)
differ = sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))
assert not differ, f"same image, config and seed, different metrics: {differ}"
print(f"2 runs FINISHED, identical {len(first)} metrics (val_acc={first['val_acc']:.4f}, "
      f"test_acc={first['test_acc']:.4f}); tags docker.image={expected_tags['docker.image']} "
      f"docker.lock_hash={expected_tags['docker.lock_hash'][:12]}... "
      f"mlflow.source.git.commit={(expected_tags['mlflow.source.git.commit'] or '-')[:12]}")
PY

size=$($engine image inspect --format '{{.Size}}' "$image")
say "OK: $image ($((size / 1000000)) MB) trains and records reproducibly; total ${SECONDS} s"
