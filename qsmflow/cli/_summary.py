"""The end-of-run summary: one line per subject, a one-line reason and the crash file of each
failure; the traceback only with ``--verbose`` (it stays in the crash file); which nodes ran
(result files new since the start) and which subjects failed, and the exit status."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from qsmflow.cli._parser import EXIT_FAILED, EXIT_OK
from qsmflow.cli.progress import subject_of


def crash_files(crash_dir, since: float) -> list[Path]:
    """Nipype crash files written at or after ``since`` (seconds since the epoch)."""
    d = Path(crash_dir)
    if not d.is_dir():
        return []
    return sorted(
        (p for p in d.glob("crash-*") if p.stat().st_mtime >= since - 1),
        key=lambda p: p.stat().st_mtime,
    )


def parse_crash_file(path) -> dict:
    """``{"node": full node name, "reason": last exception line, "traceback": text}``."""
    text = Path(path).read_text(errors="replace")
    node = ""
    m = re.search(r"^Node: (\S+)", text, re.M)
    if m:
        node = m.group(1)
    tb_start = text.find("Traceback")
    tb = text[tb_start:] if tb_start >= 0 else text
    reason = ""
    for line in reversed(tb.splitlines()):
        s = line.strip()
        if (
            s
            and not s.startswith(("File ", "^", "~"))
            and re.match(
                r"^[A-Za-z_.]+(Error|Exception|"
                r"Interrupt|Exit)\b",
                s,
            )
        ):
            reason = s
            break
    if not reason:
        lines = [ln.strip() for ln in tb.splitlines() if ln.strip()]
        reason = lines[-1] if lines else "unknown error"
    reason = re.sub(r"^(?:nipype\.\S+\.)?(\w+): ", r"\1: ", reason)
    if len(reason) > 300:
        reason = reason[:297] + "..."
    return {"node": node, "reason": reason, "traceback": tb.rstrip()}


def failures_by_subject(crash_dir, since: float) -> dict:
    """``{subject: [(node short name, reason, crash file), ...]}`` of this run's crashes."""
    out: dict = {}
    for p in crash_files(crash_dir, since):
        info = parse_crash_file(p)
        sub = subject_of(info["node"]) or subject_of(p.name)
        out.setdefault(sub, []).append(
            (info["node"].rsplit(".", 1)[-1] or p.name, info["reason"], p, info["traceback"])
        )
    return out


def subject_lines(subjects, failed: dict, crashes: dict, *, verbose: bool = False) -> list[str]:
    """Summary lines: ``sub-X: ok`` or ``sub-X: FAILED at <node>: <reason> (crash file: ...)``.

    ``failed`` maps a subject to its failure notes (node names from the progress callback or
    "outputs missing" notes); ``crashes`` is :func:`failures_by_subject`.
    """
    lines = []
    for sub in subjects:
        if sub not in failed and sub not in crashes:
            lines.append(f"  sub-{sub}: ok")
            continue
        if sub in crashes:
            node, reason, path, tb = crashes[sub][0]
            more = f" (+{len(crashes[sub]) - 1} more)" if len(crashes[sub]) > 1 else ""
            lines.append(f"  sub-{sub}: FAILED at {node}: {reason}{more}")
            lines.append(f"          crash file: {path}")
            if verbose:
                lines += ["          " + t for t in tb.splitlines()]
        else:
            notes = sorted({n.rsplit(".", 1)[-1] for n in failed[sub]})
            lines.append(f"  sub-{sub}: FAILED ({', '.join(notes)})")
    return lines


def atlas_failures(out, subject: str, *, since: float) -> list[str]:
    """Summary lines for the atlas registrations of ``subject`` that failed their check in
    this run (the sidecar written without a table; issue 23): the subject's maps are fine,
    its per-structure table is missing, and the summary says so."""
    import json

    lines = []
    for side in sorted(Path(out).glob(f"sub-{subject}/**/anat/*_chistats.json")):
        try:
            if side.stat().st_mtime < since:
                continue
            qc = json.loads(side.read_text(encoding="utf-8")).get("RegistrationQC") or {}
        except (OSError, ValueError):
            continue
        if qc and not qc.get("Passed", True):
            why = qc.get("Reason", "check failed")
            lines.append(f"  sub-{subject}: atlas registration failed, no table: {why}")
    return lines


