"""Closed-form (direct) dipole inversions: truncated k-space division and Tikhonov.

Both are a single circular deconvolution in k-space.  The local field is known only inside the
mask, so it is zero-filled outside the mask, cropped to the mask's bounding box plus ``margin``
voxels and zero-padded to ``pad_factor`` times that box (rounded up to a fast FFT length) before
the division; the result is cropped back and masked.  Padding keeps the periodic images of the
field at least ``(pad_factor - 1)`` box widths away; the cost grows as ``pad_factor**3`` (1.5:
3.4x the box's voxels, 2: 8x) and is two real FFTs of the padded grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qsmflow.algorithms import regularization as reg
from qsmflow.algorithms._inversion_common import (
    MaskCrop,
    check_inputs,
    gradient_symbols_for,
    make_operator,
)


def tkd_correction_factor(threshold: float) -> float:
    """Mean TKD transfer function over directions, ``c(thr) = <min(1, |D| / thr)>``.

    TKD multiplies the true spectrum by ``T = D / D_thr = min(1, |D| / thr)``, which depends only
    on the angle between ``k`` and B0.  The susceptibility of structures that are large compared
    with a voxel is therefore scaled by the orientation average of ``T``, which is the
    underestimation Schweser et al. (MRM 2013) proposed to correct by rescaling.  With
    ``u = cos(theta)`` uniform on [0, 1] and ``D = (1 - 3 u^2) / 3``::

        c = int_0^1 min(1, |1 - 3 u^2| / (3 thr)) du      (c(0.19) = 0.8317)

    evaluated here with the composite midpoint rule on 200 001 points.  The factor is derived
    here from that principle (orientation average of the transfer function); it was not checked
    against the value printed in Schweser et al. for this threshold.
    """
    if not 0 < threshold <= 2.0 / 3.0:
        raise ValueError(f"TKD threshold must be in (0, 2/3], got {threshold}")
    n = 200_001
    u = (np.arange(n) + 0.5) / n
    return float(np.mean(np.minimum(1.0, np.abs(1.0 - 3.0 * u * u) / (3.0 * threshold))))


def _prepare(field, mask, voxel_size, b0_dir, margin, pad_factor, kernel):
    field, mask, vsz, b0 = check_inputs(field, mask, voxel_size=voxel_size, b0_dir=b0_dir)
    crop = MaskCrop(mask, margin=margin)
    op = make_operator(crop.shape, voxel_size=vsz, b0_dir=b0, pad_factor=pad_factor, kernel=kernel)
    F = op.rfftn(crop.crop(field))
    return mask, crop, op, F


def invert_tkd(
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    threshold: float | str = "auto",
    correct: bool = False,
    pad_factor: float = 1.5,
    margin: int = 4,
    kernel: str = "continuous",
) -> reg.FitResult:
    """Truncated k-space division (TKD), the threshold chosen from the data unless set.

    ``chi = F^-1[ F(f) / D_thr ]`` with ``D_thr = D`` where ``|D| >= thr`` and
    ``sign(D) * thr`` elsewhere (``D_thr^-1 = 0`` where ``D = 0``, i.e. at k = 0 and on the
    magic cone), on a zero-padded grid (see the module docstring).

    Parameters
    ----------
    field : (X, Y, Z) array, ppm
        Local field (background removed); only values inside ``mask`` are used.
    mask : (X, Y, Z) bool
    voxel_size : 3 floats, mm
    b0_dir : unit 3-vector in array axes
    threshold : float or "auto"
        Truncation level ``thr`` of ``|D|``.  ``"auto"`` (default): ``0.7 / sqrt(SNR)`` clipped
        to [0.1, 0.5], with the field's SNR from
        :func:`~qsmflow.algorithms.regularization.field_snr` (rule ``"snr"``; 0.38 on the 2016
        challenge brain, 0.17-0.22 on the simulated heads; benchmarks/RESULTS.md).  Published
        values: Wharton et al. 2010 and the 2016 QSM challenge ~0.1-0.2; 0.4 is the best
        fixed value on the challenge brain.
    correct : bool
        Divide by :func:`tkd_correction_factor` (``1 / 0.8317 = 1.202`` at 0.19) to undo the
        global underestimation of TKD (Schweser et al. 2013).
    pad_factor : float
        Zero-padded FFT grid relative to the mask's bounding box (>= 1).
    margin : int
        Voxels added around the mask's bounding box before padding.
    kernel : {"continuous", "discrete", "integral"}
        Dipole kernel discretisation (:mod:`qsmflow.algorithms.dipole`).

    Returns
    -------
    :class:`~qsmflow.algorithms.regularization.FitResult` (``chi``: (X, Y, Z) float32, ppm, 0
    outside ``mask``; ``value``: the threshold used).

    References
    ----------
    Shmueli K, et al. Magnetic susceptibility mapping of brain tissue in vivo using MRI phase
    data. Magn Reson Med 2009;62:1510-1522.
    Wharton S, Schaefer A, Bowtell R. Susceptibility mapping in the human brain using
    threshold-based k-space division. Magn Reson Med 2010;63:1292-1304.
    Schweser F, Deistung A, Sommer K, Reichenbach JR. Toward online reconstruction of
    quantitative susceptibility maps: superfast dipole inversion. Magn Reson Med
    2013;69:1582-1594.
    """
    fixed = reg.auto_or_positive("threshold", threshold)
    snr = None
    if fixed is None:
        snr, _ = reg.field_snr(field, mask)
        threshold, rule = reg.snr_weight("tkd", "threshold", snr), "snr"
    else:
        threshold, rule = fixed, "fixed"
    if not 0 < threshold <= 2.0 / 3.0:
        raise ValueError(f"TKD threshold must be in (0, 2/3], got {threshold}")
    mask, crop, op, F = _prepare(field, mask, voxel_size, b0_dir, margin, pad_factor, kernel)
    D = op.kernel
    inv = np.where(np.abs(D) >= threshold, D, np.sign(D) * np.float32(threshold))
    with np.errstate(divide="ignore"):
        inv = np.where(inv != 0, 1.0 / inv, 0.0).astype(np.float32)
    if correct:
        inv *= np.float32(1.0 / tkd_correction_factor(threshold))
    F *= inv
    chi = crop.paste(op.crop(op.irfftn(F)), mask=mask)
    return reg.FitResult(
        chi=chi,
        method="tkd",
        parameter="threshold",
        value=float(threshold),
        rule=rule,
        extra={} if snr is None else {"field_snr": snr},
    )


def _tikhonov(
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float],
    b0_dir: Sequence[float],
    lam: float,
    regularizer: str,
    pad_factor: float,
    margin: int,
    kernel: str,
) -> np.ndarray:
    """The closed-form Tikhonov solution for one weight (see :func:`invert_tikhonov`)."""
    mask, crop, op, F = _prepare(field, mask, voxel_size, b0_dir, margin, pad_factor, kernel)
    D = op.kernel
    G2 = _regularizer_symbol(op, D, regularizer)
    denom = D * D + np.float32(lam) * G2
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(denom > 0, D / denom, 0.0).astype(np.float32)
    F *= inv
    return crop.paste(op.crop(op.irfftn(F)), mask=mask)


def _regularizer_symbol(op, D, regularizer: str) -> np.ndarray:
    """``|Gamma|^2``: the periodic forward-difference gradient's symbol (mm^-2) or 1."""
    if regularizer == "gradient":
        E = gradient_symbols_for(op)
        return (np.abs(E[0]) ** 2 + np.abs(E[1]) ** 2 + np.abs(E[2]) ** 2).astype(np.float32)
    return np.ones_like(D)


