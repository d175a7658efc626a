"""Brain / head masks from GRE magnitude or from phase alone.

Four methods (the registry lists them as the `mask` stage; `reliable` is below):

``"threshold"`` (:func:`mask_threshold`)
    Global intensity threshold of the magnitude (Otsu, IEEE Trans SMC 1979, or a percentile),
    largest connected component, hole filling.  Gives the *head* (or the brain when the skull is
    a clean dark gap), never separates scalp that touches the brain.
``"phase-quality"`` (:func:`mask_phase_quality`)
    Threshold of a ROMEO-style voxel quality map built from the wrapped phase (Dymerska et al.,
    MRM 2021): works without magnitude, i.e. for phase-only data.
``"bet"`` (:func:`mask_bet`)
    A morphological skull strip that uses BET's robust intensity statistics (Smith, HBM 2002)
    but NOT its deformable surface model: threshold -> erosion that breaks skull/scalp bridges
    -> largest component -> geodesic dilation back -> hole filling.  The key is called ``"bet"``
    for the command line; the algorithm is described honestly in :func:`mask_bet`.

A user-supplied mask always wins: see :func:`resolve_mask`.

Masks are returned as bool arrays on the input grid (X, Y, Z).  NaN / inf voxels of the input
are treated as *outside* (signal absent), never propagated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage as ndi

from qsmflow.algorithms.units import wrap_to_pi

__all__ = [
    "mask_threshold",
    "mask_phase_quality",
    "mask_bet",
    "mask_reliable",
    "reliability_maps",
    "resolve_mask",
    "phase_quality_map",
    "largest_component",
    "fill_mask_holes",
]


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _check_voxel_size(voxel_size) -> np.ndarray:
    h = np.asarray(voxel_size, dtype=np.float64).ravel()
    if h.size != 3 or not np.all(np.isfinite(h)) or np.any(h <= 0):
        raise ValueError(f"voxel_size must be 3 positive numbers (mm), got {voxel_size!r}")
    return h


def _combine_magnitude(magnitude) -> np.ndarray:
    """3D magnitude: 3D input as is, 4D input combined by root-sum-of-squares over echoes.

    Non-finite voxels become 0 (outside).
    """
    m = np.asarray(magnitude)
    if m.ndim not in (3, 4):
        raise ValueError(f"magnitude must be 3D (X,Y,Z) or 4D (X,Y,Z,E), got shape {m.shape}")
    if m.size == 0:
        raise ValueError("magnitude is empty")
    m = np.where(np.isfinite(m), np.abs(m), 0.0).astype(np.float32, copy=False)
    if m.ndim == 4:
        m = np.sqrt(np.sum(m.astype(np.float64) ** 2, axis=3)).astype(np.float32)
    if not np.any(m > 0):
        raise ValueError("magnitude has no positive finite voxel")
    return m


def _ball(radius_mm: float, voxel_size: np.ndarray) -> np.ndarray:
    """Ellipsoidal (in voxels) structuring element of a ``radius_mm`` ball in physical space."""
    r = np.floor(radius_mm / voxel_size + 1e-6).astype(int)
    grids = np.ogrid[tuple(slice(-ri, ri + 1) for ri in r)]
    d2 = sum((g * hi) ** 2 for g, hi in zip(grids, voxel_size))
    return d2 <= radius_mm**2 + 1e-6


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 6-connected component of a bool mask (all False if the mask is empty)."""
    lab, n = ndi.label(mask)
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == int(np.argmax(counts))


def fill_mask_holes(mask: np.ndarray, *, slicewise: bool = True) -> np.ndarray:
    """Fill enclosed holes in 3D, then (optionally) slice by slice along each array axis.

    The 2D pass closes cavities that touch the outside in 3D only through a thin channel
    (e.g. a sulcus or a ventricle that opens at one slice), which matters for QSM masks.
    """
    out = ndi.binary_fill_holes(mask)
    if slicewise:
        s2 = ndi.generate_binary_structure(2, 1)
        for ax in range(3):
            moved = np.moveaxis(out, ax, 0)
            filled = np.stack([ndi.binary_fill_holes(sl, structure=s2) for sl in moved])
            out = np.moveaxis(filled, 0, ax)
    return np.ascontiguousarray(out, dtype=bool)


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    v = values[np.isfinite(values)]
    if v.size == 0 or np.ptp(v) == 0:
        raise ValueError("cannot threshold a constant image")
    return float(threshold_otsu(v, nbins=256))


