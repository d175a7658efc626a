"""A realistic (in-vivo-like) dipole-inversion test case built on the numerical head phantom.

The plain head-phantom benchmark inverts a field computed with the same kernel the inversion
uses, from piecewise-smooth tissue, with little noise: every method looks good there and
regularisation weights tuned on it over-fit noise on real data.  This case adds what real data
has (Milovic et al. "QSM challenge 2.0", MRM 2021; Marques et al. MRM 2021):

* **model mismatch** - the local field is computed with the voxel-integrated ("integral") dipole
  kernel (the field of uniformly magnetised cubes) on a 2x zero-padded grid, while the inversions
  use the sampled continuous kernel;
* **partial-volume edges** - chi, the proton density and R2* are blurred by a Gaussian of
  ``pv_sigma_vox`` voxels (the voxel's box integration plus the acquisition's point-spread),
  so tissue boundaries are not piecewise constant;
* **microstructure texture** - a fine-grained random chi texture (correlation length
  ``texture_mm``, standard deviation ``texture_ppm``) inside the parenchyma, which no sparsity
  prior describes;
* **in-vivo noise** - complex Gaussian noise at an SNR of ``snr_last_echo`` (20-40 in vivo at
  3 T, 1 mm) at the last echo, i.e. ``sigma = mean brain |S(TE_last)| / snr``; the field noise
  of the magnitude-weighted multi-echo fit is ``sigma_f = 1 / sqrt(sum_e (g TE_e |S_e|)^2) *
  sigma`` per voxel (``g = 2 pi gamma_bar B0 1e-6`` rad/s/ppm; the Cramer-Rao bound of a
  linear phase fit, what qsmflow's complexfit reports as its noise map), so veins and other
  short-T2* voxels are noisier.  The field carries Gaussian noise of that standard deviation.

Everything is deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from qsmflow.algorithms.dipole import DipoleOperator
from qsmflow.sims.phantom import make_head_phantom

__all__ = ["InVivoCase", "make_invivo_case"]

#: gyromagnetic ratio / 2 pi (MHz/T)
_GAMMA_BAR_MHZ = 42.577478518
#: labels of the parenchyma (no CSF, veins, calcification) that carry microstructure texture
_PARENCHYMA = (1, 2, 3, 4, 5, 6, 7, 8, 9)


@dataclass(frozen=True)
class InVivoCase:
    """One realistic inversion problem.

    Attributes
    ----------
    field : (X, Y, Z) float32, ppm - noisy local field, 0 outside ``mask``
    chi : (X, Y, Z) float32, ppm - ground truth (``chi * mask``)
    mask : (X, Y, Z) bool - brain mask
    magnitude : (X, Y, Z, E) float32 - noisy multi-echo magnitude
    noise : (X, Y, Z) float32, ppm - field noise standard deviation (the complexfit noise map),
        the value outside the mask is the mask median
    te_s : tuple of floats, s
    b0_tesla : float
    voxel_size : 3 floats, mm
    """

    field: np.ndarray
    chi: np.ndarray
    mask: np.ndarray
    magnitude: np.ndarray
    noise: np.ndarray
    te_s: tuple
    b0_tesla: float
    voxel_size: tuple


def _fine_texture(shape, rng, sigma_vox):
    t = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return t / max(float(t.std()), 1e-12)


def make_invivo_case(
    shape: Sequence[int] = (64, 64, 64),
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    te_s: Sequence[float] = (0.004, 0.009, 0.014, 0.019, 0.024),
    b0_tesla: float = 3.0,
    snr_last_echo: float = 30.0,
    pv_sigma_vox: float = 0.5,
    texture_ppm: float = 0.01,
    texture_mm: float = 1.0,
    seed: int = 0,
) -> InVivoCase:
    """Build the realistic case (see the module docstring).

    Parameters
    ----------
    shape : 3 ints - matrix; the head fills ~80 % of the field of view
    voxel_size : 3 floats, mm - the phantom's anatomy is scaled to the field of view, so 160^3
        at 1 mm is an adult-sized head at 1 mm and 64^3 a small one
    te_s : echo times, s (default 5 echoes 4-24 ms, a typical 3 T QSM protocol)
    b0_tesla : float
    snr_last_echo : float - mean brain magnitude at the last echo over the noise std of each
        complex channel (in vivo 20-40)
    pv_sigma_vox : float - Gaussian partial-volume blur of the tissue maps, voxels (0 = off)
    texture_ppm, texture_mm : microstructure texture std (ppm) and correlation length (mm)
    seed : int - phantom texture, microstructure and noise

    Returns
    -------
    :class:`InVivoCase`
    """
    shape = tuple(int(n) for n in shape)
    vsz = tuple(float(v) for v in voxel_size)
    te = np.asarray(te_s, dtype=np.float64).ravel()
    if te.size < 1 or np.any(te <= 0):
        raise ValueError(f"echo times must be positive seconds, got {te_s!r}")
    if not (snr_last_echo > 0 and np.isfinite(snr_last_echo)):
        raise ValueError(f"snr_last_echo must be positive, got {snr_last_echo}")
    ph = make_head_phantom(shape, voxel_size=vsz, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    mask = np.asarray(ph.brain_mask, dtype=bool)

    chi = np.asarray(ph.chi, dtype=np.float32).copy()
    parenchyma = np.isin(ph.labels, _PARENCHYMA)
    if texture_ppm > 0:
        sig = max(texture_mm / min(vsz), 0.3)
        chi += np.float32(texture_ppm) * _fine_texture(shape, rng, sig) * parenchyma
    m0 = np.asarray(ph.m0, dtype=np.float32)
    r2s = np.asarray(ph.r2star, dtype=np.float32)
    if pv_sigma_vox > 0:
        chi = ndimage.gaussian_filter(chi, pv_sigma_vox)
        m0 = ndimage.gaussian_filter(m0, pv_sigma_vox)
        r2s = ndimage.gaussian_filter(r2s, pv_sigma_vox)
    chi_local = np.where(mask, chi, 0.0).astype(np.float32)

    op = DipoleOperator(
        shape,
        voxel_size=vsz,
        b0_dir=(0.0, 0.0, 1.0),
        kind="integral",
        pad_factor=2.0,
        dtype=np.float32,
    )
    field_clean = op.forward(chi_local).astype(np.float32)

    mag_clean = m0[..., None].astype(np.float64) * np.exp(-r2s[..., None].astype(np.float64) * te)
    sigma = float(mag_clean[..., -1][mask].mean()) / float(snr_last_echo)
    g = 2.0 * np.pi * _GAMMA_BAR_MHZ * b0_tesla  # rad / s / ppm (MHz * 1e6 * 1e-6)
    info = np.sum((g * te * mag_clean) ** 2, axis=-1)  # Fisher information * sigma^2
    noise = np.full(shape, np.nan, dtype=np.float64)
    noise[mask] = sigma / np.sqrt(np.maximum(info[mask], 1e-30))
    noise = np.minimum(noise, 1.0)  # voxels without signal: 1 ppm, i.e. practically no weight
    noise[~mask] = np.median(noise[mask])
    field = field_clean + (noise * rng.standard_normal(shape)).astype(np.float32)
    field = np.where(mask, field, 0.0).astype(np.float32)

    mag = np.abs(
        mag_clean
        + sigma * (rng.standard_normal(mag_clean.shape) + 1j * rng.standard_normal(mag_clean.shape))
    )
    return InVivoCase(
        field=field,
        chi=chi_local,
        mask=mask,
        magnitude=mag.astype(np.float32),
        noise=noise.astype(np.float32),
        te_s=tuple(float(t) for t in te),
        b0_tesla=float(b0_tesla),
        voxel_size=vsz,
    )
