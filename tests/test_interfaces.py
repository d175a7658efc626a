"""Each Nipype interface on tiny simulated images, checked against the simulated truth."""

import json
import sys

import nibabel as nib
import numpy as np
import pytest

from qsmflow.interfaces.derivatives import DerivativesWriter
from qsmflow.interfaces.qsm import (
    BackgroundRemoval,
    FieldMap,
    Inversion,
    Mask,
    PreparePhase,
    Reference,
    Unwrap,
)
from qsmflow.provenance import methods_text
from qsmflow.sims.bids import truth_paths, write_bids_dataset

qsm_eval = pytest.importorskip("qsm_ci.qsm_eval")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ifc")
    bids = write_bids_dataset(
        root / "bids",
        subjects=("01",),
        shape=(32, 32, 32),
        voxel_size=(2.0, 2.0, 2.0),
        te_s=(0.004, 0.012),
        phase_as_int=True,
        oblique_deg=10.0,
    )
    anat = bids / "sub-01" / "anat"
    return {
        "root": root,
        "phase": sorted(str(p) for p in anat.glob("*part-phase_MEGRE.nii.gz")),
        "mag": sorted(str(p) for p in anat.glob("*part-mag_MEGRE.nii.gz")),
        "truth": truth_paths(bids, "01"),
    }


def _arr(p):
    return np.asarray(nib.load(p).dataobj)


