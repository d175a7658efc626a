"""Collect notes (informational) and problems (fatal) while converting."""

from __future__ import annotations

from dataclasses import dataclass, field


class ConversionError(RuntimeError):
    """Raised when the input cannot be converted safely; ``problems`` lists every reason and
    ``damaged`` the damaged input files among them (``skip_damaged`` would convert without)."""

    def __init__(self, problems, damaged=()):
        self.problems = list(problems)
        self.damaged = list(damaged)
        super().__init__("; ".join(self.problems) if self.problems else "conversion failed")


@dataclass
class Report:
    """Notes, warnings and problems, in the order they were found.

    A damaged input file (unreadable, truncated, a header cut short) is a problem, or with
    ``skip_damaged`` a warning naming it (the file is then left out)."""

    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skip_damaged: bool = False
    damaged_files: list = field(default_factory=list)
    damaged_series: dict = field(default_factory=dict)  # SeriesInstanceUID -> damaged files

    def note(self, msg: str) -> None:
        self.notes.append(msg)

    def problem(self, msg: str) -> None:
        self.problems.append(msg)

    def damaged(self, path, msg: str, series_uid: str = "") -> None:
        """``msg`` (naming ``path``): a problem, or a warning when damaged files are skipped
        (``series_uid``, when the header still tells it: that series is then incomplete)."""
        self.damaged_files.append(path)
        if series_uid:
            self.damaged_series.setdefault(series_uid, []).append(path)
        if self.skip_damaged:
            self.warnings.append(f"left out: {msg}")
        else:
            self.problems.append(msg)

    def raise_if_problems(self) -> None:
        if self.problems:
            raise ConversionError(self.problems, self.damaged_files)
