"""The method registry and the one stage runner: every registered method gives the same map
through both front ends, the pipeline gives methods the inputs their signatures take (real TE
and B0 for MEDI/NDI, the magnitude for MoDIP's MEDI start), every citation reaches methods.md."""

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmflow import registry
from qsmflow.cli.stage import main as stage_main
from qsmflow.references import REFERENCES

TE = (0.004, 0.008, 0.012)
B0 = 7.0  # not 3 T: a method that assumes 3 T gives a different map
VOX = 2.0
#: small settings of the slow methods (the test is about wiring, not accuracy)
FAST = {
    ("invert", "modip"): {"max_iter": 3, "base": 4},
    ("invert", "dip"): {"max_iter": 3, "base": 4, "depth": 1, "in_channels": 2},
    ("invert", "inr"): {"max_iter": 3, "hidden": 16, "layers": 2},
    ("invert", "medi"): {"max_iter": 2, "cg_max_iter": 10},
    ("invert", "ndi"): {"maxit": 10},
    ("invert", "tv"): {"max_iter": 10},
    ("bfr", "lbv"): {"max_iter": 50},
}


@pytest.fixture(scope="module")
def files(head_files):
    head = head_files["head"]
    assert head.te_s == TE and head.b0_tesla == B0 and head.voxel_size == (VOX,) * 3
    return head_files


def _arr(p):
    return np.asarray(nib.load(str(p)).dataobj)


#: stage -> (CLI flags, interface inputs) of the image inputs
_STAGE_INPUTS = {
    "unwrap": {"phase": "phase", "magnitude": "magnitude", "mask": "mask"},
    "combine": {"phase": "phase", "magnitude": "magnitude", "mask": "mask"},
    "mask": {"magnitude": "magnitude", "phase": "phase"},
    "bfr": {"totalfield": "field", "mask": "mask"},
    "invert": {"localfield": "field", "mask": "mask", "magnitude": "magnitude"},
    "reference": {
        "chimap": "chi",
        "mask": "mask",
        "magnitude": "magnitude",
        "csf-mask": "csf_mask",
    },
    "r2star": {"magnitude": "magnitude", "mask": "mask"},
}


@pytest.mark.parametrize("stage,name", [(m.stage, m.name) for m in registry.METHODS])
def test_every_method_same_map_through_both_front_ends(files, tmp_path, stage, name):
    """qsmflow-stage and the Nipype interface run the registry's method the same way."""
    from qsmflow.interfaces.qsm import STAGE_INTERFACES

    meth = registry.method(stage, name)
    if meth.gpu:
        pytest.importorskip("torch")
    settings = FAST.get((stage, name), {})
    flags = [
        stage,
        "--method",
        name,
        "--te",
        *map(str, TE),
        "--b0",
        str(B0),
        "-o",
        str(tmp_path / "cli" / "out.nii.gz"),
    ]
    ifc_inputs = {
        "method": name,
        "settings": settings,
        "te_s": list(TE),
        "b0_tesla": B0,
        "n_threads": 1,
    }
    for flag, trait in _STAGE_INPUTS[stage].items():
        flags += [f"--{flag}", files[flag]]
        ifc_inputs[trait] = files[flag]
    if meth.gpu:
        settings = {**settings, "device": "cpu", "threads": 1}  # same torch reduction order
        ifc_inputs["settings"] = settings
    for k, v in settings.items():
        flags += ["--set", f"{k}={v}"]
    assert stage_main(flags) == 0
    cli = _arr(tmp_path / "cli" / "out.nii.gz")

    (tmp_path / "ifc").mkdir()
    iface = STAGE_INTERFACES[stage](**ifc_inputs)
    res = iface.run(cwd=str(tmp_path / "ifc")).outputs
    main = getattr(res, registry.stage(stage).produces)
    ours = _arr(main)
    assert cli.shape == ours.shape and cli.dtype == ours.dtype
    assert np.abs(cli.astype(float)).max() > 0
    np.testing.assert_array_equal(cli, ours)
    assert Path(res.sidecar).is_file()


