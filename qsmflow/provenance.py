"""What a run says about itself: the methods text (with references for the steps that ran),
the software versions and the run's log files.

:func:`methods_text` writes a paragraph a paper's methods section can start from, from the
run's :class:`qsmflow.plan.RunPlan`; :func:`write_run_log` puts it and the exact configuration
(TOML) in ``output_dir/sub-X/log/``, one pair per run.
"""

from __future__ import annotations

import platform
from pathlib import Path

from qsmflow.io import write_text_atomic
from qsmflow.references import REFERENCES


def methods_text(plan, *, version: str) -> str:
    """Markdown methods paragraph and numbered references of a :class:`qsmflow.plan.RunPlan`:
    every stage's method with every setting it ran with, the seed of a network fit and the
    substitutions the data forced."""
    keys, parts = [], []
    parts.append(
        f"Quantitative susceptibility maps were computed with qsmflow {version} "
        "(built on Nipype [nipype]) from BIDS [bids] multi-echo gradient-echo "
        "magnitude and phase images."
    )
    for sp in plan.stages.values():
        sets = sp.settings
        s = sp.record.sentence.format(unwrap=sets.get("unwrap", ""))
        if sets:
            s += " Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(sets.items())) + "."
        parts.append(s)
    if plan.stochastic:
        parts.append(f"The random seed was {plan.seed}.")
    text = " ".join(parts)
    for token in _tokens(text):
        for k in token.split("; "):
            if k not in keys:
                keys.append(k)
    for token in _tokens(text):
        nums = ", ".join(str(keys.index(k) + 1) for k in token.split("; "))
        text = text.replace(f"[{token}]", f"[{nums}]")
    refs = "\n".join(f"{i + 1}. {REFERENCES[k]}" for i, k in enumerate(keys))
    notes = "".join(f"- {n}\n" for n in plan.notes)
    notes = f"\n## Notes\n\n{notes}" if notes else ""
    return f"# Methods\n\n{text}\n\n## References\n\n{refs}\n{notes}"


def _tokens(text):
    import re

    return [
        t
        for t in re.findall(r"\[([a-z0-9; -]+)\]", text)
        if all(k in REFERENCES for k in t.split("; "))
    ]


def software_versions() -> dict:
    import nibabel
    import numpy
    import scipy

    from qsmflow import __version__

    out = {
        "qsmflow": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "nibabel": nibabel.__version__,
    }
    try:
        import nipype

        out["nipype"] = nipype.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def software_versions_text(versions: dict | None = None) -> str:
    """``SoftwareVersions`` as BIDS wants it (a string): ``"qsmflow 0.1.0, python 3.11.2,
    ..."``."""
    versions = software_versions() if versions is None else versions
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def run_log_paths(output_dir, subject: str, prefix: str) -> dict:
    """``{"config": ..., "methods": ...}``: ``sub-X/log/<prefix>_qsmflow_config.toml`` and
    ``sub-X/log/<prefix>_methods.md`` of one run."""
    log = Path(output_dir) / f"sub-{subject}" / "log"
    return {
        "config": log / f"{prefix}_qsmflow_config.toml",
        "methods": log / f"{prefix}_methods.md",
    }


def write_run_log(output_dir, subject: str, prefix: str, plan, *, version: str) -> dict:
    """Write one run's exact configuration (TOML) and methods text atomically."""
    paths = run_log_paths(output_dir, subject, prefix)
    write_text_atomic(plan.config_toml(), paths["config"])
    write_text_atomic(methods_text(plan, version=version), paths["methods"])
    return {k: str(v) for k, v in paths.items()}
