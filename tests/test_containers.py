"""Containers and QSM-CI packaging: outputs readable outside the container, QSM-CI contract."""

from __future__ import annotations

import os
import stat

import numpy as np


def test_atomic_outputs_follow_the_umask(tmp_path):
    """Files written atomically get 0o666 less the umask (not mkstemp's 0o600), so a
    container's outputs are readable by the host user."""
    import nibabel as nib

    from qsmflow.io import write_json_atomic, write_nifti_atomic

    ref = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    old = os.umask(0o022)
    try:
        write_nifti_atomic(np.ones((2, 2, 2)), ref, tmp_path / "a.nii.gz")
        write_json_atomic({"a": 1}, tmp_path / "a.json")
        os.umask(0o002)
        write_json_atomic({"a": 1}, tmp_path / "b.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.nii.gz").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o664
