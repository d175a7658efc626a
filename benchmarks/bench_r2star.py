"""R2* maps (issue 23): accuracy against the simulator's truth and time per method.

Usage::

    nice -n 10 python benchmarks/bench_r2star.py                 # 160^3 x 5 echoes
    python benchmarks/bench_r2star.py --size 64 --snr 50          # a quick look

The numerical head phantom (:func:`qsmflow.sims.phantom.make_head_phantom`, 1 mm at 160^3)
and the MEGRE simulator (:func:`qsmflow.sims.signal.simulate_megre`, 3 T, 5 echoes 4-20 ms,
Rician magnitude; SNR = mean brain magnitude at the first echo / noise sigma) give the
magnitude; each method of the ``r2star`` stage fits it inside the brain mask with its defaults
(noise level estimated from the background).  Reported per method and SNR: NRMSE of R2*
inside the brain (RMS error / RMS truth), mean and median error (1/s), the medians of white
matter, globus pallidus and CSF against their truths, and the wall time of the call (one
process; numpy's own threads, pinned with ``--threads``).  Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--snr", type=float, nargs="+", default=[200.0, 50.0, 20.0, 10.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="timing repeats (the minimum is kept)")
    args = p.parse_args(argv)

    from threadpoolctl import threadpool_limits

    from qsmflow import registry
    from qsmflow.algorithms.relaxometry import estimate_noise_sigma
    from qsmflow.sims.field import simulate_fields
    from qsmflow.sims.phantom import make_head_phantom
    from qsmflow.sims.signal import simulate_megre

    te = (0.004, 0.008, 0.012, 0.016, 0.020)
    n = args.size
    ph = make_head_phantom(shape=(n, n, n), voxel_size=(160.0 / n,) * 3)
    field = simulate_fields(ph)["total"]
    m = ph.brain_mask
    truth = ph.r2star
    regions = {"WM": ph.labels == 8, "GP": ph.labels == 2, "CSF": ph.labels == 10}
    methods = registry.methods_for("r2star")
    print(
        f"# R2* benchmark, {n}^3 x {len(te)} echoes ({160.0 / n:.2f} mm), "
        f"{int(m.sum())} brain voxels, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, threads {args.threads}, {dt.date.today()}"
    )
    print()
    print(
        "| SNR | sigma est/true | method | NRMSE | mean err (1/s) | median err (1/s) "
        "| WM 20 | GP 45 | CSF 2 | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for snr in args.snr:
        mag, _ = simulate_megre(ph, total_field_ppm=field, te_s=te, b0_tesla=3.0, snr=snr)
        sigma_true = float((ph.m0 * np.exp(-ph.r2star * te[0]))[m].mean()) / snr
        sigma = estimate_noise_sigma(mag, m)
        for name, meth in methods.items():
            best = np.inf
            for _ in range(args.repeats):
                with threadpool_limits(limits=args.threads):
                    t0 = time.perf_counter()
                    r2, _t2 = meth.function(mag, te, mask=m)
                    best = min(best, time.perf_counter() - t0)
            err = (r2 - truth)[m]
            nrmse = float(np.sqrt(np.mean(err**2) / np.mean(truth[m] ** 2)))
            meds = [
                f"{np.median(r2[r & m]):.1f} ({np.median(truth[r & m]):.1f})"
                for r in regions.values()
            ]
            print(
                f"| {snr:g} | {sigma / sigma_true:.3f} | {name} | {100 * nrmse:.1f} % "
                f"| {err.mean():+.2f} | {np.median(err):+.2f} | {' | '.join(meds)} "
                f"| {best:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
