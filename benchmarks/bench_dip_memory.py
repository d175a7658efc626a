"""Peak memory (and time per iteration) of MoDIP on large grids, CPU.

Usage::

    python benchmarks/bench_dip_memory.py                    # 256^3 brain crop, +/- checkpoint
    python benchmarks/bench_dip_memory.py --cases full160-ckpt --iters 2

Every case runs in its own process; its peak resident memory (``ru_maxrss``, the whole process:
Python, torch, the phantom and the fit) is reported.  The head phantom fills 80 % of a 160 mm
field of view (256^3: 0.625 mm voxels, a brain crop of ~3.5 M voxels, the size of a 1 mm
256^3 adult brain crop); ``full*`` cases use a mask covering the whole grid (the worst case:
no cropping at all).  The field is the continuous-kernel field of the phantom (memory and
time do not depend on its values).  Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

# name: (grid size, whole-grid mask?, fit_modip settings)
CASES = {
    "brain256": (256, False, {}),
    "brain256-ckpt": (256, False, {"checkpoint": True}),
    "full160": (160, True, {}),
    "full160-ckpt": (160, True, {"checkpoint": True}),
    "full256-ckpt": (256, True, {"checkpoint": True}),
    "brain256-fast": (256, False, {"net_factor": 2, "init": "tv"}),  # preset dip-cpu
    "full256-fast": (256, True, {"net_factor": 2, "init": "tv"}),
    # 160^3 brain crop: time per iteration, float32 vs bf16 autocast on the CPU
    "brain160": (160, False, {"amp": "off"}),
    "brain160-bf16": (160, False, {"amp": "bf16"}),
    "brain160-fast": (160, False, {"net_factor": 2, "amp": "off"}),
    "brain160-fast-bf16": (160, False, {"net_factor": 2, "amp": "bf16"}),
    "brain160-compile": (160, False, {"amp": "off", "compile_net": True}),
    "brain160-bf16-compile": (160, False, {"amp": "bf16", "compile_net": True}),
    "brain160-fast-bf16-compile": (
        160,
        False,
        {"net_factor": 2, "amp": "bf16", "compile_net": True},
    ),
}


def run_case(name: str, iters: int, threads: int) -> dict:
    from qsmflow.algorithms.dip.modip import fit_modip
    from qsmflow.sims.field import simulate_fields
    from qsmflow.sims.phantom import make_head_phantom

    size, full, settings = CASES[name]
    vs = (160.0 / size,) * 3
    ph = make_head_phantom((size,) * 3, voxel_size=vs, seed=0)
    field = simulate_fields(ph, kind="continuous")["local"]
    mask = np.ones(field.shape, bool) if full else ph.brain_mask
    del ph
    t0 = time.perf_counter()
    r = fit_modip(
        field,
        mask,
        voxel_size=vs,
        device="cpu",
        max_iter=iters,
        threads=threads,
        plateau_tol=0,
        **settings,
    )
    h = r.history
    return {
        "case": name,
        "voxels_in_mask": int(mask.sum()),
        "iterations": len(h),
        "s_per_iter": (h[-1]["seconds"] - h[0]["seconds"]) / max(len(h) - 1, 1),
        "seconds": time.perf_counter() - t0,
        "crop": list(r.settings.get("crop_shape", [])),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="brain256,brain256-ckpt")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.case:
        print(json.dumps(run_case(a.case, a.iters, a.threads)))
        return
    for name in a.cases.split(","):
        p = subprocess.run(
            [
                sys.executable,
                __file__,
                "--case",
                name,
                "--iters",
                str(a.iters),
                "--threads",
                str(a.threads),
            ],
            capture_output=True,
            text=True,
        )
        out = p.stdout.strip().splitlines()
        print(
            out[-1]
            if out
            else json.dumps(
                {
                    "case": name,
                    "error": (p.stderr.strip().splitlines() or ["?"])[-1][:160],
                    "returncode": p.returncode,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
