"""What a run prints reaches its log file too, and a log redirected to a file gets lines.

Under nohup or SLURM the run's log file (``<run dir>/cli.log``) is what a user reads
afterwards: the result lines (accuracies, report paths) and Lightning's progress lines go
there as well as to the console, and a progress bar draws only on a terminal (elsewhere its
carriage-return frames make one line of thousands of characters): plain lines instead. A line
that repeats itself stage after stage is said once per job; a run dir left with nothing but
Hydra's files after a user error is removed (``remove_unused_run_dir``).
"""

import logging
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
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


class OncePerJob(logging.Filter):
    """Pass each message once per job (``setup_run_logging`` starts a job afresh)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


# `data: 48 images (train 32, ...), split ..., cache ...`: prepare's build says it, and every
# stage's load of the same data would say it again (at DEBUG: twice in `prepare` alone).
_DATA_LINE = ("breastnet.data.prepare", OncePerJob())


def say(line: str) -> None:
    """Print a result line (plain, as a user reads it) and put it in the run's log file."""
    print(line, flush=True)
    OUT.info(line)


def setup_run_logging() -> None:
    """Send result lines and Lightning's lines to the log files of Hydra's root logger too
    (called by the CLI once Hydra has configured logging; idempotent)."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    # Lightning prints plain lines on stderr with a handler of its own when it is imported
    # before logging is set up; the CLI imports it later (a quick --help): the same here, or
    # its lines would also reach the root's handlers, the log file twice.
    lightning = logging.getLogger(_LIGHTNING)
    if not any(type(h) is logging.StreamHandler for h in lightning.handlers):
        lightning.addHandler(logging.StreamHandler())
    lightning.propagate = False
    for name in (OUT.name, _LIGHTNING):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
        logger.handlers += files
    # The result lines are printed already: the file handlers are all they need.
    OUT.propagate = not files
    OUT.setLevel(logging.INFO)
    name, once = _DATA_LINE
    once.seen.clear()
    if once not in logging.getLogger(name).filters:
        logging.getLogger(name).addFilter(once)
    for name in QUIET_LIBRARIES:  # unless named themselves (hydra.verbose=[PIL])
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET and logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``1 patch``, ``2 patches``: ``many`` is the plural when it is not ``noun`` + s/es."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {many or noun + ('es' if noun.endswith(('s', 'x', 'ch', 'sh')) else 's')}"


def remove_unused_run_dir(run_dir: Path) -> bool:
    """Remove a failed run's dir when it holds nothing but Hydra's ``.hydra/`` and log files
    (the CLI calls it after a user error before any stage ended: its message was printed, and
    an empty dir per mistyped path piles up in logs/runs/); returns whether it did.

    A dir with anything else (a W&B or CSV run, metrics.json) is a run that did work: kept.
    """
    entries = list(run_dir.iterdir()) if run_dir.is_dir() else []
    hydra = run_dir / ".hydra"
    if not hydra.is_dir() or any(
        p != hydra and not (p.is_file() and p.suffix == ".log") for p in entries
    ):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


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
