"""Phase images to radians in [-pi, pi), for Siemens, GE and Philips storage conventions.

- Siemens: 12-bit values 0..4095 with RescaleSlope 2, RescaleIntercept -4096, i.e. rescaled
  values -4096..4094 spanning one period: ``phase = pi * value / 4096``.  In general the
  stored bits span one period: ``phase = 2 pi (value - intercept) / (slope 2**bits) - pi``.
- Philips: rescaled values in milliradians (RescaleType 'mrad', about -3142..3142), or already
  radians (floating point, within [-pi, pi]).
- GE: phase stored as integer milliradians (about -3142..3142), or radians.
"""

from __future__ import annotations

import numpy as np

from qsmflow.algorithms.units import wrap_to_pi

_TOL = 0.01


def phase_to_radians(
    values,
    *,
    manufacturer: str = "",
    bits_stored: int = 12,
    rescale_slope: float = 1.0,
    rescale_intercept: float = 0.0,
    rescale_type: str = "",
) -> tuple[np.ndarray, str]:
    """Rescaled phase values (after RescaleSlope/Intercept) -> float32 radians in [-pi, pi).

    Parameters
    ----------
    values : array
        Phase image as real-world (rescaled) values, any shape.
    manufacturer : str, keyword-only
        DICOM Manufacturer (``SIEMENS``, ``GE MEDICAL SYSTEMS``, ``Philips`` ...).
    bits_stored, rescale_slope, rescale_intercept, rescale_type : keyword-only
        The DICOM pixel-value attributes of the series.

    Returns
    -------
    (phase, rule) : float32 array of the same shape (rad) and a short description of the rule
    used (for the sidecar and the log).

    Raises
    ------
    ValueError
        When the values fit none of the conventions.
    """
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        raise ValueError("phase image has no finite values")
    lo, hi = float(finite.min()), float(finite.max())
    vendor = manufacturer.lower()
    if lo >= -np.pi - _TOL and hi <= np.pi + _TOL:
        out, rule = v, "already radians"
    elif rescale_type.lower() == "mrad" or (
        ("philips" in vendor or vendor.startswith("ge"))
        and lo >= -1000 * np.pi - 2
        and hi <= 1000 * np.pi + 2
    ):
        out, rule = v / 1000.0, "milliradians / 1000"
    else:
        period = float(rescale_slope) * 2.0 ** int(bits_stored)
        lo_rep = float(rescale_intercept)
        if lo < lo_rep - _TOL or hi > lo_rep + period + _TOL:
            raise ValueError(
                f"phase values {lo:g}..{hi:g} fit no known convention "
                f"(stored range {lo_rep:g}..{lo_rep + period:g})"
            )
        out = 2.0 * np.pi * (v - lo_rep) / period - np.pi
        rule = f"2 pi (value - {lo_rep:g}) / {period:g} - pi"
    out = wrap_to_pi(out).astype(np.float32)
    out[out >= np.float32(np.pi)] = -np.float32(np.pi)
    return out, rule
