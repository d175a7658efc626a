"""R2* and T2* maps from the multi-echo gradient-echo magnitude.

Signal model (mono-exponential decay; e.g. Haacke et al., MRI: Physical Principles and
Sequence Design, ch. 20)::

    S(TE) = S0 exp(-R2* TE),   T2* = 1 / R2*

with the measured magnitude ``M = |S + n|`` (``n`` circular complex Gaussian noise of standard
deviation ``sigma`` per channel): Rician, whose mean lies above ``S`` where ``S`` is
comparable to ``sigma`` (the noise floor; Gudbjartsson & Patz, MRM 1995;34:910-914).

Three methods, one public function each (the ``r2star`` stage of :mod:`qsmflow.registry`):

* :func:`r2star_arlo` - auto-regression on linear operations (ARLO; Pei et al., MRM
  2015;73:843-850): the integral of the decay over each triple of consecutive echoes
  (Simpson's rule) is proportional to the difference of its end points, ``S(t0) - S(t2) =
  R2* int S dt``; one closed-form regression per voxel, no logarithm, no iterations;
* :func:`r2star_loglinear` - weighted least squares of ``log M`` against TE with weights
  ``M^2`` (the inverse variance of ``log M``);
* :func:`r2star_nlls` - nonlinear least squares of the magnitude (vectorised
  Levenberg-Marquardt), fitting the Rician mean of ``S0 exp(-R2* TE)`` when the noise level is
  known (so echoes in the noise floor pull the fit to the right decay instead of flattening
  it), the plain exponential otherwise.

Common conventions (every method):

* ``magnitude`` is 4D, echoes on the last axis, any positive scale (a.u.); ``te_s`` in
  seconds, increasing.  One echo: ``ValueError`` (R2* cannot be estimated from one echo).
  Two echoes: every method returns the closed-form log ratio
  ``R2* = ln(M1 / M2) / (TE2 - TE1)`` (ARLO needs three echoes; with two points the log-linear
  and nonlinear fits are this ratio too).
* The noise level ``sigma`` is estimated from the magnitude outside the (dilated) mask
  (:func:`estimate_noise_sigma`), unless given; with ``noise_sigma=None`` the noise floor is
  ignored.  ARLO and the log-linear fit leave out every echo from the first one whose
  magnitude is below ``noise_floor * sigma`` on (the first two echoes are always used).
* R2* is clipped to ``[0, r2star_max]`` (1/s; default 1000 1/s = T2* 1 ms, shorter than any
  first echo of a brain GRE): a negative estimate (noise in CSF) becomes 0.  T2* = 1 / R2* in
  seconds, capped at 1 s (R2* below 1 1/s, longer than any echo train can measure).  Voxels
  outside ``mask`` or with a non-positive magnitude in the first two echoes are 0 in both
  maps (0 means "not estimated", never NaN).

Returns ``(r2star, t2star)``: (X, Y, Z) float32 maps in 1/s and s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: T2* (s) reported where R2* is below 1 / T2STAR_MAX_S (or 0)
T2STAR_MAX_S = 1.0
#: the Rician fit keeps a voxel's log ratio when its second echo is below this many sigma
_NLLS_FLOOR = 3.0
#: at most this many voxels are fitted at once (bounds the temporary (N, E) arrays)
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# shared parts
# ---------------------------------------------------------------------------------------------
def _check(magnitude, te_s, mask):
    """``(magnitude (X,Y,Z,E), te (E,) float64, fitted voxels (X,Y,Z) bool)`` or ValueError."""
    mag = np.asarray(magnitude)
    te = np.asarray(te_s, dtype=np.float64).ravel()
    if mag.ndim == 3 or (mag.ndim == 4 and mag.shape[3] == 1):
        raise ValueError(
            "R2*/T2* need a multi-echo magnitude: this one has 1 echo, from which R2* cannot "
            "be estimated (at least 2 echoes)"
        )
    if mag.ndim != 4:
        raise ValueError(f"magnitude must be 4D (X, Y, Z, echoes), got shape {mag.shape}")
    if te.size != mag.shape[3]:
        raise ValueError(f"the magnitude has {mag.shape[3]} echoes but {te.size} echo times")
    if not np.all(np.isfinite(te)) or np.any(te <= 0) or np.any(np.diff(te) <= 0):
        raise ValueError(f"echo times must be positive and increasing (s), got {list(te)}")
    fit = np.all(mag[..., :2] > 0, axis=3)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != mag.shape[:3]:
            raise ValueError(f"mask shape {m.shape} != magnitude shape {mag.shape[:3]}")
        fit &= m
    return mag, te, fit


def estimate_noise_sigma(magnitude, mask=None, *, quantile: float = 0.1) -> float | None:
    """Noise standard deviation (per real/imaginary channel, a.u.) from the background.

    Parameters
    ----------
    magnitude : (X, Y, Z[, E]) array
        Magnitude, a.u.
    mask : (X, Y, Z) bool array, optional
        Brain (or head) mask; the background is every voxel more than 3 voxels outside it
        (the whole image without a mask) whose magnitude is not exactly 0 (zero-filled or
        masked-out background is no noise sample).
    quantile : float
        The background is taken as Rayleigh distributed (magnitude of complex Gaussian noise),
        whose ``q``-quantile is ``sigma * sqrt(-2 ln(1 - q))``; a low quantile is used so that
        up to ``1 - q`` of the background may be tissue (scalp, skull) or artefact.

    Returns
    -------
    float or None
        ``sigma``, or None when fewer than 1000 background values exist (then the noise floor
        cannot be handled).  Sum-of-squares coil combination makes the background a
        non-central chi rather than Rayleigh: the estimate is then too high, which only
        leaves out more late echoes.
    """
    mag = np.asarray(magnitude)
    if mag.ndim == 3:
        mag = mag[..., None]
    if mask is None:
        outside = np.ones(mag.shape[:3], dtype=bool)
    else:
        outside = ~ndimage.binary_dilation(np.asarray(mask, dtype=bool), iterations=3)
    vals = mag[outside].ravel()
    vals = vals[vals > 0]
    if vals.size < 1000:
        return None
    x = float(np.quantile(vals, quantile))
    sigma = x / np.sqrt(-2.0 * np.log1p(-quantile))
    return sigma if sigma > 0 else None


def _sigma(noise_sigma, magnitude, mask) -> float | None:
    if noise_sigma is None:
        return None
    if isinstance(noise_sigma, str):
        if noise_sigma != "auto":
            raise ValueError(f"noise_sigma must be a number, 'auto' or None, got {noise_sigma!r}")
        return estimate_noise_sigma(magnitude, mask)
    s = float(noise_sigma)
    if not s >= 0:
        raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma!r}")
    return s or None


def _valid_echoes(y, sigma, noise_floor):
    """(N, E) bool: echoes above ``noise_floor * sigma`` up to the first one below it; the
    first two always."""
    valid = np.ones(y.shape, dtype=bool)
    if sigma is not None and noise_floor > 0:
        valid = np.cumprod(y >= noise_floor * sigma, axis=1).astype(bool)
        valid[:, :2] = True
    return valid


def _log_ratio(y, te):
    return np.log(y[:, 0] / y[:, 1]) / (te[1] - te[0])


def _run(magnitude, te_s, mask, r2star_max, fit_block):
    """Fit every voxel of the mask in chunks with ``fit_block(y (N,E) float64, te) -> r2``;
    clip, and return the (R2*, T2*) maps."""
    if not r2star_max > 0:
        raise ValueError(f"r2star_max must be > 0 (1/s), got {r2star_max!r}")
    mag, te, fit = _check(magnitude, te_s, mask)
    idx = np.flatnonzero(fit)
    flat = mag.reshape(-1, mag.shape[3])
    r2 = np.zeros(idx.size, dtype=np.float64)
    for start in range(0, idx.size, _CHUNK):
        sel = idx[start : start + _CHUNK]
        y = flat[sel].astype(np.float64)
        r = _log_ratio(y, te) if te.size == 2 else fit_block(y, te)
        r2[start : start + sel.size] = r
    r2 = np.clip(np.nan_to_num(r2, nan=0.0, posinf=r2star_max, neginf=0.0), 0.0, r2star_max)
    t2 = 1.0 / np.maximum(r2, 1.0 / T2STAR_MAX_S)
    r2_map = np.zeros(fit.shape, dtype=np.float32)
    t2_map = np.zeros(fit.shape, dtype=np.float32)
    r2_map.ravel()[idx] = r2
    t2_map.ravel()[idx] = t2
    return r2_map, t2_map


# ---------------------------------------------------------------------------------------------
# ARLO
# ---------------------------------------------------------------------------------------------
def _simpson_weights(t0, t1, t2):
    """Weights of ``S(t0), S(t1), S(t2)`` in the integral over ``[t0, t2]`` of the quadratic
    through the three points (Simpson's rule; ``h/3 (1, 4, 1)`` for equal spacing ``h``)."""
    h1, h2 = t1 - t0, t2 - t1
    h = h1 + h2
    return h / 6 * (2 - h2 / h1), h**3 / (6 * h1 * h2), h / 6 * (2 - h1 / h2)


def _arlo_block(y, te, sigma, noise_floor):
    valid = _valid_echoes(y, sigma, noise_floor)
    num = np.zeros(y.shape[0])
    den = np.zeros(y.shape[0])
    used = np.zeros(y.shape[0], dtype=bool)
    for j in range(te.size - 2):
        w0, w1, w2 = _simpson_weights(te[j], te[j + 1], te[j + 2])
        s = w0 * y[:, j] + w1 * y[:, j + 1] + w2 * y[:, j + 2]  # integral of S over the triple
        d = y[:, j] - y[:, j + 2]
        v = valid[:, j + 2]
        num += v * (s * d + w2 * d * d)
        den += v * (w2 * s * d + s * s)
        used |= v
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = num / den
    # no triple above the noise floor: the first two echoes' log ratio
    fallback = ~used | ~(den > 0)
    r2[fallback] = _log_ratio(y[fallback], te)
    return r2


def r2star_arlo(
    magnitude: np.ndarray,
    te_s: Sequence[float],
    *,
    mask: np.ndarray | None = None,
    noise_sigma: float | str | None = "auto",
    noise_floor: float = 3.0,
    r2star_max: float = 1000.0,
):
    """R2* (1/s) and T2* (s) by auto-regression on linear operations (ARLO; Pei et al. 2015).

    For every triple of consecutive echoes ``(t0, t1, t2)`` the decay obeys
    ``S(t0) - S(t2) = R2* s``, with ``s`` the integral of the signal over ``[t0, t2]``
    (Simpson's rule, ``dTE/3 (S0 + 4 S1 + S2)``); R2* is the closed-form least-squares solution
    of Pei et al.'s eq. 5 over all triples,
    ``R2* = (sum s d + w2 sum d^2) / (w2 sum s d + sum s^2)`` with ``d = S(t0) - S(t2)`` and
    ``w2 = dTE/3``.  No logarithm, no iteration: the fastest method.  Without noise the
    estimate is ``3 (1 - q^2) / (dTE (1 + 4q + q^2))`` with ``q = exp(-R2* dTE)``, i.e.
    biased low by Simpson's rule only where the decay between echoes is strong: -0.03 % at
    ``R2* dTE = 0.5``, -0.5 % at 1, -5.6 % at 2, -17 % at 3.  With noise it is biased low
    like every fit of the plain magnitude when late echoes sit in the noise floor (those are
    left out, see ``noise_floor``).

    Parameters
    ----------
    magnitude : (X, Y, Z, E) array
        Multi-echo magnitude, a.u.; E >= 3 for ARLO proper (2 echoes: the log ratio).
    te_s : sequence of E floats
        Echo times (s), increasing.  Pei et al. require equally spaced echoes; for unequal
        spacing the Simpson weights are replaced by those of the integral of the quadratic
        through the three echoes (identical for equal spacing), per triple.
    mask : (X, Y, Z) bool array, optional
        Voxels to fit (default: all); the background outside it gives the noise level.
    noise_sigma : float, "auto" or None
        Noise standard deviation per channel (a.u.); ``"auto"``: from the background
        (:func:`estimate_noise_sigma`); None: no noise-floor handling.
    noise_floor : float
        Triples whose last echo is below ``noise_floor * sigma`` are left out (and all later
        ones); a voxel with no triple left gets the log ratio of its first two echoes.
    r2star_max : float
        Upper clip of R2* (1/s).

    Returns
    -------
    r2star, t2star : (X, Y, Z) float32
        R2* in 1/s (clipped to ``[0, r2star_max]``) and T2* = 1/R2* in s (at most 1 s);
        0 outside the mask (module docstring).

    References
    ----------
    Pei M, Nguyen TD, Thimmappa ND, et al. Algorithm for fast monoexponential fitting based on
    auto-regression on linear operations (ARLO) of data. Magn Reson Med. 2015;73:843-850.
    """
    sigma = _sigma(noise_sigma, magnitude, mask)
    return _run(
        magnitude,
        te_s,
        mask,
        r2star_max,
        lambda y, te: _arlo_block(y, te, sigma, float(noise_floor)),
    )


# ---------------------------------------------------------------------------------------------
# log-linear weighted least squares
# ---------------------------------------------------------------------------------------------
def _wls_block(y, te, valid, weights=None):
    """Weighted least-squares line through ``(te, log y)``: returns ``(R2*, log S0)``."""
    w = (y * y if weights is None else weights) * valid
    ly = np.log(np.where(valid, y, 1.0))
    sw = w.sum(1)
    st = w @ te
    stt = w @ (te * te)
    sy = (w * ly).sum(1)
    sty = (w * ly) @ te
    det = sw * stt - st * st
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (sw * sty - st * sy) / det
        icpt = (sy - slope * st) / sw
    return -slope, icpt


def r2star_loglinear(
    magnitude: np.ndarray,
    te_s: Sequence[float],
    *,
    mask: np.ndarray | None = None,
    noise_sigma: float | str | None = "auto",
    noise_floor: float = 3.0,
    r2star_max: float = 1000.0,
):
    """R2* (1/s) and T2* (s) by weighted least squares of log magnitude against echo time.

    ``log M = log S0 - R2* TE`` fitted with weights ``M^2`` (the variance of ``log M`` is
    about ``sigma^2 / M^2``), in closed form per voxel.  Echoes in the noise floor bias
    ``log M`` upwards (R2* low): they are left out (``noise_floor``).

    Parameters
    ----------
    magnitude : (X, Y, Z, E) array
        Multi-echo magnitude, a.u.; E >= 2.
    te_s : sequence of E floats
        Echo times (s), increasing (any spacing).
    mask : (X, Y, Z) bool array, optional
        Voxels to fit (default: all); the background outside it gives the noise level.
    noise_sigma : float, "auto" or None
        Noise standard deviation per channel (a.u.); ``"auto"``: from the background
        (:func:`estimate_noise_sigma`); None: no noise-floor handling.
    noise_floor : float
        Echoes from the first one below ``noise_floor * sigma`` on are left out (the first two
        echoes are always used).
    r2star_max : float
        Upper clip of R2* (1/s).

    Returns
    -------
    r2star, t2star : (X, Y, Z) float32
        R2* in 1/s (clipped to ``[0, r2star_max]``) and T2* = 1/R2* in s (at most 1 s);
        0 outside the mask.

    References
    ----------
    Wu B, Li W, Avram AV, Gho SM, Liu C. Fast and tissue-optimized mapping of magnetic
    susceptibility and T2* with multi-echo and multi-shot spirals. NeuroImage. 2012;59:297-305
    (magnitude-squared weighted log-linear T2* fit).
    """
    sigma = _sigma(noise_sigma, magnitude, mask)

    def block(y, te):
        return _wls_block(y, te, _valid_echoes(y, sigma, float(noise_floor)))[0]

    return _run(magnitude, te_s, mask, r2star_max, block)


# ---------------------------------------------------------------------------------------------
# nonlinear least squares (Levenberg-Marquardt), Rician mean
# ---------------------------------------------------------------------------------------------
def _rician_mean(nu, sigma):
    """Mean of a Rician variable with signal ``nu`` and noise ``sigma`` and its derivative
    d mean / d nu (Gudbjartsson & Patz 1995; with exponentially scaled Bessel functions)."""
    from scipy.special import i0e, i1e

    u = nu * nu / (4.0 * sigma * sigma)
    a, b = i0e(u), i1e(u)
    c = sigma * np.sqrt(np.pi / 2.0)
    mean = c * ((1.0 + 2.0 * u) * a + 2.0 * u * b)
    dmean = np.sqrt(np.pi / 2.0) * nu / (2.0 * sigma) * (a + b)
    return mean, dmean


def _nlls_block(y, te, sigma, max_iter, tol=1e-6):
    n = y.shape[0]
    r2, a = _wls_block(y, te, np.ones(y.shape, dtype=bool))  # start: log-linear, all echoes
    r2 = np.clip(np.nan_to_num(r2), 0.0, 1.0 / te[1])
    a = np.where(np.isfinite(a), a, np.log(y[:, 0]))
    lam = np.full(n, 1e-3)

    def model(a, r2):
        mu = np.exp(a[:, None] - r2[:, None] * te[None, :])
        if sigma is None:
            return mu, mu, -te[None, :] * mu
        m, dm = _rician_mean(mu, sigma)
        return m, dm * mu, -te[None, :] * dm * mu

    m, ja, jr = model(a, r2)
    cost = ((y - m) ** 2).sum(1)
    active = np.ones(n, dtype=bool)
    for _ in range(int(max_iter)):
        if not active.any():
            break
        res = y - m
        haa, har, hrr = (ja * ja).sum(1), (ja * jr).sum(1), (jr * jr).sum(1)
        ga, gr = (ja * res).sum(1), (jr * res).sum(1)
        haa_l, hrr_l = haa * (1 + lam), hrr * (1 + lam)
        det = haa_l * hrr_l - har * har
        with np.errstate(divide="ignore", invalid="ignore"):
            da = (hrr_l * ga - har * gr) / det
            dr = (haa_l * gr - har * ga) / det
        ok = np.isfinite(da) & np.isfinite(dr) & active
        a_new = np.where(ok, a + da, a)
        r_new = np.where(ok, r2 + dr, r2)
        m_new, ja_new, jr_new = model(a_new, r_new)
        cost_new = ((y - m_new) ** 2).sum(1)
        better = ok & (cost_new < cost)
        step = np.abs(dr) / np.maximum(np.abs(r2), 1.0)
        a = np.where(better, a_new, a)
        r2 = np.where(better, r_new, r2)
        m = np.where(better[:, None], m_new, m)
        ja = np.where(better[:, None], ja_new, ja)
        jr = np.where(better[:, None], jr_new, jr)
        converged = better & ((cost - cost_new) <= tol * cost) & (step < tol)
        cost = np.where(better, cost_new, cost)
        lam = np.where(better, lam / 3.0, lam * 4.0)
        active &= ~converged & (lam < 1e8)
    if sigma is not None:
        # only the first echo above the noise floor: R2* is not identifiable (any fast decay
        # fits); the first two echoes' log ratio, as ARLO and the log-linear fit give
        weak = y[:, 1] < _NLLS_FLOOR * sigma
        r2[weak] = _log_ratio(y[weak], te)
    return r2


def r2star_nlls(
    magnitude: np.ndarray,
    te_s: Sequence[float],
    *,
    mask: np.ndarray | None = None,
    noise_sigma: float | str | None = "auto",
    rician: bool = True,
    max_iter: int = 30,
    r2star_max: float = 1000.0,
):
    """R2* (1/s) and T2* (s) by nonlinear least squares of the magnitude, Rician mean.

    Fits ``M(TE) = E_Rice[S0 exp(-R2* TE), sigma]``, the mean of the Rician magnitude of the
    decaying signal (Gudbjartsson & Patz 1995), by Levenberg-Marquardt, every voxel at once
    (two parameters, ``log S0`` and R2*; started from the log-linear fit of all echoes).
    Echoes in the noise floor then count for what they are (a magnitude near
    ``sigma sqrt(pi/2)`` says "decayed") instead of flattening the curve; with
    ``rician=False`` or no noise level the model is the plain exponential.  A voxel whose
    second echo is below 3 sigma has one informative echo, from which R2* cannot be
    identified (any fast decay fits): it gets the log ratio of its first two echoes, as with
    the other methods.

    Parameters
    ----------
    magnitude : (X, Y, Z, E) array
        Multi-echo magnitude, a.u.; E >= 2.
    te_s : sequence of E floats
        Echo times (s), increasing (any spacing).
    mask : (X, Y, Z) bool array, optional
        Voxels to fit (default: all); the background outside it gives the noise level.
    noise_sigma : float, "auto" or None
        Noise standard deviation per channel (a.u.); ``"auto"``: from the background
        (:func:`estimate_noise_sigma`); None: plain exponential.
    rician : bool
        Fit the Rician mean (needs a noise level); False: plain exponential.
    max_iter : int
        Levenberg-Marquardt iterations at most (each voxel stops when its cost and R2* change
        by less than 1e-6 relative).
    r2star_max : float
        Upper clip of R2* (1/s).

    Returns
    -------
    r2star, t2star : (X, Y, Z) float32
        R2* in 1/s (clipped to ``[0, r2star_max]``) and T2* = 1/R2* in s (at most 1 s);
        0 outside the mask.

    References
    ----------
    Gudbjartsson H, Patz S. The Rician distribution of noisy MRI data. Magn Reson Med.
    1995;34:910-914.
    """
    sigma = _sigma(noise_sigma, magnitude, mask) if rician else None
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    return _run(
        magnitude,
        te_s,
        mask,
        r2star_max,
        lambda y, te: _nlls_block(y, te, sigma, int(max_iter)),
    )
