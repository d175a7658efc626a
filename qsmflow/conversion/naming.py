"""BIDS names for classified series: subject/session labels, runs, echoes, parts.

Heuristic (mapping) file, JSON, every key optional::

    {
        "participants": {"<PatientID>": "<label>"},
        "sessions": {"<StudyDate or StudyInstanceUID>": "<label or empty for no session>"},
        "series": {
            "<SeriesDescription, ProtocolName or SeriesNumber>": {
                "skip": true,
                "acq": "<label>",
                "task": "<label>",
                "kind": "megre|fmap|bold|T1w|T2w|FLAIR|aside",
            }
        },
    }
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from qsmflow.conversion.classify import CONVERTED_KINDS, Series
from qsmflow.conversion.report import Report

_PART = {"mag": "mag", "phase": "phase", "real": "real", "imag": "imag"}


@dataclass
class PlannedImage:
    """One output image: the stack it comes from and its BIDS path (no extension)."""

    series: Series
    key: tuple[int, str]  # (echo, part) stack of ``series``
    relpath: str
    sidecar: dict = field(default_factory=dict)  # fields set on top of dcm2niix's sidecar
    to_radians: bool = False


@dataclass
class Plan:
    """Everything that will be written, and what is kept aside (with the reason)."""

    images: list[PlannedImage] = field(default_factory=list)
    aside: list[tuple[Series, str]] = field(default_factory=list)
    participants: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = []
        by_series: dict[str, list[PlannedImage]] = {}
        for im in self.images:
            by_series.setdefault(im.series.uid, []).append(im)
        for ims in by_series.values():
            s = ims[0].series
            lines.append(f"{s.label} ({len(s.files)} files, {s.kind}):")
            lines.extend(f"    -> {im.relpath}.nii.gz" for im in ims)
        for s, why in self.aside:
            lines.append(f"{s.label} ({len(s.files)} files): kept aside: {why}")
        return "\n".join(lines)


def clean_label(value: str) -> str:
    """BIDS label: letters and digits only."""
    return re.sub(r"[^A-Za-z0-9]", "", str(value))


def load_heuristic(path) -> dict:
    """Read and check a heuristic (mapping) JSON file."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read heuristic file {path}: {exc}") from exc
    if not isinstance(data, dict) or set(data) - {"participants", "sessions", "series"}:
        raise ValueError(
            f"heuristic file {path}: expected a JSON object with keys participants, sessions, "
            "series"
        )
    return data


def _series_rule(heur: dict, s: Series) -> dict:
    rules = heur.get("series", {}) or {}
    f = s.first
    for key in (str(f.series_number), f.series_description, f.protocol_name):
        if key in rules:
            return rules[key] or {}
    return {}


def _subject(s: Series, heur, participant_label, report) -> str | None:
    pid = s.first.patient_id
    if participant_label:
        return clean_label(participant_label)
    mapped = (heur.get("participants") or {}).get(pid)
    label = clean_label(mapped if mapped is not None else pid)
    if not label:
        report.problem(
            f"{s.label}: no usable PatientID for the subject label; "
            "give --participant-label or a heuristic file"
        )
        return None
    return label


def _session(s: Series, heur, session_label) -> str:
    if session_label is not None:
        return clean_label(session_label)
    sessions = heur.get("sessions") or {}
    for key in (s.first.study_uid, s.first.study_date):
        if key in sessions:
            return clean_label(sessions[key] or "")
    return clean_label(s.first.study_date)


def _ents(sub, ses, **kw) -> str:
    parts = [f"sub-{sub}"] + ([f"ses-{ses}"] if ses else [])
    parts += [f"{k}-{v}" for k, v in kw.items() if v not in (None, "")]
    return "_".join(parts)


def _folder(sub, ses, datatype) -> str:
    return "/".join([f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []) + [datatype])


def _pair_megre(series: list[Series]) -> list[list[Series]]:
    """Group MEGRE series of one acquisition (Siemens: magnitude and phase are two series)."""
    groups: dict[tuple, list[Series]] = {}
    for s in series:
        f = s.first
        key = (
            f.protocol_name,
            f.sequence_name,
            tuple(round(t, 6) for t in s.echo_times_s),
            s.geometry_key,
        )
        groups.setdefault(key, []).append(s)
    runs = []
    for members in groups.values():
        members.sort(key=lambda s: s.number)
        full = [[s] for s in members if len(s.parts) > 1]
        mags = [s for s in members if s.parts == {"mag"}]
        others = [s for s in members if len(s.parts) == 1 and s.parts != {"mag"}]
        for i in range(max(len(mags), len(others))):
            runs.append([x[i] for x in (mags, others) if i < len(x)])
        runs.extend(full)
    runs.sort(key=lambda r: r[0].number)
    return runs


