"""The QSM workflow of one multi-echo GRE run.

.. code-block:: text

    inputnode(phase_files, magnitude_files, te_s, b0_tesla)
      -> prepare (stack echoes, phase -> rad) -> mask -> fieldmap (unwrap + echo combination)
      -> bfr (background removal, eroded mask) -> invert -> reference -> outputnode
    prepare (magnitude) + mask -> r2star (R2* and T2* maps) -> outputnode

The factory only builds a graph: it takes keyword-only arguments and never reads argv or the
environment, so it can be connected into any Nipype workflow (see
``workflows/examples/compose_qsm_wf.py``).
"""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmflow.config import QSMConfig, default_config
from qsmflow.plan import RunPlan, plan_run

INPUT_FIELDS = ("phase_files", "magnitude_files", "te_s", "b0_tesla")
OUTPUT_FIELDS = (
    "chi",
    "mask",
    "brain_mask",
    "total_field",
    "local_field",
    "noise",
    "chi_std",
    "loss_history",
    "phase_scaling",
    "phase",
    "magnitude",
    "chi_unreferenced",
    "inversion_sidecar",
    "r2star",
    "t2star",
    "r2star_sidecar",
    "sidecars",
)


def init_qsm_wf(
    *,
    plan: RunPlan | None = None,
    config: QSMConfig | None = None,
    unwrap: str | None = None,
    combine: str | None = None,
    mask: str | None = None,
    bfr: str | None = None,
    inversion: str | None = None,
    reference: str | None = None,
    has_magnitude: bool = True,
    n_echoes: int | None = None,
    seed: int | None = None,
    use_gpu: bool = False,
    device: str | None = None,
    omp_nthreads: int = 1,
    mem_gb: float = 0.1,
    name: str = "qsm_wf",
) -> pe.Workflow:
    """Build the QSM workflow of one run.

    Parameters
    ----------
    plan : RunPlan, optional
        The resolved run (:func:`qsmflow.plan.plan_run`): every method and setting. When
        given, ``config``, the method choices, ``has_magnitude``, ``n_echoes`` and ``seed``
        are not used (they are how the plan is made otherwise).
    config : QSMConfig, optional
        Methods and settings (default: the ``fast`` preset).
    combine, mask, bfr, inversion, reference : str, optional
        Override the method of one stage (settings of that method come from ``config``).
    unwrap : str, optional
        The field mapping's spatial unwrapper (its ``unwrap`` setting).
    has_magnitude : bool
        False for phase-only data: magnitude-based masks become ``phase-quality``.
    n_echoes : int, optional
        Number of echoes (``complexfit`` needs 3 or more; ``wls`` is used otherwise).
    seed : int, optional
        Random seed for stochastic inversions (default: ``config.seed``); hashed.
    use_gpu : bool
        Mark the inversion node as a GPU node (MultiProc's ``n_gpu_procs`` gates it).
    device : {"auto", "cpu", "cuda"}, optional
        torch device of GPU-capable inversions (default: ``config.device``); not hashed.
    omp_nthreads : int
        Threads per node (``n_procs``; not hashed).
    mem_gb : float
        Size (GB) of one 4D float32 input; node memory estimates are multiples of it.
    name : str
        Workflow name.

    Inputs (``inputnode``)
    ----------------------
    phase_files : list of str
        Phase images, one 3D NIfTI per echo (radians or integer-coded).
    magnitude_files : list of str
        Magnitude images, one per echo (leave empty for phase-only data).
    te_s : list of float
        Echo times (s).
    b0_tesla : float
        Field strength (T).

    Outputs (``outputnode``)
    ------------------------
    chi : referenced susceptibility map (ppm)
    mask : mask where chi is valid (after background removal)
    brain_mask : brain mask before background removal
    total_field, local_field : field maps (ppm of B0)
    noise : field noise map (ppm), when the field mapping estimates one
    chi_std, loss_history : from inversions that provide them (network fits; the loss
        curve is a TSV file)
    phase_scaling : how the phase was converted to radians
    phase, magnitude : the stacked 4D inputs (rad, a.u.)
    chi_unreferenced : chi before referencing (ppm; gives the reference offset)
    r2star, t2star, r2star_sidecar : R2* (1/s) and T2* (s) maps of the magnitude decay and
        their provenance (undefined when the plan has no ``r2star`` stage: no magnitude, or
        one echo)
    sidecars : list of every stage's provenance JSON (method, settings, seconds, fit details)
    """
    from qsmflow.interfaces.qsm import (
        BackgroundRemoval,
        FieldMap,
        Inversion,
        Mask,
        PreparePhase,
        R2Star,
        Reference,
    )

    if plan is None:
        cfg = config if config is not None else default_config()
        cfg = cfg.with_methods(
            combine=combine, mask=mask, bfr=bfr, invert=inversion, reference=reference
        )
        if unwrap:
            cfg = cfg.with_settings("combine", unwrap=unwrap)
        plan = plan_run(
            cfg, has_magnitude=has_magnitude, n_echoes=n_echoes, seed=seed, device=device
        )
    device = device or plan.device
    nthr = max(int(omp_nthreads), 1)
    mem = max(float(mem_gb), 0.01)

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=list(INPUT_FIELDS)), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=list(OUTPUT_FIELDS)), name="outputnode")

    prepare = pe.Node(PreparePhase(), name="prepare", mem_gb=3 * mem, n_procs=1)
    # a GPU node only when the method can use one and the device is not pinned to the CPU
    gpu = bool(use_gpu) and plan.stages["invert"].record.gpu and device != "cpu"

    def stage_node(iface, stage, node_name, mem_factor, **extra):
        n_procs = 1 if extra.get("use_gpu") else nthr
        return pe.Node(
            iface(
                method=plan.method(stage),
                # every setting with the defaults merged, and the code's version: both are
                # hashed, so a changed default or a new release re-runs the node
                settings=plan.settings(stage),
                code_version=plan.code_version,
                n_threads=n_procs,
                **extra,
            ),
            name=node_name,
            mem_gb=mem_factor * mem,
            n_procs=n_procs,
        )

    mask_node = stage_node(Mask, "mask", "mask", 4)
    fieldmap = stage_node(FieldMap, "combine", "fieldmap", 8)
    bfr_node = stage_node(BackgroundRemoval, "bfr", "bfr", 12)
    invert = stage_node(
        Inversion, "invert", "invert", 16, seed=plan.seed, use_gpu=gpu, device=device
    )
    ref_node = stage_node(Reference, "reference", "reference", 2)
    # R2*/T2* beside the chain, when the data have the magnitude of 2 echoes or more
    r2s_node = stage_node(R2Star, "r2star", "r2star", 6) if "r2star" in plan.stages else None

    # what every node may get; each node gets what its method's signature takes (registry)
    common = {
        "phase": (prepare, "phase"),
        "te_s": (inputnode, "te_s"),
        "b0_tesla": (inputnode, "b0_tesla"),
        "b0_dir": (prepare, "b0_dir"),
    }
    if plan.has_magnitude:
        common["magnitude"] = (prepare, "magnitude")
    if "noise" in plan.stages["combine"].record.provides:
        common["noise"] = (fieldmap, "noise")
    chain = {
        "mask": (mask_node, {}),
        "combine": (fieldmap, {"mask": (mask_node, "mask")}),
        "bfr": (bfr_node, {"field": (fieldmap, "field"), "mask": (mask_node, "mask")}),
        "invert": (invert, {"field": (bfr_node, "local_field"), "mask": (bfr_node, "mask")}),
        "reference": (ref_node, {"chi": (invert, "chi"), "mask": (bfr_node, "mask")}),
    }
    # every stage's provenance sidecar, for the QC report (time per step, what each fit chose)
    stage_nodes = [n for n in (mask_node, fieldmap, r2s_node, bfr_node, invert, ref_node) if n]
    sidecars = pe.Node(
        niu.Merge(len(stage_nodes)), name="stage_sidecars", run_without_submitting=True
    )
    for i, node in enumerate(stage_nodes):
        wf.connect(node, "sidecar", sidecars, f"in{i + 1}")
    wf.connect(sidecars, "out", outputnode, "sidecars")
    if r2s_node is not None:
        chain["r2star"] = (r2s_node, {"mask": (mask_node, "mask")})
        wf.connect(
            [
                (
                    r2s_node,
                    outputnode,
                    [("r2star", "r2star"), ("t2star", "t2star"), ("sidecar", "r2star_sidecar")],
                )
            ]
        )
    for stage, (node, upstream) in chain.items():
        meth = plan.stages[stage].record
        sources = {**{k: v for k, v in common.items() if v[0] is not node}, **upstream}
        missing = meth.required_inputs - set(sources) - {"voxel_size"}
        if missing:
            raise ValueError(
                f"{stage} method {meth.name!r} needs {', '.join(sorted(missing))}, "
                "which this workflow does not have"
            )
        for name in sorted(meth.inputs & set(sources)):
            src, out = sources[name]
            wf.connect(src, out, node, name)

    wf.connect(
        [
            (
                inputnode,
                prepare,
                [("phase_files", "phase_files"), ("magnitude_files", "magnitude_files")],
            ),
            (invert, outputnode, [("chi", "chi_unreferenced")]),
            (ref_node, outputnode, [("chi", "chi")]),
            (bfr_node, outputnode, [("mask", "mask"), ("local_field", "local_field")]),
            (mask_node, outputnode, [("mask", "brain_mask")]),
            (fieldmap, outputnode, [("field", "total_field"), ("noise", "noise")]),
            (
                invert,
                outputnode,
                [("std", "chi_std"), ("loss", "loss_history"), ("sidecar", "inversion_sidecar")],
            ),
            (
                prepare,
                outputnode,
                [
                    ("phase_scaling", "phase_scaling"),
                    ("phase", "phase"),
                    ("magnitude", "magnitude"),
                ],
            ),
        ]
    )
    return wf
