"""The shared trainer as its clients see it, in this process (the Ray actor around it is
tests/test_shared_search.py's): reports at the eval rounds and the full budget, checkpoints that
continue a trial as if it had never stopped, a diverged trial failing alone, slots freed at once,
and only by the attempt of a trial that opened them.
Tiny random-init Llama (tests/conftest.py), real `datasets` splits, on the CPU."""

from __future__ import annotations

import math

import pytest

from helpers import shared_trial
from trainables.divergence import TrialDiverged
from trainables.shared import SharedTrainer, SlotReport


@pytest.fixture
def trainer(trial_setup):
    trainer = SharedTrainer(trial_setup, capacity=3)
    yield trainer
    trainer.stop()


def reports(trainer: SharedTrainer, trial_id: str) -> list[SlotReport]:
    out = []
    while (report := trainer.next_report(trial_id)) is not None:
        out.append(report)
    return out


def test_a_trainer_says_when_it_began_and_when_it_had_its_imports_model_and_data(trainer):
    import time

    startup = trainer.startup()
    steps = ["trainer_code_loaded", "trainer_constructing", "trainer_imported", "trainer_model_loaded",
             "pack_constructing", "trainer_data_loaded"]
    assert list(startup) == steps  # no pack_prepared: a pack on the CPU captures nothing, so prepares nothing
    assert list(startup.values()) == sorted(startup.values()) and startup["trainer_constructing"] <= time.time()
    assert startup["trainer_data_loaded"] - startup["trainer_constructing"] > 0  # real readings, not one stamp


def test_a_trainer_prepares_its_pack_while_it_reads_its_eval_data_and_tokenizer(trial_setup, monkeypatch):
    """The pack's preparing (seconds of compiling and capturing on a GPU) is the first step's last
    wait: it begins before the constructor reads what only the host needs, not after."""
    import threading

    from trainables.generate import AnswerMetrics

    began, seen = threading.Event(), []
    prepare, for_trial = SharedTrainer._prepare, AnswerMetrics.for_trial.__func__

    def preparing(self):
        began.set()
        prepare(self)

    def reading(cls, *args, **kwargs):
        seen.append(began.wait(20))
        return for_trial(cls, *args, **kwargs)

    monkeypatch.setattr(SharedTrainer, "_prepare", preparing)
    monkeypatch.setattr(AnswerMetrics, "for_trial", classmethod(reading))
    trainer = SharedTrainer(trial_setup, capacity=1)
    try:
        assert seen == [True]
    finally:
        trainer.stop()


def test_a_trainer_given_the_drivers_count_of_its_widest_rows_prepares_for_them_before_it_reads_its_splits(
        trial_setup, monkeypatch):
    import threading
    from dataclasses import replace

    from trainables.data import load_split
    from trainables.step import widest

    counted = widest(row for name in ("search_train", "train") for row in load_split(trial_setup.data_dir, name))
    alone = SharedTrainer(trial_setup, capacity=1)
    alone.stop()
    began, seen = threading.Event(), []
    prepare, read = SharedTrainer._prepare, SharedTrainer._read_splits

    def preparing(self):
        began.set()
        prepare(self)

    def reading(self):
        seen.append(began.wait(20))
        return read(self)

    monkeypatch.setattr(SharedTrainer, "_prepare", preparing)
    monkeypatch.setattr(SharedTrainer, "_read_splits", reading)
    trainer = SharedTrainer(replace(trial_setup, widest_rows=counted), capacity=1)
    try:
        assert seen == [True]
        assert (trainer.pack.reserved_width, trainer.pack.reserved_answers) == counted
        assert (alone.pack.reserved_width, alone.pack.reserved_answers) == counted  # what it counts itself
        assert trainer.splits.keys() == {"search_train", "train"}
    finally:
        trainer.stop()


def test_a_trainer_whose_construction_fails_after_its_pack_began_preparing_leaves_no_stepping_thread(
        trial_setup, monkeypatch):
    import threading

    from trainables.generate import AnswerMetrics

    def unreadable(cls, *args, **kwargs):
        raise RuntimeError("the tokenizer could not be read")

    monkeypatch.setattr(AnswerMetrics, "for_trial", classmethod(unreadable))
    with pytest.raises(RuntimeError, match="tokenizer could not be read"):
        SharedTrainer(trial_setup, capacity=1)
    assert not [t for t in threading.enumerate() if t.name == "shared-trainer"]


