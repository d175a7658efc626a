"""Accuracy, wall time and peak memory of every classical stage on the simulated head.

Usage::

    python benchmarks/bench_classical.py            # 160^3, all cases -> benchmarks/RESULTS.md
    python benchmarks/bench_classical.py --size 96  # quicker look

Each case runs in its own process (``--case NAME``) so that its peak resident memory
(``ru_maxrss``, includes the ~100 MB of the Python/NumPy/SciPy runtime and the inputs) is its own.
Inversions start from the true local field, background removal from the true total field, field
mapping from the simulated wrapped multi-echo phase; the "chain" case goes from wrapped phase to
chi with the fast default methods.  Metrics are qsm-ci's (``qsm_ci.qsm_eval``).
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
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "_out"
TE = (0.004, 0.008, 0.012, 0.016)
B0 = 3.0

CASES = {
    # name: (stage, method, target seconds or None)
    "unwrap-laplacian": ("unwrap", "laplacian", 1.0),
    "unwrap-romeo": ("unwrap", "romeo", None),
    "combine-wls": ("combine", "wls", None),
    "combine-complexfit": ("combine", "complexfit", None),
    "mask-threshold": ("mask", "threshold", None),
    "mask-phase-quality": ("mask", "phase-quality", None),
    "mask-bet": ("mask", "bet", None),
    "bfr-vsharp": ("bfr", "vsharp", 5.0),
    "bfr-pdf": ("bfr", "pdf", 30.0),
    "bfr-lbv": ("bfr", "lbv", None),
    "bfr-resharp": ("bfr", "resharp", None),
    "invert-tkd": ("invert", "tkd", 0.5),
    "invert-tikhonov": ("invert", "tikhonov", None),
    "invert-tv": ("invert", "tv", 30.0),
    "invert-rts": ("invert", "rts", 20.0),
    "invert-ndi": ("invert", "ndi", None),
    "invert-medi": ("invert", "medi", None),
    "chain": ("chain", "laplacian+wls+vsharp+rts", 60.0),
    "chain-vsharp-rts": ("chain", "romeo+wls+vsharp+rts", 60.0),
    "chain-lbv-rts": ("chain", "romeo+wls+lbv+rts", 60.0),
    "chain-lbv-tv": ("chain", "romeo+wls+lbv+tv", 60.0),
}


def simulate(size: int) -> Path:
    from qsmflow.sims.field import simulate_fields
    from qsmflow.sims.phantom import make_head_phantom
    from qsmflow.sims.signal import simulate_megre

    path = OUT / f"head{size}.npz"
    if path.exists():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    vs = 160.0 / size  # a 160 mm field of view at every matrix size
    ph = make_head_phantom(shape=(size,) * 3, voxel_size=(vs,) * 3)
    f = simulate_fields(ph)
    mag, phase = simulate_megre(ph, total_field_ppm=f["total"], te_s=TE, b0_tesla=B0, snr=100)
    np.savez(
        path,
        voxel_size=np.array((vs,) * 3),
        mag=mag,
        phase=phase,
        total=f["total"],
        local=f["local"],
        chi=f["chi_local"],
        mask=ph.brain_mask,
        seg=ph.labels,
    )
    return path


def peak_rss_mb() -> float:
    """High-water resident memory of this process (VmHWM; unlike ru_maxrss it is not inherited
    from the parent across fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _call(func, **avail):
    import inspect

    names = inspect.signature(func).parameters
    return func(**{k: v for k, v in avail.items() if k in names})


def run_case(name: str, size: int) -> dict:
    from qsm_ci import qsm_eval

    from qsmflow import registry

    d = dict(np.load(simulate(size)))
    vs = tuple(float(v) for v in d["voxel_size"])
    mask = d["mask"].astype(bool)
    stage, method, _ = CASES[name]
    common = dict(voxel_size=vs, b0_dir=(0.0, 0.0, 1.0), te_s=TE, b0_tesla=B0)
    res: dict = {"case": name, "baseline_rss_mb": peak_rss_mb()}
    if stage == "chain":
        from qsmflow.algorithms import phase

        unwrap, _, bfr, inv = method.split("+")
        t0 = time.perf_counter()
        field = phase.estimate_field_wls(
            d["phase"],
            d["mag"],
            mask=mask,
            unwrap=unwrap,
            **{k: common[k] for k in ("te_s", "voxel_size", "b0_tesla")},
        )
        local, m2 = registry.method("bfr", bfr).function(field, mask, voxel_size=vs)
        chi = registry.method("invert", inv).function(local, m2, voxel_size=vs, b0_dir=(0, 0, 1))
        res["seconds"] = time.perf_counter() - t0
        res.update(_metrics(qsm_eval, chi, d["chi"], m2, d["seg"]))
    else:
        func = registry.method(stage, method).function
        inputs = dict(common)
        if stage in ("unwrap", "combine"):
            inputs.update(phase=d["phase"], magnitude=d["mag"], mask=mask)
        elif stage == "mask":
            inputs.update(magnitude=d["mag"], phase=d["phase"])
        elif stage == "bfr":
            inputs.update(field=d["total"], mask=mask)
        else:
            inputs.update(field=d["local"], mask=mask, magnitude=d["mag"][..., 0])
        t0 = time.perf_counter()
        out = _call(func, **inputs)
        res["seconds"] = time.perf_counter() - t0
        if isinstance(out, tuple):
            out, extra = out[0], out[1]
        else:
            extra = None
        if stage == "invert":
            res.update(_metrics(qsm_eval, out, d["chi"], mask, d["seg"]))
        elif stage == "bfr":
            m2 = extra.astype(bool)
            nr, nrd = qsm_eval.nrmse_challenge(out, d["local"], m2)
            res.update(nrmse=nr, nrmse_detrend=nrd, mask_kept=float(m2.sum() / mask.sum()))
        elif stage == "combine":
            nr, nrd = qsm_eval.nrmse_challenge(out, d["total"], mask)
            res.update(nrmse=nr, nrmse_detrend=nrd)
        elif stage == "unwrap":
            true_phase = d["total"][..., None] * 2 * np.pi * 42.577478 * B0 * np.asarray(TE)
            diff = (out - true_phase)[mask]
            if method == "laplacian":  # not congruent: compare the Laplacian-smooth estimate
                diff = diff - np.median(diff, axis=0)
                res["rms_error_rad"] = float(np.sqrt(np.mean(diff**2)))
            else:
                k = np.round(diff / (2 * np.pi))
                k -= np.median(k, axis=0)
                res["fraction_correct"] = float(np.mean(k == 0))
        elif stage == "mask":
            m = out.astype(bool)
            res["dice_brain"] = float(2 * (m & mask).sum() / (m.sum() + mask.sum()))
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def _metrics(qsm_eval, chi, truth, mask, seg):
    nrmse, _ = qsm_eval.nrmse_challenge(chi, truth, mask)
    return {
        "nrmse": nrmse,
        "hfen": qsm_eval.hfen(chi, truth, mask),
        "xsim": qsm_eval.xsim(chi, truth, mask),
    }


def _fmt(v, nd=3):
    return "" if v is None else (f"{v:.{nd}g}" if isinstance(v, float) else str(v))


def write_results(rows: list, size: int, path: Path) -> None:
    import scipy

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        f"## Classical stages at {size}^3 ({160 / size:.2f} mm isotropic), float32",
        "",
        f"- date: {dt.date.today().isoformat()}; machine: {cpu}, {os.cpu_count()} cores "
        f"(affinity {len(os.sched_getaffinity(0))}); Python {platform.python_version()}, "
        f"NumPy {np.__version__}, SciPy {scipy.__version__}",
        "- inversions from the true local field, background removal from the true total field,",
        "  field mapping from the simulated 4-echo wrapped phase (SNR 100, phase offset); metrics",
        "  from qsm-ci (NRMSE %, HFEN %, XSIM) against the simulated truth in the brain mask",
        "  (background removal: on its eroded mask).  Peak RSS is the process high-water mark;",
        "  baseline = Python runtime + all simulated inputs loaded, before the method runs.",
        "",
        "| case | seconds | target s | peak RSS MB (baseline) | NRMSE | HFEN | XSIM | other |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tgt = CASES[r["case"]][2]
        if "error" in r:
            lines.append(f"| {r['case']} | failed | {_fmt(tgt)} | | | | | {r['error']} |")
            continue
        other = ", ".join(
            f"{k}={_fmt(v)}"
            for k, v in r.items()
            if k
            in ("nrmse_detrend", "mask_kept", "rms_error_rad", "fraction_correct", "dice_brain")
        )
        miss = " (miss)" if tgt is not None and r["seconds"] > tgt else ""
        lines.append(
            f"| {r['case']} | {r['seconds']:.2f}{miss} | {_fmt(tgt)} | {r['peak_rss_mb']:.0f} "
            f"({r['baseline_rss_mb']:.0f}) | "
            f"{_fmt(r.get('nrmse'))} | {_fmt(r.get('hfen'))} | {_fmt(r.get('xsim'))} | {other} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--case", choices=sorted(CASES))
    ap.add_argument("--only", nargs="+", choices=sorted(CASES), help="run only these cases")
    ap.add_argument(
        "--results",
        default=str(OUT / "classical.md"),
        help="markdown table to write (paste into RESULTS.md)",
    )
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.size)))
        return 0
    simulate(args.size)
    rows = []
    for name in args.only or CASES:
        r = subprocess.run(
            [sys.executable, __file__, "--case", name, "--size", str(args.size)],
            capture_output=True,
            text=True,
        )
        if r.returncode == 0:
            row = json.loads(r.stdout.strip().splitlines()[-1])
        else:
            row = {"case": name, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:120]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    write_results(rows, args.size, Path(args.results))
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
