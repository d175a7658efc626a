"""qsmflow-stage: a stage chain on simulated NIfTI files, and one-line errors on bad input."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from qsmflow.cli.stage import main

qsm_eval = pytest.importorskip("qsm_ci.qsm_eval")


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from qsmflow.sims.field import simulate_fields
    from qsmflow.sims.phantom import make_head_phantom
    from qsmflow.sims.signal import simulate_megre

    d = tmp_path_factory.mktemp("stage")
    ph = make_head_phantom(shape=(48, 48, 48), voxel_size=(1.25, 1.25, 1.25))
    f = simulate_fields(ph)
    te = (0.004, 0.008, 0.012, 0.016)
    mag, phase = simulate_megre(ph, total_field_ppm=f["total"], te_s=te, b0_tesla=3.0, snr=200)
    aff = np.diag([1.25, 1.25, 1.25, 1.0])

    def save(name, arr, dtype=np.float32):
        p = d / name
        nib.save(nib.Nifti1Image(np.asarray(arr, dtype=dtype), aff), p)
        return str(p)

    paths = {
        "phase": save("phase.nii.gz", phase),
        "magnitude": save("magnitude.nii.gz", mag),
        "mask": save("mask.nii.gz", ph.brain_mask, np.uint8),
        "localfield": save("localfield.nii.gz", f["local"]),
        "totalfield": save("totalfield.nii.gz", f["total"]),
    }
    params = d / "params.json"
    params.write_text(
        json.dumps(
            {"TE": list(te), "B0": 3.0, "B0_dir": [0, 0, 1], "voxel_size": [1.25, 1.25, 1.25]}
        )
    )
    paths["params"] = str(params)
    return d, paths, f, ph


def _load(p):
    return np.asarray(nib.load(str(p)).dataobj)


def test_invert_from_local_field(sim):
    d, paths, f, ph = sim
    out = d / "chi_tkd.nii.gz"
    rc = main(
        [
            "invert",
            "--method",
            "tkd",
            "--localfield",
            paths["localfield"],
            "--mask",
            paths["mask"],
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    chi = _load(out)
    nrmse, _ = qsm_eval.nrmse_challenge(chi, f["chi_local"], ph.brain_mask)
    assert nrmse < 47  # 45.6
    # the same call with a wrong B0 direction is measurably worse: B0_dir is honoured
    out2 = d / "chi_tkd_wrongdir.nii.gz"
    assert (
        main(
            [
                "invert",
                "--method",
                "tkd",
                "--localfield",
                paths["localfield"],
                "--mask",
                paths["mask"],
                "--b0-dir",
                "1",
                "0",
                "0",
                "-o",
                str(out2),
            ]
        )
        == 0
    )
    nrmse2, _ = qsm_eval.nrmse_challenge(_load(out2), f["chi_local"], ph.brain_mask)
    assert nrmse2 > nrmse + 20


def test_chain_phase_to_chi(sim):
    d, paths, f, ph = sim
    tf = d / "chain" / "totalfield.nii.gz"
    assert (
        main(
            [
                "combine",
                "--method",
                "wls",
                "--phase",
                paths["phase"],
                "--magnitude",
                paths["magnitude"],
                "--mask",
                paths["mask"],
                "--params",
                paths["params"],
                "-o",
                str(tf),
            ]
        )
        == 0
    )
    lf = d / "chain" / "localfield.nii.gz"
    assert (
        main(
            [
                "bfr",
                "--method",
                "vsharp",
                "--totalfield",
                str(tf),
                "--mask",
                paths["mask"],
                "--params",
                paths["params"],
                "-o",
                str(lf),
            ]
        )
        == 0
    )
    assert (d / "chain" / "localfield_mask.nii.gz").exists()
    eroded = _load(d / "chain" / "localfield_mask.nii.gz").astype(bool)
    chi = d / "chain" / "chimap.nii.gz"
    assert (
        main(
            [
                "dipole",
                "--method",
                "tkd",
                "--localfield",
                str(lf),
                "--mask",
                str(d / "chain" / "localfield_mask.nii.gz"),
                "-o",
                str(d / "chain") + "/",
            ]
        )
        == 0
    )
    nrmse, _ = qsm_eval.nrmse_challenge(_load(chi), f["chi_local"], eroded)
    assert nrmse < 76  # 72.9: limited by background removal at 3.3 mm voxels


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_bad_inputs_one_line_error(sim, capsys, tmp_path):
    d, paths, f, ph = sim
    out = tmp_path / "chi.nii.gz"
    base = ["invert", "--method", "tkd", "-o", str(out)]
    # missing file
    rc, err = _err(
        capsys, base + ["--localfield", str(tmp_path / "nope.nii.gz"), "--mask", paths["mask"]]
    )
    assert rc != 0 and "nope.nii.gz" in err and "not found" in err and "\n" not in err
    # unknown method
    rc, err = _err(
        capsys,
        [
            "invert",
            "--method",
            "magic",
            "--localfield",
            paths["localfield"],
            "--mask",
            paths["mask"],
            "-o",
            str(out),
        ],
    )
    assert rc != 0 and "magic" in err and "tkd" in err
    # shape mismatch
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), small)
    rc, err = _err(capsys, base + ["--localfield", paths["localfield"], "--mask", str(small)])
    assert rc != 0 and "small.nii.gz" in err and "shape" in err
    # affine mismatch
    shifted = tmp_path / "shifted.nii.gz"
    img = nib.load(paths["mask"])
    aff = img.affine.copy()
    aff[0, 3] += 5
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), shifted)
    rc, err = _err(capsys, base + ["--localfield", paths["localfield"], "--mask", str(shifted)])
    assert rc != 0 and "affine" in err
    # NaNs
    nanf = tmp_path / "nan.nii.gz"
    lf = _load(paths["localfield"]).copy()
    lf[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(lf, nib.load(paths["localfield"]).affine), nanf)
    rc, err = _err(capsys, base + ["--localfield", str(nanf), "--mask", paths["mask"]])
    assert rc != 0 and "NaN" in err and "nan.nii.gz" in err
    # empty mask
    empty = tmp_path / "empty.nii.gz"
    nib.save(
        nib.Nifti1Image(np.zeros(ph.brain_mask.shape, np.uint8), nib.load(paths["mask"]).affine),
        empty,
    )
    rc, err = _err(capsys, base + ["--localfield", paths["localfield"], "--mask", str(empty)])
    assert rc != 0 and "empty" in err
    # unknown --set parameter
    rc, err = _err(
        capsys,
        base + ["--localfield", paths["localfield"], "--mask", paths["mask"], "--set", "bogus=1"],
    )
    assert rc != 0 and "bogus" in err
    # echo count mismatch
    rc, err = _err(
        capsys,
        [
            "combine",
            "--method",
            "wls",
            "--phase",
            paths["phase"],
            "--te",
            "0.004",
            "0.008",
            "--b0",
            "3",
            "-o",
            str(out),
        ],
    )
    assert rc != 0 and "echo" in err
    # nothing was written under the final name, and no temporary files were left behind
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".chi")]


def test_set_override_changes_result(sim, tmp_path):
    d, paths, f, ph = sim
    outs = []
    for thr in ("0.1", "0.3"):
        out = tmp_path / f"chi_{thr}.nii.gz"
        assert (
            main(
                [
                    "invert",
                    "--method",
                    "tkd",
                    "--localfield",
                    paths["localfield"],
                    "--mask",
                    paths["mask"],
                    "--set",
                    f"threshold={thr}",
                    "-o",
                    str(out),
                ]
            )
            == 0
        )
        outs.append(_load(out))
    assert np.abs(outs[0] - outs[1]).max() > 1e-3


def test_console_script_exit_code(sim, tmp_path):
    d, paths, f, ph = sim
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qsmflow.cli.stage",
            "bfr",
            "--method",
            "vsharp",
            "--totalfield",
            str(tmp_path / "missing.nii.gz"),
            "--mask",
            paths["mask"],
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing.nii.gz" in r.stderr


def test_dip_method_writes_std_loss_curve_and_seeds(sim, tmp_path):
    pytest.importorskip("torch")
    d, paths, f, ph = sim
    out = tmp_path / "chi.nii.gz"
    assert (
        main(
            [
                "invert",
                "--method",
                "modip",
                "--localfield",
                paths["localfield"],
                "--mask",
                paths["mask"],
                "--set",
                "base=8",
                "--set",
                "max_iter=3",
                "--set",
                "ensemble=2",
                "--set",
                "seed=5",
                "--set",
                "device=cpu",
                "--set",
                "plateau_tol=0",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    m = ph.brain_mask
    chi, std = _load(out), _load(tmp_path / "chi_std.nii.gz")
    assert np.abs(chi[m]).max() > 0 and std[m].mean() > 0 and np.all(std[~m] == 0)
    rows = (tmp_path / "chi_loss.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:4] == ["member", "seed", "iteration", "loss"]
    assert len(rows) == 1 + 2 * 3 and rows[-1].split("\t")[:3] == ["1", "6", "3"]
    side = json.loads((tmp_path / "chi.json").read_text())
    assert side["seeds"] == [5, 6] and side["settings"]["base"] == 8


def test_modip_medi_start_and_amp_through_the_stage(sim, tmp_path, capsys):
    """`--set init=medi` uses `--magnitude` (a one-line error without it, nothing written);
    `--set amp=off` is recorded in the fit sidecar."""
    pytest.importorskip("torch")
    d, paths, f, ph = sim
    out = tmp_path / "chi.nii.gz"
    base = [
        "invert",
        "--method",
        "modip",
        "--localfield",
        paths["localfield"],
        "--mask",
        paths["mask"],
        "--set",
        "base=8",
        "--set",
        "max_iter=2",
        "--set",
        "device=cpu",
        "--set",
        "net_factor=2",
        "--set",
        "init=medi",
        "--set",
        "amp=off",
        "-o",
        str(out),
    ]
    rc, err = _err(capsys, base)
    assert rc != 0 and "magnitude" in err and "\n" not in err and not out.exists()
    assert main(base + ["--magnitude", paths["magnitude"], "--params", paths["params"]]) == 0
    side = json.loads((tmp_path / "chi.json").read_text())["settings"]
    assert side["init"] == "medi" and side["amp"] == "off" and side["bf16"] is False
    m = ph.brain_mask
    r = np.corrcoef(_load(out)[m], f["chi_local"][m])[0, 1]
    assert r > 0.95, r  # MEDI start: 0.99 after 2 iterations (no warm start: 0.82)


def test_set_none_is_read_by_the_parameter_type(sim, tmp_path):
    """`--set unwrap=none` keeps the text "none" for a string parameter (complexfit's
    documented value that skips spatial unwrapping; it used to become Python None and be
    refused): the map differs from ROMEO's and the sidecar records the string."""
    d, paths, f, ph = sim
    outs = {}
    for unwrap in ("none", "romeo"):
        out = tmp_path / f"field_{unwrap}.nii.gz"
        argv = ["combine", "--method", "complexfit", "--phase", paths["phase"]]
        argv += ["--magnitude", paths["magnitude"], "--mask", paths["mask"]]
        argv += ["--params", paths["params"], "--set", f"unwrap={unwrap}", "-o", str(out)]
        assert main(argv) == 0
        side = json.loads((tmp_path / f"field_{unwrap}.json").read_text())
        assert side["settings"]["unwrap"] == unwrap
        outs[unwrap] = _load(out)
    assert np.abs(outs["none"] - outs["romeo"]).max() > 1e-3


def test_modip_init_none_through_the_stage(sim, tmp_path):
    """`qsmflow-stage invert --method modip --set init=none` (a documented value) runs: `init`
    is a string parameter, so `none` stays the text; `max_time_s=none` (annotated `... | None`)
    is None (no time budget)."""
    pytest.importorskip("torch")
    d, paths, f, ph = sim
    out = tmp_path / "chi.nii.gz"
    argv = ["invert", "--method", "modip", "--localfield", paths["localfield"]]
    argv += ["--mask", paths["mask"], "--params", paths["params"], "-o", str(out)]
    for s in ("init=none", "max_time_s=none", "base=4", "max_iter=2", "device=cpu"):
        argv += ["--set", s]
    assert main(argv) == 0
    side = json.loads((tmp_path / "chi.json").read_text())["settings"]
    assert side["init"] == "none" and side["max_time_s"] is None
    assert np.isfinite(_load(out)).all()
