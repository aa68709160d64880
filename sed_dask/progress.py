"""Progress bars that tell the truth: drawn to 100 % and closed with one summary line.

On a terminal a tqdm bar is drawn on stderr and left at its final count; when stderr is not a
terminal (a log file, CI, a pipe) no bar is drawn at all, so no carriage returns or escape codes
reach the log: only the closing line (what, how much, how long, where) is printed.
"""

from __future__ import annotations

import contextlib
import sys
import time


def _tty() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class Bar:
    """A counted task bar; ``close(where=...)`` prints the summary line once."""

    def __init__(self, total: int, *, desc: str, unit: str = "task", enabled: bool = True):
        self.total, self.desc, self.unit, self.enabled = int(total), desc, unit, enabled
        self.n = 0
        self.t0 = time.perf_counter()
        self._tqdm = None
        self._closed = False
        if enabled and _tty():
            import shutil

            from tqdm.auto import tqdm

            cols = shutil.get_terminal_size((100, 20)).columns or 100  # a pty may report 0 columns
            self._tqdm = tqdm(
                total=self.total,
                desc=desc,
                unit=unit,
                leave=True,
                file=sys.stderr,
                mininterval=0.2,
                ncols=min(cols, 120),
            )

    def set(self, n: int) -> None:
        """Set the count of finished units (never backwards)."""
        n = min(int(n), self.total)
        if n > self.n:
            if self._tqdm is not None:
                self._tqdm.update(n - self.n)
            self.n = n

    def update(self, k: int = 1) -> None:
        self.set(self.n + k)

    def close(self, *, where: str | None = None, ok: bool = True, what: str | None = None) -> None:
        """Draw the final count and print ``desc: N/N units in T s [-> where]`` (or where it stopped)."""
        if self._closed:
            return
        self._closed = True
        if self._tqdm is not None:
            self._tqdm.refresh()
            self._tqdm.close()
        if not self.enabled:
            return
        took = time.perf_counter() - self.t0
        state = "done" if ok and self.n == self.total else f"stopped at {self.n}/{self.total}"
        line = f"{self.desc}: {state}, {what or f'{self.n} {self.unit}(s)'} in {took:.1f} s"
        print(line + (f" -> {where}" if where else ""), file=sys.stderr, flush=True)


@contextlib.contextmanager
def dask_local_bar(n_tasks: int, *, desc: str, enabled: bool):
    """A :class:`Bar` fed by dask's local schedulers (one tick per finished task)."""
    if not enabled:
        yield None
        return
    from dask.callbacks import Callback

    bar = Bar(n_tasks, desc=desc, enabled=True)
    ok = False
    with Callback(posttask=lambda key, result, dsk, state, worker_id: bar.update(1)):
        try:
            yield bar
            ok = True
        finally:
            if ok:
                bar.set(bar.total)  # tasks dask inlined or skipped still belong to a finished pass
            bar.close(ok=ok)


def distributed_bar(futures, *, desc: str) -> None:
    """Follow ``futures`` (and everything they depend on) on the scheduler until they finish."""
    from distributed.diagnostics.progressbar import TextProgressBar

    class _Follow(TextProgressBar):
        """distributed's scheduler-fed progress, drawn by :class:`Bar` instead of raw ``\\r``/escapes."""

        def _draw_bar(self, remaining, all, **kwargs):
            if bar.total != all:
                bar.total = all
                if bar._tqdm is not None:
                    bar._tqdm.total = all
            bar.set(all - remaining)

        def _draw_stop(self, remaining=0, all=0, status=None, **kwargs):
            self._draw_bar(remaining, all)
            bar.close(ok=status == "finished")

    bar = Bar(0, desc=desc, enabled=True)
    _Follow(futures, scheduler=futures[0].client.scheduler.address if futures else None)
    bar.close(ok=bar.n == bar.total)
