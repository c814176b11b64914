"""Progress bars: tqdm redrawing in place on a terminal; in a log or CI output (not a terminal), a plain line every
10 seconds and one at the end instead of every redraw."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm as _tqdm

LOG_INTERVAL = 10.0  # seconds between lines when the output is not a terminal


class _Lines:
    """A stream for tqdm that writes each redraw as a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class tqdm(_tqdm):
    """tqdm, writing plain lines every LOG_INTERVAL seconds when its stream is not a terminal."""

    def __init__(self, *args, **kwargs):
        stream = kwargs.get("file") or sys.stderr
        self.as_lines = not kwargs.get("disable") and not stream.isatty()
        if self.as_lines:
            kwargs.update(file=_Lines(stream), mininterval=LOG_INTERVAL, ascii=True)
        super().__init__(*args, **kwargs)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        """In a log, a new postfix waits for the next line instead of forcing one."""
        super().set_postfix(ordered_dict, refresh=refresh and not self.as_lines, **kwargs)
