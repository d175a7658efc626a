"""Wall time, peak memory and size of the per-subject QC report (one run) at 96^3 and 160^3.

Usage::

    python benchmarks/bench_report.py                 # 96 and 160 -> prints a Markdown table
    python benchmarks/bench_report.py --size 96       # one size

Inputs are the simulated head of :mod:`qsmflow.sims.bids` (4 echoes, 3 T, adult-sized head in a
160 mm field of view) with its true chi, fields and masks standing in for a run's results (the
report's cost does not depend on how good they are).  Every case runs in its own process, so
its peak resident memory (``ru_maxrss``) is its own; the times split the report into its
parts: loading plus the data-consistency residual (one padded FFT dipole convolution), the
figures (matplotlib, Agg), the regional table and writing the HTML.  The ``dip`` case adds the
ensemble std map and a 3 x 400-iteration loss curve.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _inputs(root: Path, size: int) -> dict:
    import nibabel as nib

    from qsmflow.sims.bids import read_bids_megre, truth_paths, write_bids_dataset

    vox = 160.0 / size
    bids = write_bids_dataset(
        root / "bids", subjects=("1",), shape=(size,) * 3, voxel_size=(vox,) * 3, phase_as_int=False
    )
    t = truth_paths(bids, "1")
    d = read_bids_megre(bids, "1")
    aff = d["affine"]
    files = {}
    for name, arr in (("phase", d["phase"]), ("magnitude", d["magnitude"])):
        files[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr.astype(np.float32), aff), files[name])
    chi = np.asarray(nib.load(t["Chimap"]).dataobj, dtype=np.float32)
    brain = np.asarray(nib.load(t["desc-brain_mask"]).dataobj) > 0
    from scipy import ndimage

    mask = ndimage.binary_erosion(brain, iterations=2)
    for name, arr in (
        ("chi", np.where(mask, chi, 0)),
        ("mask", mask.astype(np.uint8)),
        ("chi_unreferenced", np.where(mask, chi + 0.013, 0)),
        ("chi_std", np.where(mask, 0.01 + 0.1 * np.abs(chi), 0)),
    ):
        files[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(arr, np.float32), aff), files[name])
    files["brain_mask"] = t["desc-brain_mask"]
    files["local_field"] = t["desc-local_fieldmap"]
    files["total_field"] = t["desc-total_fieldmap"]
    rows = ["member\tseed\titeration\tloss\tresidual\tseconds"]
    rows += [
        f"{m}\t{m}\t{i}\t{1.0 / (i + 1)}\t{0.01 + 0.1 / (i + 1)}\t{0.1 * i}"
        for m in range(3)
        for i in range(400)
    ]
    files["loss_history"] = root / "loss.tsv"
    files["loss_history"].write_text("\n".join(rows) + "\n")
    return {k: str(v) for k, v in files.items()}


def _case(size: int, case: str, files: dict) -> dict:
    import nibabel as nib

    from qsmflow.algorithms.dipole import b0_dir_from_affine
    from qsmflow.algorithms.metrics import data_consistency_residual_map
    from qsmflow.reports import write_subject_report
    from qsmflow.reports.run import run_section

    if case != "dip":
        files = {k: v for k, v in files.items() if k not in ("chi_std", "loss_history")}
    out = {}
    c0 = time.process_time()
    t0 = time.perf_counter()
    img = nib.load(files["chi"])
    args = [
        np.asarray(nib.load(files[k]).dataobj, np.float32) for k in ("chi", "local_field", "mask")
    ]
    data_consistency_residual_map(
        args[0],
        args[1],
        args[2] > 0,
        voxel_size=img.header.get_zooms()[:3],
        b0_dir=b0_dir_from_affine(img.affine),
    )
    out["residual_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    frag, summary = run_section(prefix="sub-1", metadata={}, **files)
    out["section_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        page = write_subject_report(
            d, "1", sections=[frag], summaries=[summary], methods_md="# Methods\n\ntext\n"
        )
        out["write_s"] = time.perf_counter() - t0
        out["html_mb"] = page.stat().st_size / 1e6
    out["total_s"] = out["section_s"] + out["write_s"]
    out["cpu_s"] = time.process_time() - c0  # residual + section + write
    out["load"] = os.getloadavg()[0]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs="*", default=[96, 160])
    p.add_argument("--case", choices=["classical", "dip"], help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:  # child process: one case
        res = _case(args.size[0], args.case, json.loads(Path(args.files).read_text()))
        print(json.dumps(res))
        return 0
    import matplotlib
    import scipy

    print(
        f"- date: {dt.date.today()}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; Python {platform.python_version()}, NumPy "
        f"{np.__version__}, SciPy {scipy.__version__}, matplotlib {matplotlib.__version__}"
    )
    print(
        "\n| size | case | report s (wall) | CPU s | residual s | HTML MB | peak RSS MB | "
        "load |\n|---|---|---|---|---|---|---|---|"
    )
    for size in args.size:
        with tempfile.TemporaryDirectory() as d:
            files = _inputs(Path(d), size)
            fj = Path(d) / "files.json"
            fj.write_text(json.dumps(files))
            for case in ("classical", "dip"):
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--size",
                        str(size),
                        "--case",
                        case,
                        "--files",
                        str(fj),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(
                    f"| {size}^3 | {case} | {r['total_s']:.1f} | {r['cpu_s']:.1f} | "
                    f"{r['residual_s']:.1f} | {r['html_mb']:.2f} | {r['peak_rss_mb']:.0f} | "
                    f"{r['load']:.1f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
