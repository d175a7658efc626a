"""Shared test fixtures: small simulated heads with known susceptibility and fields.

``simulate_head(shape, voxel_size, te_s, b0_tesla, snr)`` returns (and caches per session) a
:class:`SimulatedHead` with the phantom, its fields (ppm) and a multi-echo signal;
``head_files`` writes the 24^3 head at 2 mm (TE 4/8/12 ms, 7 T) as NIfTI files once per session.
Tests should take these instead of building their own phantoms, unless they test the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest


@dataclass
class SimulatedHead:
    phantom: object  # qsmflow.sims.phantom.HeadPhantom
    fields: dict  # "total", "local", "chi_local", ... (ppm)
    magnitude: np.ndarray  # (X, Y, Z, E) a.u.
    phase: np.ndarray  # (X, Y, Z, E) rad, wrapped
    te_s: tuple
    b0_tesla: float
    voxel_size: tuple

    @property
    def mask(self) -> np.ndarray:
        return self.phantom.brain_mask

    @property
    def affine(self) -> np.ndarray:
        return np.diag([*self.voxel_size, 1.0])


_CACHE: dict = {}


def _simulate(
    shape=(24, 24, 24),
    voxel_size=(2.0, 2.0, 2.0),
    te_s=(0.004, 0.008, 0.012),
    b0_tesla=7.0,
    snr=200.0,
) -> SimulatedHead:
    key = (tuple(shape), tuple(voxel_size), tuple(te_s), float(b0_tesla), float(snr))
    if key not in _CACHE:
        from qsmflow.sims.field import simulate_fields
        from qsmflow.sims.phantom import make_head_phantom
        from qsmflow.sims.signal import simulate_megre

        ph = make_head_phantom(shape=tuple(shape), voxel_size=tuple(voxel_size))
        f = simulate_fields(ph)
        mag, phase = simulate_megre(
            ph, total_field_ppm=f["total"], te_s=tuple(te_s), b0_tesla=b0_tesla, snr=snr
        )
        _CACHE[key] = SimulatedHead(
            ph, f, mag, phase, tuple(te_s), float(b0_tesla), tuple(float(v) for v in voxel_size)
        )
    return _CACHE[key]


@pytest.fixture(scope="session")
def simulate_head():
    """Factory: ``simulate_head(shape=..., voxel_size=..., te_s=..., b0_tesla=..., snr=...)``."""
    return _simulate


@pytest.fixture(scope="session")
def head_files(tmp_path_factory):
    """The default small head as NIfTI files: ``{"phase", "magnitude", "mask", "totalfield",
    "localfield", "chimap", "csf-mask", "noise": path}`` plus ``"head"`` (the SimulatedHead)."""
    head = _simulate()
    d = tmp_path_factory.mktemp("head")

    def save(name, arr, dtype=np.float32):
        p = d / name
        nib.save(nib.Nifti1Image(np.asarray(arr, dtype=dtype), head.affine), p)
        return str(p)

    f = head.fields
    return {
        "phase": save("phase.nii.gz", head.phase),
        "magnitude": save("mag.nii.gz", head.magnitude),
        "mask": save("mask.nii.gz", head.mask, np.uint8),
        "totalfield": save("total.nii.gz", f["total"]),
        "localfield": save("local.nii.gz", f["local"]),
        "chimap": save("chi.nii.gz", f["chi_local"]),
        "csf-mask": save("csf.nii.gz", head.mask, np.uint8),
        "noise": save("noise.nii.gz", np.full(head.mask.shape, 0.01)),
        "head": head,
    }
