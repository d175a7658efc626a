#!/usr/bin/env bash
# qsmflow MoDIP (model-based deep image prior, training-free) dipole inversion for QSM-CI,
# dipole stage. Uses the GPU when the container gets one (QSMCI_GPU=1), else the CPU.
# reads $IN/localfield.nii.gz (ppm), mask.nii.gz, params.json (B0_dir, voxel_size mm);
# writes $OUT/chimap.nii.gz (ppm, 0 outside the mask) and loss_history.json. No network.
set -euo pipefail
IN="${1:-/input}"
OUT="${2:-/output}"
# qsmflow-stage from the image (or the host with --runner local); QSMFLOW_STAGE overrides it,
# e.g. "python -m qsmflow.cli.stage" for a source checkout.
read -r -a stage <<<"${QSMFLOW_STAGE:-qsmflow-stage}"
# qsm-ci run --set NAME=VALUE arrives as QSMCI_SET_NAME (qsmflow parameter names are lower case)
sets=()
for var in "${!QSMCI_SET_@}"; do
    name="${var#QSMCI_SET_}"
    sets+=(--set "${name,,}=${!var}")
done
"${stage[@]}" invert --method modip --localfield "$IN/localfield.nii.gz" \
    --mask "$IN/mask.nii.gz" --params "$IN/params.json" "${sets[@]}" -o "$OUT/chimap.nii.gz"
