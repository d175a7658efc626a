"""Accuracy of one deep-image-prior fit against its iteration count (CPU).

Usage::

    python benchmarks/bench_dip_curve.py --size 160 --iters 500 --set amp=off  # ~45 min, 2 cores
    python benchmarks/bench_dip_curve.py --size 64 --iters 300 --set net_factor=2 --set init=tv

Runs ``fit_modip`` (published defaults unless ``--set``) on the simulated head of
``bench_dip.py`` (same data file, same metrics) with the residual-plateau stop switched off, and
every ``--every`` iterations scores the late-iterate average that the fit would return if it
stopped there (NRMSE %, HFEN %, XSIM against the true chi).  Each row is appended to
``benchmarks/_out/curve_<size>_<tag>.tsv`` as soon as it is measured, so an interrupted run
keeps what it had.  At the end it prints where the default stopping rule (residual plateau,
1 % over 25 iterations) would have stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_dip import OUT, simulate  # noqa: E402


def parse_set(items) -> dict:
    out = {}
    for item in items:
        key, _, val = item.partition("=")
        for conv in (int, float):
            try:
                val = conv(val)
                break
            except ValueError:
                pass
        out[key] = val
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--case",
        default="",
        help="a case of bench_defaults_real_sim.py (e.g. qsm2016: the real brain vs COSMOS) "
        "instead of bench_dip.py's simulated head",
    )
    a = ap.parse_args(argv)

    from qsm_ci import qsm_eval

    from qsmflow.algorithms.dip import fitting as runner
    from qsmflow.algorithms.dip.modip import fit_modip

    if a.case:
        from bench_defaults_real_sim import load_case

        c = load_case(a.case)
        d = dict(local=c.field, mask=c.mask, chi=c.chi, voxel_size=c.voxel_size, b0=c.b0_dir)
        a.size = a.case
    else:
        d = dict(np.load(simulate(a.size, "axial")))
    truth, mask = d["chi"], d["mask"].astype(bool)
    settings = parse_set(a.set)
    average = float(settings.get("average", 0.9))
    tag = "-".join(f"{k}{v}" for k, v in settings.items()) or "published"
    out = OUT / f"curve_{a.size}_{tag}_s{a.seed}.tsv"
    out.write_text("iteration\tseconds\tresidual_ppm\tnrmse\thfen\txsim\tchange\n")
    t0 = time.perf_counter()
    original = runner.fit

    def traced_fit(problem, stepper, **kw):
        step, state = stepper.step, {"ema": None, "it": 0, "prev": None}

        def step_and_score(it):
            loss, chi, dchi = step(it)
            e = state["ema"]
            state["ema"] = (
                chi.clone() if e is None else e.mul_(average).add_(chi, alpha=1 - average)
            )
            if (it + 1) % a.every == 0:
                # how far the iterate itself moved over the last `every` iterations (relative):
                # the windowed change that a ground-truth-free stopping rule can watch
                prev, state["prev"] = state["prev"], chi.clone()
                change = float("nan")
                if prev is not None:
                    change = float((chi - prev).norm() / chi.norm().clamp_min(1e-12))
                est = problem.paste(state["ema"])
                nrmse, _ = qsm_eval.nrmse_challenge(est * mask, truth * mask, mask)
                res, _ = problem.residual_stats(dchi)
                sec = time.perf_counter() - t0
                hfen = qsm_eval.hfen(est * mask, truth * mask, mask)
                xsim = qsm_eval.xsim(est * mask, truth * mask, mask)
                with open(out, "a") as fh:
                    fh.write(
                        f"{it + 1}\t{sec:.1f}\t{res:.5f}\t{nrmse:.2f}\t{hfen:.2f}\t{xsim:.4f}"
                        f"\t{change:.5f}\n"
                    )
                print(
                    f"it {it + 1}  {sec:.0f} s  residual {res:.4f} ppm  NRMSE {nrmse:.2f}  "
                    f"HFEN {hfen:.2f}  XSIM {xsim:.4f}  change {change:.4f}",
                    flush=True,
                )
            return loss, chi, dchi

        stepper.step = step_and_score
        return original(problem, stepper, **kw)

    runner.fit = traced_fit
    settings.setdefault("plateau_tol", 0.0)
    r = fit_modip(
        d["local"],
        mask,
        voxel_size=tuple(d["voxel_size"]),
        b0_dir=tuple(d["b0"]),
        device="cpu",
        seed=a.seed,
        max_iter=a.iters,
        threads=a.threads,
        **settings,
    )
    rule = runner.StopRule(max_iter=a.iters)  # the default plateau rule, replayed
    for i, h in enumerate(r.history):
        why = rule.update(i, h["residual"], None)
        if why is not None:
            print(f"default stopping rule: {why} at iteration {i + 1}")
            break
    nrmse, _ = qsm_eval.nrmse_challenge(r.chi, truth, mask)
    print(
        f"returned map: NRMSE {nrmse:.2f} after {len(r.history)} iterations "
        f"({r.stopped_reason}); {time.perf_counter() - t0:.0f} s"
    )
    print(f"written {out}")


if __name__ == "__main__":
    main()
