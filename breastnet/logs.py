"""What a run prints reaches its log file too, and a log redirected to a file gets lines.

Under nohup or SLURM the run's log file (``<run dir>/cli.log``) is what a user reads
afterwards: the result lines (accuracies, report paths) and Lightning's progress lines go
there as well as to the console, and a progress bar draws only on a terminal (elsewhere its
carriage-return frames make one line of thousands of characters): plain lines instead.
"""

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")

# Result lines: printed plain on stdout, and into the run's log file (set up by the CLI).
OUT = logging.getLogger("breastnet.out")
# Lightning's own logger: a console handler of its own and no propagation, so without this
# its lines (devices, our epoch lines) never reach Hydra's file handler.
_LIGHTNING = "pytorch_lightning"
# Third-party loggers kept at INFO even under a DEBUG root (``hydra.verbose=true``; the
# ``debug=default`` config names breastnet's loggers only): PIL alone wrote 1,008
# ``STREAM b'IHDR'`` lines in one run.
QUIET_LIBRARIES = ("PIL", "matplotlib", "urllib3", "fsspec", "h5py")


def say(line: str) -> None:
    """Print a result line (plain, as a user reads it) and put it in the run's log file."""
    print(line, flush=True)
    OUT.info(line)


def setup_run_logging() -> None:
    """Send result lines and Lightning's lines to the log files of Hydra's root logger too
    (called by the CLI once Hydra has configured logging; idempotent)."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for name in (OUT.name, _LIGHTNING):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
        logger.handlers += files
    # The result lines are printed already: the file handlers are all they need.
    OUT.propagate = not files
    OUT.setLevel(logging.INFO)
    for name in QUIET_LIBRARIES:  # unless named themselves (hydra.verbose=[PIL])
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET and logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


def on_terminal(stream: IO | None = None) -> bool:
    """Whether ``stream`` (default stderr, where progress bars draw) is a terminal."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """A tqdm bar on a terminal; elsewhere a plain log line at every tenth of ``total``."""

    def __init__(self, total: int, desc: str, unit: str = "img") -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done, self.start = 0, time.monotonic()
        self.bar = None
        if on_terminal() and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit)

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
            return
        step = max(1, self.total // 10)
        if self.done // step > before // step or self.done == self.total:
            logging.getLogger("breastnet.progress").info(
                "%s: %d/%d %s (%.0f s)",
                self.desc,
                self.done,
                self.total,
                self.unit,
                time.monotonic() - self.start,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def progress(items: Iterable[T], total: int, desc: str, unit: str = "img") -> Iterator[T]:
    """``items``, reporting progress as ``Progress`` does."""
    with Progress(total, desc, unit) as bar:
        for item in items:
            yield item
            bar.update()
