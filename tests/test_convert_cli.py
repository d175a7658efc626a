"""qsmflow-convert command line: bad input, dry run, Nipype interface/workflow."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")
pytest.importorskip("dcm2niix")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dicom_synth import write_series  # noqa: E402

from qsmflow.cli.convert import main  # noqa: E402
from qsmflow.sims.signal import oblique_affine  # noqa: E402

SHAPE = (16, 16, 6)
TE = (0.004, 0.008)


def _vols(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(1, 100, SHAPE + (2,)), rng.uniform(-np.pi, np.pi, SHAPE + (2,)))


def _megre(dcm: Path, *, affine=None, te=TE, uid="1.2.3.4"):
    mag, ph = _vols()
    affine = oblique_affine((1.0, 1.0, 2.0), shape=SHAPE) if affine is None else affine
    write_series(
        dcm / "mag",
        mag,
        affine,
        te_s=te,
        part="mag",
        series_number=5,
        description="gre_qsm",
        study_uid=uid,
    )
    write_series(
        dcm / "pha",
        ph,
        affine,
        te_s=te,
        part="phase",
        series_number=6,
        description="gre_qsm",
        study_uid=uid,
    )


def _run_bad(tmp_path, capsys, must_name):
    bids = tmp_path / "bids"
    rc = main([str(tmp_path / "dicom"), str(bids)])
    err = capsys.readouterr().err
    assert rc != 0
    assert "nothing was written" in err
    for name in must_name:
        assert name in err, err
    assert not bids.exists()
    assert not list(tmp_path.glob(".bids.qsmflow-staging-*"))
    return err


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "dicom").mkdir()
    _run_bad(tmp_path, capsys, ["empty", str(tmp_path / "dicom")])


def test_only_non_dicom_files(tmp_path, capsys):
    (tmp_path / "dicom" / "a").mkdir(parents=True)
    (tmp_path / "dicom" / "a" / "notes.txt").write_text("hello")
    _run_bad(tmp_path, capsys, ["no DICOM images", str(tmp_path / "dicom")])


def test_no_gre_series(tmp_path, capsys):
    mag, _ = _vols()
    write_series(
        tmp_path / "dicom",
        mag[..., :1],
        np.diag([1.0, 1.0, 2.0, 1.0]),
        te_s=(0.09,),
        part="mag",
        series_number=9,
        description="t2_tse",
        scanning="SE",
        sequence_name="*tse2d1",
    )
    _run_bad(tmp_path, capsys, ["no gradient-echo (GRE) series", "series 9 't2_tse'"])


def test_truncated_file(tmp_path, capsys):
    _megre(tmp_path / "dicom")
    victim = sorted((tmp_path / "dicom" / "pha").glob("*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[:-200])
    _run_bad(tmp_path, capsys, ["truncated", str(victim), "series 6 'gre_qsm'"])


def test_echoes_with_different_geometry(tmp_path, capsys):
    _megre(tmp_path / "dicom")
    mag, _ = _vols(1)
    # a third echo with a shifted slab, in the magnitude series
    import pydicom

    a = oblique_affine((1.0, 1.0, 2.0), shape=SHAPE)
    a[2, 3] += 5.0
    extra = write_series(
        tmp_path / "dicom" / "x",
        mag[..., :1],
        a,
        te_s=(0.012,),
        part="mag",
        series_number=5,
        description="gre_qsm",
        study_uid="1.2.3.4",
    )
    uid = pydicom.dcmread(next((tmp_path / "dicom" / "mag").glob("*.dcm"))).SeriesInstanceUID
    for p in extra:
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = uid
        ds.save_as(p)
    _run_bad(tmp_path, capsys, ["series 5 'gre_qsm'", "different geometry"])


def test_missing_echo_time(tmp_path, capsys):
    _megre(tmp_path / "dicom")
    import pydicom

    victim = sorted((tmp_path / "dicom" / "mag").glob("*.dcm"))[0]
    ds = pydicom.dcmread(victim)
    del ds.EchoTime
    ds.save_as(victim)
    _run_bad(tmp_path, capsys, ["series 5 'gre_qsm'", "EchoTime", str(victim)])


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    _megre(tmp_path / "dicom")
    rc = main(
        [
            str(tmp_path / "dicom"),
            str(tmp_path / "bids"),
            "--dry-run",
            "--participant-label",
            "07",
            "--session-label",
            "pre",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "series 6 'gre_qsm'" in out
    assert "sub-07/ses-pre/anat/sub-07_ses-pre_echo-2_part-phase_MEGRE.nii.gz" in out
    assert not (tmp_path / "bids").exists()


def test_labels_checked_as_qsmflow_checks_them(tmp_path, capsys):
    """'sub-07' is the label 07 (as for qsmflow); the library refuses what the CLI refuses."""
    from qsmflow.conversion import ConversionError, plan_conversion

    _megre(tmp_path / "dicom")
    argv = [str(tmp_path / "dicom"), str(tmp_path / "bids"), "--dry-run"]
    assert main([*argv, "--participant-label", "sub-07", "--session-label", "ses-1"]) == 0
    assert "sub-07/ses-1/anat/sub-07_ses-1_echo-1_part-mag_MEGRE.nii.gz" in capsys.readouterr().out
    for bad in ("!!", "", "0 1"):
        with pytest.raises(ConversionError, match="invalid label"):
            plan_conversion(tmp_path / "dicom", participant_label=bad)
    assert not (tmp_path / "bids").exists()


def _gzip_files(files):
    import gzip

    for f in files:
        Path(f"{f}.gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()


def test_gzip_compressed_dicom_converted_like_plain(tmp_path, capsys):
    """*.dcm.gz (all phase files, half the magnitude files): decompressed into a temporary
    folder, never next to the input; the same images as from the plain files."""
    import nibabel as nib

    _megre(tmp_path / "plain")
    import shutil

    shutil.copytree(tmp_path / "plain", tmp_path / "gz")
    _gzip_files(sorted((tmp_path / "gz" / "pha").glob("*.dcm")))
    _gzip_files(sorted((tmp_path / "gz" / "mag").glob("*.dcm"))[::2])
    listing = sorted(p.relative_to(tmp_path) for p in (tmp_path / "gz").rglob("*"))
    for name in ("plain", "gz"):
        assert (
            main([str(tmp_path / name), str(tmp_path / f"bids_{name}"), "--participant-label", "1"])
            == 0
        )
    out = capsys.readouterr().out
    assert "gzip-compressed DICOM file(s) read" in out
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "gz").rglob("*")) == listing
    plain = sorted((tmp_path / "bids_plain").rglob("*.nii.gz"))
    assert len(plain) == 4
    for p in plain:
        q = tmp_path / "bids_gz" / p.relative_to(tmp_path / "bids_plain")
        np.testing.assert_array_equal(nib.load(q).get_fdata(), nib.load(p).get_fdata())


def test_heuristic_and_rerun(tmp_path, capsys):
    _megre(tmp_path / "dicom")
    heur = tmp_path / "map.json"
    heur.write_text(
        '{"participants": {"phantom": "A1"}, "sessions": {"20240102": ""}, '
        '"series": {"gre_qsm": {"acq": "qsm"}}}'
    )
    args = [str(tmp_path / "dicom"), str(tmp_path / "bids"), "--heuristic", str(heur)]
    assert main(args) == 0
    assert (tmp_path / "bids/sub-A1/anat/sub-A1_acq-qsm_echo-1_part-mag_MEGRE.nii.gz").exists()
    capsys.readouterr()
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_nipype_workflow(tmp_path):
    pytest.importorskip("nipype")
    from qsmflow.workflows.conversion import init_dicom_to_bids_wf

    _megre(tmp_path / "dicom")
    wf = init_dicom_to_bids_wf(
        dicom_dir=tmp_path / "dicom", bids_dir=tmp_path / "bids", participant_label="01"
    )
    wf.base_dir = str(tmp_path / "work")
    graph = wf.run()
    node = next(n for n in graph.nodes() if n.name == "convert")
    res = node.result.outputs
    assert len(res.megre_magnitude) == 2 and len(res.megre_phase) == 2
    assert res.echo_times == pytest.approx(list(TE))
    assert all(Path(p).exists() for p in res.megre_phase)
