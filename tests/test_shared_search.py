"""resources.packing=shared: trials train in the slots of a shared trainer, each still a Tune trial
of its own. Bad packing settings are bad input before Ray starts; a shared trial's process is a
client that imports no torch; a search of 4 concurrent trials on one CPU trainer runs to its pick,
one SIGKILLed and resumed ends with every trial once, and one whose trainer is SIGKILLed carries its
trials on from their checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import alive, assert_steps_in_order, processes_in_session, run_cli, start_cli, trial_reports, write_run_config
from search.cluster.resume import resume_check
from search.config import PROCESSES, PROCESSES_FOR, SHARED, load, resolve_packing, to_dict
from search.run import main

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS = 12
SEARCH_TRIALS = 6


@pytest.mark.parametrize("setting, named", [
    ("resources.packing=threads", "resources.packing is 'threads'; allowed: auto, shared, processes"),
    ("resources.pack_slots=0", "resources.pack_slots is 0; allowed: an integer >= 1"),
])
def test_a_bad_packing_setting_exits_2_naming_what_is_allowed_before_ray_starts(setting, named):
    code, out, err, heavy = run_cli("--set", setting)
    assert (code, out, heavy) == (2, "", set())
    assert named in err and "Traceback" not in err


def test_a_dora_trial_of_a_shared_search_trains_in_a_process_of_its_own_beside_the_packed_ones(tiny_model_dir,
                                                                                                 tmp_path, capsys):
    priors = ("[{module_set: attention_qv, r: 2, use_dora: true, learning_rate: 1.0e-2}, "
              "{module_set: attention_qv, r: 4, use_dora: false, learning_rate: 1.0e-2}]")
    sets = [f"model.path={tiny_model_dir}", "search.module_sets=[attention_qv]", "search.ranks=[2,4]",
            "search.learning_rate=[1e-3,2e-2]", "search.use_dora=[false,true]", f"search.priors={priors}",
            "budget.num_samples=3", "budget.max_steps=6", "budget.eval_every=3", "budget.grace_period=6",
            "budget.batch_size=4", "data.eval_examples=8", "data.eval_generate_examples=0", "resources.packing=shared",
            "selection.confirm_top_k=0", "selection.cheaper=0", "selection.promote=false"]
    args = ["--output", str(tmp_path), "--name", "dora", *[x for s in sets for x in ("--set", s)]]
    assert main([*args, "--dry-run"]) == 0
    assert "DoRA trials train in processes of their own beside it" in capsys.readouterr().out
    assert main(args) == 0

    trials = pd.read_csv(tmp_path / "dora" / "trials.csv")
    assert (trials.status == "finished").all() and (trials.step == 6).all()
    assert list(trials[trials.use_dora].step_mode) == ["eager"]  # trainables/trial.py's own step on a CPU
    assert set(trials[~trials.use_dora].step_mode) == {"packed"}
    reported = {rows[0]["config"]["lora_config"]["use_dora"]: rows[-1] for rows in trial_reports(tmp_path / "dora").values()}
    assert "pack_size" not in reported[True] and reported[False]["pack_size"] >= 1
    assert "The 1 DoRA trial(s) trained in processes of their own" in (tmp_path / "dora" / "report.md").read_text()


# Ray told of one GPU this CPU machine does not have: the trainer and a DoRA trial must share it
GPU_DRIVER = """
import ray, sys
ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
         runtime_env={"env_vars": {"PYTHONPATH": %r}})
import search.inputs.prepare
search.inputs.prepare.check_device = lambda *args, **kwargs: None  # the GPU Ray was told of is not this machine's
from search.run import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_trainer_leaves_a_dora_trial_its_share_of_the_gpu_named_to_ray(tiny_model_dir, tmp_path):
    # with the whole GPU the trainer held, the DoRA trial would wait for it for good
    from faults import run_search

    priors = ("[{module_set: attention_qv, r: 2, use_dora: true, learning_rate: 1.0e-2}, "
              "{module_set: attention_qv, r: 4, use_dora: false, learning_rate: 1.0e-2}]")
    sets = [f"model.path={tiny_model_dir}", "model.dtype=float32", "search.module_sets=[attention_qv]",
            "search.ranks=[2,4]", "search.learning_rate=[1e-3,2e-2]", "search.use_dora=[false,true]",
            f"search.priors={priors}", "budget.num_samples=2", "budget.max_steps=6", "budget.eval_every=3",
            "budget.grace_period=6", "budget.batch_size=4", "data.eval_examples=8", "data.eval_generate_examples=0",
            "resources.packing=shared", "resources.gpus_per_trial=0.5", "selection.confirm_top_k=0", "selection.cheaper=0",
            "selection.promote=false"]
    code, _, trials = run_search(GPU_DRIVER, tmp_path, "gpu", sets)
    assert code == 0
    assert (trials.status == "finished").all() and sorted(trials.step_mode) == ["eager", "packed"]


