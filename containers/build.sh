#!/usr/bin/env bash
# Build the qsmflow container images on this machine.
#
#   containers/build.sh            CPU image  qsmflow:<version> and qsmflow:latest
#   containers/build.sh --cuda     also the CUDA image qsmflow:<version>-cuda (needs PyPI's CUDA torch)
#   containers/build.sh --apptainer  also qsmflow-<version>.sif from the CPU image (needs apptainer)
#
# Needs root (or sudo) for apt-get, dockerd and debootstrap when they are not there yet. Docker
# Hub is not needed: the base image is debootstrapped from this machine's Debian mirror; the
# wheels are fetched by this machine's pip (its index and CA bundle) into containers/wheels and
# the image installs from there without network. Layers are cached: a rebuild after a source
# change only reinstalls qsmflow (seconds).
set -euo pipefail
# shellcheck source=containers/lib.sh
. "$(dirname "$0")/lib.sh"

cuda=0
apptainer=0
for arg in "$@"; do
    case "$arg" in
        --cuda) cuda=1 ;;
        --apptainer) apptainer=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) die "unknown option $arg" ;;
    esac
done

mkdir -p "$STATE_DIR"
version=$(qsmflow_version)
[ -n "$version" ] || die "no __version__ in qsmflow/__init__.py"
ensure_apt_packages docker.io debootstrap
ensure_dockerd
ensure_base_image
ensure_wheels

# The legacy builder: Debian's docker.io has no buildx; --network host lets apt-get in the
# base stage reach the Debian mirror without a bridge.
build() {  # build DOCKERFILE TAG [extra docker build args]
    local dockerfile=$1 tag=$2
    shift 2
    local build_log
    build_log="$STATE_DIR/build-$(basename "$dockerfile").log"
    log "docker build -f $dockerfile -t $tag (log: $build_log)"
    DOCKER_BUILDKIT=0 nice -n 10 docker build --network host \
        -f "$dockerfile" -t "$tag" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg QSMFLOW_VERSION="$version" \
        --build-arg TORCH_VERSION="$TORCH_VERSION" \
        "$@" "$REPO_DIR" >"$build_log" 2>&1 ||
        { tail -n 40 "$build_log" >&2; die "docker build of $tag failed"; }
}

start=$(date +%s)
build "$CONTAINERS_DIR/Dockerfile" "$IMAGE_NAME:$version" --build-arg PIP_NO_INDEX=1
docker tag "$IMAGE_NAME:$version" "$IMAGE_NAME:latest"
log "built $IMAGE_NAME:$version in $(( $(date +%s) - start )) s," \
    "$(docker image inspect -f '{{.Size}}' "$IMAGE_NAME:$version" | awk '{printf "%.2f GB", $1/1e9}')"

if [ "$cuda" = 1 ]; then
    # PyPI's torch wheels are the CUDA builds; they come with their NVIDIA libraries.
    build "$CONTAINERS_DIR/Dockerfile.cuda" "$IMAGE_NAME:$version-cuda"
fi
if [ "$apptainer" = 1 ]; then
    # Apptainer >= 1.2 (build arguments); Bootstrap docker-daemon reads the image just built
    command -v apptainer >/dev/null || die "apptainer is not installed"
    (cd "$REPO_DIR" && apptainer build --force --build-arg "TAG=$version" \
        "$IMAGE_NAME-$version.sif" containers/qsmflow.def)
fi