def test_a_trainer_set_to_compile_its_layers_tells_its_pack(trial_setup):
    from dataclasses import replace

    for asked in (True, False):
        trainer = SharedTrainer(replace(trial_setup, compile_layers=asked), capacity=1)
        try:
            assert trainer.pack.compile_layers is asked
        finally:
            trainer.stop()


def test_each_trial_reports_at_its_eval_rounds_with_a_checkpoint_of_its_own(trainer):
    import time

    asked = time.time()
    assert trainer.open("a", shared_trial(), None, (asked - 2.0, asked - 9.0))  # its client's clock: called, loaded
    assert trainer.open("b", shared_trial(lr=3e-3, r=8, seed=1, modules=("down_proj",)), None)
    a, b = reports(trainer, "a"), reports(trainer, "b")
    first = a[0].report  # Tune called the client, which asked for a slot (entered), which then opened (busy)
    assert (first.worker_started_at, first.called_at) == (asked - 9.0, asked - 2.0)
    assert first.called_at < asked <= first.entered_at <= first.busy_from
    assert b[0].report.called_at == b[0].report.entered_at  # a caller that says nothing: its call's arrival
    for rows in (a, b):
        assert [r.report.step for r in rows] == [3, 6]
        assert all(math.isfinite(r.report.eval_loss) and r.report.step_mode == "packed" for r in rows)
        assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "trainer_state.pt"} <= set(rows[-1].files)
    assert a[-1].report.trainable_params != b[-1].report.trainable_params
    assert a[-1].report.eval_loss != b[-1].report.eval_loss
    assert a[0].report.pack_size == 2


def test_the_trainer_accounts_for_its_packs_time_job_by_job(trainer):
    import time

    started = time.perf_counter()
    assert trainer.open("a", shared_trial(), None)
    assert trainer.open("b", shared_trial(lr=3e-3, seed=1), None)
    a, b = reports(trainer, "a"), reports(trainer, "b")
    spent = trainer.time_spent()
    assert spent["count"]["opening"] == 2
    assert spent["count"]["checkpoints"] == len(a) + len(b) == 4  # one with each report
    assert spent["count"]["steps"] >= 6  # six steps each, together where both stepped
    assert 2 <= spent["count"]["evaluation"] <= 4  # the trials due at one step evaluate in one pass
    assert spent["slots"]["evaluation"] == len(a) + len(b)  # but each trial's evaluation counts in the slots served
    assert spent["count"]["steps"] < spent["slots"]["steps"] == 12  # six steps of each trial, some of both at once
    assert spent["count"]["generation"] == 0 and spent["seconds"]["generation"] == 0  # no answers asked for
    assert spent["count"]["preparing"] == 0  # a pack on the CPU steps eagerly: no capture to make before the first trial
    assert all(spent["seconds"][job] > 0 for job in ("steps", "evaluation", "checkpoints", "opening"))
    # one job at a time holds the pack: together they fit in the time the trials took
    assert sum(spent["seconds"].values()) <= time.perf_counter() - started


def test_trials_at_the_full_budget_report_their_answers_generated_by_the_pack(trial_setup):
    from dataclasses import replace

    trainer = SharedTrainer(replace(trial_setup, generate_examples=4), capacity=2)
    try:
        assert trainer.open("a", shared_trial(), None)
        assert trainer.open("b", shared_trial(lr=3e-3, seed=1), None)
        a, b = reports(trainer, "a"), reports(trainer, "b")
        for rows in (a, b):
            assert rows[0].report.eval_row_exact_match is None  # answers at the full budget only
            final = rows[-1].report
            assert len(final.eval_row_exact_match) == 4 and 0 <= final.eval_exact_match <= 1
            assert final.eval_generate_seconds > 0
        spent = trainer.time_spent()
        assert 1 <= spent["count"]["generation"] <= 2  # one pass where both reached the budget at one step
    finally:
        trainer.stop()


