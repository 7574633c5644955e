"""Tune's storage on a local disk writes every file whole: a kill during a sync leaves the
previous copy, never an empty or half-written file. A checkpoint Tune deletes stays until a
whole experiment state names a newer one (in a bucket too: tests/test_storage.py)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pyarrow.fs as pafs

from rundir.atomicfs import run_filesystem


def test_a_file_being_written_leaves_the_previous_copy_in_place_until_it_is_complete(tmp_path):
    fs = run_filesystem()
    target = tmp_path / "experiment_state.json"
    target.write_text('{"old": true}')

    with fs.open_output_stream(str(target)) as stream:
        stream.write(b'{"new"')
        assert target.read_text() == '{"old": true}'  # what a kill at this moment would leave
    assert target.read_text() == '{"new"'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiment_state.json"]  # no temporary left


def test_a_synced_tree_arrives_complete_through_pyarrows_copy(tmp_path):
    staging = tmp_path / "staging"
    (staging / "trial_a").mkdir(parents=True)
    (staging / "trial_a" / "result.json").write_text("{}\n" * 1000)
    (staging / "params.json").write_text('{"r": 8}')

    pafs.copy_files(str(staging), str(tmp_path / "run"), destination_filesystem=run_filesystem())

    assert (tmp_path / "run" / "trial_a" / "result.json").read_text() == "{}\n" * 1000
    assert (tmp_path / "run" / "params.json").read_text() == '{"r": 8}'


def test_the_filesystem_pickles_into_workers_and_still_writes_atomically(tmp_path):
    fs = pickle.loads(pickle.dumps(run_filesystem()))
    with fs.open_output_stream(str(tmp_path / "x")) as stream:
        stream.write(b"abc")
        assert not (tmp_path / "x").exists() and len(os.listdir(tmp_path)) == 1
    assert (tmp_path / "x").read_bytes() == b"abc"


_SYNC_FOREVER = """
import sys, pyarrow.fs as pafs
from ray.train._internal.storage import _upload_to_fs_path
from rundir.atomicfs import run_filesystem
fs = run_filesystem() if sys.argv[3] == "atomic" else pafs.LocalFileSystem()
print("syncing", flush=True)
while True:
    _upload_to_fs_path(sys.argv[1], fs, sys.argv[2])  # what Tune calls to sync its staging directory
"""


def _kill_during_syncs(tmp_path, filesystem: str, kills: int = 5) -> list[str]:
    """SIGKILL a process that syncs a staging directory into a run the way Tune does, `kills`
    times, each a few milliseconds into its syncs; return what the run's state file held after each."""
    staging, run = tmp_path / "staging", tmp_path / "run"
    staging.mkdir()
    (staging / "experiment_state.json").write_text(json.dumps({"trials": "x" * 32_000_000}))  # a wide window
    run.mkdir()
    (run / "experiment_state.json").write_text(json.dumps({"trials": "previous"}))
    seen = []
    for k in range(kills):
        process = subprocess.Popen([sys.executable, "-c", _SYNC_FOREVER, str(staging), str(run), filesystem],
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "syncing"
        time.sleep(0.3 + 0.07 * k)
        process.send_signal(signal.SIGKILL)
        process.wait()
        seen.append((run / "experiment_state.json").read_text())
    return seen


def test_a_sync_killed_midway_leaves_a_whole_state_file(tmp_path):
    for text in _kill_during_syncs(tmp_path, "atomic"):
        json.loads(text)  # the previous copy or the new one, whole


def test_premise_pyarrows_own_local_filesystem_leaves_half_a_file_when_killed_midway(tmp_path):
    seen = _kill_during_syncs(tmp_path, "plain")
    assert any(not _parses(text) for text in seen), "every kill landed between two syncs: widen the window"


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _trial_with_checkpoints(tmp_path, *indices: int) -> list[str]:
    trial = tmp_path / "tune" / "trial_a"
    for index in indices:
        (trial / f"checkpoint_{index:06d}").mkdir(parents=True)
        (trial / f"checkpoint_{index:06d}" / "adapter_model.safetensors").write_bytes(b"w")
    return [str(trial / f"checkpoint_{index:06d}") for index in indices]


def _tune_state_naming(*registered: str) -> bytes:
    """An experiment state as Tune writes one, its trial's checkpoints registered in this order
    by Tune's own checkpoint manager (which keeps one, asking the filesystem to delete the rest)."""
    from ray.train import CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    metadata = _TrainingRunMetadata()
    metadata.checkpoint_manager = _CheckpointManager(CheckpointConfig(num_to_keep=1))
    for path in registered:
        metadata.checkpoint_manager.register_checkpoint(
            _TrainingResult(checkpoint=Checkpoint(path, filesystem=run_filesystem()), metrics={}))
    return json.dumps({"trial_data": [["{}", metadata.get_json_state()]]}).encode()


def _write(fs, path, data: bytes) -> None:
    with fs.open_output_stream(str(path)) as stream:
        stream.write(data)


def test_a_checkpoint_tune_deletes_stays_until_a_whole_state_names_a_newer_one(tmp_path):
    fs = run_filesystem()
    first, second, unregistered = _trial_with_checkpoints(tmp_path, 0, 1, 2)
    state = tmp_path / "tune" / "experiment_state-x.json"
    named_first = _tune_state_naming(first)
    _write(fs, state, named_first)

    newer = _tune_state_naming(first, second)  # registering the second deletes the first, as Tune does
    assert os.path.isdir(first), "deleted while the state on disk still names it"
    _write(fs, state, newer[: len(newer) // 2])  # half a state: what a sync reading a half-rewritten source copies
    assert os.path.isdir(first) and state.read_bytes() == named_first
    _write(fs, state, newer)

    assert not os.path.exists(first)
    assert os.path.isdir(second) and os.path.isdir(unregistered)  # named; written by the trial, not yet registered


def test_a_checkpoint_left_by_a_killed_driver_goes_with_the_next_state_and_none_of_another_trial(tmp_path):
    fs = run_filesystem()
    old, current = _trial_with_checkpoints(tmp_path, 3, 4)
    other = tmp_path / "tune" / "trial_b" / "checkpoint_000000"
    other.mkdir(parents=True)
    _write(fs, tmp_path / "tune" / "experiment_state-y.json", _tune_state_naming(current))
    assert not os.path.exists(old) and os.path.isdir(current) and other.is_dir()


def test_other_directories_are_deleted_at_once(tmp_path):
    (tmp_path / "trial_a").mkdir()
    run_filesystem().delete_dir(str(tmp_path / "trial_a"))
    assert not (tmp_path / "trial_a").exists()
