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

#: long integration tests (whole pipelines, network fits, real data, clusters): each took 9 s
#: to 13 min in a full run on 2 busy cores.  Marked ``slow`` here, in one place, so that
#: ``python -m pytest -q -m "not slow"`` is a quick run (CI runs it before torch is installed);
#: the full suite runs them all.
SLOW_MODULES = (
    "test_demo.py",
    "test_dicom_pipeline_e2e.py",
    "test_faults.py",
    "test_philips_real.py",
    "test_pipeline_e2e.py",
    "test_real_brain_2016.py",
    "test_slurm.py",
)
SLOW_TESTS = {
    "test_background.py": (
        "test_pdf_uses_oblique_b0",
        "test_pdf_noise_weights_discount_corrupted_voxels",
    ),
    "test_atlas.py": (
        "test_known_truth_recovered_per_structure",
        "test_wrong_fit_is_detected_and_not_tabled",
        "test_pipeline_reports_a_failed_registration_and_writes_no_table",
    ),
    "test_bad_inputs.py": (
        "test_subject_failing_the_input_checks_is_skipped_the_others_run",
        "test_eight_subjects_one_broken_seven_complete",
    ),
    "test_cli_stage.py": ("test_dip_method_writes_std_loss_curve_and_seeds",),
    "test_containers.py": ("test_qsmci_modip_dipole_stage", "test_qsmci_fast_end_to_end"),
    "test_dip.py": (
        "test_modip_cpu_default_finishes_64cubed_within_its_budget",
        "test_modip_bf16_autocast_costs_no_accuracy",
        "test_stopping_rule_plateau_and_discrepancy",
        "test_modip_fits_and_is_accurate",
        "test_modip_warm_start_from_tv_and_medi",
        "test_modip_respects_b0_direction",
        "test_dip_loss_and_residual_decrease",
        "test_modip_coarse_network_with_tv_start_beats_tv",
        "test_modip_kspace_and_coarse_to_fine_modes",
        "test_modip_cpu_defaults_and_time_budget",
        "test_ensemble_std",
        "test_modip_checkpointing_gives_the_same_fit",
        "test_inr_whole_and_patches",
    ),
    "test_inversion_classical.py": (
        "test_accuracy_head_phantom",
        "test_anisotropic_voxels",
        "test_tv_noise_weighting_helps",
    ),
    "test_realistic_head_hard.py": ("test_default_chain_on_the_hard_head_with_mask_errors",),
    "test_regularization.py": (
        "test_tv_default_within_factor_3_of_best_through_the_chain",
        "test_tv_lcurve_knee_within_factor_3_of_best_with_the_true_local_field",
    ),
    "test_report.py": (
        "test_phase_only_run_is_valid_and_reported",
        "test_qsmflow_derivatives_pass_the_validator",
        "test_failed_subject_gets_a_page_with_the_reason",
    ),
}


@pytest.hookimpl(tryfirst=True)  # before -m/-k deselect
def pytest_collection_modifyitems(config, items):
    """Mark the tests of :data:`SLOW_MODULES` and :data:`SLOW_TESTS` ``slow``
    (``tests/test_markers.py`` checks that every listed name is a test)."""
    for item in items:
        module = item.path.name
        name = getattr(item, "originalname", item.name)
        if module in SLOW_MODULES or name in SLOW_TESTS.get(module, ()):
            item.add_marker(pytest.mark.slow)


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
