"""Progress that counts inputs: a tqdm bar on a terminal, one final line on stderr otherwise.

A bar redrawn into a log file or a CI console is hundreds of carriage-return lines; a single
summary line says the same thing there.
"""
from __future__ import annotations

import sys
import time


class Progress:
    """update(n) after n inputs are done; close() once (the final line when stderr is no terminal)."""

    def __init__(self, total: int, desc: str, *, unit: str = "input", enabled: bool = True):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, bool(enabled)
        self.done, self.start, self.bar, self._closed = 0, time.perf_counter(), None, False
        if not self.enabled:
            return
        stream = sys.stderr
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        if self.tty:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # no tqdm: the final line only
                return
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=stream)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
            return
        s = time.perf_counter() - self.start
        rate = f", {self.done / s:,.0f} {self.unit}s/s" if s > 0 and self.done else ""
        print(f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}s in {s:.1f} s{rate}", file=sys.stderr,
              flush=True)
