"""A one-line progress bar on stderr for long CLI work; silent when stderr
is not a terminal (scripts and logs get the final line only)."""
import sys
import time


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class Progress:
    def __init__(self, label, total=None, stream=None):
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self.last = 0.0

    def __enter__(self):
        self.render(force=True)
        return self

    def advance(self, n):
        self.done += n
        self.render()

    def render(self, force=False):
        now = time.monotonic()
        if not self.tty or (not force and now - self.last < 0.1):
            return
        self.last = now
        elapsed = now - self.start
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 30)
            text = (f"{self.label} [{bar:<30}] {frac * 100:5.1f}% "
                    f"{_human(self.done)}/{_human(self.total)} {elapsed:.0f}s")
        else:
            text = f"{self.label} ... {elapsed:.0f}s"
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()

    def __exit__(self, exc_type, *_):
        if self.tty:
            self.render(force=True)
            self.stream.write("\n")
            self.stream.flush()
