"""Tune's storage on a local disk writes every file whole: a kill during a sync leaves the
previous copy, never an empty or half-written file."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pyarrow.fs as pafs

from rundir.atomicfs import atomic_local_filesystem


def test_a_file_being_written_leaves_the_previous_copy_in_place_until_it_is_complete(tmp_path):
    fs = atomic_local_filesystem()
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

    pafs.copy_files(str(staging), str(tmp_path / "run"), destination_filesystem=atomic_local_filesystem())

    assert (tmp_path / "run" / "trial_a" / "result.json").read_text() == "{}\n" * 1000
    assert (tmp_path / "run" / "params.json").read_text() == '{"r": 8}'


def test_the_filesystem_pickles_into_workers_and_still_writes_atomically(tmp_path):
    fs = pickle.loads(pickle.dumps(atomic_local_filesystem()))
    with fs.open_output_stream(str(tmp_path / "x")) as stream:
        stream.write(b"abc")
        assert not (tmp_path / "x").exists() and len(os.listdir(tmp_path)) == 1
    assert (tmp_path / "x").read_bytes() == b"abc"


_SYNC_FOREVER = """
import sys, pyarrow.fs as pafs
from ray.train._internal.storage import _upload_to_fs_path
from rundir.atomicfs import atomic_local_filesystem
fs = atomic_local_filesystem() if sys.argv[3] == "atomic" else pafs.LocalFileSystem()
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
