#!/usr/bin/env bash
# qsmflow "fast" preset as a QSM-CI end-to-end span: ROMEO + weighted least-squares echo
# combination, LBV background removal, RTS inversion, mean reference, inside the given mask.
# reads $IN/phase.nii.gz (4D, rad), magnitude.nii.gz (4D, optional), mask.nii.gz, params.json
# (TE s, B0 T, B0_dir, voxel_size mm); writes $OUT/chimap.nii.gz (ppm). No network.
# --set applies to the inversion (RTS parameters).
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
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mag=()
if [ -f "$IN/magnitude.nii.gz" ]; then mag=(--magnitude "$IN/magnitude.nii.gz"); fi
"${stage[@]}" combine --method wls --phase "$IN/phase.nii.gz" "${mag[@]}" \
    --mask "$IN/mask.nii.gz" --params "$IN/params.json" -o "$tmp/totalfield.nii.gz"
"${stage[@]}" bfr --method lbv --totalfield "$tmp/totalfield.nii.gz" --mask "$IN/mask.nii.gz" \
    --params "$IN/params.json" -o "$tmp/localfield.nii.gz"
"${stage[@]}" invert --method rts --localfield "$tmp/localfield.nii.gz" \
    --mask "$tmp/localfield_mask.nii.gz" --params "$IN/params.json" "${sets[@]}" \
    -o "$tmp/chi.nii.gz"
"${stage[@]}" reference --method mean --chimap "$tmp/chi.nii.gz" \
    --mask "$tmp/localfield_mask.nii.gz" -o "$OUT/chimap.nii.gz"
