"""Tune's storage on a local disk writes every file whole: a kill during a sync leaves the
previous copy, never an empty or half-written file."""

import os
import pickle

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
