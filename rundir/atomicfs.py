"""A local filesystem for Ray Tune's storage on which every file appears whole or not at all.

Ray Tune writes a run's files (its experiment state, each trial's params.json, result.json and
checkpoints) into a staging directory and copies them into the storage path with pyarrow's
`copy_files`, every second here (`TUNE_GLOBAL_CHECKPOINT_S`). On a local disk that copy
truncates each file and writes it anew, so a driver killed during a copy left an empty
`experiment_state-*.json` and empty trial files, and the resume restored no trial. Given to
Tune as `storage_filesystem`, this filesystem writes each file under a temporary name and
renames it into place when it is complete: a kill leaves the previous copy whole.

Tune also deletes a trial's previous checkpoint the moment it registers the next, and saves the
experiment state that names the new one a moment later: a kill between the two left a state naming
a deleted checkpoint, and that trial failed on resume. Here a checkpoint goes only once an
experiment state that names a newer checkpoint of its trial, and not it, is whole on disk.

Object stores (S3, GCS) need none of the renaming: an object appears whole when its upload completes.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pyarrow as pa
import pyarrow.fs as pafs


_CHECKPOINT = re.compile(r"checkpoint_(\d+)")
_EXPERIMENT_STATE = re.compile(r"experiment_state-.*\.json")


def _names(state: str, path: str) -> bool:
    """Whether an experiment state names `path`. Tune keeps each trial's checkpoints in a pickle
    that the JSON holds hex-encoded, so a path shows there as its hex, elsewhere as itself; a
    false match only keeps a checkpoint longer."""
    return path in state or path.encode().hex() in state


def drop_superseded_checkpoints(experiment_dir: str, state: str) -> list[str]:
    """Delete each checkpoint under `experiment_dir`'s trials that `state` (the text of its
    experiment state, now whole on disk) does not name while naming a newer one of the same
    trial; return their paths. A newer checkpoint that the state does not name yet (written by
    the trial, not yet registered by Tune) stays, and so does every checkpoint Tune keeps, since
    the state names each."""
    dropped = []
    for trial in os.scandir(experiment_dir):
        if not trial.is_dir():
            continue
        try:
            checkpoints = sorted((int(match.group(1)), entry.path) for entry in os.scandir(trial.path)
                                 if entry.is_dir() and (match := _CHECKPOINT.fullmatch(entry.name)))
        except FileNotFoundError:  # a directory removed since it was listed holds nothing to drop
            continue
        named = [index for index, path in checkpoints if _names(state, path)]
        for index, path in checkpoints:
            if named and index < max(named) and not _names(state, path):
                shutil.rmtree(path, ignore_errors=True)
                dropped.append(path)
    return dropped


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
        if self._file.closed:
            return
        self._file.close()
        if not _EXPERIMENT_STATE.fullmatch(os.path.basename(self._path)):
            os.replace(self._temporary, self._path)
            return
        try:
            with open(self._temporary, encoding="utf-8") as file:
                state = file.read()
            json.loads(state)
        except ValueError:  # UnicodeDecodeError is one
            # Tune rewrites its staging copy of the state in place while an earlier sync may be
            # reading it; the half it read is dropped, and the next sync brings a whole one.
            os.remove(self._temporary)
            return
        os.replace(self._temporary, self._path)
        drop_superseded_checkpoints(os.path.dirname(self._path), state)


class AtomicLocalHandler(pafs.FileSystemHandler):
    """pyarrow's local filesystem, but `open_output_stream` writes atomically and `delete_dir`
    leaves a checkpoint to `drop_superseded_checkpoints`. Stateless, so it pickles into every Ray
    worker that writes a trial's files."""

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
        if _CHECKPOINT.fullmatch(os.path.basename(path)):
            return  # goes once a whole experiment state no longer needs it (drop_superseded_checkpoints)
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
