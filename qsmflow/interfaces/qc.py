"""Nipype nodes of the visual QC report (:mod:`qsmflow.reports`).

:class:`RunReport` builds one run's section (figures, regional table, provenance, time per
step) in its working directory; :class:`SubjectReport` puts the sections of a subject's runs
into ``output_dir/sub-X.html`` and refreshes ``output_dir/index.html``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)


def _opt(inputs, name):
    v = getattr(inputs, name)
    return v if isdefined(v) and v else None


#: provenance keys every stage sidecar has; the rest are what the fit found (chosen
#: regularisation, residual, stopping reason, ...)
_COMMON_KEYS = (
    "stage",
    "method",
    "settings",
    "acquisition",
    "citations",
    "phase_scaling",
    "inputs",
    "outputs",
    "seconds",
)


def stage_records(sidecars) -> tuple[dict, dict]:
    """``({stage: seconds}, {stage: fit details})`` from the stages' provenance sidecars (the
    files the runner wrote beside each output; connected to the report node, never read from
    the work directory).  Fit details are the entries beyond method, settings, acquisition and
    time; stages in the registry's order."""
    from qsmflow import registry

    times, fits = {}, {}
    for side in sidecars or ():
        try:
            prov = json.loads(Path(side).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # a missing or unreadable sidecar only loses its record
            continue
        stage = prov.get("stage", Path(side).stem)
        if "seconds" in prov:
            times[stage] = float(prov["seconds"])
        extra = {k: v for k, v in prov.items() if k not in _COMMON_KEYS}
        if extra:
            fits[stage] = extra
    order = list(registry.STAGES)

    def key(kv):
        return (order.index(kv[0]) if kv[0] in order else len(order), kv[0])

    return dict(sorted(times.items(), key=key)), dict(sorted(fits.items(), key=key))


class _RunReportInputSpec(BaseInterfaceInputSpec):
    prefix = traits.Str(mandatory=True, desc="BIDS entities of the run")
    chi = File(exists=True, mandatory=True, desc="referenced susceptibility (ppm)")
    chi_unreferenced = File(exists=True, desc="susceptibility before referencing (ppm)")
    mask = File(exists=True, mandatory=True, desc="mask where chi is valid")
    brain_mask = File(exists=True, desc="brain mask before background removal")
    total_field = File(exists=True, mandatory=True, desc="total field (ppm)")
    local_field = File(exists=True, mandatory=True, desc="local field (ppm)")
    phase = File(exists=True, desc="wrapped phase (X,Y,Z,E), rad")
    magnitude = File(exists=True, desc="magnitude (X,Y,Z,E), a.u.")
    chi_std = File(exists=True, desc="ensemble standard deviation (ppm), DIP methods")
    loss_history = File(exists=True, desc="loss history JSON, DIP methods")
    metadata = traits.Dict(desc="the run's provenance (as in the Chimap sidecar)")
    sidecars = InputMultiObject(
        File(exists=True),
        desc="the stages' provenance sidecars (time per step, what each fit chose)",
    )
    atlas_fragment = File(exists=True, desc="HTML block of the atlas statistics (AtlasStats)")
    atlas_status = traits.Str(desc="'ok' or why the atlas registration failed")


class _RunReportOutputSpec(TraitedSpec):
    fragment = File(exists=True, desc="HTML section of the run")
    summary = File(exists=True, desc="JSON summary of the run")


class RunReport(SimpleInterface):
    """Figures, regional chi table and provenance of one run (an HTML fragment)."""

    input_spec = _RunReportInputSpec
    output_spec = _RunReportOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.io import write_json_atomic, write_text_atomic
        from qsmflow.reports.run import run_section

        inp = self.inputs
        timing, fits = stage_records(_opt(inp, "sidecars"))
        frag, summary = run_section(
            prefix=inp.prefix,
            chi=inp.chi,
            mask=inp.mask,
            local_field=inp.local_field,
            total_field=inp.total_field,
            brain_mask=_opt(inp, "brain_mask"),
            phase=_opt(inp, "phase"),
            magnitude=_opt(inp, "magnitude"),
            chi_unreferenced=_opt(inp, "chi_unreferenced"),
            chi_std=_opt(inp, "chi_std"),
            loss_history=_opt(inp, "loss_history"),
            metadata=dict(inp.metadata) if isdefined(inp.metadata) else {},
            timing=timing,
            fit_details=fits,
        )
        if _opt(inp, "atlas_fragment"):  # the atlas block goes at the end of the run's section
            block = Path(inp.atlas_fragment).read_text(encoding="utf-8")
            cut = frag.rfind("</section>")
            frag = frag[:cut] + block + frag[cut:] if cut >= 0 else frag + block
        status = _opt(inp, "atlas_status")
        if status:
            summary["atlas"] = status
            if status != "ok":
                summary.setdefault("warnings", []).append(f"atlas statistics: {status}")
        frag_path = os.path.join(runtime.cwd, "report_section.html")
        sum_path = os.path.join(runtime.cwd, "report_summary.json")
        write_text_atomic(frag, frag_path)
        write_json_atomic(summary, sum_path)
        self._results["fragment"] = frag_path
        self._results["summary"] = sum_path
        return runtime


class _SubjectReportInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True, desc="derivatives root")
    subject = traits.Str(mandatory=True, desc="subject label (without sub-)")
    fragments = InputMultiObject(
        File(exists=True), mandatory=True, desc="run sections (RunReport.fragment)"
    )
    summaries = InputMultiObject(
        File(exists=True), mandatory=True, desc="run summaries (RunReport.summary)"
    )
    methods = traits.Str(desc="methods text (Markdown) with references")


class _SubjectReportOutputSpec(TraitedSpec):
    report = File(exists=True, desc="output_dir/sub-X.html")


class SubjectReport(SimpleInterface):
    """Write ``sub-X.html`` from its runs' sections and refresh the group ``index.html``."""

    input_spec = _SubjectReportInputSpec
    output_spec = _SubjectReportOutputSpec

    def _run_interface(self, runtime):
        from qsmflow.reports import write_group_index, write_subject_report

        inp = self.inputs
        sections = [Path(p).read_text(encoding="utf-8") for p in inp.fragments]
        summaries = [json.loads(Path(p).read_text(encoding="utf-8")) for p in inp.summaries]
        path = write_subject_report(
            inp.output_dir,
            inp.subject,
            sections=sections,
            summaries=summaries,
            methods_md=inp.methods if isdefined(inp.methods) else "",
        )
        write_group_index(inp.output_dir)
        self._results["report"] = str(path)
        return runtime
