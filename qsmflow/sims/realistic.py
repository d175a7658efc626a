"""A realistic simulated head for end-to-end QSM tests: skull, CSF, scalp and air next to the brain.

The brain anatomy (cortex, white matter, deep grey nuclei, ventricles, veins, a calcification)
is that of :func:`qsmflow.sims.phantom.make_head_phantom`.  Around it, and unlike that phantom
(whose shells scale with the field of view), everything that makes real data hard for masking
and background removal is built at its physical size in millimetres:

* a CSF shell of ``csf_mm`` (3 mm) between the cortex and the inner skull table (chi 0,
  bright, long T2*);
* the skull (``skull_mm``, 7 mm): outer and inner tables of cortical bone (chi -2 ppm relative
  to water, Buch et al., MRM 2015; proton density 0.05, R2* 1000/s at 3 T, i.e. T2* 1 ms:
  ultrashort-T2 bone is essentially invisible in GRE) around a diploe of marrow (chi -1 ppm,
  proton density 0.3, R2* 150/s);
* the scalp (``scalp_mm``, 6 mm: skin + subcutaneous fat + muscle, chi -0.02 ppm, bright);
* a neck down to the bottom of the field of view;
* air (chi +9.4 ppm relative to water; Schenck, Med Phys 1996): a frontal sinus with only
  ``sinus_bone_mm`` (1.5 mm) of bone between it and the CSF shell, a sphenoid sinus under the
  brain, and ear canals running from the outside air into middle-ear/mastoid cavities a few
  millimetres from the temporal lobes;
* fine tissue texture (Gaussian-filtered noise, 2 mm correlation) on top of the phantom's
  smooth texture;
* partial volume: chi is blurred at tissue-tissue edges within the intracranial and the
  extracranial compartments separately (so that the inversion ground truth ``chi * mask`` holds
  no bone), and the complex MR signal leaks 1/8 into each neighbour along every axis
  (point-spread function)
  everywhere, so edge voxels of magnitude and phase mix compartments as in a real acquisition;
  intravoxel dephasing from the macroscopic field gradient (sinc attenuation, e.g.
  Fernandez-Seara & Wehrli, MRM 2000) darkens voxels next to the air cavities at late echoes.

The fields are the voxel-integrated dipole fields (``kind="integral"`` of
:class:`~qsmflow.algorithms.dipole.DipoleOperator`) of ``chi - chi_air`` (total) and of
``chi * brain_mask`` (local), as in :mod:`qsmflow.sims.field`.  The signal is the
mono-exponential multi-echo GRE model of :mod:`qsmflow.sims.signal` with a smooth transceive
phase offset and complex Gaussian noise.

To fit a whole head with its physical-size shells into a 160^3 grid of 1.06 mm (170 mm field
of view) the brain is scaled to ``brain_scale`` (0.8) of the atlas' adult size; the shells,
the air cavities and their distances to the brain are not scaled.

``hard=True`` makes the head harder in the ways real heads are (issue 20; parts in
:mod:`qsmflow.sims.head_features`): a CSF layer of varying thickness (1.2-5 mm), a 1 mm dura
(chi -0.03 ppm, dark) between it and the skull, the superior sagittal sinus in the dura
(straddling the brain mask's edge) and cortical veins over the convexity (+0.35..0.45 ppm),
irregular lobulated air cavities (frontal sinus, ethmoid cells under the orbitofrontal cortex,
sphenoid, mastoid / middle-ear cells and ear canals) with only 1 mm of bone between them and
the dura, and a residual shim field (solid harmonics of order 1 and 2, the preset's
``shim_hz``).  ``anatomy="cosmos"`` takes the brain from the 2016 QSM challenge's COSMOS map
(a real anatomy at its real size; read from ``anatomy_dir`` at run time, never shipped).

Presets (:data:`PRESETS`): ``"3t-axial"`` (3 T, 6 echoes 4-29 ms, B0 along the array's z
axis) and ``"7t-oblique"`` (7 T, 5 echoes 3-19 ms, tissue R2* scaled to 7 T, slab tilted by
18 degrees about x and 10 degrees about y, i.e. an oblique B0 in the array's axes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from qsmflow.algorithms.dipole import DipoleOperator, b0_dir_from_affine
from qsmflow.algorithms.units import ppm_to_phase, wrap_to_pi
from qsmflow.sims import head_features as hf
from qsmflow.sims.field import CHI_AIR_PPM
from qsmflow.sims.phantom import TISSUES, make_head_phantom
from qsmflow.sims.signal import _phase_offset, oblique_affine

__all__ = ["RealisticHead", "make_realistic_head", "PRESETS", "LABELS", "ANATOMIES"]

#: brain anatomies: the analytic phantom, the 2016 challenge brain's COSMOS map
ANATOMIES = ("phantom", "cosmos")

#: extra labels of the realistic head (the phantom's labels 1-16 are kept)
LABELS = {
    10: "CSF",
    13: "cortical bone",
    14: "air (sinus / ear)",
    15: "scalp / neck",
    17: "diploe (marrow)",
    18: "dura (hard head)",
}
#: (chi ppm rel. water, proton density, R2* at 3 T [1/s]) of the extracranial tissues
_EXTRA = {
    13: (-2.0, 0.05, 1000.0),
    17: (-1.0, 0.30, 150.0),
    15: (-0.02, 0.75, 30.0),
    14: (CHI_AIR_PPM, 0.0, 0.0),
}
_PARENCHYMA = (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 16)
#: the hard head's dura thickness and its bone between the air cavities and the dura (mm)
_DURA_MM = 1.0
_HARD_BONE_MM = 1.0

#: acquisition presets
PRESETS: dict[str, dict] = {
    "3t-axial": {
        "b0_tesla": 3.0,
        "te_s": (0.004, 0.009, 0.014, 0.019, 0.024, 0.029),
        "snr": 60.0,
        "angles_deg": (0.0, 0.0, 0.0),
        # residual shim of the hard head: RMS Hz at 80 mm of each order-1 / order-2 term
        "shim_hz": (30.0, 20.0),
    },
    "7t-oblique": {
        "b0_tesla": 7.0,
        "te_s": (0.003, 0.007, 0.011, 0.015, 0.019),
        "snr": 90.0,
        "angles_deg": (18.0, 10.0, 0.0),
        "shim_hz": (70.0, 45.0),
    },
}


@dataclass(frozen=True)
class RealisticHead:
    """A simulated multi-echo GRE acquisition of a realistic head and its ground truth.

    Attributes
    ----------
    magnitude, phase : (X, Y, Z, E) float32
        Magnitude (a.u., brain ~0.7-1 at TE=0) and wrapped phase (rad, ``[-pi, pi)``).
    chi : (X, Y, Z) float32, ppm relative to water (whole head: bone -2, air +9.4).
    chi_local : (X, Y, Z) float32, ppm: ``chi * brain_mask``, the inversion ground truth.
    brain_mask : (X, Y, Z) bool: intracranial space (parenchyma + ventricles + CSF shell).
    labels : (X, Y, Z) int16 (phantom labels, plus 17 diploe; 0 outside air, 14 air cavities).
    total_field, local_field, background_field : (X, Y, Z) float32, ppm of B0
        ``total = D (chi - chi_air)``, ``local = D (chi * brain_mask)``,
        ``background = total - local``; ``D`` the voxel-integrated dipole convolution.
    te_s : tuple of float (s); b0_tesla : float (T)
    b0_dir : (3,) float64 unit vector in array axes.
    affine : (4, 4) float64 voxel-to-world (oblique for the oblique preset).
    voxel_size : 3 floats (mm)
    noise_sigma : float, standard deviation of each of the real and imaginary noise channels.
    preset : str
    """

    magnitude: np.ndarray
    phase: np.ndarray
    chi: np.ndarray
    chi_local: np.ndarray
    brain_mask: np.ndarray
    labels: np.ndarray
    total_field: np.ndarray
    local_field: np.ndarray
    background_field: np.ndarray
    te_s: tuple
    b0_tesla: float
    b0_dir: np.ndarray
    affine: np.ndarray
    voxel_size: tuple
    noise_sigma: float
    preset: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.chi.shape)


# --------------------------------------------------------------------------------------------
def _base_brain(shape, h, brain_scale, seed):
    """Phantom labels/params with the atlas scaled to ``brain_scale`` physical mm per atlas mm.

    The phantom fills its field of view (atlas half-extent 120 mm on its longest axis); it is
    built on a cubic grid whose field of view gives the requested scale and cropped / padded
    centrally to ``shape``.
    """
    n_big = [int(np.ceil(2 * 120.0 * brain_scale / hi)) for hi in h]
    n_big = [max(n, 8) for n in n_big]
    h_base = tuple(240.0 * brain_scale / n for n in n_big)  # exact scale along every axis
    ph = make_head_phantom(tuple(n_big), voxel_size=h_base, seed=seed)

    def fit(a, fill):
        out = np.full(shape, fill, dtype=a.dtype)
        src, dst = [], []
        for nb, n in zip(a.shape, shape):
            if nb >= n:
                o = (nb - n) // 2
                src.append(slice(o, o + n))
                dst.append(slice(0, n))
            else:
                o = (n - nb) // 2
                src.append(slice(0, nb))
                dst.append(slice(o, o + nb))
        out[tuple(dst)] = a[tuple(src)]
        return out

    # resample the base (isotropic in atlas mm) onto the requested voxel size: nearest for
    # labels, linear for parameter maps; the base voxel is h_base, the target voxel h
    zoom = [hb / ht for hb, ht in zip(h_base, h)]
    lab = ndi.zoom(ph.labels, zoom, order=0, grid_mode=True, mode="grid-constant")
    maps = {
        k: ndi.zoom(getattr(ph, k), zoom, order=1, grid_mode=True, mode="nearest")
        for k in ("chi", "m0", "r2star")
    }
    lab = fit(lab, 0)
    maps = {k: fit(v.astype(np.float32), 0.0) for k, v in maps.items()}
    return lab, maps


def _edt_outside(region, h):
    """Distance (mm) of every voxel to ``region`` (0 inside)."""
    return ndi.distance_transform_edt(~region, sampling=h).astype(np.float32)


def _ball(radius_mm, h):
    r = [int(np.floor(radius_mm / v + 1e-6)) for v in h]
    g = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((gi * v) ** 2 for gi, v in zip(g, h)) <= radius_mm**2 + 1e-6


def _physical_grid(shape, h):
    axes = []
    for i, n in enumerate(shape):
        a = (np.arange(n) - (n - 1) / 2.0) * h[i]
        s = [1, 1, 1]
        s[i] = n
        axes.append(a.reshape(s).astype(np.float32))
    return axes


def _pv_blur(x, mask, sigma_vox):
    """Normalised Gaussian blur of ``x`` within ``mask`` (partial volume inside a compartment)."""
    m = mask.astype(np.float32)
    num = ndi.gaussian_filter(x * m, sigma_vox, mode="nearest")
    den = ndi.gaussian_filter(m, sigma_vox, mode="nearest")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 1e-3, num / den, x)
    return np.where(mask, out, x).astype(np.float32)


def _psf(x):
    """Separable [1, 6, 1] / 8 blur along every axis: the leakage of a voxel's signal into its
    neighbours through the point-spread function (partial volume of the complex signal)."""
    k = np.array([0.125, 0.75, 0.125], dtype=np.float32)
    for ax in range(3):
        x = ndi.convolve1d(x, k, axis=ax, mode="nearest")
    return x


# --------------------------------------------------------------------------------------------
def make_realistic_head(
    preset: str = "3t-axial",
    *,
    shape: Sequence[int] = (160, 160, 160),
    voxel_size: Sequence[float] = (1.06, 1.06, 1.06),
    brain_scale: float | None = None,
    csf_mm: float = 3.0,
    skull_mm: float = 7.0,
    scalp_mm: float = 6.0,
    sinus_bone_mm: float = 1.5,
    snr: float | None = None,
    te_s: Sequence[float] | None = None,
    b0_tesla: float | None = None,
    angles_deg: Sequence[float] | None = None,
    texture_ppm: float = 0.01,
    phase_offset: bool = True,
    seed: int = 0,
    hard: bool = False,
    anatomy: str = "phantom",
    anatomy_dir: str | os.PathLike | None = None,
    shim_hz: Sequence[float] | None = None,
) -> RealisticHead:
    """Simulate a realistic multi-echo GRE head (see the module docstring for the anatomy).

    Parameters
    ----------
    preset : {"3t-axial", "7t-oblique"}
        Acquisition (field strength, echo times, SNR, slab tilt); the keyword arguments
        ``snr``, ``te_s``, ``b0_tesla`` and ``angles_deg`` override single items.
    shape : 3 ints, keyword-only
        Matrix (X, Y, Z), RAS array axes.  The head's physical size does not depend on it:
        below ~128 voxels of 1.06 mm the head is cropped (a 64^3 grid of 2.65 mm still holds
        it).
    voxel_size : 3 floats (mm), keyword-only
    brain_scale : float, keyword-only
        Physical mm per atlas mm of the brain anatomy (1: adult size); default 0.8 for the
        phantom, 1 for ``"cosmos"`` (128 x 154 x 130 mm: use a field of view of about 190 mm or
        more, e.g. 128^3 x 1.6 mm, or the scalp is cropped).
    csf_mm, skull_mm, scalp_mm : float (mm), keyword-only
        Thickness of the CSF shell, the skull and the scalp.
    sinus_bone_mm : float (mm), keyword-only
        Bone between the frontal sinus / middle ear and the CSF shell.
    snr : float, keyword-only
        Mean brain magnitude of the first echo / noise SD per channel (in vivo 3 T 1 mm
        multi-echo GRE: ~40-80).
    te_s : sequence of float (s), keyword-only
    b0_tesla : float (T), keyword-only
        R2* of every tissue is scaled by ``b0_tesla / 3`` (R2* grows about linearly with B0;
        Yablonskiy & Haacke, MRM 1994; Peters et al., MRI 2007).
    angles_deg : 3 floats, keyword-only
        Slab rotation about world x, y, z (:func:`qsmflow.sims.signal.oblique_affine`); the
        B0 direction in array axes follows from the affine.
    texture_ppm : float, keyword-only
        Standard deviation of the fine chi texture in the parenchyma (ppm).
    phase_offset : bool, keyword-only
        Add a smooth transceive phase offset (a few rad across the field of view).
    seed : int, keyword-only
        Seed of texture, phase offset and noise.
    hard : bool, keyword-only
        The harder head (module docstring): varying CSF, dura, surface veins, irregular air
        cavities close to the cortex, shim field.  Off: the head is the same as before.
    anatomy : {"phantom", "cosmos"}, keyword-only
        Brain anatomy: the analytic phantom, or the 2016 challenge brain's COSMOS map (its
        veins, labelled 11, keep their own chi; no extra texture is added to it).
    anatomy_dir : path, keyword-only
        For ``"cosmos"``: the folder with ``chi_cosmos.nii.gz`` and ``msk.nii.gz``
        (FileNotFoundError when absent).
    shim_hz : 2 floats, keyword-only
        Residual shim amplitudes (Hz at 80 mm, order 1 and order 2 terms; default: the preset's
        when ``hard``, none otherwise); ``extras["shim_field"]`` holds the field (ppm), which is
        part of ``total_field`` and ``background_field``.

    Returns
    -------
    RealisticHead
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    acq = dict(PRESETS[preset])
    for k, v in (("snr", snr), ("te_s", te_s), ("b0_tesla", b0_tesla), ("angles_deg", angles_deg)):
        if v is not None:
            acq[k] = v
    shape = tuple(int(n) for n in shape)
    h = tuple(float(v) for v in voxel_size)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be 3 ints >= 16, got {shape!r}")
    if len(h) != 3 or min(h) <= 0:
        raise ValueError(f"voxel_size must be 3 positive floats, got {voxel_size!r}")
    te = np.asarray(acq["te_s"], dtype=np.float64).ravel()
    if te.size < 1 or np.any(te <= 0):
        raise ValueError("te_s must be positive seconds")
    b0 = float(acq["b0_tesla"])
    rng = np.random.default_rng(seed + 1000)
    if anatomy not in ANATOMIES:
        raise ValueError(f"unknown anatomy {anatomy!r}; choose from {', '.join(ANATOMIES)}")
    rng_hard = np.random.default_rng(seed + 2000)

    if anatomy == "cosmos":
        if anatomy_dir is None:
            raise FileNotFoundError("anatomy 'cosmos' needs anatomy_dir (the qsm2016 folder)")
        scale = 1.0 if brain_scale is None else float(brain_scale)
        lab, maps = hf.cosmos_brain(shape, h, scale, anatomy_dir)
    else:
        lab, maps = _base_brain(shape, h, 0.8 if brain_scale is None else brain_scale, seed)
    # parenchyma + ventricles (the ventricles are enclosed, fill them back)
    paren = np.isin(lab, _PARENCHYMA)
    paren = ndi.binary_fill_holes(paren | ((lab == 10) & ndi.binary_dilation(paren, iterations=2)))
    paren = ndi.binary_fill_holes(paren)
    d = _edt_outside(paren, h)
    X, Y, Z = _physical_grid(shape, h)

    labels = np.zeros(shape, dtype=np.int16)
    # the hard head: CSF of varying thickness and a dura between it and the skull
    csf = hf.csf_thickness(shape, h, csf_mm, rng_hard) if hard else csf_mm
    inner = csf + (_DURA_MM if hard else 0.0)  # the inner skull table
    intracranial = d <= csf
    labels[paren] = lab[paren]
    labels[paren & ~np.isin(lab, _PARENCHYMA + (10,))] = 8  # stray voxels: white matter
    labels[intracranial & ~paren] = 10
    labels[(d > csf) & (d <= inner)] = 18
    t_in = inner + 0.25 * skull_mm
    t_out = inner + 0.75 * skull_mm
    skull = (d > inner) & (d <= inner + skull_mm)
    labels[skull] = 13
    labels[(d > t_in) & (d <= t_out)] = 17
    head_r = inner + skull_mm + scalp_mm
    labels[(d > inner + skull_mm) & (d <= head_r)] = 15

    # neck: an elliptic cylinder under the brain, down to the bottom of the field of view
    pz = np.nonzero(paren.any(axis=(0, 1)))[0]
    z_low = float(Z.ravel()[pz[0]]) if pz.size else 0.0
    cx = float((X * paren).sum() / max(paren.sum(), 1))
    cy = float((Y * paren).sum() / max(paren.sum(), 1))
    cz = float((Z * paren).sum() / max(paren.sum(), 1))
    neck = (((X - cx) / 48.0) ** 2 + ((Y - cy + 10.0) / 55.0) ** 2 <= 1.0) & (Z < z_low + 25.0)
    labels[neck & (labels == 0)] = 15

    # air cavities, positioned from the brain's extent (mm)
    px = np.nonzero(paren.any(axis=(1, 2)))[0]
    py = np.nonzero(paren.any(axis=(0, 2)))[0]
    x_lo, x_hi = float(X.ravel()[px[0]]), float(X.ravel()[px[-1]])
    y_hi = float(Y.ravel()[py[-1]])
    min_air = csf_mm + sinus_bone_mm
    air = np.zeros(shape, dtype=bool)

    def ellipsoid(c, s):
        return (
            ((X - c[0]) / s[0]) ** 2 + ((Y - c[1]) / s[1]) ** 2 + ((Z - c[2]) / s[2]) ** 2
        ) <= 1.0

    # frontal sinus: in front of the lower frontal lobe, 1.5 mm of bone from the CSF
    air |= ellipsoid((cx, y_hi + min_air + 5.0, z_low + 22.0), (14.0, 7.0, 12.0))
    # sphenoid sinus: under the middle of the brain
    air |= ellipsoid((cx, cy + 18.0, z_low - 6.0), (11.0, 11.0, 9.0))
    sinus = air & (d > min_air)
    # ear: lateral brain surface on the line through the lower temporal lobe
    y_ear, z_ear = cy - 8.0, z_low + 16.0
    iy = int(np.argmin(np.abs(Y.ravel() - y_ear)))
    iz = int(np.argmin(np.abs(Z.ravel() - z_ear)))
    row = np.nonzero(paren[:, iy, iz])[0]
    if row.size:
        x_lo, x_hi = float(X.ravel()[row[0]]), float(X.ravel()[row[-1]])
    for s, x_edge in ((-1.0, x_lo), (1.0, x_hi)):
        # middle ear / mastoid cells beside the lower temporal lobe
        x_me = x_edge + s * (min_air + 5.0)
        air |= ellipsoid((x_me, y_ear, z_ear), (5.0, 8.0, 6.0))
        # external ear canal: a 7 mm wide tube from the middle ear to the outside air
        air |= ((Y - y_ear) ** 2 + (Z - z_ear) ** 2 <= 3.5**2) & (s * (X - x_me) > 0.0)
    air &= d > min_air
    if hard:  # irregular cavities against the lower frontal and temporal brain instead
        air, sinus = hf.hard_cavities(
            intracranial,
            h,
            (X, Y, Z),
            (cx, cy, cz),
            bone_mm=_HARD_BONE_MM,
            dura_mm=_DURA_MM,
            rng=rng_hard,
        )
    # the sinuses sit in bone (2 mm walls) under the scalp; the ear canals open to the outside
    wall = ndi.binary_dilation(sinus, structure=_ball(2.0, h)) & ~intracranial
    cover = ndi.binary_dilation(wall, structure=_ball(scalp_mm, h))
    labels[cover & (labels == 0)] = 15
    labels[wall & ~sinus & (labels != 17) & (labels != 18)] = 13
    labels[air & (labels != 0)] = 14
    if hard:  # the superior sagittal sinus (in the dura) and cortical veins (in the CSF)
        veins, vein_chi = hf.surface_veins(
            paren, intracranial, h, (X, Y, Z), (cx, cy, cz), dura_mm=_DURA_MM, rng=rng_hard
        )
        veins &= labels != 14
        labels[veins] = 11

    brain_mask = intracranial.copy()

    # --- parameter maps -----------------------------------------------------------------------
    chi = np.zeros(shape, dtype=np.float32)
    m0 = np.zeros(shape, dtype=np.float32)
    r2s = np.zeros(shape, dtype=np.float32)
    chi[paren] = maps["chi"][paren]
    m0[paren] = maps["m0"][paren]
    r2s[paren] = maps["r2star"][paren]
    # relabelled stray voxels and the CSF shell take their label's values
    for lab_id in (8, 10):
        sel = (labels == lab_id) & ((lab != lab_id) | ~paren)
        _n, c, m, _r1, r, _t = TISSUES[lab_id]
        chi[sel], m0[sel], r2s[sel] = c, m, r
    for lab_id, (c, m, r) in _EXTRA.items():
        sel = labels == lab_id
        chi[sel], m0[sel], r2s[sel] = c, m, r
    outside = labels == 0
    chi[outside] = CHI_AIR_PPM
    # fine texture (2 mm correlation) in the parenchyma and the scalp
    tex = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), [2.0 / v for v in h])
    tex /= max(float(tex.std()), 1e-12)
    if anatomy == "phantom":  # the COSMOS map has its own texture
        chi[paren] += np.float32(texture_ppm) * tex[paren]
    if hard:
        chi[labels == 18], m0[labels == 18], r2s[labels == 18] = hf.DURA
        chi[veins], m0[veins], r2s[veins] = vein_chi[veins], hf.VEIN_M0, hf.VEIN_R2S
    m0[paren] *= 1.0 + 0.04 * tex[paren]
    m0[labels == 15] *= 1.0 + 0.15 * tex[labels == 15]
    # partial volume of chi within each compartment
    sig_pv = [0.5] * 3
    chi = _pv_blur(chi, brain_mask, sig_pv)
    extra = ~brain_mask & ~outside & (labels != 14)
    chi = _pv_blur(chi, extra, sig_pv)
    chi_local = np.where(brain_mask, chi, 0.0).astype(np.float32)

    # --- fields -------------------------------------------------------------------------------
    affine = oblique_affine(h, angles_deg=acq["angles_deg"], shape=shape)
    b0_dir = b0_dir_from_affine(affine)
    op = DipoleOperator(
        shape, voxel_size=h, b0_dir=b0_dir, kind="integral", pad_factor=2.0, dtype=np.float32
    )
    total = op.forward(chi - np.float32(CHI_AIR_PPM)).astype(np.float32)
    local = op.forward(chi_local).astype(np.float32)
    background = (total - local).astype(np.float32)
    if shim_hz is None:
        shim_hz = acq.get("shim_hz", (0.0, 0.0)) if hard else (0.0, 0.0)
    shim = hf.shim_field(shape, h, (cx, cy, cz), shim_hz, b0, rng_hard)
    total += shim
    background += shim

    # --- signal -------------------------------------------------------------------------------
    r2s = r2s * np.float32(b0 / 3.0)
    gam_te = [ppm_to_phase(np.float32(1.0), te_s=float(t), b0_tesla=b0) for t in te]
    grads = np.gradient(total, *h)  # ppm / mm
    rng_sig = np.random.default_rng(seed)
    phi0 = (
        _phase_offset(shape, rng_sig, amplitude_rad=2.5)
        if phase_offset
        else np.zeros(shape, np.float32)
    )
    ref_m0 = float(m0[paren].mean())
    sigma = ref_m0 * float(np.exp(-float(np.median(r2s[paren])) * te[0])) / float(acq["snr"])
    mag = np.empty(shape + (te.size,), dtype=np.float32)
    pha = np.empty(shape + (te.size,), dtype=np.float32)
    for e, t in enumerate(te):
        # intravoxel dephasing across each voxel edge from the macroscopic field gradient
        att = np.ones(shape, dtype=np.float32)
        for g, hi in zip(grads, h):
            att *= np.abs(np.sinc(gam_te[e] / (2 * np.pi) * g * hi)).astype(np.float32)
        amp = m0 * np.exp(-r2s * np.float32(t)) * att
        ph_e = phi0 + gam_te[e] * total
        s = amp * np.exp(1j * ph_e).astype(np.complex64)
        s = _psf(s.real.astype(np.float32)) + 1j * _psf(s.imag.astype(np.float32))
        s = s + sigma * (rng_sig.standard_normal(shape) + 1j * rng_sig.standard_normal(shape))
        mag[..., e] = np.abs(s)
        p = wrap_to_pi(np.angle(s)).astype(np.float32)
        p[p >= np.float32(np.pi)] = -np.float32(np.pi)
        pha[..., e] = p

    return RealisticHead(
        magnitude=mag,
        phase=pha,
        chi=chi.astype(np.float32),
        chi_local=chi_local,
        brain_mask=brain_mask,
        labels=labels,
        total_field=total,
        local_field=local,
        background_field=background,
        te_s=tuple(float(t) for t in te),
        b0_tesla=b0,
        b0_dir=np.asarray(b0_dir, dtype=np.float64),
        affine=affine,
        voxel_size=h,
        noise_sigma=float(sigma),
        preset=preset,
        extras={
            "parenchyma": paren,
            "phase_offset": phi0,
            "shim_field": shim,
            "surface_veins": veins if hard else np.zeros(shape, bool),
            "vein_chi": vein_chi if hard else np.zeros(shape, np.float32),
        },
    )