def _run_pipeline(tmp_path, *, inversion, settings=None, n_echoes=3):
    """The QSM workflow on the simulated MEGRE data at 7 T; returns its inversion node's
    inputs and chi map."""
    from qsmflow.config import default_config
    from qsmflow.workflows.qsm import init_qsm_wf

    bids = tmp_path / "bids"
    from qsmflow.sims.bids import write_bids_dataset

    write_bids_dataset(
        bids,
        subjects=("01",),
        shape=(24, 24, 24),
        voxel_size=(VOX,) * 3,
        te_s=TE[:n_echoes],
        b0_tesla=B0,
    )
    anat = bids / "sub-01" / "anat"
    cfg = default_config().with_methods(invert=inversion)
    if settings:
        cfg.stages["invert"].settings[inversion] = dict(settings)
    wf = init_qsm_wf(config=cfg, n_echoes=n_echoes)
    wf.base_dir = str(tmp_path / "work")
    wf.inputs.inputnode.phase_files = sorted(str(p) for p in anat.glob("*part-phase*.nii.gz"))
    wf.inputs.inputnode.magnitude_files = sorted(str(p) for p in anat.glob("*part-mag*.nii.gz"))
    wf.inputs.inputnode.te_s = list(TE[:n_echoes])
    wf.inputs.inputnode.b0_tesla = B0
    graph = wf.run()
    node = next(n for n in graph.nodes() if n.name == "invert")
    return node, _arr(node.result.outputs.chi)


