"""Background field removal on a real head, a simulated head and the 2016 brain (issue 20).

Usage::

    nice -n 10 python benchmarks/bench_bfr_real.py --part philips
    nice -n 10 python benchmarks/bench_bfr_real.py --part realistic --size 160
    nice -n 10 python benchmarks/bench_bfr_real.py --part realistic --size 128 --head hard \
        --anatomy cosmos --inversions rts tv     # the harder head, real anatomy (FOV 204 mm)
    nice -n 10 python benchmarks/bench_bfr_real.py --part 2016
    python benchmarks/bench_bfr_real.py --part philips --combine-sigma-mm 0 2   # 0: former default
    python benchmarks/bench_bfr_real.py --part time      # the default chain's seconds at 160^3

Parts (every background removal of ``--bfrs``, each followed by the default inversion, RTS):

``philips``
    The real Philips 3 T whole-head scan (``../shared/data/philips_megre``: 2 echoes, 3 mm),
    converted with qsmflow-convert, then the ``fast`` preset's mask and field mapping.  No ground
    truth; metrics: share of the local field's variance a 2nd-order polynomial explains
    (:func:`qsmflow.algorithms.metrics.polynomial_share`), std of the local field, relative
    data residual of RTS (:func:`qsmflow.algorithms.metrics.data_consistency_residual`, the
    report's figure), and chi of the deep grey nuclei minus the white matter around them
    (:func:`qsmflow.reports.regions.deep_grey_white_regions`).
``realistic``
    :func:`qsmflow.sims.realistic.make_realistic_head` (3 T axial and 7 T oblique) with the true
    brain mask and the true mask dilated and eroded by one voxel (6-connected: the errors real
    masks make); the ``fast`` preset's field mapping inside that mask, then bfr and RTS.
    Metrics: local-field NRMSE (%) by depth below the true brain's edge (< 3, 3-6, 6-10,
    > 10 mm; demeaned over the evaluation region, the bfr's output mask within the true brain)
    and chi NRMSE (qsm-ci's demeaned NRMSE) and slope (``qsm_ci.qsm_eval.linear_fit`` of chi
    on the truth over the evaluation region).  ``--head hard`` builds the harder head
    (``make_realistic_head(hard=True)``: varying CSF, dura, surface veins, irregular air close
    to the cortex, shim field), ``--anatomy cosmos`` takes its brain from the 2016 challenge's
    COSMOS map (skipped when ``../shared/data/qsm2016`` is absent; field of view 204 mm unless
    ``--fov-mm``), ``--inversions`` the inversions after each bfr (default: the preset's).
``2016``
    The 2016 challenge brain's local field (``../shared/data/qsm2016``) plus a simulated
    background: the field of skull (-2 ppm), scalp, outside air and sinus / ear-canal air
    pockets next to the brain (+9.4 ppm), all outside the brain mask.  Metrics: the recovered
    local field against the organisers' (NRMSE), RTS chi against COSMOS
    (``qsm_ci.qsm_eval.score_arrays``), next to RTS on the organisers' local field.

Results go to ``benchmarks/_out/bfr_<part>.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

HERE = Path(__file__).resolve().parent
OUT = HERE / "_out"
SHARED = HERE.parent.parent / "shared" / "data"

#: label -> (registry method, settings)
CANDIDATES = {
    "lbv-robust": ("lbv-robust", {}),
    "lbv": ("lbv", {}),
    "vsharp": ("vsharp", {}),
    "resharp": ("resharp", {}),
    "pdf": ("pdf", {}),
    "lbv-peel1": ("lbv", {"peel": 1}),
    "lbv-peel2": ("lbv", {"peel": 2}),
    "lbv-robust-bc": ("lbv-robust", {"boundary_correction": True}),
}
BANDS = ((0.0, 3.0), (3.0, 6.0), (6.0, 10.0), (10.0, np.inf))


def _meta():
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "load_average": [round(v, 1) for v in os.getloadavg()],
        "python": sys.version.split()[0],
    }


def _bfr(label, field, mask, vs, b0_dir, noise=None):
    from qsmflow.registry import method

    name, settings = CANDIDATES[label]
    m = method("bfr", name)
    kw = dict(settings)
    kw["voxel_size"] = vs
    if "b0_dir" in m.parameters:
        kw["b0_dir"] = tuple(b0_dir)
    if noise is not None and "noise" in m.inputs:
        kw["noise"] = noise
    return m.function(field, mask, **kw)


def _rts(local, mask, vs, b0_dir, name=None):
    """The default inversion (or the registry's ``name`` with its defaults), mean reference."""
    from qsmflow.algorithms import reference
    from qsmflow.config import default_config
    from qsmflow.registry import method

    cfg = default_config()
    name = name or cfg.method("invert")
    inv = method("invert", name)
    settings = cfg.settings("invert") if name == cfg.method("invert") else {}
    chi = inv.function(local, mask, voxel_size=vs, b0_dir=tuple(b0_dir), **settings)
    chi = getattr(chi, "chi", chi)
    if isinstance(chi, tuple):
        chi = chi[0]
    return reference.reference_mean(chi, mask)


def _nrmse(a, b, m):
    a = a[m].astype(np.float64)
    b = b[m].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    return float(100.0 * np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def band_nrmse(local, truth, region, depth_mm):
    """Local-field NRMSE (%) per depth band; both fields demeaned over ``region`` first."""
    a = np.where(region, local - local[region].mean(), 0.0)
    b = np.where(region, truth - truth[region].mean(), 0.0)
    out = {}
    for lo, hi in BANDS:
        band = region & (depth_mm > lo) & (depth_mm <= hi)
        key = f"{lo:g}-{hi:g}mm" if np.isfinite(hi) else f">{lo:g}mm"
        if band.sum() < 50:
            out[key] = None
            continue
        out[key] = round(
            float(100 * np.linalg.norm((a - b)[band]) / max(np.linalg.norm(b[band]), 1e-30)), 1
        )
    return out


def _default_field(phase, mag, te_s, b0_tesla, mask, vs, sigma_mm=None):
    from qsmflow.config import default_config
    from qsmflow.registry import method

    cfg = default_config()
    settings = dict(cfg.settings("combine"))
    if sigma_mm is not None:
        settings["sigma_mm"] = float(sigma_mm)
    out = method("combine", cfg.method("combine")).function(
        phase, mag, te_s=te_s, b0_tesla=b0_tesla, mask=mask, voxel_size=vs, **settings
    )
    return out if not isinstance(out, tuple) else out[0]


# --------------------------------------------------------------------------------------------
# the real Philips scan
# --------------------------------------------------------------------------------------------
def load_philips(workdir):
    """Convert the Philips DICOM with qsmflow-convert; return phase, magnitude (X,Y,Z,E), TE,
    B0 (T) and the affine."""
    import nibabel as nib

    from qsmflow.cli.convert import main as convert_main

    bids = Path(workdir) / "bids"
    if not bids.exists():
        rc = convert_main(
            [str(SHARED / "philips_megre" / "dicom"), str(bids), "-q"]
            + ["--participant-label", "01"]
        )
        if rc != 0:
            raise RuntimeError(f"qsmflow-convert failed ({rc})")
    files = sorted(bids.rglob("*_part-phase_MEGRE.nii.gz"))
    ph, mg, te = [], [], []
    for f in files:
        side = json.loads(Path(str(f).replace(".nii.gz", ".json")).read_text())
        te.append(float(side["EchoTime"]))
        ph.append(np.asarray(nib.load(str(f)).dataobj, dtype=np.float32))
        fm = Path(str(f).replace("part-phase", "part-mag"))
        mg.append(np.asarray(nib.load(str(fm)).dataobj, dtype=np.float32))
        b0 = float(side["MagneticFieldStrength"])
        aff = nib.load(str(f)).affine
    order = np.argsort(te)
    ph = np.stack([ph[i] for i in order], axis=-1)
    mg = np.stack([mg[i] for i in order], axis=-1)
    return ph, mg, tuple(te[i] for i in order), b0, aff


def part_philips(args, bfrs):
    from qsmflow.algorithms.dipole import b0_dir_from_affine, voxel_size_from_affine
    from qsmflow.algorithms.metrics import data_consistency_residual, polynomial_share
    from qsmflow.config import default_config
    from qsmflow.registry import method
    from qsmflow.reports.regions import deep_grey_white_regions

    with tempfile.TemporaryDirectory() as tmp:
        ph, mg, te, b0, aff = load_philips(tmp)
    vs = tuple(float(v) for v in voxel_size_from_affine(aff))
    b0_dir = b0_dir_from_affine(aff)
    cfg = default_config()
    mask = method("mask", cfg.method("mask")).function(
        mg, phase=ph, te_s=te, voxel_size=vs, **cfg.settings("mask")
    )
    rows = []
    for sigma in args.combine_sigma_mm or [None]:
        field = _default_field(ph, mg, te, b0, mask, vs, sigma)
        for label in bfrs:
            t = time.perf_counter()
            local, m_out = _bfr(label, field, mask, vs, b0_dir)
            t_bfr = time.perf_counter() - t
            chi = _rts(local, m_out, vs, b0_dir)
            deep, white = deep_grey_white_regions(m_out, aff)
            row = {
                "part": "philips",
                "bfr": label,
                "combine_sigma_mm": sigma,
                "voxels": int(m_out.sum()),
                "poly_share_pct": round(100 * polynomial_share(local, m_out, voxel_size=vs), 1),
                "local_std_ppm": round(float(local[m_out].std()), 4),
                "rel_residual": round(
                    data_consistency_residual(
                        np.where(m_out, chi, 0), local, m_out, voxel_size=vs, b0_dir=b0_dir
                    ),
                    3,
                ),
                "deep_minus_white_ppm": round(
                    float(np.median(chi[deep & m_out]) - np.median(chi[white & m_out])), 4
                ),
                "bfr_s": round(t_bfr, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# the realistic simulated head
# --------------------------------------------------------------------------------------------
def _head(preset, n, head="standard", anatomy="phantom", fov_mm=None):
    import pickle

    from qsmflow.sims.realistic import make_realistic_head

    fov = fov_mm or (204.0 if anatomy == "cosmos" else 170.0)
    vs = (fov / n,) * 3
    tag = "" if (head, anatomy, fov) == ("standard", "phantom", 170.0) else f"_{head}_{anatomy}"
    tag += "" if fov_mm is None else f"_fov{fov:g}"
    cache = OUT / f"realistic_{preset}_{n}{tag}.pkl"  # same cache as bench_chain_realistic.py
    if cache.exists():
        return pickle.loads(cache.read_bytes()), vs
    kw = {"hard": head == "hard", "anatomy": anatomy}
    if anatomy == "cosmos":
        kw["anatomy_dir"] = SHARED / "qsm2016"
    head = make_realistic_head(preset, shape=(n, n, n), voxel_size=vs, **kw)
    OUT.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(pickle.dumps(head))
    return head, vs


def part_realistic(args, bfrs):
    from qsm_ci.qsm_eval import linear_fit

    from qsmflow.algorithms.background import _distance_to_outside

    rows = []
    if args.anatomy == "cosmos" and not (SHARED / "qsm2016" / "chi_cosmos.nii.gz").is_file():
        print(f"# skipped: anatomy cosmos needs {SHARED / 'qsm2016'}", flush=True)
        return rows
    for preset in args.presets:
        t = time.perf_counter()
        head, vs = _head(preset, args.size, args.head, args.anatomy, args.fov_mm)
        print(f"# {preset} {args.size}^3 in {time.perf_counter() - t:.0f} s", flush=True)
        truth = head.brain_mask
        depth = _distance_to_outside(truth, vs)
        masks = {
            "true": truth,
            "dilated-1": ndi.binary_dilation(truth),
            "eroded-1": ndi.binary_erosion(truth),
        }
        for mname in args.masks:
            mask = masks[mname]
            t = time.perf_counter()
            field = _default_field(
                head.phase, head.magnitude, head.te_s, head.b0_tesla, mask, vs, args.sigma_one
            )
            t_field = time.perf_counter() - t
            for label in bfrs:
                t = time.perf_counter()
                local, m_out = _bfr(label, field, mask, vs, head.b0_dir)
                t_bfr = time.perf_counter() - t
                ev = m_out & truth
                for inv in args.inversions or [None]:
                    t = time.perf_counter()
                    chi = _rts(local, m_out, vs, head.b0_dir, inv)
                    t_inv = time.perf_counter() - t
                    row = {
                        "part": "realistic",
                        "head": args.head,
                        "anatomy": args.anatomy,
                        "preset": preset,
                        "size": args.size,
                        "voxel_mm": round(vs[0], 3),
                        "mask": mname,
                        "bfr": label,
                        "invert": inv or "default",
                        "coverage": round(float(ev.sum() / truth.sum()), 3),
                        "local_nrmse": round(_nrmse(local, head.local_field, ev), 1),
                        "local_bands": band_nrmse(local, head.local_field, ev, depth),
                        "chi_nrmse": round(_nrmse(chi, head.chi_local, ev), 1),
                        "chi_slope": round(linear_fit(head.chi_local[ev], chi[ev])[0], 3),
                        "seconds": [round(t_field, 1), round(t_bfr, 1), round(t_inv, 1)],
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if rows:
        print(table_realistic(rows))
    return rows


def table_realistic(rows) -> str:
    """Markdown table of the realistic part; 'vs true' = chi NRMSE minus the true mask's."""
    ref = {
        (r["preset"], r["bfr"], r["invert"]): r["chi_nrmse"] for r in rows if r["mask"] == "true"
    }
    lines = [
        "| head | preset | mask | bfr | invert | coverage | local NRMSE | <3 mm | 3-6 mm | "
        "6-10 mm | >10 mm | chi NRMSE | vs true mask | chi slope |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = [("-" if v is None else f"{v:.1f}") for v in r["local_bands"].values()]
        t = ref.get((r["preset"], r["bfr"], r["invert"]))
        cost = "" if (r["mask"] == "true" or t is None) else f"{r['chi_nrmse'] - t:+.1f}"
        lines.append(
            f"| {r['head']}/{r['anatomy']} | {r['preset']} | {r['mask']} | {r['bfr']} | "
            f"{r['invert']} | {r['coverage']:.3f} | {r['local_nrmse']:.1f} | {' | '.join(b)} | "
            f"{r['chi_nrmse']:.1f} | {cost} | {r['chi_slope']:.2f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the 2016 brain + a simulated background
# --------------------------------------------------------------------------------------------
def simulated_background(mask, vs, b0_dir, seed=0):
    """Harmonic background inside ``mask``: field (ppm) of sources outside it.

    Around the brain: 2 mm gap, 7 mm skull (-2 ppm rel. water), 6 mm scalp (-0.02), air
    outside (+9.4); three air pockets (frontal sinus, two mastoid / ear-canal cavities) whose
    walls lie 3 mm from the brain mask.  The field is the continuous-kernel dipole field of
    ``chi - chi_air`` with 2x zero padding; only its values inside ``mask`` are used.
    """
    from qsmflow.algorithms.background import _distance_to_outside
    from qsmflow.algorithms.dipole import DipoleOperator

    h = np.asarray(vs, float)
    out_d = ndi.distance_transform_edt(~mask, sampling=h)  # distance outside the brain (mm)
    chi = np.full(mask.shape, 9.4, np.float32)  # air
    chi[out_d <= 15.0] = -0.02  # scalp
    chi[out_d <= 9.0] = -2.0  # skull
    chi[out_d <= 2.0] = 0.0  # CSF / dura gap
    chi[mask] = 0.0
    # air pockets: spheres centred 3 mm + radius outside the brain, at the front and the sides
    idx = np.argwhere(mask)
    c = idx.mean(axis=0)
    ext = (idx.max(axis=0) - idx.min(axis=0)) / 2.0
    grid = np.indices(mask.shape).astype(np.float32)
    for direction, radius in (((0, 1, -0.3), 9.0), ((1, 0, -0.5), 7.0), ((-1, 0, -0.5), 7.0)):
        d = np.asarray(direction, float)
        d /= np.linalg.norm(d)
        # walk from the centre to the brain surface along d, then out by 3 mm + radius
        p = c.copy()
        for _ in range(int(2 * ext.max())):
            q = np.round(p + d).astype(int)
            if not mask[tuple(np.clip(q, 0, np.array(mask.shape) - 1))]:
                break
            p = p + d
        centre = p + d * (3.0 + radius) / h
        r2 = sum(((grid[i] - centre[i]) * h[i]) ** 2 for i in range(3))
        chi[(r2 <= radius**2) & ~mask] = 9.4
    op = DipoleOperator(mask.shape, voxel_size=vs, b0_dir=b0_dir, pad_factor=2.0, dtype=np.float32)
    bg = op.forward(chi - np.float32(9.4)).astype(np.float32)
    del _distance_to_outside
    return bg


def part_2016(args, bfrs):
    import nibabel as nib
    from qsm_ci.qsm_eval import score_arrays

    d = SHARED / "qsm2016"
    local_true = np.asarray(nib.load(str(d / "phs_tissue.nii.gz")).dataobj, dtype=np.float32)
    mask = np.asarray(nib.load(str(d / "msk.nii.gz")).dataobj) > 0
    cosmos = np.asarray(nib.load(str(d / "chi_cosmos.nii.gz")).dataobj, dtype=np.float32)
    p = json.loads((d / "params.json").read_text())
    vs = tuple(float(v) for v in p["voxel_size"])
    b0_dir = tuple(float(v) for v in p["B0_dir"])
    bg = simulated_background(mask, vs, b0_dir)
    total = np.where(mask, local_true + bg, 0).astype(np.float32)
    rows = []

    def score(chi, m):
        res = score_arrays(np.where(m, chi, 0) * mask, cosmos, mask)
        sc = res[0] if isinstance(res, tuple) else res
        return round(float(sc["nrmse"]), 1), round(float(sc["hfen"]), 1)

    chi0 = _rts(local_true, mask, vs, b0_dir)
    n0, h0 = score(chi0, mask)
    rows.append(
        {"part": "2016", "bfr": "(organisers' local field)", "chi_nrmse": n0, "chi_hfen": h0}
    )
    print(json.dumps(rows[-1]), flush=True)
    bgs = float(bg[mask].std())
    for label in bfrs:
        t = time.perf_counter()
        local, m_out = _bfr(label, total, mask, vs, b0_dir)
        t_bfr = time.perf_counter() - t
        chi = _rts(local, m_out, vs, b0_dir)
        # the same inversion of the organisers' field on the same (eroded) mask: what the
        # background removal itself costs, the erosion aside
        chi_ref = _rts(local_true, m_out, vs, b0_dir)
        n, hf = score(chi, m_out)
        nr, _ = score(chi_ref, m_out)
        row = {
            "part": "2016",
            "bfr": label,
            "background_std_ppm": round(bgs, 3),
            "coverage": round(float(m_out.sum() / mask.sum()), 3),
            "local_nrmse": round(_nrmse(local, local_true, m_out), 1),
            "chi_nrmse": n,
            "chi_hfen": hf,
            "chi_nrmse_organisers_field_same_mask": nr,
            "bfr_s": round(t_bfr, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def part_time(args, bfrs):
    """Wall and CPU seconds of the default chain (the ``fast`` preset) on the realistic head."""
    import resource

    from qsmflow.config import default_config
    from qsmflow.registry import method

    def cpu():
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    cfg = default_config()
    rows = []
    for preset in args.presets:
        head, vs = _head(preset, args.size)
        times = {}
        w0, c0 = time.perf_counter(), cpu()
        t, c = w0, c0
        mask = method("mask", cfg.method("mask")).function(
            head.magnitude, phase=head.phase, te_s=head.te_s, voxel_size=vs, **cfg.settings("mask")
        )
        times["mask"] = (time.perf_counter() - t, cpu() - c)
        t, c = time.perf_counter(), cpu()
        field = _default_field(head.phase, head.magnitude, head.te_s, head.b0_tesla, mask, vs)
        times["combine"] = (time.perf_counter() - t, cpu() - c)
        t, c = time.perf_counter(), cpu()
        local, m_out = method("bfr", cfg.method("bfr")).function(
            field, mask, voxel_size=vs, **cfg.settings("bfr")
        )
        times["bfr"] = (time.perf_counter() - t, cpu() - c)
        t, c = time.perf_counter(), cpu()
        chi = _rts(local, m_out, vs, head.b0_dir)
        times["invert+reference"] = (time.perf_counter() - t, cpu() - c)
        total = (time.perf_counter() - w0, cpu() - c0)
        ev = m_out & head.brain_mask
        row = {
            "part": "time",
            "preset": preset,
            "size": args.size,
            "methods": {s: cfg.method(s) for s in ("mask", "combine", "bfr", "invert")},
            "wall_cpu_s": {k: [round(a, 1), round(b, 1)] for k, (a, b) in times.items()},
            "total_wall_s": round(total[0], 1),
            "total_cpu_s": round(total[1], 1),
            "load_average": [round(v, 1) for v in os.getloadavg()],
            "chi_nrmse": round(_nrmse(chi, head.chi_local, ev), 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("philips", "realistic", "2016", "time"), required=True)
    ap.add_argument("--bfrs", nargs="*", default=list(CANDIDATES))
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--presets", nargs="*", default=["3t-axial", "7t-oblique"])
    ap.add_argument("--masks", nargs="*", default=["true", "dilated-1", "eroded-1"])
    ap.add_argument(
        "--combine-sigma-mm",
        type=float,
        nargs="*",
        default=None,
        help="philips: field mapping's MCPC-3D-S smoothing (mm) to try (default: the preset's)",
    )
    ap.add_argument("--sigma-one", type=float, default=None, help="realistic: the same, one value")
    ap.add_argument("--head", choices=("standard", "hard"), default="standard", help="realistic")
    ap.add_argument("--anatomy", choices=("phantom", "cosmos"), default="phantom", help="realistic")
    ap.add_argument("--fov-mm", type=float, default=None, help="realistic: field of view (mm)")
    ap.add_argument(
        "--inversions", nargs="*", default=None, help="realistic: inversions (default: preset's)"
    )
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=2):
        parts = {"philips": part_philips, "realistic": part_realistic, "2016": part_2016}
        parts["time"] = part_time
        rows = parts[args.part](args, args.bfrs)
    OUT.mkdir(parents=True, exist_ok=True)
    tag = args.part + (f"_{args.size}" if args.part in ("realistic", "time") else "")
    if args.part == "realistic" and (args.head, args.anatomy) != ("standard", "phantom"):
        tag += f"_{args.head}_{args.anatomy}"
    if args.part == "realistic" and args.inversions:
        tag += "_" + "-".join(args.inversions)
    path = OUT / f"bfr_{tag}.json"
    path.write_text(json.dumps({"meta": _meta(), "rows": rows}, indent=1))
    print(f"# wrote {path}; {_meta()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
