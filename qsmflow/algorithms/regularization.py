"""Choosing a regularisation weight from the data, and the data-consistency residual.

Every regularised inversion trades data fidelity against a prior through one weight.  A fixed
published value is tuned to one data set's units, noise and model mismatch; on other data it
over- or under-regularises (TV's FANSI weight over-fits in-vivo noise by an order of
magnitude).  The rules here choose the weight from the data alone:

* **L-curve corner** (Hansen & O'Leary, SIAM J Sci Comput 1993; used for QSM by Bilgic et al.
  MRM 2014 and the FANSI toolbox, Milovic et al. MRM 2018): the point of maximum curvature of
  ``(log ||residual||, log ||regulariser||)`` parametrised by ``log(weight)``
  (:func:`lcurve_corner`);
* **L-curve knee**: the point farthest from the chord joining the ends of the (normalised)
  log-log curve (the "kneedle" rule, Satopaa et al. ICDCS-W 2011), a robust variant when the
  curvature is noisy (:func:`lcurve_knee`);
* **field SNR** (:func:`field_snr`, :func:`snr_weight`): the weight from the ratio of the
  field's spread to its non-smooth, unexplainable part, Wiener's rule for a Gaussian prior
  (noise power over signal power).  The one rule measured to hold on the real 2016 challenge
  brain AND on the simulated heads (benchmarks/RESULTS.md "Real brain and simulated heads"):
  real local fields carry model mismatch (anisotropy, background-removal residue) that the
  estimate sees and that a noise map does not;
* **discrepancy principle** (Morozov 1966): the largest weight whose noise-normalised residual
  ``mean_M ((D chi - f) / sigma)^2`` is at most ``tau`` (:func:`discrepancy_choice`), with
  ``sigma`` the field-noise map (complexfit's) or, without one, estimated from the field by
  :func:`estimate_field_noise`.

:func:`data_residual` gives the data-consistency residual that every inversion records (no
ground truth needed, so methods can be compared on real data): the RMS of ``D chi - f`` in the
mask and in its interior (the mask eroded by ``interior_mm``, where background-removal and
mask-edge errors do not dominate), and the reduced chi-square when a noise map exists.

All fields in ppm, voxel sizes in mm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field

import numpy as np
from scipy import ndimage

from qsmflow.algorithms.dipole import DipoleOperator

__all__ = [
    "FitResult",
    "lcurve_corner",
    "lcurve_knee",
    "discrepancy_choice",
    "choose_with_fallback",
    "estimate_field_noise",
    "field_snr",
    "snr_weight",
    "data_residual",
    "is_auto",
    "auto_or_positive",
]


def is_auto(value) -> bool:
    """True for the string ``"auto"`` (any case): the weight is chosen from the data."""
    return isinstance(value, str) and value.strip().lower() == "auto"


def auto_or_positive(name: str, value) -> float | None:
    """None for ``"auto"``, else ``value`` as a positive float; ValueError naming ``name``."""
    if is_auto(value):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f'{name} = {value!r}: expected a number or "auto"') from None
    if not (np.isfinite(v) and v > 0):
        raise ValueError(f'{name} must be positive or "auto", got {value!r}')
    return v


@dataclass
class FitResult:
    """An inversion's map plus how its regularisation was chosen.

    Attributes
    ----------
    chi : (X, Y, Z) float32, ppm
    method : str
    parameter : str - name of the chosen weight (``"alpha"``, ``"lam"``, ``"threshold"``, ...)
    value : float - the weight used
    rule : str - ``"fixed"``, ``"snr"``, ``"lcurve-corner"``, ``"lcurve-knee"``,
        ``"discrepancy"``
    curve : dict - the sweep: ``values`` and, per value, ``residual`` (data-term norm),
        ``regularizer`` (prior norm) and ``chi2`` (noise-normalised residual) where computed
    residual : dict - :func:`data_residual` of ``chi``
    extra : dict - method-specific provenance (noise estimate, iterations, ...)
    """

    chi: np.ndarray
    method: str
    parameter: str
    value: float
    rule: str
    curve: dict = dc_field(default_factory=dict)
    residual: dict = dc_field(default_factory=dict)
    extra: dict = dc_field(default_factory=dict)

    def sidecar(self) -> dict:
        """JSON-serialisable provenance (no arrays)."""
        return {
            "Method": self.method,
            "Parameter": self.parameter,
            "Value": float(self.value),
            "Rule": self.rule,
            "Curve": {k: [float(v) for v in vals] for k, vals in self.curve.items()},
            "Residual": {k: float(v) for k, v in self.residual.items()},
            **({"Extra": _jsonable(self.extra)} if self.extra else {}),
        }


def _jsonable(d):
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    return out


def _check_curve(values, *curves):
    t = np.log(np.asarray(values, dtype=np.float64))
    if t.ndim != 1 or t.size < 3 or not np.all(np.isfinite(t)):
        raise ValueError("need >= 3 positive finite weights for an L-curve")
    if np.any(np.diff(t) <= 0):
        raise ValueError("weights must be strictly increasing")
    out = []
    for c in curves:
        c = np.asarray(c, dtype=np.float64)
        if c.shape != t.shape or np.any(~np.isfinite(c)) or np.any(c <= 0):
            raise ValueError("curve norms must be positive, finite and one per weight")
        out.append(np.log(c))
    return t, out


def lcurve_corner(
    values: Sequence[float], residual: Sequence[float], regularizer: Sequence[float]
) -> int:
    """Index of the L-curve corner: maximum signed curvature of ``(log residual, log
    regularizer)`` as a function of ``t = log(value)`` (central differences; the end points,
    where the differences are one-sided, are excluded).

    Parameters
    ----------
    values : increasing regularisation weights (more weight = more regularisation)
    residual : data-term norms ``||W (D chi - f)||``, one per weight
    regularizer : prior norms (``||grad chi||_1``, ``||chi||``, ...), one per weight

    Returns
    -------
    int, index into ``values``.
    """
    t, (x, y) = _check_curve(values, residual, regularizer)
    dx, dy = np.gradient(x, t), np.gradient(y, t)
    ddx, ddy = np.gradient(dx, t), np.gradient(dy, t)
    # the L-curve runs from top-left (small weight) to bottom-right; its corner is convex seen
    # from the origin: positive curvature with this orientation
    kappa = (dx * ddy - ddx * dy) / np.maximum((dx * dx + dy * dy) ** 1.5, 1e-300)
    inner = np.arange(1, t.size - 1)
    return int(inner[np.argmax(kappa[inner])])


def lcurve_knee(
    values: Sequence[float], residual: Sequence[float], regularizer: Sequence[float]
) -> int:
    """Index of the L-curve knee: the point farthest below the chord joining the curve's ends,
    with both log axes scaled to [0, 1] (Satopaa et al. 2011's "kneedle" applied to the
    log-log L-curve).  Robust when the curve is sampled coarsely."""
    _t, (x, y) = _check_curve(values, residual, regularizer)

    def unit(a):
        span = a.max() - a.min()
        return (a - a.min()) / span if span > 0 else np.zeros_like(a)

    xn, yn = unit(x), unit(y)
    p0, p1 = np.array([xn[0], yn[0]]), np.array([xn[-1], yn[-1]])
    d = p1 - p0
    nrm = np.hypot(*d)
    if nrm == 0:
        return int(np.argmin(np.hypot(xn, yn)))
    dist = (d[0] * (yn - p0[1]) - d[1] * (xn - p0[0])) / nrm  # >0 above the chord
    # the corner of an L-curve lies towards the origin, i.e. below the chord
    return int(np.argmin(dist))


def discrepancy_choice(
    values: Sequence[float], chi2: Sequence[float], *, tau: float = 1.0
) -> tuple[float, int]:
    """Morozov's discrepancy principle on a sweep.

    Parameters
    ----------
    values : increasing regularisation weights
    chi2 : noise-normalised mean squared residual ``mean_M ((D chi - f) / sigma)^2`` per weight
        (increases with the weight)
    tau : target (1 = the residual is as large as the noise)

    Returns
    -------
    (value, index) - the weight where ``chi2`` crosses ``tau``, interpolated linearly in
    ``(log value, log chi2)`` between the bracketing sweep points; the smallest weight if every
    residual is above ``tau`` (the model cannot explain the data to the noise level), the
    largest if every residual is below it.  ``index`` is the sweep point nearest the value.
    """
    v = np.asarray(values, dtype=np.float64)
    c = np.asarray(chi2, dtype=np.float64)
    if v.shape != c.shape or v.size < 1:
        raise ValueError("one chi2 per weight needed")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    below = np.flatnonzero(c <= tau)
    if below.size == 0:
        return float(v[0]), 0
    k = int(below.max())
    if k == v.size - 1:
        return float(v[-1]), k
    # first crossing above k: interpolate between k and k + 1 in log-log
    t0, t1 = np.log(v[k]), np.log(v[k + 1])
    c0, c1 = np.log(max(c[k], 1e-300)), np.log(c[k + 1])
    frac = 0.0 if c1 == c0 else (np.log(tau) - c0) / (c1 - c0)
    frac = float(np.clip(frac, 0.0, 1.0))
    val = float(np.exp(t0 + frac * (t1 - t0)))
    return val, k if frac < 0.5 else k + 1


def estimate_field_noise(field: np.ndarray, mask: np.ndarray, *, erode: int = 2) -> float:
    """Robust estimate of the field's white-noise standard deviation (ppm) from the field alone.

    The 7-point Laplacian (stencil weights 6 and -1 x 6, sum of squares 42) of white noise of
    std ``s`` has std ``s sqrt(42)``; the tissue field is smooth at the voxel scale except at
    edges, which the median absolute deviation ignores (Donoho & Johnstone, Biometrika 1994).
    Evaluated in the mask eroded by ``erode`` voxels.  Tissue fine structure inflates the
    estimate a little (it is then an upper bound), which errs on the side of regularisation.
    """
    f = np.asarray(field, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    lap = 6.0 * f
    for ax in range(3):
        lap -= np.roll(f, 1, ax) + np.roll(f, -1, ax)
    inner = ndimage.binary_erosion(m, iterations=int(erode) + 1) if erode >= 0 else m
    if inner.sum() < 100:
        inner = ndimage.binary_erosion(m, iterations=1)
    if inner.sum() < 10:
        raise ValueError("mask too small to estimate the field noise")
    v = lap[inner]
    mad = np.median(np.abs(v - np.median(v)))
    return float(1.4826 * mad / np.sqrt(42.0))


def field_snr(field: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The field's signal-to-noise ratio ``std_M(field) / sigma`` and ``sigma`` (ppm).

    ``sigma`` is :func:`estimate_field_noise` (the voxel-scale, non-smooth part of the field:
    thermal noise plus whatever the dipole model cannot explain at that scale).  It is taken
    from the field even when a noise map exists: the map holds the thermal noise only, and on
    real data the model mismatch is what decides how much regularisation a map needs (the 2016
    challenge brain, SNR 3.4, wants 20-30x the weight of simulated heads of SNR 10-17).
    """
    from qsmflow.algorithms._checks import check_field_mask

    field, m, _ = check_field_mask(field, mask, voxel_size=(1.0, 1.0, 1.0))
    f = np.asarray(field, dtype=np.float64)[m]
    sigma = estimate_field_noise(field, m)
    spread = float(f.std())
    if not (sigma > 0 and spread > 0):
        raise ValueError("the field is constant inside the mask: nothing to invert")
    return spread / sigma, sigma