def test_a_trial_continued_from_its_checkpoint_reports_what_it_would_have_without_stopping(trial_setup, trainer):
    assert trainer.open("whole", shared_trial(seed=5), None)
    whole = reports(trainer, "whole")
    assert trainer.open("first", shared_trial(seed=5), None)
    checkpoint = trainer.next_report("first").files  # at step 3, then the trial was stopped
    trainer.release("first")
    trainer.stop()  # a process holds one trainer: the new one takes over the process's cached base model
    again = SharedTrainer(trial_setup, capacity=2)  # a new trainer: a resumed search's
    try:
        assert again.open("first", shared_trial(seed=5), checkpoint)
        (continued,) = reports(again, "first")
    finally:
        again.stop()
    assert continued.report.step == trial_setup.max_steps
    assert continued.report.eval_loss == pytest.approx(whole[-1].report.eval_loss, rel=1e-5)
    assert continued.report.train_loss == pytest.approx(whole[-1].report.train_loss, rel=1e-5)


def test_a_trial_that_diverges_fails_alone_and_the_others_report_as_without_it(trial_setup, trainer):
    assert trainer.open("calm", shared_trial(seed=2), None)
    calm = reports(trainer, "calm")
    assert trainer.open("calm2", shared_trial(seed=2), None) and trainer.open("wild", shared_trial(lr=1e12, seed=3), None)
    with pytest.raises(TrialDiverged, match="loss became"):
        reports(trainer, "wild")
    beside = reports(trainer, "calm2")
    assert [r.report.eval_loss for r in beside] == pytest.approx([r.report.eval_loss for r in calm], rel=1e-5)


def test_a_released_slot_takes_the_next_trial_and_a_full_trainer_says_so(trainer):
    for name in ("a", "b", "c"):
        assert trainer.open(name, shared_trial(), None)
    assert trainer.open("d", shared_trial(), None) is None
    assert trainer.free_slots() == 0
    trainer.release("b")
    assert trainer.open("d", shared_trial(), None)
    with pytest.raises(RuntimeError, match="holds no slot"):
        trainer.next_report("b")


def test_a_late_release_by_an_earlier_attempt_leaves_the_retrys_slot_alone(trainer):
    first = trainer.open("a", shared_trial(), None)
    retry = trainer.open("a", shared_trial(), None)  # Tune's retry of the trial, before the first attempt's release came
    trainer.release("a", first)
    assert trainer.free_slots() == 2
    assert [r.report.step for r in reports(trainer, "a")] == [3, 6]
    trainer.release("a", retry)
    assert trainer.free_slots() == 3


def test_a_configuration_a_pack_cannot_train_is_refused_with_the_way_out(trainer):
    dora = shared_trial()
    dora["lora_config"]["use_dora"] = True
    with pytest.raises(ValueError, match="resources.packing=processes"):
        trainer.open("dora", dora, None)
    assert trainer.free_slots() == 3


def test_choosing_releasing_and_reporting_never_wait_for_a_step_in_progress(trainer, monkeypatch):
    import threading

    stepping, go_on = threading.Event(), threading.Event()
    real = trainer.pack.step

    def held(batches, autocast=None):  # a step that lasts until the test lets it end
        stepping.set()
        assert go_on.wait(60)
        return real(batches, autocast)

    monkeypatch.setattr(trainer.pack, "step", held)
    assert trainer.open("a", shared_trial(), None) and trainer.open("b", shared_trial(seed=1), None)
    assert stepping.wait(60)
    answers = {}
    caller = threading.Thread(target=lambda: answers.update(free=trainer.free_slots(), released=trainer.release("b")))
    caller.start()
    caller.join(10)
    assert not caller.is_alive() and answers["free"] == 1  # answered while the step still runs
    go_on.set()
    assert [r.report.step for r in reports(trainer, "a")] == [3, 6]
    assert trainer.free_slots() == 2 and trainer.pack.free_slots() == [1, 2]  # b's slot was freed between steps


