"""Downloads that survive a dropped connection: a file's entry in a Zenodo record, a transfer
into ``<file>.part`` that resumes with HTTP Range requests, the md5 check, and progress that
suits a terminal (a tqdm bar) or a log (a line at every tenth).

Only the standard library speaks HTTP: every request has a timeout, and a connection that
drops mid-file is retried a bounded number of times from the byte where it stopped.
"""

import hashlib
import http.client
import json
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from breastnet.errors import UserError
from breastnet.logs import on_terminal

ZENODO = "https://zenodo.org"
ZENODO_ENV = "BREASTNET_ZENODO_URL"  # another server with Zenodo's records API (a mirror)
TIMEOUT = 60.0  # seconds a connect or a read may stall before the try counts as dropped
RETRY_WAITS = (0, 2, 5, 15, 30)  # seconds before each new try of a dropped transfer
RETRY_STATUS = frozenset({429, 502, 503, 504})  # a busy server: worth another try
CHUNK = 1 << 20
_NETWORK_ERRORS = (OSError, http.client.HTTPException)  # URLError and timeouts are OSErrors


class DownloadError(UserError):
    """A download, a checksum or an archive failed; the message says what to do."""


class _Dropped(Exception):
    """The connection failed or closed early: the transfer may resume where it stopped."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a Zenodo record: where to get it and what it must be."""

    name: str
    url: str
    size: int
    md5: str


