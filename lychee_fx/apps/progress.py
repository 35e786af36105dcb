"""A progress bar that can be switched off: ``tqdm`` on stderr when enabled, nothing otherwise."""

from __future__ import annotations

__all__ = ["Progress"]


class Progress:
    """``with Progress(total, "prefill", unit="tok") as bar: bar.update(n)``."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", enabled: bool = True):
        self._bar = None
        if enabled:
            import sys

            from tqdm.auto import tqdm

            # Redrawn often on a terminal; into a log file, a line every 30 s is plenty.
            every = 0.1 if sys.stderr.isatty() else 30.0
            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True, mininterval=every)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_description(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
