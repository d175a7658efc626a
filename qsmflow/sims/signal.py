"""Multi-echo gradient-echo (MEGRE) magnitude and phase from a head phantom and a field map.

Signal model (mono-exponential R2* decay, linear phase evolution; e.g. Haacke et al., MRI:
Physical Principles and Sequence Design, ch. 20; Wang & Liu, MRM 2015, eq. 1)::

    S(r, TE) = m0(r) exp(-R2*(r) TE) exp(i [phi0(r) + 2 pi gamma_bar B0 f(r) 1e-6 TE]) + n

with ``f`` the field perturbation in ppm of B0, ``phi0`` a smooth echo-independent transceive
phase offset and ``n`` circular complex Gaussian noise.  Magnitude is ``|S|`` and phase is
``angle(S)`` wrapped to ``[-pi, pi)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qsmflow.algorithms.units import ppm_to_phase, wrap_to_pi


def _phase_offset(shape, rng, *, amplitude_rad: float = 2.5) -> np.ndarray:
    """Smooth transceive phase offset: a random low-order polynomial of the normalised coords."""
    ax = []
    for i, n in enumerate(shape):
        a = np.linspace(-1.0, 1.0, n, dtype=np.float64)
        s = [1, 1, 1]
        s[i] = n
        ax.append(a.reshape(s))
    x, y, z = ax
    terms = [x, y, z, x * y, y * z, x * z, x**2 - 1 / 3, y**2 - 1 / 3, z**2 - 1 / 3]
    coef = rng.normal(size=len(terms))
    coef *= amplitude_rad / np.sqrt(np.sum(coef**2))
    phi = rng.uniform(-np.pi, np.pi) + sum(c * t for c, t in zip(coef, terms))
    return np.broadcast_to(phi, shape).astype(np.float32)


def simulate_megre(
    ph,
    *,
    total_field_ppm: np.ndarray,
    te_s: Sequence[float] = (0.004, 0.008, 0.012, 0.016),
    b0_tesla: float = 3.0,
    snr: float = 100.0,
    phase_offset: bool = True,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate multi-echo GRE magnitude and wrapped phase.

    Parameters
    ----------
    ph : HeadPhantom
        Provides ``m0``, ``r2star`` (1/s) and ``brain_mask``.
    total_field_ppm : (X, Y, Z) array, keyword-only
        Field perturbation in ppm of B0 (normally ``simulate_fields(ph)["total"]``).
    te_s : sequence of floats, keyword-only
        Echo times in seconds (positive).
    b0_tesla : float, keyword-only
        Main field strength (T).
    snr : float, keyword-only
        Mean brain magnitude at the first echo divided by the noise standard deviation of each
        of the real and imaginary channels.  ``inf`` (or <= 0) disables noise.
    phase_offset : bool, keyword-only
        Add a smooth, spatially varying, echo-independent phase offset phi0 (a few radians
        across the FOV, plus a random global offset), as in real transceive phase.
    seed : int, keyword-only
        Seed of the noise and of the phase offset.

    Returns
    -------
    magnitude, phase : (X, Y, Z, E) float32
        Magnitude (a.u., same scale as ``m0``) and phase (rad, in ``[-pi, pi)``).

    Notes
    -----
    Model in the module docstring (Haacke et al. 1999; Wang & Liu, MRM 2015).
    """
    m0 = np.asarray(ph.m0, dtype=np.float64)
    r2s = np.asarray(ph.r2star, dtype=np.float64)
    field = np.asarray(total_field_ppm, dtype=np.float64)
    if field.shape != m0.shape:
        raise ValueError(f"total_field_ppm shape {field.shape} != phantom shape {m0.shape}")
    if not np.all(np.isfinite(field)):
        raise ValueError("total_field_ppm contains non-finite values")
    te = np.asarray(te_s, dtype=np.float64).ravel()
    if te.size == 0 or np.any(~np.isfinite(te)) or np.any(te <= 0):
        raise ValueError(f"echo times must be positive seconds, got {te_s!r}")
    if not b0_tesla > 0:
        raise ValueError(f"b0_tesla must be positive, got {b0_tesla}")
    rng = np.random.default_rng(seed)

    phi0 = _phase_offset(m0.shape, rng) if phase_offset else np.zeros(m0.shape, np.float32)
    shape4 = m0.shape + (te.size,)
    mag_clean = m0[..., None] * np.exp(-r2s[..., None] * te)
    phase_clean = phi0[..., None] + ppm_to_phase(field[..., None], te_s=te, b0_tesla=b0_tesla)
    sig = mag_clean * np.exp(1j * phase_clean)

    if np.isfinite(snr) and snr > 0:
        brain = np.asarray(ph.brain_mask, dtype=bool)
        ref = mag_clean[..., 0][brain].mean() if brain.any() else mag_clean[..., 0].mean()
        sigma = ref / float(snr)
        sig = sig + sigma * (rng.standard_normal(shape4) + 1j * rng.standard_normal(shape4))

    magnitude = np.abs(sig).astype(np.float32)
    phase = wrap_to_pi(np.angle(sig)).astype(np.float32)
    # float32 rounding can land exactly on +pi
    phase[phase >= np.float32(np.pi)] = -np.float32(np.pi)
    return magnitude, phase


def oblique_affine(
    voxel_size: Sequence[float],
    *,
    angles_deg: Sequence[float] = (0.0, 0.0, 0.0),
    shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Voxel-to-world affine of an oblique acquisition.

    Parameters
    ----------
    voxel_size : 3 floats, mm
    angles_deg : 3 floats, keyword-only
        Rotations (degrees) about the world x, y and z axes, applied in that order to the voxel
        axes (``R = Rz @ Ry @ Rx``).
    shape : 3 ints or None, keyword-only
        If given, the origin is chosen so that the centre of the grid is at world (0, 0, 0).

    Returns
    -------
    (4, 4) float64 affine ``[[R @ diag(voxel_size), t], [0, 0, 0, 1]]``.  The B0 direction in
    array axes is then ``dipole.b0_dir_from_affine(affine) = R.T @ (0, 0, 1)``.
    """
    h = np.asarray(voxel_size, dtype=np.float64).reshape(3)
    if np.any(h <= 0):
        raise ValueError(f"voxel sizes must be positive, got {voxel_size!r}")
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64).reshape(3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    A = np.eye(4)
    A[:3, :3] = rz @ ry @ rx @ np.diag(h)
    if shape is not None:
        c = (np.asarray(shape, dtype=np.float64).reshape(3) - 1) / 2.0
        A[:3, 3] = -A[:3, :3] @ c
    return A