@pytest.mark.parametrize("inversion", ["medi", "ndi"])
def test_medi_ndi_in_the_pipeline_get_real_te_and_b0(tmp_path, inversion):
    """The pipeline passes TE and B0 to MEDI/NDI: its map equals qsmflow-stage's with the same
    TE/B0 and differs from qsmflow-stage's without them (3 T, unit echo spacing)."""
    settings = FAST[("invert", inversion)]
    node, chi = _run_pipeline(tmp_path, inversion=inversion, settings=settings)
    ins = node.inputs
    assert list(ins.te_s) == list(TE) and ins.b0_tesla == B0
    base = [
        "invert",
        "--method",
        inversion,
        "--localfield",
        ins.field,
        "--mask",
        ins.mask,
        "--magnitude",
        ins.magnitude,
        "--b0-dir",
        *map(str, ins.b0_dir),
    ]
    base += [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    assert (
        stage_main(
            base + ["--te", *map(str, TE), "--b0", str(B0), "-o", str(tmp_path / "with.nii.gz")]
        )
        == 0
    )
    np.testing.assert_array_equal(chi, _arr(tmp_path / "with.nii.gz"))
    assert stage_main(base + ["-o", str(tmp_path / "without.nii.gz")]) == 0
    assert np.abs(chi - _arr(tmp_path / "without.nii.gz")).max() > 1e-4


def test_modip_medi_start_runs_in_the_pipeline(tmp_path):
    """MoDIP with init=medi needs the magnitude; the pipeline gives it (tiny iteration count)."""
    pytest.importorskip("torch")
    node, chi = _run_pipeline(
        tmp_path, inversion="modip", settings={"init": "medi", "max_iter": 2, "base": 4}
    )
    assert Path(node.inputs.magnitude).is_file()
    mask = _arr(node.inputs.mask) > 0
    assert np.isfinite(chi).all() and np.abs(chi[mask]).max() > 0


def test_every_citation_is_in_the_bibliography_and_in_methods_text():
    from qsmflow.config import default_config
    from qsmflow.plan import plan_run
    from qsmflow.provenance import methods_text

    for m in registry.METHODS:
        assert set(m.citations) <= set(REFERENCES), m.name
        for key in m.citations:
            assert f"[{key}" in m.sentence or f"; {key}]" in m.sentence, (m.name, key)
    base = default_config().with_methods(mask="bet", bfr="lbv", invert="rts")
    for m in registry.METHODS:
        if m.stage in ("unwrap", "r2star"):  # r2star: its own methods text (issue 23)
            continue
        refs = methods_text(plan_run(base.with_methods(**{m.stage: m.name})), version="x")
        for key in m.citations:
            assert REFERENCES[key] in refs.split("## References")[1], (m.name, key)
    for name in registry.methods_for("unwrap"):
        plan = plan_run(base.with_settings("combine", unwrap=name))
        refs = methods_text(plan, version="x").split("## References")[1]
        assert all(REFERENCES[k] in refs for k in registry.method("unwrap", name).citations)


def test_the_unwrappers_are_listed_once():
    """The spatial unwrappers: the registry's `unwrap` stage lists exactly the algorithms'
    list (what the field mapping's `unwrap` setting accepts), and a setting named after a
    stage is checked against that stage's methods before anything runs."""
    from qsmflow.algorithms.unwrap import SPATIAL_UNWRAPPERS
    from qsmflow.config import ConfigError, config_from_dict

    assert tuple(registry.methods_for("unwrap")) == SPATIAL_UNWRAPPERS
    wls = registry.method("combine", "wls")
    assert wls.check_types({"unwrap": "laplacian"}, where="x") == []
    assert "expected one of romeo, laplacian" in wls.check_types({"unwrap": "nope"}, where="x")[0]
    with pytest.raises(ConfigError, match="unwrap = 'nope'"):
        config_from_dict({"combine": {"method": "wls", "wls": {"unwrap": "nope"}}})
    with pytest.raises(ConfigError, match=r"\[unwrap\] is a setting of the field mapping"):
        config_from_dict({"unwrap": {"method": "romeo"}})


def test_registry_defaults_come_from_the_signature():
    tv = registry.method("invert", "tv")
    assert tv.defaults["max_iter"] == 150 and "field" not in tv.defaults
    assert {"magnitude", "noise"} <= tv.inputs and "te_s" not in tv.inputs
    assert {"te_s", "b0_tesla", "magnitude"} <= registry.method("invert", "medi").inputs
    assert "magnitude" in registry.method("invert", "modip").inputs
    assert registry.method("combine", "wls").required_inputs >= {"phase", "te_s"}
    with pytest.raises(ValueError, match="choose from"):
        registry.method("invert", "nope")
    with pytest.raises(ValueError, match="unknown parameter"):
        tv.check_settings({"lambda": 1})


def test_settings_are_read_by_the_declared_type():
    """`none` is None only where the signature allows None (annotation names None or the
    default is None); a string parameter keeps the text: `--set`, TOML files and presets."""
    from qsmflow.config import config_from_dict, to_toml
    from qsmflow.config import tomllib as cfg_toml

    def read(stage, name, key, text):
        meth = registry.method(stage, name)
        return registry.coerce_setting(text, meth.defaults[key], meth.parameters[key])

    # str parameters (MoDIP's warm start `init`, complexfit's `unwrap`) keep the text "none"
    assert read("invert", "modip", "init", "none") == "none"
    assert read("combine", "complexfit", "unwrap", "none") == "none"
    assert read("invert", "tkd", "kernel", "null") == "null"
    # `float | str | None` and `Sequence[int] | None`: None; numbers and names as declared
    assert read("invert", "modip", "max_time_s", "none") is None
    assert read("invert", "modip", "max_time_s", "NULL") is None
    assert read("invert", "modip", "max_time_s", "auto") == "auto"
    assert read("invert", "modip", "max_time_s", "30") == 30.0
    assert read("invert", "modip", "seeds", "none") is None
    assert read("invert", "modip", "seeds", "3,4") == [3, 4]
    assert read("invert", "modip", "dc_steps", "5") == 5
    assert read("invert", "modip", "amp", "false") is False
    assert read("invert", "modip", "amp", "off") == "off"
    assert read("invert", "tv", "max_iter", "10") == 10
    assert read("invert", "tkd", "kernel", "1") == "1"  # a str parameter: no number
    # without the signature (a caller that knows only the default): the default's type, a
    # string default also taking a number; none is None only for a None default
    assert registry.coerce_setting("0.01", "auto") == 0.01
    assert registry.coerce_setting("none", "auto") == "none"
    assert registry.coerce_setting("none", None) is None
    assert registry.coerce_setting("true", False) is True
    # a wrong text is reported by the type check, not read as something else
    tv = registry.method("invert", "tv")
    bad = read("invert", "tv", "max_iter", "none")
    assert bad == "none" and tv.check_types({"max_iter": bad}, where="--set")
    # None is refused where the signature does not allow it
    modip = registry.method("invert", "modip")
    assert modip.check_types({"init": None}, where="x") != []
    assert modip.check_types({"max_time_s": None, "seeds": None}, where="x") == []

    # TOML has no null: "none" is None only for a parameter that takes None, and survives
    # the round trip through to_toml (which writes None as "none")
    cfg = config_from_dict(
        {
            "invert": {"method": "modip", "modip": {"init": "none", "max_time_s": "none"}},
            "combine": {"method": "complexfit", "complexfit": {"unwrap": "none"}},
        }
    )
    assert cfg.settings("invert") == {"init": "none", "max_time_s": None}
    assert cfg.settings("combine") == {"unwrap": "none"}
    again = config_from_dict(cfg_toml.loads(to_toml(cfg)))
    assert again.settings("invert") == cfg.settings("invert")
    assert again.settings("combine") == {"unwrap": "none"}


def test_omitted_stage_gets_the_default_preset_method():
    from qsmflow.config import config_from_dict, default_config

    cfg = config_from_dict({"invert": {"method": "tkd"}})
    for s in ("combine", "mask", "bfr", "reference"):
        assert cfg.method(s) == default_config().method(s)
    assert cfg.method("bfr") == "lbv-robust"


#: algorithm modules that need torch to be imported (the network itself; imported only inside
#: the network methods, after ``import_torch`` gave its one-line message)
TORCH_MODULES = ("qsmflow.algorithms.dip.unet",)
#: makes ``import torch`` fail in a subprocess, as on a machine without torch
_BLOCK_TORCH = (
    "import sys, importlib.abc\n"
    "class _NoTorch(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] == 'torch':\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, _NoTorch())\n"
    "sys.modules.pop('torch', None)\n"
)


def test_algorithms_import_neither_nipype_nor_config():
    """Every algorithm module imports without nipype, the config or the registry, and without
    torch (checked with torch blocked, so also where torch is installed), except the network
    module itself; the registry reads every method's signature without torch."""
    code = _BLOCK_TORCH + (
        "import pkgutil, importlib, qsmflow.algorithms as a\n"
        "needs_torch = []\n"
        "for m in pkgutil.walk_packages(a.__path__, 'qsmflow.algorithms.'):\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        if (exc.name or '').split('.')[0] != 'torch':\n"
        "            raise\n"
        "        needs_torch.append(m.name)\n"
        f"assert tuple(needs_torch) == {TORCH_MODULES!r}, needs_torch\n"
        "bad = [n for n in sys.modules if n.split('.')[0] in ('nipype', 'torch') "
        "or n in ('qsmflow.config', 'qsmflow.registry', 'qsmflow.runner')]\n"
        "assert not bad, bad\n"
        "from qsmflow import registry\n"
        "assert all(m.defaults is not None for m in registry.METHODS)\n"
        "assert 'torch' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_every_inversion_has_its_derivative_label_in_its_record():
    """The Chimap's EstimationAlgorithm comes from the method's registry record (no second
    table in interfaces/derivatives.py)."""
    from qsmflow.interfaces.derivatives import chimap_qmri_keys

    for name, meth in registry.methods_for("invert").items():
        assert meth.label and meth.label != name, name
        keys = chimap_qmri_keys({"QSMflowMethods": {"invert": {"Method": name}}})
        assert keys["EstimationAlgorithm"] == meth.label
    gone = chimap_qmri_keys({"QSMflowMethods": {"invert": {"Method": "retired"}}})
    assert gone["EstimationAlgorithm"] == "retired" and "EstimationReference" not in gone


def test_layers_import_only_downwards():
    """The layer table of CONTRIBUTING.md, as import-linter contracts (pyproject.toml): a
    report importing an interface, or an algorithm importing the registry, breaks it."""

    import shutil

    exe = shutil.which("lint-imports")
    assert exe, "import-linter is a test dependency (pip install '.[test]')"
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([exe], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "2 kept, 0 broken" in res.stdout


def test_a_new_inversion_is_its_function_and_one_registry_record(monkeypatch, capsys):
    """CONTRIBUTING.md "Add a method": the algorithm's function, one registry record, its
    test. A record added here (its function an existing one) reaches every front end with no
    other file touched: the stage command, configuration files, the run plan and the sidecar,
    the methods text with its citation, the workflow's inversion node and the Chimap's
    EstimationAlgorithm."""
    from qsmflow.config import config_from_dict
    from qsmflow.interfaces.derivatives import chimap_qmri_keys
    from qsmflow.plan import plan_run
    from qsmflow.provenance import methods_text
    from qsmflow.workflows.qsm import init_qsm_wf

    foo = registry.Method(
        "invert",
        "foo",
        "qsmflow.algorithms.inversion_direct:invert_tkd",
        ("tkd",),
        "Susceptibility was computed with foo inversion [tkd].",
        label="foo (a test inversion)",
    )
    monkeypatch.setattr(registry, "METHODS", (*registry.METHODS, foo))

    assert stage_main(["invert", "--list-methods"]) == 0
    assert "foo" in capsys.readouterr().out
    cfg = config_from_dict({"invert": {"method": "foo", "foo": {"threshold": 0.3}}})
    plan = plan_run(cfg)
    params = plan.sidecar_methods()["invert"]["Parameters"]
    assert plan.method("invert") == "foo" and params["threshold"] == 0.3
    assert params["kernel"] == "continuous"  # the defaults come from the function
    text = methods_text(plan, version="x")
    assert "computed with foo inversion [" in text and "Shmueli" in text
    node = init_qsm_wf(plan=plan).get_node("invert")
    assert node.inputs.method == "foo" and node.inputs.settings["threshold"] == 0.3
    keys = chimap_qmri_keys({"QSMflowMethods": plan.sidecar_methods()})
    assert keys["EstimationAlgorithm"] == "foo (a test inversion)"
    with pytest.raises(ValueError, match="unknown parameter"):
        config_from_dict({"invert": {"method": "foo", "foo": {"lam": 1}}})
