"""Phase-only data (no magnitude) on the realistic head: the phase-quality mask keeps to the
brain (skull, marrow and scalp lose phase coherence at late echoes) and the chain gives a chi
map close to the truth.  Before the late-echo term the mask took the whole head (48874 of
87771 voxels outside the brain) and the chi NRMSE was 393%."""

from __future__ import annotations

import numpy as np
import pytest

from qsmflow.algorithms.masking import mask_phase_quality
from qsmflow.runner import execute
from qsmflow.sims.realistic import make_realistic_head


@pytest.fixture(scope="module")
def head():
    return make_realistic_head("3t-axial", shape=(64, 64, 64), voxel_size=(2.65,) * 3)


def test_phase_only_mask_and_chi_on_the_realistic_head(head):
    qsm_eval = pytest.importorskip("qsm_ci.qsm_eval")
    h = head
    mask = mask_phase_quality(h.phase, te_s=h.te_s, voxel_size=h.voxel_size)
    outside = np.sum(mask & ~h.brain_mask) / mask.sum()
    recall = np.sum(mask & h.brain_mask) / h.brain_mask.sum()
    assert outside < 0.08  # achieved 0.043 (0.557 without the late-echo term)
    assert recall > 0.9  # achieved 0.928 (BET on the magnitude: 0.937)
    acq = {"voxel_size": h.voxel_size, "b0_dir": h.b0_dir, "te_s": h.te_s, "b0_tesla": h.b0_tesla}
    field = execute("combine", "wls", dict(acq, phase=h.phase)).data
    res = execute("bfr", "lbv", dict(acq, field=field, mask=mask))
    local, mask = res.data, res.extras.get("mask", mask)
    chi = execute("invert", "rts", dict(acq, field=local, mask=mask)).data
    nrmse = float(qsm_eval.nrmse_challenge(chi, h.chi_local, mask & h.brain_mask)[0])
    assert (
        nrmse < 100.0
    )  # achieved 82.2 % (83.4 % with RTS's former 4 LSMR iterations; 393 % before)
