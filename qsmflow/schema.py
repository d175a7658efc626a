"""Typed schemas of the user-facing settings: configuration values and ``params.json``.

A method setting's type is that of its default in the method's signature (``lambda_: float =
1e-3`` takes a number, ``fractional_intensity`` a number, ``unwrap: str`` a string, a ``bool`` a
boolean, a string default (``"auto"``) a string or a number); a ``None`` default takes
anything.  Problems are returned as one message per key,
naming where the value came from; nothing raises on user input.  No argv or environment here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _type_name(default) -> str:
    if default == "auto":  # chosen from the data / the device unless set
        return 'a number or "auto"'
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string or a number"
    if isinstance(default, (list, tuple)):
        return "a list"
    return type(default).__name__


def value_matches(value, default) -> bool:
    """Whether ``value`` has the type the ``default`` implies."""
    if default is None or default == "auto":  # "auto" settings are numbers or names
        return (
            True
            if default is None
            else (isinstance(value, str) or _is_number(value) or value is None)
        )
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return _is_number(value)
    if isinstance(default, str):  # a name, or "auto"-style defaults that also take a number
        return isinstance(value, str) or _is_number(value)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return True


def check_setting_types(settings: dict, defaults: dict, *, where: str) -> list[str]:
    """One message per setting whose value does not have its default's type."""
    problems = []
    for key, value in settings.items():
        if key in defaults and not value_matches(value, defaults[key]):
            problems.append(
                f"{where} {key} = {value!r}: expected {_type_name(defaults[key])} "
                f"(default {defaults[key]!r})"
            )
    return problems


@dataclass(frozen=True)
class Execution:
    """The ``[execution]`` table of a configuration."""

    seed: int = 0
    device: str = "cpu"


def parse_execution(table: dict, *, where: str, devices=("auto", "cpu", "cuda")):
    """``(Execution, problems)`` from an ``[execution]`` table."""
    problems = []
    unknown = sorted(set(table) - {"seed", "device"})
    if unknown:
        problems.append(f"{where}: [execution] unknown key(s) {', '.join(unknown)}")
    seed = table.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"{where}: [execution] seed = {seed!r}: expected an integer >= 0")
        seed = 0
    device = table.get("device", "cpu")
    if device not in devices:
        problems.append(
            f"{where}: [execution] device = {device!r}: expected one of {', '.join(devices)}"
        )
        device = "cpu"
    return Execution(seed=seed, device=device), problems


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AcquisitionParams:
    """qsm-ci ``params.json`` (or a BIDS sidecar): TE [s], B0 [T], B0_dir, voxel_size [mm]."""

    te_s: tuple | None = None
    b0_tesla: float | None = None
    b0_dir: tuple | None = None
    voxel_size: tuple | None = None


def _vector3(value, *, where: str, key: str, positive: bool) -> tuple[tuple | None, list]:
    if value is None:
        return None, []
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(_is_number(v) for v in value)
    ):
        return None, [f"{where}: {key} = {value!r}: expected a list of 3 numbers"]
    vec = tuple(float(v) for v in value)
    if positive and min(vec) <= 0:
        return None, [f"{where}: {key} = {value!r}: voxel sizes must be positive (mm)"]
    if not positive and not any(vec):
        return None, [f"{where}: {key} = {value!r}: must not be the zero vector"]
    return vec, []


def parse_params(data: dict, *, where: str) -> tuple[AcquisitionParams, list[str]]:
    """Typed acquisition parameters and one message per bad key (units are checked too)."""
    from qsmflow.validation import check_echo_times, check_field_strength

    problems = []
    te = data.get("TE", data.get("EchoTime"))
    te_key = "TE" if "TE" in data else "EchoTime"
    if te is not None:
        problems += check_echo_times(te, where=where, key=te_key)
        te = (
            tuple(float(t) for t in (te if isinstance(te, (list, tuple)) else [te]))
            if not problems
            else None
        )
    b0 = data.get("B0", data.get("MagneticFieldStrength"))
    b0_key = "B0" if "B0" in data else "MagneticFieldStrength"
    if b0 is not None:
        bad = check_field_strength(b0, where=where, key=b0_key)
        problems += bad
        b0 = None if bad else float(b0)
    b0_dir, p1 = _vector3(data.get("B0_dir"), where=where, key="B0_dir", positive=False)
    vox, p2 = _vector3(data.get("voxel_size"), where=where, key="voxel_size", positive=True)
    problems += p1 + p2
    return AcquisitionParams(te_s=te, b0_tesla=b0, b0_dir=b0_dir, voxel_size=vox), problems
