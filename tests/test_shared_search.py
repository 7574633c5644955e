"""resources.packing=shared: trials train in the slots of a shared trainer, each still a Tune trial
of its own. Bad packing settings are bad input before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from search.config import PROCESSES, SHARED, load, resolve_packing, to_dict
from search.resume import CREATED_BY, resume_check
from search.run import main
from test_cli import _cli


@pytest.mark.parametrize("setting, named", [
    ("resources.packing=threads", "resources.packing is 'threads'; allowed: auto, shared, processes"),
    ("resources.pack_slots=0", "resources.pack_slots is 0; allowed: an integer >= 1"),
])
def test_a_bad_packing_setting_exits_2_naming_what_is_allowed_before_ray_starts(setting, named):
    code, out, err, heavy = _cli("--set", setting)
    assert (code, out, heavy) == (2, "", set())
    assert named in err and "Traceback" not in err


def test_shared_packing_with_dora_in_the_space_exits_2_before_ray_starts():
    code, out, err, heavy = _cli("--set", "resources.packing=shared", "--set", "search.use_dora=[false,true]")
    assert (code, out, heavy) == (2, "", set())
    assert "DoRA needs its own merged weight" in err
    assert "Fix: use resources.packing=processes or auto" in err and "Traceback" not in err


def test_shared_packing_of_conv1d_layers_exits_2_before_ray_starts(tmp_path):
    import transformers

    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=128).save_pretrained(gpt2)
    code, out, err, heavy = _cli("--set", f"model.path={gpt2}", "--set", "search.module_sets=[mlp]",
                                 "--set", "resources.packing=shared", "--dry-run")
    assert (code, out) == (2, "")
    assert "ray" not in heavy
    assert "adapt Conv1D layers" in err and "Fix: use resources.packing=processes or auto" in err


def test_auto_packing_resolves_to_processes_and_shared_stays_shared():
    assert resolve_packing(load(None, [])) == PROCESSES
    assert resolve_packing(load(None, ["resources.packing=shared"])) == SHARED
    assert resolve_packing(load(None, ["resources.packing=processes"])) == PROCESSES


def test_the_dry_run_says_which_packing_the_run_uses(tiny_model_dir, capsys):
    tiny = ["--set", f"model.path={tiny_model_dir}", "--set", "search.ranks=[2,4]"]
    assert main([*tiny, "--set", "resources.packing=shared", "--set", "resources.pack_slots=4", "--dry-run"]) == 0
    assert "Packing: shared (resources.packing=shared): one trainer per GPU (one on a CPU) holds the base model " \
           "once and trains up to 4 trials' adapters together" in capsys.readouterr().out
    assert main([*tiny, "--dry-run"]) == 0
    assert "Packing: processes (resources.packing=auto, which is processes until" in capsys.readouterr().out


def test_a_resume_with_another_packing_is_refused_naming_the_one_it_started_with(tmp_path):
    from search.config import ConfigError

    started = load(None, ["resources.packing=processes"])
    (tmp_path / "run_config.json").write_text(json.dumps({**to_dict(started), "created_by": CREATED_BY,
                                                          "data_info": {}}))
    with pytest.raises(ConfigError, match=r"started with resources.packing=processes.*--set resources.packing=processes"):
        resume_check(tmp_path, load(None, ["resources.packing=shared"]))
