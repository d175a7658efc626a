"""Atlas statistics on arrays: chi and R2* per labelled structure, and the quality checks of a
template registration (pure numpy; the registration itself is :mod:`qsmflow.atlas`).

:func:`label_statistics` turns a label map in the subject's space (an atlas brought back from
template space) into table rows: structure, hemisphere, voxels, mean / median / standard
deviation of chi (ppm) and, when given, of R2* (1/s).  :func:`registration_qc` decides whether
a registration is usable from two numbers that need no ground truth: the Dice overlap of the
subject's brain mask with the template's brain mask brought into the subject's space, and the
normalised mutual information (Studholme et al., Pattern Recognit 1999) of the subject image
and the warped template inside the brain mask.  Mutual information, not correlation: the
GRE magnitude has the inverse grey/white contrast of the T1-weighted template.
"""

from __future__ import annotations

import math
import re

import numpy as np

#: default pass thresholds of :func:`registration_qc` (benchmarks/RESULTS.md "Atlas
#: statistics": good fits of the known-truth head, the realistic simulated head and the real
#: Philips scan have Dice >= 0.90 and NMI >= 1.10; a noise image, an upside-down header and a
#: template left unregistered fall below)
MIN_DICE = 0.80
MIN_NMI = 1.05

_LEFT = re.compile(r"^(left|lh|l)[-_ ]+|[-_ ]+(left|lh|l)$|^ctx-lh-", re.I)
_RIGHT = re.compile(r"^(right|rh|r)[-_ ]+|[-_ ]+(right|rh|r)$|^ctx-rh-", re.I)


def split_hemisphere(name: str) -> tuple[str, str]:
    """``(structure, hemisphere)`` of an atlas label name: ``"Left_Putamen"``,
    ``"Putamen_L"``, ``"Left-Putamen"``, ``"ctx-lh-insula"`` -> ``("Putamen", "left")``;
    a name with no side (``"3rd_Ventricle"``) -> ``(name, "n/a")``."""
    name = str(name).strip()
    for side, pat in (("left", _LEFT), ("right", _RIGHT)):
        if pat.search(name):
            base = pat.sub("", name, count=1).strip("-_ ")
            return (base or name), side
    return name, "n/a"


def _stats(values: np.ndarray) -> tuple[float, float, float]:
    if values.size == 0:
        return (math.nan, math.nan, math.nan)
    v = values.astype(np.float64)
    return float(v.mean()), float(np.median(v)), float(v.std())


