"""Every dipole inversion at its default vs its best setting, on the real 2016 brain AND on the
simulated heads, side by side (issue 19).

Usage::

    python benchmarks/bench_defaults_real_sim.py --cases qsm2016,invivo96,realistic96 \
        --methods tkd,tikhonov,rts,ndi    # appends to benchmarks/_out/defaults_real_sim.jsonl
    python benchmarks/bench_defaults_real_sim.py --table   # markdown from the JSONL

Cases:

* ``qsm2016``: the 2016 QSM challenge in-vivo brain (``../shared/data/qsm2016``, 160^3, 3 T,
  local field by the organisers), scored against COSMOS exactly as the QSM-CI leaderboard does
  (``qsm_ci.qsm_eval.score_arrays``: NRMSE %, HFEN %, XSIM);
* ``qsm2016crop``: its centred 96 x 112 x 80 block (the crop the tests run slow methods on);
* ``qsm2016block64``: its centred 64^3 block (MoDIP's real-brain test; the network methods);
* ``invivo96``: :func:`qsmflow.sims.invivo_case.make_invivo_case` at 96^3 (1.67 mm; the true
  local field with the multi-echo fit's noise, and its noise map);
* ``realistic96``: :func:`qsmflow.sims.realistic.make_realistic_head` ("3t-axial", 96^3) with its
  true local field plus white noise of the in-vivo case's level (0.0011 ppm), no noise map.

Simulated cases are scored by the same ``score_arrays`` against the true chi.  For every method
the default (what ``qsmflow-stage invert --method M`` does) and a sweep of its main parameter are
run; the record holds NRMSE / HFEN / XSIM, seconds, and the weight the default chose.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "_out" / "defaults_real_sim.jsonl"
QSM2016 = HERE.parent.parent / "shared" / "data" / "qsm2016"

#: the sweep of each method's main parameter (best = the best of these and the default)
SWEEPS = {
    "tkd": ("threshold", [0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5]),
    "tikhonov": ("lam", [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3]),
    "tv": ("alpha", [3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3]),
    "rts": ("delta", [0.05, 0.1, 0.15, 0.2, 0.3]),
    "ndi": ("maxit", [10, 20, 50, 100, 200]),
    "medi": ("lam", [100, 300, 1000, 3000]),
}


class Case:
    def __init__(self, name, field, mask, chi, voxel_size, b0_dir=(0, 0, 1), **inputs):
        self.name, self.field, self.mask, self.chi = name, field, mask, chi
        self.voxel_size, self.b0_dir, self.inputs = tuple(voxel_size), tuple(b0_dir), inputs


def load_case(name: str) -> Case:
    if name == "qsm2016block64":  # the centred 64^3 block of tests/test_real_brain_2016.py
        c = load_case("qsm2016")
        sl = tuple(slice(s // 2 - 32, s // 2 + 32) for s in c.mask.shape)
        m = np.ascontiguousarray(c.mask[sl])
        return Case(name, c.field[sl] * m, m, c.chi[sl].copy(), c.voxel_size, c.b0_dir, **c.inputs)
    if name == "qsm2016crop":  # the centred 96 x 112 x 80 block of tests/test_real_brain_2016.py
        c = load_case("qsm2016")
        sl = tuple(slice(s // 2 - h, s // 2 + h) for s, h in zip(c.mask.shape, (48, 56, 40)))
        m = np.ascontiguousarray(c.mask[sl])
        return Case(name, c.field[sl] * m, m, c.chi[sl].copy(), c.voxel_size, c.b0_dir, **c.inputs)
    if name == "qsm2016":
        import nibabel as nib

        def rd(f):
            return np.asarray(nib.load(str(QSM2016 / f)).dataobj, dtype=np.float32)

        p = json.loads((QSM2016 / "params.json").read_text())
        return Case(
            name,
            rd("phs_tissue.nii.gz"),
            rd("msk.nii.gz") > 0,
            rd("chi_cosmos.nii.gz"),
            p["voxel_size"],
            p["B0_dir"],
            te_s=tuple(p["TE"]),
            b0_tesla=p["B0"],
        )
    if name.startswith("invivo"):
        from qsmflow.sims.invivo_case import make_invivo_case

        n = int(name[6:])
        c = make_invivo_case((n,) * 3, voxel_size=(160.0 / n,) * 3, seed=0)
        return Case(name, c.field, c.mask, c.chi, c.voxel_size, noise=c.noise)
    if name.startswith("realistic"):
        from qsmflow.sims.realistic import make_realistic_head

        n = int(name[9:])
        vs = (170.0 / n,) * 3
        h = make_realistic_head("3t-axial", shape=(n,) * 3, voxel_size=vs)
        rng = np.random.default_rng(0)
        f = h.local_field + 0.0011 * rng.standard_normal(h.local_field.shape).astype(np.float32)
        return Case(
            name,
            f * h.brain_mask,
            h.brain_mask,
            h.chi_local,
            vs,
            tuple(h.b0_dir),
            te_s=tuple(h.te_s),
            b0_tesla=h.b0_tesla,
        )
    raise SystemExit(f"unknown case {name!r}")


def score(chi, case: Case) -> dict:
    from qsm_ci.qsm_eval import score_arrays

    m = case.mask
    s, _ = score_arrays(np.asarray(chi) * m, case.chi, m)
    return {k: round(float(s[k]), 3) for k in ("nrmse", "hfen", "xsim")}


def run(method: str, case: Case, **settings) -> dict:
    from qsmflow import registry

    meth = registry.method("invert", method)
    kw = {k: v for k, v in case.inputs.items() if k in meth.inputs}
    if "b0_dir" in meth.parameters:
        kw["b0_dir"] = case.b0_dir
    t = time.perf_counter()
    out = meth.function(case.field, case.mask, voxel_size=case.voxel_size, **kw, **settings)
    secs = time.perf_counter() - t
    rec = {"settings": settings, "seconds": round(secs, 1)}
    chi = getattr(out, "chi", out)
    if hasattr(out, "rule"):
        rec["chosen"] = {"parameter": out.parameter, "value": out.value, "rule": out.rule}
    if hasattr(out, "stopped_reason"):
        rec["chosen"] = {"stop": out.stopped_reason, "iterations": out.sidecar()["iterations"]}
    rec.update(score(chi, case))
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="qsm2016,invivo96,realistic96")
    ap.add_argument("--methods", default="tkd,tikhonov,rts,ndi")
    ap.add_argument("--no-sweep", action="store_true", help="defaults only")
    ap.add_argument("--set", action="append", default=[], help="extra KEY=VALUE for the default")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args(argv)
    if args.table:
        return table()
    from qsmflow import registry

    OUT.parent.mkdir(exist_ok=True)
    for cname in args.cases.split(","):
        case = load_case(cname)
        for method in args.methods.split(","):
            meth = registry.method("invert", method)
            extra = {}
            for kv in args.set:
                k, v = kv.split("=", 1)
                extra[k] = registry.coerce_setting(v, meth.defaults.get(k))
            recs = [dict(run(method, case, **extra), kind="default")]
            print(cname, method, recs[-1], flush=True)
            if not args.no_sweep and method in SWEEPS:
                par, values = SWEEPS[method]
                for v in values:
                    recs.append(dict(run(method, case, **{par: v}), kind="sweep"))
                    print(cname, method, recs[-1], flush=True)
            with OUT.open("a") as fh:
                fh.write(
                    json.dumps(
                        {
                            "case": cname,
                            "method": method,
                            "date": dt.datetime.now().isoformat(timespec="minutes"),
                            "machine": f"{platform.processor() or platform.machine()}",
                            "records": recs,
                        }
                    )
                    + "\n"
                )
    return 0


def table() -> int:
    rows: dict = {}
    for line in OUT.read_text().splitlines():
        r = json.loads(line)
        rows[(r["method"], r["case"])] = r
    cases = sorted({c for _, c in rows}, key=lambda c: (c != "qsm2016", c))
    print("| method | " + " | ".join(f"{c}: default / best (at)" for c in cases) + " |")
    print("|---|" + "---|" * len(cases))
    for method in dict.fromkeys(m for m, _ in rows):
        cells = []
        for c in cases:
            r = rows.get((method, c))
            if not r:
                cells.append("")
                continue
            d = r["records"][0]
            best = min(r["records"], key=lambda x: x["nrmse"])
            at = ", ".join(f"{k}={v}" for k, v in best["settings"].items()) or "default"
            ch = d.get("chosen", {})
            chosen = f" ({ch.get('value', ch.get('iterations'))})" if ch else ""
            cells.append(
                f"{d['nrmse']:.1f}{chosen}, {d['seconds']:.0f} s / {best['nrmse']:.1f} ({at})"
            )
        print(f"| {method} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
