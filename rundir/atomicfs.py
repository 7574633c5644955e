"""The filesystem through which Ray Tune writes a run: on which every file appears whole or not
at all, and no checkpoint goes while the saved experiment state still names it.

Ray Tune writes a run's files (its experiment state, each trial's params.json, result.json and
checkpoints) into a staging directory and copies them into the storage path with pyarrow's
`copy_files`, every second here (`TUNE_GLOBAL_CHECKPOINT_S`). On a local disk that copy
truncates each file and writes it anew, so a driver killed during a copy left an empty
`experiment_state-*.json` and empty trial files, and the resume restored no trial. Here each
local file is written under a temporary name and renamed into place when complete; an object
store (S3, GCS) makes an object appear whole when its upload completes.

Tune also deletes a trial's previous checkpoint the moment it registers the next, and saves the
experiment state that names the new one a moment later: a kill between the two left a state naming
a deleted checkpoint, and that trial failed on resume. Here a checkpoint goes only once an
experiment state that names a newer checkpoint of its trial, and not it, is whole in storage.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import threading

import pyarrow as pa
import pyarrow.fs as pafs

_CHECKPOINT = re.compile(r"checkpoint_(\d+)")
_EXPERIMENT_STATE = re.compile(r"experiment_state-.*\.json")
_DIGITS = 6  # Tune names checkpoints checkpoint_000000, checkpoint_000001, ...

# What this driver process owes storage, shared by every copy of the filesystem in it (Tune
# unpickles one per checkpoint): the checkpoints Tune asked to delete, and the experiment
# directories already searched for checkpoints that an earlier, killed driver left.
_LOCK = threading.Lock()
_PENDING: set[str] = set()
_SEARCHED: set[str] = set()


def named_checkpoints(state: str, trial_dir: str) -> set[int]:
    """The indices of `trial_dir`'s checkpoints that an experiment state names. Tune keeps each
    trial's checkpoints in a pickle that the JSON holds hex-encoded, so a path shows there as its
    hex, elsewhere as itself; a false match only keeps a checkpoint longer."""
    prefix = f"{trial_dir}/checkpoint_"
    found = {int(m.group(1)) for m in re.finditer(re.escape(prefix) + rf"(\d{{{_DIGITS}}})", state)}
    encoded = prefix.encode().hex()
    at = state.find(encoded)
    while at >= 0:
        digits = state[at + len(encoded): at + len(encoded) + 2 * _DIGITS]
        try:
            text = bytes.fromhex(digits).decode()
            if text.isdigit():
                found.add(int(text))
        except ValueError:
            pass
        at = state.find(encoded, at + 1)
    return found


def _checkpoints_in(fs: pafs.FileSystem, experiment_dir: str) -> set[str]:
    """Every checkpoint directory of every trial under `experiment_dir`."""
    out = set()
    for trial in fs.get_file_info(pafs.FileSelector(experiment_dir, allow_not_found=True)):
        if trial.type == pafs.FileType.Directory:
            out |= {entry.path for entry in fs.get_file_info(pafs.FileSelector(trial.path, allow_not_found=True))
                    if entry.type == pafs.FileType.Directory and _CHECKPOINT.fullmatch(entry.base_name)}
    return out


def drop_superseded_checkpoints(fs: pafs.FileSystem, experiment_dir: str, state: str) -> list[str]:
    """Delete, through `fs`, each checkpoint under `experiment_dir` that Tune asked to delete
    (or that a killed driver left, the first time this process saves the experiment's state)
    where `state`, the experiment state now whole in storage, names a newer checkpoint of the
    same trial and not it; return their paths. A newer checkpoint that the state does not name
    yet (written by the trial, not yet registered by Tune) stays, and so does every checkpoint
    Tune keeps, since the state names each."""
    with _LOCK:
        candidates = {path for path in _PENDING if path.startswith(experiment_dir + "/")}
        first = experiment_dir not in _SEARCHED
        _SEARCHED.add(experiment_dir)
    if first:  # listed outside the lock: Tune's own thread must not wait on a bucket to note a deletion
        candidates |= _checkpoints_in(fs, experiment_dir)
    dropped, named_by_trial = [], {}
    for path in sorted(candidates):
        trial_dir, name = posixpath.split(path)
        index = int(_CHECKPOINT.fullmatch(name).group(1))
        if trial_dir not in named_by_trial:  # one reading of the state per trial, however many candidates
            named_by_trial[trial_dir] = named_checkpoints(state, trial_dir)
        named = named_by_trial[trial_dir]
        if named and index < max(named) and index not in named:
            try:
                fs.delete_dir(path)
            except FileNotFoundError:
                pass
            dropped.append(path)
    with _LOCK:
        _PENDING.difference_update(dropped)
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
    """An experiment state, held until closed: then written whole if it parses, and the
    checkpoints it no longer needs are dropped."""

    def __init__(self, storage: RunStorage, path: str):
        super().__init__()
        self._storage, self._path = storage, path

    def close(self) -> None:
        if self.closed:
            return
        data = self.getvalue()
        super().close()
        try:
            state = data.decode()
            json.loads(state)
        except ValueError:  # UnicodeDecodeError is one
            # Tune rewrites its staging copy of the state in place while an earlier sync may be
            # reading it; the half it read is dropped, and the next sync brings a whole one.
            return
        with self._storage.open_whole(self._path) as stream:
            stream.write(data)
        drop_superseded_checkpoints(self._storage.base, posixpath.dirname(self._path), state)


class RunStorage(pafs.FileSystemHandler):
    """`base` (pyarrow's filesystem of the run's directory or URI) as Tune's storage:
    `open_output_stream` writes each file whole, and `delete_dir` leaves a checkpoint to
    `drop_superseded_checkpoints`. Pickles (with `base`) into every Ray worker that writes a
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
        if _CHECKPOINT.fullmatch(posixpath.basename(path)):
            with _LOCK:  # goes once a whole experiment state no longer needs it
                _PENDING.add(path)
            return
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
