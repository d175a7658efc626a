"""QC report and BIDS validity: the real BIDS validator on simulated raw data, its ground truth
and qsmflow's derivatives; the report rendered by headless Chromium; the numbers in it."""

import base64
import io
import json
import os
import re
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from qsmflow.algorithms.metrics import data_consistency_residual, data_consistency_residual_map
from qsmflow.algorithms.reference import reference_offset
from qsmflow.cli.run import main
from qsmflow.reports.regions import regional_table
from qsmflow.sims.bids import DERIV_NAME, truth_paths, write_bids_dataset

SUBJECTS = ("01", "02")


def _validator_errors(root) -> list:
    """Errors the BIDS validator (bids-validator-deno, the `test` extra) reports on ``root``."""
    exe = shutil.which("bids-validator-deno")
    assert exe, "bids-validator-deno not installed (pip install '.[test]')"
    proc = subprocess.run(
        [exe, str(root), "--format", "json"], capture_output=True, text=True, timeout=300
    )
    issues = json.loads(proc.stdout)["issues"]["issues"]
    return [
        (i["code"], i.get("location"), (i.get("issueMessage") or "")[:120])
        for i in issues
        if i["severity"] == "error"
    ]


@pytest.fixture(scope="module")
def run_outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    bids = write_bids_dataset(
        root / "bids",
        subjects=SUBJECTS,
        shape=(32, 32, 32),
        voxel_size=(2.0, 2.0, 2.0),
        te_s=(0.004, 0.008, 0.012),
        phase_as_int=True,
        seed=3,
    )
    out = root / "out"
    # the atlas step (issue 23, tests/test_atlas.py) is left out: the page's parts counted here
    # are the same whether or not its optional packages are installed
    args = [str(bids), str(out), "participant", "-w", str(root / "work"), "--nprocs", "2"]
    assert main([*args, "--no-atlas"]) == 0
    return bids, out


# ------------------------------------------------------------------------ BIDS validity
@pytest.mark.parametrize("phase_as_int", [True, False])
def test_simulated_raw_dataset_and_truth_pass_the_validator(tmp_path, phase_as_int):
    bids = write_bids_dataset(
        tmp_path / "raw",
        subjects=("1",),
        shape=(24, 24, 24),
        voxel_size=(4.0, 4.0, 4.0),
        phase_as_int=phase_as_int,
    )
    assert _validator_errors(bids) == []
    assert _validator_errors(bids / "derivatives" / DERIV_NAME) == []
    side = json.loads(
        next((bids / "sub-1" / "anat").glob("*echo-1_part-phase_MEGRE.json")).read_text()
    )
    assert side["Units"] == ("arbitrary" if phase_as_int else "rad")


def test_validator_catches_what_it_should(tmp_path):
    """The check can fail: the errors qsmflow used to make are reported."""
    bids = write_bids_dataset(
        tmp_path / "raw",
        subjects=("1",),
        shape=(24, 24, 24),
        voxel_size=(4.0, 4.0, 4.0),
        phase_as_int=True,
    )
    p = next((bids / "sub-1" / "anat").glob("*echo-1_part-phase_MEGRE.json"))
    side = json.loads(p.read_text())
    del side["Units"]
    p.write_text(json.dumps(side))
    assert any(code == "SIDECAR_KEY_REQUIRED" for code, _, _ in _validator_errors(bids))


def test_qsmflow_derivatives_pass_the_validator(run_outputs):
    bids, out = run_outputs
    assert _validator_errors(out) == []
    side = json.loads((out / "sub-01/anat/sub-01_Chimap.json").read_text())
    assert side["Units"] == "ppm" and side["SkullStripped"] is True
    assert isinstance(side["SoftwareVersions"], str)
    assert side["EstimationAlgorithm"].startswith("RTS")
    assert "Kames" in side["EstimationReference"]
    assert side["Sources"] and all(s.startswith("bids:raw:sub-01/anat/") for s in side["Sources"])
    assert side["ReferenceRegion"].startswith("whole-brain mean")
    # the offset is what referencing removed: chi had mean ReferenceOffset before
    assert abs(side["ReferenceOffset"]) < 0.5
    fmap = out / "sub-01" / "fmap"
    for kind in ("total", "local"):
        fm = json.loads((fmap / f"sub-01_desc-{kind}_fieldmap.json").read_text())
        assert fm["Units"] == "ppm"
        assert (fmap / f"sub-01_desc-{kind}_magnitude.nii.gz").is_file()
    assert not list((out / "sub-01" / "anat").glob("*fieldmap*"))
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "qsmflow"


