"""Where a run lives: a directory (local or shared, such as NFS), or a URI that Ray's
storage understands (`s3://`, `gs://`, `abfs://`, `hdfs://`, also with pyarrow's query
options: `s3://bucket/runs?endpoint_override=host:9000&scheme=http` for MinIO).

With a URI, Ray Tune writes every experiment (trial results, checkpoints, its state)
there directly from whichever node runs the trial, and the tokenized data is uploaded there
once, before any trial, for every node to read. The driver keeps a working copy of the run
directory on its own disk, `<cache>/remote-runs/<uri as a path>/<name>`: it writes its own
files there (config, data, ASHA's rungs, the analysis' outputs) and pushes them to the URI;
it pulls each experiment back after it ran, for the analysis (which reads local files
only). A resume pulls the whole run first, so it works from any machine.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rundir.files import download_tree, is_uri, join_uri, remove, upload, without_trial_checkpoints
from rundir.layout import DATA, DRIVER_PID, EXPERIMENTS, RAY_SESSION


class LocationError(ValueError):
    """The output cannot hold the run (not writable, not a URI pyarrow opens): bad input."""


@dataclass(frozen=True)
class RunLocation:
    """`local` is the run directory the driver and the analysis read; `remote` the run's
    URI when `output` is one (Tune's storage then), else None."""

    local: Path
    remote: str | None = None

    @property
    def storage(self) -> str:
        """Where Tune keeps the run's experiments (each a sub-directory), as a path on
        `storage_filesystem()`."""
        return self._fs()[1] if self.remote else str(self.local.resolve())

    def experiment_storage(self, name: str) -> str:
        """Experiment `name`'s directory as Tune stores it, on `storage_filesystem()`."""
        return f"{self.storage}/{name}"

    def storage_filesystem(self):
        """The filesystem Tune writes the run through, the directory's or the URI's
        (`rundir.atomicfs`): every file appears whole, the experiment state included, so a kill
        at any moment leaves a run that resumes."""
        from rundir.atomicfs import run_filesystem

        return run_filesystem(self._fs()[0] if self.remote else None)

    def data_dir(self) -> str:
        """The tokenized data as every node reads it."""
        return self.path_of(DATA)

    def path_of(self, *parts: str) -> str:
        """The path or URI, as Tune stores it, of `parts` under the run: an experiment, a
        trial's checkpoint."""
        return join_uri(self.remote, *parts) if self.remote else str(self.local.joinpath(*parts).resolve())

    # --- the remote copy (each a no-op for a plain directory) ---

    def _fs(self):
        fs, path = _filesystem(self.remote)
        return fs, path.rstrip("/")

    def check_writable(self) -> None:
        """Create and delete a probe where the run's directory will be made (at the URI, for a
        remote run): a run directory that is a file, a path that cannot be created, a wrong
        bucket, missing credentials or an unreachable endpoint is an input error before anything runs."""
        if not self.remote:
            if self.local.exists() and not self.local.is_dir():  # --overwrite replaces a run, never a file
                raise LocationError(f"output {str(self.local.parent)!r} cannot hold the run {self.local.name!r}: "
                                    f"{str(self.local)!r} is a file, not a run directory; it was not touched. "
                                    f"Fix: choose another --name or --output")
            existing = self.local.parent.absolute()
            while not existing.exists():
                existing = existing.parent
            try:  # what creating the run's directories will do there, leaving nothing behind
                os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=existing))
            except OSError as error:
                raise LocationError(f"output {str(self.local.parent)!r} cannot hold the run: {str(existing)!r} "
                                    f"{'is not a directory' if existing.is_file() else 'refuses new directories'} "
                                    f"({error.strerror or error}). Fix: choose an --output directory you can write to") from None
            return
        fs, path = self._fs()
        probe = f"{path}/.write-probe-{os.getpid()}"
        try:
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(probe) as stream:
                stream.write(b"lora-search")
            fs.delete_file(probe)
        except Exception as error:  # noqa: BLE001 - pyarrow raises OSError and more, all of them mean "not writable"
            raise LocationError(f"output {self.remote!r} is not writable ({type(error).__name__}: "
                                f"{str(error).splitlines()[0] if str(error) else 'no message'}). "
                                "Fix: check the URI, its credentials and that the bucket exists") from None

    def remote_exists(self) -> bool:
        """True when the URI already holds anything."""
        import pyarrow.fs as pafs

        if not self.remote:
            return False
        fs, path = self._fs()
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return False
        if info.type == pafs.FileType.File:
            return True
        return bool(fs.get_file_info(pafs.FileSelector(path, recursive=False)))

    def delete_remote(self) -> None:
        if self.remote:
            remove(self.remote)

    def push(self, data: bool = False) -> None:
        """Upload the driver's own files (not the experiments: Tune wrote those there; the
        tokenized data only with `data`, once, when the run starts)."""
        if not self.remote:
            return
        for entry in sorted(self.local.iterdir()):
            if entry.name in EXPERIMENTS or entry.name in (DRIVER_PID, RAY_SESSION) or ".tmp" in entry.name:
                continue
            if entry.name == DATA and not data:
                continue
            upload(entry, join_uri(self.remote, entry.name))

    def pull(self, names: tuple[str, ...] | None = None) -> None:
        """Download `names` (default: the whole run but its data) from the URI into the local copy,
        replacing what the local copy had of them. Trial checkpoints (but the retrained
        pick's) stay at the URI, see `without_trial_checkpoints`: only their directories are
        made locally, so the latest one is known."""
        import pyarrow.fs as pafs

        if not self.remote:
            return
        fs, path = self._fs()
        self.local.mkdir(parents=True, exist_ok=True)
        if names is None:
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                return
            # all but the tokenized data: trials read it at the URI, the driver never needs it again
            names = tuple(name for name in (Path(info.path).name for info in fs.get_file_info(pafs.FileSelector(path)))
                          if name != DATA)
        for name in names:
            download_tree(join_uri(self.remote, name), self.local / name,
                          keep=lambda relative, name=name: without_trial_checkpoints(f"{name}/{relative}"))


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as error:  # noqa: BLE001
        raise LocationError(f"output {uri!r} is not a storage URI that pyarrow (Ray's storage) can open "
                          f"({type(error).__name__}: {error}). Allowed: a directory, or s3://, gs://, abfs://, "
                          "hdfs:// or file:// URIs") from None


def locate(output: str, name: str, cache: Path) -> RunLocation:
    """The run's location for `output` and `name`; a URI gets its working copy under `cache`."""
    if not is_uri(output):
        return RunLocation(Path(output) / name)
    _filesystem(output)  # an unknown scheme is an input error now
    scheme, rest = output.split("://", 1)
    rest = rest.split("?", 1)[0].strip("/")
    return RunLocation(cache / "remote-runs" / scheme / rest / name, join_uri(output, name))
