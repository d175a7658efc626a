"""Regional susceptibility values for the report: a simple geometric atlas, magnitude
intensity classes and the reference region.

No anatomical atlas is registered (qsmflow has no registration step), so the regions are
defined from the images themselves and named for what they are:

- geometric atlas of the brain mask (RAS+ canonical orientation): left and right halves
  (about the mask's centre), a deep central zone (voxels deeper than 50 % of the largest
  depth, i.e. distance from the mask's edge; where the iron-rich deep grey nuclei lie) and a
  cortical shell (within 6 mm of the mask edge);
- three magnitude intensity classes (multi-Otsu thresholds, Liao et al., J Inf Sci Eng 2001,
  as in scikit-image) of the echo-averaged magnitude inside the mask: dark (iron-rich grey
  matter, veins, white matter at late echoes), intermediate and bright (CSF and grey matter
  in T1-weighted-like GRE contrast);
- the paramagnetic and diamagnetic tails (chi above +0.1 ppm / below -0.1 ppm);
- the reference region, with the offset that was subtracted from chi.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"voxels": 0, "mean": None, "median": None, "std": None, "p5": None, "p95": None}
    p5, med, p95 = np.percentile(v, [5, 50, 95])
    return {
        "voxels": int(v.size),
        "mean": float(v.mean()),
        "median": float(med),
        "std": float(v.std()),
        "p5": float(p5),
        "p95": float(p95),
    }


def geometric_regions(
    mask: np.ndarray, *, voxel_size=(1.0, 1.0, 1.0), shell_mm: float = 6.0
) -> dict:
    """``{name: (X, Y, Z) bool}``: left/right halves, deep central zone and cortical shell
    of ``mask`` (RAS+ orientation: the first array axis runs from left to right)."""
    mask = np.asarray(mask, dtype=bool)
    depth = ndimage.distance_transform_edt(mask, sampling=[float(v) for v in voxel_size])
    out = {}
    if mask.any():
        cx = float(np.mean(np.nonzero(mask)[0]))
        xs = np.arange(mask.shape[0])[:, None, None]
        out["left half"] = mask & (xs < cx)
        out["right half"] = mask & (xs >= cx)
        out["deep central zone (depth > 50 % of max)"] = depth > 0.5 * depth.max()
        out[f"cortical shell (within {shell_mm:g} mm of the mask edge)"] = mask & (
            depth <= shell_mm
        )
    return out


def magnitude_classes(magnitude: np.ndarray, mask: np.ndarray) -> dict:
    """``{name: (X, Y, Z) bool}``: three multi-Otsu intensity classes of ``magnitude`` inside
    ``mask`` (empty dict if the magnitude has fewer than 3 distinct values there)."""
    from skimage.filters import threshold_multiotsu

    mag = np.asarray(magnitude, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    vals = mag[mask]
    if vals.size < 10 or np.unique(vals[:100000]).size < 3:
        return {}
    try:
        t1, t2 = threshold_multiotsu(vals, classes=3)
    except ValueError:
        return {}
    return {
        "magnitude class 1: dark": mask & (mag <= t1),
        "magnitude class 2: intermediate": mask & (mag > t1) & (mag <= t2),
        "magnitude class 3: bright": mask & (mag > t2),
    }


def regional_table(
    chi: np.ndarray,
    mask: np.ndarray,
    *,
    magnitude=None,
    voxel_size=(1.0, 1.0, 1.0),
    reference_name: str | None = None,
    reference_mask=None,
    reference_offset: float | None = None,
    tail_ppm: float = 0.1,
) -> list[dict]:
    """Rows ``{region, group, voxels, mean, median, std, p5, p95}`` (chi in ppm).

    Parameters
    ----------
    chi : (X, Y, Z) array, ppm (referenced map)
    mask : (X, Y, Z) bool, the mask where chi is valid
    magnitude : (X, Y, Z) array or None, keyword-only; echo-averaged magnitude
    voxel_size : mm, keyword-only
    reference_name, reference_mask, reference_offset : keyword-only
        The reference region (its name and voxels, None when not available to the report) and
        the offset (ppm) subtracted from chi; the reference row reports the referenced values
        there (0 on average by construction for a mean reference) and carries ``offset``.
    tail_ppm : float, keyword-only
        Threshold of the paramagnetic / diamagnetic tail rows.
    """
    chi = np.asarray(chi, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    rows = [{"region": "whole mask", "group": "mask", **_stats(chi[mask])}]
    for name, m in geometric_regions(mask, voxel_size=voxel_size).items():
        rows.append({"region": name, "group": "geometric atlas", **_stats(chi[m])})
    if magnitude is not None:
        for name, m in magnitude_classes(magnitude, mask).items():
            rows.append({"region": name, "group": "intensity cluster", **_stats(chi[m])})
    rows.append(
        {
            "region": f"paramagnetic tail (chi > +{tail_ppm:g} ppm)",
            "group": "chi cluster",
            **_stats(chi[mask & (chi > tail_ppm)]),
        }
    )
    rows.append(
        {
            "region": f"diamagnetic tail (chi < -{tail_ppm:g} ppm)",
            "group": "chi cluster",
            **_stats(chi[mask & (chi < -tail_ppm)]),
        }
    )
    if reference_name is not None:
        ref = (
            np.zeros_like(mask)
            if reference_mask is None
            else np.asarray(reference_mask, bool) & mask
        )  # unknown region: no statistics
        rows.append(
            {
                "region": f"reference: {reference_name}",
                "group": "reference",
                **_stats(chi[ref]),
                "offset": reference_offset,
            }
        )
    return rows


#: boxes of :func:`deep_grey_white_regions`, in fractions of the brain mask's extent:
#: (|left-right offset from the centre| / half width, posterior-to-anterior position,
#: depth below the vertex / anterior-posterior length)
DEEP_GREY_BOX = ((0.24, 0.64), (0.46, 0.72), (0.40, 0.48))
WHITE_MATTER_BOX = ((0.20, 0.60), (0.30, 0.70), (0.17, 0.28))


def deep_grey_white_regions(mask: np.ndarray, affine, *, min_depth_mm: float = 6.0):
    """Registration-free boxes of the deep grey nuclei and of deep white matter in ``mask``.

    No atlas: the boxes are fixed fractions of the brain mask's extent in RAS+ orientation
    (:data:`DEEP_GREY_BOX`, :data:`WHITE_MATTER_BOX`): left-right about the mask's centre in
    units of its half width, anterior-posterior from its back in units of its length, and
    superior-inferior *below the vertex* (the mask's top, which, unlike its bottom, does not
    depend on where the mask cuts the brain stem or the field of view) in units of the
    anterior-posterior length.  The deep grey box holds the lentiform nuclei (putamen and
    globus pallidus) on both sides at the level of the third ventricle; the white-matter box
    the centrum semiovale above the lateral ventricles, on both sides of the midline.  Both
    keep only voxels deeper than ``min_depth_mm`` below the mask's edge.  Checked by eye on
    the Philips 3 T scan of ``../shared/data/philips_megre`` (3 mm): an adult head in a
    standard axial position; a strongly tilted head or a partial field of view would need a
    registered atlas instead.

    Parameters
    ----------
    mask : (X, Y, Z) bool, brain mask in the array's own orientation
    affine : (4, 4) voxel-to-world (RAS mm) of the array

    Returns
    -------
    (deep_grey, white) : two (X, Y, Z) bool arrays in the array's own orientation
    """
    import nibabel as nib

    m = np.asarray(mask, dtype=bool)
    aff = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(aff)
    to_ras = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    mr = nib.orientations.apply_orientation(m, to_ras).astype(bool)
    vs = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    axes = ornt[:, 0].astype(int)
    h = np.zeros(3)
    h[axes] = vs
    if not mr.any():
        e = np.zeros(m.shape, dtype=bool)
        return e, e.copy()
    idx = np.argwhere(mr)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    x, y, z = np.indices(mr.shape, dtype=np.float64)
    u = np.abs(x - (lo[0] + hi[0]) / 2.0) / max((hi[0] - lo[0]) / 2.0, 1.0)
    v = (y - lo[1]) / max(hi[1] - lo[1], 1)
    ap_mm = (hi[1] - lo[1] + 1) * h[1]
    w = (hi[2] - z) * h[2] / ap_mm
    depth = ndimage.distance_transform_edt(np.pad(mr, 1), sampling=h)[1:-1, 1:-1, 1:-1]
    core = mr & (depth > min_depth_mm)

    def box(b):
        (u0, u1), (v0, v1), (w0, w1) = b
        return core & (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1) & (w >= w0) & (w <= w1)

    deep = nib.orientations.apply_orientation(box(DEEP_GREY_BOX), back).astype(bool)
    white = nib.orientations.apply_orientation(box(WHITE_MATTER_BOX), back).astype(bool)
    return deep, white
