"""Find and check multi-echo GRE (MEGRE) runs in a BIDS dataset.

Runs are found with pybids (``suffix-MEGRE`` images with ``part-mag``/``part-phase`` and
``echo-<n>`` entities; ``ses``, ``acq``, ``run``, ``rec`` entities distinguish runs).  Echo times
(s) and the field strength (T) come from the JSON sidecars; B0 direction and voxel size from the
NIfTI affine.  Single-echo runs (no ``echo`` entity) and phase-only runs (no magnitude) are
supported.

:func:`check_run` reports every problem (missing echoes, shapes or affines that differ, missing
EchoTime, 4D images where one 3D echo is expected, phase values that are neither radians nor a
known integer coding) as one message naming the file, so a command can refuse to start with a
full list.  Nothing here reads argv or the environment, and nothing is written to the dataset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

#: entities that tell runs apart (everything else is per file)
RUN_ENTITIES = ("subject", "session", "acquisition", "reconstruction", "run")
_SHORT = {
    "subject": "sub",
    "session": "ses",
    "acquisition": "acq",
    "reconstruction": "rec",
    "run": "run",
}


class BIDSInputError(ValueError):
    """The dataset cannot be used; ``problems`` holds one message per problem."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class MEGRERun:
    """One multi-echo GRE run: files by echo and its acquisition parameters."""

    entities: dict  # subject, session, acquisition, reconstruction, run (None if absent)
    phase_files: list  # by echo
    magnitude_files: list  # by echo, or [] for phase-only data
    te_s: tuple = ()
    b0_tesla: float | None = None
    shape: tuple = ()
    voxel_size: tuple = ()
    b0_dir: tuple = ()
    phase_scaling: str = ""
    problems: list = field(default_factory=list)

    @property
    def subject(self) -> str:
        return self.entities["subject"]

    @property
    def session(self):
        return self.entities.get("session")

    @property
    def n_echoes(self) -> int:
        return len(self.phase_files)

    @property
    def has_magnitude(self) -> bool:
        return bool(self.magnitude_files)

    @property
    def bids_prefix(self) -> str:
        """``sub-X[_ses-Y][_acq-Z][_rec-R][_run-N]``: the stem of this run's derivatives."""
        return "_".join(
            f"{_SHORT[k]}-{self.entities[k]}" for k in RUN_ENTITIES if self.entities.get(k)
        )

    @property
    def node_name(self) -> str:
        """A workflow-safe name for the run (``run_ses1_acqx_run1``; ``run`` when bare)."""
        parts = [f"{_SHORT[k]}{self.entities[k]}" for k in RUN_ENTITIES[1:] if self.entities.get(k)]
        return "_".join(["run"] + parts)

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
def _strip(label: str, prefix: str) -> str:
    label = str(label)
    return label[len(prefix) + 1 :] if label.startswith(prefix + "-") else label


