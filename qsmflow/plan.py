"""The run plan: what one run computes, resolved once and read by everything.

:func:`plan_run` takes a configuration (a preset, a TOML file, command-line choices) and the
run's data (magnitude or not, number of echoes) and resolves, once:

* the method of every pipeline stage, with the substitutions the data force (no magnitude:
  the ``phase-quality`` mask and ``wls`` field mapping, and no R2* maps; fewer than 3 echoes:
  ``wls`` instead of ``complexfit``; one echo: no R2* maps), each with a note;
* every setting of every method, the defaults merged in
  (:func:`qsmflow.registry.resolved_settings`); the spatial unwrapper is the field
  mapping's ``unwrap`` setting like any other;
* the seed, the device and the version of the code that computes the stages.

Everything that says what ran reads the same :class:`RunPlan`: the workflow factory (each node
gets and hashes the plan's settings and code version, so a changed default or a new release
recomputes the node), the derivatives' sidecars (``QSMflowMethods``), the methods text and the
configuration log of every run, and the QC report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qsmflow import registry
from qsmflow.config import STAGE_ORDER, QSMConfig, StageConfig, default_config, to_toml

#: the method a stage falls back to when its method needs a magnitude and the data have none
PHASE_ONLY_FALLBACK = {"mask": "phase-quality", "combine": "wls"}


@dataclass(frozen=True)
class StagePlan:
    """One stage of a run: its method and every setting (defaults merged)."""

    stage: str
    method: str
    settings: dict

    @property
    def record(self) -> registry.Method:
        return registry.method(self.stage, self.method)


@dataclass(frozen=True)
class RunPlan:
    """What one run computes (see the module docstring); build it with :func:`plan_run`."""

    stages: dict  # stage -> StagePlan, in config.STAGE_ORDER (stages that do not run left out)
    seed: int = 0
    device: str = "cpu"
    has_magnitude: bool = True
    source: str = ""
    description: str = ""
    notes: tuple = ()
    atlas: dict = field(default_factory=dict)  # the [atlas] table (qsmflow.atlas)
    code_version: str = field(default_factory=lambda: registry.code_version())

    def method(self, stage: str) -> str:
        return self.stages[stage].method

    def settings(self, stage: str) -> dict:
        return dict(self.stages[stage].settings)

    @property
    def stochastic(self) -> bool:
        """The inversion is a network fit whose result depends on the seed."""
        return self.stages["invert"].record.gpu

    def sidecar_methods(self) -> dict:
        """``QSMflowMethods`` of the sidecars: ``{stage: {"Method", "Parameters"}}``."""
        return {
            s: {"Method": p.method, "Parameters": dict(p.settings)} for s, p in self.stages.items()
        }

    def config(self) -> QSMConfig:
        """The plan as a configuration: the methods that run, each with every setting."""
        return QSMConfig(
            stages={
                s: StageConfig(p.method, {p.method: dict(p.settings)})
                for s, p in self.stages.items()
            },
            seed=self.seed,
            device=self.device,
            description=self.description,
            source=self.source,
            atlas=dict(self.atlas),
        )

    def config_toml(self) -> str:
        """The exact configuration of the run as TOML (``--config-file`` reads it back)."""
        head = "".join(f"# {n}\n" for n in self.notes)
        return head + to_toml(self.config())


def plan_run(
    config: QSMConfig | None = None,
    *,
    has_magnitude: bool = True,
    n_echoes: int | None = None,
    methods: dict | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> RunPlan:
    """Resolve a run: ``config`` (default: the ``fast`` preset) with ``methods`` (``{stage:
    method}``, None values ignored) for data with or without magnitude and with ``n_echoes``
    echoes.  ValueError (naming the stage) for an unknown method or setting."""
    cfg = (config if config is not None else default_config()).with_methods(**(methods or {}))
    chosen, notes = {s: cfg.method(s) for s in STAGE_ORDER}, []
    if not has_magnitude:
        for stage, fallback in PHASE_ONLY_FALLBACK.items():
            if "magnitude" in registry.method(stage, chosen[stage]).required_inputs:
                notes.append(
                    f"no magnitude: {stage} method {chosen[stage]!r} replaced by {fallback!r}"
                )
                chosen[stage] = fallback
    if n_echoes is not None and n_echoes < 3 and chosen["combine"] == "complexfit":
        notes.append(
            f"{n_echoes} echo(es): field mapping 'complexfit' (needs >= 3) replaced by 'wls'"
        )
        chosen["combine"] = "wls"
    if not has_magnitude or (n_echoes is not None and n_echoes < 2):
        why = "no magnitude" if not has_magnitude else f"{n_echoes} echo"
        notes.append(f"{why}: no R2*/T2* maps (they need the magnitude of 2 echoes or more)")
        del chosen["r2star"]
    stages = {}
    for s in chosen:
        sets = cfg.stages[s].settings.get(chosen[s], {})
        stages[s] = StagePlan(s, chosen[s], registry.resolved_settings(s, chosen[s], sets))
    return RunPlan(
        stages=stages,
        seed=int(cfg.seed if seed is None else seed),
        device=device or cfg.device,
        has_magnitude=bool(has_magnitude),
        source=cfg.source,
        description=cfg.description,
        notes=tuple(notes),
        atlas=dict(cfg.atlas),
    )
