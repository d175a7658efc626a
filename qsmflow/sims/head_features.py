"""Parts of the *hard* realistic head and its second anatomy (issue 20).

Used by :func:`qsmflow.sims.realistic.make_realistic_head` (``hard=True``,
``anatomy="cosmos"``), its one entry point; nothing here builds a head on its own.

* :func:`cosmos_brain` - the 2016 QSM challenge brain's COSMOS map (Langkammer et al., MRM
  2018; research use only, read at run time from a folder the caller names, never shipped) as
  the tissue chi of the simulated head: a real anatomy (cortex, deep grey nuclei, veins, real
  microstructure) instead of the analytic phantom's.
* :func:`csf_thickness` - a CSF layer whose thickness varies smoothly over the brain surface
  (1.2-5 mm; the subarachnoid space is thin over the convexity and under the frontal and
  temporal lobes, wide over sulci and cisterns).
* :func:`hard_cavities` - irregular (rough-walled, lobulated) air cavities placed against the
  brain's lower frontal and temporal surfaces: frontal sinus, ethmoid cells under the
  orbitofrontal cortex, sphenoid sinus, mastoid / middle-ear cells beside the temporal lobes
  and the ear canals, separated from the dura by only ``bone_mm`` of bone.
* :func:`surface_veins` - the superior sagittal sinus in the dura along the midline (straddling
  the intracranial boundary, so a brain mask cuts through it, as real masks do) and cortical
  veins in the CSF over the convexity, chi +0.35..0.45 ppm (deoxygenated blood:
  chi = Hct * 3.39 ppm * (1 - Y), Hct 0.4, Y 0.6-0.75; Spees et al., MRM 2001).
* :func:`shim_field` - the residual shim field: real solid harmonics of order 1 and 2
  (harmonic everywhere: Laplacian 0), amplitudes given in Hz at 80 mm from the head centre.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

#: gyromagnetic ratio / 2 pi (MHz/T = Hz/T/1e6 = Hz per ppm per T)
GAMMA_BAR_MHZ = 42.577478518
#: reference radius (mm) of the shim amplitudes
SHIM_R0_MM = 80.0
#: dura mater: (chi ppm rel. water, proton density, R2* at 3 T [1/s]).  Dense collagen: short
#: T2* (dark in GRE) and weakly diamagnetic like other collagenous tissue; the value is an
#: assumption of this simulator (no published QSM value of the dura).
DURA = (-0.03, 0.35, 80.0)
#: venous blood: chi of the sinus and of the cortical veins (ppm), proton density, R2* at 3 T
SINUS_CHI = 0.45
CORTICAL_VEIN_CHI = (0.35, 0.45)
VEIN_M0, VEIN_R2S = 0.85, 50.0


def _smooth_noise(shape, h, sigma_mm, rng):
    n = ndi.gaussian_filter(
        rng.standard_normal(shape).astype(np.float32), [sigma_mm / v for v in h], mode="wrap"
    )
    return n / max(float(n.std()), 1e-12)


def _paste(a, shape, start, fill):
    """Place array ``a`` into a new array of ``shape`` at index ``start`` (cropping as needed)."""
    out = np.full(shape, fill, dtype=a.dtype)
    src, dst = [], []
    for s0, na, n in zip(start, a.shape, shape):
        lo, hi = max(s0, 0), min(s0 + na, n)
        if hi <= lo:
            return out
        dst.append(slice(lo, hi))
        src.append(slice(lo - s0, hi - s0))
    out[tuple(dst)] = a[tuple(src)]
    return out


# --------------------------------------------------------------------------------------------
def cosmos_brain(shape, h, scale, anatomy_dir, *, z_shift_mm=10.0):
    """Labels and parameter maps of the 2016 challenge brain on the simulation grid.

    Parameters
    ----------
    shape : 3 ints; h : 3 floats (mm)
    scale : float
        Physical mm per mm of the COSMOS data (1: its real size, 128 x 154 x 130 mm: the head
        with its shells needs a field of view of about 190 mm, e.g. 192^3 x 1.06 mm or 128^3 x
        1.6 mm; a smaller one crops the scalp).
    anatomy_dir : path
        Folder with ``chi_cosmos.nii.gz`` and ``msk.nii.gz`` (``../shared/data/qsm2016``).
    z_shift_mm : float, keyword-only
        The brain's bounding box is centred this far above the grid centre (room for the skull
        base and the neck).

    Returns
    -------
    labels : (X, Y, Z) int16 - 8 (chi < -0.01 ppm: white-matter-like), 9 (grey), 11 (chi >
        0.3 ppm: veins), 0 outside the brain mask
    maps : dict of (X, Y, Z) float32 - ``chi`` (ppm, the COSMOS map, y axis flipped to RAS:
        the data run posterior -> anterior... anterior is +y here), ``m0`` (0.69 / 0.80 /
        0.85), ``r2star`` (15 + 150 * clip(chi, 0, 0.2) /s at 3 T, veins 50 /s; iron raises
        both, Langkammer et al., NeuroImage 2012)
    """
    import nibabel as nib

    d = Path(os.fspath(anatomy_dir))
    files = [d / "chi_cosmos.nii.gz", d / "msk.nii.gz"]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"anatomy 'cosmos' needs {f} (the 2016 QSM challenge data)")
    img = nib.load(str(files[0]))
    vs0 = [float(v) for v in img.header.get_zooms()[:3]]
    chi = np.asarray(img.dataobj, dtype=np.float32)
    msk = np.asarray(nib.load(str(files[1])).dataobj) > 0
    # the challenge data run anterior -> posterior along the second axis: flip it to RAS
    chi = chi[:, ::-1, :]
    msk = msk[:, ::-1, :]
    idx = np.argwhere(msk)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    chi, msk = np.where(msk, chi, 0.0)[box].astype(np.float32), msk[box]
    zoom = [v0 * float(scale) / v for v0, v in zip(vs0, h)]
    mf = ndi.zoom(msk.astype(np.float32), zoom, order=1, grid_mode=True, mode="grid-constant")
    cz = ndi.zoom(chi, zoom, order=1, grid_mode=True, mode="grid-constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        cz = np.where(mf > 1e-3, cz / mf, 0.0).astype(np.float32)
    m = ndi.binary_fill_holes(mf > 0.5)
    start = [
        (n - nb) // 2 + (int(round(z_shift_mm / h[2])) if ax == 2 else 0)
        for ax, (n, nb) in enumerate(zip(shape, m.shape))
    ]
    m = _paste(m, shape, start, False)
    cz = np.where(m, _paste(cz, shape, start, 0.0), 0.0).astype(np.float32)
    labels = np.zeros(shape, dtype=np.int16)
    labels[m] = 9
    labels[m & (cz < -0.01)] = 8
    labels[m & (cz > 0.3)] = 11
    m0 = np.zeros(shape, np.float32)
    m0[labels == 9], m0[labels == 8], m0[labels == 11] = 0.80, 0.69, VEIN_M0
    r2s = np.where(m, 15.0 + 150.0 * np.clip(cz, 0.0, 0.2), 0.0).astype(np.float32)
    r2s[labels == 11] = VEIN_R2S
    return labels, {"chi": cz, "m0": m0, "r2star": r2s}


# --------------------------------------------------------------------------------------------
def csf_thickness(shape, h, csf_mm, rng, *, lo=1.2, hi=5.0):
    """CSF thickness (mm) map: ``csf_mm`` modulated by 35 % smooth noise (8 mm), in [lo, hi]."""
    n = _smooth_noise(shape, h, 8.0, rng)
    return np.clip(csf_mm * (1.0 + 0.35 * n), lo, hi).astype(np.float32)


def _edge_point(region, h, centre_mm, u, grid_origin):
    """First point (mm) outside ``region`` walking from ``centre_mm`` along unit vector u."""
    h = np.asarray(h, float)
    for t in np.arange(0.0, 300.0, 0.5):
        p = centre_mm + t * u
        i = np.round((p - grid_origin) / h).astype(int)
        if np.any(i < 0) or np.any(i >= region.shape) or not region[tuple(i)]:
            return p
    return centre_mm


def hard_cavities(intracranial, h, grids, centre_mm, *, bone_mm, dura_mm, rng):
    """Irregular air cavities against the lower frontal and temporal brain surface.

    Each cavity is a lobulated ellipsoid (radius modulated by 30 % smooth noise of 3 mm
    correlation, plus a second, smaller lobe) placed along a direction from the brain's centre
    just outside the intracranial space; air closer than ``dura_mm + bone_mm`` to it is
    removed.  Returns ``(air, sinus)``: all air, and the air that is enclosed in bone (not the
    ear canals, which open to the outside).
    """
    X, Y, Z = grids
    shape = intracranial.shape
    origin = np.array([float(X.ravel()[0]), float(Y.ravel()[0]), float(Z.ravel()[0])])
    rough = _smooth_noise(shape, h, 3.0, rng)
    gap = float(dura_mm + bone_mm)
    air = np.zeros(shape, dtype=bool)
    canals = np.zeros(shape, dtype=bool)

    def lobe(c, s):
        rho = np.sqrt(
            ((X - c[0]) / s[0]) ** 2 + ((Y - c[1]) / s[1]) ** 2 + ((Z - c[2]) / s[2]) ** 2
        )
        return rho <= 1.0 + 0.3 * rough

    # direction from the brain centre (RAS), semi-axes (mm), second lobe offset (mm)
    specs = [
        ((0.0, 1.0, -0.35), (15.0, 8.0, 14.0), (0.0, -4.0, 10.0)),  # frontal sinus
        ((0.0, 0.75, -1.0), (11.0, 14.0, 8.0), (0.0, -10.0, -2.0)),  # ethmoid cells
        ((0.0, 0.15, -1.0), (13.0, 13.0, 10.0), (0.0, 8.0, -4.0)),  # sphenoid sinus
        ((1.0, -0.15, -0.75), (9.0, 12.0, 9.0), (4.0, -8.0, 3.0)),  # right mastoid / middle ear
        ((-1.0, -0.15, -0.75), (9.0, 12.0, 9.0), (-4.0, -8.0, 3.0)),  # left
    ]
    for u, s, off in specs:
        u = np.asarray(u, float)
        u /= np.linalg.norm(u)
        s = np.asarray(s, float)
        p = _edge_point(intracranial, h, np.asarray(centre_mm, float), u, origin)
        r_u = 1.0 / np.sqrt(np.sum((u / s) ** 2))  # the ellipsoid's radius along u
        c = p + u * (gap + 0.6 * r_u)  # part of the lobe is cut away by the gap below
        air |= lobe(c, s) | lobe(c + np.asarray(off), 0.6 * s)
        if u[0] != 0.0:  # ear canal: a 7 mm tube from the middle ear to the outside air
            tube = ((Y - c[1]) ** 2 + (Z - c[2]) ** 2 <= 3.5**2) & (np.sign(u[0]) * (X - c[0]) > 0)
            canals |= tube
    d_ic = ndi.distance_transform_edt(~intracranial, sampling=h)
    keep = d_ic > gap
    air = (air | canals) & keep
    return air, air & ~canals


# --------------------------------------------------------------------------------------------
def surface_veins(paren, intracranial, h, grids, centre_mm, *, dura_mm, rng):
    """The superior sagittal sinus and cortical veins at the brain surface.

    Centrelines follow the surface: along each direction from the brain centre the outermost
    parenchyma voxel is found and the centreline put ``offset`` mm beyond it (the sinus at the
    middle of the dura, the cortical veins in the CSF 1.5 mm above the cortex).  Returns
    ``(veins, chi)``: a bool map and the veins' chi (ppm; 0 elsewhere).
    """
    X, Y, Z = grids
    h = np.asarray(h, float)
    shape = paren.shape
    origin = np.array([float(X.ravel()[0]), float(Y.ravel()[0]), float(Z.ravel()[0])])
    c0 = np.asarray(centre_mm, float)
    t = np.arange(0.0, 200.0, 0.5)

    def outer(u, region):
        pts = c0[None, :] + t[:, None] * u[None, :]
        i = np.round((pts - origin) / h).astype(int)
        ok = np.all((i >= 0) & (i < np.asarray(shape)), axis=1)
        inside = np.zeros(t.size, bool)
        inside[ok] = region[tuple(i[ok].T)]
        return t[np.nonzero(inside)[0][-1]] if inside.any() else None

    def line(dirs, offset, region):
        out = np.zeros(shape, dtype=bool)
        for u in dirs:
            u = u / np.linalg.norm(u)
            r = outer(u, region)
            if r is None:
                continue
            i = np.round((c0 + u * (r + offset) - origin) / h).astype(int)
            if np.all(i >= 0) and np.all(i < np.asarray(shape)):
                out[tuple(i)] = True
        return out

    # superior sagittal sinus: midline arc from the frontal pole over the vertex to the
    # occipital pole, 3.5 mm radius, centred in the dura just outside the intracranial space
    # (so it straddles the brain mask's boundary); it displaces CSF, dura and inner table
    th = np.deg2rad(np.arange(-15.0, 200.0, 0.5))
    arc = np.stack([np.zeros_like(th), np.cos(th), np.sin(th)], axis=1)
    sss_line = line(arc, 0.5 * dura_mm, intracranial)
    sinus = ndi.distance_transform_edt(~sss_line, sampling=h) <= 3.5
    sinus &= ~paren
    # cortical veins in the CSF 1.5 mm above the cortex, from the lateral convexity up
    # towards the sinus, radius 1-1.8 mm
    cort_line = np.zeros(shape, dtype=bool)
    radius = np.zeros(shape, dtype=np.float32)
    value = np.zeros(shape, dtype=np.float32)
    for side in (-1.0, 1.0):
        for _ in range(6):
            y0 = rng.uniform(-0.8, 0.8)
            a = np.array([side, y0, rng.uniform(-0.1, 0.4)])
            b = np.array([0.15 * side, y0 + rng.uniform(-0.2, 0.2), 1.0])
            a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
            w = np.linspace(0.0, 1.0, 200)[:, None]
            one = line((1 - w) * a + w * b, 1.5, paren)
            cort_line |= one
            radius[one] = rng.uniform(1.0, 1.8)
            value[one] = rng.uniform(*CORTICAL_VEIN_CHI)
    dist, near = ndi.distance_transform_edt(~cort_line, sampling=h, return_indices=True)
    cortical = (dist <= radius[tuple(near)]) & intracranial & ~sinus
    chi = np.zeros(shape, dtype=np.float32)
    chi[cortical] = value[tuple(near)][cortical]
    chi[sinus] = SINUS_CHI
    return sinus | cortical, chi


# --------------------------------------------------------------------------------------------
def shim_field(shape, h, centre_mm, amplitude_hz: Sequence[float], b0_tesla, rng):
    """Residual shim field (ppm of B0): real solid harmonics of order 1 and 2.

    ``x, y, z`` and ``xy, yz, xz, x^2 - y^2, z^2 - (x^2 + y^2) / 2`` (coordinates in mm from
    ``centre_mm``, divided by ``SHIM_R0_MM`` per order), each with a coefficient drawn from
    N(0, 1) times ``amplitude_hz[order - 1]`` (Hz at 80 mm from the centre), converted to ppm
    at ``b0_tesla``.  Every term is harmonic (zero Laplacian).
    """
    a1, a2 = (float(v) for v in amplitude_hz)
    ax = []
    for i, n in enumerate(shape):
        a = ((np.arange(n) - (n - 1) / 2.0) * h[i] - centre_mm[i]) / SHIM_R0_MM
        s = [1, 1, 1]
        s[i] = n
        ax.append(a.reshape(s))
    x, y, z = ax
    first = [x, y, z]
    second = [x * y, y * z, x * z, x**2 - y**2, z**2 - 0.5 * (x**2 + y**2)]
    c1 = rng.standard_normal(3) * a1
    c2 = rng.standard_normal(5) * a2
    hz = sum(c * t for c, t in zip(c1, first)) + sum(c * t for c, t in zip(c2, second))
    hz = np.broadcast_to(hz, tuple(shape))
    return (hz / (GAMMA_BAR_MHZ * float(b0_tesla))).astype(np.float32)
