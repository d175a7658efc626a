"""qsmflow command line: parser, exit codes, labels, --mem units, input checks (nothing run)."""

import argparse
import json

import nibabel as nib
import numpy as np
import pytest

from qsmflow.cli.run import build_parser, main, parse_mem
from qsmflow.sims.bids import write_bids_dataset


@pytest.mark.parametrize(
    "text,gb",
    [
        ("8", 8.0),
        ("8GB", 8.0),
        ("8g", 8.0),
        ("500MB", 0.5),
        ("16000M", 16.0),
        ("1T", 1000.0),
        ("1.5", 1.5),
        ("2GiB", 2 * 1.024**3),
    ],
)
def test_parse_mem_units(text, gb):
    assert parse_mem(text) == pytest.approx(gb)


@pytest.mark.parametrize("bad", ["", "eight", "8XB", "-1", "0"])
def test_parse_mem_rejects(bad):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_mem(bad)


def test_labels_accept_sub_prefix():
    a = build_parser().parse_args(
        [
            "b",
            "o",
            "participant",
            "--participant-label",
            "sub-01",
            "02",
            "--session-label",
            "ses-pre",
            "--mem",
            "4GB",
        ]
    )
    assert a.participant_label == ["01", "02"] and a.session_label == ["pre"] and a.mem == 4.0


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--participant-label",
        "--preset",
        "--use-plugin",
        "--inversion",
        "--mem",
        "--stop-on-first-crash",
        "exit status",
    ):
        assert flag in out


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return write_bids_dataset(
        root / "bids",
        subjects=("01",),
        shape=(24, 24, 24),
        voxel_size=(2.5, 2.5, 2.5),
        te_s=(0.004, 0.012),
    )


def _run(args, capsys):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_usage_errors_exit_2(bids, tmp_path, capsys):
    w = ["-w", tmp_path / "w"]
    assert _run([bids, bids, "participant", *w], capsys)[0] == 2
    rc, err = _run([bids, tmp_path / "o", "participant", "--preset", "nope", *w], capsys)
    assert rc == 2 and "unknown preset" in err
    rc, err = _run([bids, tmp_path / "o", "participant", "--inversion", "magic", *w], capsys)
    assert rc == 2 and "unknown method 'magic'" in err
    rc, err = _run([bids, tmp_path / "o", "participant", "--participant-label", "09", *w], capsys)
    assert rc == 2 and "sub-09 not found" in err
    with pytest.raises(SystemExit) as e:
        main([str(bids), str(tmp_path / "o"), "second-level"])
    assert e.value.code == 2
    # the group level before any participant run: one-line error, nothing created
    rc, err = _run([bids, tmp_path / "o", "group", *w], capsys)
    assert rc == 2 and "output_dir not found" in err
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_list_presets(capsys):
    assert main(["x", "y", "participant", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert "fast:" in out and "accurate:" in out and "dip-gpu:" in out


def test_bad_inputs_listed_and_nothing_run(tmp_path, capsys):
    bids = write_bids_dataset(
        tmp_path / "bids",
        subjects=("01", "02"),
        shape=(16, 16, 16),
        voxel_size=(4.0, 4.0, 4.0),
        te_s=(0.004, 0.008, 0.012),
    )
    a1 = bids / "sub-01" / "anat"
    (a1 / "sub-01_echo-2_part-phase_MEGRE.nii.gz").unlink()  # missing echo
    side = a1 / "sub-01_echo-1_part-phase_MEGRE.json"
    meta = json.loads(side.read_text())
    del meta["EchoTime"]
    side.write_text(json.dumps(meta))
    a2 = bids / "sub-02" / "anat"
    p = a2 / "sub-02_echo-3_part-phase_MEGRE.nii.gz"
    img = nib.load(p)
    nib.save(nib.Nifti1Image(np.full(img.shape, 100.5, np.float32), img.affine), p)  # not rad
    p = a2 / "sub-02_echo-2_part-mag_MEGRE.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16, 2), np.float32), img.affine), p)  # 4D
    rc, err = _run([bids, tmp_path / "o", "participant", "-w", tmp_path / "w"], capsys)
    assert rc == 2 and "nothing was run" in err
    assert "phase echo(es) [2] missing" in err
    assert "sub-01_echo-1_part-phase_MEGRE.nii.gz: EchoTime missing" in err
    assert "sub-02_echo-3_part-phase_MEGRE.nii.gz" in err and "neither radians" in err
    assert "sub-02_echo-2_part-mag_MEGRE.nii.gz: magnitude image must be 3D" in err
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_shipped_plugins_by_name(bids, tmp_path, capsys, monkeypatch):
    """The plugin files are package data: `--use-plugin slurmgraph` finds the shipped file from
    any folder; `--dump-plugin` prints it (an editable copy, read back by path); a bad name is
    one line listing the valid names, and nothing is created."""
    from qsmflow.cli._plugins import list_plugins, load_plugin_file, plugin_dir

    assert list_plugins() == ["multiproc", "slurm", "slurmgraph"]
    monkeypatch.chdir(tmp_path)  # not the checkout: names resolve in the package
    assert load_plugin_file("slurmgraph")[0] == "SLURMGraph"
    assert load_plugin_file("multiproc")[0] == "MultiProc"
    assert main(["--list-plugins"]) == 0
    out = capsys.readouterr().out
    assert "slurmgraph: Nipype SLURMGraph plugin" in out and "multiproc:" in out
    assert main(["--dump-plugin", "slurmgraph"]) == 0
    text = capsys.readouterr().out
    assert text == (plugin_dir() / "slurmgraph.yml").read_text()
    (tmp_path / "my.yml").write_text(text.replace("--mem=8G", "--mem=2G"))
    assert "--mem=2G" in load_plugin_file("my.yml")[1]["sbatch_args"]
    assert main(["--dump-plugin", "nope"]) == 2
    assert "unknown plugin 'nope'; choose from: multiproc, slurm, slurmgraph" in (
        capsys.readouterr().err
    )
    w = ["-w", tmp_path / "w"]
    rc, err = _run([bids, tmp_path / "o", "participant", "--use-plugin", "slurmgrap", *w], capsys)
    assert rc == 2 and "unknown plugin 'slurmgrap'" in err, err
    assert "one of: multiproc, slurm, slurmgraph" in err and "\n" not in err.strip(), err
    rc, err = _run([bids, tmp_path / "o", "participant", "--use-plugin", "no/such.yml", *w], capsys)
    assert rc == 2 and "plugin file not found" in err, err
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_installed_package_ships_the_plugins(tmp_path):
    """The qsmflow this interpreter imports outside the checkout (site-packages after `pip
    install .`, as in CI and the container) has the plugin files and presets."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "qsmflow.cli.run"]
    res = subprocess.run(
        [*cmd, "--list-plugins"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    for name in ("multiproc", "slurm", "slurmgraph"):
        assert f"{name}: Nipype " in res.stdout, res.stdout
    res = subprocess.run(
        [*cmd, "--dump-plugin", "slurmgraph"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == (repo / "qsmflow/data/plugins/slurmgraph.yml").read_text()
