"""Files appear whole or not at all; runs kept at a storage URI are copied in and out.

Every write into a run directory goes through `atomic_path` (a file) or `atomic_dir` (a
directory): a kill at any moment leaves the previous version or the complete new one.
"""

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rundir.layout import RETRAIN_EXPERIMENT


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; when the block ends without error, move it onto `path`.

    The move is an `os.replace` within one directory, so a reader (or a kill at any moment)
    sees the old file or the complete new one, never half a file. The temporary name keeps
    the suffix, so tools that infer the format from it (matplotlib's `savefig`) still work.
    On error the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; return `path`."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write `data` as indented JSON to `path` atomically; return `path`."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path` to fill; when the block ends without error,
    move it onto `path` (which must not exist yet, or be an empty directory). If another
    process got there first, its complete copy is kept and ours is dropped. On error the
    temporary directory is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        try:
            os.replace(temporary, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


# --- runs kept at a storage URI (s3://, gs://, ...), through pyarrow as Ray's storage does ---

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(location: str) -> bool:
    return bool(_URI.match(str(location)))


def join_uri(uri: str, *parts: str) -> str:
    """`s3://b/runs?opts` + parts -> `s3://b/runs/<parts>?opts` (pyarrow reads options from the query)."""
    base, _, query = uri.partition("?")
    joined = "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])
    return f"{joined}?{query}" if query else joined


def without_trial_checkpoints(relative: str) -> bool:
    """Whether a run's file at `relative` is worth downloading: anything but the trials'
    checkpoints (gigabytes in a large search; Tune and a promoted trial read them where
    they are), except the retrained pick's, whose weights are exported."""
    parts = relative.split("/")
    return parts[0] == RETRAIN_EXPERIMENT or not any(part.startswith("checkpoint_") for part in parts[:-1])


def download_tree(uri: str, target: Path, keep: Callable[[str], bool] = lambda relative: True) -> bool:
    """Copy the files under `uri` into `target` (replacing it), with their directories;
    a file whose relative path `keep` refuses only gets its directory. False when `uri`
    holds nothing. (pyarrow's copy_files does not create local directories.)"""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    root = root.rstrip("/")
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return False
    if target.is_dir():
        shutil.rmtree(target)
    items = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(root, recursive=True))
    for item in items:
        if item.type != pafs.FileType.File:
            continue
        relative = item.path[len(root) + 1:] if item.path != root else ""
        destination = target / relative if relative else target
        destination.parent.mkdir(parents=True, exist_ok=True)
        if not keep(relative):
            continue
        with fs.open_input_stream(item.path) as source, open(destination, "wb") as out:
            shutil.copyfileobj(source, out)
    return True


def upload(local: Path, uri: str) -> None:
    """Copy a local file or directory tree to `uri`."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    if local.is_dir():
        pafs.copy_files(str(local.resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    else:
        with local.open("rb") as source, fs.open_output_stream(path) as stream:
            shutil.copyfileobj(source, stream)


def publish_copy(source: Path, target: Path) -> None:
    """Make `target` a copy of the file or directory `source`, replacing what was there. A file
    is replaced atomically; a directory is copied whole under a temporary name, then swapped in
    by two renames, so a reader never sees it half copied."""
    if source.is_file():
        with atomic_path(target) as temporary:
            shutil.copyfile(source, temporary)
        return
    staged = target.with_name(f".{target.name}.{os.getpid()}.new")
    retired = target.with_name(f".{target.name}.{os.getpid()}.old")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(source, staged)
    if target.exists():
        os.replace(target, retired)
    os.replace(staged, target)
    shutil.rmtree(retired, ignore_errors=True)


def local_copy(uri: str, cache: Path) -> Path:
    """The files under `uri` in a directory of `cache`, downloaded once per machine. The
    directory is keyed by the files as stored (paths, sizes, times), so a new run written at
    the same URI is never read from an older copy."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    listing = sorted((f.path, f.size, f.mtime_ns) for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    target = cache / hashlib.sha256(repr((uri, listing)).encode()).hexdigest()[:16]
    if not target.is_dir():
        with atomic_dir(target) as partial:
            pafs.copy_files(path, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return target


def remove(uri: str) -> None:
    """Delete the file or directory tree at `uri`, if any."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)
