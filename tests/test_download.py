"""``python -m breastnet.download bach`` against a local stand-in for Zenodo: a generated zip
in BACH's layout behind the records API, with faults on request (a dropped connection,
Range ignored, a corrupted byte, error statuses)."""

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastnet import CLASSES
from breastnet.data.bach import GROUND_TRUTH_CSV, build_index
from breastnet.data.published import PREFIXES
from breastnet.download.__main__ import main
from breastnet.download.bach import KNOWN_MD5, MARKER, RECORD, ZIP_NAME

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "ICIAR2018_BACH_Challenge"
NAMES = {label: prefix for prefix, label in PREFIXES.items()}  # BACH's: Normal/n001.tif
pytestmark = pytest.mark.timeout(60)


def write_bach_zip(path: Path, images: dict[str, np.ndarray]) -> Path:
    """A zip laid out as BACH's (``Photos/<Class>/*.tif``, the ground-truth CSV, ``WSI/``),
    plus files the download must leave out; ``images`` maps ``Class/name.tif`` to pixels."""
    with zipfile.ZipFile(path, "w") as archive:
        rows = []
        for rel, pixels in images.items():
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="TIFF")
            archive.writestr(f"{PREFIX}/Photos/{rel}", buffer.getvalue())
            rows.append(f"{rel.split('/')[1]},{rel.split('/')[0]}\n")
        archive.writestr(f"{PREFIX}/Photos/{GROUND_TRUTH_CSV}", "".join(rows))
        archive.writestr(f"{PREFIX}/Photos/Benign/Thumbs.db", b"not an image")
        archive.writestr(f"{PREFIX}/WSI/A01.svs", b"slide" * 100)
        archive.writestr(f"{PREFIX}/WSI/thumbnails/A01.png", b"thumbnail")
    return path


@pytest.fixture(scope="module")
def bach_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 64x48 noise TIFFs per class under BACH's names (n001.tif ...)."""
    rng = np.random.default_rng(0)
    images = {
        f"{label}/{prefix}{i:03d}.tif": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        for label, prefix in NAMES.items()
        for i in (1, 2)
    }
    return write_bach_zip(tmp_path_factory.mktemp("zenodo") / ZIP_NAME, images)


