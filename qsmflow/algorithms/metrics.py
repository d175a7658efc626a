"""Quality metrics: data consistency without ground truth, and scoring against ground truth."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qsmflow.algorithms.dipole import DipoleOperator

__all__ = [
    "data_consistency_residual",
    "data_consistency_residual_map",
    "score_against_truth",
    "polynomial_fit",
    "polynomial_share",
]


def _residual_inputs(chi, field, mask):
    chi = np.asarray(chi, dtype=np.float32)
    field = np.asarray(field, dtype=np.float32)
    mask = np.asarray(mask)
    if chi.ndim != 3 or field.shape != chi.shape or mask.shape != chi.shape:
        raise ValueError(
            f"chi, field and mask must be 3D of one shape, got {chi.shape}, {field.shape}, "
            f"{mask.shape}"
        )
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("mask is empty")
    if not (np.all(np.isfinite(chi)) and np.all(np.isfinite(field[mask]))):
        raise ValueError("chi or field contains non-finite values")
    return chi, field, mask


def data_consistency_residual_map(
    chi: np.ndarray,
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    pad_factor: float = 2.0,
    kind: str = "continuous",
) -> np.ndarray:
    """Voxel-wise data-consistency residual ``M (D chi - f - c)`` (ppm).

    The map whose norm :func:`data_consistency_residual` reports: the field ``D chi`` that the
    susceptibility map predicts (zero-padded dipole convolution, Salomir et al. 2003; Marques
    & Bowtell 2005) minus the measured local field, less the best constant ``c`` (its mean
    over the mask; ``D(0) = 0``, so the field's mean is not measured).  Structure in this map
    (rims at the mask edge, veins, streaks) shows where the inversion did not explain the data,
    the visual check used in quality reports of model-based QSM (de Rochefort et al., MRM
    2010; Liu et al., MRM 2012).

    Parameters
    ----------
    chi : (X, Y, Z) array, ppm
    field : (X, Y, Z) array, ppm (local field)
    mask : (X, Y, Z) bool, non-empty
    voxel_size : 3 floats, mm, keyword-only
    b0_dir : unit 3-vector in array axes, keyword-only
    pad_factor : float, keyword-only
    kind : {"continuous", "discrete", "integral"}, keyword-only; dipole kernel discretisation.

    Returns
    -------
    (X, Y, Z) float32 array, ppm; 0 outside the mask.
    """
    chi, field, mask = _residual_inputs(chi, field, mask)
    op = DipoleOperator(
        chi.shape,
        voxel_size=voxel_size,
        b0_dir=b0_dir,
        kind=kind,
        pad_factor=pad_factor,
        dtype=np.float32,
    )
    r = (op.forward(chi)[mask] - field[mask]).astype(np.float64)
    r -= r.mean()
    out = np.zeros(chi.shape, dtype=np.float32)
    out[mask] = r.astype(np.float32)
    return out


def data_consistency_residual(
    chi: np.ndarray,
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    pad_factor: float = 2.0,
    kind: str = "continuous",
) -> float:
    """Relative data-consistency residual ``||M (D chi - f - c)|| / ||M (f - mean_M f)||``.

    ``D`` is the zero-padded dipole convolution (:class:`~qsmflow.algorithms.dipole.
    DipoleOperator`; Salomir et al. 2003, Marques & Bowtell 2005), ``M`` the mask and ``c``
    the best constant offset (the mean over the mask of ``D chi - f``): the field's mean is
    not measured (``D(0) = 0`` and background removal leaves an arbitrary offset), so the
    metric is invariant to it.  The denominator uses the de-meaned field for the same reason.
    This is the data-fidelity term minimised by model-based QSM (e.g. de Rochefort et al.,
    MRM 2010; Liu et al., MRM 2012) and needs no ground truth.  ``chi`` is used as given
    over the whole volume (normally 0 outside the mask).  The voxel-wise map is
    :func:`data_consistency_residual_map`.

    Parameters
    ----------
    chi : (X, Y, Z) array, ppm
    field : (X, Y, Z) array, ppm (local field)
    mask : (X, Y, Z) bool, non-empty
    voxel_size : 3 floats, mm, keyword-only
    b0_dir : unit 3-vector in array axes, keyword-only
    pad_factor : float, keyword-only
    kind : {"continuous", "discrete", "integral"}, keyword-only; dipole kernel discretisation.

    Returns
    -------
    float >= 0 (0: ``chi`` explains the field exactly up to a constant).
    """
    chi, field, mask = _residual_inputs(chi, field, mask)
    f = field[mask].astype(np.float64)
    f -= f.mean()
    den = float(np.linalg.norm(f))
    if den == 0.0:
        raise ValueError("field is constant over the mask; the residual is undefined")
    r = data_consistency_residual_map(
        chi, field, mask, voxel_size=voxel_size, b0_dir=b0_dir, pad_factor=pad_factor, kind=kind
    )
    return float(np.linalg.norm(r[mask].astype(np.float64)) / den)


def score_against_truth(
    chi: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    *,
    seg: np.ndarray | None = None,
) -> dict:
    """Score a susceptibility map against ground truth with ``qsm_ci.qsm_eval``.

    Calls ``qsm_ci.qsm_eval.score_arrays(kind="chi")``: the 2016 QSM challenge metrics
    (Langkammer et al., MRM 2018: NRMSE, detrended NRMSE, HFEN, correlation, XSIM of Milovic
    et al., MRM) and, when ``seg`` is given, the QSM challenge 2.0 region and
    calcification metrics (Marques et al., MRM 2021).

    Parameters
    ----------
    chi, truth : (X, Y, Z) arrays, ppm
    mask : (X, Y, Z) bool
    seg : (X, Y, Z) int labels or None, keyword-only
        qsm-ci / challenge 2.0 label scheme (as :mod:`qsmflow.sims.phantom` labels).

    Returns
    -------
    dict of metric name -> float (keys include ``nrmse``, ``hfen``, ``xsim``,
    ``correlation``, ``coverage``); with ``seg`` the challenge metrics and a ``"regions"``
    entry with per-region statistics.

    Raises
    ------
    ImportError if qsm-ci (an extra: ``pip install qsmflow[test]`` or ``[bench]``) is absent.
    """
    try:
        from qsm_ci.qsm_eval import score_arrays
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "score_against_truth needs the optional package qsm-ci "
            "(pip install 'qsmflow[test]' or 'qsmflow[bench]')"
        ) from exc
    chi = np.asarray(chi, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    mask = np.asarray(mask).astype(bool)
    if chi.ndim != 3 or chi.shape != truth.shape or chi.shape != mask.shape:
        raise ValueError("chi, truth and mask must be 3D arrays of one shape")
    if not mask.any():
        raise ValueError("mask is empty")
    if seg is not None:
        seg = np.asarray(seg)
        if seg.shape != chi.shape:
            raise ValueError(f"seg shape {seg.shape} does not match chi {chi.shape}")
    metrics, regions = score_arrays(chi, truth, mask, kind="chi", seg=seg)
    out = {k: (float(v) if np.isscalar(v) else v) for k, v in metrics.items()}
    if regions is not None:
        out["regions"] = regions
    return out


def polynomial_fit(
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    order: int = 2,
) -> np.ndarray:
    """Least-squares polynomial of total degree ``order`` fitted to ``field`` over ``mask``.

    The polynomial is in the voxels' physical coordinates (mm; centred and scaled on the mask
    for conditioning); ``order=2`` has 10 terms.  Returns the fitted polynomial, with the
    field's mean over the mask removed (ppm if ``field`` is), on the mask and 0 elsewhere:
    the smooth part of the field that :func:`polynomial_share` measures.

    Parameters
    ----------
    field : (X, Y, Z) array
    mask : (X, Y, Z) bool, at least ``(order + 1)(order + 2)(order + 3) / 6`` voxels
    voxel_size : 3 floats, mm, keyword-only
    order : int >= 0, keyword-only

    Returns
    -------
    (X, Y, Z) float32 array.
    """
    f = np.asarray(field)
    m = np.asarray(mask).astype(bool)
    if f.ndim != 3 or m.shape != f.shape:
        raise ValueError(f"field and mask must be 3D of one shape, got {f.shape}, {m.shape}")
    if int(order) < 0:
        raise ValueError("order must be >= 0")
    order = int(order)
    nterms = (order + 1) * (order + 2) * (order + 3) // 6
    idx = np.nonzero(m)
    if idx[0].size < max(nterms, 2):
        raise ValueError("mask has too few voxels for the polynomial")
    y = f[idx].astype(np.float64)
    if not np.all(np.isfinite(y)):
        raise ValueError("field contains non-finite values in the mask")
    y = y - y.mean()
    h = np.asarray(voxel_size, dtype=np.float64)
    xs = []
    for ax in range(3):
        c = idx[ax] * h[ax]
        c = c - c.mean()
        xs.append(c / max(float(np.abs(c).max()), 1e-12))
    cols = []
    for i in range(order + 1):
        for j in range(order + 1 - i):
            for k in range(order + 1 - i - j):
                cols.append(xs[0] ** i * xs[1] ** j * xs[2] ** k)
    A = np.stack(cols, axis=1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    out = np.zeros(f.shape, dtype=np.float32)
    out[idx] = (A @ coef).astype(np.float32)
    return out


def polynomial_share(
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    order: int = 2,
) -> float:
    """Share of a local field's variance that a low-order polynomial explains (0..1).

    Least-squares fit of a polynomial of total degree ``order`` in the voxels' physical
    coordinates (:func:`polynomial_fit`; ``order=2``: 10 terms) to ``field`` over ``mask``;
    returns ``1 - var(field - fit) / var(field)`` (the coefficient of determination, R^2).  A
    tissue local field is dominated by structure at the scale of the anatomy (veins, nuclei,
    grey/white contrast), which a quadratic cannot follow: 0.01 % for the 2016 challenge's
    local field, 10-11 % for the realistic simulated head's true local field.  Background
    field left over by background removal is smooth across the brain and shows as a large
    share (a real whole-head 3 T scan with a 30 mm phase-offset smoothing before LBV: 76 %).
    No ground truth needed: a quality check of background removal on real data.

    Parameters
    ----------
    field : (X, Y, Z) array, ppm (any unit: the share is unitless)
    mask : (X, Y, Z) bool, at least ``(order + 1)(order + 2)(order + 3) / 6`` voxels
    voxel_size : 3 floats, mm, keyword-only
    order : int >= 0, keyword-only

    Returns
    -------
    float in [0, 1]; 0 when the field is constant over the mask.
    """
    fit = polynomial_fit(field, mask, voxel_size=voxel_size, order=order)
    m = np.asarray(mask).astype(bool)
    y = np.asarray(field)[m].astype(np.float64)
    y = y - y.mean()
    tot = float(y @ y)
    if tot == 0.0:
        return 0.0
    r = y - fit[m].astype(np.float64)
    return float(min(max(1.0 - float(r @ r) / tot, 0.0), 1.0))