def reason(error: BaseException) -> str:
    """An HTTP or network error in a few words (``HTTP 404 Not Found``, ``Connection
    refused``)."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        error = error.reason if isinstance(error.reason, BaseException) else error
    text = getattr(error, "strerror", None) or str(error)
    return text or type(error).__name__


def _open(url: str, start: int = 0) -> http.client.HTTPResponse:
    """GET ``url`` from byte ``start`` (redirects keep the Range header)."""
    headers = {"User-Agent": "breastnet"} | ({"Range": f"bytes={start}-"} if start else {})
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)


def record_file(base_url: str, record: int, name: str) -> RemoteFile:
    """``name``'s URL, size and md5 from Zenodo's records API (``<base>/api/records/<id>``).

    Raises:
        DownloadError: the record cannot be read or does not hold ``name``.
    """
    url = f"{base_url.rstrip('/')}/api/records/{record}"
    try:
        with _open(url) as response:
            files = json.load(response)["files"]
        entry = next((f for f in files if f["key"] == name), None)
        if entry is None:
            raise DownloadError(f"{url}: the record holds no file {name}")
        algorithm, _, md5 = entry["checksum"].partition(":")
        if algorithm != "md5":
            raise DownloadError(f"{url}: {name} has a {algorithm} checksum, not md5")
        return RemoteFile(name, entry["links"]["self"], int(entry["size"]), md5)
    except (ValueError, KeyError, TypeError) as e:
        raise DownloadError(f"{url}: not a Zenodo record ({type(e).__name__}: {e})") from e
    except _NETWORK_ERRORS as e:
        raise DownloadError(
            f"cannot read Zenodo's record {url} ({reason(e)}): check the connection or try "
            "again later; without internet, download the zip elsewhere and pass it with "
            "--from-zip (make data ZIP=<zip>)"
        ) from e


def download(remote: RemoteFile, dest: Path) -> Path:
    """Download ``remote`` to ``dest``, through ``dest.part`` which a rerun resumes.

    A partial file larger than the remote one, a server that ignores the Range request
    (answers 200) or resumes at another byte: start over. The md5 is checked afterwards.

    Raises:
        DownloadError: the server refused the file, or the connection kept dropping.
    """
    part = dest.with_name(dest.name + ".part")
    check_space(dest.parent, remote.size - _size(part), dest.name)
    failures = 0
    with ByteProgress(remote.size, remote.name) as bar:
        if 0 < _size(part) <= remote.size:
            bar.say(f"{part}: resuming at {gigabytes(_size(part))}")
        while (have := _size(part)) != remote.size:
            if have > remote.size:
                bar.say(f"{part}: larger than {remote.name}: starting over")
                part.unlink()
                continue
            bar.restart(have)
            try:
                _transfer(remote, part, have, bar)
                failures = 0
            except _Dropped as e:
                failures = 0 if _size(part) > have else failures + 1
                if failures > len(RETRY_WAITS):
                    raise DownloadError(
                        f"{remote.url}: {e} ({failures} tries); rerun the same command to "
                        f"resume from byte {_size(part)}"
                    ) from None
                wait = RETRY_WAITS[max(failures - 1, 0)]
                bar.say(f"{remote.name}: {e}; resuming in {wait} s")
                time.sleep(wait)
    part.replace(dest)
    return dest


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _transfer(remote: RemoteFile, part: Path, have: int, bar: "ByteProgress") -> None:
    """Append the rest of ``remote`` from byte ``have`` to ``part`` (all of it when the
    server answers 200). A network failure raises ``_Dropped``, the bytes so far kept."""
    try:
        response = _open(remote.url, have)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # the range is past the end: the partial file is not this file
            bar.say(f"{part}: does not match {remote.url}: starting over")
            part.unlink()
            return
        if e.code in RETRY_STATUS:
            raise _Dropped(reason(e)) from e
        raise DownloadError(
            f"{remote.url}: the server answered {reason(e)}; try again later, or download "
            "the zip elsewhere and pass it with --from-zip (make data ZIP=<zip>)"
        ) from e
    except _NETWORK_ERRORS as e:
        raise _Dropped(reason(e)) from e
    with response:
        if response.status == 206 and _range_start(response) != have:
            bar.say(f"{remote.url}: resumed at the wrong byte: starting over")
            part.unlink()
            return
        if response.status != 206:
            if have:
                bar.say(
                    f"{remote.url}: the server ignores resume requests: downloading "
                    f"{remote.name} from the start"
                )
            have = 0
            bar.restart(0)
        received = 0
        with open(part, "ab" if have else "wb") as out:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except _NETWORK_ERRORS as e:
                    raise _Dropped(reason(e)) from e
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if have + received < remote.size:
        raise _Dropped(f"connection closed after {have + received} of {remote.size} bytes")


def _range_start(response: http.client.HTTPResponse) -> int | None:
    """The first byte of a 206 answer (``Content-Range: bytes 500-999/1000``)."""
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def file_md5(path: Path) -> str:
    """The md5 of ``path``, with progress (10 GB take a while)."""
    digest = hashlib.md5()
    with open(path, "rb") as f, ByteProgress(path.stat().st_size, f"md5 {path.name}") as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def check_space(folder: Path, need: int, what: str) -> None:
    """Fail before a long transfer or extraction that the disk cannot hold."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DownloadError(
            f"{folder}: {gigabytes(free)} free, {what} needs {gigabytes(need)}: free some "
            "space or choose another --to"
        )


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class ByteProgress:
    """Bytes done of ``total``: a tqdm bar on a terminal, else a line on stderr at every
    tenth (a bar's carriage returns make one endless line in a log file)."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.start, self.started_at = time.monotonic(), 0
        self.bar = None
        if on_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)

    def restart(self, done: int) -> None:
        """Count from ``done`` (a resumed or restarted transfer)."""
        self.done, self.started_at, self.start = done, done, time.monotonic()
        if self.bar is not None:
            self.bar.reset(total=self.total)
            self.bar.update(done)

    def update(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
            return
        total = max(self.total, 1)
        if 10 * self.done // total > 10 * before // total:  # a tenth more: 10 %, 20 % ...
            seconds = max(time.monotonic() - self.start, 1e-6)
            rate = (self.done - self.started_at) / seconds / 1e6
            print(
                f"{self.desc}: {gigabytes(self.done)} of {gigabytes(self.total)} "
                f"({100 * self.done // total} %), {rate:.1f} MB/s",
                file=sys.stderr,
                flush=True,
            )

    def say(self, line: str) -> None:
        """A line on stderr that does not break the bar."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "ByteProgress":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