# ------------------------------------------------------------------------ report content
def test_report_is_self_contained_and_has_every_part(run_outputs):
    _, out = run_outputs
    page = (out / "sub-01.html").read_text()
    # offline: no external resources
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "<script src" not in page
    for title in (
        "Brain mask",
        "Wrapped phase and total field",
        "Local field",
        "Susceptibility (chi)",
        "Data-consistency residual",
        "Regional susceptibility (ppm)",
        "Provenance",
        "Methods",
    ):
        assert f">{title}<" in page, title
    assert "Fixed window -0.15..+0.15 ppm" in page
    assert "reference: whole-brain mean" in page and "Kames" in page
    assert "RandomSeed" in page and "numpy" in page  # seed and versions
    assert re.search(r"<td class='l'>invert</td><td>[0-9.]+</td>", page)  # timing
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) == 5
    index = (out / "index.html").read_text()
    assert all(f"href='sub-{s}.html'" in index for s in SUBJECTS)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    msg = "headless Chromium not installed (Debian: apt-get install chromium; .ci/run installs it)"
    if os.environ.get("QSMFLOW_REQUIRE_CHROMIUM"):
        pytest.fail(msg)  # CI: the report must be rendered, not skipped
    pytest.skip(msg)


def _figure_bands(png_path):
    """Figures in a screenshot of a report: ``[(top, bottom, std of the pixels inside)]``.

    Every figure has a black frame on its left edge (matplotlib facecolor) while the page,
    titles and tables are light: the figures are the runs of rows where the frame column,
    found as the left-most column with many black pixels, is black."""
    from matplotlib import image as mpimg

    gray = mpimg.imread(png_path)[..., :3].mean(axis=2)
    dark = gray < 0.1
    cols = np.nonzero(dark.mean(axis=0) > 0.1)[0]
    if cols.size == 0:
        return []
    x0 = int(cols[0])
    frame = dark[:, x0 : x0 + 3].all(axis=1)
    bands, start = [], None
    for y, d in enumerate(np.append(frame, False)):
        if d and start is None:
            start = y
        elif not d and start is not None:
            if y - start >= 80:
                bands.append((start, y, float(gray[start:y, x0 : x0 + 900].std())))
            start = None
    return bands


def test_report_renders_in_headless_chromium(run_outputs, tmp_path):
    _, out = run_outputs
    exe = _chromium()
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,7000",
            f"--screenshot={shot}",
            (out / "sub-01.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert shot.is_file(), proc.stderr[-2000:]
    bands = _figure_bands(shot)
    # mask mosaic, phase + total field, local field, chi, residual: drawn, not blank
    assert len(bands) >= 5, bands
    assert all(std > 0.05 for _, _, std in bands), bands
    # the same page with its images removed shows no figure: the check can fail
    bare = tmp_path / "bare.html"
    bare.write_text(
        re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', (out / "sub-01.html").read_text())
    )
    shot2 = tmp_path / "bare.png"
    subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile2'}",
            "--window-size=1280,7000",
            f"--screenshot={shot2}",
            bare.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert _figure_bands(shot2) == []


def test_group_level_writes_the_index(run_outputs, tmp_path):
    bids, out = run_outputs
    (out / "index.html").unlink()
    assert main([str(bids), str(out), "group"]) == 0
    index = (out / "index.html").read_text()
    assert "sub-01" in index and "sub-02" in index and "relative residual" in index
    # a failed subject gets a page with the reason, and the index says so
    from qsmflow.reports import write_failure_report, write_group_index

    page = write_failure_report(
        out,
        "03",
        errors=["sub-03: FAILED at mask: ValueError: empty mask (crash file: /w/crash-1.txt)"],
    )
    text = page.read_text()
    assert ">Errors<" in text and "ValueError: empty mask" in text and "<img" not in text
    index = write_group_index(out).read_text()
    assert "href='sub-03.html'" in index and "FAILED: sub-03: FAILED at mask" in index
    page.unlink()
    write_group_index(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(bids), str(empty), "group"]) == 2  # nothing to index: one-line error


