# shellcheck shell=bash
# Shared functions of containers/build.sh and containers/test.sh (source this file).
#
# Everything here is idempotent: a package, a running Docker daemon, the base image or the wheel
# folder that is already there is used as it is, so a second build only rebuilds what changed.

# shellcheck disable=SC2034  # used by the scripts that source this file
CONTAINERS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$CONTAINERS_DIR")"
IMAGE_NAME="${QSMFLOW_IMAGE_NAME:-qsmflow}"
BASE_IMAGE="${QSMFLOW_BASE_IMAGE:-qsmflow-base:bookworm}"
TORCH_VERSION="${QSMFLOW_TORCH_VERSION:-2.13.0}"   # README: pip install torch==2.13.0
WHEEL_DIR="$CONTAINERS_DIR/wheels"
STATE_DIR="${QSMFLOW_CONTAINER_STATE:-/var/tmp/qsmflow-containers}"

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

qsmflow_version() {
    sed -n 's/^__version__ *= *["'"'"']\([^"'"'"']*\)["'"'"'].*/\1/p' "$REPO_DIR/qsmflow/__init__.py"
}

# ensure_apt_packages PKG...: apt-get install the packages that are not installed yet.
ensure_apt_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "apt-get install ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

# ensure_dockerd: use a running Docker daemon, or start Debian's dockerd by hand: no iptables,
# no bridge (containers run with --network none; builds use the host's network), overlay2 when
# the kernel allows it, else vfs.
ensure_dockerd() {
    if docker version >/dev/null 2>&1; then return 0; fi
    command -v dockerd >/dev/null || ensure_apt_packages docker.io
    mkdir -p "$STATE_DIR"
    local driver
    for driver in overlay2 vfs; do
        log "starting dockerd (storage driver $driver)"
        as_root dockerd --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
            --storage-driver="$driver" --pidfile "$STATE_DIR/dockerd.pid" \
            >"$STATE_DIR/dockerd-$driver.log" 2>&1 &
        local i
        for i in $(seq 1 60); do
            if docker version >/dev/null 2>&1; then
                log "dockerd is up ($driver)"
                return 0
            fi
            if ! kill -0 "$!" 2>/dev/null; then break; fi
            sleep 1
        done
        kill "$!" 2>/dev/null || true
        wait "$!" 2>/dev/null || true
        log "dockerd with $driver failed: $(tail -n 2 "$STATE_DIR/dockerd-$driver.log")"
    done
    die "could not start dockerd (logs in $STATE_DIR)"
}

# Debian mirror and release of this machine (the base image is built from the same packages).
debian_mirror() {
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' |
        grep -v security | head -n 1)
    [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -n 1)
    echo "${uri:-http://deb.debian.org/debian}"
}

debian_suite() {
    local suite
    suite=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
    echo "${suite:-bookworm}"
}

# ensure_base_image: Docker Hub is not needed: debootstrap a minimal Debian root file system
# from the machine's Debian mirror and `docker import` it as $BASE_IMAGE.
ensure_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return 0; fi
    command -v debootstrap >/dev/null || ensure_apt_packages debootstrap
    local root suite mirror
    suite=$(debian_suite)
    mirror=$(debian_mirror)
    root=$(mktemp -d "${TMPDIR:-/tmp}/qsmflow-rootfs.XXXXXX")
    log "debootstrap --variant=minbase $suite from $mirror"
    as_root debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.log" 2>&1 ||
        die "debootstrap failed, see $root.log"
    as_root rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    as_root tar -C "$root" -c . | docker import \
        -c 'CMD ["/bin/bash"]' -c 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
    as_root rm -rf "$root" "$root.log"
    log "base image $BASE_IMAGE imported"
}

# ensure_wheels: every wheel the image installs, fetched by this machine's pip (its index, its
# find-links, its CA bundle), for CPython 3.11 on manylinux x86_64 (Debian bookworm's python3).
# The image then installs with --no-index from this folder: the build itself needs no PyPI
# access, no certificates, no credentials. Skipped when setup.cfg and the torch version are
# unchanged since the last fetch.
ensure_wheels() {
    local stamp want platforms=() i req
    want="$(sha256sum "$REPO_DIR/setup.cfg" | cut -c1-16)-torch$TORCH_VERSION"
    stamp="$WHEEL_DIR/.stamp"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
    for i in 36 35 34 33 32 31 30 29 28 27 26 25 24 17 12 5; do
        platforms+=(--platform "manylinux_2_${i}_x86_64")
    done
    req="$(mktemp)"
    "${PYTHON:-python3}" - "$REPO_DIR/setup.cfg" >"$req" <<'PY'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
print(cfg["options"]["install_requires"])
PY
    log "fetching wheels into $WHEEL_DIR (pip's own configuration)"
    "${PYTHON:-python3}" -m pip download --quiet --dest "$WHEEL_DIR" --only-binary=:all: \
        --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}" \
        -r "$req" "torch==$TORCH_VERSION" setuptools wheel ||
        die "pip download failed"
    rm -f "$req"
    echo "$want" >"$stamp"
}