def test_shared_packing_of_conv1d_layers_exits_2_before_ray_starts(tmp_path):
    import transformers

    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=128).save_pretrained(gpt2)
    code, out, err, heavy = run_cli("--set", f"model.path={gpt2}", "--set", "search.module_sets=[mlp]",
                                 "--set", "resources.packing=shared", "--dry-run")
    assert (code, out) == (2, "")
    assert "ray" not in heavy
    assert "adapt Conv1D layers" in err and "Fix: use resources.packing=processes or auto" in err


def test_auto_packing_resolves_by_device_with_its_reason_and_a_named_packing_stays_as_named():
    for cuda in (False, True):
        packing, reason = resolve_packing(load(None, []), cuda)
        assert packing in (PROCESSES, SHARED) and "bench/results/" in reason
        assert resolve_packing(load(None, ["resources.packing=shared"]), cuda) == (SHARED, "")
        assert resolve_packing(load(None, ["resources.packing=processes"]), cuda) == (PROCESSES, "")
    assert resolve_packing(load(None, []), False)[0] == PROCESSES  # measured slower on the 2-core CPU
    assert resolve_packing(load(None, []), True)[0] == SHARED  # measured faster on an H100


def test_auto_keeps_processes_on_a_gpu_for_what_the_pack_was_not_measured_on_or_cannot_train_and_says_which():
    quantized = load(None, ["model.quantization=4bit"])
    checkpointed = load(None, ["model.gradient_checkpointing=true"])
    assert resolve_packing(quantized, True) == (PROCESSES, PROCESSES_FOR["quantized"])
    assert resolve_packing(checkpointed, True) == (PROCESSES, PROCESSES_FOR["checkpointed"])
    assert resolve_packing(load(None, []), True, conv1d=True) == (PROCESSES, PROCESSES_FOR["conv1d"])
    dora = load(None, ["search.use_dora=[false,true]"])
    assert resolve_packing(dora, True) == (PROCESSES, PROCESSES_FOR["beside"])
    assert resolve_packing(load(None, []), True, experts=True) == (PROCESSES, PROCESSES_FOR["beside"])
    both = resolve_packing(load(None, ["model.quantization=4bit", "model.gradient_checkpointing=true"]), True)
    assert both[0] == PROCESSES and "model.quantization" in both[1] and "gradient_checkpointing" in both[1]
    # named packings and the CPU's choice are not second-guessed
    assert resolve_packing(load(None, ["model.quantization=4bit", "resources.packing=shared"]), True) == (SHARED, "")
    assert resolve_packing(quantized, False)[0] == PROCESSES and "2-core CPU" in resolve_packing(quantized, False)[1]


def test_the_packing_line_says_when_a_trainer_compiles_its_layers_and_what_trains_beside_it():
    from search.config import ResourcesConfig
    from search.inputs.dryrun import packing_line
    from search.resources.plan import ResourcePlan

    def plan(layers: bool) -> ResourcePlan:  # as a GPU run resolves it
        return ResourcePlan(packing=SHARED, packing_reason="", gpus_per_trial=0.125, compiled=True,
                            layers_compiled=layers, gpu_memory_gb=80.0, memory_probe=None)

    asked = ResourcesConfig(packing=SHARED, pack_compile_layers=True)
    assert "decoder layers compiled into the captured step (resources.pack_compile_layers=true: the first search " \
           "on a machine compiles them, later ones read inductor's cache)" in packing_line(asked, plan(True))
    assert "(resources.pack_compile_layers=auto:" in packing_line(ResourcesConfig(packing=SHARED), plan(True))
    assert "decoder layers" not in packing_line(asked, plan(False))
    assert "DoRA trials train in processes of their own beside it" in packing_line(asked, plan(False), dora=True)


def test_a_plan_applied_to_the_config_records_what_auto_resolved_to_for_the_layers_compile():
    from search.config import Config
    from search.resources.plan import ResourcePlan

    for layers in (True, False):
        plan = ResourcePlan(packing=SHARED, packing_reason="", gpus_per_trial=0.125, compiled=True,
                            layers_compiled=layers, gpu_memory_gb=80.0, memory_probe=None)
        resources = plan.applied(Config()).resources
        assert resources.pack_compile_layers is layers and resources.compile is True and resources.packing == SHARED