def test_dip_extras_loss_curve_and_std_map(run_outputs, tmp_path):
    """For DIP methods the section adds the loss/residual curve and the ensemble std map."""
    from qsmflow.reports.run import run_section

    _, out = run_outputs
    anat, fmap = out / "sub-01" / "anat", out / "sub-01" / "fmap"
    chi_img = nib.load(anat / "sub-01_Chimap.nii.gz")
    std = tmp_path / "std.nii.gz"
    nib.save(
        nib.Nifti1Image(np.abs(np.asarray(chi_img.dataobj)) * 0.1 + 0.001, chi_img.affine), std
    )
    tsv = tmp_path / "loss.tsv"
    rows = ["member\tseed\titeration\tloss\tresidual\tseconds"]
    rows += [
        f"{m}\t{m}\t{i}\t{1.0 / (i + 1)}\t{0.01 + 0.1 / (i + 1)}\t{i * 0.1}"
        for m in range(2)
        for i in range(50)
    ]
    tsv.write_text("\n".join(rows) + "\n")
    frag, summary = run_section(
        prefix="sub-01",
        chi=anat / "sub-01_Chimap.nii.gz",
        mask=anat / "sub-01_desc-brain_mask.nii.gz",
        local_field=fmap / "sub-01_desc-local_fieldmap.nii.gz",
        total_field=fmap / "sub-01_desc-total_fieldmap.nii.gz",
        chi_std=std,
        loss_history=tsv,
    )
    assert ">Ensemble standard deviation<" in frag and ">Optimisation curve<" in frag
    from matplotlib import image as mpimg

    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', frag)
    assert len(pngs) == 7  # mask, total field, local field, chi, residual, std, curve
    for b in pngs:
        im = mpimg.imread(io.BytesIO(base64.b64decode(b)), format="png")
        assert im[..., :3].std() > 0.05  # drawn content, not a blank canvas
    assert 0 <= summary["relative_residual"] < 2

    # the derivatives of a DIP run (std map, loss curve) stay valid BIDS
    from qsmflow.interfaces.derivatives import DerivativesWriter

    ds_out = tmp_path / "deriv"
    shutil.copytree(out, ds_out)
    cwd = tmp_path / "ds"
    cwd.mkdir()
    node = DerivativesWriter(
        output_dir=str(ds_out),
        prefix="sub-01",
        chi=str(anat / "sub-01_Chimap.nii.gz"),
        mask=str(anat / "sub-01_desc-brain_mask.nii.gz"),
        total_field=str(fmap / "sub-01_desc-total_fieldmap.nii.gz"),
        local_field=str(fmap / "sub-01_desc-local_fieldmap.nii.gz"),
        chi_std=str(std),
        loss_history=str(tsv),
    )
    node.run(cwd=str(cwd))
    assert (ds_out / "sub-01/anat/sub-01_desc-std_Chimap.nii.gz").is_file()
    assert (ds_out / "sub-01/anat/sub-01_desc-losshistory_Chimap.tsv").is_file()
    assert _validator_errors(ds_out) == []


