"""Every mask x background-removal x inversion chain of the presets on the realistic head.

Usage::

    nice -n 10 python benchmarks/bench_chain_realistic.py --preset 3t-axial   # 160^3, 1.06 mm
    python benchmarks/bench_chain_realistic.py --preset 7t-oblique --size 96  # quicker look

From the simulated wrapped multi-echo phase and magnitude of
:func:`qsmflow.sims.realistic.make_realistic_head` (CSF shell, low-signal skull with bone chi,
scalp, sinus and ear canals a few mm from the brain, 3 T axial or 7 T oblique) each chain runs
mask -> ROMEO + WLS field map inside the mask -> background removal -> inversion -> mean
reference, as the pipeline does.  The same chains run with the TRUE brain mask show what the
mask costs.  Metrics: qsm-ci's demeaned NRMSE (%) of the local field and of chi against the
truth, over the chain's output mask within the true brain (``coverage``: that region's share
of the true brain).  Results go to ``benchmarks/_out/chain_<preset>_<size>.json`` and a
markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "_out"

MASKS = ("true", "bet", "reliable")
BFRS = ("lbv", "lbv-robust", "vsharp", "pdf")
INVERSIONS = ("rts", "tv")


def _nrmse(a, b, m):
    from qsm_ci.qsm_eval import nrmse_challenge

    return float(nrmse_challenge(a, b, m)[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="3t-axial")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--masks", nargs="*", default=list(MASKS))
    ap.add_argument("--bfrs", nargs="*", default=list(BFRS))
    ap.add_argument("--inversions", nargs="*", default=list(INVERSIONS))
    ap.add_argument(
        "--combine",
        default="wls",
        choices=("wls", "complexfit"),
        help="field mapping; complexfit's noise map goes on to lbv-robust and the inversion "
        "(as the pipeline wires it) unless --no-noise",
    )
    ap.add_argument("--no-noise", action="store_true", help="do not pass complexfit's noise")
    ap.add_argument(
        "--lbv-noise-max", type=float, default=None, help="lbv-robust's noise cut (0 = off)"
    )
    ap.add_argument(
        "--time-default",
        action="store_true",
        help="only time the fast preset's chain (wall and CPU seconds, 2 threads)",
    )
    ap.add_argument(
        "--extra",
        action="store_true",
        help="also the fast chain with WLS sigma_mm=2 (MCPC-3D-S smoothing)",
    )
    args = ap.parse_args(argv)

    from threadpoolctl import threadpool_limits

    from qsmflow.algorithms import masking, reference
    from qsmflow.algorithms.phase import estimate_field_complexfit, estimate_field_wls
    from qsmflow.registry import method
    from qsmflow.sims.realistic import make_realistic_head

    n = int(args.size)
    vs = (170.0 / n,) * 3  # 160^3 x 1.06 mm: a 170 mm field of view at every size
    t0 = time.perf_counter()
    cache = OUT / f"realistic_{args.preset}_{n}.pkl"
    if cache.exists():  # the simulation is deterministic; the cache only saves time
        import pickle

        head = pickle.loads(cache.read_bytes())
    else:
        import pickle

        head = make_realistic_head(args.preset, shape=(n, n, n), voxel_size=vs)
        OUT.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(head))
    print(f"# simulated {args.preset} {n}^3 in {time.perf_counter() - t0:.1f} s", flush=True)
    truth_mask = head.brain_mask
    acq = {"voxel_size": vs, "b0_dir": tuple(head.b0_dir)}
    if args.time_default:
        return time_default_chain(head, vs)
    rows = []

    def make_mask(name):
        if name == "true":
            return truth_mask.copy()
        if name == "bet":
            return masking.mask_bet(head.magnitude, voxel_size=vs)
        if name == "threshold":
            return masking.mask_threshold(head.magnitude, voxel_size=vs)
        if name == "reliable":
            return masking.mask_reliable(
                head.magnitude, phase=head.phase, te_s=head.te_s, voxel_size=vs
            )
        if name == "phase-quality":
            return masking.mask_phase_quality(
                head.phase, magnitude=head.magnitude, te_s=head.te_s, voxel_size=vs
            )
        raise ValueError(name)

    def bfr_call(name, field, mask, noise=None):
        bfr = method("bfr", name)
        fn = bfr.function
        kw = {"voxel_size": vs}
        if noise is not None and "noise" in bfr.inputs:
            kw["noise"] = noise
        if name == "lbv-robust" and args.lbv_noise_max is not None:
            kw["noise_max"] = args.lbv_noise_max
        if name == "pdf":
            kw["b0_dir"] = acq["b0_dir"]
        return fn(field, mask, **kw)

    with threadpool_limits(limits=2):
        for mname in args.masks:
            t = time.perf_counter()
            mask = make_mask(mname)
            t_mask = time.perf_counter() - t
            inter = np.count_nonzero(mask & truth_mask)
            dice = 2 * inter / (mask.sum() + truth_mask.sum())
            extra = int(np.count_nonzero(mask & ~truth_mask))
            missed = int(np.count_nonzero(truth_mask & ~mask))
            sigmas = [0.0, 2.0] if (args.extra and mname != "true") else [0.0]
            for sigma in sigmas:
                t = time.perf_counter()
                noise = None
                if args.combine == "complexfit":
                    field, noise = estimate_field_complexfit(
                        head.phase,
                        head.magnitude,
                        te_s=head.te_s,
                        b0_tesla=head.b0_tesla,
                        mask=mask,
                        voxel_size=vs,
                    )
                    noise = None if args.no_noise else noise
                else:
                    field = estimate_field_wls(
                        head.phase,
                        head.magnitude,
                        te_s=head.te_s,
                        b0_tesla=head.b0_tesla,
                        mask=mask,
                        voxel_size=vs,
                        sigma_mm=sigma,
                    )
                t_field = time.perf_counter() - t
                for bname in args.bfrs:
                    t = time.perf_counter()
                    local, m_out = bfr_call(bname, field, mask, noise)
                    t_bfr = time.perf_counter() - t
                    ev = m_out & truth_mask
                    local_nrmse = _nrmse(local, head.local_field, ev)
                    for iname in args.inversions:
                        t = time.perf_counter()
                        inv = method("invert", iname)
                        kw = dict(acq)
                        if "magnitude" in inv.inputs:  # as the pipeline wires it
                            kw["magnitude"] = head.magnitude  # 4D, as the pipeline passes it
                        if noise is not None and "noise" in inv.inputs:
                            kw["noise"] = noise
                        chi = inv.function(local, m_out, **kw)
                        chi = getattr(chi, "chi", chi)  # fit_* return the map with its record
                        chi = reference.reference_mean(chi, m_out)
                        t_inv = time.perf_counter() - t
                        row = {
                            "preset": args.preset,
                            "size": n,
                            "mask": mname,
                            "bfr": bname,
                            "invert": iname,
                            "combine": args.combine + ("" if noise is None else "+noise"),
                            "wls_sigma_mm": sigma,
                            "dice": round(dice, 4),
                            "extra_voxels": extra,
                            "missed_voxels": missed,
                            "coverage": round(float(ev.sum() / truth_mask.sum()), 4),
                            "local_nrmse": round(local_nrmse, 1),
                            "chi_nrmse": round(_nrmse(chi, head.chi_local, ev), 1),
                            "seconds": {
                                "mask": round(t_mask, 1),
                                "field": round(t_field, 1),
                                "bfr": round(t_bfr, 1),
                                "invert": round(t_inv, 1),
                            },
                        }
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "load_average": os.getloadavg(),
        "python": sys.version.split()[0],
    }
    path = OUT / f"chain_{args.preset}_{n}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"# wrote {path}; {meta}")
    print(table(rows))
    return 0


def time_default_chain(head, vs) -> int:
    """Wall and CPU time of the ``fast`` preset's chain (methods and settings from the preset)."""
    import resource

    from threadpoolctl import threadpool_limits

    from qsmflow.config import default_config
    from qsmflow.registry import method

    cfg = default_config()

    def cpu():
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    names = {s: cfg.method(s) for s in ("mask", "combine", "bfr", "invert", "reference")}
    times = {}
    with threadpool_limits(limits=2):
        w0, c0 = time.perf_counter(), cpu()
        t, c = w0, c0
        mask = method("mask", names["mask"]).function(
            head.magnitude, phase=head.phase, te_s=head.te_s, voxel_size=vs, **cfg.settings("mask")
        )
        times["mask"] = (time.perf_counter() - t, cpu() - c)
        t, c = time.perf_counter(), cpu()
        settings = dict(cfg.settings("combine"))
        field = method("combine", names["combine"]).function(
            head.phase,
            head.magnitude,
            te_s=head.te_s,
            b0_tesla=head.b0_tesla,
            mask=mask,
            voxel_size=vs,
            **settings,
        )
        times["combine"] = (time.perf_counter() - t, cpu() - c)
        t, c = time.perf_counter(), cpu()
        local, m_out = method("bfr", names["bfr"]).function(
            field, mask, voxel_size=vs, **cfg.settings("bfr")
        )
        times["bfr"] = (time.perf_counter() - t, cpu() - c)
        t, c = time.perf_counter(), cpu()
        chi = method("invert", names["invert"]).function(
            local, m_out, voxel_size=vs, b0_dir=tuple(head.b0_dir), **cfg.settings("invert")
        )
        chi = method("reference", names["reference"]).function(chi, m_out)
        times["invert+reference"] = (time.perf_counter() - t, cpu() - c)
        total = (time.perf_counter() - w0, cpu() - c0)
    ev = m_out & head.brain_mask
    out = {
        "methods": names,
        "wall_cpu_s": {k: [round(a, 1), round(b, 1)] for k, (a, b) in times.items()},
        "total_wall_s": round(total[0], 1),
        "total_cpu_s": round(total[1], 1),
        "load_average": os.getloadavg(),
        "chi_nrmse": round(_nrmse(chi, head.chi_local, ev), 1),
    }
    print(json.dumps(out), flush=True)
    return 0


