"""Thread count of the FFTs in :mod:`qsmflow.algorithms` (``scipy.fft`` ``workers``).

Algorithms pass ``workers=fft_workers()`` to every ``scipy.fft`` call: all CPUs by default
(``-1``), or the limit set by :func:`limit_fft_workers` around a call (the stage runner sets it
from a node's ``n_threads``, so MultiProc nodes do not each use every core).  The setting is a
context variable: threads and asyncio tasks see their own value.
"""

from __future__ import annotations

import contextlib
import contextvars

_WORKERS = contextvars.ContextVar("qsmflow_fft_workers", default=-1)


def fft_workers() -> int:
    """``workers`` for ``scipy.fft`` calls: -1 (all CPUs) unless limited."""
    return _WORKERS.get()


@contextlib.contextmanager
def limit_fft_workers(n: int):
    """Within the block, FFTs use at most ``n`` threads (also calls that pass no ``workers``)."""
    import scipy.fft

    n = max(int(n), 1)
    token = _WORKERS.set(n)
    try:
        with scipy.fft.set_workers(n):
            yield
    finally:
        _WORKERS.reset(token)
