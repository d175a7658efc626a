"""Progress of a Nipype run: a live status line on a terminal, plain log lines otherwise.

Used as the plugins' ``status_callback``; it also records which nodes started, finished or
failed, per subject (from node full names ``<top>.sub_<label>_wf.<...>.<node>``).
"""

from __future__ import annotations

import re
import sys
import threading
import time

_SUB = re.compile(r"\bsub_([A-Za-z0-9]+)_wf\b")


def subject_of(fullname: str) -> str | None:
    m = _SUB.search(fullname or "")
    return m.group(1) if m else None


class Progress:
    """Callback ``(node, status)`` with status in ``start``, ``end``, ``exception``."""

    def __init__(
        self, totals: dict, *, stream=None, tty: bool | None = None, min_interval: float = 0.2
    ):
        self.totals = dict(totals)  # subject -> number of nodes
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else bool(tty)
        self.t0 = time.monotonic()
        self.done: dict = {s: 0 for s in totals}
        self.started: list = []
        self.failed: dict = {}  # subject -> [node fullnames]
        self.running: dict = {}  # fullname -> subject
        self._lock = threading.Lock()
        self._last = 0.0
        self._min = min_interval

    # -- callback -------------------------------------------------------------------------
    def __call__(self, node, status):
        name = getattr(node, "fullname", str(node))
        sub = subject_of(name)
        with self._lock:
            if status == "start":
                self.started.append(name)
                self.running[name] = sub
            else:
                self.running.pop(name, None)
                if sub in self.done:
                    self.done[sub] += 1
                if status == "exception":
                    self.failed.setdefault(sub, []).append(name)
            self._report(name, sub, status)

    # -- output ---------------------------------------------------------------------------
    def elapsed(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"

    def status_line(self) -> str:
        total = sum(self.totals.values())
        done = sum(self.done.values())
        subs_done = sum(1 for s, n in self.done.items() if n >= self.totals[s])
        cur = ", ".join(f"sub-{s} {n.rsplit('.', 1)[-1]}" for n, s in self.running.items())
        fail = f" | failed: {len(self.failed)}" if self.failed else ""
        return (
            f"[{self.elapsed()}] subjects {subs_done}/{len(self.totals)} | nodes "
            f"{done}/{total}{fail} | running: {cur or '-'}"
        )

    def _report(self, name, sub, status):
        if self.tty:
            now = time.monotonic()
            if status == "exception" or now - self._last >= self._min:
                self._last = now
                self.stream.write("\r\033[K" + self.status_line()[:200])
                self.stream.flush()
        else:
            node = name.rsplit(".", 1)[-1]
            who = f"sub-{sub}" if sub else "-"
            word = {"start": "started", "end": "finished", "exception": "FAILED"}[status]
            done = sum(self.done.values())
            self.stream.write(
                f"[{self.elapsed()}] {who} {node} {word} "
                f"({done}/{sum(self.totals.values())} nodes)\n"
            )
            self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\r\033[K" + self.status_line()[:200] + "\n")
            self.stream.flush()