#: ``weight = scale * snr ** power`` per method and parameter, clipped to ``(low, high)``.
#: Fitted on three data sets together - the 2016 challenge brain (SNR 3.4) and two simulated
#: heads (qsmflow.sims.invivo_case 96^3, SNR 16.6; qsmflow.sims.realistic 3T 96^3 with noise,
#: SNR 10.2) - so that each default is within 5 NRMSE points of its best on the real brain and
#: loses at most 3 points against the former default on the simulated heads (RESULTS.md).
#: Tikhonov: Wiener's ``lam = (noise / signal)^2`` (mm^2) with no fitted constant; TV: the
#: Laplace-prior analogue ``alpha = sigma^2 / std_M(f)`` (ppm; the weight scales with the field,
#: hence ``"field"``), also with no fitted constant.
SNR_RULES = {
    ("tikhonov", "lam"): (1.0, -2.0, (1e-4, 1.0), ""),
    ("tkd", "threshold"): (0.7, -0.5, (0.1, 0.5), ""),
    ("rts", "lsmr_iter"): (2.2, 0.5, (2, 15), ""),
    ("tv", "alpha"): (1.0, -2.0, (1e-7, 1e-2), "field"),
    # MoDIP's CPU recipe (early stopping as regularisation: iterations ~ SNR^2, the upper end
    # of iterative regularisation's SNR^1..SNR^2; the 4 chosen on the real brain, checked on
    # the simulated heads: benchmarks/RESULTS.md "MoDIP on the real brain")
    ("modip", "max_iter"): (4.0, 2.0, (40, 300), ""),
}


