"""Shared plumbing for every dipole-inversion method (TKD, Tikhonov, TV, RTS, NDI, MEDI, ...).

The local field is only known inside the brain mask, so every inversion works on the mask's
bounding box plus a small margin (:class:`MaskCrop`), zero-filled outside the mask, and solves on
a zero-padded FFT grid (:func:`make_operator`, a :class:`~qsmflow.algorithms.dipole.DipoleOperator`
whose grid is ``pad_factor`` times the crop): circular convolutions then only see periodic images
of the problem that are at least ``(pad_factor - 1) * crop`` voxels away.  Never circular padding.

Public API (small on purpose)::

    field, mask, vsz, b0 = check_inputs(field, mask, voxel_size=..., b0_dir=...)
    w = data_weight(mask, magnitude=None, noise=None)  # None or float32, mean 1 in the mask
    crop = MaskCrop(mask, margin=4)  # bbox + margin
    f_c, m_c = crop.crop(field), crop.crop(mask)
    op = make_operator(crop.shape, voxel_size=vsz, b0_dir=b0, pad_factor=1.5)
    D, E = op.kernel, gradient_symbols_for(op)  # D real (rfftn layout), E 3 complex
    chi = crop.paste(chi_c, mask=mask)  # full grid, float32, 0 outside mask

All arrays are float32, (X, Y, Z), in ppm; voxel sizes in mm; ``b0_dir`` a unit 3-vector in
array axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qsmflow.algorithms._checks import check_field_mask
from qsmflow.algorithms._threads import fft_workers
from qsmflow.algorithms.dipole import KERNEL_KINDS, DipoleOperator, unit_vector
from qsmflow.algorithms.gradient import gradient_symbols

__all__ = [
    "check_inputs",
    "data_weight",
    "MaskCrop",
    "make_operator",
    "gradient_symbols_for",
]


def check_inputs(
    field: np.ndarray,
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], tuple[float, float, float]]:
    """Validate the standard inversion inputs and return clean copies.

    Parameters
    ----------
    field : (X, Y, Z) array, ppm
        Local field.  Must be finite inside ``mask`` (values outside are ignored).
    mask : (X, Y, Z) array, bool-like
        Region where the field is known; must be non-empty.
    voxel_size : 3 positive floats, mm
    b0_dir : non-zero 3-vector in array axes (normalised here)

    Returns
    -------
    field : (X, Y, Z) float32, a new array, set to 0 outside the mask (and nowhere else changed)
    mask : (X, Y, Z) bool
    voxel_size : tuple of 3 floats
    b0_dir : tuple of 3 floats, unit norm

    Raises
    ------
    ValueError
        Wrong dimensionality, shape mismatch, empty mask, non-finite field inside the mask,
        non-positive voxel size or zero/non-finite B0 direction.
    """
    out, mask, vsz = check_field_mask(field, mask, voxel_size=voxel_size)
    try:
        b = unit_vector(b0_dir)
    except ValueError:
        raise ValueError(f"b0_dir must be a non-zero 3-vector, got {b0_dir!r}") from None
    return out, mask, vsz, tuple(float(v) for v in b)


def data_weight(
    mask: np.ndarray,
    *,
    magnitude: np.ndarray | None = None,
    noise: np.ndarray | None = None,
) -> np.ndarray | None:
    """Data-fidelity weight ``W`` for ``||W (D chi - f)||^2``, or None for uniform weighting.

    ``W = 1 / noise`` if ``noise`` (field noise std, ppm) is given, else ``W = magnitude`` (a
    multi-echo magnitude (X, Y, Z, E) is combined as the root-sum-of-squares over echoes); in both
    cases ``W`` is set to 0 outside the mask and scaled to mean 1 inside it, so a method's
    regularisation weight means the same with and without weighting (MEDI, Liu et al. MRM 2011
    and FANSI, Milovic et al. MRM 2018, normalise the magnitude weight similarly).

    Returns
    -------
    (X, Y, Z) float32 or None.

    Raises
    ------
    ValueError
        Wrong shape, non-finite or negative values in the mask, non-positive noise, or a weight
        that is zero everywhere in the mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if noise is not None:
        noise = np.asarray(noise, dtype=np.float64)
        if noise.shape != mask.shape:
            raise ValueError(f"noise shape {noise.shape} does not match mask {mask.shape}")
        nm = noise[mask]
        if not np.all(np.isfinite(nm)) or np.any(nm <= 0):
            raise ValueError("noise must be finite and positive inside the mask")
        w = np.zeros(mask.shape, dtype=np.float64)
        w[mask] = 1.0 / nm
    elif magnitude is not None:
        mag = np.asarray(magnitude, dtype=np.float64)
        if mag.ndim == 4 and mag.shape[:3] == mask.shape:
            mag = np.sqrt(np.sum(mag**2, axis=-1))
        if mag.shape != mask.shape:
            raise ValueError(f"magnitude shape {mag.shape} does not match mask {mask.shape}")
        mm = mag[mask]
        if not np.all(np.isfinite(mm)) or np.any(mm < 0):
            raise ValueError("magnitude must be finite and non-negative inside the mask")
        w = np.where(mask, mag, 0.0)
    else:
        return None
    mean = w[mask].mean()
    if not mean > 0:
        raise ValueError("data weight is zero everywhere inside the mask")
    return (w / mean).astype(np.float32)


