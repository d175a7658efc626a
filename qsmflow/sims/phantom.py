"""A fast analytic numerical head phantom for QSM (susceptibility, proton density, R1, R2*).

The head is built from smooth analytic shapes (ellipsoids, a modulated cortical ribbon, tubes)
defined in an *atlas* space of real head size (millimetres, RAS: array axis 0 = left->right,
axis 1 = posterior->anterior, axis 2 = inferior->superior, origin near the head centre).  The
atlas is scaled isotropically to the physical field of view of the requested grid so that the
head fills about 80 % of the FOV along its longest axis, whatever the matrix and voxel size.  The
same ``seed`` therefore gives the same anatomy at every resolution (useful for resolution
studies); within-tissue texture is a sum of random plane waves in atlas space, hence also
resolution independent.

Labels follow the QSM reconstruction challenge 2.0 head model (Marques et al., MRM 2021) as used
by ``qsm-ci`` and ``qsm-forward``: 1 caudate, 2 globus pallidus, 3 putamen, 4 red nucleus,
5 dentate nucleus, 6 substantia nigra, 7 thalamus, 8 white matter, 9 grey matter, 10 CSF,
11 venous blood, 13 bone, 14 air (paranasal sinuses / mastoid cells), 15 muscle/scalp,
16 calcification; 0 is the air outside the head.

Tissue parameters (susceptibility relative to water in ppm, relative proton density, R1 and R2*
at 3 T) are in :data:`TISSUES`; their sources:

* susceptibility of deep grey matter, WM, GM: Deistung et al., NeuroImage 2013
  (doi:10.1016/j.neuroimage.2012.09.055); Li et al., NeuroImage 2011
  (doi:10.1016/j.neuroimage.2010.11.088); Lim et al., NeuroImage 2013 (PMID 23851325);
  the ranges used by the QSM challenge 2.0 phantom (Marques et al., MRM 2021,
  doi:10.1002/mrm.28716).
* air +9.4 ppm and cortical bone about -2 ppm relative to water: Schenck, Med Phys 1996
  (doi:10.1118/1.597854); Buch et al., MRM 2015 (bone ~ -2.1 ppm, doi:10.1002/mrm.25350).
* venous blood: chi = Hct * dchi_do * (1 - Y) with Hct 0.4, dchi_do 3.39 ppm (SI), Y 0.65-0.7
  -> 0.35-0.45 ppm (Spees et al., MRM 2001; Weisskoff & Kiihne, MRM 1992).
* calcification -0.5 ppm (QSM of intracranial calcifications, Chen et al., Radiology 2014,
  doi:10.1148/radiol.13122640, report roughly -0.2 .. -1 ppm).
* R2* at 3 T: WM ~20/s, GM ~15/s, deep grey nuclei 25-45/s (Peran et al., Brain 2007;
  Yao et al., NeuroImage 2009); venous blood ~50/s; CSF ~2/s; R1 from Wansapura et al.,
  JMRI 1999 and Stanisz et al., MRM 2005; proton density WM ~0.69, GM ~0.8, CSF 1
  (Tofts, Quantitative MRI of the Brain, 2003).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: label -> (name, chi [ppm rel. water], m0 [a.u.], R1 [1/s], R2* [1/s] at 3 T,
#:           texture std of chi [ppm])
TISSUES: dict[int, tuple[str, float, float, float, float, float]] = {
    0: ("outside air", 9.4, 0.0, 0.0, 0.0, 0.0),
    1: ("caudate", 0.07, 0.80, 0.90, 26.0, 0.008),
    2: ("globus pallidus", 0.19, 0.75, 1.10, 45.0, 0.015),
    3: ("putamen", 0.09, 0.80, 0.95, 30.0, 0.010),
    4: ("red nucleus", 0.13, 0.75, 1.00, 35.0, 0.010),
    5: ("dentate nucleus", 0.12, 0.75, 1.00, 38.0, 0.010),
    6: ("substantia nigra", 0.16, 0.75, 1.05, 40.0, 0.012),
    7: ("thalamus", 0.01, 0.75, 0.95, 22.0, 0.006),
    8: ("white matter", -0.03, 0.69, 1.20, 20.0, 0.006),
    9: ("grey matter", 0.02, 0.80, 0.75, 15.0, 0.006),
    10: ("CSF", 0.0, 1.00, 0.25, 2.0, 0.0),
    11: ("venous blood", 0.40, 0.85, 0.62, 50.0, 0.015),
    13: ("bone", -2.0, 0.05, 2.00, 400.0, 0.05),
    14: ("air (sinus)", 9.4, 0.0, 0.0, 0.0, 0.0),
    15: ("muscle/scalp", -0.02, 0.70, 1.00, 35.0, 0.01),
    16: ("calcification", -0.5, 0.30, 1.50, 150.0, 0.0),
}

#: Labels that make up the brain mask (everything inside the inner skull table).
BRAIN_LABELS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16)

#: Half-extent (mm) of the atlas box that is mapped onto the field of view.
_ATLAS_HALF = np.array([96.0, 120.0, 120.0])
#: Centre of the brain (inner skull) and of the AC-like reference for deep nuclei (atlas mm).
_BRAIN_C = np.array([0.0, -2.0, 12.0])
_AC = np.array([0.0, 15.0, -3.0])


@dataclass(frozen=True)
class HeadPhantom:
    """Numerical head phantom on a voxel grid.

    Attributes
    ----------
    chi : (X, Y, Z) float32, ppm relative to water (air +9.4, bone -2, brain ~ -0.05..0.2).
    labels : (X, Y, Z) int16, segmentation (see module docstring; 0 outside the head).
    brain_mask : (X, Y, Z) bool, labels in :data:`BRAIN_LABELS`.
    head_mask : (X, Y, Z) bool, every voxel that is not air (labels not in {0, 14}).
    m0 : (X, Y, Z) float32, relative proton density (0 in air).
    r1 : (X, Y, Z) float32, longitudinal relaxation rate at 3 T (1/s).
    r2star : (X, Y, Z) float32, effective transverse relaxation rate at 3 T (1/s).
    voxel_size : 3 floats, mm.
    affine : (4, 4) float64, RAS voxel-to-world affine (axis-aligned, origin at FOV centre).
    """

    chi: np.ndarray
    labels: np.ndarray
    brain_mask: np.ndarray
    head_mask: np.ndarray
    m0: np.ndarray
    r1: np.ndarray
    r2star: np.ndarray
    voxel_size: tuple[float, float, float]
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.chi.shape)


# --------------------------------------------------------------------------------------------
# geometry helpers (atlas coordinates are open grids broadcastable to the volume)
# --------------------------------------------------------------------------------------------
def _atlas_grid(shape, voxel_size):
    shape = np.asarray(shape, dtype=np.int64)
    h = np.asarray(voxel_size, dtype=np.float64)
    half_fov = shape * h / 2.0
    scale = float(np.min(half_fov / _ATLAS_HALF))  # physical mm per atlas mm (isotropic)
    axes = []
    for i in range(3):
        a = (np.arange(shape[i]) - (shape[i] - 1) / 2.0) * h[i] / scale
        s = [1, 1, 1]
        s[i] = shape[i]
        axes.append(a.reshape(s))
    return axes


def _bbox(axes, center, half):
    """Index slices of the grid that cover ``center +- half`` (atlas mm) on every axis."""
    sl = []
    for i, a in enumerate(axes):
        v = a.ravel()
        idx = np.nonzero(np.abs(v - center[i]) <= half[i])[0]
        if idx.size == 0:
            return None
        sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(sl)


def _ellipsoid(axes, shape, center, semi):
    out = np.zeros(shape, dtype=bool)
    center = np.asarray(center, float)
    semi = np.asarray(semi, float)
    sl = _bbox(axes, center, semi)
    if sl is None:
        return out
    r2 = sum(((axes[i][_sub(sl, i)] - center[i]) / semi[i]) ** 2 for i in range(3))
    out[sl] = r2 <= 1.0
    return out


def _sub(sl, i):
    """Slice of the open grid of axis ``i`` that matches volume slice ``sl``."""
    s = [slice(None)] * 3
    s[i] = sl[i]
    return tuple(s)


def _ellipsoid_radius(axes, center, semi):
    """Normalised ellipsoidal radius (1 on the surface) on the full grid."""
    return np.sqrt(sum(((axes[i] - center[i]) / semi[i]) ** 2 for i in range(3)))


def _tube(axes, shape, points, radius):
    """Union of capsules (segments with radius ``radius`` mm) along a polyline in atlas mm."""
    out = np.zeros(shape, dtype=bool)
    pts = np.asarray(points, float)
    for p, q in zip(pts[:-1], pts[1:]):
        lo = np.minimum(p, q) - radius
        hi = np.maximum(p, q) + radius
        c = (lo + hi) / 2
        sl = _bbox(axes, c, (hi - lo) / 2)
        if sl is None:
            continue
        d = q - p
        L2 = float(d @ d)
        rel = [axes[i][_sub(sl, i)] - p[i] for i in range(3)]
        t = np.clip(sum(rel[i] * d[i] for i in range(3)) / L2, 0.0, 1.0)
        dist2 = sum((rel[i] - t * d[i]) ** 2 for i in range(3))
        out[sl] |= dist2 <= radius**2
    return out


def _texture(axes, rng, *, n_waves=12, wavelength_mm=(12.0, 40.0)):
    """Smooth random field (unit variance on average) as a sum of random plane waves."""
    shape = tuple(a.size for a in axes)
    acc = np.zeros(shape, dtype=np.float32)
    amp = np.sqrt(2.0 / n_waves)
    for _ in range(n_waves):
        lam = rng.uniform(*wavelength_mm)
        v = rng.normal(size=3)
        k = 2 * np.pi / lam * v / np.linalg.norm(v)
        phi = rng.uniform(0, 2 * np.pi)
        ex = np.exp(1j * (k[0] * axes[0] + phi)).astype(np.complex64)
        ey = np.exp(1j * k[1] * axes[1]).astype(np.complex64)
        ez = np.exp(1j * k[2] * axes[2]).astype(np.complex64)
        acc += amp * ((ex * ey) * ez).real
    return acc


# --------------------------------------------------------------------------------------------
def make_head_phantom(
    shape: Sequence[int] = (64, 64, 64),
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    seed: int = 0,
) -> HeadPhantom:
    """Build the numerical head phantom on a grid.

    Parameters
    ----------
    shape : 3 ints
        Matrix size (X, Y, Z); array axes are RAS (left->right, posterior->anterior,
        inferior->superior).
    voxel_size : 3 floats, keyword-only, mm
        The anatomy is scaled isotropically to the physical FOV ``shape * voxel_size`` (head
        fills ~80 % of the FOV along its longest dimension).
    seed : int, keyword-only
        Seed of the within-tissue texture of chi, M0, R1 and R2* (the anatomy itself is fixed).

    Returns
    -------
    HeadPhantom
        Deterministic for a given ``(shape, voxel_size, seed)``.

    Notes
    -----
    See the module docstring for the anatomy, labels and the literature sources of the tissue
    values (Marques et al., MRM 2021; Deistung et al., NeuroImage 2013; Schenck, Med Phys 1996).
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 ints >= 8, got {shape!r}")
    h = tuple(float(v) for v in voxel_size)
    if len(h) != 3 or not all(np.isfinite(v) and v > 0 for v in h):
        raise ValueError(f"voxel_size must be 3 positive floats, got {voxel_size!r}")
    ax = _atlas_grid(shape, h)
    rng = np.random.default_rng(seed)

    labels = np.zeros(shape, dtype=np.int16)

    # --- head, skull, brain ------------------------------------------------------------------
    head = _ellipsoid(ax, shape, (0.0, 0.0, -8.0), (76.0, 95.0, 95.0))
    skull_out = _ellipsoid(ax, shape, _BRAIN_C, (70.0, 88.0, 70.0)) & head
    skull_in = _ellipsoid(ax, shape, _BRAIN_C, (64.0, 81.0, 63.0))
    labels[head] = 15
    labels[skull_out] = 13
    labels[skull_in] = 10  # CSF shell; overwritten by parenchyma below

    # gyral folding: smooth modulation of the cortical boundaries (atlas mm wavelengths ~25-40)
    X, Y, Z = ax
    rel = [X - _BRAIN_C[0], Y - _BRAIN_C[1], Z - _BRAIN_C[2]]
    g1 = 0.5 * (
        np.sin(0.25 * rel[0]) * np.cos(0.21 * rel[1]) + np.sin(0.23 * rel[2] + 0.17 * rel[1])
    )
    g2 = np.cos(0.19 * rel[0] + 0.13 * rel[2]) * np.sin(0.17 * rel[1] - 0.11 * rel[2])
    rho_gm = _ellipsoid_radius(ax, _BRAIN_C, (61.0, 78.0, 60.0))
    rho_wm = _ellipsoid_radius(ax, _BRAIN_C, (52.0, 68.0, 51.0))
    gm = skull_in & (rho_gm <= 1.0 + 0.025 * g2)
    wm = skull_in & (rho_wm <= 1.0 + 0.08 * g1)
    labels[gm] = 9
    labels[wm] = 8

    # --- CSF spaces and deep grey matter (positions relative to an AC-like point) ------------
    def at(p):
        return _AC + np.asarray(p, float)

    for s in (-1.0, 1.0):
        labels[_ellipsoid(ax, shape, at((s * 15, 12, 10)), (6, 11, 9))] = 1  # caudate head
        labels[_ellipsoid(ax, shape, at((s * 26, 2, 1)), (6, 15, 10))] = 3  # putamen
        labels[_ellipsoid(ax, shape, at((s * 18, -3, -1)), (4.5, 9, 6))] = 2  # pallidus
        labels[_ellipsoid(ax, shape, at((s * 10, -19, 5)), (8, 13, 8))] = 7  # thalamus
        labels[_ellipsoid(ax, shape, at((s * 9, -4, 19)), (5, 26, 7))] = 10  # lateral ventricle
        labels[_ellipsoid(ax, shape, at((s * 13, -15, -16)), (5, 10, 4.5))] = 6  # s. nigra
        labels[_ellipsoid(ax, shape, at((s * 5.5, -21, -8)), (5, 5, 5.5))] = 4  # red nucleus
        labels[_ellipsoid(ax, shape, at((s * 16, -50, -24)), (7, 8, 7))] = 5  # dentate
    labels[_ellipsoid(ax, shape, at((0, -10, 4)), (2.5, 14, 8))] = 10  # third ventricle

    # --- veins (restricted to the intracranial space) ----------------------------------------
    veins = np.zeros(shape, dtype=bool)
    # superior sagittal sinus: along the midline arc just inside the inner skull table
    t = np.linspace(np.deg2rad(-30), np.deg2rad(200), 40)
    arc_y = _BRAIN_C[1] + 76.0 * np.cos(t)
    arc_z = _BRAIN_C[2] + 57.0 * np.sin(t)
    keep = arc_z > _BRAIN_C[2] - 8.0
    sss = np.stack([np.zeros(keep.sum()), arc_y[keep], arc_z[keep]], axis=1)
    veins |= _tube(ax, shape, sss, 4.5)
    conf = sss[-1]  # confluence of sinuses (posterior end of the arc)
    # straight sinus (to the confluence) and internal cerebral veins
    veins |= _tube(ax, shape, [conf, at((0, -45, 15)), at((0, -28, 22))], 3.0)
    for s in (-1.0, 1.0):
        veins |= _tube(ax, shape, [at((s * 3, -28, 22)), at((s * 3, 0, 20))], 2.0)
        # transverse sinuses
        veins |= _tube(ax, shape, [conf, conf + (s * 30, 8, -8), conf + (s * 50, 30, -16)], 3.5)
        # a few cortical veins running over the convexity
        veins |= _tube(ax, shape, [at((s * 20, 30, 55)), at((s * 45, 25, 35))], 2.0)
        veins |= _tube(ax, shape, [at((s * 22, -30, 58)), at((s * 48, -40, 30))], 2.0)
    veins &= skull_in
    labels[veins] = 11

    # --- calcification (small, in right parietal white matter) -------------------------------
    labels[_ellipsoid(ax, shape, at((26, -30, 20)), (4.0, 4.0, 4.0))] = 16

    # --- air: paranasal sinuses and mastoid cells, kept outside the brain --------------------
    air = np.zeros(shape, dtype=bool)
    air |= _ellipsoid(ax, shape, (0.0, 78.0, -26.0), (15.0, 8.0, 11.0))  # frontal sinus
    air |= _ellipsoid(ax, shape, (0.0, 30.0, -52.0), (13.0, 13.0, 10.0))  # sphenoid sinus
    for s in (-1.0, 1.0):
        air |= _ellipsoid(ax, shape, (s * 26, 52.0, -62.0), (14.0, 17.0, 18.0))  # maxillary
        air |= _ellipsoid(ax, shape, (s * 56, -15.0, -38.0), (8.0, 10.0, 8.0))  # mastoid
    # keep >= 4 mm of bone between the cavities and the brain
    air &= head & ~_ellipsoid(ax, shape, _BRAIN_C, (68.0, 85.0, 67.0))
    labels[air] = 14

    # --- parameter maps ----------------------------------------------------------------------
    lut = np.zeros((17, 5), dtype=np.float32)
    for lab, (_name, *vals) in TISSUES.items():
        lut[lab] = vals
    chi = lut[labels, 0]
    m0 = lut[labels, 1]
    r1 = lut[labels, 2]
    r2s = lut[labels, 3]
    tex_sd = lut[labels, 4]

    # smooth within-tissue texture; chi and R2* share one (iron raises both), M0 has its own
    t_chi = _texture(ax, rng)
    t_m0 = _texture(ax, rng)
    chi = chi + tex_sd * t_chi
    r2s = r2s * (1.0 + 0.05 * t_chi)
    m0 = m0 * (1.0 + 0.03 * t_m0)
    r1 = r1 * (1.0 + 0.02 * t_m0)

    brain = np.isin(labels, BRAIN_LABELS)
    head_mask = (labels != 0) & (labels != 14)

    affine = np.eye(4)
    affine[:3, :3] = np.diag(h)
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(h)

    return HeadPhantom(
        chi=np.ascontiguousarray(chi, dtype=np.float32),
        labels=labels,
        brain_mask=brain,
        head_mask=head_mask,
        m0=np.ascontiguousarray(m0, dtype=np.float32),
        r1=np.ascontiguousarray(r1, dtype=np.float32),
        r2star=np.ascontiguousarray(r2s, dtype=np.float32),
        voxel_size=h,
        affine=affine,
    )
