"""The filesystem through which Ray Tune writes a run: on which every file appears whole or not
at all, and which notes when each experiment state became whole in storage.

Ray Tune writes a run's files (its experiment state, each trial's params.json, result.json and
checkpoints) into a staging directory and copies them into the storage path with pyarrow's
`copy_files`, every second here (`TUNE_GLOBAL_CHECKPOINT_S`). On a local disk that copy
truncates each file and writes it anew, so a driver killed during a copy left an empty
`experiment_state-*.json` and empty trial files, and the resume restored no trial. Here each
local file is written under a temporary name and renamed into place when complete; an object
store (S3, GCS) makes an object appear whole when its upload completes.

Tune deletes no checkpoint here (`CheckpointConfig(num_to_keep=None)`); a trial's superseded
checkpoints go through `drop_superseded_checkpoints`, at the moments `search.tuning.checkpoints` finds safe
with `moment` and `whole_state_began_after`.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import posixpath
import re
import threading

import pyarrow as pa
import pyarrow.fs as pafs

_CHECKPOINT = re.compile(r"checkpoint_(\d+)")
_EXPERIMENT_STATE = re.compile(r"experiment_state-.*\.json")

# Shared by every copy of the filesystem in the driver process (Tune unpickles several), which
# alone writes experiment states: one clock for the moments that the driver's thread notes and
# that Tune's sync thread stamps on state writes, and the moment the latest whole state write of
# each experiment directory began.
_LOCK = threading.Lock()
_CLOCK = itertools.count()
_WHOLE_STATE_BEGAN: dict[str, int] = {}


def moment() -> int:
    """A point in this process's order of events: later calls return larger numbers."""
    with _LOCK:
        return next(_CLOCK)


def whole_state_began_after(experiment_dir: str, since: int) -> bool:
    """Whether an experiment state of `experiment_dir` whose write began after `since` (a
    `moment()`) is whole in storage."""
    with _LOCK:
        return _WHOLE_STATE_BEGAN.get(posixpath.normpath(experiment_dir), -1) > since


def checkpoint_index(path: str) -> int:
    """The index in a checkpoint directory's name (`.../checkpoint_000003`: 3)."""
    match = _CHECKPOINT.fullmatch(posixpath.basename(path))
    if match is None:
        raise ValueError(f"{path!r} is not a checkpoint directory. Allowed: a name like checkpoint_000003")
    return int(match.group(1))


def has_experiment_state(fs: pafs.FileSystem, experiment_dir: str) -> bool:
    """Whether `experiment_dir` holds an experiment state (`experiment_state-*.json`) for Tune to
    restore its trials from."""
    entries = fs.get_file_info(pafs.FileSelector(experiment_dir, allow_not_found=True))
    return any(entry.type == pafs.FileType.File and _EXPERIMENT_STATE.fullmatch(entry.base_name) for entry in entries)


def drop_superseded_checkpoints(fs: pafs.FileSystem, trial_dir: str, keep_from: int) -> list[str]:
    """Delete, through `fs`, each checkpoint directory of `trial_dir` whose index is below
    `keep_from`; return their paths, oldest first."""
    entries = fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True))
    older = sorted((entry.path for entry in entries if entry.type == pafs.FileType.Directory
                    and _CHECKPOINT.fullmatch(entry.base_name) and checkpoint_index(entry.path) < keep_from),
                   key=checkpoint_index)
    for path in older:
        fs.delete_dir(path)
    return older


def drop_trial_directories(fs: pafs.FileSystem, experiment_dir: str, keep: set[str]) -> list[str]:
    """Delete, through `fs`, each trial directory of `experiment_dir` (`trial_...`) whose name is
    not in `keep`; return their paths."""
    entries = fs.get_file_info(pafs.FileSelector(experiment_dir, allow_not_found=True))
    dropped = [entry.path for entry in entries if entry.type == pafs.FileType.Directory
               and entry.base_name.startswith("trial_") and entry.base_name not in keep]
    for path in dropped:
        fs.delete_dir(path)
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
        if not self._file.closed:
            self._file.close()
            os.replace(self._temporary, self._path)


class _StateOnClose(io.BytesIO):
    """An experiment state, held until closed: then written whole if it parses, and the moment
    its write began noted for `whole_state_began_after`."""

    def __init__(self, storage: RunStorage, path: str):
        super().__init__()
        self._storage, self._path = storage, path
        self._began = moment()

    def close(self) -> None:
        if self.closed:
            return
        data = self.getvalue()
        super().close()
        try:
            json.loads(data.decode())
        except ValueError:  # UnicodeDecodeError is one
            # Tune rewrites its staging copy of the state in place while an earlier sync may be
            # reading it; the half it read is dropped, and the next sync brings a whole one.
            return
        with self._storage.open_whole(self._path) as stream:
            stream.write(data)
        experiment_dir = posixpath.normpath(posixpath.dirname(self._path))
        with _LOCK:
            _WHOLE_STATE_BEGAN[experiment_dir] = max(self._began, _WHOLE_STATE_BEGAN.get(experiment_dir, -1))


class RunStorage(pafs.FileSystemHandler):
    """`base` (pyarrow's filesystem of the run's directory or URI) as Tune's storage:
    `open_output_stream` writes each file whole. Pickles (with `base`) into every Ray worker that writes a
    trial's files."""

    def __init__(self, base: pafs.FileSystem | None = None):
        self.base = base if base is not None else pafs.LocalFileSystem()
        self._local = isinstance(self.base, pafs.LocalFileSystem)

    def __reduce__(self):
        return RunStorage, (self.base,)

    def __eq__(self, other) -> bool:
        return isinstance(other, RunStorage) and self.base.equals(other.base)

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return f"whole-{self.base.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.base.normalize_path(path)

    def get_file_info(self, paths):
        return self.base.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.base.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.base.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.base.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of the root directory")

    def delete_file(self, path: str) -> None:
        self.base.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.base.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self.base.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)

    def open_input_stream(self, path: str):
        return self.base.open_input_stream(path)

    def open_input_file(self, path: str):
        return self.base.open_input_file(path)

    def open_output_stream(self, path: str, metadata):
        if _EXPERIMENT_STATE.fullmatch(posixpath.basename(path)):
            return pa.PythonFile(_StateOnClose(self, path), mode="w")
        return self.open_whole(path, metadata)

    def open_whole(self, path: str, metadata=None):
        """A stream whose file appears at `path` whole, when the stream is closed."""
        if self._local:
            return pa.PythonFile(_ReplaceOnClose(path), mode="w")
        return self.base.open_output_stream(path, compression=None, metadata=metadata)

    def open_append_stream(self, path: str, metadata):
        return self.base.open_append_stream(path, compression=None, metadata=metadata)


def run_filesystem(base: pafs.FileSystem | None = None) -> pafs.FileSystem:
    """Tune's `storage_filesystem` for a run on `base` (a local directory when None)."""
    return pafs.PyFileSystem(RunStorage(base))
