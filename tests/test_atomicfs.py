"""Tune's storage on a local disk writes every file whole: a kill during a sync leaves the
previous copy, never an empty or half-written file. A trial's superseded checkpoints go once it
has ended and an experiment state saved after that is whole in storage (in a bucket too, and
under kills: tests/test_storage.py, tests/test_resume.py)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs

from rundir.atomicfs import drop_superseded_checkpoints, moment, run_filesystem, whole_state_began_after
from search.tuning.checkpoints import DropSupersededCheckpoints


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


class _Trial:
    """What the callback reads of a Tune trial: its id, whether it ended, its last registered checkpoint."""

    def __init__(self, trial_dir: Path, *indices: int, ended: bool = False):
        for index in indices:
            (trial_dir / f"checkpoint_{index:06d}").mkdir(parents=True)
            (trial_dir / f"checkpoint_{index:06d}" / "adapter_model.safetensors").write_bytes(b"w")
        self.trial_id, self.ended, self.dir = trial_dir.name, ended, trial_dir
        self.checkpoint = SimpleNamespace(path=str(trial_dir / f"checkpoint_{max(indices):06d}"))

    def is_finished(self) -> bool:
        return self.ended

    def kept(self) -> list[str]:
        return sorted(path.name for path in self.dir.glob("checkpoint_*"))


def _state(fs, experiment: Path, data: bytes = b'{"trial_data": []}') -> None:
    with fs.open_output_stream(str(experiment / "experiment_state-x.json")) as stream:
        stream.write(data)


def test_a_state_counts_as_saved_after_a_moment_only_when_its_whole_write_began_after_it(tmp_path):
    fs = run_filesystem()
    before = moment()
    _state(fs, tmp_path, b'{"trial_da')  # half a state: what a sync reading a half-rewritten source copies
    assert not whole_state_began_after(str(tmp_path), before)
    with fs.open_output_stream(str(tmp_path / "experiment_state-x.json")) as stream:
        during = moment()
        stream.write(b"{}")
    assert whole_state_began_after(str(tmp_path), before)
    assert not whole_state_began_after(str(tmp_path), during)  # began earlier, however late it completed
    assert not whole_state_began_after(str(tmp_path / "other"), before)


def test_dropping_keeps_the_given_checkpoint_and_newer_ones_and_touches_nothing_else(tmp_path):
    trial = _Trial(tmp_path / "trial_a", 0, 1, 2, 3)
    (tmp_path / "trial_a" / "result.json").write_text("{}")
    other = _Trial(tmp_path / "trial_b", 0)
    dropped = drop_superseded_checkpoints(run_filesystem(), str(trial.dir), 2)
    assert [Path(path).name for path in dropped] == ["checkpoint_000000", "checkpoint_000001"]
    assert trial.kept() == ["checkpoint_000002", "checkpoint_000003"] and (trial.dir / "result.json").is_file()
    assert other.kept() == ["checkpoint_000000"]


def test_an_ended_trials_older_checkpoints_go_once_a_state_saved_after_its_end_is_whole(tmp_path):
    fs = run_filesystem()
    ending, running = _Trial(tmp_path / "trial_a", 0, 1, 2), _Trial(tmp_path / "trial_b", 0, 1)
    callback = DropSupersededCheckpoints(fs)
    callback.on_step_begin(0, [ending, running])

    late = fs.open_output_stream(str(tmp_path / "experiment_state-x.json"))  # a sync that began before the end
    ending.ended = True
    callback.on_step_end(1, [ending, running])
    assert callback.get_state() is None  # Tune saves the state (nothing of the callback's to keep)
    late.write(b"{}")
    late.close()
    callback.on_step_end(2, [ending, running])
    assert ending.kept() == ["checkpoint_000000", "checkpoint_000001", "checkpoint_000002"]

    _state(fs, tmp_path)  # the copy of the save after the end
    callback.on_step_end(3, [ending, running])
    assert ending.kept() == ["checkpoint_000002"]
    assert running.kept() == ["checkpoint_000000", "checkpoint_000001"]


def test_a_state_saved_before_the_trial_ended_is_not_enough(tmp_path):
    fs = run_filesystem()
    trial = _Trial(tmp_path / "trial_a", 0, 1)
    callback = DropSupersededCheckpoints(fs)
    callback.on_step_begin(0, [trial])
    callback.get_state()
    trial.ended = True
    _state(fs, tmp_path)
    callback.on_step_end(1, [trial])
    assert trial.kept() == ["checkpoint_000000", "checkpoint_000001"]


def test_trials_ended_when_an_experiment_is_restored_lose_their_older_checkpoints_before_its_first_step(tmp_path):
    fs = run_filesystem()
    ended, unfinished = _Trial(tmp_path / "trial_a", 3, 4, ended=True), _Trial(tmp_path / "trial_b", 0, 1)
    DropSupersededCheckpoints(fs).on_step_begin(0, [ended, unfinished])
    assert ended.kept() == ["checkpoint_000004"] and unfinished.kept() == ["checkpoint_000000", "checkpoint_000001"]

    restored_finished = _Trial(tmp_path / "trial_c", 5, 6, ended=True)
    DropSupersededCheckpoints(fs).on_experiment_end([restored_finished])  # a restored experiment with no step left
    assert restored_finished.kept() == ["checkpoint_000006"]


def test_at_the_experiments_end_ended_trials_keep_one_checkpoint_and_unfinished_ones_all(tmp_path):
    fs = run_filesystem()
    ended, stopped = _Trial(tmp_path / "trial_a", 0, 1), _Trial(tmp_path / "trial_b", 0, 1)
    callback = DropSupersededCheckpoints(fs)
    callback.on_step_begin(0, [ended, stopped])
    ended.ended = True
    callback.on_step_end(1, [ended, stopped])
    callback.get_state()  # Tune's last save, forced, and its copy waited for
    _state(fs, tmp_path)
    callback.on_experiment_end([ended, stopped])
    assert ended.kept() == ["checkpoint_000001"] and stopped.kept() == ["checkpoint_000000", "checkpoint_000001"]


def test_an_experiment_state_is_found_only_once_whole(tmp_path):
    """A resume restores Tune's experiment only where a whole state is (search.tuning.tuner.fit_or_restore):
    not in a missing directory, nor from the temporary file of a state still being written."""
    import pyarrow.fs as pafs

    from rundir.atomicfs import has_experiment_state

    fs, experiment = pafs.LocalFileSystem(), tmp_path / "tune"
    assert not has_experiment_state(fs, str(experiment))
    experiment.mkdir()
    (experiment / "tuner.pkl").write_bytes(b"a Tuner")
    (experiment / f".experiment_state-2026-12-06_14-29-49.json.{os.getpid()}.tmp").write_text("{")
    assert not has_experiment_state(fs, str(experiment))
    (experiment / "experiment_state-2026-12-06_14-29-49.json").write_text("{}")
    assert has_experiment_state(fs, str(experiment))
