"""RTS step-1 LSMR iterations and cone threshold on the realistic cases (benchmarks/RESULTS.md).

Usage::

    python benchmarks/bench_rts_lsmr.py              # in-vivo-like case 64^3 and 96^3,
                                                     # realistic 3T head 96^3 (true local field)

NRMSE (%) = ``||chi - truth|| / ||truth||`` in the mask (in-vivo-like case) or qsm-ci's
demeaned NRMSE (realistic head, as in bench_chain_realistic.py).
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", default="4,6,8,15")
    ap.add_argument("--deltas", default="0.15,0.1")
    args = ap.parse_args(argv)
    iters = [int(v) for v in args.iters.split(",")]
    deltas = [float(v) for v in args.deltas.split(",")]

    from qsm_ci.qsm_eval import nrmse_challenge

    from qsmflow.algorithms.inversion_rts import invert_rts
    from qsmflow.sims.invivo_case import make_invivo_case
    from qsmflow.sims.realistic import make_realistic_head

    print("| case | lsmr_iter | delta | NRMSE % |\n|---|---|---|---|")
    for n in (64, 96):
        c = make_invivo_case((n,) * 3, voxel_size=(160.0 / n,) * 3, seed=0)
        norm = np.linalg.norm(c.chi[c.mask])
        for k in iters:
            for d in deltas:
                x = invert_rts(c.field, c.mask, voxel_size=c.voxel_size, lsmr_iter=k, delta=d).chi
                e = 100 * np.linalg.norm((x - c.chi)[c.mask]) / norm
                print(f"| in-vivo-like {n}^3 | {k} | {d} | {e:.1f} |", flush=True)
    vs = (170.0 / 96,) * 3
    h = make_realistic_head("3t-axial", shape=(96,) * 3, voxel_size=vs)
    for k in iters:
        for d in deltas:
            x = invert_rts(
                h.local_field,
                h.brain_mask,
                voxel_size=vs,
                b0_dir=tuple(h.b0_dir),
                lsmr_iter=k,
                delta=d,
            ).chi
            e = float(nrmse_challenge(x, h.chi_local, h.brain_mask)[0])
            print(f"| realistic 3T 96^3, true local field | {k} | {d} | {e:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
