"""The shared trainer's process that the driver starts before Ray (trainables/host.py): it loads the
model before its actor asks, answers the actor's calls as the trainer in the actor would, serves
one actor only, and ends with its driver and with the actor that took it; an actor whose host died
ends itself, and one that finds no host of its GPU makes a trainer of its own.
Tiny random-init Llama and real `datasets` splits (tests/conftest.py), on the CPU; the actor's
side runs in this process or, where it must die, in a process of its own."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import shared_trial
from trainables.host import HostAddress, Trainer, TrainerArgs, TrainerHost, gpu_likely, visible_gpu
from trainables.shared import SharedTrainer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def host(trial_setup):
    host = TrainerHost.for_model(trial_setup.base, gpu="")
    yield host
    host.close()


def reports(trainer, trial_id: str) -> list:
    out = []
    while (report := trainer.next_report(trial_id)) is not None:
        out.append(report)
    return out


def exited(host: TrainerHost, within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while host.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not host.running()


def made_without_an_actor(address: HostAddress) -> int:
    """The free slots of the trainer that the host at `address` made at the driver's go, asked
    over its socket as an actor's call is, with no actor ever asking it to make one."""
    connection = address.connect()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            connection.send(("free_slots", ()))
            status, value = connection.recv()
            if status == "returned":
                return value
            assert "has no call" in str(value)  # not made yet: it loads the model, then makes it
            time.sleep(0.05)
        raise AssertionError("the host made no trainer within 120 s of its go")
    finally:
        connection.close()


def test_the_host_makes_its_trainer_at_the_drivers_go_trains_as_the_trainer_in_the_actor_would_and_ends_with_its_driver(
        trial_setup, tmp_path):
    host = TrainerHost.for_model(trial_setup.base, gpu="", trainer=TrainerArgs(trial_setup, 2, 1.0))
    try:
        the_host_serves(host, trial_setup, tmp_path)
    finally:
        host.close()


def the_host_serves(host: TrainerHost, trial_setup, tmp_path) -> None:
    assert made_without_an_actor(host.address) == 2  # while the driver waits for Ray, which makes the actor
    asked = time.time()
    trainer = Trainer(trial_setup, 2, 1.0, host.address)
    startup = trainer.startup()
    assert startup["pack_constructing"] < asked  # the trainer was made before its actor existed
    assert list(startup.values()) == sorted(startup.values())
    assert trainer.free_slots() == 2
    token = trainer.open("a", shared_trial(lr=2e-3, r=4), None)
    hosted = reports(trainer, "a")
    trainer.release("a", token)
    assert {r.report.trainer_pid for r in hosted} == {host.pid}  # it trained in the host, not here

    alone = SharedTrainer(trial_setup, capacity=2)
    try:
        alone.open("a", shared_trial(lr=2e-3, r=4), None)
        here = reports(alone, "a")
    finally:
        alone.stop()
    assert [r.report.step for r in hosted] == [r.report.step for r in here] == [3, 6]
    assert [r.report.eval_loss for r in hosted] == pytest.approx([r.report.eval_loss for r in here], rel=1e-6)
    assert hosted[-1].files.keys() == here[-1].files.keys()
    assert trainer.time_spent()["count"]["steps"] == 6
    with pytest.raises(RuntimeError, match="holds no slot on this trainer"):  # raised there, raised here as it was
        trainer.next_report("never-opened")
    assert trainer.free_slots() == 2  # and it serves on

    host.close(tmp_path / "logs" / "trainer_host.log")  # the driver lets go: the host ends, its output kept
    assert not host.running() and not Path(host.address.socket).exists()
    kept = (tmp_path / "logs" / "trainer_host.log").read_text()
    assert f"process {host.pid}" in kept and trial_setup.model_path in kept


