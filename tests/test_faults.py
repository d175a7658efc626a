"""Faults at scale: one broken subject among eight, Ctrl-C / SIGTERM mid-run and the resumed
rerun, reproducibility (same data and seed -> bitwise the same maps), and no hang on a bad
work directory.  qsmflow runs as a subprocess here, as a user runs it."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from qsmflow_subprocess import chi_map, qsmflow_cmd, subprocess_env

from qsmflow.sims.bids import write_bids_dataset

SUBJECTS = tuple(f"{i:02d}" for i in range(1, 9))
KW = {"shape": (20, 20, 20), "voxel_size": (3.0,) * 3, "te_s": (0.004, 0.012)}


def _cmd(bids, out, work, *extra):
    return qsmflow_cmd(bids, out, work, "--nprocs", "2", *extra)


def _run(bids, out, work, *extra, timeout=600):
    res = subprocess.run(
        _cmd(bids, out, work, *extra),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=timeout,
    )
    return res.returncode, res.stdout + res.stderr


def _break_subject(bids, sub):
    """A magnitude that passes the input checks but holds no head: the mask node fails."""
    for e in (1, 2):
        p = bids / f"sub-{sub}" / "anat" / f"sub-{sub}_echo-{e}_part-mag_MEGRE.nii.gz"
        img = nib.load(p)
        d = np.zeros(img.shape, np.float32)
        d[0, 0, 0] = 1.0
        nib.save(nib.Nifti1Image(d, img.affine), p)


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    """8 subjects, sub-05 broken, run once with MultiProc."""
    root = tmp_path_factory.mktemp("faults")
    bids = write_bids_dataset(root / "bids", subjects=SUBJECTS, **KW)
    _break_subject(bids, "05")
    out, work = root / "out", root / "work"
    rc, text = _run(bids, out, work)
    return root, out, rc, text


def test_one_broken_subject_of_eight(eight):
    _, out, rc, text = eight
    assert rc == 1, text
    for s in SUBJECTS:
        if s == "05":
            continue
        assert f"sub-{s}: ok" in text, text
        assert (out / f"sub-{s}" / "anat" / f"sub-{s}_Chimap.nii.gz").is_file()
    assert "sub-05: FAILED at mask:" in text and "1 of 8 subject(s) failed" in text, text
    crash = [ln for ln in text.splitlines() if "crash file:" in ln]
    assert len(crash) == 1 and Path(crash[0].split("crash file:")[1].strip()).is_file()
    assert "Traceback" not in text  # the traceback is in the crash file, not the terminal
    assert not (out / "sub-05" / "anat" / "sub-05_Chimap.nii.gz").exists()


def test_verbose_shows_the_traceback(eight, tmp_path):
    root, _, _, _ = eight
    rc, text = _run(
        root / "bids", tmp_path / "out", root / "work", "--participant-label", "05", "-v"
    )
    assert rc == 1 and "Traceback" in text and "sub-05: FAILED" in text


def _descendants(pid):
    from qsmflow.cli._signals import _descendants as desc

    return desc(pid)


def _alive(pid):
    from qsmflow.cli._signals import _alive as alive

    return alive(pid)


def _start_two_subjects(tmp_path):
    """qsmflow started as a subprocess on two subjects: ``(proc, bids, out, work)``."""
    bids = write_bids_dataset(tmp_path / "bids", subjects=SUBJECTS[:2], **KW)
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen(
        _cmd(bids, out, work),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(),
    )
    return proc, bids, out, work


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_workers_and_rerun_resumes(sig, code, eight, tmp_path):
    """Stop mid-run: exit 130/143 at once, no worker left computing, no truncated output; the
    rerun completes, reusing the finished nodes, and gives the maps of an uninterrupted run
    (same data, same seed: bitwise)."""
    _, ref_out, _, _ = eight
    proc, bids, out, work = _start_two_subjects(tmp_path)
    deadline = time.monotonic() + 300
    wf = work / "qsmflow_0_1_wf"
    while time.monotonic() < deadline and proc.poll() is None:
        done = list(wf.rglob("result_*.pklz")) if wf.is_dir() else []
        if len(done) >= 4:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "finished before it could be interrupted"
    workers = _descendants(proc.pid)
    assert workers
    t0 = time.monotonic()
    proc.send_signal(sig)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == code, text
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in text
    time.sleep(0.5)
    assert not [p for p in workers if _alive(p)]  # every worker stopped
    finished = {p.parent.relative_to(wf).as_posix() for p in wf.rglob("result_*.pklz")}
    for f in out.rglob("*.nii.gz"):  # whatever is under a final name is complete
        np.asarray(nib.load(f).dataobj)
    assert not _temporaries(out)
    if sig == signal.SIGTERM:
        return  # the resumed rerun is checked once (after Ctrl-C)

    rc, text = _run(bids, out, work)
    assert rc == 0, text
    executed = set(json.loads((work / "qsmflow_last_run.json").read_text())["executed"])
    assert finished and not (finished & executed), "finished nodes were run again"
    for s in SUBJECTS[:2]:
        np.testing.assert_array_equal(chi_map(out, s), chi_map(ref_out, s))


def _temporaries(out: Path) -> list:
    """Hidden files in the output folder other than .bidsignore: temporaries of atomic writes
    (``.<name>.<random>``) left behind."""
    return [p for p in out.rglob(".*") if p.name != ".bidsignore"] if out.exists() else []


def _run_until(tmp_path, marker: str):
    """Start qsmflow on two subjects; return ``(proc, lines, reader, out)`` once a progress
    line contains ``marker`` (the output keeps being read into ``lines``)."""
    import threading

    proc, _, out, _ = _start_two_subjects(tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(marker in ln for ln in lines):
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"finished before {marker!r}"
    return proc, lines, reader, out


def test_sigterm_when_the_inversion_starts(tmp_path):
    """SIGTERM (a cluster's time limit) as the first inversion starts: exit 143, one line, no
    BrokenProcessPool traceback from the pool's thread, no temporary file in the output."""
    proc, lines, reader, out = _run_until(tmp_path, "invert started")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    text = "".join(lines)
    assert proc.returncode == 143, text
    assert "qsmflow: terminated; stopping worker processes" in text
    assert "Traceback" not in text and "BrokenProcessPool" not in text, text
    assert not _temporaries(out)


def test_worker_killed_stops_the_run_instead_of_hanging(tmp_path):
    """A worker killed from outside (the out-of-memory killer: SIGKILL) breaks Nipype's pool,
    which then waited forever: the run stops with one line and exit 1, no traceback, no
    process left, no temporary file."""
    proc, lines, reader, out = _run_until(tmp_path, "invert started")
    workers = _descendants(proc.pid)
    assert workers
    import os

    os.kill(workers[-1], signal.SIGKILL)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    text = "".join(lines)
    assert proc.returncode == 1, text
    assert "qsmflow: a worker process was killed (e.g. out of memory" in text, text
    assert "Traceback" not in text and "BrokenProcessPool" not in text, text
    time.sleep(0.5)
    assert not [p for p in workers if _alive(p)]
    assert not _temporaries(out)


_WRITER = """
import multiprocessing as mp, sys, time
from pathlib import Path
from qsmflow.cli._signals import handle_signals
from qsmflow.io import write_atomic

out = Path(sys.argv[1])

def slow(tmp):
    Path(tmp).write_text("partial")
    time.sleep(60)

with handle_signals("writer"):
    worker = mp.get_context("fork").Process(
        target=write_atomic, args=(out / "sub-01" / "x.json", slow)
    )
    worker.start()
    write_atomic(out / ".bidsignore", slow)
"""


@pytest.mark.parametrize(
    "sig,code,word",
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hung up")],
)
def test_signal_during_atomic_writes_leaves_no_temporary(sig, code, word, tmp_path):
    """A signal while the main process and a forked worker are each inside an atomic write:
    both temporaries are removed (os._exit skips write_atomic's own cleanup)."""
    import sys

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(),
    )
    deadline = time.monotonic() + 60
    while len([p for p in out.rglob("*") if p.is_file()]) < 2:  # main and worker writing
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(sig)
    text = proc.communicate(timeout=30)[0]
    assert proc.returncode == code and f"writer: {word}" in text, text
    assert "Traceback" not in text
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_work_dir_a_file_does_not_hang(tmp_path):
    bids = write_bids_dataset(
        tmp_path / "bids",
        subjects=("01",),
        shape=(12, 12, 12),
        voxel_size=(4.0,) * 3,
        te_s=(0.004, 0.012),
    )
    (tmp_path / "w").write_text("not a folder")
    rc, text = _run(bids, tmp_path / "out", tmp_path / "w", timeout=120)
    assert rc == 2 and "work directory (-w) is a file" in text and "Traceback" not in text
    assert (tmp_path / "w").read_text() == "not a folder"
