"""The atlas-statistics node of a run (issue 23), connected after the reference stage.

:func:`connect_atlas` adds one :class:`~qsmflow.interfaces.atlas.AtlasStats` node to a subject
workflow: inputs from the run's QSM workflow (chi, masks, magnitude, and R2* when that
workflow provides it), outputs to the derivatives writer (table and sidecar) and to the run's
report (its HTML block and status).  :func:`atlas_plan` says whether the node is added: the
``[atlas]`` settings (``enabled``), the data (a magnitude is needed) and the optional packages
(``pip install "qsmflow[atlas]"``); when it is not, a one-line note says why.
"""

from __future__ import annotations

from nipype.pipeline import engine as pe


def atlas_plan(settings: dict | None, *, has_magnitude: bool = True) -> tuple[dict | None, str]:
    """``(settings to run with, "")`` or ``(None, note saying why the step is skipped)``."""
    from qsmflow.atlas import availability, resolved_atlas_settings

    s = resolved_atlas_settings(settings)
    if not s["enabled"]:
        return None, "atlas statistics off ([atlas] enabled = false or --no-atlas)"
    if not has_magnitude:
        return None, "atlas statistics skipped: phase-only data (no magnitude to register)"
    missing = availability()
    if missing:
        return None, "atlas statistics skipped: " + missing
    return s, ""


def connect_atlas(
    wf: pe.Workflow,
    qsm_wf: pe.Workflow,
    *,
    settings: dict,
    node_name: str,
    reference: str = "",
    seed: int = 0,
    omp_nthreads: int = 1,
    mem_gb: float = 0.1,
    writer=None,
    report=None,
) -> pe.Node:
    """Add the atlas node of one run to ``wf`` and connect it.

    ``qsm_wf`` is the run's QSM workflow (its ``outputnode``: chi, mask, brain_mask,
    magnitude, and r2star when it has that field); ``writer`` the run's
    :class:`~qsmflow.interfaces.derivatives.DerivativesWriter` (``atlas_table``,
    ``atlas_sidecar``), ``report`` its :class:`~qsmflow.interfaces.qc.RunReport`
    (``atlas_fragment``, ``atlas_status``); ``reference`` the region chi is relative to.
    """
    from qsmflow import registry
    from qsmflow.interfaces.atlas import AtlasStats

    node = pe.Node(
        AtlasStats(
            atlas=settings["atlas"],
            transform=settings["transform"],
            image=settings["image"],
            reference=reference,
            seed=int(seed),
            code_version=registry.code_version(),
            n_threads=max(int(omp_nthreads), 1),
        ),
        name=node_name,
        # ANTs holds the 1 mm template, its gradients and the warp fields: ~1.5 GB at 1 mm
        mem_gb=1.5 + 4 * float(mem_gb),
        n_procs=max(int(omp_nthreads), 1),
    )
    fields = ["chi", "mask", "brain_mask", "magnitude"]
    if hasattr(qsm_wf.get_node("outputnode").inputs, "r2star"):
        fields.append("r2star")
    wf.connect([(qsm_wf, node, [(f"outputnode.{f}", f) for f in fields])])
    if writer is not None:
        wf.connect([(node, writer, [("table", "atlas_table"), ("sidecar", "atlas_sidecar")])])
    if report is not None:
        wf.connect([(node, report, [("fragment", "atlas_fragment"), ("status", "atlas_status")])])
    return node


def add_run_atlas(
    wf: pe.Workflow,
    qsm_wf: pe.Workflow,
    *,
    run,
    config,
    meta: dict,
    writer=None,
    report=None,
    omp_nthreads: int = 1,
    mem_gb: float = 0.1,
) -> pe.Node | None:
    """:func:`connect_atlas` for one MEGRE run of a subject workflow, when :func:`atlas_plan`
    allows it (``config.atlas``, the run's magnitude); None otherwise.  ``meta`` is the run's
    Chimap provenance (reference region, seed)."""
    from qsmflow.interfaces.derivatives import chimap_qmri_keys

    settings, _ = atlas_plan(getattr(config, "atlas", None), has_magnitude=run.has_magnitude)
    if settings is None:
        return None
    return connect_atlas(
        wf,
        qsm_wf,
        settings=settings,
        node_name=f"atlas_{run.node_name}",
        reference=chimap_qmri_keys(meta).get("ReferenceRegion", ""),
        seed=int(meta.get("RandomSeed", 0)),
        omp_nthreads=omp_nthreads,
        mem_gb=mem_gb,
        writer=writer,
        report=report,
    )