class MaskCrop:
    """Bounding box of a mask plus a margin, with crop/paste helpers.

    Parameters
    ----------
    mask : (X, Y, Z) bool, non-empty
    margin : int, voxels
        Added on every side of the bounding box (clipped to the array); the crop is not padded
        beyond the array here: zero padding for the FFTs is :func:`make_operator`'s job.

    Attributes
    ----------
    slices : tuple of 3 slices into the full grid
    shape : shape of the crop
    full_shape : shape of the full grid
    """

    def __init__(self, mask: np.ndarray, *, margin: int = 4):
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 3 or not mask.any():
            raise ValueError("MaskCrop needs a non-empty 3D mask")
        margin = int(margin)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        sl = []
        for ax in range(3):
            other = tuple(a for a in range(3) if a != ax)
            idx = np.flatnonzero(mask.any(axis=other))
            lo = max(int(idx[0]) - margin, 0)
            hi = min(int(idx[-1]) + 1 + margin, mask.shape[ax])
            sl.append(slice(lo, hi))
        self.slices = tuple(sl)
        self.shape = tuple(s.stop - s.start for s in self.slices)
        self.full_shape = mask.shape

    def crop(self, x: np.ndarray) -> np.ndarray:
        """Copy of the crop of a (X, Y, Z, ...) array (trailing axes kept)."""
        return np.ascontiguousarray(np.asarray(x)[self.slices])

    def paste(self, x: np.ndarray, *, mask: np.ndarray | None = None) -> np.ndarray:
        """Full-grid float32 array with ``x`` (crop shape) in place, 0 elsewhere and outside
        ``mask`` (full-grid bool) if given."""
        out = np.zeros(self.full_shape, dtype=np.float32)
        out[self.slices] = x
        if mask is not None:
            out[~np.asarray(mask, dtype=bool)] = 0.0
        return out


def make_operator(
    shape: Sequence[int],
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    pad_factor: float = 1.5,
    kernel: str = "continuous",
) -> DipoleOperator:
    """Float32 zero-padded :class:`DipoleOperator` for a crop of ``shape``.

    The padded grid is ``padded_shape(shape, pad_factor)`` (next fast real-FFT length of
    ``ceil(pad_factor * n)`` per axis); ``op.kernel`` is D on its rfftn half-grid, ``op.pad`` /
    ``op.crop`` move images in/out (the image sits at the grid origin, zeros after it),
    ``op.rfftn`` / ``op.irfftn`` transform on the padded grid.  Memory and time grow as
    ``pad_factor**3`` (1.5 -> 3.4x the crop's voxels, 2 -> 8x).
    """
    if kernel not in KERNEL_KINDS:
        raise ValueError(f"unknown dipole kernel {kernel!r}; choose from {KERNEL_KINDS}")
    if not pad_factor >= 1:
        raise ValueError(f"pad_factor must be >= 1, got {pad_factor}")
    return DipoleOperator(
        shape,
        voxel_size=voxel_size,
        b0_dir=b0_dir,
        kind=kernel,
        pad_factor=pad_factor,
        dtype=np.float32,
        workers=fft_workers(),
    )


def gradient_symbols_for(op: DipoleOperator) -> list[np.ndarray]:
    """Complex64 DFT symbols ``E_i`` of the periodic forward-difference gradient
    (:func:`qsmflow.algorithms.gradient.gradient`) on ``op``'s padded rfftn grid (3 open,
    broadcastable arrays); ``sum |E_i|^2`` is the negative Laplacian symbol."""
    return gradient_symbols(
        op.padded_shape, voxel_size=op.voxel_size, half=True, dtype=np.complex64
    )