class _DropNodeErrors:
    """Logging filter: no node tracebacks on the terminal (they are in the crash files)."""

    _NOISE = ("[Node] Error on", "Storing result file without outputs")

    def filter(self, record) -> bool:
        if record.levelno >= 40:  # logging.ERROR: tracebacks of failed nodes
            return False
        msg = str(record.msg)
        return not any(n in msg for n in self._NOISE)


def quiet_nipype_errors() -> None:
    """Keep Nipype's per-node error reports (tracebacks) off the terminal."""
    from nipype import logging as nlog

    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logger = nlog.getLogger(name)
        if not any(isinstance(f, _DropNodeErrors) for f in logger.filters):
            logger.addFilter(_DropNodeErrors())


def result_stamps(wf_dir: Path) -> dict:
    """``{result file: mtime_ns}`` of every node result under ``wf_dir``."""
    if not wf_dir.is_dir():
        return {}
    return {str(p): p.stat().st_mtime_ns for p in wf_dir.rglob("result_*.pklz")}


def executed_nodes(wf_dir: Path, before: dict) -> list[str]:
    """Nodes whose result file is new or was rewritten since ``before`` (they ran)."""
    after = result_stamps(wf_dir)
    return sorted(
        Path(p).parent.relative_to(wf_dir).as_posix()
        for p, t in after.items()
        if before.get(p) != t
    )


def failed_subjects(runs, out: Path, progress) -> dict:
    """``{subject: [what failed]}`` from the progress callback and the missing outputs."""
    from qsmflow.interfaces.derivatives import expected_files

    failed = {}
    for r in runs:
        missing = [p for p in expected_files(out, r.bids_prefix, r.session) if not p.exists()]
        if r.subject in progress.failed:
            failed.setdefault(r.subject, []).extend(progress.failed[r.subject])
        elif missing:
            failed.setdefault(r.subject, []).append(f"{r.bids_prefix}: outputs missing")
    return failed


def summarise(
    args, out, subjects, failed, error, executed, crash, t0, plugin, pargs, invalid=None
) -> int:
    """Print the per-subject summary and the QC report paths; returns the exit status.

    ``invalid``: ``{subject: [input problems]}`` of the subjects skipped before the run."""
    from qsmflow.reports import subject_report_path, write_failure_report, write_group_index

    invalid = invalid or {}
    crashes = {s: c for s, c in failures_by_subject(crash, t0).items() if s in failed}
    print(
        f"\nqsmflow summary ({len(executed)} node(s) executed, work dir {args.work_dir}):",
        file=sys.stderr,
    )
    for sub in subjects:
        if sub in invalid:
            probs = invalid[sub]
            more = f" (+{len(probs) - 1} more)" if len(probs) > 1 else ""
            print(f"  sub-{sub}: FAILED at the input check: {probs[0]}{more}", file=sys.stderr)
            continue
        for line in subject_lines([sub], failed, crashes, verbose=bool(args.verbose)):
            print(line, file=sys.stderr)
        for line in atlas_failures(out, sub, since=t0):
            print(line, file=sys.stderr)
    for sub in failed:  # the subject's report page says why, so the index shows the failure
        lines = [ln.strip() for ln in subject_lines([sub], failed, crashes)]
        write_failure_report(out, sub, errors=[" ".join(lines)])
    for sub, probs in invalid.items():
        write_failure_report(out, sub, errors=[f"input check: {m}" for m in probs])
    failed = {**failed, **{s: ["input check"] for s in invalid}}
    index = write_group_index(out)
    pages = [str(p) for p in (subject_report_path(out, s) for s in subjects) if p.is_file()]
    if pages:
        print(
            "qsmflow: QC report(s): "
            + ", ".join(pages)
            + (f"; all subjects: {index}" if index is not None else ""),
            file=sys.stderr,
        )
    if error is not None and failed and "status_callback" not in pargs:
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"qsmflow: the {plugin} plugin raised: {first}", file=sys.stderr)
    if error is not None and not failed:
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"qsmflow: the workflow raised: {first}", file=sys.stderr)
        return EXIT_FAILED
    if failed:
        print(f"qsmflow: {len(failed)} of {len(subjects)} subject(s) failed", file=sys.stderr)
        return EXIT_FAILED
    print(f"qsmflow: all {len(subjects)} subject(s) done; outputs in {out}", file=sys.stderr)
    return EXIT_OK
