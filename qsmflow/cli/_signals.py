"""Ctrl-C, SIGTERM and SIGHUP: stop every worker process and exit 130 / 143 / 129.

Nipype's MultiProc runs nodes in a process pool; an interrupt of the main process alone would
leave those workers computing (and Nipype catches exceptions in its loop, so the run could end
with exit 0).  :func:`handle_signals` installs handlers that terminate the workers (and their
children), print one line and leave with the conventional status; finished nodes stay cached
in the work directory, so the same command resumes.  Nothing else reaches the terminal: the
process pool's "BrokenProcessPool" callback tracebacks (its workers are being stopped) are
dropped, and the temporary files of atomic writes in progress are removed (in the main
process and in every forked worker) before ``os._exit``.  A worker killed from outside (the
kernel's out-of-memory killer) breaks the pool, and Nipype would wait forever: the run then
stops the same way with one line and exit 1.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time

EXIT_SIGINT, EXIT_SIGTERM = 130, 143
#: the signals handled, their exit status (128 + number) and the word printed
_HANDLED = {
    signal.SIGINT: (EXIT_SIGINT, "interrupted"),
    signal.SIGTERM: (EXIT_SIGTERM, "terminated"),
}
if hasattr(signal, "SIGHUP"):  # the terminal closed, or kill -HUP
    _HANDLED[signal.SIGHUP] = (128 + signal.SIGHUP, "hung up")


def _ignore_handled() -> None:
    for s in _HANDLED:
        signal.signal(s, signal.SIG_IGN)


def _descendants(pid: int) -> list[int]:
    """Process ids of every descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(e))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop_workers(grace_s: float = 2.0) -> None:
    """Terminate every descendant process, then kill those still alive after ``grace_s``."""
    pids = _descendants(os.getpid())
    for p in multiprocessing.active_children():
        if p.pid and p.pid not in pids:
            pids.append(p.pid)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


EXIT_WORKER_KILLED = 1


class _BrokenPoolFilter(logging.Filter):
    """Drop the process pool's "exception calling callback ... BrokenProcessPool" tracebacks
    (Nipype's callback re-raises the pool's error in the pool's own thread).  While stopping on
    a signal they are noise.  Otherwise a worker was killed (e.g. by the kernel, out of memory):
    Nipype would then wait forever for its node, so the run stops here with one line, exit 1
    (finished nodes stay cached: re-running resumes)."""

    def __init__(self, prog: str, hint: str = ""):
        super().__init__()
        self.prog = prog
        self.hint = hint
        self.stopping = False

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if type(exc).__name__ != "BrokenProcessPool":
            return True
        if not self.stopping:
            from qsmflow.io import remove_pending_temporaries

            _silence(self)
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(
                    f"\n{self.prog}: a worker process was killed (e.g. out of memory: lower "
                    f"--nprocs or set --mem); the run cannot go on, stopping{self.hint}\n"
                )
                sys.stderr.flush()
            stop_workers()
            remove_pending_temporaries()
            os._exit(EXIT_WORKER_KILLED)  # from the pool's thread: the main one waits on it
        return False


def _silence(filt: _BrokenPoolFilter) -> None:
    """From here on nothing but our own lines: no log records, no thread tracebacks."""
    filt.stopping = True
    logging.disable(logging.CRITICAL)
    import threading

    threading.excepthook = lambda args: None


@contextlib.contextmanager
def handle_signals(prog: str, *, hint: str = "", on_stop=None):
    """Within the block, SIGINT/SIGTERM/SIGHUP stop the workers and exit 130/143/129 (no
    traceback).

    ``on_stop``: called first (in the main process), e.g. to cancel cluster jobs; it returns a
    line to print or None."""
    if multiprocessing.current_process().name != "MainProcess":
        yield
        return

    from qsmflow.io import remove_pending_temporaries

    main_pid = os.getpid()
    filt = _BrokenPoolFilter(prog, hint)

    def handler(signum, frame):
        code, name = _HANDLED.get(signum, (EXIT_SIGTERM, "terminated"))
        if os.getpid() != main_pid:  # a forked worker inherited the handler: just stop
            _ignore_handled()
            remove_pending_temporaries()
            _silence(filt)
            stop_workers(grace_s=0.5)
            os._exit(code)
        # ignore repeats while stopping
        _ignore_handled()
        _silence(filt)
        try:
            sys.stderr.write(f"\n{prog}: {name}; stopping worker processes{hint}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        if on_stop is not None:
            try:
                line = on_stop()
                if line:
                    sys.stderr.write(f"{prog}: {line}\n")
                    sys.stderr.flush()
            except Exception:  # noqa: BLE001 - stopping must go on whatever the cleanup does
                pass
        stop_workers()
        remove_pending_temporaries()
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        os._exit(code)  # the pool's shutdown could wait for results that never come

    try:
        old = {s: signal.signal(s, handler) for s in _HANDLED}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    pool_log = logging.getLogger("concurrent.futures")
    pool_log.addFilter(filt)
    try:
        yield
    finally:
        pool_log.removeFilter(filt)
        for s, h in old.items():
            signal.signal(s, h)
