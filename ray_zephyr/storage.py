"""One storage layer for what a run writes and for the models jobs read: a local path or a URI alike.

On a cluster the driver, the training workers and the Serve replicas run on different nodes, so a path
only means the same thing everywhere if it is a URI (`s3://`, `gs://`, `abfss://`, ... whatever pyarrow's
filesystems resolve, as for Ray Train's `storage_path`) or a folder every node mounts. Everything here goes
through `pyarrow.fs`, so one code path serves both, and tests run it against a real S3-compatible server.

- `publish_dir` writes a folder so that no reader ever sees half of it: a local folder appears by rename; on
  an object store the folder carries an `INCOMPLETE` marker from the first byte written until the last, and
  `local_copy` refuses a folder that has one.
- `local_copy` gives a local path for a URI: downloaded once per node into a cache (a file lock keeps workers
  of one node from downloading twice) and downloaded again only when the remote listing changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from ray_zephyr.errors import UserError

INCOMPLETE = ".ray-zephyr-incomplete"
CACHE_ENV = "RAY_ZEPHYR_CACHE"


def is_uri(path: str) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URI."""
    return "/".join([str(base).rstrip("/"), *parts])


def absolute(path: str) -> str:
    """A URI as is; a local path made absolute (a path resolved on the driver means the same on the workers
    only if it is absolute)."""
    return str(path) if is_uri(path) else str(Path(path).resolve())


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        try:
            return pafs.FileSystem.from_uri(str(path))
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for an unknown scheme or bad URI
            raise UserError(f"cannot open storage {path!r}: {str(exc).splitlines()[0]}") from None
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def exists(path: str) -> bool:
    fs, where = filesystem(path)
    return fs.get_file_info(where).type != pafs.FileType.NotFound


def read_text(path: str) -> str | None:
    """The file's text, or None if there is no such file."""
    fs, where = filesystem(path)
    try:
        with fs.open_input_stream(where) as f:
            return f.read().decode()
    except FileNotFoundError:
        return None


def write_text(path: str, text: str) -> None:
    """Replace the file's content in one piece (an object store writes an object whole; locally by rename)."""
    fs, where = filesystem(path)
    fs.create_dir(where.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{where}.tmp-{uuid.uuid4().hex[:8]}"
        Path(tmp).write_text(text)
        os.replace(tmp, where)
        return
    with fs.open_output_stream(where) as f:
        f.write(text.encode())


def delete_dir(path: str) -> None:
    fs, where = filesystem(path)
    if fs.get_file_info(where).type == pafs.FileType.Directory:
        fs.delete_dir(where)


def listing(path: str) -> dict[str, tuple[int, float]]:
    """{relative file path: (size, mtime)} of every file under `path` ({} if there is none)."""
    fs, where = filesystem(path)
    if fs.get_file_info(where).type != pafs.FileType.Directory:
        return {}
    files = fs.get_file_info(pafs.FileSelector(where, recursive=True))
    return {info.path[len(where.rstrip("/")) + 1 :]: (info.size, info.mtime.timestamp() if info.mtime else 0.0)
            for info in files if info.type == pafs.FileType.File}


def download(path: str, local_dir: str | Path) -> None:
    """Copy every file under `path` into `local_dir`."""
    fs, where = filesystem(path)
    for relative in sorted(listing(path)):
        target = Path(local_dir) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{where}/{relative}", str(target), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())


def publish_dir(local_dir: str | Path, dest: str, before_last_file=None) -> None:
    """Put the folder `local_dir` at `dest` (replacing what was there) so that readers see all of it or none.

    `before_last_file` is a test hook (see `ray_zephyr.train.faults`) run once every file but the last is
    written: a crash there must leave nothing a later job would load."""
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    fs, where = filesystem(dest)
    if isinstance(fs, pafs.LocalFileSystem):
        target = Path(where)
        staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        for i, file in enumerate(files):
            if i == len(files) - 1 and before_last_file:
                before_last_file()
            (staging / file.relative_to(local_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, staging / file.relative_to(local_dir))
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return
    fs.create_dir(where, recursive=True)
    with fs.open_output_stream(f"{where}/{INCOMPLETE}") as f:
        f.write(b"a save into this folder has not finished")
    stale = set(listing(dest)) - {str(p.relative_to(local_dir)) for p in files} - {INCOMPLETE}
    for relative in stale:
        fs.delete_file(f"{where}/{relative}")
    for i, file in enumerate(files):
        if i == len(files) - 1 and before_last_file:
            before_last_file()
        pafs.copy_files(str(file), f"{where}/{file.relative_to(local_dir)}",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    fs.delete_file(f"{where}/{INCOMPLETE}")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ray_zephyr" / "storage")


def check_complete(path: str) -> dict[str, tuple[int, float]]:
    """The listing of a folder a job is about to read; a one-line error if it is missing, empty or half-written."""
    files = listing(path)
    if INCOMPLETE in files:
        raise UserError(f"{path} is incomplete: a save into it was interrupted; write it again (rerun the job)")
    if not files:
        raise UserError(f"{path} does not exist or is empty")
    return files


def local_copy(path: str) -> str:
    """A local folder with the content of `path`: the path itself if local, else this node's cached download."""
    if not is_uri(path):
        return path
    from filelock import FileLock

    files = check_complete(path)
    folder = cache_root() / hashlib.sha256(path.encode()).hexdigest()[:20]
    stamp = json.dumps(sorted(files.items()))
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if (folder / ".listing.json").is_file() and (folder / ".listing.json").read_text() == stamp:
            return str(folder)
        staging = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
        download(path, staging)
        (staging / ".listing.json").write_text(stamp)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    return str(folder)