def test_the_dry_run_says_which_packing_the_run_uses(tiny_model_dir, capsys):
    tiny = ["--set", f"model.path={tiny_model_dir}", "--set", "search.ranks=[2,4]"]
    assert main([*tiny, "--set", "resources.packing=shared", "--set", "resources.pack_slots=4", "--dry-run"]) == 0
    assert "Packing: shared (resources.packing=shared): one trainer per GPU (one on a CPU) holds the base model " \
           "once and trains up to 4 trials' adapters together" in capsys.readouterr().out
    assert main([*tiny, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Packing: processes (resources.packing=auto): every trial is a process of its own" in out
    assert "auto's reason: on an idle 2-core CPU the batched pack of 2 to 8 SmolLM2 trials trained at 1.03x" in out


def test_a_resume_with_another_packing_is_refused_naming_the_one_it_started_with(tmp_path):
    from search.config import ConfigError

    started = load(None, ["resources.packing=processes"])
    record = json.loads((write_run_config(tmp_path) / "run_config.json").read_text())  # resources.packing=processes
    (tmp_path / "run_config.json").write_text(json.dumps({**record, **to_dict(started), "resources": record["resources"]}))
    with pytest.raises(ConfigError, match=r"started with resources.packing=processes.*--set resources.packing=processes"):
        resume_check(tmp_path, load(None, ["resources.packing=shared"]))


def test_a_shared_trials_client_imports_no_torch_transformers_or_peft():
    done = subprocess.run([sys.executable, "-c", "import sys, trainables.placement; "
                           "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _args(tiny_model_dir, output: Path, name: str, *more: str) -> list[str]:
    sets = [f"model.path={tiny_model_dir}", "search.module_sets=[attention_qv,mlp]", "search.ranks=[2,4]",
            "search.learning_rate=[1e-3,2e-2]", f"budget.num_samples={SEARCH_TRIALS}", f"budget.max_steps={MAX_STEPS}",
            "budget.eval_every=3", "budget.grace_period=3", "budget.batch_size=4", "data.eval_examples=8",
            "data.eval_generate_examples=0", "resources.packing=shared", "resources.pack_slots=4", *more]
    return ["--output", str(output), "--name", name, *[x for s in sets for x in ("--set", s)]]


@pytest.fixture(scope="module")
def shared_run(tiny_model_dir, tmp_path_factory):
    """The run directory of an uninterrupted shared search, with the pick retrained, and its log."""
    output = tmp_path_factory.mktemp("shared")
    process = start_cli(_args(tiny_model_dir, output, "shared", "selection.retrain=true"))
    log, _ = process.communicate(timeout=900)
    assert process.returncode == 0, log[-5000:]
    return output / "shared", log


def test_a_shared_search_of_four_concurrent_trials_runs_to_its_exported_pick(shared_run):
    run_dir, log = shared_run
    trials = pd.read_csv(run_dir / "trials.csv")
    searched = trials[trials.origin.isin(["search", "prior"])]
    assert len(searched) == SEARCH_TRIALS
    assert trials.status.isin(["finished", "stopped"]).all(), trials[["trial_id", "status", "error"]].to_string()
    assert (trials[trials.status == "finished"].step == MAX_STEPS).all()
    assert json.loads((run_dir / "run_config.json").read_text())["resources"]["packing"] == SHARED
    pack_sizes = {row["pack_size"] for rows in trial_reports(run_dir).values() for row in rows}
    assert max(pack_sizes) == 4  # four trials trained in one pass
    pick = json.loads((run_dir / "pick.json").read_text())
    assert pick["trial_id"] in set(trials.trial_id)
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()  # the retrained weights


def test_a_shared_run_records_its_trainers_start_which_began_before_rays_and_ended_before_the_first_step(shared_run):
    run_dir, _ = shared_run
    times = json.loads((run_dir / "logs" / "setup_times.json").read_text())
    steps = ["trainer_process_started", "trainer_code_loaded", "trainer_constructing", "trainer_imported", "trainer_model_loaded",
             "pack_constructing", "trainer_data_loaded", "trainers_started"]
    assert [times[step] for step in steps] == sorted(times[step] for step in steps)
    # the trainer's process, started by the driver, was loading the model while Ray started (trainables/host.py)
    assert times["trainer_constructing"] < times["ray_started"] < times["trainers_started"]
    pids = {row["trainer_pid"] for rows in trial_reports(run_dir).values() for row in rows}
    assert len(pids) == 1 and f"process {pids.pop()}" in (run_dir / "logs" / "trainer_host.log").read_text()
    started_at = json.loads((run_dir / "run_config.json").read_text())["started_at"]
    first = min((row for rows in trial_reports(run_dir).values() for row in rows), key=lambda row: row["busy_from"])
    assert times["trainers_started"] < first["busy_from"] - started_at
    # the first trial's way to its step: its client's process, Tune's call, its ask for a slot, the slot
    assert first["worker_started_at"] < first["called_at"] < first["entered_at"] <= first["busy_from"]


def test_a_shared_run_records_where_its_packs_time_went(shared_run):
    run_dir, _ = shared_run
    trainers = json.loads((run_dir / "logs" / "trainer_time.json").read_text())
    assert len(trainers) == 1  # one trainer on a machine without GPUs
    count = trainers[0]["count"]
    search_reports = sum(len(rows) for rows in trial_reports(run_dir).values())
    assert count["checkpoints"] >= search_reports  # one with every report (and the retrain's)
    assert count["opening"] >= len(trial_reports(run_dir)) and count["steps"] >= MAX_STEPS
    assert trainers[0]["seconds"]["steps"] > 0


def test_a_killed_shared_search_resumes_with_every_trial_once(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "killed"
    args = _args(tiny_model_dir, tmp_path, "killed", "selection.promote=false", "selection.confirm_top_k=0",
                 "selection.cheaper=0")
    process = start_cli(args)
    deadline = time.monotonic() + 300
    while sum(map(len, trial_reports(run_dir).values())) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # past the one-second experiment-state snapshot
    process.send_signal(signal.SIGKILL)
    log, _ = process.communicate()
    assert not (run_dir / "trials.csv").exists(), "the run finished before it could be killed:\n" + log[-3000:]

    resumed = start_cli(["--resume", *args])
    log, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, log[-5000:]
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == SEARCH_TRIALS and trials.trial_id.is_unique
    assert trials.status.isin(["finished", "stopped"]).all(), trials[["trial_id", "status", "error"]].to_string()
    configuration = ["module_set", "r", "alpha_ratio", "learning_rate", "use_rslora", "lora_dropout"]
    assert not trials.duplicated(configuration).any(), "a configuration trained twice"
    for trial_id, rows in trial_reports(run_dir).items():
        # within the exactness a pack holds against PEFT (tests/test_packed.py); a batch out of
        # order after the resume would move the step's train loss by far more
        assert_steps_in_order(trial_id, rows, rel=1e-5)
    assert (run_dir / "pick.json").is_file()


def _actor_pids(run_dir: Path) -> list[int]:
    """The run's shared trainers' Ray actors: Ray workers named for the actor's class, with files
    open in the Ray session that the run recorded."""
    session = (run_dir / "ray_session").read_text().strip()  # the session's name
    return [pid for pid in processes_in_session(session)
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::Trainer")]


@pytest.mark.parametrize("killed", ["the process holding its pack", "its Ray actor"])
def test_a_trainer_killed_mid_search_fails_its_trials_with_the_reason_and_retries_carry_them_on(tiny_model_dir,
                                                                                                 tmp_path, killed):
    """The trainer of a new local run is a process the driver started (trainables/host.py) and a Ray
    actor that hands it its calls: either one killed ends both, and Ray makes the actor again with
    a trainer of its own."""
    run_dir = tmp_path / "dying"
    args = _args(tiny_model_dir, tmp_path, "dying", "budget.num_samples=4", "resources.max_failures=1",
                 "selection.promote=false", "selection.confirm_top_k=0", "selection.cheaper=0")
    process = start_cli(args)
    deadline = time.monotonic() + 300
    while not trial_reports(run_dir) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    (first,) = {row["trainer_pid"] for rows in trial_reports(run_dir).values() for row in rows}
    (actor,) = _actor_pids(run_dir)
    assert actor != first  # the pack is in the driver's process for it, not in the actor
    os.kill(first if killed == "the process holding its pack" else actor, signal.SIGKILL)
    log, _ = process.communicate(timeout=900)
    assert process.returncode == 0, log[-5000:]

    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == 4
    assert trials.status.isin(["finished", "stopped"]).all(), trials[["trial_id", "status", "error"]].to_string()
    errors = [path.read_text() for path in (run_dir / "tune").glob("trial_*/error.txt")]
    assert errors, "no trial was in the trainer when it died"
    assert all("TrainerDied: the shared trainer 0 of the run died while it trained this trial" in text
               for text in errors)
    for trial_id, rows in trial_reports(run_dir).items():
        steps = [row["step"] for row in rows]
        assert steps == sorted(set(steps)), f"{trial_id} reported a step twice: {steps}"
    later = {row["trainer_pid"] for rows in trial_reports(run_dir).values() for row in rows} - {first}
    assert len(later) == 1 and not alive(first)  # the trainer Ray made again, in its actor's own process