# ------------------------------------------------------------------------ numbers
def test_residual_map_is_zero_for_the_true_map_and_full_for_none(tmp_path):
    bids = write_bids_dataset(
        tmp_path / "r", subjects=("1",), shape=(32, 32, 32), voxel_size=(5.0, 5.0, 5.0)
    )
    t = truth_paths(bids, "1")
    chi = nib.load(t["Chimap"]).get_fdata()
    mask = nib.load(t["desc-brain_mask"]).get_fdata() > 0
    loc = nib.load(t["desc-local_fieldmap"]).get_fdata()
    kw = {"voxel_size": (5.0, 5.0, 5.0), "kind": "integral"}  # the simulator's kernel
    r = data_consistency_residual_map(chi, loc, mask, **kw)
    assert np.all(r[~mask] == 0)
    f = loc[mask] - loc[mask].mean()
    assert np.abs(r[mask]).max() < 1e-4 * np.abs(f).max()
    r0 = data_consistency_residual_map(np.zeros_like(chi), loc, mask, **kw)
    np.testing.assert_allclose(r0[mask], -f, atol=1e-6)
    rel = data_consistency_residual(0.5 * chi, loc, mask, **kw)
    r_half = data_consistency_residual_map(0.5 * chi, loc, mask, **kw)
    assert rel == pytest.approx(np.linalg.norm(r_half[mask]) / np.linalg.norm(f), rel=1e-5)
    assert rel == pytest.approx(0.5, abs=0.01)


def test_regional_table_values_and_reference_offset():
    shape = (20, 20, 20)
    x, y, z = np.indices(shape)
    mask = (x - 9.5) ** 2 + (y - 9.5) ** 2 + (z - 9.5) ** 2 < 8.5**2
    chi = np.where(x < 10, 0.05, -0.05) * mask
    mag = np.where(z < 7, 1.0, np.where(z < 13, 2.0, 3.0)) * mask
    rows = {
        r["region"]: r
        for r in regional_table(
            chi, mask, magnitude=mag, reference_name="whole brain", reference_offset=0.02
        )
    }
    assert rows["left half"]["mean"] == pytest.approx(0.05)
    assert rows["right half"]["mean"] == pytest.approx(-0.05)
    assert rows["whole mask"]["voxels"] == mask.sum()
    assert rows["magnitude class 1: dark"]["voxels"] == (mask & (z < 7)).sum()
    assert rows["magnitude class 3: bright"]["voxels"] == (mask & (z >= 13)).sum()
    assert rows["reference: whole brain"]["offset"] == 0.02
    assert rows["diamagnetic tail (chi < -0.1 ppm)"]["voxels"] == 0
    assert reference_offset(chi + 0.07 * mask, chi, mask) == pytest.approx(0.07)


def test_phase_only_run_is_valid_and_reported(tmp_path):
    """Without magnitude the fieldmaps' _magnitude companion is a unit image (said so in its
    sidecar), the outputs still validate and the report says what the mask is drawn over."""
    bids = write_bids_dataset(
        tmp_path / "bids",
        subjects=("01",),
        shape=(32, 32, 32),
        voxel_size=(2.0, 2.0, 2.0),
        te_s=(0.004, 0.008, 0.012),
        phase_as_int=True,
    )
    for p in (bids / "sub-01" / "anat").glob("*part-mag_MEGRE.*"):
        p.unlink()
    out = tmp_path / "out"
    assert (
        main([str(bids), str(out), "participant", "-w", str(tmp_path / "w"), "--nprocs", "2"]) == 0
    )
    assert _validator_errors(out) == []
    fmap = out / "sub-01" / "fmap"
    mag = np.asarray(nib.load(fmap / "sub-01_desc-total_magnitude.nii.gz").dataobj)
    assert np.all(mag == 1)
    assert (
        "phase-only"
        in json.loads((fmap / "sub-01_desc-total_magnitude.json").read_text())["Description"]
    )
    page = (out / "sub-01.html").read_text()
    assert "phase-only data: shown over |total field|" in page
    assert "magnitude class" not in page  # no intensity clusters without a magnitude


