"""Atlas statistics (issue 23): registration time at 1 mm on 2 cores, accuracy on the known
truth, and which subject image registers best (echo-1 magnitude or R2*).

Usage::

    nice python benchmarks/bench_atlas.py                 # everything (~10 min on 2 cores)
    nice python benchmarks/bench_atlas.py --parts known   # only the known-truth head

Parts:

* ``known``: the known-truth head of ``tests/test_atlas.py`` (the MNI template and the
  Neuromorphometrics atlas placed in a subject grid by a known rotation + scaling +
  translation; chi constant per structure) at 1 mm (200 x 200 x 170 voxels) and 2 mm; ANTs
  ``affine`` and ``syn-quick`` with 2 ITK threads: seconds, QC, chi recovery per structure.
* ``philips``: the real Philips 3 T 2-echo scan (``../shared/data/philips_megre``, 3 mm,
  converted with qsmflow-convert), brain mask ``mask_bet``: registration of the echo-1
  magnitude and of R2* (2-echo log ratio, :func:`qsmflow.algorithms.relaxometry.r2star_arlo`)
  with ``syn-quick``: QC (Dice, NMI) and an overlay PNG of each under ``--out``.
* ``realistic``: the simulated realistic head (``qsmflow.sims.realistic``, 3t-axial, 6 echoes,
  128^3 at 1.3 mm): the same two images.  Its anatomy is analytic (ellipsoids), so only the
  QC numbers mean something, not the labels.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _known(voxel_mm, transform):
    from test_atlas import known_truth_head

    from qsmflow import atlas as A

    h = known_truth_head(voxel_mm)
    t0 = time.perf_counter()
    res = A.atlas_statistics(
        h["chi"],
        h["brain"],
        h["affine"],
        image=h["image"],
        r2star=h["r2star"],
        transform=transform,
        threads=2,
    )
    total = time.perf_counter() - t0
    rows = [r for r in res.rows if r["voxels"] >= 30]
    med = np.array([abs(r["chi_median"] - h["chi_of"][r["label"]]) for r in rows])
    mean = np.array([abs(r["chi_mean"] - h["chi_of"][r["label"]]) for r in rows])
    return {
        "part": "known",
        "voxel_mm": voxel_mm,
        "shape": list(h["image"].shape),
        "transform": transform,
        "registration_s": round(res.seconds, 1),
        "total_s": round(total, 1),
        "qc": res.qc,
        "structures": len(rows),
        "median_exact_fraction": round(float((med < 1e-6).mean()), 3),
        "mean_abs_error_ppm": round(float(mean.mean()), 4),
        "max_abs_error_ppm": round(float(mean.max()), 4),
    }


def _images_of(mag4d, te_s, mask):
    from qsmflow.algorithms.relaxometry import r2star_arlo

    r2 = r2star_arlo(mag4d, te_s, mask=mask)
    r2 = r2[0] if isinstance(r2, tuple) else r2
    r2 = np.clip(np.nan_to_num(np.asarray(r2, dtype=np.float32)), 0, 200)
    return {"magnitude": mag4d[..., 0], "r2star": r2}


def _compare(part, mag4d, te_s, mask, affine, out: Path, transform="syn-quick"):
    from qsmflow import atlas as A
    from qsmflow.reports.atlas import atlas_mosaic

    vs = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    results = []
    for name, img in _images_of(mag4d, te_s, mask).items():
        res = A.atlas_statistics(
            np.zeros(mask.shape, np.float32),
            mask,
            affine,
            image=img,
            registered_image=name,
            transform=transform,
            threads=2,
        )
        png = atlas_mosaic(mag4d[..., 0], res.labels, mask, voxel_size=vs, title=f"{part}: {name}")
        (out / f"atlas_{part}_{name}.png").write_bytes(png)
        results.append(
            {
                "part": part,
                "image": name,
                "transform": transform,
                "shape": list(mask.shape),
                "registration_s": round(res.seconds, 1),
                "qc": res.qc,
            }
        )
    return results


def _philips(out: Path):
    import subprocess

    import nibabel as nib

    from qsmflow.algorithms.masking import mask_bet

    dicom = ROOT.parent / "shared" / "data" / "philips_megre" / "dicom"
    bids = out / "philips_bids"
    if not bids.is_dir():
        subprocess.run(
            ["qsmflow-convert", str(dicom), str(bids), "--participant-label", "01", "-q"],
            check=True,
        )
    mags = sorted(bids.rglob("*_part-mag_MEGRE.nii.gz"))
    imgs = [nib.load(str(p)) for p in mags]
    te = [json.loads(Path(str(p).replace(".nii.gz", ".json")).read_text())["EchoTime"]
          for p in mags]  # fmt: skip
    mag4d = np.stack([np.asarray(i.dataobj, dtype=np.float32) for i in imgs], axis=-1)
    vs = imgs[0].header.get_zooms()[:3]
    mask = mask_bet(mag4d, voxel_size=vs)
    return _compare("philips", mag4d, te, mask, imgs[0].affine, out)


def _realistic(out: Path):
    from qsmflow.sims.realistic import make_realistic_head

    h = make_realistic_head("3t-axial", shape=(128, 128, 128), voxel_size=(1.3, 1.3, 1.3))
    return _compare("realistic", np.asarray(h.magnitude), h.te_s, h.brain_mask, h.affine, out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["known", "philips", "realistic"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "_out" / "atlas")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    if "known" in args.parts:
        for vox, tr in ((2.0, "affine"), (1.0, "affine"), (1.0, "syn-quick")):
            results.append(_known(vox, tr))
            print(json.dumps(results[-1]), flush=True)
    if "philips" in args.parts:
        for r in _philips(args.out):
            results.append(r)
            print(json.dumps(r), flush=True)
    if "realistic" in args.parts:
        for r in _realistic(args.out):
            results.append(r)
            print(json.dumps(r), flush=True)
    meta = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "itk_threads": 2,
    }
    (args.out / "bench_atlas.json").write_text(json.dumps({**meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