def label_statistics(
    labels: np.ndarray,
    chi: np.ndarray,
    mask: np.ndarray,
    names: dict,
    *,
    r2star: np.ndarray | None = None,
    min_voxels: int = 1,
) -> list[dict]:
    """Per-structure statistics of chi (and R2*) inside ``mask``.

    Parameters
    ----------
    labels : (X, Y, Z) int
        Atlas labels in the subject's space (0: no structure).
    chi : (X, Y, Z) float
        Susceptibility (ppm), relative to whatever reference the map has.
    mask : (X, Y, Z) bool
        Where chi is valid; voxels outside are not counted.
    names : dict
        ``{label value: structure name}``; labels not in it are ignored.
    r2star : (X, Y, Z) float, optional
        R2* (1/s); its columns are NaN when not given.  Non-finite R2* voxels are left out
        of the R2* statistics only.
    min_voxels : int
        Structures with fewer voxels inside ``mask`` are left out.

    Returns
    -------
    list of dict
        One row per structure, in label order: ``label`` (int), ``structure``,
        ``hemisphere`` (``left``/``right``/``n/a``), ``voxels`` (inside ``mask``),
        ``coverage`` (fraction of the structure's voxels in the subject's grid that lie in
        ``mask``), ``chi_mean``, ``chi_median``, ``chi_std`` (ppm), ``r2star_mean``,
        ``r2star_median``, ``r2star_std`` (1/s; NaN without R2*).
    """
    labels = np.asarray(labels)
    mask = np.asarray(mask, dtype=bool)
    chi = np.asarray(chi)
    if labels.shape != mask.shape or chi.shape != mask.shape:
        raise ValueError(
            f"labels {labels.shape}, chi {chi.shape} and mask {mask.shape} must have one shape"
        )
    if r2star is not None and np.shape(r2star) != mask.shape:
        raise ValueError(f"r2star {np.shape(r2star)} and mask {mask.shape} must have one shape")
    # one pass over the label map: sort the voxels by label once
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    sorted_lab = flat[order]
    present, starts, counts = np.unique(sorted_lab, return_index=True, return_counts=True)
    m_flat, c_flat = mask.ravel(), chi.ravel()
    r_flat = None if r2star is None else np.asarray(r2star).ravel()
    rows = []
    for lab, start, count in zip(present, starts, counts, strict=True):
        lab = int(lab)
        if lab == 0 or lab not in names:
            continue
        idx = order[start : start + count]
        inside = idx[m_flat[idx]]
        if inside.size < max(int(min_voxels), 1):
            continue
        structure, hemi = split_hemisphere(names[lab])
        cm, cmed, cs = _stats(c_flat[inside])
        if r_flat is not None:
            rv = r_flat[inside]
            rm, rmed, rs = _stats(rv[np.isfinite(rv)])
        else:
            rm = rmed = rs = math.nan
        rows.append(
            {
                "label": lab,
                "structure": structure,
                "hemisphere": hemi,
                "voxels": int(inside.size),
                "coverage": float(inside.size / count),
                "chi_mean": cm,
                "chi_median": cmed,
                "chi_std": cs,
                "r2star_mean": rm,
                "r2star_median": rmed,
                "r2star_std": rs,
            }
        )
    return rows


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap ``2|A&B| / (|A| + |B|)`` of two boolean masks (0 if both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    den = int(a.sum()) + int(b.sum())
    return 0.0 if den == 0 else 2.0 * int((a & b).sum()) / den


def normalized_mutual_information(
    a: np.ndarray, b: np.ndarray, mask: np.ndarray, *, bins: int = 32
) -> float:
    """Normalised mutual information ``(H(A) + H(B)) / H(A, B)`` (Studholme et al. 1999) of
    two images inside ``mask``: 1 for independent images, 2 for images that determine each
    other; intensities are binned between their 1st and 99th percentiles."""
    m = np.asarray(mask, dtype=bool)
    x, y = np.asarray(a, dtype=np.float64)[m], np.asarray(b, dtype=np.float64)[m]
    if x.size < 2:
        return 1.0

    def binned(v):
        lo, hi = np.percentile(v, [1, 99])
        if not hi > lo:
            return np.zeros(v.shape, dtype=np.int64)
        return np.clip(((v - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)

    joint = np.bincount(binned(x) * bins + binned(y), minlength=bins * bins).astype(np.float64)
    p = joint / joint.sum()
    px, py = p.reshape(bins, bins).sum(axis=1), p.reshape(bins, bins).sum(axis=0)

    def entropy(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    hxy = entropy(p)
    return 1.0 if hxy == 0 else (entropy(px) + entropy(py)) / hxy


def registration_qc(
    subject_image: np.ndarray,
    subject_mask: np.ndarray,
    warped_template: np.ndarray,
    warped_template_mask: np.ndarray,
    *,
    min_dice: float = MIN_DICE,
    min_nmi: float = MIN_NMI,
) -> dict:
    """Whether a template-to-subject registration is usable.

    Parameters
    ----------
    subject_image : (X, Y, Z) float
        The image that was registered (magnitude or R2*).
    subject_mask : (X, Y, Z) bool
        The subject's brain mask.
    warped_template, warped_template_mask : (X, Y, Z)
        The template and its brain mask brought into the subject's grid.
    min_dice, min_nmi : float
        Pass thresholds (defaults :data:`MIN_DICE`, :data:`MIN_NMI`).

    Returns
    -------
    dict
        ``Dice``, ``NMI``, ``MinDice``, ``MinNMI``, ``Passed`` (bool) and ``Reason`` (one
        line: why it failed, empty when it passed).
    """
    sm = np.asarray(subject_mask, dtype=bool)
    d = dice(sm, warped_template_mask)
    nmi = normalized_mutual_information(subject_image, warped_template, sm)
    reasons = []
    if not d >= min_dice:
        reasons.append(f"brain mask overlap with the warped template Dice {d:.2f} < {min_dice}")
    if not nmi >= min_nmi:
        reasons.append(f"normalised mutual information {nmi:.3f} < {min_nmi}")
    return {
        "Dice": round(float(d), 4),
        "NMI": round(float(nmi), 4),
        "MinDice": float(min_dice),
        "MinNMI": float(min_nmi),
        "Passed": not reasons,
        "Reason": "; ".join(reasons),
    }