def test_failed_subject_gets_a_page_with_the_reason(tmp_path, capsys):
    """A subject that fails in the pipeline: its page names the failing node and the reason,
    the index marks it, the healthy subject's report is complete."""
    bids = write_bids_dataset(
        tmp_path / "bids",
        subjects=SUBJECTS,
        shape=(32, 32, 32),
        voxel_size=(2.0, 2.0, 2.0),
        te_s=(0.004, 0.012),
        seed=1,
    )
    for p in (bids / "sub-02" / "anat").glob("*part-mag_MEGRE.nii.gz"):
        img = nib.load(p)  # a magnitude without a head: passes the input checks, mask fails
        d = np.zeros(img.shape, np.float32)
        d[0, 0, 0] = 1.0
        nib.save(nib.Nifti1Image(d, img.affine), p)
    out = tmp_path / "out"
    args = [str(bids), str(out), "participant", "-w", str(tmp_path / "w"), "--nprocs", "2"]
    rc = main([*args, "--no-atlas"])  # the page's parts without the optional atlas block
    assert rc == 1
    bad = (out / "sub-02.html").read_text()
    assert ">Errors<" in bad and "FAILED at mask" in bad and "<img" not in bad
    good = (out / "sub-01.html").read_text()
    assert good.count('src="data:image/png;base64,') == 5
    index = (out / "index.html").read_text()
    assert "FAILED: sub-02: FAILED at mask" in index
    assert "report(s):" in capsys.readouterr().err


def test_local_field_polynomial_share_and_warning(run_outputs, tmp_path):
    """The report gives the local field's polynomial share as a number and warns above the
    threshold: a leftover background gradient added to the run's local field is caught, the
    run itself is not (issue 20)."""
    from qsmflow.algorithms.metrics import polynomial_fit, polynomial_share
    from qsmflow.reports.run import POLY_SHARE_WARN, run_section

    _, out = run_outputs
    anat, fmap = out / "sub-01" / "anat", out / "sub-01" / "fmap"
    paths = {
        "chi": anat / "sub-01_Chimap.nii.gz",
        "mask": anat / "sub-01_desc-brain_mask.nii.gz",
        "local_field": fmap / "sub-01_desc-local_fieldmap.nii.gz",
        "total_field": fmap / "sub-01_desc-total_fieldmap.nii.gz",
    }
    img = nib.load(paths["local_field"])
    loc = np.asarray(img.dataobj, dtype=np.float32)
    mask = np.asarray(nib.load(paths["mask"]).dataobj) > 0
    vs = (2.0, 2.0, 2.0)

    def report(local):
        path = tmp_path / f"local_{len(list(tmp_path.iterdir()))}.nii.gz"
        nib.save(nib.Nifti1Image(np.where(mask, local, 0).astype(np.float32), img.affine), path)
        return run_section(prefix="sub-01", **{**paths, "local_field": path})

    # the run's own local field (0.40 on this 64 mm head; its true local field: 0.12)
    frag, summary = run_section(prefix="sub-01", **paths)
    share = polynomial_share(loc, mask, voxel_size=vs)
    assert summary["local_poly_share"] == pytest.approx(share, abs=1e-6)
    assert f"explains {100 * share:.1f} % of the local field" in frag
    assert "fixed window -0.05..+0.05" in frag
    assert (share > POLY_SHARE_WARN) == ("WARNING" in frag) == bool(summary["warnings"])
    # without its smooth part: ~0 %, no warning
    clean = loc - polynomial_fit(loc, mask, voxel_size=vs)
    frag1, summary1 = report(clean)
    assert summary1["local_poly_share"] < 0.01
    assert summary1["warnings"] == [] and "WARNING" not in frag1
    # the same plus a background gradient of 3x the field's std across the brain: warned
    x = np.indices(loc.shape)[0].astype(np.float32)
    grad = (x - x[mask].mean()) / np.ptp(x[mask]) * 6 * clean[mask].std()
    frag2, summary2 = report(clean + grad)
    assert summary2["local_poly_share"] > 0.5
    assert len(summary2["warnings"]) == 1 and "qc-warning" in frag2 and "WARNING" in frag2
    # the subject page's summary table carries the number
    from qsmflow.reports.html import subject_page

    page = subject_page("01", [frag2], summaries=[summary2], versions={})
    assert f"{summary2['local_poly_share']:.1%}" in page
    # and the group index, the warned run's cell in red
    from qsmflow.reports.html import group_page

    index = group_page(
        [
            {"subject": "01", "href": "sub-01.html", "runs": [summary1]},
            {"subject": "02", "href": "sub-02.html", "runs": [summary2]},
        ]
    )
    assert f"{summary1['local_poly_share']:.1%}" in index
    assert index.count("style='background:#fde8e8") == 1
