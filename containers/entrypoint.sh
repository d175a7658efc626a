#!/bin/sh
# Container entry point: the BIDS-App `qsmflow` (docker run IMAGE bids_dir output_dir participant),
# or any other command of the image named first (qsmflow-stage, qsmflow-demo, qsmflow-convert,
# python, bash: `docker run IMAGE qsmflow-stage invert ...`).
case "$1" in
    */*|"") ;;
    *) if command -v "$1" >/dev/null 2>&1; then exec "$@"; fi ;;
esac
exec qsmflow "$@"
