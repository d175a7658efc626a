"""Subject and top-level workflows: every MEGRE run of every subject, outputs as BIDS
derivatives.

The top workflow's name carries qsmflow's major.minor version (``qsmflow_0_1_wf``), so a new
release never reuses a work directory cache built by older code.
"""

from __future__ import annotations

import os
from pathlib import Path

from nipype.pipeline import engine as pe

from qsmflow import __version__
from qsmflow.config import QSMConfig, default_config
from qsmflow.plan import RunPlan, plan_run
from qsmflow.workflows.atlas import add_run_atlas
from qsmflow.workflows.qsm import init_qsm_wf


def top_workflow_name() -> str:
    major, minor = __version__.split(".")[:2]
    return f"qsmflow_{major}_{minor}_wf"


def subject_workflow_name(subject: str) -> str:
    return f"sub_{subject}_wf"


def _source(path, bids_dir) -> str:
    if bids_dir is not None:
        try:
            return (
                "bids:raw:" + Path(path).resolve().relative_to(Path(bids_dir).resolve()).as_posix()
            )
        except ValueError:
            pass
    return str(path)


def plan_for(run, config: QSMConfig) -> RunPlan:
    """The :class:`~qsmflow.plan.RunPlan` of one MEGRE run under ``config``."""
    return plan_run(config, has_magnitude=run.has_magnitude, n_echoes=run.n_echoes)


def run_metadata(run, plan: RunPlan) -> dict:
    """Sidecar provenance of one run: every method and parameter, seed, acquisition."""
    meta = {
        "QSMflowMethods": plan.sidecar_methods(),
        "RandomSeed": plan.seed,
        "EchoTime": list(run.te_s),
        "MagneticFieldStrength": run.b0_tesla,
        "B0Direction": list(run.b0_dir) if run.b0_dir else None,
        "VoxelSize": list(run.voxel_size) if run.voxel_size else None,
        "PhaseOnly": not run.has_magnitude,
        "ConfigurationSource": plan.source,
    }
    if plan.notes:
        meta["MethodSubstitutions"] = list(plan.notes)
    return {k: v for k, v in meta.items() if v is not None}


