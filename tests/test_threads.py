"""Thread control: a node run with n_threads=N limits BLAS/OpenMP pools, scipy.fft workers and
torch threads to N inside the method, and restores them afterwards."""

import json

import numpy as np
import pytest
import scipy.fft
from threadpoolctl import threadpool_info

from qsmflow import registry

SEEN = {}


def probe_threads(field, mask, *, voxel_size=(1.0, 1.0, 1.0)):
    """Record the thread settings seen inside a stage method; return the field."""
    from qsmflow.algorithms._threads import fft_workers

    SEEN["pools"] = [p["num_threads"] for p in threadpool_info()]
    SEEN["fft_workers"] = fft_workers()
    SEEN["scipy_default_workers"] = scipy.fft.get_workers()
    torch = __import__("sys").modules.get("torch")
    SEEN["torch"] = torch.get_num_threads() if torch is not None else None
    return np.asarray(field)


@pytest.fixture
def probe(monkeypatch):
    meth = registry.Method("invert", "probe", f"{__name__}:probe_threads", (), "probe")
    monkeypatch.setattr(registry, "METHODS", registry.METHODS + (meth,))
    SEEN.clear()
    return SEEN


@pytest.mark.parametrize("n", [1, 2])
def test_node_limits_threads(head_files, tmp_path, probe, n):
    from nipype.pipeline import engine as pe

    from qsmflow.algorithms._threads import fft_workers
    from qsmflow.interfaces.qsm import Inversion

    assert threadpool_info(), "no BLAS/OpenMP pool loaded: the test would prove nothing"
    before = [p["num_threads"] for p in threadpool_info()]
    node = pe.Node(
        Inversion(
            method="probe", field=head_files["localfield"], mask=head_files["mask"], n_threads=n
        ),
        name=f"probe{n}",
        base_dir=str(tmp_path),
        n_procs=n,
    )
    res = node.run()
    assert all(t == n for t in probe["pools"]), probe["pools"]
    assert probe["fft_workers"] == n and probe["scipy_default_workers"] == n
    if probe["torch"] is not None:
        assert probe["torch"] == n
    # restored after the node
    assert [p["num_threads"] for p in threadpool_info()] == before and fft_workers() == -1
    assert json.loads(open(res.outputs.sidecar).read())["method"] == "probe"


def test_stage_without_limit_uses_every_core(head_files, tmp_path, probe):
    """qsmflow-stage sets no limit: the method sees the defaults (all CPUs for the FFTs)."""
    from qsmflow.cli.stage import main

    assert (
        main(
            [
                "invert",
                "--method",
                "probe",
                "--localfield",
                head_files["localfield"],
                "--mask",
                head_files["mask"],
                "-o",
                str(tmp_path / "x.nii.gz"),
            ]
        )
        == 0
    )
    assert probe["fft_workers"] == -1
