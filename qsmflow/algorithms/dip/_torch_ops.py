"""Torch building blocks shared by the deep-image-prior inversions (imported only by ``dip``).

* :func:`import_torch` / :func:`resolve_device` - lazy PyTorch import and ``"auto"`` device.
* :func:`resolve_amp` - whether a network runs under bf16 autocast (``amp`` option).
* :class:`TorchDipole` - the zero-padded dipole forward model ``chi -> field`` (ppm -> ppm) of
  :class:`qsmflow.algorithms.dipole.DipoleOperator` on torch tensors, differentiable, with real
  FFTs (``rfftn`` with ``s=`` zero-fills after the image: never circular padding).
* :func:`forward_diff` / :func:`tv_l1` - forward-difference gradient (zero flux at the far edge)
  and (weighted) anisotropic total variation, in mm^-1.

All tensors are ``(..., X, Y, Z)`` float32; FFTs always run in float32 even under autocast.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from qsmflow.algorithms._inversion_common import make_operator


def import_torch():
    """Import PyTorch or raise an ImportError that says how to get it."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the deep-image-prior inversions (modip, dip, inr) need PyTorch: "
            "pip install torch (CPU or CUDA build)"
        ) from exc
    return torch


def resolve_device(device: str = "auto"):
    """``"auto"`` -> CUDA when available else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` as given.

    Raises ValueError for an unknown name or a CUDA request on a machine without CUDA.
    """
    torch = import_torch()
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
        return torch.device(name)
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")


AMP_MODES = ("auto", "bf16", "off")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with bf16 dot-product instructions (AVX512-BF16 or AMX), as torch's own
    CPU probe reports them; False elsewhere (bf16 would be emulated, slower than float32)."""
    probe = import_torch().cpu
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(probe, name, None)  # private torch helpers: absent -> not claimed
        if fn is not None and fn():
            return True
    return False


def resolve_amp(amp, device) -> bool:
    """Whether the network runs under bf16 autocast.

    ``amp``: ``"auto"`` (or True) - on CUDA, and on CPUs with native bf16 instructions
    (:func:`cpu_has_native_bf16`); ``"bf16"`` - on any device; ``"off"`` (or False) - never.
    Measured on the simulated head (benchmarks/RESULTS_dip.md): NRMSE within 0.07 points of
    float32 at 64^3; on a 2-core AVX512-BF16 CPU at 160^3 the published MoDIP network runs
    1.9x faster per iteration, the ``net_factor=2`` one 1.1x.
    """
    mode = ("auto" if amp else "off") if isinstance(amp, bool) else amp
    if mode not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)} (or a bool), got {amp!r}")
    if mode == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return mode == "bf16"


class TorchDipole:
    """Differentiable zero-padded dipole convolution on the crop grid ``shape``.

    Parameters
    ----------
    shape : 3 ints
        Image grid (the crop).
    voxel_size : 3 floats, mm
    b0_dir : unit 3-vector in array axes
    pad_factor : float >= 1
        FFT grid relative to ``shape`` (see :func:`qsmflow.algorithms.dipole.padded_shape`).
    device : torch.device
    kernel : {"continuous", "discrete", "integral"}

    Notes
    -----
    ``forward`` is ``crop(F^-1 D F pad(x))`` and is self-adjoint up to the crop/pad pair, so
    ``adjoint`` is the same call.  The kernel ``D`` (rfftn half grid, float32) is the NumPy one
    of :func:`qsmflow.algorithms._inversion_common.make_operator`.
    """

    def __init__(
        self,
        shape: Sequence[int],
        *,
        voxel_size,
        b0_dir,
        pad_factor: float = 1.5,
        device=None,
        kernel: str = "continuous",
    ):
        torch = import_torch()
        op = make_operator(
            shape, voxel_size=voxel_size, b0_dir=b0_dir, pad_factor=pad_factor, kernel=kernel
        )
        self.shape = tuple(int(n) for n in shape)
        self.padded_shape = tuple(op.padded_shape)
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.device = device if device is not None else torch.device("cpu")
        self.D = torch.from_numpy(np.ascontiguousarray(op.kernel)).to(self.device)
        self.D2 = self.D * self.D

    def rfftn(self, x):
        import torch

        return torch.fft.rfftn(x.float(), s=self.padded_shape, dim=(-3, -2, -1))

    def irfftn_crop(self, X):
        import torch

        y = torch.fft.irfftn(X, s=self.padded_shape, dim=(-3, -2, -1))
        nx, ny, nz = self.shape
        return y[..., :nx, :ny, :nz]

    def forward(self, x):
        """Field (ppm) of ``x`` (ppm) on the crop grid; ``x`` is ``(..., X, Y, Z)``."""
        return self.irfftn_crop(self.rfftn(x) * self.D)

    __call__ = forward
    adjoint = forward


def forward_diff(x, voxel_size: Sequence[float]):
    """Forward differences along the last three axes (mm^-1), 0 on the last slice of each axis.

    Returns a tuple of 3 tensors shaped like ``x``.
    """
    import torch.nn.functional as F

    out = []
    for ax, h in zip((-3, -2, -1), voxel_size):
        d = (x.narrow(ax, 1, x.shape[ax] - 1) - x.narrow(ax, 0, x.shape[ax] - 1)) / float(h)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (-1 - ax) + 1] = 1  # F.pad orders pairs from the last axis backwards
        out.append(F.pad(d, pad))
    return tuple(out)


def tv_l1(x, voxel_size: Sequence[float], weight=None, mask=None):
    """Mean (over ``mask`` voxels, or all) of ``sum_i w |d_i x|``: weighted anisotropic TV."""
    g = forward_diff(x, voxel_size)
    tv = g[0].abs() + g[1].abs() + g[2].abs()
    if weight is not None:
        tv = tv * weight
    if mask is not None:
        return (tv * mask).sum() / mask.sum().clamp_min(1)
    return tv.mean()