def test_a_trial_that_opens_while_another_steps_waits_for_one_step_not_for_the_others_budget(trial_setup):
    """The stepping thread takes the pack again right after each step, and a lock gives a waiter
    no turn: a search's first trials waited while the first one trained up to its reports' limit
    (on an H100, 24 s of a 100 s packed search). A trial that opens gets in before the next step."""
    import threading
    import time
    from dataclasses import replace

    trainer = SharedTrainer(replace(trial_setup, max_steps=60, eval_every=30), capacity=3)
    try:
        real, steps, stepping = trainer.pack.step, [], threading.Event()

        def step(batches, autocast=None):  # a's first step ends only once b has asked for a slot
            out = real(batches, autocast)
            steps.append(len(batches))
            stepping.set()
            deadline = time.monotonic() + 30
            while len(steps) == 1 and not trainer.opening and time.monotonic() < deadline:
                time.sleep(0.001)
            return out

        trainer.pack.step = step
        assert trainer.open("a", shared_trial(), None)
        assert stepping.wait(30)  # b asks while a's first step holds the pack, not before it
        opened = threading.Thread(target=lambda: trainer.open("b", shared_trial(seed=1), None))
        opened.start()
        opened.join(30)
        assert not opened.is_alive() and "b" in trainer.open_trials
        assert steps[0] == 1  # a alone: b came while it stepped
        assert trainer.open_trials["a"].progress.step <= 2  # the step b waited for, and at most one more
    finally:
        trainer.stop()


@pytest.fixture
def memory_faked(monkeypatch, trainer):
    """The trainer as on a GPU (no GPU here) whose memory readings are faked: nothing allocated
    before an evaluation, 1,000 bytes a token of its largest pass at its peak, 1 MB free of 10 MB.
    Its rule's eval passes hold 14 tokens: one of the 6 eval rows of 8 to 13 tokens each, so the
    largest holds the longest row; a pass of more holds that many rows padded to the longest.
    What it evaluates with is recorded in `trainer.budgets`."""
    import torch

    import trainables.evaluation as evaluation
    from trainables.evaluation import EvalBudget, EvalRoom

    longest = max(len(ids) for ids, _ in trainer.eval_rows)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: trainer.peak)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**6, 10**7))
    trainer.eval_room, trainer.budgets = EvalRoom(), []
    trainer.eval_budget = dict.fromkeys(("search_train", "train"), EvalBudget(tokens=14, answers=10**6))
    real = evaluation.evaluate_blocks

    def recorded(model, rows, pad_token_id, device, autocast, budget=None, blocks=1):
        trainer.budgets.append(budget)
        trainer.peak = 1_000 * min(budget.tokens // longest, len(rows)) * longest
        return real(model, rows, pad_token_id, device, autocast, budget, blocks)

    monkeypatch.setattr(evaluation, "evaluate_blocks", recorded)
    return trainer


def test_a_gpu_trainers_evaluations_grow_to_half_the_memory_its_first_one_left_faked(memory_faked):
    trainer = memory_faked
    assert trainer.open("a", shared_trial(), None)
    assert len(reports(trainer, "a")) == 2
    # the first in the rule's passes; the next in passes of 500 kB (half the free MB) at 1 kB a token
    assert [budget.tokens for budget in trainer.budgets] == [14, 500]
    trainer.share = 0.05  # a trial beside it may take the rest of the GPU: 500 kB is the trainer's
    assert trainer.open("b", shared_trial(), None)
    assert len(reports(trainer, "b")) == 2
    assert [budget.tokens for budget in trainer.budgets[2:]] == [500, 250]


def test_an_evaluation_out_of_memory_in_grown_passes_is_taken_again_in_the_rules_faked(memory_faked, monkeypatch,
                                                                                       caplog):
    import torch

    import trainables.evaluation as evaluation

    trainer, recorded = memory_faked, evaluation.evaluate_blocks

    def out_of_memory_when_grown(model, rows, pad_token_id, device, autocast, budget=None, blocks=1):
        if budget.tokens > 14:
            trainer.budgets.append(budget)
            raise torch.OutOfMemoryError("CUDA out of memory (faked)")
        return recorded(model, rows, pad_token_id, device, autocast, budget, blocks)

    monkeypatch.setattr(evaluation, "evaluate_blocks", out_of_memory_when_grown)
    assert trainer.open("a", shared_trial(), None)
    with caplog.at_level("WARNING", logger="trainables.shared"):
        rows = reports(trainer, "a")
    assert len(rows) == 2 and all(math.isfinite(row.report.eval_loss) for row in rows)  # the trial goes on
    assert [budget.tokens for budget in trainer.budgets] == [14, 500, 14]
    assert trainer.eval_room is None and "ran out of GPU memory" in caplog.text  # no growing again