def init_single_subject_wf(
    *,
    subject: str,
    runs: list,
    output_dir,
    config: QSMConfig | None = None,
    bids_dir=None,
    omp_nthreads: int = 1,
    use_gpu: bool = False,
    report: bool = True,
    name: str | None = None,
) -> pe.Workflow:
    """One :func:`~qsmflow.workflows.qsm.init_qsm_wf` and one derivatives writer per run.

    Parameters
    ----------
    subject : str
        Subject label (without ``sub-``).
    runs : list of :class:`qsmflow.bids_input.MEGRERun`
        The subject's checked runs (:func:`qsmflow.bids_input.collect_runs`).
    output_dir : path
        Derivatives root.
    config : QSMConfig, optional
        Methods and settings (default: the ``fast`` preset).
    bids_dir : path, optional
        Input dataset root, for the ``Sources`` of the sidecars.
    omp_nthreads : int
        Threads per node.
    use_gpu : bool
        Run GPU-capable inversions as GPU nodes.
    report : bool
        Write the visual QC report ``output_dir/sub-<subject>.html`` (one section per run)
        and refresh ``output_dir/index.html``.
    """
    from nipype.interfaces import utility as niu

    from qsmflow.interfaces.derivatives import DerivativesWriter
    from qsmflow.interfaces.qc import RunReport, SubjectReport

    config = config if config is not None else default_config()
    wf = pe.Workflow(name=name or subject_workflow_name(subject))
    if report and runs:
        merge_frag = pe.Node(
            niu.Merge(len(runs)), name="report_sections", run_without_submitting=True
        )
        merge_sum = pe.Node(
            niu.Merge(len(runs)), name="report_summaries", run_without_submitting=True
        )
        sub_report = pe.Node(
            SubjectReport(
                output_dir=os.path.abspath(output_dir),
                subject=subject,
                methods=subject_methods_text(runs, config),
            ),
            name="report_subject",
            n_procs=1,
        )
        wf.connect(
            [
                (merge_frag, sub_report, [("out", "fragments")]),
                (merge_sum, sub_report, [("out", "summaries")]),
            ]
        )
    for i, run in enumerate(runs):
        if run.subject != subject:
            raise ValueError(f"run {run.bids_prefix} does not belong to subject {subject}")
        mem_gb = max(1, _prod(run.shape)) * max(run.n_echoes, 1) * 4 / 1e9
        plan = plan_for(run, config)
        qsm_wf = init_qsm_wf(
            plan=plan,
            use_gpu=use_gpu,
            omp_nthreads=omp_nthreads,
            mem_gb=mem_gb,
            name=f"qsm_{run.node_name}_wf",
        )
        qsm_wf.inputs.inputnode.phase_files = [str(p) for p in run.phase_files]
        qsm_wf.inputs.inputnode.magnitude_files = [str(p) for p in run.magnitude_files]
        qsm_wf.inputs.inputnode.te_s = [float(t) for t in run.te_s]
        qsm_wf.inputs.inputnode.b0_tesla = float(run.b0_tesla)
        meta = run_metadata(run, plan)
        sources = [_source(p, bids_dir) for p in [*run.phase_files, *run.magnitude_files]]
        ds = pe.Node(
            DerivativesWriter(
                output_dir=os.path.abspath(output_dir),
                prefix=run.bids_prefix,
                metadata=meta,
                source_files=sources,
            ),
            name=f"ds_{run.node_name}",
            mem_gb=4 * mem_gb,
            n_procs=1,
        )
        if run.session:
            ds.inputs.session = run.session
        wf.connect(
            [
                (
                    qsm_wf,
                    ds,
                    [
                        ("outputnode.chi", "chi"),
                        ("outputnode.mask", "mask"),
                        ("outputnode.total_field", "total_field"),
                        ("outputnode.local_field", "local_field"),
                        ("outputnode.chi_std", "chi_std"),
                        ("outputnode.loss_history", "loss_history"),
                        ("outputnode.phase_scaling", "phase_scaling"),
                        ("outputnode.magnitude", "magnitude"),
                        ("outputnode.chi_unreferenced", "chi_unreferenced"),
                        ("outputnode.inversion_sidecar", "inversion_sidecar"),
                    ],
                )
            ]
        )
        if "r2star" in plan.stages:
            wf.connect(qsm_wf, "outputnode.r2star", ds, "r2star")
            wf.connect(qsm_wf, "outputnode.t2star", ds, "t2star")
            wf.connect(qsm_wf, "outputnode.r2star_sidecar", ds, "r2star_sidecar")
        if report:
            run_report = pe.Node(
                RunReport(prefix=run.bids_prefix, metadata=meta),
                # measured peak: 1.4 GB at 160^3 x 4 echoes (the residual's padded FFTs)
                name=f"report_{run.node_name}",
                mem_gb=0.3 + 20 * mem_gb,
                n_procs=1,
            )
            wf.connect(
                [
                    (
                        qsm_wf,
                        run_report,
                        [
                            (f"outputnode.{f}", f)
                            for f in (
                                "chi",
                                "chi_unreferenced",
                                "mask",
                                "brain_mask",
                                "total_field",
                                "local_field",
                                "phase",
                                "magnitude",
                                "chi_std",
                                "loss_history",
                                "sidecars",
                            )
                        ],
                    ),
                    (run_report, merge_frag, [("fragment", f"in{i + 1}")]),
                    (run_report, merge_sum, [("summary", f"in{i + 1}")]),
                ]
            )
        # issue 23: chi and R2* per atlas structure, when [atlas] and the installed extra allow
        add_run_atlas(
            wf,
            qsm_wf,
            run=run,
            config=config,
            meta=meta,
            writer=ds,
            report=run_report if report else None,
            omp_nthreads=omp_nthreads,
            mem_gb=mem_gb,
        )
    return wf


def subject_methods_text(runs, config: QSMConfig) -> str:
    """The methods text (Markdown, with references) of a subject's runs under ``config``
    (as written to ``sub-X/log/<run>_methods.md``): one text when every run has the same
    plan, otherwise one section per run."""
    from qsmflow.provenance import methods_text

    texts = {r.bids_prefix: methods_text(plan_for(r, config), version=__version__) for r in runs}
    if len(set(texts.values())) <= 1:
        return next(iter(texts.values()), "")
    return "\n".join(
        t.replace("# Methods", f"# Methods: {prefix}", 1) for prefix, t in texts.items()
    )


def _prod(shape) -> int:
    n = 1
    for s in shape or (1,):
        n *= int(s)
    return n


def init_qsmflow_wf(
    *,
    runs: list,
    output_dir,
    config: QSMConfig | None = None,
    bids_dir=None,
    omp_nthreads: int = 1,
    use_gpu: bool = False,
    report: bool = True,
    name: str | None = None,
) -> pe.Workflow:
    """Top workflow: one :func:`init_single_subject_wf` per subject in ``runs``.

    Its name (default :func:`top_workflow_name`) carries the major.minor version; ``report``
    as in :func:`init_single_subject_wf`.
    """
    wf = pe.Workflow(name=name or top_workflow_name())
    by_subject: dict = {}
    for r in runs:
        by_subject.setdefault(r.subject, []).append(r)
    for subject, sruns in sorted(by_subject.items()):
        wf.add_nodes(
            [
                init_single_subject_wf(
                    subject=subject,
                    runs=sruns,
                    output_dir=output_dir,
                    config=config,
                    bids_dir=bids_dir,
                    omp_nthreads=omp_nthreads,
                    use_gpu=use_gpu,
                    report=report,
                )
            ]
        )
    return wf
