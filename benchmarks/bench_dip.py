"""Accuracy, time and peak memory of the deep-image-prior inversions vs the classical ones.

Usage::

    python benchmarks/bench_dip.py --size 32 --iters 100          # quick (minutes, 1 core)
    python benchmarks/bench_dip.py --size 64 --iters 300 --cases modip-s0,tv

Every case runs in its own process (``--case NAME``) so that its peak resident memory
(``ru_maxrss``: includes the ~300 MB of the Python/torch runtime) is its own.  All inversions
start from the true local field of the simulated head (160 mm field of view at every size, so
the voxel size is 160/size mm); metrics are qsm-ci's (NRMSE %, HFEN %, XSIM) against the true
chi in the brain mask.  Variants: ``-oblique`` (B0 tilted ~26 degrees, simulated with the
voxel-integrated kernel; every method inverts it with ``kernel="integral"`` except the
``-continuous`` row, see RESULTS_dip.md) and ``-aniso`` (voxels 1 x 1 x 2 relative).
``--jobs 2`` runs two single-threaded cases at a time (the machine has 2 cores).
Appends a table to ``benchmarks/RESULTS_dip.md`` with ``--write``.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "_out"
OBLIQUE = tuple(np.array([0.35, -0.25, 0.9]) / np.linalg.norm([0.35, -0.25, 0.9]))

FAST = {"net_factor": 2, "init": "tv"}
FAST_MEDI = {"net_factor": 2, "init": "medi"}
INR_REF = {
    "hidden": 512,
    "layers": 9,
    "w0": 40.0,
    "tv_norm": "l2",
    "lambda_tv": 0.025,
    "tv_low": 0.5,
    "tv_high": 0.7,
}
# name: (method, variant, settings)
CASES = {
    "tkd": ("tkd", "axial", {}),
    "tv": ("tv", "axial", {}),
    "rts": ("rts", "axial", {}),
    "tikhonov": ("tikhonov", "axial", {}),
    "ndi": ("ndi", "axial", {}),
    "medi": ("medi", "axial", {}),
    "medi-mag-snr20": ("medi", "axial", {"mag_snr": 20.0}),
    "modip-s0": ("modip", "axial", {"seed": 0}),
    "modip-s1": ("modip", "axial", {"seed": 1}),
    "modip-s2": ("modip", "axial", {"seed": 2}),
    "modip-kspace": ("modip", "axial", {"dc_mode": "kspace"}),
    "modip-base16": ("modip", "axial", {"base": 16}),
    "modip-c2f": ("modip", "axial", {"schedule": "2:-1"}),  # -1: all but 50 iterations
    "modip-c2f-tv": ("modip", "axial", {"schedule": "2:-1", "init": "tv"}),
    "modip-init-tv": ("modip", "axial", {"init": "tv"}),
    "modip-net2": ("modip", "axial", {"net_factor": 2}),
    # the CPU recipe (preset dip-cpu): network on a 2x coarser grid + warm start from TV
    "modip-fast-s0": ("modip", "axial", {**FAST, "seed": 0}),
    "modip-fast-s1": ("modip", "axial", {**FAST, "seed": 1}),
    "modip-fast-s2": ("modip", "axial", {**FAST, "seed": 2}),
    # the same from MEDI (needs the magnitude: option init="medi")
    "modip-fast-medi": ("modip", "axial", {**FAST_MEDI, "seed": 0}),
    "modip-fast-medi-s1": ("modip", "axial", {**FAST_MEDI, "seed": 1}),
    "modip-fast-medi-s2": ("modip", "axial", {**FAST_MEDI, "seed": 2}),
    "modip-fast-medi-oblique": ("modip", "oblique", {**FAST_MEDI, "kernel": "integral"}),
    "modip-fast-medi-aniso": ("modip", "aniso", {**FAST_MEDI}),
    "modip-fast-kspace": ("modip", "axial", {**FAST, "dc_mode": "kspace"}),
    "modip-fast-oblique": ("modip", "oblique", {**FAST, "kernel": "integral"}),
    "modip-fast-aniso": ("modip", "aniso", {**FAST}),
    # bf16 autocast vs float32 for the network (amp="auto" picks bf16 on AVX512-BF16 CPUs)
    "modip-bf16": ("modip", "axial", {"amp": "bf16"}),
    "modip-fp32": ("modip", "axial", {"amp": "off"}),
    "modip-fast-bf16": ("modip", "axial", {**FAST, "amp": "bf16"}),
    "modip-fast-fp32": ("modip", "axial", {**FAST, "amp": "off"}),
    "dip-bf16": ("dip", "axial", {"amp": "bf16"}),
    "dip-fp32": ("dip", "axial", {"amp": "off"}),
    "modip-2threads": ("modip", "axial", {"threads": 2}),
    "dip": ("dip", "axial", {}),
    "inr": ("inr", "axial", {}),
    # INR-QSM with the reference code's configuration (SIREN 512 x 10, w0 40, L2 weighted
    # gradient term, weights ramping between the 50 % and 70 % quantiles), from scratch
    "inr-ref-lr1e-4": ("inr", "axial", {**INR_REF, "lr": 1e-4}),
    "inr-ref-lr1e-5": ("inr", "axial", {**INR_REF, "lr": 1e-5}),
    # the reference's weighting and L2 term on qsmflow's smaller, faster SIREN (256 x 4, w0 30)
    "inr-ramp-l2": (
        "inr",
        "axial",
        {"tv_norm": "l2", "lambda_tv": 0.025, "tv_low": 0.5, "tv_high": 0.7},
    ),
    "inr-ramp-l2-3e-3": (
        "inr",
        "axial",
        {"tv_norm": "l2", "lambda_tv": 0.003, "tv_low": 0.5, "tv_high": 0.7},
    ),
    "inr-ramp-l2-3e-4": (
        "inr",
        "axial",
        {"tv_norm": "l2", "lambda_tv": 0.0003, "tv_low": 0.5, "tv_high": 0.7},
    ),
    "inr-ramp-l1": ("inr", "axial", {"tv_low": 0.5, "tv_high": 0.7}),
    "tkd-oblique": ("tkd", "oblique", {"kernel": "integral"}),
    "tv-oblique": ("tv", "oblique", {"kernel": "integral"}),
    "tv-oblique-continuous": ("tv", "oblique", {}),
    "rts-oblique": ("rts", "oblique", {"kernel": "integral"}),
    "tikhonov-oblique": ("tikhonov", "oblique", {"kernel": "integral"}),
    "ndi-oblique": ("ndi", "oblique", {"kernel": "integral"}),
    "medi-oblique": ("medi", "oblique", {"kernel": "integral"}),
    "modip-oblique": ("modip", "oblique", {"kernel": "integral"}),
    "tkd-aniso": ("tkd", "aniso", {}),
    "tv-aniso": ("tv", "aniso", {}),
    "rts-aniso": ("rts", "aniso", {}),
    "tikhonov-aniso": ("tikhonov", "aniso", {}),
    "ndi-aniso": ("ndi", "aniso", {}),
    "medi-aniso": ("medi", "aniso", {}),
    "modip-aniso": ("modip", "aniso", {}),
}


def phantom(size: int, variant: str):
    """The simulated head of one variant and its B0 direction."""
    from qsmflow.sims.phantom import make_head_phantom

    vs = 160.0 / size
    shape, vox, b0 = (size,) * 3, (vs,) * 3, (0.0, 0.0, 1.0)
    if variant == "oblique":
        b0 = OBLIQUE
    elif variant == "aniso":
        shape, vox = (size, size, size // 2), (vs, vs, 2 * vs)
    return make_head_phantom(shape=shape, voxel_size=vox, seed=0), b0


def simulate(size: int, variant: str) -> Path:
    from qsmflow.sims.field import simulate_fields

    path = OUT / f"dip_head{size}_{variant}_v2.npz"  # v2: oblique simulated with "integral"
    if path.exists():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    ph, b0 = phantom(size, variant)
    vox = ph.voxel_size
    f = simulate_fields(ph, b0_dir=b0, kind="integral")
    np.savez(
        path,
        voxel_size=np.array(vox),
        b0=np.array(b0),
        local=f["local"],
        chi=f["chi_local"],
        mask=ph.brain_mask,
    )
    return path


def magnitude(size: int, variant: str, snr: float | None = None) -> np.ndarray:
    """Magnitude at TE 20 ms from the MEGRE simulator (its edges are chi's edges); complex
    Gaussian noise of sigma = mean brain magnitude / ``snr`` if given."""
    from qsmflow.sims.signal import simulate_megre

    ph, _ = phantom(size, variant)
    mag, _ = simulate_megre(
        ph,
        total_field_ppm=np.zeros(ph.m0.shape),
        te_s=(0.02,),
        snr=snr or np.inf,
        phase_offset=False,
        seed=0,
    )
    return mag[..., 0]


def run_case(name: str, size: int, iters: int, threads: int) -> dict:
    from qsm_ci import qsm_eval

    method, variant, settings = CASES[name]
    d = dict(np.load(simulate(size, variant)))
    vs = tuple(float(v) for v in d["voxel_size"])
    b0 = tuple(float(v) for v in d["b0"])
    mask = d["mask"].astype(bool)
    res = {"case": name, "voxels_in_mask": int(mask.sum())}
    t0 = time.perf_counter()
    if method in ("modip", "dip", "inr"):
        import importlib

        mod = importlib.import_module(f"qsmflow.algorithms.dip.{method}")
        kw = dict(settings)
        if kw.get("init") == "medi":
            kw["magnitude"] = magnitude(size, variant, kw.pop("mag_snr", None))
        if kw.get("schedule") == "2:-1":
            kw["schedule"] = f"2:{max(iters - 50, 0)}"
        kw.setdefault("threads", threads)
        n_iter = iters * (2 if method == "dip" else 1)
        r = getattr(mod, f"fit_{method}")(
            d["local"], mask, voxel_size=vs, b0_dir=b0, device="cpu", max_iter=n_iter, **kw
        )
        chi = r.chi
        h = r.history
        res.update(
            iterations=len(h),
            stopped=r.stopped_reason,
            s_per_iter=(h[-1]["seconds"] - h[0]["seconds"]) / max(len(h) - 1, 1),
            residual_ppm=h[-1]["residual"],
        )
    else:
        from qsmflow import registry

        kw = dict(settings)
        if method in ("medi", "ndi"):
            kw["magnitude"] = magnitude(size, variant, kw.pop("mag_snr", None))
        invert = registry.method("invert", method).function
        chi = invert(d["local"], mask, voxel_size=vs, b0_dir=b0, **kw)
    res["seconds"] = time.perf_counter() - t0
    nrmse, _ = qsm_eval.nrmse_challenge(chi, d["chi"], mask)
    res.update(
        nrmse=nrmse,
        hfen=qsm_eval.hfen(chi, d["chi"], mask),
        xsim=qsm_eval.xsim(chi, d["chi"], mask),
    )
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def write_results(rows, size, iters, path: Path) -> None:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    lines = [
        f"## Deep-image-prior inversions at {size}^3 ({160 / size:.2f} mm), CPU, "
        f"max {iters} iterations",
        "",
        f"- date: {dt.date.today().isoformat()}; {cpu}, {os.cpu_count()} cores shared with "
        f"other jobs; torch {torch.__version__} (CPU build); GPU timing not measured",
        "",
        "| case | NRMSE % | HFEN % | XSIM | seconds | s/iter | iterations | stop | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error']} |||||||| ")
            continue
        lines.append(
            f"| {r['case']} | {r['nrmse']:.2f} | {r['hfen']:.2f} | {r['xsim']:.3f} | "
            f"{r['seconds']:.1f} | {r.get('s_per_iter', float('nan')):.3f} | "
            f"{r.get('iterations', '')} | {r.get('stopped', '')} | {r['peak_rss_mb']:.0f} |"
        )
    with open(path, "a") as fh:
        fh.write("\n".join(lines) + "\n\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--jobs", type=int, default=1, help="cases run at the same time")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--write", action="store_true", help="append to benchmarks/RESULTS_dip.md")
    a = ap.parse_args(argv)
    if a.case:
        print(json.dumps(run_case(a.case, a.size, a.iters, a.threads)))
        return
    names = a.cases.split(",")
    for variant in sorted({CASES[n][1] for n in names}):
        simulate(a.size, variant)  # once, before cases run in parallel

    def one(name):
        p = subprocess.run(
            [
                sys.executable,
                __file__,
                "--case",
                name,
                "--size",
                str(a.size),
                "--iters",
                str(a.iters),
                "--threads",
                str(a.threads),
            ],
            capture_output=True,
            text=True,
        )
        try:
            row = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            row = {"case": name, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:120]}
        print(row, flush=True)
        return row

    with ThreadPoolExecutor(max_workers=max(a.jobs, 1)) as pool:
        rows = list(pool.map(one, names))
    if a.write:
        write_results(rows, a.size, a.iters, HERE / "RESULTS_dip.md")


if __name__ == "__main__":
    main()
