"""The unit dipole kernel and the QSM forward model chi -> field, with zero padding.

The field perturbation (ppm of B0) along B0 caused by a susceptibility distribution chi (ppm) is,
in k-space (Salomir et al., Concepts Magn Reson B 2003; Marques & Bowtell, Concepts Magn Reson B
2005), including the Lorentz-sphere correction::

    F(k) = D(k) X(k),        D(k) = 1/3 - (k . b)^2 / |k|^2

with ``b`` the unit B0 direction in image (array) axes.  Two discretisations are offered:

``"continuous"``
    the analytic expression sampled at the DFT frequencies ``k_i = fftfreq(N_i, h_i)`` (mm^-1).
``"discrete"``
    ``|k|^2`` and ``(k . b)^2`` replaced by the symbols of forward finite differences,
    ``d_i = (exp(2 pi i k_i h_i) - 1) / h_i``: ``D = 1/3 - |sum_i b_i d_i|^2 / sum_i |d_i|^2``
    (the "Laplacian-derived" kernel of Milovic et al., MRM 2017 / QSM.jl's ``:i`` style),
    which avoids the high-frequency overshoot of the sampled continuous kernel.

``"integral"``
    the exact field of uniformly magnetised rectangular voxels (the point-function demagnetising
    tensor of a prism, Newell, Williams & Dunlop, J Geophys Res 1993; Aharoni, J Appl Phys 1998)
    evaluated at voxel centres in image space and Fourier transformed.  This is the physically
    right forward model for a piecewise-constant (voxelised) chi: unlike the sampled continuous
    kernel it has no Gibbs ringing, so the simulated field of sources outside a region is
    harmonic inside it, as in real data.  Used by the simulator; costlier to build.

``D(0)`` is set to 0 for the k-space kinds: a constant offset of chi is not measurable from the
field.

Convolutions are circular, so the forward model is evaluated on a zero-padded grid (never a
circularly padded one): sources beyond the field of view are absent and the periodic images of
the sources are pushed at least ``(pad_factor - 1) * N`` voxels away.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft as sfft

from qsmflow.algorithms._threads import fft_workers

KERNEL_KINDS = ("continuous", "discrete", "integral")


def unit_vector(vec) -> np.ndarray:
    """``vec`` (a non-zero 3-vector, e.g. a B0 direction) normalised to unit length."""
    v = np.asarray(vec, dtype=np.float64).reshape(3)
    n = np.linalg.norm(v)
    if not np.isfinite(n) or n == 0:
        raise ValueError(f"B0 direction must be a non-zero 3-vector, got {vec!r}")
    return v / n


def b0_dir_from_affine(affine, *, b0_world: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Unit B0 direction in image (array) axes from a NIfTI affine.

    Parameters
    ----------
    affine : (4, 4) array
        Voxel-to-world (RAS+, mm) affine of the image.  For data converted from DICOM the world
        z axis is the scanner bore axis, i.e. the B0 direction.
    b0_world : 3-vector, keyword-only
        B0 direction in world coordinates (default ``(0, 0, 1)``).

    Returns
    -------
    (3,) float64 array
        Unit vector ``b`` such that ``b[i]`` is the cosine between B0 and array axis ``i`` (in
        physical space, so voxel anisotropy is accounted for).  Oblique acquisitions give
        non-axial ``b``.
    """
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    # Columns are the world-space step of one voxel along each array axis.
    axes = a / np.linalg.norm(a, axis=0, keepdims=True)
    # For an orthonormal frame this is axes.T @ b; solving handles non-orthogonal frames.
    b = np.linalg.solve(axes, unit_vector(b0_world))
    return unit_vector(b)