def make_plan(
    series: list[Series],
    report: Report,
    *,
    participant_label=None,
    session_label=None,
    heuristic=None,
) -> Plan:
    """Decide the BIDS name of every stack of every convertible series."""
    heur = heuristic or {}
    plan = Plan()
    keep: dict[tuple, list[Series]] = {}
    patients, studies = set(), {}
    for s in series:
        rule = _series_rule(heur, s)
        if rule.get("kind"):
            s.kind, s.reason = str(rule["kind"]), "kind set by heuristic file"
        if rule.get("skip"):
            plan.aside.append((s, "skipped by heuristic file"))
            continue
        if s.kind not in CONVERTED_KINDS:
            if s.kind != "invalid":
                plan.aside.append((s, s.reason or "not recognised"))
            continue
        sub = _subject(s, heur, participant_label, report)
        if sub is None:
            continue
        ses = _session(s, heur, session_label)
        patients.add(s.first.patient_id)
        studies.setdefault((sub, ses), set()).add(s.first.study_uid)
        acq = clean_label(rule.get("acq", ""))
        task = clean_label(rule.get("task", "")) if s.kind == "bold" else ""
        keep.setdefault((sub, ses, s.kind, acq, task), []).append(s)
    if participant_label and len(patients) > 1:
        report.problem(
            f"--participant-label given but the DICOM folder holds {len(patients)} "
            f"patients ({', '.join(sorted(patients))}); convert them one at a time"
        )
    for (sub, ses), uids in studies.items():
        if len(uids) > 1:
            report.problem(
                f"sub-{sub} ses-{ses or '(none)'}: {len(uids)} different studies "
                "would share one session; give session labels in a heuristic file"
            )
    for (sub, ses, kind, acq, task), members in keep.items():
        if sub not in plan.participants:
            plan.participants.append(sub)
        if kind == "megre":
            _plan_megre(plan, report, sub, ses, acq, members)
        elif kind == "fmap":
            _plan_fmap(plan, report, sub, ses, acq, members)
        else:
            _plan_other(plan, sub, ses, acq, task, kind, members)
    return plan


def _run_label(i: int, n: int) -> str:
    return str(i + 1) if n > 1 else ""


def _plan_megre(plan, report, sub, ses, acq, members):
    runs = _pair_megre(members)
    for i, run in enumerate(runs):
        parts = set().union(*(s.parts for s in run))
        if "phase" not in parts:
            report.note(f"{run[0].label}: MEGRE without a phase series: not usable for QSM")
        for s in run:
            for (echo, part), st in sorted(s.stacks.items()):
                name = (
                    _ents(
                        sub, ses, acq=acq, run=_run_label(i, len(runs)), echo=echo, part=_PART[part]
                    )
                    + "_MEGRE"
                )
                side = {"EchoTime": st.echo_time_s, "EchoNumber": echo}
                if part == "phase":
                    side["Units"] = "rad"
                plan.images.append(
                    PlannedImage(
                        s,
                        (echo, part),
                        f"{_folder(sub, ses, 'anat')}/{name}",
                        side,
                        part == "phase",
                    )
                )


def _plan_fmap(plan, report, sub, ses, acq, members):
    groups: dict[tuple, list[Series]] = {}
    for s in members:
        groups.setdefault((s.first.protocol_name, s.geometry_key), []).append(s)
    n = len(groups)
    for i, grp in enumerate(groups.values()):
        base = _ents(sub, ses, acq=acq, run=_run_label(i, n))
        folder = _folder(sub, ses, "fmap")
        mags = [s for s in grp if "mag" in s.parts]
        mag_tes = sorted({st.echo_time_s for s in mags for st in s.stacks.values()})
        for s in grp:
            for (echo, part), st in sorted(s.stacks.items()):
                necho = len({e for e, _ in s.stacks})
                side = {"EchoTime": st.echo_time_s}
                if part == "mag":
                    suffix = f"magnitude{echo}" if necho > 1 else "magnitude"
                elif part == "phase" and necho == 1:
                    if len(mag_tes) < 2:
                        plan.aside.append(
                            (
                                s,
                                "phase-difference field map without its two-echo "
                                "magnitude series (EchoTime1 unknown)",
                            )
                        )
                        break
                    suffix = "phasediff"
                    side.update(EchoTime1=mag_tes[0], EchoTime2=st.echo_time_s, Units="rad")
                elif part == "phase":
                    suffix = f"phase{echo}"
                    side["Units"] = "rad"
                else:
                    plan.aside.append((s, f"field map with {part} images not supported"))
                    break
                plan.images.append(
                    PlannedImage(
                        s, (echo, part), f"{folder}/{base}_{suffix}", side, part == "phase"
                    )
                )


def _plan_other(plan, sub, ses, acq, task, kind, members):
    members = sorted(members, key=lambda s: s.number)
    n = len(members)
    datatype = "func" if kind == "bold" else "anat"
    for i, s in enumerate(members):
        echoes = {e for e, _ in s.stacks}
        parts = {p for _, p in s.stacks}
        t = task
        if kind == "bold" and not t:
            text = f"{s.first.series_description} {s.first.protocol_name}".lower()
            t = "rest" if "rest" in text else clean_label(s.first.protocol_name) or "unknown"
        for (echo, part), st in sorted(s.stacks.items()):
            name = _ents(
                sub,
                ses,
                task=t,
                acq=acq,
                run=_run_label(i, n),
                echo=echo if len(echoes) > 1 else "",
                part=_PART[part] if len(parts) > 1 else "",
            )
            side = {"EchoTime": st.echo_time_s} if st.echo_time_s is not None else {}
            if kind == "bold":
                side["TaskName"] = t
            plan.images.append(
                PlannedImage(
                    s,
                    (echo, part),
                    f"{_folder(sub, ses, datatype)}/{name}_{kind}",
                    side,
                    part == "phase",
                )
            )