class FakeZenodo:
    """Serves record ``RECORD`` and its zip; the attributes below inject faults."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.md5 = hashlib.md5(payload).hexdigest()
        self.url = ""
        self.ranges: list[str | None] = []  # Range header of each zip request (None: none)
        self.api_requests = 0
        self.drop_after: int | None = None  # close the next zip answer after this many bytes
        self.ignore_range = False  # answer 200 with the whole file to a Range request
        self.corrupt_at: int | None = None  # flip this byte of every zip answer
        self.status: dict[str, int] = {}  # path prefix -> error status to answer

    def handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                for prefix, status in fake.status.items():
                    if self.path.startswith(prefix):
                        self.send_error(status)
                        return
                if self.path == f"/api/records/{RECORD}":
                    fake.api_requests += 1
                    self._answer(200, json.dumps(fake.record()).encode())
                elif self.path == f"/files/{ZIP_NAME}":
                    fake.ranges.append(self.headers.get("Range"))
                    self._file()
                else:
                    self.send_error(404)

            def _file(self) -> None:
                data = bytearray(fake.payload)
                if fake.corrupt_at is not None:
                    data[fake.corrupt_at] ^= 0xFF
                requested = self.headers.get("Range")
                if requested and not fake.ignore_range:
                    start = int(requested.removeprefix("bytes=").rstrip("-"))
                    span = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    self._answer(206, bytes(data[start:]), {"Content-Range": span})
                else:
                    self._answer(200, bytes(data))

            def _answer(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                if fake.drop_after is not None and status in (200, 206) and len(body) > 1000:
                    self.wfile.write(body[: fake.drop_after])
                    self.wfile.flush()
                    fake.drop_after = None
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler

    def record(self) -> dict:
        """The records API's answer, in Zenodo's shape."""
        link = f"{self.url}/files/{ZIP_NAME}"
        entry = {"key": ZIP_NAME, "size": len(self.payload), "checksum": f"md5:{self.md5}"}
        return {"id": RECORD, "files": [entry | {"links": {"self": link}}]}


@contextmanager
def serving(payload: bytes) -> Iterator[FakeZenodo]:
    """A ``FakeZenodo`` on 127.0.0.1 (a free port) for the block; stopped within seconds."""
    fake = FakeZenodo(payload)
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert not thread.is_alive(), "the test server did not stop"


@pytest.fixture
def zenodo(bach_zip: Path) -> Iterator[FakeZenodo]:
    with serving(bach_zip.read_bytes()) as fake:
        yield fake


@pytest.fixture
def fetch(capsys: pytest.CaptureFixture, tmp_path: Path) -> Callable[..., tuple[int, str, str]]:
    """Run the CLI in-process on ``tmp_path/data/BACH``: (exit status, stdout, stderr)."""

    def run(*args: str | Path) -> tuple[int, str, str]:
        try:
            main(["bach", "--to", str(tmp_path / "data" / "BACH"), *map(str, args)])
            code = 0
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def closed_port_url() -> str:
    """A URL nothing listens at (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def expected_tree() -> set[str]:
    images = {f"{label}/{p}{i:03d}.tif" for label, p in NAMES.items() for i in (1, 2)}
    return images | {GROUND_TRUTH_CSV, MARKER}


def one_error_line(err: str) -> str:
    """The last stderr line, checked to be the only error and no traceback."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("Error: ") and sum(ln.startswith("Error") for ln in lines) == 1
    return lines[-1]


def assert_nothing_extracted(data: Path) -> None:
    assert not (data / "BACH").exists()
    assert not list(data.glob(".BACH.extract-*")), "a half-extracted folder was left"


def test_happy_path_layout_marker_and_second_run(
    zenodo: FakeZenodo, fetch: Callable, bach_zip: Path, tmp_path: Path
) -> None:
    code, out, err = fetch("--accept-licence", "--zenodo-url", zenodo.url)
    assert code == 0, err
    data = tmp_path / "data"
    bach = data / "BACH"
    assert tree(bach) == expected_tree()  # Photos only: no Thumbs.db, no WSI
    assert not (data / "BACH_WSI").exists()
    with zipfile.ZipFile(bach_zip) as archive:
        original = archive.read(f"{PREFIX}/Photos/InSitu/is002.tif")
    assert (bach / "InSitu" / "is002.tif").read_bytes() == original
    marker = json.loads((bach / MARKER).read_text())
    assert marker["md5"] == zenodo.md5 and len(marker["files"]) == 9
    assert (data / ZIP_NAME).stat().st_size == len(zenodo.payload)  # kept for --with-wsi
    assert not list(data.glob("*.part"))
    assert "CC BY-NC-ND 4.0" in out and "8 BACH images" in out
    assert f"{ZIP_NAME}: " in err and "(100 %)" in err  # plain progress lines off a terminal
    assert zenodo.ranges == [None]

    code, out, err = fetch("--accept-licence", "--zenodo-url", zenodo.url)
    assert code == 0 and zenodo.ranges == [None] and zenodo.api_requests == 1
    assert out.strip().splitlines() == [
        f"{bach}: BACH is complete (8 images, zip md5 {zenodo.md5} verified): nothing to do"
    ]


def test_with_wsi_later_extracts_from_the_kept_zip(
    zenodo: FakeZenodo, fetch: Callable, tmp_path: Path
) -> None:
    assert fetch("--accept-licence", "--zenodo-url", zenodo.url)[0] == 0
    code, out, err = fetch("--accept-licence", "--zenodo-url", zenodo.url, "--with-wsi")
    assert code == 0, err
    assert zenodo.ranges == [None]  # one download for both runs
    assert tree(tmp_path / "data" / "BACH") == expected_tree()
    assert tree(tmp_path / "data" / "BACH_WSI") == {"A01.svs", "thumbnails/A01.png", MARKER}
    again = fetch("--accept-licence", "--with-wsi", "--zenodo-url", zenodo.url)
    assert "nothing to do" in again[1] and zenodo.ranges == [None]


@pytest.mark.parametrize("interrupted", ["dropped", "killed"])
def test_interrupted_download_resumes_with_one_range_request(
    zenodo: FakeZenodo, fetch: Callable, tmp_path: Path, interrupted: str
) -> None:
    """A connection dropped mid-file (retried at once) or a run killed at half (rerun): one
    request for the rest, from the byte where it stopped."""
    half = len(zenodo.payload) // 2
    if interrupted == "dropped":
        zenodo.drop_after = half
    else:
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / f"{ZIP_NAME}.part").write_bytes(zenodo.payload[:half])
    code, out, err = fetch("--accept-licence", "--zenodo-url", zenodo.url)
    assert code == 0, err
    assert zenodo.ranges == ([None] if interrupted == "dropped" else []) + [f"bytes={half}-"]
    if interrupted == "dropped":
        assert f"connection closed after {half} of {len(zenodo.payload)} bytes" in err
    else:
        assert f"{ZIP_NAME}.part: resuming at" in err
    assert tree(tmp_path / "data" / "BACH") == expected_tree()


@pytest.mark.parametrize("case", ["range ignored", "part too large"])
def test_download_starts_over_and_ends_verified(
    zenodo: FakeZenodo, fetch: Callable, tmp_path: Path, case: str
) -> None:
    part = tmp_path / "data" / f"{ZIP_NAME}.part"
    part.parent.mkdir()
    if case == "range ignored":
        zenodo.ignore_range = True
        part.write_bytes(b"x" * 1000)  # not even the zip's start: only a full restart works
    else:
        part.write_bytes(zenodo.payload + b"extra")
    code, out, err = fetch("--accept-licence", "--zenodo-url", zenodo.url)
    assert code == 0, err
    if case == "range ignored":
        assert zenodo.ranges == ["bytes=1000-"]  # its 200 answer is the whole file
        assert "the server ignores resume requests" in err
    else:
        assert zenodo.ranges == [None]
        assert "larger than" in err and "starting over" in err
    marker = json.loads((tmp_path / "data" / "BACH" / MARKER).read_text())
    assert marker["md5"] == zenodo.md5


def test_corrupted_byte_fails_the_md5_and_extracts_nothing(
    zenodo: FakeZenodo, fetch: Callable, tmp_path: Path
) -> None:
    zenodo.corrupt_at = 100
    bad = bytearray(zenodo.payload)
    bad[100] ^= 0xFF
    code, out, err = fetch("--accept-licence", "--zenodo-url", zenodo.url)
    assert code == 1
    zip_path = tmp_path / "data" / ZIP_NAME
    found = hashlib.md5(bad).hexdigest()
    assert one_error_line(err) == (
        f"Error: {zip_path}: md5 {found}, expected {zenodo.md5}: delete {zip_path} and rerun "
        "to download it again"
    )
    assert_nothing_extracted(tmp_path / "data")


@pytest.mark.parametrize(("path", "status"), [("/api", 404), ("/files", 500)])
def test_http_error_is_one_line(
    zenodo: FakeZenodo, fetch: Callable, tmp_path: Path, path: str, status: int
) -> None:
    zenodo.status = {path: status}
    code, out, err = fetch("--accept-licence", "--zenodo-url", zenodo.url)
    assert code == 1
    line = one_error_line(err)
    assert f"HTTP {status}" in line and "--from-zip" in line
    assert_nothing_extracted(tmp_path / "data")


def test_cli_process_error_has_no_traceback(zenodo: FakeZenodo, tmp_path: Path) -> None:
    """The real entry point: status 1 and the message alone, the server named by the
    environment variable."""
    zenodo.status = {"/api": 404}
    env = os.environ | {"BREASTNET_ZENODO_URL": zenodo.url, "BREASTNET_ACCEPT_LICENCE": "1"}
    command = [sys.executable, "-m", "breastnet.download", "bach", "--to", str(tmp_path / "B")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"Error: cannot read Zenodo's record {zenodo.url}/api/records/{RECORD} (HTTP 404 Not "
        "Found): check the connection or try again later; without internet, download the "
        "zip elsewhere and pass it with --from-zip (make data ZIP=<zip>)"
    ]


def test_connection_refused_is_one_line(fetch: Callable, tmp_path: Path) -> None:
    code, out, err = fetch("--accept-licence", "--zenodo-url", closed_port_url())
    assert code == 1
    assert "Connection refused" in one_error_line(err)
    assert_nothing_extracted(tmp_path / "data")


def test_licence_must_be_accepted(zenodo: FakeZenodo, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BREASTNET_ACCEPT_LICENCE"}
    command = [sys.executable, "-m", "breastnet.download", "bach", "--to", str(tmp_path / "B")]
    command += ["--zenodo-url", zenodo.url]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 1
    assert "CC BY-NC-ND 4.0" in done.stdout and "Aresta" in done.stdout
    assert done.stderr.strip().splitlines() == [
        "Error: BACH's licence (CC BY-NC-ND 4.0, above) is not accepted: rerun with "
        "--accept-licence (make data ACCEPT_LICENCE=1)"
    ]
    assert zenodo.api_requests == 0 and zenodo.ranges == []
    assert not (tmp_path / "B").exists()


@pytest.mark.parametrize("source", ["record", "--md5 offline", "known md5 offline"])
def test_from_zip(
    zenodo: FakeZenodo, fetch: Callable, bach_zip: Path, tmp_path: Path, source: str
) -> None:
    """A copied zip is checked against the record's md5, a given one, or offline the one
    breastnet knows (which the generated zip fails)."""
    url = zenodo.url if source == "record" else closed_port_url()
    md5 = ["--md5", zenodo.md5] if source == "--md5 offline" else []
    code, out, err = fetch("--accept-licence", f"--zenodo-url={url}", "--from-zip", bach_zip, *md5)
    assert zenodo.ranges == []  # nothing downloaded
    if source == "known md5 offline":
        assert code == 1
        assert one_error_line(err) == (
            f"Error: {bach_zip}: md5 {zenodo.md5}, expected {KNOWN_MD5}: copy the zip again "
            "(compare md5sum on both machines)"
        )
        assert "Connection refused" in err  # says why the record was not asked
        assert_nothing_extracted(tmp_path / "data")
        return
    assert code == 0, err
    assert tree(tmp_path / "data" / "BACH") == expected_tree()
    assert not (tmp_path / "data" / ZIP_NAME).exists()  # the copy stays where it is


def test_from_zip_rejects_a_file_that_is_no_zip(fetch: Callable, tmp_path: Path) -> None:
    fake = tmp_path / ZIP_NAME
    fake.write_text("an HTML error page")
    md5 = hashlib.md5(fake.read_bytes()).hexdigest()
    code, out, err = fetch("--accept-licence", "--from-zip", str(fake), "--md5", md5)
    assert code == 1
    assert one_error_line(err).startswith(f"Error: {fake}: not a valid zip (File is not a zip")
    assert_nothing_extracted(tmp_path / "data")


def test_damaged_member_leaves_no_half_extracted_folder(
    fetch: Callable, bach_zip: Path, tmp_path: Path
) -> None:
    """A zip whose md5 was taken after the damage passes the check; its CRC fails midway."""
    data = bytearray(bach_zip.read_bytes())
    with zipfile.ZipFile(bach_zip) as archive:
        last = archive.getinfo(f"{PREFIX}/Photos/Normal/n002.tif")
    data[last.header_offset + 200] ^= 0xFF  # inside the image data (TIFFs are stored)
    damaged = tmp_path / "copy.zip"
    damaged.write_bytes(bytes(data))
    md5 = hashlib.md5(data).hexdigest()
    code, out, err = fetch("--accept-licence", "--from-zip", damaged, "--md5", md5)
    assert code == 1
    line = one_error_line(err)
    assert line.startswith(f"Error: {damaged}: not a valid zip (Bad CRC-32 for file")
    assert "Normal/n002.tif" in line
    assert_nothing_extracted(tmp_path / "data")


def test_a_folder_of_other_files_is_never_replaced(
    zenodo: FakeZenodo, fetch: Callable, tmp_path: Path
) -> None:
    mine = tmp_path / "data" / "BACH" / "Normal" / "mine.tif"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own image")
    code, out, err = fetch("--accept-licence", "--zenodo-url", zenodo.url)
    assert code == 1
    assert "was not written by breastnet.download: move it away" in one_error_line(err)
    assert mine.read_bytes() == b"my own image"
    assert tree(tmp_path / "data" / "BACH") == {"Normal/mine.tif"}


def test_downloaded_folder_indexes_with_breastnet(
    zenodo: FakeZenodo, fetch: Callable, tmp_path: Path
) -> None:
    assert fetch("--accept-licence", "--zenodo-url", zenodo.url)[0] == 0
    entries = build_index(tmp_path / "data" / "BACH", None)
    assert all(e.usable for e in entries)
    assert Counter(e.label for e in entries) == dict.fromkeys(CLASSES, 2)
    assert {Path(e.path).name for e in entries} >= {"n001.tif", "iv002.tif"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_downloaded_folder_prepares_with_bach_cpu(tmp_path: Path) -> None:
    """experiment=bach_cpu prepares eva's split on a downloaded zip of H&E-like images under
    BACH's names, one 768 px tile each: the folder is what the pipeline takes."""
    from breastnet.synthetic.render import render_image

    # Per class four images on eva's training side (four blocks of ten: enough source groups
    # to carve val out of them) and one that eva reports (test).
    rng = np.random.default_rng(0)
    images = {
        f"{label}/{NAMES[label]}{n:03d}.tif": render_image(CLASSES.index(label), 768, 768, rng)
        for label in CLASSES
        for n in (1, 11, 21, 31, 50)
    }
    bach_zip = write_bach_zip(tmp_path / ZIP_NAME, images)
    with serving(bach_zip.read_bytes()) as fake:
        main(["bach", f"--to={tmp_path / 'BACH'}", "--accept-licence", f"--zenodo-url={fake.url}"])
    command = [
        sys.executable,
        "-m",
        "breastnet",
        "experiment=bach_cpu",
        f"data.data_dir={tmp_path / 'BACH'}",
        "data.split=eva",
        "data.labels_csv=null",
        "data.bach_names=null",
        "data.num_workers=0",
        "data.prepare_workers=0",
        "stages=[prepare]",
        f"paths.work_dir={tmp_path / 'work'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "logger=none",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "data/n_images: 20.0" in done.stdout + done.stderr  # one 768 px tile each:
    assert "data/n_patches: 20.0" in done.stdout + done.stderr
    splits = (tmp_path / "work" / "splits").glob("*.json")
    (split_path,) = [p for p in splits if not p.name.endswith(".audit.json")]
    split = json.loads(split_path.read_text())
    assert split["test"] == ["Benign/b050", "InSitu/is050", "Invasive/iv050", "Normal/n050"]
    assert len(split["train"]) + len(split["val"]) == 16
