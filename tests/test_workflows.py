"""Graph construction (option grid, every preset), config files, BIDS discovery."""

import itertools
import shutil
from pathlib import Path

import pytest

from qsmflow import __version__, registry
from qsmflow.bids_input import collect_runs, find_runs
from qsmflow.config import (
    ConfigError,
    config_from_dict,
    list_presets,
    load_config_file,
    load_preset,
    preset_dir,
    to_toml,
)
from qsmflow.sims.bids import write_bids_dataset
from qsmflow.workflows.base import init_qsmflow_wf, top_workflow_name
from qsmflow.workflows.qsm import INPUT_FIELDS, OUTPUT_FIELDS, init_qsm_wf

REPO = Path(__file__).resolve().parents[1]


def test_presets_shipped_once_and_dumped_editable(tmp_path, capsys):
    from qsmflow.cli.run import main

    names = list_presets()
    assert {"fast", "accurate", "dip-gpu", "dip-cpu"} <= set(names)
    assert not (REPO / "workflows/presets").exists()  # one copy: the packaged one
    for n in names:
        assert main(["--dump-preset", n]) == 0
        text = capsys.readouterr().out
        assert text == (preset_dir() / f"{n}.toml").read_text()
        edited = tmp_path / f"{n}.toml"
        edited.write_text(text.replace("seed = 0", "seed = 5"))
        cfg = load_config_file(edited)
        assert cfg.resolved() == load_preset(n).resolved() and cfg.seed == 5
    assert main(["--dump-preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert not (REPO / "workflows/plugins").exists()  # one copy: the packaged one


def _nodes(wf):
    return {n.name: n for n in wf._get_all_nodes()}


@pytest.mark.parametrize("preset", ["fast", "accurate", "dip-gpu", "dip-cpu"])
def test_every_preset_builds(preset):
    cfg = load_preset(preset)
    wf = init_qsm_wf(config=cfg, n_echoes=4, use_gpu=True)
    nodes = _nodes(wf)
    assert {"prepare", "mask", "fieldmap", "bfr", "invert", "reference"} <= set(nodes)
    assert set(nodes["inputnode"].inputs.copyable_trait_names()) >= set(INPUT_FIELDS)
    assert set(nodes["outputnode"].outputs.copyable_trait_names()) >= set(OUTPUT_FIELDS)
    inv = nodes["invert"]
    assert inv.inputs.method == cfg.method("invert")
    assert inv.is_gpu_node() == (preset == "dip-gpu")
    for n in nodes.values():
        assert n.mem_gb > 0 and n.n_procs >= 1
    wf._create_flat_graph()  # connections are valid


@pytest.mark.parametrize(
    "mask,bfr,inv",
    list(
        itertools.product(
            registry.methods_for("mask"),
            registry.methods_for("bfr"),
            registry.methods_for("invert"),
        )
    ),
)
def test_option_grid(mask, bfr, inv):
    """Every registered combination builds, and every node gets the inputs its method takes."""
    wf = init_qsm_wf(mask=mask, bfr=bfr, inversion=inv, unwrap="laplacian", omp_nthreads=2)
    nodes = _nodes(wf)
    for stage, node in (("mask", "mask"), ("bfr", "bfr"), ("invert", "invert")):
        meth = registry.method(stage, nodes[node].inputs.method)
        wired = {
            dst for *_, d in wf._graph.in_edges(nodes[node], data=True) for _, dst in d["connect"]
        }
        assert meth.required_inputs - {"voxel_size"} <= wired
        assert wired <= meth.inputs
        assert ({"te_s", "b0_tesla", "magnitude"} & meth.inputs) <= wired | {"voxel_size"}
    assert nodes["mask"].inputs.method == mask and nodes["bfr"].inputs.method == bfr
    assert nodes["invert"].inputs.method == inv
    assert nodes["fieldmap"].inputs.settings["unwrap"] == "laplacian"
    assert nodes["bfr"].n_procs == 2


def test_hash_ignores_resources_but_not_seed():
    from qsmflow.interfaces.qsm import Inversion

    a = Inversion(method="rts", seed=1)
    h = a.inputs.get_hashval()[1]
    b = Inversion(method="rts", seed=1, use_gpu=True, device="cuda", n_threads=8)
    assert b.inputs.get_hashval()[1] == h
    assert Inversion(method="rts", seed=2).inputs.get_hashval()[1] != h
    assert Inversion(method="rts", seed=1, settings={"max_iter": 5}).inputs.get_hashval()[1] != h


def test_node_hash_covers_every_default_and_the_code_version(monkeypatch):
    """Issue 21: a node hashed only the settings a user set, so a changed default (a release)
    reused the cached map while its sidecar recorded the new default.  Now the node gets every
    setting with the defaults merged, plus the code's version; both change the hash."""
    from qsmflow.interfaces.qsm import Inversion

    def invert_hash():
        node = _nodes(init_qsm_wf())["invert"]
        return node.inputs.settings, node.inputs.get_hashval()[1]

    settings, h = invert_hash()
    assert settings["lsmr_iter"] == "auto" and settings["delta"] == 0.15  # defaults included
    assert not set(settings) & set(registry.NODE_PARAMETERS)  # resources stay the node's
    assert invert_hash()[1] == h  # deterministic
    rts = registry.method("invert", "rts")
    changed = {**rts.defaults, "delta": 0.2}
    original = type(rts).defaults.fget
    monkeypatch.setattr(
        type(rts), "defaults", property(lambda m: changed if m is rts else original(m))
    )
    assert invert_hash()[1] != h  # a changed default re-runs the node
    monkeypatch.undo()
    assert invert_hash()[1] == h
    monkeypatch.setattr(registry, "code_version", lambda: "another-release")
    assert invert_hash()[1] != h  # so does new code
    assert (
        Inversion(method="rts", code_version="a").inputs.get_hashval()[1]
        != (Inversion(method="rts", code_version="b").inputs.get_hashval()[1])
    )


def test_phase_only_and_few_echoes_substitutions():
    cfg = load_preset("accurate").with_methods(combine="complexfit")
    nodes = _nodes(init_qsm_wf(config=cfg, has_magnitude=False))
    assert nodes["mask"].inputs.method == "phase-quality"
    assert nodes["fieldmap"].inputs.method == "wls"
    nodes = _nodes(init_qsm_wf(config=cfg, n_echoes=2))
    assert nodes["fieldmap"].inputs.method == "wls"
    assert nodes["r2star"].inputs.method == "nlls"  # the accurate preset's R2* fit
    # R2*/T2* need the magnitude of 2 echoes or more: no node, and the plan says why
    from qsmflow.plan import plan_run

    for kw in ({"has_magnitude": False}, {"n_echoes": 1}):
        assert "r2star" not in _nodes(init_qsm_wf(config=cfg, **kw))
        plan = plan_run(cfg, **kw)
        assert "r2star" not in plan.sidecar_methods()
        assert any("no R2*/T2* maps" in n for n in plan.notes)


def test_config_roundtrip_and_errors(tmp_path):
    cfg = load_preset("accurate").with_methods(invert="medi")
    p = tmp_path / "c.toml"
    p.write_text(to_toml(cfg))
    back = load_config_file(p)
    assert back.resolved() == cfg.resolved()
    with pytest.raises(ConfigError, match="unknown method"):
        config_from_dict({"invert": {"method": "nope"}})
    with pytest.raises(ConfigError, match="unknown parameter 'bogus'"):
        config_from_dict({"invert": {"method": "tv", "tv": {"bogus": 1}}})
    with pytest.raises(ConfigError, match="device"):
        config_from_dict({"execution": {"device": "tpu"}})


def test_top_workflow_bids_discovery_sessions_runs(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["garbage", "--nonsense"])  # factories never read argv
    bids = write_bids_dataset(
        tmp_path / "b",
        subjects=("01", "02"),
        shape=(16, 16, 16),
        voxel_size=(4.0, 4.0, 4.0),
        te_s=(0.004, 0.008),
    )
    a = bids / "sub-02" / "anat"
    # sub-02: two sessions, second session with 2 runs and phase only; sub-01 single echo
    for ses, run in (("1", None), ("2", "1"), ("2", "2")):
        d = bids / "sub-02" / f"ses-{ses}" / "anat"
        d.mkdir(parents=True, exist_ok=True)
        for f in a.iterdir():
            if ses == "2" and "part-mag" in f.name:
                continue
            ent = f"sub-02_ses-{ses}" + (f"_run-{run}" if run else "")
            shutil.copy(f, d / f.name.replace("sub-02", ent))
    shutil.rmtree(a)
    a1 = bids / "sub-01" / "anat"
    for f in list(a1.iterdir()):
        if "echo-2" in f.name:
            f.unlink()
        else:
            f.rename(f.with_name(f.name.replace("_echo-1", "")))
    runs = collect_runs(bids)
    got = {(r.bids_prefix, r.n_echoes, r.has_magnitude) for r in runs}
    assert got == {
        ("sub-01", 1, True),
        ("sub-02_ses-1", 2, True),
        ("sub-02_ses-2_run-1", 2, False),
        ("sub-02_ses-2_run-2", 2, False),
    }
    assert all(r.te_s and r.b0_tesla == 3.0 and len(r.b0_dir) == 3 for r in runs)
    assert [r.bids_prefix for r in find_runs(bids, session_labels=["ses-1"])] == ["sub-02_ses-1"]
    wf = init_qsmflow_wf(runs=runs, output_dir=tmp_path / "o", bids_dir=bids)
    major, minor = __version__.split(".")[:2]
    assert wf.name == top_workflow_name() == f"qsmflow_{major}_{minor}_wf"
    names = wf.list_node_names()
    assert "sub_02_wf.qsm_run_ses2_run2_wf.invert" in names
    assert "sub_02_wf.ds_run_ses2_run1" in names
    wf._create_flat_graph()
