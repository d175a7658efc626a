"""Ground-truth field maps of a :class:`~qsmflow.sims.phantom.HeadPhantom`.

The field perturbation is computed with the zero-padded k-space dipole model
(:func:`qsmflow.algorithms.dipole.forward_field`; Salomir et al., Concepts Magn Reson B 2003;
Marques & Bowtell, Concepts Magn Reson B 2005).

The phantom's susceptibility is given relative to water, and the air around the head has
chi = +9.4 ppm.  A zero-padded convolution of that map would treat the *edge of the field of
view* as an air/vacuum interface and create a spurious box-shaped background field.  The total
field is therefore computed from ``chi - chi_outside`` (susceptibility relative to the air that
surrounds the head, which extends to infinity): the two differ by a uniform medium, whose field
is a constant, unmeasurable offset (the ``D(0) = 0`` convention).

* ``local``: field of ``chi * brain_mask`` (the sources inside the brain, relative to water):
  what background-field removal estimates and what dipole inversion inverts.
* ``background``: ``total - local``, i.e. the field of everything outside the brain mask
  (skull, scalp, air cavities, surrounding air) with the brain replaced by water.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qsmflow.algorithms.dipole import DipoleOperator

#: Susceptibility of the air surrounding the head, relative to water (ppm; Schenck 1996).
CHI_AIR_PPM = 9.4


def simulate_fields(
    ph,
    *,
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    pad_factor: float = 2.0,
    kind: str = "integral",
) -> dict[str, np.ndarray]:
    """Total, local and background field (ppm of B0) of a head phantom.

    Parameters
    ----------
    ph : HeadPhantom
        From :func:`qsmflow.sims.phantom.make_head_phantom` (uses ``chi``, ``labels``,
        ``brain_mask``, ``voxel_size``).
    b0_dir : unit 3-vector in array axes, keyword-only
        For an oblique acquisition use ``dipole.b0_dir_from_affine(affine)``.
    pad_factor : float, keyword-only
        Zero padding of the dipole convolution (>= 1).
    kind : {"integral", "continuous", "discrete"}, keyword-only
        Dipole kernel (see :mod:`qsmflow.algorithms.dipole`).  The default, the field of
        uniformly magnetised voxels, is the physically right model for a voxelised phantom: the
        sampled continuous kernel rings (Gibbs) around the large air and bone steps, so its
        "background" field is not harmonic inside the brain and no background removal method
        could remove it.

    Returns
    -------
    dict of (X, Y, Z) float32 arrays
        ``"total"``, ``"local"``, ``"background"`` (ppm, ``total = local + background``) and
        ``"chi_local"`` (ppm, ``chi * brain_mask``, the inversion ground truth).
    """
    chi = np.asarray(ph.chi, dtype=np.float32)
    mask = np.asarray(ph.brain_mask, dtype=bool)
    if chi.ndim != 3 or mask.shape != chi.shape:
        raise ValueError("phantom chi and brain_mask must be 3D arrays of the same shape")
    op = DipoleOperator(
        chi.shape,
        voxel_size=ph.voxel_size,
        b0_dir=b0_dir,
        kind=kind,
        pad_factor=pad_factor,
        dtype=np.float32,
    )
    chi_local = np.where(mask, chi, np.float32(0.0)).astype(np.float32)
    # reference to the air at infinity so that the zero padding continues the outside air
    total = op.forward(chi - np.float32(CHI_AIR_PPM))
    local = op.forward(chi_local)
    background = total - local
    return {
        "total": total.astype(np.float32),
        "local": local.astype(np.float32),
        "background": background.astype(np.float32),
        "chi_local": chi_local,
    }