def table(rows) -> str:
    """Markdown table; 'mask cost' = chi NRMSE minus the same chain with the true mask."""
    ref = {
        (r["bfr"], r["invert"]): r["chi_nrmse"]
        for r in rows
        if r["mask"] == "true" and r["wls_sigma_mm"] == 0
    }
    lines = [
        "| mask | bfr | invert | WLS sigma | mask Dice | extra / missed voxels | "
        "coverage | local NRMSE | chi NRMSE | mask cost (chi) | s (mask/field/bfr/inv) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cost = (
            r["chi_nrmse"] - ref[(r["bfr"], r["invert"])]
            if ((r["bfr"], r["invert"]) in ref and r["mask"] != "true")
            else None
        )
        s = r["seconds"]
        lines.append(
            f"| {r['mask']} | {r['bfr']} | {r['invert']} | {r['wls_sigma_mm'] or 'default'} | "
            f"{r['dice']:.3f} | {r['extra_voxels']} / {r['missed_voxels']} | "
            f"{r['coverage']:.3f} | {r['local_nrmse']:.1f} | {r['chi_nrmse']:.1f} | "
            f"{'' if cost is None else f'{cost:+.1f}'} | "
            f"{s['mask']}/{s['field']}/{s['bfr']}/{s['invert']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