def find_runs(
    bids_dir,
    *,
    participant_labels=None,
    session_labels=None,
    suffix: str = "MEGRE",
    json_per_subject: bool = False,
) -> list[MEGRERun]:
    """All MEGRE runs (unchecked); raises :class:`BIDSInputError` for dataset-level problems.

    A JSON file that does not parse is a dataset-level problem, unless ``json_per_subject``
    and it lies in a ``sub-<label>`` folder: that subject is then not indexed and is returned
    as one run without images whose ``problems`` name the files (:func:`check_run` returns
    them), so a caller can skip that subject alone."""
    from qsmflow.validation import bids_layout, json_problems

    root = Path(bids_dir)
    if not (root / "dataset_description.json").is_file():
        raise BIDSInputError([f"{root}: not a BIDS dataset (no dataset_description.json)"])
    bad_json: dict = {}  # subject ("" for the dataset) -> problems
    for path, probs in json_problems(root).items():
        top = path.relative_to(root).parts[0]
        sub = top[4:] if json_per_subject and top.startswith("sub-") and top != "sub-" else ""
        bad_json.setdefault(sub, []).extend(probs)
    if "" in bad_json:
        raise BIDSInputError([m for probs in bad_json.values() for m in probs])
    layout = bids_layout(root, ignore_subjects=sorted(bad_json))
    subjects = sorted({*layout.get_subjects(), *bad_json})
    problems = []
    wanted = None
    if participant_labels:
        wanted = [_strip(s, "sub") for s in participant_labels]
        problems += [f"{root}: participant sub-{s} not found" for s in wanted if s not in subjects]
    skipped = [
        MEGRERun(
            entities={k: (s if k == "subject" else None) for k in RUN_ENTITIES},
            phase_files=[],
            magnitude_files=[],
            problems=bad_json[s],
        )
        for s in sorted(bad_json)
        if not wanted or s in wanted
    ]
    sessions = [_strip(s, "ses") for s in session_labels] if session_labels else None
    query = {"suffix": suffix, "extension": [".nii", ".nii.gz"], "datatype": "anat"}
    if wanted:
        query["subject"] = [s for s in wanted if s in subjects] or wanted
    if sessions:
        query["session"] = sessions
    files = layout.get(**query) if not problems else []
    if not problems and not files and not skipped:
        what = f" for participant(s) {', '.join(wanted)}" if wanted else ""
        what += f" in session(s) {', '.join(sessions)}" if sessions else ""
        problems.append(f"{root}: no *_{suffix}.nii[.gz] images found{what}")
    if problems:
        raise BIDSInputError(problems)

    groups: dict = {}
    for f in files:
        ents = f.get_entities()
        key = tuple(str(ents[k]) if k in ents else None for k in RUN_ENTITIES)
        groups.setdefault(key, []).append((f, ents))
    runs = []
    for key, members in sorted(groups.items(), key=lambda kv: [str(x) for x in kv[0]]):
        runs.append(_make_run(layout, dict(zip(RUN_ENTITIES, key)), members))
    return sorted(runs + skipped, key=lambda r: r.subject)


def _make_run(layout, entities, members) -> MEGRERun:
    phase, mag, problems, other = {}, {}, [], []
    for f, ents in members:
        part = ents.get("part")
        echo = int(ents.get("echo", 1))
        target = {"phase": phase, "mag": mag}.get(part)
        if target is None:
            other.append(f.path)
            continue
        if echo in target:
            problems.append(
                f"{f.path}: a second {part} image for echo {echo} (also {target[echo]})"
            )
        target[echo] = f.path
    for p in other:
        problems.append(f"{p}: MEGRE image without part-mag or part-phase (not used)")
    run = MEGRERun(
        entities=entities,
        phase_files=[phase[e] for e in sorted(phase)],
        magnitude_files=[mag[e] for e in sorted(mag)],
    )
    if not phase:
        problems.append(f"{_where(run, members)}: no part-phase images (QSM needs the phase)")
    else:
        n = max(phase)
        missing = [e for e in range(1, n + 1) if e not in phase]
        if missing:
            problems.append(f"{phase[max(phase)]}: phase echo(es) {missing} missing")
        if mag and sorted(mag) != sorted(phase):
            problems.append(
                f"{_where(run, members)}: magnitude echoes {sorted(mag)} do not "
                f"match phase echoes {sorted(phase)}"
            )
    # sidecars
    from qsmflow.validation import check_echo_times, check_field_strength

    tes, b0s = [], []
    for p in run.phase_files:
        md = layout.get_metadata(p) or {}
        where = _sidecar_of(p)
        te = md.get("EchoTime")
        if te is None:
            problems.append(f"{p}: EchoTime missing from the JSON sidecar{_named(where, p)}")
        elif isinstance(te, list) or check_echo_times(te, where=where):
            problems += check_echo_times(te, where=where) or [
                f"{where}: EchoTime {te!r} must be one number per echo file"
            ]
        else:
            tes.append(float(te))
        b0 = md.get("MagneticFieldStrength")
        if b0 is None:
            problems.append(
                f"{p}: MagneticFieldStrength missing from the JSON sidecar{_named(where, p)}"
            )
        elif check_field_strength(b0, where=where):
            problems += check_field_strength(b0, where=where)
        else:
            b0s.append(float(b0))
    if len(tes) == len(run.phase_files) and tes:
        if any(b <= a for a, b in zip(tes, tes[1:])):
            problems.append(
                f"{run.phase_files[0]}: EchoTime values {tes} do not increase with the echo number"
            )
        run.te_s = tuple(tes)
    if b0s:
        run.b0_tesla = b0s[0]
        if any(abs(b - b0s[0]) > 1e-3 for b in b0s):
            problems.append(f"{run.phase_files[0]}: MagneticFieldStrength differs between echoes")
    run.problems = problems
    return run


