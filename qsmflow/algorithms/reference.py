"""Susceptibility referencing: chi is only determined up to a constant.

The dipole kernel vanishes at k = 0 (``D(0) = 0``), so the mean of chi is not measured and a
QSM map must be referenced to a region of known susceptibility (Deistung, Schweser &
Reichenbach, NMR Biomed 2017, "Overview of quantitative susceptibility mapping", section on
referencing; Straub et al., MRM 2017, "Potential pitfalls when using susceptibility
reference regions"; QSM Consensus Organization Committee, MRM 2024, which recommends
reporting the reference used, e.g. whole brain or CSF).
"""

from __future__ import annotations

import numpy as np

__all__ = ["reference_mean", "reference_csf", "reference_offset"]


def _check(chi, mask):
    chi = np.asarray(chi)
    mask = np.asarray(mask)
    if chi.ndim != 3:
        raise ValueError(f"chi must be 3D (X, Y, Z), got shape {chi.shape}")
    if mask.shape != chi.shape:
        raise ValueError(f"mask shape {mask.shape} does not match chi {chi.shape}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("mask is empty")
    if not np.all(np.isfinite(chi[mask])):
        raise ValueError("chi has non-finite values inside the mask")
    return chi, mask


def _shift(chi, mask, offset):
    out = np.zeros(chi.shape, dtype=np.float32)
    out[mask] = (chi[mask].astype(np.float64) - offset).astype(np.float32)
    return out


def reference_mean(chi: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reference chi to its mean over the mask (whole-brain reference).

    Parameters
    ----------
    chi : (X, Y, Z) array, ppm
    mask : (X, Y, Z) bool, non-empty

    Returns
    -------
    (X, Y, Z) float32, ppm: ``chi - mean(chi[mask])`` inside the mask, 0 outside.

    Notes
    -----
    Whole-brain mean referencing, the default of many pipelines (Deistung et al., NMR Biomed
    2017; Straub et al., MRM 2017).
    """
    chi, mask = _check(chi, mask)
    return _shift(chi, mask, float(np.mean(chi[mask], dtype=np.float64)))


def reference_csf(
    chi: np.ndarray,
    mask: np.ndarray,
    *,
    csf_mask: np.ndarray | None = None,
    magnitude: np.ndarray | None = None,
    r2star: np.ndarray | None = None,
    min_voxels: int = 10,
) -> np.ndarray:
    """Reference chi to the mean over a CSF region (Straub et al., MRM 2017).

    Parameters
    ----------
    chi : (X, Y, Z) array, ppm
    mask : (X, Y, Z) bool brain mask, non-empty
    csf_mask : (X, Y, Z) bool or None, keyword-only
        CSF (e.g. lateral ventricles) region; it is intersected with ``mask``.  Required:
        automatic CSF estimation from ``magnitude`` / ``r2star`` is not implemented because it
        is not robust without a segmentation (ventricles vs. sulcal CSF vs. vessels; Straub
        et al. 2017 show the reference choice changes values by tens of ppb).
    magnitude, r2star : ignored, keyword-only
        Accepted so the command line can pass them; see ``csf_mask``.
    min_voxels : int, keyword-only
        Minimum number of CSF voxels inside the brain mask.

    Returns
    -------
    (X, Y, Z) float32, ppm: ``chi - mean(chi[csf_mask & mask])`` inside ``mask``, 0 outside.
    """
    chi, mask = _check(chi, mask)
    if csf_mask is None:
        raise ValueError(
            "reference_csf needs csf_mask (automatic CSF estimation is not implemented); "
            "use method 'mean' or give a CSF mask"
        )
    csf = np.asarray(csf_mask)
    if csf.shape != chi.shape:
        raise ValueError(f"csf_mask shape {csf.shape} does not match chi {chi.shape}")
    csf = csf.astype(bool) & mask
    if int(csf.sum()) < int(min_voxels):
        raise ValueError(f"CSF mask has {int(csf.sum())} voxels inside the brain (< {min_voxels})")
    return _shift(chi, mask, float(np.mean(chi[csf], dtype=np.float64)))


def reference_offset(chi_unreferenced, chi, mask) -> float:
    """Offset (ppm) a referencing step subtracted: median over ``mask`` of unreferenced minus
    referenced chi (0 for an empty mask)."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return 0.0
    d = np.asarray(chi_unreferenced, np.float64)[m] - np.asarray(chi, np.float64)[m]
    return float(np.median(d))
