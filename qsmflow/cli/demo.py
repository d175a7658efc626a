"""``qsmflow-demo``: simulate a small BIDS dataset and run the whole pipeline on it.

Two subjects of the numerical head phantom (multi-echo, with the background field of skull and
air, Siemens-style integer phase) are written with :mod:`qsmflow.sims.bids`, ``qsmflow`` runs on
them, and the susceptibility maps are compared with the simulated truth.  Takes about a minute
on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def _score(chi, truth, mask) -> dict:
    """NRMSE (%) of demeaned maps and correlation inside ``mask`` (qsm-ci when installed)."""
    try:
        from qsm_ci.qsm_eval import correlation, nrmse_challenge

        return {
            "nrmse": float(nrmse_challenge(chi, truth, mask)[0]),
            "correlation": float(correlation(chi, truth, mask)),
        }
    except ImportError:  # qsm-ci is an optional (test) dependency
        a = chi[mask] - chi[mask].mean()
        b = truth[mask] - truth[mask].mean()
        return {
            "nrmse": float(100 * np.linalg.norm(a - b) / np.linalg.norm(b)),
            "correlation": float(np.corrcoef(a, b)[0, 1]),
        }


def score_outputs(bids_dir, output_dir, subjects) -> dict:
    """``{subject: {"chi": path, "nrmse": %, "correlation": r}}`` against the simulated truth."""
    import nibabel as nib

    from qsmflow.outputs import derivative_path
    from qsmflow.sims.bids import DERIV_NAME

    out = {}
    for s in subjects:
        chi_p = derivative_path(output_dir, f"sub-{s}", "chi")
        mask_p = derivative_path(output_dir, f"sub-{s}", "brain_mask")
        truth_p = derivative_path(Path(bids_dir) / "derivatives" / DERIV_NAME, f"sub-{s}", "chi")
        if not chi_p.is_file():
            out[s] = {"chi": None}
            continue
        chi = np.asarray(nib.load(chi_p).dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(mask_p).dataobj) != 0
        truth = np.asarray(nib.load(truth_p).dataobj, dtype=np.float32)
        out[s] = {"chi": str(chi_p), **_score(chi, truth, mask)}
    return out


def _check_args(args) -> list[str]:
    from qsmflow.config import list_presets
    from qsmflow.validation import check_output_dir

    problems = []
    if not 16 <= args.size <= 512:
        problems.append(f"--size {args.size}: expected 16 to 512 voxels per axis")
    if args.nprocs < 1:
        problems.append(f"--nprocs {args.nprocs}: expected a positive integer")
    if args.preset not in list_presets():
        problems.append(
            f"--preset {args.preset!r}: unknown; choose from: {', '.join(list_presets())}"
        )
    problems += check_output_dir(args.directory, what="demo directory")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="qsmflow-demo",
        description="Simulate 2 subjects as a BIDS dataset, run qsmflow, compare with truth.",
    )
    p.add_argument(
        "directory",
        nargs="?",
        type=Path,
        default=Path("qsmflow-demo"),
        help="where to put bids/, derivatives/ and work/ (default: ./qsmflow-demo)",
    )
    p.add_argument("--nprocs", type=int, default=2, help="processes (default: 2)")
    p.add_argument(
        "--size",
        type=int,
        default=96,
        help="matrix size per axis of the 160 mm field of view (default: 96, i.e. "
        "1.67 mm voxels; 160 gives 1 mm)",
    )
    p.add_argument("--preset", default="fast", help="preset to run (default: fast)")
    args = p.parse_args(argv)
    problems = _check_args(args)
    if problems:
        for msg in problems:
            print(f"qsmflow-demo: error: {msg}", file=sys.stderr)
        return 2

    from qsmflow.cli.run import main as qsmflow_main
    from qsmflow.sims.bids import write_bids_dataset

    root = args.directory.resolve()
    bids, deriv, work = root / "bids", root / "derivatives" / "qsmflow", root / "work"
    subjects = ("01", "02")
    t0 = time.time()
    vox = 160.0 / args.size  # an adult-sized head in a 160 mm field of view
    print(
        f"qsmflow-demo: simulating {len(subjects)} subjects ({args.size}^3, {vox:.2f} mm, "
        f"4 echoes, integer phase) in {bids}"
    )
    write_bids_dataset(
        bids,
        subjects=subjects,
        shape=(args.size,) * 3,
        voxel_size=(vox,) * 3,
        te_s=(0.004, 0.008, 0.012, 0.016),
        phase_as_int=True,
        snr=100.0,
    )
    t1 = time.time()
    if deriv.exists():  # the demo's own outputs from an earlier demo run
        import shutil

        shutil.rmtree(deriv)
    cmd = [
        str(bids),
        str(deriv),
        "participant",
        "-w",
        str(work),
        "--nprocs",
        str(args.nprocs),
        "--preset",
        args.preset,
        # the simulated heads are analytic phantoms, not MNI-shaped brains: an atlas
        # registration would only fail its check (tests/test_atlas.py)
        "--no-atlas",
    ]
    print("qsmflow-demo: running  qsmflow " + " ".join(cmd))
    rc = qsmflow_main(cmd)
    t2 = time.time()
    scores = score_outputs(bids, deriv, subjects)
    print(f"\nqsmflow-demo: simulation {t1 - t0:.1f} s, pipeline {t2 - t1:.1f} s")
    print(
        "susceptibility maps (ppm) and their error against the simulated truth "
        "(inside the output brain mask, both demeaned):"
    )
    for s, sc in scores.items():
        if sc["chi"] is None:
            print(f"  sub-{s}: no Chimap (failed)")
        else:
            print(
                f"  sub-{s}: {sc['chi']}\n          NRMSE {sc['nrmse']:.1f} %, "
                f"correlation {sc['correlation']:.3f}"
            )
    print(f"ground truth: {bids / 'derivatives' / 'qsmflow-sim'}")
    from qsmflow.reports import subject_report_path

    pages = [subject_report_path(deriv, s) for s in subjects]
    pages = [p for p in pages if p.is_file()]
    if pages:
        print("QC reports (open in a browser; they work offline):")
        for p in pages:
            print(f"  {p}")
        if (deriv / "index.html").is_file():
            print(f"  {deriv / 'index.html'}  (all subjects)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
