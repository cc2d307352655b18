# Sourced by docker/check.sh and docker/compose-check.sh: the container engine, and stand-ins
# for base images that no registry serves here. Expects `set -euo pipefail`, $tmp (a scratch
# directory the caller deletes) and the functions say and fail.
#
# Engine: `docker` when a Docker engine answers, else podman (apt-get installs podman, buildah
# and runc when missing; that needs root), run with runc and explicit ulimits. When podman
# cannot find an image (no container registry reachable), `stand_in` builds one from Debian
# packages (debootstrap, from the Debian mirror that apt is configured with).

apt_install() {
  [ "$(id -u)" = 0 ] || fail "missing $*: install them (as root: apt-get install $*)"
  say "apt-get install $*"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Sets $engine to docker or podman (and CONTAINERS_CONF for podman).
pick_engine() {
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    engine=docker
  else
    local missing=() tool
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
}

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

# stand_in IMAGE PACKAGES [SETUP] [--change ...]: unless podman has IMAGE, a minimal Debian of
# IMAGE's release (bookworm, trixie or bullseye in its tag, else this machine's) with the
# comma-separated PACKAGES, imported under IMAGE's name. SETUP, when not empty, is a function
# called with the root file system's path before the import; the rest are `podman import
# --change` arguments (ENTRYPOINT, CMD, ENV, ...).
stand_in() {
  local image=$1 packages=$2 setup=${3:-} suite rootfs
  shift 3 || shift $#
  if [ "$engine" != podman ] || podman image exists "$image"; then return 0; fi
  suite=$(sed -nE 's/.*-(bookworm|trixie|bullseye)$/\1/p' <<<"${image##*:}")
  [ -n "$suite" ] || suite=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)
  command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
  say "building a stand-in for $image: Debian $suite minbase + $packages (debootstrap)"
  rootfs="$tmp/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" \
    "$(debian_mirror "$suite")" >"$tmp/debootstrap.log" 2>&1 \
    || { tail -20 "$tmp/debootstrap.log"; fail "debootstrap"; }
  [ -z "$setup" ] || "$setup" "$rootfs"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  # Under the name a registry would give it (docker.io/library/ for an official image), so
  # that a short name in a Dockerfile or compose file finds it.
  local ref=$image
  [[ ${image%%:*} == */* ]] || ref=docker.io/library/$image
  tar -C "$rootfs" -c . | podman import --quiet \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL mlp-lab.stand-in=\"debootstrap $suite minbase, not the official image\"" \
    "$@" - "$ref" >/dev/null
  rm -rf "$rootfs"
  say "stand-in imported as $(podman image inspect --format '{{index .RepoTags 0}}' "$image")"
}

# build_image IMAGE VERSION: build docker/Dockerfile from the repository root (the current
# directory) as IMAGE, with the build arguments the image records about itself. Sets $lock_sha,
# $commit and $image_id.
build_image() {
  local image=$1 version=$2 dirty="" index build_start
  lock_sha=$(sha256sum docker/requirements.lock | cut -d' ' -f1)
  commit=$(git rev-parse HEAD 2>/dev/null || true)
  if [ -n "$commit" ]; then
    if [ -n "$(git status --porcelain)" ]; then dirty=True; else dirty=False; fi
  fi
  local build=(build -f docker/Dockerfile -t "$image"
    --build-arg "VERSION=$version" --build-arg "IMAGE=$image" --build-arg "LOCK_SHA256=$lock_sha"
    --build-arg "GIT_COMMIT=$commit" --build-arg "GIT_DIRTY=$dirty")
  # This machine's pip setup, passed the optional way the Dockerfile allows (build secrets,
  # never baked into a layer): its CA bundle, and its package index when that is an http(s) URL.
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
  # podman 4.3 (buildah 1.28) reuses cached layers of LABEL/ENV lines whose build arguments
  # changed: an image of another commit would pass as this one's. Then build without cache.
  if [ "$($engine image inspect --format '{{index .Config.Labels "org.opencontainers.image.revision"}}' "$image")" != "$commit" ]; then
    say "the build cache gave the labels of another commit: building again without cache"
    $engine "${build[@]}" --no-cache . >"$tmp/build.log" 2>&1 \
      || { tail -40 "$tmp/build.log"; fail "build"; }
  fi
  image_id=$($engine image inspect --format '{{.Id}}' "$image")
  say "built $image (${image_id:0:19}) in $((SECONDS - build_start)) s"
}

# python_stand_in IMAGE: a stand-in for the official python:<minor>-slim-<suite> IMAGE: Python,
# pip and venv from Debian, which must have the same minor version.
python_stand_in() {
  local image=$1
  check_python() {
    local found want
    want=$(sed -E 's/^([0-9]+\.[0-9]+).*/\1/' <<<"${image##*:}")
    found=$(chroot "$1" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$found" = "$want" ] || fail "Debian has Python $found, the base image $image wants $want"
  }
  stand_in "$image" python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    check_python \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]'
}