def _sidecar_of(path) -> str:
    """The JSON sidecar next to an image (where its metadata is expected to come from)."""
    p = str(path)
    for ext in (".nii.gz", ".nii"):
        if p.endswith(ext):
            side = Path(p[: -len(ext)] + ".json")
            return str(side) if side.is_file() else p
    return p


def _named(sidecar: str, image) -> str:
    return f" {Path(sidecar).name}" if sidecar != str(image) else ""


def _where(run, members) -> str:
    return members[0][0].path if members else run.bids_prefix


# --------------------------------------------------------------------------------------------
def check_run(run: MEGRERun, *, check_phase_values: bool = True) -> list[str]:
    """Check the images of a run (shapes, affines, dimensions, phase coding).

    Fills ``shape``, ``voxel_size``, ``b0_dir`` and ``phase_scaling``; returns (and stores in
    ``run.problems``) the list of problems found, one message per problem naming the file.
    """
    from qsmflow import validation as v
    from qsmflow.algorithms.dipole import b0_dir_from_affine, voxel_size_from_affine

    problems = list(run.problems)
    ref = None
    notes = set()
    for kind, paths in (("phase", run.phase_files), ("magnitude", run.magnitude_files)):
        for p in paths:
            img, data, bad = v.read_image(p, kind)
            if bad:
                problems += bad
                continue
            shape = img.shape
            if len(shape) == 4 and shape[3] == 1:
                shape = shape[:3]
            if len(shape) != 3:
                problems.append(
                    f"{p}: {kind} image must be 3D (one echo per file), got shape "
                    f"{tuple(img.shape)}"
                )
                continue
            if ref is None:
                ref = (p, shape, img.affine)
            else:
                if shape != ref[1]:
                    problems.append(f"{p}: shape {shape} does not match {ref[0]} {ref[1]}")
                elif not np.allclose(img.affine, ref[2], atol=1e-3, rtol=1e-4):
                    problems.append(f"{p}: affine does not match that of {ref[0]}")
            bad = v.check_finite(data, where=p, what=kind)
            if kind == "magnitude":
                bad = bad or v.check_magnitude(data, where=p)
            elif check_phase_values and not bad:
                note, bad = v.check_phase_range(data, where=p)
                if note:
                    notes.add(note.split(" (")[0].split(";")[0])
            problems += bad
    if ref is not None:
        run.shape = tuple(int(n) for n in ref[1])
        run.voxel_size = tuple(float(v) for v in voxel_size_from_affine(ref[2]))
        run.b0_dir = tuple(float(v) for v in b0_dir_from_affine(ref[2]))
    if len(notes) > 1:
        problems.append(
            f"{run.phase_files[0]}: echoes use different phase codings: {sorted(notes)}"
        )
    run.phase_scaling = "; ".join(sorted(notes))
    run.problems = problems
    return problems


def collect_runs(bids_dir, *, participant_labels=None, session_labels=None) -> list[MEGRERun]:
    """:func:`find_runs` + :func:`check_run` of each; raises :class:`BIDSInputError` listing
    every problem of every run."""
    runs = find_runs(bids_dir, participant_labels=participant_labels, session_labels=session_labels)
    problems = []
    for r in runs:
        problems += check_run(r)
    if problems:
        raise BIDSInputError(problems)
    return runs
