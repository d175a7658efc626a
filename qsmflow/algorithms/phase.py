"""Phase preparation and multi-echo field estimation.

* :func:`scale_phase_to_radians`: raw scanner phase values to radians.
* :func:`remove_phase_offset_mcpc3ds`: removal of the echo-independent phase offset phi0
  (MCPC-3D-S, Eckstein et al., MRM 2018).
* :func:`estimate_field_wls` (``"wls"``): offset removal, spatial + temporal unwrapping and a
  magnitude-weighted least-squares fit of phase against TE.
* :func:`estimate_field_complexfit` (``"complexfit"``): nonlinear fit of the complex multi-echo
  signal (Liu et al., MRM 2013), which also yields a noise map of the field.

Signal model: ``S_n = m_n exp(i (phi0 + omega TE_n))`` with ``omega = 2 pi f`` (rad/s) and
``f`` the frequency offset in Hz (sign convention of :mod:`qsmflow.algorithms.units`).  Field
outputs are in ppm of B0, zero outside the mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from qsmflow.algorithms.units import hz_to_ppm, wrap_to_pi
from qsmflow.algorithms.unwrap import (
    SPATIAL_UNWRAPPERS,
    _romeo_3d,
    unwrap_echoes,
    unwrap_laplacian,
)

TWO_PI = 2.0 * np.pi
#: Default MCPC-3D-S smoothing width (voxels) of the reference implementation (MriResearchTools).
MCPC3DS_SIGMA_VOXELS = (10.0, 10.0, 5.0)


# ---------------------------------------------------------------------------------------------
# helpers


def _as_4d(phase, magnitude):
    phase = np.asarray(phase)
    if phase.ndim == 3:
        phase = phase[..., None]
        if magnitude is not None:
            magnitude = np.asarray(magnitude)
            if magnitude.ndim == 3:
                magnitude = magnitude[..., None]
    if phase.ndim != 4:
        raise ValueError(f"phase must be (X,Y,Z) or (X,Y,Z,E), got shape {phase.shape}")
    if np.iscomplexobj(phase):
        raise ValueError("phase must be real-valued (radians)")
    if magnitude is not None:
        magnitude = np.asarray(magnitude)
        if magnitude.shape != phase.shape:
            raise ValueError(
                f"magnitude shape {magnitude.shape} does not match phase shape {phase.shape}"
            )
    return phase, magnitude


def _check_te(te_s, n_echoes):
    if te_s is None:
        raise ValueError("te_s (echo times in seconds) is required")
    te = np.atleast_1d(np.asarray(te_s, dtype=np.float64)).reshape(-1)
    if te.size != n_echoes:
        raise ValueError(f"got {te.size} echo times for {n_echoes} echoes")
    if not np.all(np.isfinite(te)) or not np.all(te > 0):
        raise ValueError("echo times must be positive (seconds)")
    if te.size > 1 and not np.all(np.diff(te) > 0):
        raise ValueError("echo times must be strictly increasing")
    if np.any(te > 1.0):
        raise ValueError("echo times look like milliseconds; give them in seconds")
    return te


def _check_b0(b0_tesla):
    if b0_tesla is None or not np.isfinite(b0_tesla) or not b0_tesla > 0:
        raise ValueError(f"b0_tesla (positive, tesla) is required, got {b0_tesla!r}")
    return float(b0_tesla)


def _valid_mask(phase4, magnitude4, mask):
    """Finite phase (and magnitude) in every echo, intersected with ``mask``."""
    valid = np.isfinite(phase4).all(axis=3)
    if magnitude4 is not None:
        valid &= np.isfinite(magnitude4).all(axis=3)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != phase4.shape[:3]:
            raise ValueError(f"mask shape {mask.shape} does not match {phase4.shape[:3]}")
        valid &= mask.astype(bool)
    if not valid.any():
        raise ValueError("mask is empty (no finite voxels inside the mask)")
    return valid


# ---------------------------------------------------------------------------------------------
# scaling


def scale_phase_to_radians(phase: np.ndarray, *, tolerance: float = 0.01):
    """Convert raw phase values to radians.

    Rule (on the finite values):

    1. If they lie within ``[-pi - tolerance, pi + tolerance]`` they are taken to be radians
       already (returned as float32).
    2. If they are not all integers and lie within ``[0, 2 pi]``, they are radians in
       ``[0, 2 pi)`` and are wrapped to ``[-pi, pi)`` (the same angles).
    3. Otherwise, if they are all integers, they are treated as an integer phase encoding
       whose full range maps linearly onto ``[-pi, pi)``:

       * non-negative values up to 4095: ``[0, 4096)`` (12-bit unsigned, e.g. Siemens
         0..4095), ``rad = v * 2 pi / 4096 - pi``;
       * values within -4096..4095: ``[-4096, 4096)`` (Siemens signed, e.g. after
         RescaleSlope 2 / RescaleIntercept -4096), ``rad = v * pi / 4096``;
       * other integer ranges: the smallest power-of-two range of the same kind that holds the
         data (``[0, N)`` if no value is negative, else ``[-N, N)``).
    4. Otherwise ``ValueError``.

    Parameters
    ----------
    phase : array
        Raw phase values (any shape).
    tolerance : float, keyword-only
        Slack (rad) on the radian range test.

    Returns
    -------
    phase_rad : float32 array, same shape
        Phase in radians (non-finite values are kept).
    note : str
        Which rule was applied (for provenance).
    """
    arr = np.asarray(phase)
    if np.iscomplexobj(arr) or not np.issubdtype(arr.dtype, np.number):
        raise ValueError("phase must be a real-valued numeric array")
    vals = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr.ravel()
    if vals.size == 0:
        raise ValueError("phase contains no finite values")
    lo = float(vals.min())
    hi = float(vals.max())
    if lo >= -np.pi - tolerance and hi <= np.pi + tolerance:
        note = f"phase already in radians (range [{lo:.4g}, {hi:.4g}])"
        if max(abs(lo), abs(hi)) < 0.1:
            note += "; WARNING: range is tiny, the data may be scaled (not radians)"
        return arr.astype(np.float32), note
    if lo >= -tolerance and hi <= TWO_PI + tolerance and not np.all(vals == np.round(vals)):
        # radians in [0, 2 pi) (e.g. Philips/GE exports): the same angles, wrapped to [-pi, pi)
        rad = np.mod(arr.astype(np.float64) + np.pi, TWO_PI) - np.pi
        return rad.astype(
            np.float32
        ), f"phase in [0, 2pi) wrapped to [-pi, pi) (range [{lo:.4g}, {hi:.4g}])"
    if not np.all(vals == np.round(vals)):
        raise ValueError(
            f"phase range [{lo:.4g}, {hi:.4g}] is neither radians nor integer-coded phase"
        )
    if lo >= 0:
        n = 4096 if hi <= 4095 else int(2 ** np.ceil(np.log2(hi + 1)))
        rad = arr.astype(np.float64) * (TWO_PI / n) - np.pi
        note = f"integer phase [0, {n}) mapped to [-pi, pi)"
    else:
        if lo >= -4096 and hi <= 4095:
            n = 4096
        else:
            n = int(2 ** np.ceil(np.log2(max(-lo, hi + 1))))
        rad = arr.astype(np.float64) * (np.pi / n)
        note = f"integer phase [-{n}, {n}) mapped to [-pi, pi)"
    return rad.astype(np.float32), note


# ---------------------------------------------------------------------------------------------
# MCPC-3D-S


def remove_phase_offset_mcpc3ds(
    phase: np.ndarray,
    magnitude: np.ndarray | None,
    *,
    te_s: Sequence[float],
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    mask: np.ndarray | None = None,
    sigma_mm: float = 0.0,
):
    """Remove the echo-independent phase offset with MCPC-3D-S.

    MCPC-3D-S (Eckstein et al., "Computationally efficient combination of multi-channel phase
    data from multi-echo acquisitions (ASPIRE)", MRM 79:2996, 2018), applied to combined data:

    1. Hermitian inner product of echoes 1 and 2, ``H = S_2 conj(S_1)``, whose phase is the
       field-induced phase evolution between them (offset free), wrapped;
    2. its phase is unwrapped spatially (ROMEO, :func:`qsmflow.algorithms.unwrap.unwrap_romeo`,
       weighted by ``sqrt|H|``);
    3. ``phi0 = phi_1 - TE_1 (phi_2 - phi_1)_unwrapped / (TE_2 - TE_1)``;
    4. ``phi0`` is smoothed as the complex signal ``m_1 exp(i phi0)`` (Gaussian, magnitude
       weighted, so low-signal voxels do not corrupt it);
    5. the smoothed offset is subtracted from every echo (complex division, result wrapped).

    Parameters
    ----------
    phase : (X, Y, Z, E) array, E >= 2
        Wrapped phase (rad).
    magnitude : (X, Y, Z, E) array or None
        Magnitude (None: uniform weights).
    te_s : E floats, keyword-only
        Echo times (s), increasing.
    voxel_size : 3 floats (mm), keyword-only
    mask : (X, Y, Z) bool or None, keyword-only
        Voxels used to unwrap the echo difference and to estimate the offset; default all
        voxels finite in every echo.  The offset is extrapolated (smoothly) outside it.
    sigma_mm : float, keyword-only
        Gaussian smoothing sigma (mm).  ``<= 0`` uses the reference implementation's default of
        (10, 10, 5) voxels (MriResearchTools ``mcpc3ds``).

    Returns
    -------
    corrected : (X, Y, Z, E) float32
        Offset-free phase (rad, wrapped to [-pi, pi)); 0 where the input is not finite.
    offset : (X, Y, Z) float32
        The smoothed phase offset phi0 (rad, wrapped).
    """
    phase4, mag4 = _as_4d(phase, magnitude)
    n_e = phase4.shape[3]
    if n_e < 2:
        raise ValueError("MCPC-3D-S needs at least two echoes")
    te = _check_te(te_s, n_e)
    valid = _valid_mask(phase4, mag4, mask)
    finite = np.isfinite(phase4).all(axis=3)
    p1 = np.where(valid, phase4[..., 0], 0).astype(np.float32)
    p2 = np.where(valid, phase4[..., 1], 0).astype(np.float32)
    if mag4 is None:
        m1 = valid.astype(np.float32)
        m2 = m1
    else:
        m1 = np.where(valid, np.abs(mag4[..., 0]), 0).astype(np.float32)
        m2 = np.where(valid, np.abs(mag4[..., 1]), 0).astype(np.float32)
    dphi = wrap_to_pi(p2 - p1).astype(np.float32)
    dphi_u = _romeo_3d(dphi, valid, magnitude=np.sqrt(m1 * m2))
    phi0 = p1 - np.float32(te[0] / (te[1] - te[0])) * dphi_u
    if sigma_mm > 0:
        sigma = [float(sigma_mm) / float(h) for h in np.asarray(voxel_size, float).reshape(3)]
    else:
        sigma = list(MCPC3DS_SIGMA_VOXELS)
    w = np.where(valid, m1, 0).astype(np.float32)
    re = ndimage.gaussian_filter(w * np.cos(phi0), sigma, mode="constant")
    im = ndimage.gaussian_filter(w * np.sin(phi0), sigma, mode="constant")
    offset = np.arctan2(im, re).astype(np.float32)
    corrected = wrap_to_pi(np.where(finite[..., None], phase4, 0) - offset[..., None])
    corrected = np.where(finite[..., None], corrected, 0).astype(np.float32)
    if np.asarray(phase).ndim == 3:
        corrected = corrected[..., 0]
    return corrected, offset


# ---------------------------------------------------------------------------------------------
# weighted least squares


def estimate_field_wls(
    phase: np.ndarray,
    magnitude: np.ndarray | None = None,
    *,
    te_s: Sequence[float],
    b0_tesla: float | None = None,
    mask: np.ndarray | None = None,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    unwrap: str = "romeo",
    mcpc3ds: bool = True,
    sigma_mm: float = 0.0,
) -> np.ndarray:
    """Total field from multi-echo phase by unwrapping and weighted least squares.

    Pipeline:

    1. phase offset removal with MCPC-3D-S (:func:`remove_phase_offset_mcpc3ds`; only with
       >= 2 echoes and ``mcpc3ds``);
    2. unwrapping: template echo spatially, others temporally (:func:`unwrap_echoes`, ROMEO
       template unwrapping, Dymerska et al., MRM 2021);
    3. per voxel, the least-squares slope through the origin of phase against TE with weights
       ``m_n^2`` (inverse phase-noise variance, since ``sd(phi_n) ~ sigma / m_n``)::

           omega = sum_n m_n^2 TE_n phi_n / sum_n m_n^2 TE_n^2

       equivalently the average of the per-echo frequencies ``phi_n / TE_n`` with weights
       ``m_n^2 TE_n^2``, the minimum-variance combination under Gaussian noise (Wu et al.,
       NeuroImage 59:297, 2012; the ROMEO paper's B0 combination, Dymerska et al. 2021);
    4. ``f = omega / (2 pi)`` Hz -> ppm of B0.

    Parameters
    ----------
    phase : (X, Y, Z, E) or (X, Y, Z) array
        Wrapped phase (rad).  A single echo works (no offset removal: the field then includes
        phi0 / (2 pi TE)).
    magnitude : same shape or None
        Magnitude (None: equal weights).
    te_s : E floats, keyword-only
        Echo times (s).
    b0_tesla : float, keyword-only
        Field strength (T); required.
    mask : (X, Y, Z) bool or None, keyword-only
        Voxels to process (default: finite in every echo); output is 0 elsewhere.
    voxel_size : 3 floats (mm), keyword-only
    unwrap : {"romeo", "laplacian"}, keyword-only
        Spatial unwrapping of the template echo.
    mcpc3ds : bool, keyword-only
        Remove the phase offset first.
    sigma_mm : float, keyword-only
        MCPC-3D-S smoothing (see :func:`remove_phase_offset_mcpc3ds`).

    Returns
    -------
    (X, Y, Z) float32
        Total field (ppm of B0).
    """
    b0 = _check_b0(b0_tesla)
    if unwrap not in SPATIAL_UNWRAPPERS:
        raise ValueError(f"unwrap must be one of {SPATIAL_UNWRAPPERS}, got {unwrap!r}")
    phase4, mag4 = _as_4d(phase, magnitude)
    n_e = phase4.shape[3]
    te = _check_te(te_s, n_e)
    valid = _valid_mask(phase4, mag4, mask)
    ph = np.where(valid[..., None], phase4, 0).astype(np.float32)
    if mag4 is None:
        w = np.ones(ph.shape, dtype=np.float32)
    else:
        w = np.where(valid[..., None], np.abs(mag4), 0).astype(np.float32) ** 2
    if n_e >= 2 and mcpc3ds:
        ph, _ = remove_phase_offset_mcpc3ds(
            ph,
            None if mag4 is None else np.sqrt(w),
            te_s=te,
            voxel_size=voxel_size,
            mask=valid,
            sigma_mm=sigma_mm,
        )
    if n_e == 1:
        if unwrap == "laplacian":
            u = unwrap_laplacian(ph[..., 0], voxel_size=voxel_size, mask=valid)[..., None]
        else:
            u = _romeo_3d(ph[..., 0], valid, magnitude=None if mag4 is None else w[..., 0])
            u = u[..., None]
    else:
        u = unwrap_echoes(
            ph,
            te_s=te,
            method=unwrap,
            magnitude=None if mag4 is None else np.sqrt(w),
            mask=valid,
            voxel_size=voxel_size,
        )
    tef = te.astype(np.float32)
    num = np.einsum("xyze,e->xyz", w * u, tef)
    den = np.einsum("xyze,e->xyz", w, tef**2)
    omega = np.where(den > 0, num / np.where(den > 0, den, 1), 0)
    field = hz_to_ppm(omega / TWO_PI, b0_tesla=b0)
    return np.where(valid, field, 0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# nonlinear complex fit


def estimate_field_complexfit(
    phase: np.ndarray,
    magnitude: np.ndarray,
    *,
    te_s: Sequence[float],
    b0_tesla: float,
    mask: np.ndarray | None = None,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    max_iter: int = 30,
    tol: float = 1e-4,
    unwrap: str = "romeo",
    noise_pool_voxels: float = 2.0,
):
    """Field and field-noise maps from a nonlinear fit of the complex multi-echo signal.

    Following Liu et al. (MRM 69:467, 2013, "Nonlinear formulation of the magnetic field to
    source relationship for robust quantitative susceptibility mapping") and the MEDI
    toolbox's complex fit, the model ``S_n = m_n exp(i (phi0 + omega TE_n))`` with the measured
    magnitudes ``m_n`` is fitted per voxel to the complex data by Gauss-Newton on the real and
    imaginary residuals ``r_n = S_n - m_n exp(i theta_n)``.  For this model the Gauss-Newton
    matrix is constant, ``H = sum_n m_n^2 [[1, TE_n], [TE_n, TE_n^2]]``, and the gradient is
    ``g = sum_n m_n^2 sin(psi_n - theta_n) [1, TE_n]`` (``psi_n`` the measured phase), so each
    iteration is a closed-form 2x2 solve, vectorised over voxels.  Initialisation: ``omega``
    from the magnitude-weighted mean phase difference of consecutive echoes,
    ``angle(sum_n S_{n+1} conj(S_n)) / dTE``, and ``phi0`` from ``angle(sum_n S_n
    exp(-i omega TE_n))``.  No phase offset removal or temporal unwrapping is needed.

    Noise: the residual gives the per-voxel noise variance of the complex signal along the
    phase direction, ``s^2 = sum_n |r_n|^2 / (E - 2)``, and the Cramer-Rao / least-squares
    covariance ``s^2 H^-1`` gives ``sd(omega) = s sqrt((H^-1)_omega,omega)``.

    Aliasing: ``omega`` is identifiable only modulo ``2 pi / dTE`` (field modulo ``1 / dTE``
    Hz), so the fitted ``omega dTE`` is wrapped to [-pi, pi) and unwrapped spatially with the
    congruent ROMEO method (``unwrap="romeo"``, weighted by the first-echo magnitude) or the
    Laplacian method, then divided by dTE.  This assumes equally spaced echoes (``dTE =
    TE_2 - TE_1``); the free 2 pi multiple of each connected region is chosen so that its
    (quality-weighted) median field lies within ``+-1/(2 dTE)`` Hz.  ``unwrap="none"`` skips
    this step.

    Parameters
    ----------
    phase : (X, Y, Z, E) array, E >= 3
        Wrapped phase (rad).
    magnitude : (X, Y, Z, E) array
        Magnitude.
    te_s : E floats, keyword-only
        Echo times (s), equally spaced.
    b0_tesla : float, keyword-only
        Field strength (T).
    mask : (X, Y, Z) bool or None, keyword-only
        Default all voxels with finite data and non-zero magnitude.
    voxel_size : 3 floats (mm), keyword-only
    max_iter : int, keyword-only
        Maximum Gauss-Newton iterations.
    tol : float, keyword-only
        Stop when the largest update of ``omega * TE_max`` (rad) is below ``tol``.
    noise_pool_voxels : float, keyword-only
        Gaussian sigma (voxels) over which the residual variance of the complex signal is pooled
        before it is propagated to the field.  With E echoes a single voxel's residual has only
        E - 2 degrees of freedom (chi-square: with 4 echoes about 1 % of voxels get a variance
        below 1 % of the true one, i.e. a 100x overweight in any 1/noise weighting); the
        receiver noise varies slowly in space, so pooling a few voxels costs no resolution of
        what matters (the signal-dependent part stays voxelwise through the Cramer-Rao factor).
        0 keeps the voxelwise estimate.
    unwrap : {"romeo", "laplacian", "none"}, keyword-only
        Spatial unwrapping of the aliased fitted field (see above).

    Returns
    -------
    field_ppm : (X, Y, Z) float32
        Total field (ppm of B0), 0 outside the mask.
    noise_ppm : (X, Y, Z) float32
        Standard deviation of the field estimate (ppm), 0 outside the mask; positive and finite
        everywhere inside it (voxels without signal get the largest value, perfect fits the
        1st percentile), so that ``1 / noise`` is a valid weight.
    """
    b0 = _check_b0(b0_tesla)
    if unwrap not in SPATIAL_UNWRAPPERS + ("none",):
        raise ValueError(f"unwrap must be one of {SPATIAL_UNWRAPPERS + ('none',)}, got {unwrap!r}")
    if magnitude is None:
        raise ValueError("the complex fit needs the magnitude")
    phase4, mag4 = _as_4d(phase, magnitude)
    n_e = phase4.shape[3]
    if n_e < 3:
        raise ValueError("the complex fit needs at least 3 echoes (2 unknowns + noise)")
    te = _check_te(te_s, n_e)
    valid = _valid_mask(phase4, mag4, mask) & (np.abs(mag4).sum(axis=3) > 0)
    if not valid.any():
        raise ValueError("mask is empty (no voxels with signal)")
    psi = phase4[valid].astype(np.float32)  # (M, E)
    m = np.abs(mag4[valid]).astype(np.float32)
    s = m * np.exp(1j * psi)
    w = m**2
    tef = te.astype(np.float32)
    dte = float(te[1] - te[0])

    # initialisation
    z = np.sum(s[:, 1:] * np.conj(s[:, :-1]), axis=1)
    omega = (np.angle(z) / np.mean(np.diff(te))).astype(np.float32)
    phi0 = np.angle(np.sum(s * np.exp(-1j * omega[:, None] * tef), axis=1)).astype(np.float32)

    h00 = w.sum(axis=1)
    h01 = (w * tef).sum(axis=1)
    h11 = (w * tef**2).sum(axis=1)
    det = h00 * h11 - h01**2
    ok = det > 0
    det = np.where(ok, det, 1.0)
    step_tol = tol / float(te[-1])
    for _ in range(int(max_iter)):
        theta = phi0[:, None] + omega[:, None] * tef
        sd = w * np.sin(psi - theta)
        g0 = sd.sum(axis=1)
        g1 = (sd * tef).sum(axis=1)
        d0 = (h11 * g0 - h01 * g1) / det
        d1 = (h00 * g1 - h01 * g0) / det
        d0 = np.where(ok, d0, 0)
        d1 = np.where(ok, d1, 0)
        phi0 += d0
        omega += d1
        if float(np.max(np.abs(d1), initial=0.0)) < step_tol:
            break
    theta = phi0[:, None] + omega[:, None] * tef
    res2 = np.sum(np.abs(s - m * np.exp(1j * theta)) ** 2, axis=1)
    var = res2 / (n_e - 2)
    if noise_pool_voxels > 0:
        from scipy.ndimage import gaussian_filter

        vmap = np.zeros(valid.shape, np.float32)
        vmap[valid] = var
        num = gaussian_filter(vmap, noise_pool_voxels)
        den = gaussian_filter(valid.astype(np.float32), noise_pool_voxels)
        var = (num[valid] / np.maximum(den[valid], 1e-6)).astype(np.float32)
    sd_omega = np.sqrt(np.where(ok, var * h00 / det, 0))

    omega_map = np.zeros(valid.shape, dtype=np.float32)
    omega_map[valid] = omega
    if unwrap != "none":
        wrapped = wrap_to_pi(omega_map * np.float32(dte)).astype(np.float32)
        if unwrap == "romeo":
            mag1 = np.where(valid, np.abs(mag4[..., 0]), 0).astype(np.float32)
            unw = _romeo_3d(wrapped, valid, magnitude=mag1)
        else:
            unw = unwrap_laplacian(wrapped, voxel_size=voxel_size, mask=valid)
        omega_map = unw / np.float32(dte)
    field = hz_to_ppm(omega_map / TWO_PI, b0_tesla=b0)
    noise = np.zeros(valid.shape, dtype=np.float32)
    noise[valid] = hz_to_ppm(sd_omega / TWO_PI, b0_tesla=b0)
    # Inside the mask the noise map must be usable as a weight (1/noise): a voxel without signal
    # carries no information (largest noise seen), a perfect fit gets a floor rather than 0.
    region = valid if mask is None else (np.asarray(mask, bool) | valid)
    good = valid & np.isfinite(noise) & (noise > 0)
    if good.any():
        vals = noise[good]
        floor, worst = np.float32(np.percentile(vals, 1)), np.float32(vals.max())
    else:  # noise-free data: every fit is perfect
        floor = worst = np.float32(1e-6)
    noise = np.where(valid & ~good, floor, noise)
    noise = np.where(region & ~valid, worst, noise).astype(np.float32)
    return np.where(valid, field, 0).astype(np.float32), noise
