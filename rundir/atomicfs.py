"""A local filesystem for Ray Tune's storage on which every file appears whole or not at all.

Ray Tune writes a run's files (its experiment state, each trial's params.json, result.json and
checkpoints) into a staging directory and copies them into the storage path with pyarrow's
`copy_files`, every second here (`TUNE_GLOBAL_CHECKPOINT_S`). On a local disk that copy
truncates each file and writes it anew, so a driver killed during a copy left an empty
`experiment_state-*.json` and empty trial files, and the resume restored no trial. Given to
Tune as `storage_filesystem`, this filesystem writes each file under a temporary name and
renames it into place when it is complete: a kill leaves the previous copy whole.

Object stores (S3, GCS) need none of this: an object appears whole when its upload completes.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs


class _ReplaceOnClose:
    """A binary file written under a temporary name beside `path`, moved onto `path` when closed."""

    def __init__(self, path: str):
        self._path = path
        self._temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
        self._file = open(self._temporary, "wb")  # noqa: SIM115 - closed by close(), which pyarrow calls

    @property
    def closed(self) -> bool:
        return self._file.closed

    def write(self, data) -> int:
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            os.replace(self._temporary, self._path)


class AtomicLocalHandler(pafs.FileSystemHandler):
    """pyarrow's local filesystem, but for `open_output_stream`, which writes atomically.
    Stateless, so it pickles into every Ray worker that writes a trial's files."""

    def __init__(self):
        self._local = pafs.LocalFileSystem()

    def __reduce__(self):
        return AtomicLocalHandler, ()

    def __eq__(self, other) -> bool:
        return isinstance(other, AtomicLocalHandler)

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "atomic-local"

    def normalize_path(self, path: str) -> str:
        return self._local.normalize_path(path)

    def get_file_info(self, paths):
        return self._local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self._local.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._local.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._local.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of the root directory")

    def delete_file(self, path: str) -> None:
        self._local.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._local.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self._local.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)

    def open_input_stream(self, path: str):
        return self._local.open_input_stream(path)

    def open_input_file(self, path: str):
        return self._local.open_input_file(path)

    def open_output_stream(self, path: str, metadata):
        return pa.PythonFile(_ReplaceOnClose(path), mode="w")

    def open_append_stream(self, path: str, metadata):
        return self._local.open_append_stream(path)


def atomic_local_filesystem() -> pafs.FileSystem:
    return pafs.PyFileSystem(AtomicLocalHandler())