def snr_weight(method: str, parameter: str, snr: float, sigma: float | None = None) -> float:
    """The weight of :data:`SNR_RULES` for a field of signal-to-noise ratio ``snr`` (and noise
    ``sigma`` in ppm, needed by the rules in field units)."""
    scale, power, (low, high), unit = SNR_RULES[(method, parameter)]
    w = scale * float(snr) ** power
    if unit == "field":
        if sigma is None:
            raise ValueError(f"the {method} {parameter} rule needs the field's noise level")
        w *= float(snr) * float(sigma)  # the field's spread, ppm
    return float(np.clip(w, low, high))


def _interior(mask, voxel_size, interior_mm):
    it = max(int(round(interior_mm / min(voxel_size))), 0)
    if it == 0:
        return mask
    inner = ndimage.binary_erosion(mask, iterations=it)
    return inner if inner.any() else mask


def data_residual(
    chi: np.ndarray,
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    noise: np.ndarray | float | None = None,
    kernel: str = "continuous",
    interior_mm: float = 5.0,
    pad_factor: float = 1.5,
) -> dict:
    """Data consistency of a susceptibility map with its field, no ground truth needed.

    Parameters
    ----------
    chi, field : (X, Y, Z) arrays, ppm
    mask : (X, Y, Z) bool
    voxel_size : 3 floats, mm
    b0_dir : unit 3-vector in array axes
    noise : (X, Y, Z) array, scalar or None, ppm - field noise std; adds the reduced chi-square
    kernel : dipole kernel of the forward model
    interior_mm : erosion of the mask for the interior statistics, mm
    pad_factor : zero padding of the forward convolution

    Returns
    -------
    dict with ``rms_ppm`` (RMS of ``D chi - f`` in the mask), ``rms_interior_ppm`` (in the
    eroded mask), ``relative`` (``||D chi - f|| / ||f||`` in the mask) and, with ``noise``,
    ``chi2`` and ``chi2_interior`` (mean of ``((D chi - f) / noise)^2``: ~1 when the map explains
    the field to the noise level, < 1 over-fitting, > 1 under-fitting or model mismatch).
    """
    chi = np.asarray(chi, dtype=np.float32)
    f = np.asarray(field, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    op = DipoleOperator(
        chi.shape,
        voxel_size=voxel_size,
        b0_dir=b0_dir,
        kind=kernel,
        pad_factor=pad_factor,
        dtype=np.float32,
    )
    r = op.forward(np.where(m, chi, 0.0).astype(np.float32)).astype(np.float64) - f
    inner = _interior(m, tuple(float(v) for v in voxel_size), interior_mm)
    out = {
        "rms_ppm": float(np.sqrt(np.mean(r[m] ** 2))),
        "rms_interior_ppm": float(np.sqrt(np.mean(r[inner] ** 2))),
        "relative": float(np.linalg.norm(r[m]) / max(np.linalg.norm(f[m]), 1e-30)),
    }
    if noise is not None:
        s = np.broadcast_to(np.asarray(noise, dtype=np.float64), m.shape)
        out["chi2"] = float(np.mean((r[m] / s[m]) ** 2))
        out["chi2_interior"] = float(np.mean((r[inner] / s[inner]) ** 2))
    return out


def choose(
    values: Sequence[float],
    residual: Sequence[float],
    regularizer: Sequence[float],
    *,
    rule: str,
    chi2: Sequence[float] | None = None,
    tau: float = 1.0,
) -> tuple[float, int]:
    """Apply a rule (``"lcurve-corner"``, ``"lcurve-knee"`` or ``"discrepancy"``) to a sweep;
    returns ``(value, index of the nearest sweep point)``."""
    v = np.asarray(values, dtype=np.float64)
    if rule == "lcurve-corner":
        k = lcurve_corner(v, residual, regularizer)
        return float(v[k]), k
    if rule == "lcurve-knee":
        k = lcurve_knee(v, residual, regularizer)
        return float(v[k]), k
    if rule == "discrepancy":
        if chi2 is None:
            raise ValueError("the discrepancy principle needs the noise-normalised residuals")
        return discrepancy_choice(v, chi2, tau=tau)
    raise ValueError(f"unknown rule {rule!r}")


def choose_with_fallback(
    values: Sequence[float],
    residual: Sequence[float],
    regularizer: Sequence[float],
    *,
    rule: str,
    chi2: Sequence[float],
    tau: float = 1.0,
) -> tuple[float, str, float | None]:
    """:func:`choose`, except that an L-curve rule landing on an end of the sweep hands over to
    the discrepancy principle: a corner at the end of the range is no corner (the curve has
    none there, e.g. when background-removal errors dominate a local field and the smallest
    weight over-fits them).  Returns ``(value, rule used, the L-curve's end choice or None)``."""
    value, k = choose(values, residual, regularizer, rule=rule, chi2=chi2, tau=tau)
    if rule.startswith("lcurve") and k in (0, len(values) - 1):
        fallback, _ = discrepancy_choice(values, chi2, tau=tau)
        return fallback, "discrepancy", float(values[k])
    return value, rule, None


def noise_level(field: np.ndarray, mask: np.ndarray, noise=None) -> tuple[np.ndarray, str]:
    """Field-noise std per voxel (ppm) for the discrepancy principle: the given noise map, or a
    uniform estimate from the field (:func:`estimate_field_noise`).  Returns ``(sigma, source)``
    with source ``"noise map"`` or ``"estimated"``."""
    m = np.asarray(mask, dtype=bool)
    if noise is not None:
        s = np.broadcast_to(np.asarray(noise, dtype=np.float64), m.shape)
        if np.any(~np.isfinite(s[m])) or np.any(s[m] <= 0):
            raise ValueError("noise must be finite and positive inside the mask")
        return np.asarray(s), "noise map"
    return np.full(m.shape, estimate_field_noise(field, m)), "estimated"
