"""Atlas statistics on arrays: chi and R2* per labelled structure, and the quality checks of a
template registration (pure numpy; the registration itself is :mod:`qsmflow.atlas`).

:func:`label_statistics` turns a label map in the subject's space (an atlas brought back from
template space) into table rows: structure, hemisphere, voxels, mean / median / standard
deviation of chi (ppm) and, when given, of R2* (1/s).  :func:`registration_qc` decides whether
a registration is usable from numbers that need no ground truth and no common contrast (the GRE
magnitude has roughly the inverse grey/white contrast of the T1-weighted template): the Dice
overlap of the brain masks and the correlation ratio of the subject image given the warped
atlas labels, against the same labels mirrored upside down.
"""

from __future__ import annotations

import math
import re

import numpy as np

#: default pass thresholds of :func:`registration_qc` (benchmarks/RESULTS.md "Atlas
#: statistics (issue 23)": the good fits of the known-truth head and of the real Philips scan
#: have Dice >= 0.93, eta^2 >= 0.45 and an eta^2 ratio >= 1.5; a noise image has eta^2 < 0.01,
#: an upside-down known-truth head a ratio of 0.85)
MIN_DICE = 0.80
MIN_ETA = 0.05
MIN_ETA_RATIO = 1.2

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


def correlation_ratio(image: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    """Correlation ratio eta^2 (Roche et al., MICCAI 1998) of ``image`` given ``labels``
    inside ``mask``: the fraction of the image's variance that the label means explain (0..1;
    any contrast, as it needs no intensity mapping between the subject and the template)."""
    m = np.asarray(mask, dtype=bool) & (np.asarray(labels) > 0)
    x = np.asarray(image, dtype=np.float64)[m]
    if x.size < 2 or not x.var() > 0:
        return 0.0
    _, inv = np.unique(np.asarray(labels)[m], return_inverse=True)
    n = np.bincount(inv)
    means = np.bincount(inv, weights=x) / n
    return float((n * (means - x.mean()) ** 2).sum() / (x.size * x.var()))


def registration_qc(
    subject_image: np.ndarray,
    subject_mask: np.ndarray,
    warped_template: np.ndarray,
    warped_template_mask: np.ndarray,
    labels: np.ndarray,
    *,
    si_axis: int = 2,
    min_dice: float = MIN_DICE,
    min_eta: float = MIN_ETA,
    min_eta_ratio: float = MIN_ETA_RATIO,
) -> dict:
    """Whether a template-to-subject registration is usable.

    Three checks, none needing ground truth or a common contrast: the brain mask and the
    warped template's brain overlap (Dice >= ``min_dice``); the warped atlas labels explain
    the subject image (correlation ratio eta^2 >= ``min_eta``: a noise image or a blank fit
    has ~0); and they explain it better than the same labels mirrored top-to-bottom along
    ``si_axis`` (the array axis closest to superior-inferior): eta^2 / eta^2_mirrored >=
    ``min_eta_ratio`` (an upside-down fit, e.g. a wrong header, scores below 1).  The
    normalised mutual information of the image and the warped template is reported too (low
    between the GRE magnitude and the T1 template even for a good fit, so not a check).

    Parameters
    ----------
    subject_image : (X, Y, Z) float
        The image that was registered (magnitude or R2*).
    subject_mask : (X, Y, Z) bool
        The subject's brain mask.
    warped_template, warped_template_mask : (X, Y, Z)
        The template and its brain mask brought into the subject's grid.
    labels : (X, Y, Z) int
        The atlas labels brought into the subject's grid.
    si_axis : int
        Array axis closest to the superior-inferior direction.
    min_dice, min_eta, min_eta_ratio : float
        Pass thresholds (defaults :data:`MIN_DICE`, :data:`MIN_ETA`, :data:`MIN_ETA_RATIO`).

    Returns
    -------
    dict
        ``Dice``, ``Eta2``, ``Eta2Mirrored``, ``Eta2Ratio``, ``NMI``, the thresholds,
        ``Passed`` (bool) and ``Reason`` (one line: why it failed, empty when it passed).
    """
    sm = np.asarray(subject_mask, dtype=bool)
    d = dice(sm, warped_template_mask)
    eta = correlation_ratio(subject_image, labels, sm)
    eta_m = correlation_ratio(subject_image, np.flip(np.asarray(labels), int(si_axis)), sm)
    ratio = eta / eta_m if eta_m > 0 else (math.inf if eta > 0 else 0.0)
    nmi = normalized_mutual_information(subject_image, warped_template, sm)
    reasons = []
    if not d >= min_dice:
        reasons.append(f"brain mask overlap with the warped template Dice {d:.2f} < {min_dice}")
    if not eta >= min_eta:
        reasons.append(f"the atlas labels explain {eta:.1%} of the image (< {min_eta:.0%})")
    elif not ratio >= min_eta_ratio:
        reasons.append(
            f"the atlas labels explain the image no better upside down (eta2 ratio "
            f"{ratio:.2f} < {min_eta_ratio})"
        )
    return {
        "Dice": round(float(d), 4),
        "Eta2": round(float(eta), 4),
        "Eta2Mirrored": round(float(eta_m), 4),
        "Eta2Ratio": round(float(ratio), 3) if math.isfinite(ratio) else None,
        "NMI": round(float(nmi), 4),
        "MinDice": float(min_dice),
        "MinEta2": float(min_eta),
        "MinEta2Ratio": float(min_eta_ratio),
        "Passed": not reasons,
        "Reason": "; ".join(reasons),
    }