def test_a_host_takes_one_actor_and_an_actor_on_another_gpu_or_after_it_makes_a_trainer_of_its_own(
        trial_setup, host, monkeypatch):
    from trainables.model import forget_base_model

    def trained_in(trainer) -> int:
        trainer.open("a", shared_trial(), None)
        return reports(trainer, "a")[-1].report.trainer_pid

    first = Trainer(trial_setup, 1, 1.0, host.address)
    second = Trainer(trial_setup, 1, 1.0, host.address)
    pids = {"first": trained_in(first), "second": trained_in(second)}
    second.stop()
    forget_base_model()  # this process's next trainer loads its own model, as a new actor's process would
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # Ray gave this actor another GPU than the host's "0"
    elsewhere = Trainer(trial_setup, 1, 1.0, replace(host.address, gpu="0"))
    pids["elsewhere"] = trained_in(elsewhere)
    elsewhere.stop()
    forget_base_model()
    assert pids == {"first": host.pid, "second": os.getpid(), "elsewhere": os.getpid()}


def test_an_actor_that_asks_for_another_trainer_than_its_host_made_makes_its_own_and_the_host_goes(trial_setup):
    from trainables.model import forget_base_model

    host = TrainerHost.for_model(trial_setup.base, gpu="", trainer=TrainerArgs(trial_setup, 2, 1.0))
    try:
        assert made_without_an_actor(host.address) == 2
        trainer = Trainer(trial_setup, 3, 1.0, host.address)  # three slots, not the two the host's trainer has
        assert trainer.free_slots() == 3
        trainer.open("a", shared_trial(), None)
        assert reports(trainer, "a")[-1].report.trainer_pid == os.getpid()
        trainer.stop()
        forget_base_model()
        assert exited(host)  # its trainer's memory is let go
    finally:
        host.close()


