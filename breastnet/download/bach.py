"""BACH from Zenodo (record 3632035): the zip's checksum, then the part breastnet uses.

The 10.4 GB ``ICIAR2018_BACH_Challenge.zip`` holds the microscopy images under
``Photos/<Class>/*.tif`` with ``Photos/microscopy_ground_truth.csv``, and the whole-slide
images under ``WSI/``. Only the former is extracted, as the folder ``data.data_dir`` takes:
``<to>/<Class>/<BACH's file name>`` and the CSV beside the class folders. ``--with-wsi``
puts ``WSI/`` in a folder beside it (``<to>_WSI``): inside, its files would be indexed.

Nothing half-done is left under the final names: the zip is checked before anything is
extracted, extraction goes to a hidden folder beside the target which is renamed at the end,
and a marker (the zip's md5 and every file's size) is written last; a folder whose marker
agrees with its files is complete.
"""

import json
import shutil
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from breastnet import CLASSES
from breastnet.data.bach import GROUND_TRUTH_CSV
from breastnet.download.fetch import (
    CHUNK,
    ByteProgress,
    DownloadError,
    RemoteFile,
    check_space,
    download,
    file_md5,
    gigabytes,
    reason,
    record_file,
)

RECORD = 3632035
ZIP_NAME = "ICIAR2018_BACH_Challenge.zip"
# The record's md5 of the zip (kaiko-ai/eva pins the same): checks a copied zip offline.
KNOWN_MD5 = "8ae1801334aa943c44627c1eef3631b2"
MARKER = ".breastnet-download.json"
LICENCE = f"""\
BACH microscopy images (ICIAR 2018 Grand Challenge on BreAst Cancer Histology images),
Zenodo record {RECORD}: licence CC BY-NC-ND 4.0 (Creative Commons
Attribution-NonCommercial-NoDerivatives 4.0, https://creativecommons.org/licenses/by-nc-nd/4.0/):
non-commercial use only, no redistribution of modified copies. Cite: G. Aresta et al., BACH:
Grand challenge on breast cancer histology images, Medical Image Analysis 56 (2019) 122-139,
doi:10.1016/j.media.2019.05.010."""
NOT_ACCEPTED = (
    "BACH's licence (CC BY-NC-ND 4.0, above) is not accepted: rerun with --accept-licence "
    "(make data ACCEPT_LICENCE=1)"
)


def _images(files: dict[str, int]) -> int:
    return sum(rel.lower().endswith(".tif") for rel in files)


def wsi_dir(target: Path) -> Path:
    """Where ``--with-wsi`` puts BACH's ``WSI/`` folder: beside ``target``."""
    return target.with_name(f"{target.name}_WSI")


def complete(target: Path, with_wsi: bool) -> dict | None:
    """``target``'s marker when every file it lists is there at its size (and the WSI folder
    when asked for); None when the folder must be (re)extracted."""
    try:
        marker = json.loads((target / MARKER).read_text())
        files = marker["files"]
        intact = all((target / rel).stat().st_size == size for rel, size in files.items())
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    if not intact or (with_wsi and not (wsi_dir(target) / MARKER).is_file()):
        return None
    return marker


def fetch_bach(
    target: Path,
    accept_licence: bool,
    zenodo_url: str,
    from_zip: Path | None = None,
    md5: str | None = None,
    with_wsi: bool = False,
) -> None:
    """Make ``target`` a complete, verified BACH folder; says in one line when it is already.

    Raises:
        DownloadError: the licence is not accepted, or the download, checksum or zip failed.
    """
    target = target.expanduser().resolve()
    if marker := complete(target, with_wsi):
        print(
            f"{target}: BACH is complete ({_images(marker['files'])} images, zip md5 "
            f"{marker['md5']} verified): nothing to do"
        )
        return
    print(LICENCE)
    if not accept_licence:
        raise DownloadError(NOT_ACCEPTED)
    if from_zip is None:
        remote = record_file(zenodo_url, RECORD, ZIP_NAME)
        zip_path = target.with_name(ZIP_NAME)
        if not (zip_path.is_file() and zip_path.stat().st_size == remote.size):
            download(remote, zip_path)
        fix = f"delete {zip_path} and rerun to download it again"
        expected, size = remote.md5, remote.size
    else:
        zip_path = from_zip.expanduser().resolve()
        if not zip_path.is_file():
            raise DownloadError(f"--from-zip {zip_path}: no such file")
        fix = "copy the zip again (compare md5sum on both machines)"
        expected, size = _expected_md5(md5, zenodo_url)
    verify(zip_path, expected, size, fix)
    files = extract(zip_path, target, expected, with_wsi)
    wsi = f", WSI in {wsi_dir(target)}" if with_wsi else ""
    print(f"{target}: {_images(files)} BACH images and {GROUND_TRUTH_CSV}{wsi} (md5 verified)")
    if from_zip is None:
        print(f"{zip_path} kept ({gigabytes(size)}): delete it to free the space")