def _run(iface, tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    return iface.run(cwd=str(d)).outputs


def test_chain_of_stage_interfaces(data, tmp_path):
    torch_before = "torch" in sys.modules  # other test modules may have imported it
    ref = nib.load(data["phase"][0])
    prep = _run(
        PreparePhase(phase_files=data["phase"], magnitude_files=data["mag"]), tmp_path, "prep"
    )
    ph = nib.load(prep.phase)
    assert ph.shape == (32, 32, 32, 2) and np.allclose(ph.affine, ref.affine, atol=1e-6)
    assert np.abs(ph.get_fdata()).max() <= np.pi + 1e-3
    assert "integer phase [-4096, 4096)" in prep.phase_scaling
    assert abs(np.dot(prep.b0_dir, [0, 0, 1])) < 0.999  # oblique slab: B0 not along z

    mask = _run(Mask(method="bet", magnitude=prep.magnitude), tmp_path, "mask").mask
    m, tm = _arr(mask) > 0, _arr(data["truth"]["desc-brain_mask"]) > 0
    assert (m & tm).sum() / (m | tm).sum() > 0.8  # Jaccard vs the true brain

    fm = _run(
        FieldMap(
            method="wls",
            phase=prep.phase,
            magnitude=prep.magnitude,
            mask=mask,
            te_s=[0.004, 0.012],
            b0_tesla=3.0,
            settings={"unwrap": "romeo"},
        ),
        tmp_path,
        "field",
    )
    f, tot = _arr(fm.field), _arr(data["truth"]["desc-total_fieldmap"])
    r = (f - tot)[m]
    assert np.median(np.abs(r - np.median(r))) < 0.05  # ppm; total field spans ~1 ppm

    uw = _run(
        Unwrap(
            method="romeo",
            phase=prep.phase,
            magnitude=prep.magnitude,
            mask=mask,
            te_s=[0.004, 0.012],
        ),
        tmp_path,
        "unwrap",
    )
    u = _arr(uw.unwrapped)
    assert u.shape == (32, 32, 32, 2)
    d = np.angle(np.exp(1j * (u - ph.get_fdata())))
    assert np.abs(d[m]).max() < 1e-3  # ROMEO is congruent with the wrapped phase

    # background removal and inversion from the true total field / local field
    bf = _run(
        BackgroundRemoval(
            method="vsharp",
            field=str(data["truth"]["desc-total_fieldmap"]),
            mask=str(data["truth"]["desc-brain_mask"]),
        ),
        tmp_path,
        "bfr",
    )
    em = _arr(bf.mask) > 0
    assert em.sum() < tm.sum() and em.any()
    loc = _arr(data["truth"]["desc-local_fieldmap"])
    assert qsm_eval.correlation(_arr(bf.local_field), loc, em) > 0.5

    inv = _run(
        Inversion(
            method="rts",
            field=str(data["truth"]["desc-local_fieldmap"]),
            mask=str(data["truth"]["desc-brain_mask"]),
            b0_dir=prep.b0_dir,
        ),
        tmp_path,
        "inv",
    )
    rf = _run(
        Reference(method="mean", chi=inv.chi, mask=str(data["truth"]["desc-brain_mask"])),
        tmp_path,
        "ref",
    )
    chi, truth = _arr(rf.chi), _arr(data["truth"]["Chimap"])
    assert abs(chi[tm].mean()) < 1e-4
    nrmse = qsm_eval.nrmse_challenge(chi, truth, tm)[0]
    assert nrmse < 60, nrmse  # RTS from the true local field at 2 mm: ~45-50 %
    assert torch_before or "torch" not in sys.modules  # classical stages never import torch

    # derivatives writer
    out = tmp_path / "deriv"
    ds = _run(
        DerivativesWriter(
            output_dir=str(out),
            prefix="sub-01_ses-a_run-1",
            session="a",
            chi=rf.chi,
            mask=bf.mask,
            total_field=fm.field,
            local_field=bf.local_field,
            metadata={"RandomSeed": 3},
            chi_unreferenced=inv.chi,
            magnitude=prep.magnitude,
            phase_scaling=prep.phase_scaling,
            source_files=["x"],
        ),
        tmp_path,
        "ds",
    )
    names = sorted(p.split("/")[-1] for p in ds.out_files)
    assert names == sorted(
        f"sub-01_ses-a_run-1_{s}.{e}"
        for s in (
            "Chimap",
            "desc-brain_mask",
            "desc-total_fieldmap",
            "desc-local_fieldmap",
            "desc-total_magnitude",
            "desc-local_magnitude",
        )
        for e in ("nii.gz", "json")
    )
    ses = out / "sub-01" / "ses-a"
    for p in ds.out_files:  # fieldmaps and their magnitude in fmap/ (BIDS), the rest in anat/
        assert p.startswith(
            str(ses / ("fmap" if "_desc-total_" in p or "_desc-local_" in p else "anat"))
        )
    side = json.loads((ses / "anat/sub-01_ses-a_run-1_Chimap.json").read_text())
    assert side["Units"] == "ppm" and side["RandomSeed"] == 3 and side["Sources"] == ["x"]
    assert isinstance(side["SoftwareVersions"], str) and side["SkullStripped"] is True
    # the offset the reference step subtracted (mean reference: the mean of chi in its mask)
    assert side["ReferenceOffset"] == pytest.approx(float(_arr(inv.chi)[tm].mean()), abs=1e-5)
    mag = _arr(ses / "fmap/sub-01_ses-a_run-1_desc-local_magnitude.nii.gz")
    np.testing.assert_allclose(mag, _arr(prep.magnitude).mean(axis=3), rtol=1e-5)
    assert np.allclose(_arr(ds.chi), chi)


def test_inversion_modip_writes_std_and_loss_curve(data, tmp_path):
    """MoDIP through the interface: seed and device reach it, the ensemble std map and the loss
    curve (with the stop reason and seeds) are written next to chi."""
    pytest.importorskip("torch")
    t = data["truth"]
    res = _run(
        Inversion(
            method="modip",
            field=str(t["desc-local_fieldmap"]),
            mask=str(t["desc-brain_mask"]),
            seed=7,
            device="cpu",
            settings={"max_iter": 4, "ensemble": 2, "threads": 1},
        ),
        tmp_path,
        "dip",
    )
    side = json.loads(open(res.sidecar).read())
    assert side["seeds"][0] == 7 and len(side["seeds"]) == 2 and side["device"] == "cpu"
    assert side["stopped_reason"] and side["method"] == "modip"
    rows = open(res.loss).read().splitlines()
    assert rows[0].split("\t")[:4] == ["member", "seed", "iteration", "loss"]
    assert len(rows) - 1 >= 4 and all(np.isfinite(float(r.split("\t")[3])) for r in rows[1:])
    std = np.asarray(nib.load(res.std).dataobj)
    mask = np.asarray(nib.load(str(t["desc-brain_mask"])).dataobj) > 0
    assert std.shape == (32, 32, 32) and std[mask].mean() > 0  # two seeds differ


def test_methods_text_cites_only_steps_run():
    from qsmflow.config import default_config
    from qsmflow.plan import plan_run

    cfg = default_config().with_methods(mask="bet", bfr="pdf", invert="tkd")
    plan = plan_run(cfg.with_settings("combine", unwrap="laplacian"))
    txt = methods_text(plan, version="0.1.0")
    assert "Shmueli" in txt and "Schofield" in txt and "projection onto dipole" in txt
    assert "Kames" not in txt and "ROMEO" not in txt.split("## References")[1]
    # every setting the run used is in the text, the defaults included
    assert "unwrap=laplacian" in txt and f"threshold={plan.settings('invert')['threshold']}" in txt


@pytest.mark.parametrize("stage", ["unwrap", "combine", "mask", "bfr", "invert", "reference"])
def test_each_stage_interface_declares_its_own_images(stage):
    """One class per stage: it advertises exactly the stage's images (the registry's
    ``requires`` mandatory, ``accepts`` optional) and outputs, so a missing input is an error
    when the node is built, not when it runs."""
    from qsmflow import registry
    from qsmflow.interfaces.qsm import STAGE_INTERFACES

    st = registry.stage(stage)
    iface = STAGE_INTERFACES[stage]
    spec = iface.input_spec()
    images = {n for n in spec.copyable_trait_names() if n in registry.IMAGE_INPUTS}
    assert images == set(st.requires + st.accepts)
    for name in images:
        assert bool(spec.traits()[name].mandatory) == (name in st.requires), name
    outputs = set(iface.output_spec().copyable_trait_names())
    assert outputs == {st.produces, *st.extras, "loss", "sidecar"}
    assert iface.__module__ == "qsmflow.interfaces.qsm" and iface.__name__ in dir(
        sys.modules["qsmflow.interfaces.qsm"]
    )


def test_inversion_without_its_field_is_refused_before_running(tmp_path):
    """A mandatory image left out is Nipype's error, naming the input."""
    iface = Inversion(method="tkd", mask=__file__)
    with pytest.raises(ValueError, match="field"):
        iface.run(cwd=str(tmp_path))
