"""The end-of-run summary: one line per subject, a one-line reason and the crash file of each
failure; the traceback only with ``--verbose`` (it stays in the crash file)."""

from __future__ import annotations

import re
from pathlib import Path

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