def invert_tikhonov(
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    noise: np.ndarray | None = None,
    lam: float | str = "auto",
    rule: str = "snr",
    lam_min: float = 1e-4,
    lam_max: float = 1.0,
    n_lams: int = 17,
    tau: float = 1.0,
    regularizer: str = "gradient",
    pad_factor: float = 1.5,
    margin: int = 4,
    kernel: str = "continuous",
):
    """Closed-form Tikhonov (L2-regularised) dipole inversion, ``lam`` chosen from the data
    unless set.

    Solves ``min_chi ||D chi - f||^2 + lam ||Gamma chi||^2`` exactly in k-space::

        chi = F^-1[ D F(f) / (D^2 + lam |Gamma|^2) ]

    with ``|Gamma|^2 = sum_i |E_i|^2`` (periodic forward-difference gradient, mm^-2) for
    ``regularizer="gradient"`` or 1 for ``"identity"`` (Bilgic et al. 2014), on a zero-padded
    grid (see the module docstring).  The objective is homogeneous in (chi, f), so ``lam`` does not
    depend on the field units.

    Parameters
    ----------
    field : (X, Y, Z) array, ppm
    mask : (X, Y, Z) bool
    voxel_size : 3 floats, mm
    b0_dir : unit 3-vector in array axes
    noise : (X, Y, Z) array or None, ppm - field noise std (discrepancy rule; residual chi2)
    lam : float or "auto"
        A number is used as is (rule "fixed").  ``"auto"`` chooses by ``rule``.
    rule : {"snr", "lcurve-corner", "lcurve-knee", "discrepancy"}
        ``"snr"`` (default): Wiener's weight ``lam = (sigma / std_M(f))^2`` mm^2 from the
        field's own SNR (:func:`~qsmflow.algorithms.regularization.field_snr`): 0.087 on the
        2016 challenge brain (best fixed weight 0.1; the L-curve corner chose 1.8e-4 there, 189 %
        NRMSE against 66 %), 3.6e-3 / 9.6e-3 on the simulated heads (best 3e-3 / 1e-2).  The
        other rules evaluate the closed form for ``n_lams`` weights log-spaced in
        ``[lam_min, lam_max]`` (one k-space filter and two inverse FFTs each): the L-curve
        corner (maximum curvature) of ``(||M (D chi - f)||, ||Gamma chi||)``, the
        residual in the mask and chi on the crop (Bilgic et al. 2014 choose lam this way), or
        the discrepancy principle (``noise``, else the field's estimated noise; target
        ``tau``).  Measured on the realistic case (benchmarks/RESULTS.md): the corner lands
        within 2-3x below the best weight; the discrepancy principle 30-40x below it (the
        gradient-L2 prior is at its best well into the bias-dominated range); on the real brain
        the L-curve has no corner and both are 10-500x too small.
    lam_min, lam_max, n_lams, tau : the sweep
    regularizer : {"gradient", "identity"}
    pad_factor, margin, kernel : see :func:`invert_tkd`

    Returns
    -------
    :class:`~qsmflow.algorithms.regularization.FitResult`
    """
    from qsmflow.algorithms.gradient import gradient

    if regularizer not in ("gradient", "identity"):
        raise ValueError(f"regularizer must be 'gradient' or 'identity', got {regularizer!r}")
    common = dict(
        voxel_size=voxel_size,
        b0_dir=b0_dir,
        regularizer=regularizer,
        pad_factor=pad_factor,
        margin=margin,
        kernel=kernel,
    )
    curve: dict = {}
    extra: dict = {}
    fixed = reg.auto_or_positive("lam", lam)
    if fixed is None and rule == "snr":
        snr, _ = reg.field_snr(field, mask)
        value, used_rule = reg.snr_weight("tikhonov", "lam", snr), "snr"
        extra = {"field_snr": snr}
    elif fixed is None:
        mask_b, crop, op, F = _prepare(field, mask, voxel_size, b0_dir, margin, pad_factor, kernel)
        D = op.kernel
        G2 = _regularizer_symbol(op, D, regularizer)
        m_c = crop.crop(mask_b)
        f_c = op.crop(op.irfftn(F))
        sigma, src = reg.noise_level(field, mask_b, noise)
        s_c = crop.crop(sigma)
        if not (0 < lam_min < lam_max) or int(n_lams) < 3:
            raise ValueError("need 0 < lam_min < lam_max and n_lams >= 3")
        a = np.logspace(np.log10(lam_min), np.log10(lam_max), int(n_lams))
        res, regn, chi2 = [], [], []
        for v in a:
            den = D * D + np.float32(v) * G2
            with np.errstate(divide="ignore", invalid="ignore"):
                X = F * np.where(den > 0, D / den, 0.0).astype(np.float32)
            chi_c = op.crop(op.irfftn(X))
            r = (op.crop(op.irfftn(X * D)) - f_c)[m_c]
            res.append(float(np.linalg.norm(r)))
            if regularizer == "gradient":
                regn.append(float(np.sqrt(np.sum(gradient(chi_c, voxel_size=op.voxel_size) ** 2))))
            else:
                regn.append(float(np.linalg.norm(chi_c)))
            chi2.append(float(np.mean((r / s_c[m_c]) ** 2)))
        value, _ = reg.choose(a, res, regn, rule=rule, chi2=chi2, tau=tau)
        curve = {"values": a.tolist(), "residual": res, "regularizer": regn, "chi2": chi2}
        extra = {"noise_source": src}
        used_rule = rule
    else:
        value, used_rule = fixed, "fixed"
    chi = _tikhonov(field, mask, lam=value, **common)
    residual = reg.data_residual(
        chi, field, mask, voxel_size=voxel_size, b0_dir=b0_dir, noise=noise, kernel=kernel
    )
    return reg.FitResult(
        chi=chi,
        method="tikhonov",
        parameter="lam",
        value=value,
        rule=used_rule,
        curve=curve,
        residual=residual,
        extra=extra,
    )
