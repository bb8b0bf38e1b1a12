"""Progress for long work: a bar on a terminal, plain log lines otherwise (batch schedulers)."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """Makes progress displays for one process; `enabled` is False on all ranks but the first."""

    def __init__(self, enabled: bool = True, every: int = 50, stream=None):
        self.enabled, self.every = enabled, max(1, every)
        self.stream = stream or sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())

    def task(self, what: str, total: int | None, initial: int = 0) -> "Task":
        return Task(self, what, total, initial)

    def callback(self, what: str):
        """A progress(done, total, what) function for code that reports its own progress."""
        tasks = {}

        def report(done: int, total: int, label: str = what) -> None:
            task = tasks.get(label)
            if task is None:
                task = tasks[label] = self.task(label, total)
            task.update(done - task.done)
            if total and done >= total:
                task.close()
        return report


class Task:
    """One piece of work: `update(n, **figures)`, then `close()` (or use it as a context manager)."""

    def __init__(self, progress: Progress, what: str, total: int | None, initial: int):
        self.progress, self.what, self.total, self.done = progress, what, total, initial
        self.started, self.figures, self.closed, self.last_line = time.perf_counter(), {}, False, initial
        self.bar = None
        if progress.enabled and progress.terminal:
            self.bar = tqdm(total=total, initial=initial, desc=what, file=progress.stream, mininterval=1.0,
                            dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: int = 1, **figures) -> None:
        self.done += n
        self.figures.update(figures)
        if self.bar is not None:
            self.bar.update(n)
            if figures:
                self.bar.set_postfix(self.figures, refresh=False)
        elif self.progress.enabled and self.done - self.last_line >= self.progress.every:
            self._line()

    def _line(self) -> None:
        self.last_line = self.done
        elapsed = time.perf_counter() - self.started
        parts = [f"{self.what}: {self.done}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts += [f"{k} {v}" for k, v in self.figures.items()]
        parts.append(f"{elapsed:.0f} s")
        print(", ".join(parts), file=self.progress.stream, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.progress.enabled and self.done != self.last_line:
            self._line()
