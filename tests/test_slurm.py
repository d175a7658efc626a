"""qsmflow on a real single-node SLURM cluster (munged, slurmctld, slurmd: .ci/slurm.sh).

SLURMGraph and SLURM give the same maps as MultiProc, the right exit status and summary; a
failing subject cancels its dependent jobs (none left pending) and is named with its reason.
CI exports QSMFLOW_REQUIRE_SLURM=1 after starting the daemons, so there these tests cannot
skip; elsewhere they skip (with the reason) when no SLURM is reachable.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from qsmflow_subprocess import chi_map, qsmflow_cmd, subprocess_env

from qsmflow.sims.bids import write_bids_dataset


def _slurm_up() -> str | None:
    """None when a SLURM controller answers, else why not."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "SLURM is not installed (run .ci/slurm.sh)"
    try:
        res = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if res.returncode != 0 or not res.stdout.strip():
        return f"no SLURM controller answers (sinfo: {res.stderr.strip()})"
    return None


_WHY = _slurm_up()
if _WHY is not None:
    if os.environ.get("QSMFLOW_REQUIRE_SLURM"):
        raise RuntimeError(f"QSMFLOW_REQUIRE_SLURM is set but {_WHY}")
    pytest.skip(_WHY, allow_module_level=True)

SBATCH = "--partition=normal --time=00:20:00 --cpus-per-task=1 --kill-on-invalid-dep=yes"


def _qsmflow(bids, out, work, *extra, env_drop=()):
    """qsmflow as a user runs it (a subprocess; SLURM jobs import qsmflow via PYTHONPATH)."""
    res = subprocess.run(
        qsmflow_cmd(bids, out, work, *extra),
        capture_output=True,
        text=True,
        env=subprocess_env(drop=env_drop),
        timeout=900,
        cwd=str(work.parent),
    )
    return res.returncode, res.stdout + res.stderr


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    bids = write_bids_dataset(
        root / "bids",
        subjects=("01",),
        shape=(24, 24, 24),
        voxel_size=(2.5,) * 3,
        te_s=(0.004, 0.012),
    )
    out = root / "ref_out"
    rc, text = _qsmflow(bids, out, root / "ref_work", "--nprocs", "2")
    assert rc == 0, text
    return bids, root, chi_map(out, "01")


def _plugin_file(tmp, name):
    p = tmp / f"{name}.yml"
    args = f'  sbatch_args: "{SBATCH}"\n'
    if name == "SLURMGraph":
        args += "  dont_resubmit_completed_jobs: true\n"
    p.write_text(f"plugin: {name}\nplugin_args:\n{args}")
    return p


def _no_jobs_left(work):
    from qsmflow.cli._plugins import slurm_jobs_under

    return slurm_jobs_under(work / "qsmflow_0_1_wf" / "batch") == []


@pytest.mark.parametrize("plugin", ["SLURMGraph", "SLURM"])
def test_slurm_plugins_give_the_multiproc_maps(plugin, dataset, tmp_path):
    bids, _, ref = dataset
    out, work = tmp_path / "out", tmp_path / "work"
    rc, text = _qsmflow(bids, out, work, "--use-plugin", _plugin_file(tmp_path, plugin))
    assert rc == 0, text
    assert "sub-01: ok" in text and "all 1 subject(s) done" in text, text
    np.testing.assert_array_equal(chi_map(out, "01"), ref)  # same code, same seed: same map
    assert _no_jobs_left(work)


def test_slurmgraph_failure_is_named_and_cancels_dependants(tmp_path):
    """One broken subject (no usable magnitude contrast: the mask job fails): the other
    completes, exit 1, the summary names the subject and the reason, no job left pending."""
    bids = write_bids_dataset(
        tmp_path / "bids",
        subjects=("01", "02"),
        shape=(24, 24, 24),
        voxel_size=(2.5,) * 3,
        te_s=(0.004, 0.012),
    )
    for e in (1, 2):
        p = bids / "sub-02" / "anat" / f"sub-02_echo-{e}_part-mag_MEGRE.nii.gz"
        img = nib.load(p)
        d = np.zeros(img.shape, np.float32)
        d[0, 0, 0] = 1.0  # plausible as a file (not all zero), but no head in it
        nib.save(nib.Nifti1Image(d, img.affine), p)
    out, work = tmp_path / "out", tmp_path / "work"
    rc, text = _qsmflow(bids, out, work, "--use-plugin", _plugin_file(tmp_path, "SLURMGraph"))
    assert rc == 1, text
    assert "sub-01: ok" in text, text
    assert "sub-02: FAILED" in text and "1 of 2 subject(s) failed" in text, text
    assert "Traceback" not in text
    assert (out / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").is_file()
    assert not (out / "sub-02" / "anat" / "sub-02_Chimap.nii.gz").exists()
    assert _no_jobs_left(work)


def test_interrupt_cancels_the_submitted_jobs(dataset, tmp_path):
    """Ctrl-C while qsmflow waits for its SLURMGraph jobs: exit 130, the jobs (qsmflow's
    workers on the cluster) are cancelled, none left queued or running, no Chimap written."""
    import signal
    import time

    from qsmflow.cli._plugins import slurm_jobs_under

    bids, _, _ = dataset
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = qsmflow_cmd(bids, out, work, "--use-plugin", _plugin_file(tmp_path, "SLURMGraph"))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env()
    )
    batch = work / "qsmflow_0_1_wf" / "batch"
    deadline = time.monotonic() + 300
    while not slurm_jobs_under(batch) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0]
    assert slurm_jobs_under(batch), "no job was submitted"
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, text
    assert "interrupted" in text and "cancelled" in text and "SLURM job" in text, text
    assert "Traceback" not in text, text
    deadline = time.monotonic() + 30
    while slurm_jobs_under(batch) and time.monotonic() < deadline:
        time.sleep(1)
    assert slurm_jobs_under(batch) == []
    assert not (out / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").exists()


def test_slurm_settings_checked_before_submitting(dataset, tmp_path):
    """A partition SLURM does not have, and the SLURM plugin without LOGNAME: one line each,
    exit 2, nothing submitted or written."""
    bids, _, _ = dataset
    bad = tmp_path / "bad.yml"
    bad.write_text('plugin: SLURMGraph\nplugin_args:\n  sbatch_args: "--partition=nope"\n')
    rc, text = _qsmflow(bids, tmp_path / "out", tmp_path / "work", "--use-plugin", bad)
    assert rc == 2 and "SLURM refuses the job settings" in text and "bad.yml" in text, text
    rc, text = _qsmflow(
        bids,
        tmp_path / "out",
        tmp_path / "work",
        "--use-plugin",
        _plugin_file(tmp_path, "SLURM"),
        env_drop=("LOGNAME",),
    )
    assert rc == 2 and "LOGNAME" in text, text
    assert not (tmp_path / "out").exists() and not (tmp_path / "work" / "qsmflow_0_1_wf").exists()


def test_shipped_plugin_files_are_accepted_by_slurm():
    from qsmflow.cli._plugins import check_slurm, load_plugin_file

    for name in ("slurmgraph", "slurm"):  # by name: the files shipped in the package
        plugin, args = load_plugin_file(name)
        check_slurm(plugin, args, where=name, environ={"LOGNAME": "root"})
    assert "--kill-on-invalid-dep=yes" in load_plugin_file("slurmgraph")[1]["sbatch_args"]