def _expected_md5(md5: str | None, zenodo_url: str) -> tuple[str, int | None]:
    """(md5, size or None) a copied zip must have: ``--md5`` if given, else the record's;
    offline, the record's md5 that breastnet knows."""
    if md5:
        return md5.lower(), None
    try:
        remote: RemoteFile = record_file(zenodo_url, RECORD, ZIP_NAME)
    except DownloadError as e:
        why = reason(e.__cause__) if e.__cause__ else str(e)
        print(
            f"Zenodo's record not read ({why}): checking against its md5 that breastnet knows",
            file=sys.stderr,
        )
        return KNOWN_MD5, None
    return remote.md5, remote.size


def verify(zip_path: Path, md5: str, size: int | None, fix: str) -> None:
    """Check ``zip_path``'s size (when known) and md5 before anything is extracted.

    Raises:
        DownloadError: naming the file, both values and ``fix``.
    """
    found_size = zip_path.stat().st_size
    if size is not None and found_size != size:
        raise DownloadError(f"{zip_path}: {found_size} bytes, Zenodo's record says {size}: {fix}")
    found = file_md5(zip_path)
    if found != md5:
        raise DownloadError(f"{zip_path}: md5 {found}, expected {md5}: {fix}")


def select(names: list[str], with_wsi: bool) -> tuple[dict[str, str], dict[str, str]]:
    """(breastnet's files, WSI files): path under the output folder -> name in the zip.

    Images are ``Photos/<Class>/*.tif`` under the zip's top folder; hidden files and other
    archives' folders (``__MACOSX/``) are left out.
    """
    photos, wsi = {}, {}
    for name in names:
        parts = PurePosixPath(name).parts
        top = next((i for i, p in enumerate(parts[:2]) if p in ("Photos", "WSI")), None)
        if top is None or name.endswith("/") or any(p.startswith(".") for p in parts):
            continue
        rest = parts[top + 1 :]
        if parts[top] == "WSI" and rest:
            wsi["/".join(rest)] = name
        elif rest == (GROUND_TRUTH_CSV,):
            photos[GROUND_TRUTH_CSV] = name
        elif len(rest) == 2 and rest[0] in CLASSES and rest[1].lower().endswith(".tif"):
            photos["/".join(rest)] = name
    return photos, (wsi if with_wsi else {})


def extract(zip_path: Path, target: Path, md5: str, with_wsi: bool) -> dict[str, int]:
    """Extract the microscopy images (and the WSI folder) via a hidden folder beside
    ``target``; returns the marker's files (path -> size).

    Raises:
        DownloadError: not a zip, not BACH's, a damaged member, or a ``target`` that holds
            files this command did not write.
    """
    fix = f"{zip_path} is damaged: delete it and rerun, or copy it again"
    dests = [target, wsi_dir(target)] if with_wsi else [target]
    for dest in dests:
        if dest.exists() and not (dest / MARKER).is_file() and any(dest.iterdir()):
            raise DownloadError(
                f"{dest}: exists and was not written by breastnet.download: move it away or "
                "choose another --to"
            )
    try:
        with zipfile.ZipFile(zip_path) as archive:
            photos, wsi = select(archive.namelist(), with_wsi)
            missing = [c for c in CLASSES if not any(p.startswith(f"{c}/") for p in photos)]
            if missing or GROUND_TRUTH_CSV not in photos:
                lacks = ", ".join(f"Photos/{c}/*.tif" for c in missing) or GROUND_TRUTH_CSV
                raise DownloadError(f"{zip_path}: has no {lacks}: not BACH's {ZIP_NAME}")
            if with_wsi and not wsi:
                raise DownloadError(f"{zip_path}: has no WSI folder; leave out --with-wsi")
            need = sum(archive.getinfo(n).file_size for n in [*photos.values(), *wsi.values()])
            check_space(target.parent, need, "the extracted files")
            for stale in target.parent.glob(f".{target.name}.extract-*"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=target.parent))
            try:
                files = _copy(archive, photos, staging / "photos", target.name)
                marker = {"record": RECORD, "file": ZIP_NAME, "md5": md5, "files": files}
                if with_wsi:
                    wsi_files = _copy(archive, wsi, staging / "wsi", wsi_dir(target).name)
                    _write_marker(staging / "wsi", marker | {"files": wsi_files})
                    _swap(staging / "wsi", wsi_dir(target), staging)
                _write_marker(staging / "photos", marker)
                _swap(staging / "photos", target, staging)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a bad CRC, deflate data or end
        raise DownloadError(f"{zip_path}: not a valid zip ({e}): {fix}") from e
    return files


def _copy(
    archive: zipfile.ZipFile, members: dict[str, str], out: Path, desc: str
) -> dict[str, int]:
    """Write each member to ``out/<path>`` (the CRC is checked as it is read)."""
    total = sum(archive.getinfo(name).file_size for name in members.values())
    sizes = {}
    with ByteProgress(total, f"extract {desc}") as bar:
        for rel, name in sorted(members.items()):
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as src, open(dest, "wb") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    bar.update(len(chunk))
            sizes[rel] = dest.stat().st_size
    return sizes


def _write_marker(folder: Path, marker: dict) -> None:
    (folder / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")


def _swap(new: Path, dest: Path, staging: Path) -> None:
    """Put ``new`` at ``dest``; an older ``dest`` moves into ``staging``, deleted with it."""
    if dest.exists():
        dest.rename(staging / f"old-{new.name}")
    new.rename(dest)