# ------------------------------------------------------------------------------------------
# threshold
# ------------------------------------------------------------------------------------------
def mask_threshold(
    magnitude: np.ndarray,
    *,
    method: str = "otsu",
    percentile: float = 75.0,
    fill_holes: bool = True,
    erode_mm: float = 0.0,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Head mask by a global magnitude threshold.

    Parameters
    ----------
    magnitude : (X, Y, Z) or (X, Y, Z, E) array, a.u.
        GRE magnitude.  4D input is combined by root-sum-of-squares over the echoes (the RSS
        keeps the SNR of the first echo and adds the later ones).  NaN / inf are treated as 0
        (outside).
    method : {"otsu", "percentile"}, keyword-only
        ``"otsu"``: Otsu's threshold (Otsu, IEEE Trans Syst Man Cybern 1979) of the
        histogram of all voxels.  ``"percentile"``: the ``percentile``-th percentile of the
        intensities (depends on how much of the field of view the head fills).
    percentile : float, keyword-only
        Percentile (0-100) used by ``method="percentile"``.
    fill_holes : bool, keyword-only
        Fill holes (3D, then slice-wise along each axis; see :func:`fill_mask_holes`).
    erode_mm : float, keyword-only
        Erode the final mask by a ball of this radius (mm); 0 disables.
    voxel_size : 3 floats, mm, keyword-only

    Returns
    -------
    (X, Y, Z) bool
        Largest 6-connected component of the thresholded magnitude, filled, optionally eroded.
    """
    h = _check_voxel_size(voxel_size)
    m = _combine_magnitude(magnitude)
    if method == "otsu":
        thr = _otsu(m)
    elif method == "percentile":
        if not 0.0 <= percentile < 100.0:
            raise ValueError(f"percentile must be in [0, 100), got {percentile}")
        thr = float(np.percentile(m, percentile))
    else:
        raise ValueError(f"unknown threshold method {method!r}; use 'otsu' or 'percentile'")
    mask = largest_component(m > thr)
    if fill_holes:
        mask = fill_mask_holes(mask)
    if erode_mm < 0:
        raise ValueError(f"erode_mm must be >= 0, got {erode_mm}")
    if erode_mm > 0:
        mask = ndi.binary_erosion(mask, structure=_ball(erode_mm, h))
        mask = largest_component(mask)
    if not mask.any():
        raise ValueError("threshold mask is empty")
    return mask


# ------------------------------------------------------------------------------------------
# phase quality
# ------------------------------------------------------------------------------------------
def phase_quality_map(
    phase: np.ndarray,
    *,
    magnitude: np.ndarray | None = None,
    te_s: Sequence[float] | None = None,
) -> np.ndarray:
    """ROMEO-style voxel quality in [0, 1] from wrapped phase (Dymerska et al., MRM 2021).

    For every pair of 6-neighbours ``(i, j)`` an edge weight is the product of the ROMEO
    coherence terms that the data allow:

    * phase coherence ``1 - |wrap(phi_j - phi_i)| / pi`` of the first echo;
    * phase-gradient coherence (two echoes or more, ``te_s`` given):
      ``max(0, 1 - |wrap(d phi_1) - wrap(d phi_2) TE1 / TE2|)``, with ``d phi_e`` the
      neighbour difference of echo ``e`` (linear phase evolution predicts equality);
    * magnitude coherence ``(min(M_i, M_j) / max(M_i, M_j))^2`` of the first echo (magnitude
      given).

    A voxel's quality is the mean of the weights of its (up to) 6 edges.  In pure noise
    (air) the wrapped neighbour difference is uniform on [-pi, pi), so the phase coherence
    averages 0.5 and the gradient coherence about 0.25, whereas smooth tissue phase scores
    near 1.  Out-of-volume neighbours are ignored; non-finite phase gives weight 0.

    Parameters
    ----------
    phase : (X, Y, Z) or (X, Y, Z, E) array, rad (wrapped or not)
    magnitude : same shape as ``phase`` or None
    te_s : sequence of E echo times (s) or None

    Returns
    -------
    (X, Y, Z) float32 quality map.
    """
    p = np.asarray(phase, dtype=np.float32)
    if p.ndim == 3:
        p = p[..., None]
    if p.ndim != 4 or p.shape[3] < 1 or min(p.shape[:3]) < 2:
        raise ValueError(f"phase must be 3D or 4D with >= 2 voxels per axis, got {p.shape}")
    finite = np.all(np.isfinite(p), axis=3)
    p = np.where(finite[..., None], p, 0.0).astype(np.float32)
    n_echo = p.shape[3]
    ratio = None
    if n_echo >= 2 and te_s is not None:
        te = np.asarray(te_s, dtype=np.float64).ravel()
        if te.size != n_echo or np.any(~np.isfinite(te)) or np.any(te <= 0):
            raise ValueError(f"te_s must hold {n_echo} positive echo times (s), got {te_s!r}")
        ratio = float(te[0] / te[1])
    mag = None
    if magnitude is not None:
        mag = np.asarray(magnitude, dtype=np.float32)
        if mag.ndim == 3:
            mag = mag[..., None]
        if mag.shape[:3] != p.shape[:3]:
            raise ValueError(f"magnitude shape {mag.shape} does not match phase {p.shape}")
        mag = np.where(np.isfinite(mag[..., 0]), np.abs(mag[..., 0]), 0.0).astype(np.float32)

    acc = np.zeros(p.shape[:3], dtype=np.float32)
    cnt = np.zeros(p.shape[:3], dtype=np.float32)
    for ax in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax] = slice(0, -1)
        hi[ax] = slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        d1 = wrap_to_pi(p[hi + (0,)] - p[lo + (0,)])
        w = 1.0 - np.abs(d1) / np.float32(np.pi)
        if ratio is not None:
            d2 = wrap_to_pi(p[hi + (1,)] - p[lo + (1,)])
            w *= np.clip(1.0 - np.abs(d1 - d2 * np.float32(ratio)), 0.0, 1.0)
        if mag is not None:
            a, b = mag[lo], mag[hi]
            big = np.maximum(a, b)
            with np.errstate(invalid="ignore", divide="ignore"):
                mc = np.where(big > 0, np.minimum(a, b) / big, 0.0)
            w *= mc**2
        w = np.where(finite[lo] & finite[hi], w, 0.0).astype(np.float32)
        acc[lo] += w
        acc[hi] += w
        cnt[lo] += 1
        cnt[hi] += 1
    return (acc / np.maximum(cnt, 1)).astype(np.float32)


def mask_phase_quality(
    phase: np.ndarray,
    *,
    magnitude: np.ndarray | None = None,
    te_s: Sequence[float] | None = None,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    threshold: float = -1.0,
    smooth_mm: float = 2.0,
    use_magnitude: bool = True,
    late_echoes: bool = True,
) -> np.ndarray:
    """Head/brain mask from a phase-quality map; works with phase alone.

    The ROMEO voxel quality (:func:`phase_quality_map`; Dymerska et al., "Phase unwrapping
    with a rapid opensource minimum spanning tree algorithm (ROMEO)", MRM 2021,
    doi:10.1002/mrm.28563) measures local phase smoothness: neighbours in tissue have small
    wrapped phase differences, neighbours in noise (air, bone) have random ones.  With several
    echoes and ``te_s`` the phase-gradient coherence between echoes 1 and 2 is included; with
    magnitude (and ``use_magnitude``) the quality is additionally multiplied by the magnitude
    coherence and by the magnitude normalised to its 99th percentile (clipped to 1), as in
    ROMEO's magnitude weights.  The map is smoothed by a Gaussian of ``smooth_mm`` FWHM-free
    standard deviation (reduces the variance of the noise quality, cf. phase-coherence masking
    of Hagberg et al., "Phase-based masking for quantitative susceptibility mapping of the
    human brain at 9.4T", MRM 2022), thresholded, reduced to its largest component and filled.

    Parameters
    ----------
    phase : (X, Y, Z) or (X, Y, Z, E) array, rad
    magnitude : same shape as ``phase`` or None
        Optional; not needed (phase-only data).
    te_s : sequence of E floats (s) or None
    voxel_size : 3 floats, mm, keyword-only
    threshold : float, keyword-only
        Quality threshold in [0, 1]; a negative value (default) selects Otsu's threshold of
        the smoothed quality map.
    smooth_mm : float, keyword-only
        Standard deviation (mm) of the Gaussian smoothing of the quality map (0: none).
    use_magnitude : bool, keyword-only
        Use ``magnitude`` when it is given.
    late_echoes : bool, keyword-only
        With 3 echoes or more (and ``te_s``), multiply the quality by that of the last two
        echoes (phase and phase-gradient coherence).  Bone, marrow and scalp keep a smooth phase
        at early echoes (partial volume, long-T2* scalp) but lose it at late ones (short T2*,
        steep fields), so the mask keeps to the brain instead of the whole head.  Measured on
        :func:`qsmflow.sims.realistic.make_realistic_head` (3T, 6 echoes, 64^3 of 2.65 mm,
        phase only, LBV + RTS): 48874 -> 1607 mask voxels outside the brain, chi NRMSE 393% ->
        83% (BET on the magnitude: 90%).

    Returns
    -------
    (X, Y, Z) bool mask.  Non-finite phase voxels are outside.
    """
    h = _check_voxel_size(voxel_size)
    p = np.asarray(phase)
    if p.ndim not in (3, 4):
        raise ValueError(f"phase must be 3D or 4D, got shape {p.shape}")
    mag = magnitude if use_magnitude else None
    if mag is not None and np.asarray(mag).shape[:3] != p.shape[:3]:
        raise ValueError("magnitude and phase shapes differ")
    q = phase_quality_map(p, magnitude=mag, te_s=te_s)
    if late_echoes and te_s is not None and p.ndim == 4 and p.shape[3] >= 3:
        # phase coherence of the last two echoes: short-T2* bone and marrow and the steep
        # fields of the scalp lose it at late echoes, brain tissue keeps it
        q = q * phase_quality_map(p[..., -2:], te_s=tuple(te_s)[-2:])
    if mag is not None:
        m = _combine_magnitude(np.asarray(mag)[..., 0] if np.asarray(mag).ndim == 4 else mag)
        scale = float(np.percentile(m, 99.0))
        q = q * np.clip(m / scale, 0.0, 1.0) if scale > 0 else q
    if smooth_mm < 0:
        raise ValueError(f"smooth_mm must be >= 0, got {smooth_mm}")
    if smooth_mm > 0:
        q = ndi.gaussian_filter(q, sigma=smooth_mm / h, mode="nearest")
    if threshold < 0:
        thr = _otsu(q)
    elif threshold <= 1:
        thr = float(threshold)
    else:
        raise ValueError(f"threshold must be in [0, 1] (or negative for Otsu), got {threshold}")
    finite = np.all(np.isfinite(p.reshape(p.shape[:3] + (-1,))), axis=3)
    mask = largest_component((q > thr) & finite)
    mask = fill_mask_holes(mask)
    if not mask.any():
        raise ValueError("phase-quality mask is empty")
    return mask


# ------------------------------------------------------------------------------------------
# skull strip
# ------------------------------------------------------------------------------------------
def mask_bet(
    magnitude: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    fractional_intensity: float = 0.5,
    local_fraction: float = 0.15,
    erode_mm: float = -1.0,
    erode_fraction: float = 0.12,
) -> np.ndarray:
    """Brain mask by morphological skull stripping (BET-inspired; NOT BET's surface model).

    Borrows the robust intensity statistics and the local "darker than a fraction of the
    nearby maximum" criterion of BET (Smith, "Fast robust automated brain extraction", Hum
    Brain Mapp 2002, doi:10.1002/hbm.10062), but replaces BET's deformable tessellated
    surface by a morphological opening by reconstruction:

    1. ``t2``, ``t98``: 2nd/98th intensity percentiles; background threshold
       ``t = t2 + 0.1 (t98 - t2)`` (as in BET); head = largest component of ``I > t``,
       filled; ``r`` = the head's equivalent-sphere radius (mm).
    2. Local threshold (BET's ``tl = (Imax - t2) bt + t2`` evaluated at every voxel): a voxel
       is a brain candidate if ``I > t2 + f (Imax - t2)``, with ``Imax`` the maximum of ``I``
       in a cube of half-width ``local_fraction * r`` and ``f = fractional_intensity``.  The
       dark skull (and its partial-volume rim) fails this test even where blurring lifts it
       above any global threshold, while brain and CSF next to it pass.
    3. Erode the candidates by a ball of radius ``erode_mm`` (default ``erode_fraction * r``)
       to break the remaining thin bridges to scalp / muscle, keep the largest component (the
       brain), dilate it back geodesically within the candidates (same radius plus one
       voxel).
    4. Fill holes (3D and slice-wise, :func:`fill_mask_holes`).

    Scales are fractions of the head radius, so the method behaves the same for any voxel
    size and for the (scaled) numerical phantom as for an adult head (r ~ 80 mm: local window
    ~ 12 mm, erosion ~ 10 mm, comparable to BET's d2 = 10 mm and to scalp + skull thickness).

    Parameters
    ----------
    magnitude : (X, Y, Z) or (X, Y, Z, E) array, a.u.
        GRE magnitude of a whole head (a field of view cropped inside the brain has no skull to
        strip: use ``"threshold"``).  4D input is combined by root-sum-of-squares over echoes.
        NaN/inf are treated as 0 (outside).
    voxel_size : 3 floats, mm, keyword-only
    fractional_intensity : float in (0, 1), keyword-only
        ``f`` of step 2 (BET's ``-f``, default 0.5; smaller gives a larger brain estimate).
    local_fraction : float, keyword-only
        Half-width of the local-maximum window as a fraction of the head radius.
    erode_mm : float, keyword-only
        Erosion radius (mm); negative (default) means ``erode_fraction`` times the head radius.
    erode_fraction : float, keyword-only
        Erosion radius as a fraction of the head radius (used when ``erode_mm < 0``).

    Returns
    -------
    (X, Y, Z) bool brain mask.

    Notes
    -----
    Evaluated alternative: the PyPI package ``brainextractor`` 0.3.0 (a Python BET, MIT).
    On the 64^3 phantom it took 11-20 s (this method: ~0.3 s), reached brain Dice 0.92 on clean
    and 0.85 on blurred magnitude (this method: 1.00 and ~0.98), assumes isotropic voxels, and
    depends on numba, trimesh and pyrender; it was not adopted.
    """
    h = _check_voxel_size(voxel_size)
    if not 0.0 < fractional_intensity < 1.0:
        raise ValueError(f"fractional_intensity must be in (0, 1), got {fractional_intensity}")
    if local_fraction < 0 or erode_fraction < 0:
        raise ValueError("local_fraction and erode_fraction must be >= 0")
    m = _combine_magnitude(magnitude)
    t2, t98 = (float(v) for v in np.percentile(m, [2.0, 98.0]))
    if t98 <= t2:
        raise ValueError("magnitude has no usable contrast")
    t = t2 + 0.1 * (t98 - t2)
    head = fill_mask_holes(largest_component(m > t))
    if not head.any():
        raise ValueError("no head found in the magnitude")
    r_head = float(np.cbrt(3.0 * head.sum() * np.prod(h) / (4.0 * np.pi)))

    half = np.round(local_fraction * r_head / h).astype(int)
    local_max = ndi.maximum_filter(m, size=tuple(2 * half + 1), mode="nearest")
    cand = head & (m > t) & (m > t2 + fractional_intensity * (local_max - t2))

    radius = erode_fraction * r_head if erode_mm < 0 else float(erode_mm)
    core = largest_component(cand)
    if radius >= float(h.min()):
        eroded = largest_component(ndi.binary_erosion(cand, structure=_ball(radius, h)))
        if eroded.any():  # else too aggressive for this head: keep the un-eroded component
            grown = ndi.binary_dilation(eroded, structure=_ball(radius + float(h.max()), h))
            core = largest_component(grown & cand)
    mask = fill_mask_holes(core)
    if not mask.any():
        raise ValueError("skull strip produced an empty mask")
    return mask


# ------------------------------------------------------------------------------------------
# reliability (magnitude + multi-echo phase quality)
# ------------------------------------------------------------------------------------------
def _as_4d(x, name):
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise ValueError(f"{name} must be 3D or 4D, got shape {a.shape}")
    return np.where(np.isfinite(a), a, 0.0).astype(np.float32)


def reliability_maps(
    magnitude: np.ndarray,
    phase: np.ndarray | None = None,
    *,
    te_s: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Voxel-wise quality measures of multi-echo GRE data (no mask, no unwrapping needed).

    * ``"noise"``: relative standard deviation of a weighted least-squares field estimate,
      ``1 / sqrt(sum_e M_e^2 TE_e^2)`` (Wu et al., NeuroImage 2012; a.u., scale it by the
      image noise to get rad/s).  Large in dark voxels (bone, air, dephased voxels).
    * ``"residual"`` (>= 3 echoes, equal spacing assumed only for the frequency estimate):
      noise-normalised residual of a linear phase evolution.  The echo-to-echo phase steps
      ``d_e = arg(S_{e+1} conj(S_e))`` of one voxel should all equal ``omega dTE_e``; with
      ``omega`` from the magnitude-weighted complex sum of the steps, the residual is
      ``mean_e wrap(d_e - omega dTE_e)^2 / (1/M_e^2 + 1/M_{e+1}^2)``, a chi-square-like
      statistic (times the noise variance) that grows where the signal of a voxel is not
      one mono-frequency component: partial volume of tissues with different frequency and
      T2* (skull, sinus walls), flow, noise-only voxels.
    * ``"r2star"`` (>= 2 echoes): log-linear least-squares R2* (1/s).

    Parameters
    ----------
    magnitude : (X, Y, Z, E) array, a.u.
    phase : (X, Y, Z, E) array, rad (wrapped), or None
    te_s : E echo times (s), keyword-only

    Returns
    -------
    dict of (X, Y, Z) float32 maps (keys present as the data allow).
    """
    mag = np.abs(_as_4d(magnitude, "magnitude")).astype(np.float64)
    n_e = mag.shape[3]
    out: dict[str, np.ndarray] = {}
    te = None
    if te_s is not None:
        te = np.asarray(te_s, dtype=np.float64).ravel()
        if te.size != n_e or np.any(~np.isfinite(te)) or np.any(te <= 0):
            raise ValueError(f"te_s must hold {n_e} positive echo times (s), got {te_s!r}")
    tw = te if te is not None else np.arange(1, n_e + 1, dtype=np.float64)
    out["noise"] = (1.0 / np.sqrt(np.einsum("xyze,e->xyz", mag**2, tw**2) + 1e-30)).astype(
        np.float32
    )
    if te is not None and n_e >= 2:
        logm = np.log(np.maximum(mag, 1e-12 * max(float(mag.max()), 1e-30)))
        w = mag**2  # weights of the log-linear fit ~ inverse variance of log M
        sw = w.sum(-1) + 1e-30
        tm = np.einsum("xyze,e->xyz", w, te) / sw
        lm = (w * logm).sum(-1) / sw
        cov = np.einsum("xyze,e->xyz", w * logm, te) / sw - tm * lm
        var = np.einsum("xyze,e->xyz", w, te**2) / sw - tm**2
        out["r2star"] = np.where(var > 0, -cov / np.where(var > 0, var, 1), 0).astype(np.float32)
    if phase is not None and te is not None and n_e >= 3:
        ph = _as_4d(phase, "phase")
        if ph.shape != mag.shape:
            raise ValueError(f"phase shape {ph.shape} does not match magnitude {mag.shape}")
        s = mag * np.exp(1j * ph.astype(np.float64))
        steps = s[..., 1:] * np.conj(s[..., :-1])
        dte = np.diff(te)
        omega = np.angle((steps / dte).sum(-1)) / float(np.mean(dte))
        res = np.angle(steps * np.exp(-1j * omega[..., None] * dte))
        with np.errstate(divide="ignore"):
            inv2 = (
                1.0 / np.maximum(mag[..., 1:], 1e-30) ** 2
                + 1.0 / np.maximum(mag[..., :-1], 1e-30) ** 2
            )
        out["residual"] = np.mean(res**2 / inv2, axis=-1).astype(np.float32)
    return out


def mask_reliable(
    magnitude: np.ndarray,
    *,
    phase: np.ndarray | None = None,
    te_s: Sequence[float] | None = None,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    noise_max: float = 5.0,
    residual_max: float = 0.0,
    r2star_max: float = 6.0,
    quality_vote: bool = False,
    erode_fraction: float = 0.12,
    smooth_mm: float = 2.0,
) -> np.ndarray:
    """Brain mask of the voxels whose field a background removal can trust.

    Combines the magnitude with the quality of the multi-echo phase, so that the mask stops
    in the CSF that surrounds the brain and leaves out the skull, the walls of air cavities
    and other low-signal voxels, whose field values are wrong (and would be taken as exact
    boundary values by LBV or fitted by PDF):

    1. magnitude candidates: root-sum-of-squares magnitude above Otsu's threshold
       (Otsu 1979), as in :func:`mask_threshold`;
    2. reliability (:func:`reliability_maps`): a voxel is kept only if its relative field
       noise is below ``noise_max`` times the median of the candidates, its normalised
       multi-echo phase residual below ``residual_max`` times that median (>= 3 echoes), and
       its R2* below ``r2star_max`` times the median (bone and dephased voxels decay fast);
    3. with ``quality_vote``, the ROMEO phase quality (:func:`phase_quality_map`, Dymerska et
       al., MRM 2021: phase coherence, phase-gradient coherence between echoes, magnitude
       coherence) must also be above its Otsu threshold (a two-of-two consensus of the
       magnitude- and the phase-based mask).  Off by default: on the realistic head
       (:mod:`qsmflow.sims.realistic`) it removes the outer CSF, and LBV needs that CSF
       (the local field is small there): local-field NRMSE 65 % with the vote, 43 % without
       (96^3);
    4. bridges to scalp and neck are cut as in :func:`mask_bet`: the reliable voxels are
       eroded by ``erode_fraction`` of the head radius (via a distance transform), the largest
       component is kept and grown back by the same radius plus a voxel within the reliable
       voxels (an opening by reconstruction), holes filled (3D and slice-wise: veins, deep
       grey matter and calcifications with high R2* inside the brain come back), and the
       boundary smoothed by a Gaussian of ``smooth_mm`` (a majority vote: the smoothed
       indicator above 0.5) without growing past the candidates.

    Parameters
    ----------
    magnitude : (X, Y, Z, E) or (X, Y, Z) array, a.u.
    phase : same shape or None, rad (wrapped), keyword-only
        Without phase (or echo times) only the magnitude criteria are used.
    te_s : E echo times (s), keyword-only
    voxel_size : 3 floats (mm), keyword-only
    noise_max, residual_max, r2star_max : float, keyword-only
        Thresholds relative to the median over the magnitude candidates; 0 disables one.
        ``residual_max`` is off by default: on the realistic head the residual of skull voxels
        is barely above tissue (median 1.4x vs 0.9x the brain median at 7 T; noise-only
        voxels have a small noise-normalised residual) while vein and CSF-edge voxels of the
        brain reach 30-80x, so it removed brain (Dice 0.987 at 60x, 0.992 off).  The other
        defaults are loose on purpose: on the realistic head the magnitude threshold
        already stops at the skull, and stricter limits (3, 10, 4) only removed CSF and
        cortex (brain Dice 0.975 instead of 0.996 at 64^3); they are a safety net for bright
        voxels with unusable phase.
    quality_vote : bool, keyword-only
        Require the ROMEO phase quality as well (needs ``phase``).
    erode_fraction : float, keyword-only
        Erosion radius of step 4 as a fraction of the head's equivalent-sphere radius
        (0 disables: then only the largest component is kept).
    smooth_mm : float, keyword-only
        Boundary smoothing (mm); 0 disables.

    Returns
    -------
    (X, Y, Z) bool brain mask.
    """
    h = _check_voxel_size(voxel_size)
    mag4 = _as_4d(magnitude, "magnitude")
    m = _combine_magnitude(mag4)
    cand = m > _otsu(m)
    if not cand.any():
        raise ValueError("no voxel above the magnitude threshold")
    ph4 = None
    if phase is not None:
        ph4 = _as_4d(phase, "phase")
        if ph4.shape[:3] != m.shape:
            raise ValueError(f"phase shape {ph4.shape} does not match magnitude {mag4.shape}")
    maps = reliability_maps(
        mag4, ph4 if ph4 is not None and ph4.shape == mag4.shape else None, te_s=te_s
    )
    good = cand.copy()
    for key, limit in (("noise", noise_max), ("residual", residual_max), ("r2star", r2star_max)):
        if key in maps and limit > 0:
            ref = float(np.median(maps[key][cand]))
            if ref > 0:
                good &= maps[key] <= limit * ref
    if quality_vote and ph4 is not None:
        q = phase_quality_map(
            ph4,
            magnitude=mag4[..., :1] if mag4.shape[3] else None,
            te_s=te_s if ph4.shape[3] >= 2 else None,
        )
        q = ndi.gaussian_filter(q, sigma=1.0 / h * h.min(), mode="nearest")
        good &= q > _otsu(q[cand])
    # cut bridges to scalp/neck: erode (distance transform), largest component, grow back
    # geodesically within the reliable voxels (an opening by reconstruction, as in mask_bet)
    head = fill_mask_holes(largest_component(cand))
    r_head = float(np.cbrt(3.0 * head.sum() * np.prod(h) / (4.0 * np.pi)))
    radius = erode_fraction * r_head
    core = largest_component(good)
    if radius >= float(h.min()):
        inside = ndi.distance_transform_edt(np.pad(good, 1), sampling=h)[1:-1, 1:-1, 1:-1]
        seed = largest_component(inside > radius)
        if seed.any():
            reach = ndi.distance_transform_edt(~seed, sampling=h) <= radius + float(h.max())
            core = largest_component(reach & good)
    mask = fill_mask_holes(core)
    if smooth_mm > 0:
        sm = ndi.gaussian_filter(mask.astype(np.float32), sigma=smooth_mm / h, mode="constant")
        mask = fill_mask_holes(largest_component((sm > 0.5) & (cand | mask)))
    if not mask.any():
        raise ValueError("reliability mask is empty")
    return mask


# ------------------------------------------------------------------------------------------
def resolve_mask(
    user_mask: np.ndarray | None = None,
    *,
    compute: Callable[[], np.ndarray] | None = None,
    shape: Sequence[int] | None = None,
) -> np.ndarray:
    """A user-given mask always wins; otherwise call ``compute()``.

    Parameters
    ----------
    user_mask : array or None
        Any numeric/bool array; non-zero finite voxels are inside.  Must be 3D and non-empty
        (and of ``shape`` when given).
    compute : callable returning a bool mask, keyword-only
        Called only when ``user_mask`` is None.
    shape : 3 ints or None, keyword-only
        Expected shape, checked for either mask.
    """
    if user_mask is not None:
        m = np.asarray(user_mask)
        mask = np.isfinite(m) & (m != 0) if m.dtype != bool else m.copy()
    elif compute is not None:
        mask = np.asarray(compute(), dtype=bool)
    else:
        raise ValueError("give a user mask or a compute callable")
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {mask.shape}")
    if shape is not None and tuple(mask.shape) != tuple(int(n) for n in shape):
        raise ValueError(f"mask shape {mask.shape} does not match data shape {tuple(shape)}")
    if not mask.any():
        raise ValueError("mask is empty")
    return mask
