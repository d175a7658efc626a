"""Methods text (with references for the steps actually run) and the run's configuration log.

:func:`methods_text` writes a paragraph a paper's methods section can start from;
:func:`write_subject_log` puts it and the exact configuration (TOML) in
``output_dir/sub-X/log/``.
"""

from __future__ import annotations

import platform
from pathlib import Path

from qsmflow.io import write_text_atomic
from qsmflow.references import REFERENCES
from qsmflow.registry import gpu_methods, method


def methods_text(resolved: dict, *, version: str, seed: int = 0) -> str:
    """Markdown methods paragraph and numbered references for ``resolved`` (stage -> method,
    settings, as :meth:`qsmflow.config.QSMConfig.resolved`)."""
    unwrap = resolved.get("unwrap", {}).get("method", "romeo")
    keys, parts = [], []
    parts.append(
        f"Quantitative susceptibility maps were computed with qsmflow {version} "
        "(built on Nipype [nipype]) from BIDS [bids] multi-echo gradient-echo "
        "magnitude and phase images."
    )
    for stage in ("combine", "mask", "bfr", "invert", "reference"):
        meth = resolved[stage]["method"]
        tmpl = method(stage, meth).sentence
        sets = resolved[stage].get("settings") or {}
        if stage == "combine" and "unwrap" in sets:
            unwrap = sets["unwrap"]
        s = tmpl.format(unwrap=unwrap)
        if sets:
            s += " Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(sets.items())) + "."
        parts.append(s)
    if resolved["invert"]["method"] in gpu_methods():  # the stochastic (network) methods
        parts.append(f"The random seed was {seed}.")
    text = " ".join(parts)
    for token in _tokens(text):
        for k in token.split("; "):
            if k not in keys:
                keys.append(k)
    for token in _tokens(text):
        nums = ", ".join(str(keys.index(k) + 1) for k in token.split("; "))
        text = text.replace(f"[{token}]", f"[{nums}]")
    refs = "\n".join(f"{i + 1}. {REFERENCES[k]}" for i, k in enumerate(keys))
    return f"# Methods\n\n{text}\n\n## References\n\n{refs}\n"


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


def write_subject_log(output_dir, subject: str, *, config_toml: str, methods: str) -> dict:
    """Write ``sub-X/log/qsmflow_config.toml`` and ``sub-X/log/methods.md`` atomically."""
    log = Path(output_dir) / f"sub-{subject}" / "log"
    cfg, meth = log / "qsmflow_config.toml", log / "methods.md"
    write_text_atomic(config_toml, cfg)
    write_text_atomic(methods, meth)
    return {"config": str(cfg), "methods": str(meth)}
