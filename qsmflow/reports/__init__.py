"""Visual quality-control reports (fMRIPrep-style), one self-contained HTML page per subject.

``output_dir/sub-X.html`` shows, for every run of the subject: the brain mask over the
magnitude (mosaic), the wrapped phase against the total field, the local field, chi in three
planes on a fixed window, the data-consistency residual map, the DIP loss curve and ensemble
standard deviation when the inversion provides them, a table of regional chi values with the
reference region and its offset, and the provenance (methods, parameters, seed, versions,
time per step).  ``output_dir/index.html`` links the subjects.  Both files are listed in the
derivatives' ``.bidsignore``.

Layers: :mod:`.figures` (matplotlib, Agg), :mod:`.regions` (numbers), :mod:`.html` (markup),
:mod:`.run` (one run's section); the Nipype nodes are in :mod:`qsmflow.interfaces.qc`.
"""

from __future__ import annotations

from pathlib import Path

from qsmflow.io import write_text_atomic

__all__ = [
    "run_section",
    "write_subject_report",
    "write_failure_report",
    "write_group_index",
    "subject_report_path",
]


def subject_report_path(output_dir, subject: str) -> Path:
    return Path(output_dir) / f"sub-{subject}.html"


def write_subject_report(
    output_dir,
    subject: str,
    *,
    sections: list[str],
    summaries: list[dict],
    methods_md: str = "",
    versions: dict | str | None = None,
    errors: list[str] = (),
) -> Path:
    """Write ``output_dir/sub-<subject>.html`` (atomically) and return its path."""
    from qsmflow.reports.html import subject_page

    if versions is None:
        from qsmflow.provenance import software_versions

        versions = software_versions()
    path = subject_report_path(output_dir, subject)
    write_text_atomic(
        subject_page(
            subject,
            sections,
            summaries=summaries,
            versions=versions,
            methods_md=methods_md,
            errors=list(errors),
        ),
        path,
    )
    return path


def write_failure_report(
    output_dir, subject: str, *, errors: list[str], methods_md: str = ""
) -> Path:
    """Write ``output_dir/sub-<subject>.html`` for a subject whose run failed: the errors
    (node, reason, crash file) instead of figures, so the group index shows the failure."""
    first = errors[0].strip() if errors else "failed"
    return write_subject_report(
        output_dir,
        subject,
        sections=[],
        methods_md=methods_md,
        errors=errors,
        summaries=[{"prefix": f"sub-{subject}", "status": f"FAILED: {first}"[:200]}],
    )


def write_group_index(output_dir) -> Path | None:
    """Write ``output_dir/index.html`` linking every ``sub-*.html`` there (None if there is
    none)."""
    from qsmflow.reports.html import group_page, read_summary

    out = Path(output_dir)
    pages = sorted(out.glob("sub-*.html"))
    if not pages:
        return None
    entries = [
        {"subject": p.stem[len("sub-") :], "href": p.name, "runs": read_summary(p)} for p in pages
    ]
    path = out / "index.html"
    write_text_atomic(group_page(entries), path)
    return path


def run_section(**kwargs):
    """See :func:`qsmflow.reports.run.run_section`."""
    from qsmflow.reports.run import run_section as _run_section

    return _run_section(**kwargs)