def test_an_actor_finds_its_gpu_as_ray_names_it_in_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert (visible_gpu(True), visible_gpu(False)) == ("3", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpu(True) == "0"  # Ray numbers a machine's GPUs from 0 where the list is not set


def test_what_loading_the_model_raised_is_what_the_actor_raises_and_the_host_exits(trial_setup, tmp_path):
    missing = replace(trial_setup, model_path=str(tmp_path / "no-such-model"))
    host = TrainerHost.for_model(missing.base, gpu="")
    try:
        with pytest.raises(Exception, match="no-such-model"):
            Trainer(missing, 1, 1.0, host.address)
        assert exited(host)
    finally:
        host.close(tmp_path / "host.log")


def test_a_host_that_crashes_in_native_code_leaves_its_python_stack_in_its_log(trial_setup, tmp_path):
    """A SIGSEGV sent to the host stands in for a crash in native code (a capture at the edge of
    the GPU's memory), which no handler of Python's catches: the log must still say where it was."""
    host = TrainerHost.for_model(trial_setup.base, gpu="")
    try:
        deadline = time.monotonic() + 120
        while not Path(host.address.socket).exists():  # made after the handler is on
            assert host.running() and time.monotonic() < deadline, "the host never listened"
            time.sleep(0.05)
        os.kill(host.pid, signal.SIGSEGV)
        assert exited(host)
    finally:
        host.close(tmp_path / "host.log")
    log = (tmp_path / "host.log").read_text()
    assert "Fatal Python error: Segmentation fault" in log, log[-2000:]
    assert "trainables/host.py" in log.split("Fatal Python error")[1]


def _actor_in_a_process(setup, address: HostAddress, then: str) -> subprocess.Popen:
    """A Trainer made in a process of its own (as Ray's worker is), which then waits (`then`
    "wait") or calls the trainer once more after its host is gone ("call")."""
    code = ("import pickle, sys, time\n"
            "from trainables.host import Trainer\n"
            "setup, address, then = pickle.load(sys.stdin.buffer)\n"
            "trainer = Trainer(setup, 1, 1.0, address)\n"
            "print(trainer.free_slots(), flush=True)\n"
            "sys.stdin.buffer.read()\n"
            "if then == 'call':\n"
            "    trainer.free_slots()\n"
            "    print('answered', flush=True)\n"
            "time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False,
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    process.stdin.write(pickle.dumps((setup, address, then)))
    process.stdin.flush()
    assert process.stdout.readline().strip() == b"1"  # constructed, and answering through the host
    return process


def test_a_host_exits_when_the_actor_that_took_it_is_killed(trial_setup, host):
    actor = _actor_in_a_process(trial_setup, host.address, "wait")
    actor.send_signal(signal.SIGKILL)
    actor.wait()
    assert exited(host)


def test_an_actor_whose_host_died_ends_itself_for_ray_to_make_it_again(trial_setup, host):
    actor = _actor_in_a_process(trial_setup, host.address, "call")
    os.kill(host.pid, signal.SIGKILL)
    assert exited(host)
    actor.stdin.close()  # now the call
    assert actor.wait(60) == 1
    assert b"answered" not in actor.stdout.read()


def test_bad_data_of_a_shared_run_exits_2_and_its_trainer_process_goes_without_taking_the_gpu(
        tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The driver starts the trainer's process first thing, but lets it take the GPU's memory
    (`go`) only once the data is checked: bad data exits 2 with that process gone."""
    import json

    from search.run import main

    made, went = [], []
    start, go = TrainerHost.__init__, TrainerHost.go

    def starting(self, *args, **kwargs):
        start(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(TrainerHost, "__init__", starting)
    monkeypatch.setattr(TrainerHost, "go", lambda self, *args: (went.append(self), go(self, *args)))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    code = main(["--output", str(tmp_path / "out"), "--set", f"model.path={tiny_model_dir}", "--set",
                 "resources.packing=shared", "--set", f"data.train={wrong}", "--set", "search.ranks=[2,4]"])
    err = capsys.readouterr().err
    assert code == 2 and "data.train" in err, err
    assert len(made) == 1 and not made[0].running() and went == []


def test_the_command_starts_the_trainers_process_before_it_imports_the_libraries_it_diverts_the_logs_of(
        tiny_model_dir, tmp_path):
    """Their imports take seconds, which the trainer's process spends on its own meanwhile."""
    code = ("import sys\n"
            "from trainables.host import TrainerHost\n"
            "def started(self, *args):\n"
            "    print(sorted(m for m in ('datasets', 'optuna', 'pandas', 'torch', 'transformers') if m in sys.modules))\n"
            "    raise SystemExit(0)\n"
            "TrainerHost.__init__ = started\n"
            "from search.run import main\n"
            f"main(['--output', {str(tmp_path)!r}, '--set', 'model.path={tiny_model_dir}', "
            "'--set', 'resources.packing=shared'])\n"
            "print('no trainer process')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.stdout.splitlines() == ["[]"], result.stdout + result.stderr


def test_a_gpu_hidden_by_cuda_visible_devices_is_no_gpu_to_start_a_trainer_process_for(monkeypatch):
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not gpu_likely()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_likely() == Path("/dev/nvidiactl").exists()  # this machine's answer: NVIDIA's driver is there or not


def test_a_host_whose_pack_will_compile_makes_inductors_one_time_setup_before_it_loads_the_weights(
        trial_setup, tmp_path):
    host = TrainerHost(trial_setup.cpu_threads, trial_setup.quantization, trial_setup.trust_remote_code)
    try:
        host.load(trial_setup.base, "", warm=True)
        host.go()
        trainer = Trainer(trial_setup, 1, 1.0, host.address)
        startup = trainer.startup()
        assert startup["trainer_imported"] < startup["compiler_warmed"] < startup["trainer_model_loaded"]
        assert trainer.free_slots() == 1
    finally:
        host.close(tmp_path / "host.log")
    assert "inductor's one-time setup made in" in (tmp_path / "host.log").read_text()


def test_a_host_told_its_model_loads_the_weights_only_after_the_drivers_go(trial_setup):
    host = TrainerHost(trial_setup.cpu_threads, trial_setup.quantization, trial_setup.trust_remote_code)
    try:
        host.load(trial_setup.base, "")
        time.sleep(12)  # longer than the imports and the tiny model's load take on this machine
        went = time.time()
        host.go()
        startup = Trainer(trial_setup, 1, 1.0, host.address).startup()
        assert startup["trainer_imported"] < went < startup["trainer_model_loaded"]
        assert "compiler_warmed" not in startup  # not asked: its pack compiles nothing
    finally:
        host.close()
