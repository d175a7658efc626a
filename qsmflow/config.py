"""Pipeline configuration: TOML presets -> per-stage methods and settings.

A configuration file (or a shipped preset, ``qsmflow/data/presets/<name>.toml``) looks like::

    description = "fast CPU default"

    [combine]  # field mapping / echo combination
    method = "wls"
    [combine.wls]
    unwrap = "romeo"  # the spatial unwrapper is a setting of the field mapping

    [mask]
    method = "bet"
    [mask.bet]  # settings of one method (used only when that method is chosen)
    fractional_intensity = 0.5

    [bfr]
    method = "vsharp"

    [invert]
    method = "rts"

    [reference]
    method = "mean"

    [execution]
    seed = 0
    device = "cpu"  # auto | cpu | cuda

Per-method tables (``[invert.tv]``) keep settings of several methods side by side, so changing
only the method on the command line (``--inversion tv``) picks the right settings.  Settings are
checked against the method's signature (:attr:`qsmflow.registry.Method.defaults`).  A stage a
file leaves out gets the default preset's method.  No argv or environment is read here.
"""

from __future__ import annotations

import copy
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from qsmflow import registry

#: pipeline stages, in order, as named in config files and on the command line
STAGE_ORDER = ("combine", "mask", "r2star", "bfr", "invert", "reference")
DEFAULT_PRESET = "fast"
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A problem in a configuration file or preset (message names the file and key)."""


@dataclass
class StageConfig:
    method: str
    #: ``{method name: {setting: value}}``
    settings: dict = field(default_factory=dict)

    def current_settings(self) -> dict:
        return dict(self.settings.get(self.method, {}))


@dataclass
class QSMConfig:
    stages: dict  # stage -> StageConfig
    seed: int = 0
    device: str = "cpu"
    description: str = ""
    source: str = ""  # preset name or file the config came from
    #: the ``[atlas]`` table (issue 23; keys and defaults: ``qsmflow.atlas.ATLAS_DEFAULTS``)
    atlas: dict = field(default_factory=dict)

    def method(self, stage: str) -> str:
        return self.stages[stage].method

    def settings(self, stage: str) -> dict:
        return self.stages[stage].current_settings()

    def with_methods(self, **methods) -> QSMConfig:
        """Copy with some stage methods replaced (None values are ignored)."""
        new = copy.deepcopy(self)
        for stage, meth in methods.items():
            if meth is None:
                continue
            if stage not in new.stages:
                raise ConfigError(f"unknown stage {stage!r}")
            new.stages[stage].method = str(meth)
        return new

    def with_settings(self, stage: str, **settings) -> QSMConfig:
        """Copy with settings of ``stage``'s current method replaced; ConfigError when the
        method has no such setting."""
        new = copy.deepcopy(self)
        meth = new.method(stage)
        try:
            registry.method(stage, meth).check_settings(settings)
        except ValueError as exc:
            raise ConfigError(f"[{stage}.{meth}] {exc}") from None
        new.stages[stage].settings.setdefault(meth, {}).update(settings)
        return new

    def as_dict(self) -> dict:
        """The exact configuration, as nested plain types (the TOML written to the log folder)."""
        out = {"description": self.description, "source": self.source}
        for s in (s for s in STAGE_ORDER if s in self.stages):  # a run plan may skip r2star
            st = self.stages[s]
            table = {"method": st.method}
            for meth, sets in st.settings.items():
                if sets:
                    table[meth] = dict(sets)
            out[s] = table
        if self.atlas:
            out["atlas"] = dict(self.atlas)
        out["execution"] = {"seed": int(self.seed), "device": self.device}
        return out

    def resolved(self) -> dict:
        """``{stage: {"method": m, "settings": {...}}}`` of what actually runs."""
        return {s: {"method": self.method(s), "settings": self.settings(s)} for s in STAGE_ORDER}


# --------------------------------------------------------------------------------------------
def preset_dir() -> Path:
    return Path(str(importlib.resources.files("qsmflow") / "data" / "presets"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.toml"))


def preset_text(name: str) -> str:
    """The TOML text of a shipped preset, comments included (``qsmflow --dump-preset``)."""
    path = preset_dir() / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; choose from: {', '.join(list_presets())}")
    return path.read_text(encoding="utf-8")


def load_preset(name: str) -> QSMConfig:
    path = preset_dir() / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; choose from: {', '.join(list_presets())}")
    cfg = load_config_file(path)
    cfg.source = f"preset:{name}"
    return cfg


def load_config_file(path) -> QSMConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: configuration file not found")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    cfg = config_from_dict(data, where=str(p))
    cfg.source = str(p)
    return cfg


def config_from_dict(data: dict, *, where: str = "config") -> QSMConfig:
    data = dict(data)
    if "unwrap" in data:
        raise ConfigError(
            f"{where}: [unwrap] is a setting of the field mapping now: write "
            '`unwrap = "romeo"` (or "laplacian") in the [combine.<method>] table'
        )
    unknown = set(data) - set(STAGE_ORDER) - {"execution", "description", "source", "atlas"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown table(s) {', '.join(sorted(unknown))}; valid: "
            f"{', '.join(STAGE_ORDER)}, atlas, execution"
        )
    stages = {}
    for s in STAGE_ORDER:
        table = data.get(s, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{s}] must be a table")
        table = dict(table)
        method = table.pop("method", None) or default_methods()[s]
        if not isinstance(method, str):
            raise ConfigError(f"{where}: [{s}] method = {method!r}: expected a method name")
        settings = {}
        for k, v in table.items():
            if not isinstance(v, dict):
                raise ConfigError(
                    f"{where}: [{s}] key {k!r}: put method settings in a [{s}.<method>] table"
                )
            settings[k] = _read_settings(s, k, v)
        stages[s] = StageConfig(method, settings)
    from qsmflow.schema import parse_execution

    ex = data.get("execution", {})
    if not isinstance(ex, dict):
        raise ConfigError(f"{where}: [execution] must be a table")
    execution, problems = parse_execution(ex, where=where, devices=DEVICES)
    if problems:
        raise ConfigError("; ".join(problems))
    from qsmflow.atlas import check_atlas_settings

    atlas = data.get("atlas", {})
    problems = check_atlas_settings(atlas, where=where)
    if problems:
        raise ConfigError("; ".join(problems))
    cfg = QSMConfig(
        atlas=dict(atlas),
        stages=stages,
        seed=execution.seed,
        device=execution.device,
        description=str(data.get("description", "")),
    )
    problems = validate_config(cfg)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return cfg


def _read_settings(stage: str, meth: str, table: dict) -> dict:
    """A method's settings table with ``"none"`` read as ``None`` where the method's signature
    allows ``None`` (TOML has no null; :func:`to_toml` writes ``None`` as ``"none"``); a
    string parameter keeps the text ``"none"``.  Unknown methods are left to
    :func:`validate_config`."""
    try:
        meth_rec = registry.method(stage, meth)
    except ValueError:
        return dict(table)
    return registry.read_none_texts(meth_rec, table)


def default_config() -> QSMConfig:
    return load_preset(DEFAULT_PRESET)


def default_methods() -> dict:
    """``{stage: method}`` of the default preset (what a config file that omits a stage gets)."""
    data = tomllib.loads((preset_dir() / f"{DEFAULT_PRESET}.toml").read_text(encoding="utf-8"))
    return {s: data[s]["method"] for s in STAGE_ORDER}


# --------------------------------------------------------------------------------------------
def validate_config(cfg: QSMConfig) -> list[str]:
    """One message per problem (unknown method, unknown setting, bad execution values)."""
    problems = []
    for s in STAGE_ORDER:
        st = cfg.stages[s]
        valid = list(registry.methods_for(s))
        if st.method not in valid:
            problems.append(f"[{s}] unknown method {st.method!r}; choose from: {', '.join(valid)}")
            continue
        for meth, sets in st.settings.items():
            if meth not in valid:
                problems.append(
                    f"[{s}.{meth}] is not a {s} method; choose from: {', '.join(valid)}"
                )
                continue
            try:
                registry.method(s, meth).check_settings(sets)
            except ValueError as exc:
                problems.append(f"[{s}.{meth}] {exc}")
                continue
            problems += registry.method(s, meth).check_types(sets, where=f"[{s}.{meth}]")
    if cfg.device not in DEVICES:
        problems.append(
            f"[execution] device must be one of {', '.join(DEVICES)}, got {cfg.device!r}"
        )
    if cfg.seed < 0:
        problems.append("[execution] seed must be >= 0")
    return problems


# --------------------------------------------------------------------------------------------
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if v is None:
        return '"none"'
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def to_toml(cfg: QSMConfig | dict) -> str:
    """Serialise a configuration (as :meth:`QSMConfig.as_dict`) to TOML text."""
    d = cfg.as_dict() if isinstance(cfg, QSMConfig) else cfg
    lines = []
    for k, v in d.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            for kk, vv in v.items():
                if not isinstance(vv, dict):
                    lines.append(f"{kk} = {_toml_value(vv)}")
            for kk, vv in v.items():
                if isinstance(vv, dict):
                    lines.append(f"\n[{k}.{_toml_key(kk)}]")
                    lines += [f"{_toml_key(a)} = {_toml_value(b)}" for a, b in vv.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_key(k: str) -> str:
    return k if all(c.isalnum() or c in "_-" for c in k) else f'"{k}"'