def voxel_size_from_affine(affine) -> np.ndarray:
    """Voxel edge lengths (mm) along the array axes of a NIfTI affine."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def padded_shape(shape: Sequence[int], *, pad_factor: float = 2.0) -> tuple[int, ...]:
    """FFT-friendly grid at least ``pad_factor`` times ``shape`` along each axis.

    ``pad_factor=1`` returns the next fast FFT length of each axis (no real padding).
    """
    if pad_factor < 1:
        raise ValueError(f"pad_factor must be >= 1, got {pad_factor}")
    return tuple(sfft.next_fast_len(int(np.ceil(n * pad_factor)), real=True) for n in shape)


def kspace_grid(shape: Sequence[int], *, voxel_size: Sequence[float], half: bool = True):
    """Open DFT frequency grids ``(kx, ky, kz)`` in cycles/mm, broadcastable to ``shape``.

    With ``half=True`` the last axis holds ``N // 2 + 1`` non-negative frequencies (rfftn layout).
    """
    shape = tuple(int(n) for n in shape)
    h = np.asarray(voxel_size, dtype=np.float64).reshape(3)
    ks = []
    for i, (n, d) in enumerate(zip(shape, h)):
        k = sfft.rfftfreq(n, d) if (half and i == 2) else sfft.fftfreq(n, d)
        s = [1, 1, 1]
        s[i] = k.size
        ks.append(k.reshape(s))
    return ks


def _wrapped_coords(shape, h):
    """Signed distances (mm) of every grid index from index 0, wrapped (periodic grid)."""
    out = []
    for i, (n, hi) in enumerate(zip(shape, h)):
        idx = np.arange(n)
        idx = np.where(idx > n // 2, idx - n, idx) * hi
        s = [1, 1, 1]
        s[i] = n
        out.append(idx.reshape(s).astype(np.float64))
    return out


def _prism_tensor_component(p, q, x, half):
    """Demagnetising tensor N_qp(r) of a prism (half-sizes ``half``) at offsets ``x`` (3 arrays).

    For magnetisation along axis ``p`` the prism carries surface charge on its two faces normal
    to ``p``; the field of a uniformly charged rectangle has closed forms (solid angle for the
    normal component, logarithms for the in-plane ones).
    """
    u_ax, v_ax = [a for a in range(3) if a != p]
    total = 0.0
    for face_sign in (1.0, -1.0):  # faces at +half[p] (charge +M) and -half[p] (charge -M)
        Z = x[p] - face_sign * half[p]
        acc = 0.0
        for su in (1.0, -1.0):
            u = su * half[u_ax] - x[u_ax]
            for sv in (1.0, -1.0):
                v = sv * half[v_ax] - x[v_ax]
                R = np.sqrt(u * u + v * v + Z * Z)
                if q == p:
                    term = np.arctan(u * v / (Z * R))
                else:
                    w = v if q == u_ax else u  # the in-plane offset not differentiated
                    other2 = R * R - w * w
                    # ln(w + R), written stably for w < 0 (R ~ |w|)
                    term = np.where(w >= 0, np.log(w + R), np.log(other2 / (R - w)))
                acc = acc + su * sv * term
        total = total + face_sign * acc
    # N_qp = -H_q / M_p;  H_p = (M/4pi)[G(z - c) - G(z + c)],  H_q = (M/4pi)[L(z - c) - L(z + c)]
    return -total / (4.0 * np.pi)


def _integral_kernel_image(shape, h, b, near_voxels=8):
    """Image-space prism-integrated dipole kernel (1/3 delta - b^T N b) on a periodic grid."""
    x = _wrapped_coords(shape, h)
    half = [hi / 2.0 for hi in h]
    # far from the source voxel the prism acts as a point dipole of volume prod(h)
    r2 = x[0] ** 2 + x[1] ** 2 + x[2] ** 2
    r2[0, 0, 0] = 1.0
    rb = x[0] * b[0] + x[1] * b[1] + x[2] * b[2]
    vol = float(np.prod(h))
    K = vol / (4.0 * np.pi) * (3.0 * rb**2 / r2 - 1.0) / r2**1.5
    # near the source voxel: the exact prism formula
    sl = []
    for n in shape:
        m = min(near_voxels, n // 2)
        sl.append(np.r_[0 : m + 1, n - m : n] if n > 2 * m + 1 else np.arange(n))
    ix = np.ix_(*sl)
    xn = [
        x[0].reshape(-1)[sl[0]].reshape(-1, 1, 1),
        x[1].reshape(-1)[sl[1]].reshape(1, -1, 1),
        x[2].reshape(-1)[sl[2]].reshape(1, 1, -1),
    ]
    near = np.zeros(tuple(len(s_) for s_ in sl))
    for p in range(3):
        for q in range(p, 3):
            if b[p] == 0 or b[q] == 0:
                continue
            Nqp = _prism_tensor_component(p, q, xn, half)
            near -= (1.0 if p == q else 2.0) * b[p] * b[q] * Nqp
    near[0, 0, 0] += 1.0 / 3.0
    K[ix] = near
    return K


def dipole_kernel(
    shape: Sequence[int],
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    kind: str = "continuous",
    half: bool = True,
    dtype=np.float32,
) -> np.ndarray:
    """Unit dipole kernel ``D(k)`` on the DFT grid of ``shape``.

    Parameters
    ----------
    shape : 3 ints
        Grid on which the kernel is used (normally a padded grid, see :func:`padded_shape`).
    voxel_size : 3 floats, mm
    b0_dir : 3-vector
        B0 direction in array axes (normalised here).
    kind : {"continuous", "discrete", "integral"}
        See the module docstring.
    half : bool
        Return the ``rfftn`` half-spectrum (last axis ``N // 2 + 1``) instead of the full grid.
    dtype : numpy dtype of the result.

    Returns
    -------
    ndarray, real; ``D[0, 0, 0] = 0`` for every kind; for the k-space kinds values lie in
    [-2/3, 1/3].
    """
    if kind not in KERNEL_KINDS:
        raise ValueError(f"unknown dipole kernel kind {kind!r}; choose from {KERNEL_KINDS}")
    b = unit_vector(b0_dir)
    h = np.asarray(voxel_size, dtype=np.float64).reshape(3)
    if np.any(h <= 0):
        raise ValueError(f"voxel sizes must be positive, got {voxel_size!r}")
    ks = kspace_grid(shape, voxel_size=h, half=half)
    if kind == "integral":
        K = _integral_kernel_image(tuple(int(n) for n in shape), h, b)
        D = (sfft.rfftn(K) if half else sfft.fftn(K)).real
        # The k = 0 sample is the truncated lattice sum of the kernel, i.e. the demagnetising
        # factor of the (padded) box: -0.1 for a 48 x 60 x 40 grid, 0 for a cube.  It is an
        # artefact of the box, not physics (a field is only known up to a constant), and a
        # non-zero value makes inversions fit the field's mean with a chi offset of mean / D(0)
        # (5.6 ppm for TV on an oblique 32^3 head).  Same convention as the other kinds.
        D[0, 0, 0] = 0.0
        return np.ascontiguousarray(D, dtype=dtype)
    if kind == "continuous":
        k2 = ks[0] ** 2 + ks[1] ** 2 + ks[2] ** 2
        # On an even grid the Nyquist sample stands for both +k_N and -k_N; (k.b)^2 differs
        # between the two when B0 is oblique, which breaks D(k) = D(-k) and makes the product
        # with a real image's spectrum non-Hermitian.  Average over the two signs: the cross
        # terms with a Nyquist component vanish.
        regular, nyquist = [], []
        for k, n, hi in zip(ks, shape, h):
            is_nyq = np.isclose(np.abs(k), 0.5 / hi) if int(n) % 2 == 0 else np.zeros(k.shape, bool)
            regular.append(np.where(is_nyq, 0.0, k))
            nyquist.append(np.where(is_nyq, k, 0.0))
        kb = sum(k * bi for k, bi in zip(regular, b))
        num = kb**2 + sum((k * bi) ** 2 for k, bi in zip(nyquist, b))
    else:
        # forward-difference symbols d_i = (exp(2 pi i k_i h_i) - 1) / h_i
        d = [(np.exp(2j * np.pi * k * hi) - 1.0) / hi for k, hi in zip(ks, h)]
        k2 = sum(np.abs(di) ** 2 for di in d)
        num = np.abs(d[0] * b[0] + d[1] * b[1] + d[2] * b[2]) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        D = 1.0 / 3.0 - num / k2
    D[0, 0, 0] = 0.0
    return np.ascontiguousarray(D, dtype=dtype)


def smv_kernel(
    shape: Sequence[int],
    *,
    voxel_size: Sequence[float],
    radius_mm: float,
    half: bool = True,
    dtype=np.float32,
) -> np.ndarray:
    """Fourier transform of the normalised spherical-mean-value (SMV) kernel of ``radius_mm``.

    The sphere is voxelised on the grid (centre at index 0, wrapped), normalised to sum 1, and
    transformed, so ``S * X`` is the mean of ``x`` over the sphere around every voxel.  Used by
    SHARP-family background removal (Schweser et al., NeuroImage 2011) and by Laplacian
    unwrapping's deconvolution variants.
    """
    shape = tuple(int(n) for n in shape)
    h = np.asarray(voxel_size, dtype=np.float64).reshape(3)
    coords = []
    for i, (n, hi) in enumerate(zip(shape, h)):
        idx = np.arange(n)
        idx = np.where(idx > n // 2, idx - n, idx) * hi
        s = [1, 1, 1]
        s[i] = n
        coords.append(idx.reshape(s))
    sphere = (coords[0] ** 2 + coords[1] ** 2 + coords[2] ** 2) <= radius_mm**2 + 1e-9
    sphere = sphere.astype(np.float64)
    sphere /= sphere.sum()
    S = sfft.rfftn(sphere) if half else sfft.fftn(sphere)
    return np.ascontiguousarray(S.real, dtype=dtype)


class DipoleOperator:
    """Zero-padded dipole convolution ``chi -> field`` (ppm -> ppm) with a cached kernel.

    Parameters
    ----------
    shape : 3 ints
        Shape of the images the operator acts on.
    voxel_size : 3 floats, mm
    b0_dir : 3-vector in array axes
    kind : {"continuous", "discrete", "integral"}
    pad_factor : float
        Computational grid is ``padded_shape(shape, pad_factor=pad_factor)``; images are placed
        at the start of the grid and zero-filled after.  1.0 means (almost) circular.
    dtype : float32 (default) or float64
    workers : int, optional
        ``scipy.fft`` worker threads (-1: all cores; default: :func:`fft_workers`, all cores
        unless a caller limited them).

    Notes
    -----
    ``forward`` crops back to ``shape``; ``adjoint`` is its exact transpose (pad, multiply by the
    real, symmetric kernel, crop), so ``forward`` and ``adjoint`` together are suitable for
    gradient-based solvers.
    """

    def __init__(
        self,
        shape: Sequence[int],
        *,
        voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
        b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
        kind: str = "continuous",
        pad_factor: float = 2.0,
        dtype=np.float32,
        workers: int | None = None,
    ):
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) != 3:
            raise ValueError(f"DipoleOperator needs a 3D shape, got {shape!r}")
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.b0_dir = tuple(unit_vector(b0_dir))
        self.kind = kind
        self.dtype = np.dtype(dtype)
        self.workers = fft_workers() if workers is None else workers
        self.padded_shape = padded_shape(self.shape, pad_factor=pad_factor)
        self.kernel = dipole_kernel(
            self.padded_shape,
            voxel_size=self.voxel_size,
            b0_dir=self.b0_dir,
            kind=kind,
            half=True,
            dtype=self.dtype,
        )

    # -- padding helpers ---------------------------------------------------------------------
    def pad(self, x: np.ndarray) -> np.ndarray:
        """Zero-fill ``x`` (image grid) into the computational grid."""
        out = np.zeros(self.padded_shape, dtype=self.dtype)
        out[tuple(slice(0, n) for n in self.shape)] = x
        return out

    def crop(self, x: np.ndarray) -> np.ndarray:
        """Cut the image grid back out of the computational grid."""
        return np.ascontiguousarray(x[tuple(slice(0, n) for n in self.shape)])

    def rfftn(self, x: np.ndarray) -> np.ndarray:
        return sfft.rfftn(x, s=self.padded_shape, workers=self.workers)

    def irfftn(self, X: np.ndarray) -> np.ndarray:
        return sfft.irfftn(X, s=self.padded_shape, workers=self.workers).astype(
            self.dtype, copy=False
        )

    # -- operator ----------------------------------------------------------------------------
    def forward(self, chi: np.ndarray) -> np.ndarray:
        """Field (ppm) induced by ``chi`` (ppm), evaluated on the image grid."""
        chi = np.asarray(chi, dtype=self.dtype)
        X = self.rfftn(chi)  # rfftn with s= zero-pads at the end
        X *= self.kernel
        return self.crop(self.irfftn(X))

    __call__ = forward

    def adjoint(self, field: np.ndarray) -> np.ndarray:
        """Transpose of :meth:`forward` (the kernel is real and even, so this is D again)."""
        return self.forward(field)


def forward_field(
    chi: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    kind: str = "continuous",
    pad_factor: float = 2.0,
    workers: int | None = None,
) -> np.ndarray:
    """Field perturbation (ppm of B0) induced by susceptibility ``chi`` (ppm), zero-padded.

    Parameters
    ----------
    chi : (X, Y, Z) array, ppm
    voxel_size : 3 floats, mm
    b0_dir : unit 3-vector in array axes
    kind : {"continuous", "discrete", "integral"}
    pad_factor : computational grid size relative to ``chi.shape`` (>= 1)
    workers : scipy.fft threads (default: :func:`fft_workers`)

    Returns
    -------
    (X, Y, Z) array, ppm, same dtype as ``chi`` (float32 unless chi is float64).
    """
    chi = np.asarray(chi)
    dtype = np.float64 if chi.dtype == np.float64 else np.float32
    op = DipoleOperator(
        chi.shape,
        voxel_size=voxel_size,
        b0_dir=b0_dir,
        kind=kind,
        pad_factor=pad_factor,
        dtype=dtype,
        workers=workers,
    )
    return op.forward(chi)
