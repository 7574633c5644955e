"""The shared-base trainer: one process per GPU holds the frozen base model once and trains the
adapters of up to `capacity` concurrent trials together (`trainables/packed.py`).

Ray Tune stays the scheduler. Each configuration is still a Tune trial whose process is a light
client (`trainables/client.py`): it opens a slot here with its config and checkpoint, takes its
reports from `next_report` and hands them to Tune with their checkpoints, and its slot is released
when it ends however it ends. A slot belongs to the attempt that opened it (`open`'s token): Tune
may retry a trial in another process before the failed attempt's release arrives here, and that
release must not free the retry's slot. The stepping runs in a thread of its own, so a slot that
opens, is stopped or fails changes the next packed step and nothing else: no recompilation, no new
process, no model load.

A trial's report is a per-process trial's `TrialReport` (trainables/metrics.py builds both), with
`step_mode` "packed" (with the pack's own mode where it is not eager: "packed+cuda_graph",
"packed+compiled+cuda_graph") and `pack_size`, the trials the last step trained. `train_seconds` is the
wall time of the packed steps the trial was in (every trial in a step is charged the whole
step), so `tokens_per_second` is the trial's share; the trainer's throughput is their sum.
`peak_memory_gb` is the trainer's: every trial of the pack shares it. `trainer_pid` is the
trainer's process: its Ray actor's, which a resume after a killed driver stops (search/cluster/resume.py),
or the one the driver started before Ray, which ends with the driver (trainables/host.py). Tune's own
`pid` of the trial is its client's.

Made by the run's Ray actor of the trainer (`trainables.host.Trainer`), with a concurrency of at
least its capacity (each client waits in `next_report`), in the actor's process or in the one the
driver started before Ray.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rundir.params import TrialParams
from rundir.report import TrialReport
from trainables.config import BaseSpec, TrialSetup

if TYPE_CHECKING:
    from trainables.metrics import Progress
    from trainables.packed import SlotSnapshot

# when this process loaded the trainer's code, as Ray unpickled its class: how long its worker took to start
CODE_LOADED_AT = time.time()
PENDING_REPORTS = 2  # reports a slot may run ahead of its client before it waits for it
FAILURE_GRACE_S = 2.0  # after the stepping thread fails: time for the waiting clients to take the reason
log = logging.getLogger(__name__)


def packed_mode(pack_mode: str) -> str:
    """A packed trial's `step_mode`: "packed", and how the pack stepped where it was not eagerly."""
    return "packed" if pack_mode == "eager" else f"packed+{pack_mode}"


@dataclass(frozen=True)
class _Taken:
    """A report and its slot's snapshot as the stepping thread took them: the client's own call
    (`next_report`) waits for the snapshot's copy to the host and makes the checkpoint's files,
    so that the slots step meanwhile."""

    report: TrialReport
    snapshot: SlotSnapshot

    def files(self) -> SlotReport:
        return SlotReport(self.report, self.snapshot.checkpoint().to_files())


@dataclass(frozen=True)
class SlotReport:
    """A report of a trial in a slot, and the files of its checkpoint by their paths inside it
    (`TrialCheckpoint.to_files`): plain bytes, so the trial's client needs no torch to pass them on."""

    report: TrialReport
    files: dict[str, bytes]


@dataclass
class _Open:
    """A trial in a slot."""

    index: int
    token: str                  # the attempt's that opened the slot: its release frees this slot only
    params: TrialParams
    progress: Progress
    rows: list
    reports: deque = field(default_factory=deque)  # _Taken, then None after the last
    error: BaseException | None = None
    finished: bool = False
    loss_sum: object = 0.0      # a tensor on the device once the slot has stepped
    loss_count: int = 0


@dataclass(frozen=True)
class LoadedBase:
    """A shared trainer's base model on this process's device, loaded from `spec`, and when
    (time.time()) the loading began and each part of it ended (`SharedTrainer.startup`)."""

    spec: BaseSpec
    model: object
    times: dict[str, float]


def load_base(spec: BaseSpec, code_loaded_at: float = CODE_LOADED_AT, go: threading.Event | None = None,
              warm: bool = False) -> LoadedBase:
    """Import torch, transformers and PEFT and load the base model of `spec` on this process's
    device (the first GPU it sees, else the CPU); `code_loaded_at`: when its process had loaded
    the trainer's code. With `go`, the GPU's memory and the weights are taken only once it is set
    (trainables/host.py, whose process made its imports before: the driver sets it once it has
    checked its input); with `warm` too, inductor's one-time setup is made meanwhile
    (`warm_inductor`: the pack will compile its step)."""
    times = {"trainer_code_loaded": code_loaded_at, "trainer_constructing": time.time()}
    from trainables.model import hide_bitsandbytes_unless_needed

    hide_bitsandbytes_unless_needed(spec.quantization, spec.trust_remote_code)
    import torch

    from trainables.model import load_base_model

    torch.set_num_threads(spec.cpu_threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    times["trainer_imported"] = time.time()

    def context() -> None:
        if go is not None:
            go.wait()
        torch.zeros(1, device=device)

    # the GPU's context made while transformers is imported and the weights are read, not after
    made = threading.Thread(target=context, daemon=True)
    if cuda:
        made.start()
    if go is not None and warm:
        from trainables.packed import warm_inductor

        try:
            log.info("inductor's one-time setup made in %.2f s while the driver checked its input", warm_inductor())
        except Exception as e:  # noqa: BLE001 - the pack's own compile makes it, or says what fails
            log.warning("inductor's one-time setup could not be made ahead (%s: %s)", type(e).__name__, e)
        times["compiler_warmed"] = time.time()
    if go is not None:
        go.wait()
    model = load_base_model(spec.model_path, spec.dtype, spec.quantization, spec.trust_remote_code, device,
                            spec.gradient_checkpointing)
    if cuda:
        made.join()
    times["trainer_model_loaded"] = time.time()
    return LoadedBase(spec, model, times)


# The pack's jobs, in the trainer's account of its time (`SharedTrainer.time_spent`).
PACK_JOBS = ("preparing", "steps", "evaluation", "generation", "checkpoints", "opening")


class SharedTrainer:
    """The base model of `setup` on this process's device, with `capacity` adapter slots; on a GPU
    of whose memory `share` is the trainer's."""

    def __init__(self, setup: TrialSetup, capacity: int, share: float = 1.0, loaded: LoadedBase | None = None):
        """`loaded`: the base model loaded ahead (trainables/host.py), used where it was loaded as
        `setup` asks; else the model is loaded here."""
        if loaded is None or loaded.spec != setup.base:
            loaded = load_base(setup.base)
        # when its construction began and each part of it ended (time.time(), the driver's clock on
        # one machine): where a shared run's time before its first step goes (`startup`)
        self.startup_times = dict(loaded.times)
        self.startup_times["pack_constructing"] = time.time()
        import torch

        from trainables.data import load_split
        from trainables.evaluation import EvalRoom, model_eval_budget
        from trainables.generate import AnswerMetrics
        from trainables.packed import Pack

        self.setup = setup
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        base = loaded.model
        self.pack = Pack(base, capacity, setup.warmup_steps, setup.max_steps, setup.max_rank, cuda_graph=setup.cuda_graphs,
                         compile_backend="inductor" if setup.compile and self.cuda else None)
        self.pack.compile_layers = setup.compile_layers
        # dropout reserved only for a captured step, the one it spares a capture: an eager step
        # would draw masks for slots that have none
        dropout = setup.dropout and self.pack.cuda_graph
        if setup.widest_rows[0]:  # counted by the driver: the splits are read while the pack prepares
            self.pack.reserve_widths(*setup.widest_rows, dropout=dropout)
        else:
            self.splits = self._read_splits()
            self.pack.reserve((row for rows in self.splits.values() for row in rows), dropout=dropout)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else torch.autocast("cpu", enabled=False)
        self.open_trials: dict[str, _Open] = {}
        # Two locks, always taken in this order: `pack_lock` while the pack steps or changes (a step
        # and its evaluations take seconds), `lock` for the bookkeeping clients wait on, held only
        # for moments, so choosing a trainer, taking a report and releasing never wait for a step.
        self.pack_lock = threading.Lock()
        self.lock = threading.Condition()
        self.released: list[int] = []  # slots whose trials ended, freed in the pack before its next step
        # trials waiting for the pack to open their slot: the stepping thread lets them in before
        # its next step, or it would take the pack again at once (a lock gives no turn to a waiter)
        # and a search's first trials would wait for the first one's whole budget of reports
        self.opening = 0
        # seconds the pack spent on each of its jobs, and how many of each it did (`time_spent`)
        self.spent = dict.fromkeys(PACK_JOBS, 0.0)
        self.done = dict.fromkeys(PACK_JOBS, 0)
        self.served = dict.fromkeys(PACK_JOBS, 0)
        self.failure: BaseException | None = None  # the stepping thread's own failure: every trial's
        self.stopping = False
        # the pack prepares (`_prepare`: seconds of compiling and capturing, the first step's last
        # wait) while the rest, on the host only, is read here: no trial opens before this returns
        self.thread = threading.Thread(target=self._run, name="shared-trainer", daemon=True)
        self.thread.start()
        try:
            if setup.widest_rows[0]:
                self.splits = self._read_splits()
            self.eval_rows = load_split(setup.data_dir, "eval")
            # each split's eval batch budget, by the pack's train step at the split's widest rows, once
            self.eval_budget = {name: model_eval_budget(base, setup.batch_size * max(len(ids) for ids, _ in rows),
                                                        setup.gradient_checkpointing, slots=capacity)
                                if self.cuda else None for name, rows in self.splits.items()}
            # on a GPU, eval passes as large as the memory the first evaluations left shows room for
            # (`share` of the GPU is the trainer's: a trial in a process of its own may use the rest)
            self.eval_room, self.share = (EvalRoom() if self.cuda else None), share
            self.answer_metrics = AnswerMetrics.for_trial(self.eval_rows, setup)
        except BaseException:
            self.stop()  # a trainer that failed to construct prepares nothing more
            raise
        self.startup_times["trainer_data_loaded"] = time.time()

    def _read_splits(self) -> dict[str, list]:
        from trainables.data import load_split

        return {name: load_split(self.setup.data_dir, name) for name in ("search_train", "train")}

    # -- what clients call ---------------------------------------------------------------------
    def startup(self) -> dict[str, float]:
        """When (time.time()) this process loaded the trainer's code, when its model's load began,
        and when it had imported torch, loaded the base model (importing transformers and PEFT),
        begun to make the pack and read the data and the tokenizer; the pack's preparing began
        before the last, and its end is `pack_prepared` once it has ended (a pack that captures
        nothing prepares nothing)."""
        with self.lock:
            return dict(self.startup_times)

    def time_spent(self) -> dict[str, dict]:
        """Where the pack's time went since the trainer started, job by job (PACK_JOBS): seconds
        and how many times, with `preparing` the layers and captured step made before the first
        trial (`Pack.prepare`), `steps` the packed steps (their captures and compiles included),
        `evaluation` the eval passes (one for all the slots due at a step), `generation` the
        answer passes (one for all the slots that answer at a step), `checkpoints` each
        report's snapshot of its slot (`Pack.snapshot`: its files are made in the client's call),
        `opening` the slots opened; and `slots`, how many slots those
        served, summed: a step, an evaluation or an answer pass serves several at once. Two
        searches' ASHA decisions differ as their reports arrive in another order, so they make
        different numbers of passes of different sizes: seconds per slot served compare them.
        Whatever the pack does in one job the others wait for: it is the trainer's account of a
        shared search's time after its first step."""
        with self.lock:
            return {"seconds": {job: round(seconds, 3) for job, seconds in self.spent.items()}, "count": dict(self.done),
                    "slots": dict(self.served)}

    def _spent(self, job: str, since: float, count: int = 1, slots: int = 1) -> None:
        seconds = time.perf_counter() - since
        with self.lock:
            self.spent[job] += seconds
            self.done[job] += count
            self.served[job] += slots * count

    def free_slots(self) -> int:
        """The slots `open` can give now (a released slot counts as free: `open` frees it first)."""
        with self.lock:
            return self.pack.capacity - len(self.open_trials)

    def open(self, trial_id: str, config: dict, files: dict[str, bytes] | None,
             client: tuple[float, float] | None = None) -> str | None:
        """Give trial `trial_id` a slot, continuing from a checkpoint's `files` where given (its
        relative paths as a per-process trial's checkpoint has them), in place of any slot the
        trial still holds (a retry's attempt opens again); the slot's token, which `release` takes
        to free this slot and no later one of the trial, or None when every slot is taken.
        `client`: when Tune called the trial's client and when its process loaded the client's
        code, which its reports give as `called_at` and `worker_started_at`; its `entered_at` is
        this call's arrival, before it waits for the pack. ValueError for a configuration a pack
        cannot train."""
        from trainables.checkpoint import TrialCheckpoint
        from trainables.metrics import WORKER_STARTED, Progress

        arrived = time.time()
        called_at, worker_started_at = client or (arrived, WORKER_STARTED)
        params = TrialParams.from_config(config)
        with self._opening(), self.pack_lock:
            with self.lock:
                self._release(trial_id)
            self._free_released()
            if not self.pack.free_slots():
                return None
            opening = time.perf_counter()
            index = self.pack.add(params)
            progress = Progress(called_at=called_at, imported_at=arrived, busy_from=time.time(),
                                worker_started_at=worker_started_at)
            try:
                if files:
                    self.pack.restore(index, TrialCheckpoint.from_files(files), progress)
            except BaseException:
                self.pack.remove(index)
                raise
            rows = self.splits["train" if params.full_data else "search_train"]
            self._spent("opening", opening)
            token = uuid.uuid4().hex
            with self.lock:
                self.open_trials[trial_id] = _Open(index, token, params, progress, rows)
        return token

    @contextmanager
    def _opening(self):
        """Counted in `opening` while a trial waits for the pack and opens its slot."""
        with self.lock:
            self.opening += 1
        try:
            yield
        finally:
            with self.lock:
                self.opening -= 1
                self.lock.notify_all()

    def next_report(self, trial_id: str) -> SlotReport | None:
        """The trial's next report with its checkpoint's files, or None after its last; waits for it.
        The files are made here, in the client's call, while the pack steps on. Raises the trial's
        failure: TrialDiverged, CUDA's out-of-memory error, or the trainer's own."""
        with self.lock:
            while True:
                trial = self.open_trials.get(trial_id)
                if trial is None:
                    raise RuntimeError(f"trial {trial_id} holds no slot on this trainer: it was released")
                if trial.reports:
                    taken = trial.reports.popleft()
                    self.lock.notify_all()
                    break
                if trial.error is not None:
                    raise trial.error
                if self.failure is not None:
                    raise RuntimeError(f"the shared trainer failed: {type(self.failure).__name__}: {self.failure}")
                self.lock.wait(1.0)
        return None if taken is None else taken.files()

    def release(self, trial_id: str, token: str | None = None) -> None:
        """Free the trial's slot at once; nothing for a trial that holds none. With `token` (what
        `open` returned), only the slot that `open` gave: nothing when the trial has opened again
        since. Without it, whatever slot the trial holds (the driver's release at the trial's end)."""
        with self.lock:
            self._release(trial_id, token)
            self.lock.notify_all()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        self.thread.join()

    def _release(self, trial_id: str, token: str | None = None) -> None:
        """Under `lock`: the trial's slot (only the one opened with `token`, where given) is gone
        for its clients now; it is freed in the pack before the next step (`_free_released`),
        which is the pack's, not the bookkeeping's."""
        trial = self.open_trials.get(trial_id)
        if trial is not None and token in (None, trial.token):
            del self.open_trials[trial_id]
            self.released.append(trial.index)

    def _free_released(self) -> None:
        """Under `pack_lock`: free the slots of the trials released since the last call."""
        with self.lock:
            released, self.released = self.released, []
        for index in released:
            self.pack.remove(index)

    # -- the stepping thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._prepare()
            while True:
                with self.lock:
                    while self.opening and not self.stopping:
                        self.lock.wait(0.5)
                with self.pack_lock:
                    self._free_released()
                    with self.lock:
                        if self.stopping:
                            return
                        ready = [t for t in self.open_trials.values()
                                 if t.error is None and not t.finished and len(t.reports) < PENDING_REPORTS]
                    if ready:
                        self._step(ready)
                with self.lock:
                    if not ready:
                        self.lock.wait(0.5)
                    self.lock.notify_all()
        except BaseException as error:
            log.exception("the shared trainer's stepping thread failed")
            with self.lock:
                self.failure = error
                self.lock.notify_all()
            # a trainer that cannot step is of no use to any trial: once the waiting clients have
            # been told why, the process ends, and Ray restarts it (max_restarts) for their retries
            time.sleep(FAILURE_GRACE_S)
            os._exit(1)

    def _prepare(self) -> None:
        """The pack's layers and captured step made before the first trial opens (`Pack.prepare`),
        while Tune starts the trials' clients; they open once it is done."""
        if not self.pack.cuda_graph or not self.setup.module_sets:
            return  # an eager pack captures nothing, and a layer made before any slot adapts it costs every pass
        with self.pack_lock:
            preparing = time.perf_counter()
            self.pack.prepare(self.setup.module_sets, self.setup.batch_size, self.autocast)
            self._spent("preparing", preparing)
            with self.lock:
                self.startup_times["pack_prepared"] = time.time()

    def _step(self, ready: list[_Open]) -> None:
        import torch

        from trainables.data import batch_indices, collate
        from trainables.packed import SlotOutOfMemory

        started = time.perf_counter()
        batches, tokens = {}, {}
        for trial in ready:
            examples = [trial.rows[i] for i in batch_indices(len(trial.rows), self.setup.batch_size, trial.params.seed,
                                                             trial.progress.step)]
            # on the host: the pack copies them to the device without waiting for the step before
            batch = collate(examples, self.setup.pad_token_id, torch.device("cpu"))
            batches[trial.index] = (batch["input_ids"], batch["labels"])
            tokens[trial.index] = int(batch["attention_mask"].sum())
        stepping = time.perf_counter()
        try:
            losses = self.pack.step(batches, self.autocast)
        except SlotOutOfMemory as error:  # one slot alone did not fit beside the base: that trial fails
            culprit = next(t for t in ready if t.index == error.slot)
            with self.lock:
                culprit.error = torch.OutOfMemoryError(f"CUDA out of memory in the shared trainer with one slot: {error}")
            return
        self._spent("steps", stepping, slots=len(ready))
        elapsed = time.perf_counter() - started
        due = []
        for trial in ready:
            progress = trial.progress
            progress.step += 1
            progress.tokens += tokens[trial.index]
            progress.train_seconds += elapsed
            trial.loss_sum = trial.loss_sum + losses[trial.index]
            trial.loss_count += 1
            if progress.step % self.setup.eval_every == 0 or progress.step == self.setup.max_steps:
                due.append(trial)
        if due:
            self._report(due, len(ready))

    def _report(self, due: list[_Open], pack_size: int) -> None:
        """Evaluate the adapters of the trials `due` together, one forward pass of the pack for
        all of them per eval batch (`evaluate_blocks`: evaluated one at a time, the other slots
        would wait for each), and those that answer at this step generate their answers together
        too, then queue each one's report and checkpoint; a NaN or infinite loss fails its trial
        instead, and its slot stops stepping. Each trial is charged the whole evaluation pass and
        generation, as it is the whole of each packed step."""
        import torch

        from trainables.divergence import eval_diverged, train_diverged
        from trainables.evaluation import device_room, evaluate_blocks, pass_tokens
        from trainables.metrics import trial_report

        setup = self.setup
        waiting = time.perf_counter()
        train_losses = [float(trial.loss_sum / trial.loss_count) for trial in due]
        # the steps' own clock is the host's, which runs ahead of a GPU's queue: the wait for the
        # steps still queued is training time too
        waited = time.perf_counter() - waiting
        self._spent("steps", waiting, count=0)
        evaluating = []
        for trial, train_loss in zip(due, train_losses):
            trial.progress.train_seconds += waited
            trial.loss_sum, trial.loss_count = 0.0, 0
            if diverged := train_diverged(train_loss, trial.progress.step):
                with self.lock:
                    trial.error = diverged
            else:
                evaluating.append((trial, train_loss))
        if not evaluating:
            return
        started = time.perf_counter()
        budget = min((self.eval_budget["train" if trial.params.full_data else "search_train"] for trial, _ in evaluating),
                     key=lambda budget: budget.tokens if budget else 0)
        room, blocks = self.eval_room, len(evaluating)
        with self.pack.only(*(trial.index for trial, _ in evaluating)) as model:
            def evaluate(budget):
                return evaluate_blocks(model, self.eval_rows, setup.pad_token_id, self.device, self.autocast, budget,
                                       blocks=blocks)

            if room is None:
                evaluations = evaluate(budget)
            else:
                held, grown = torch.cuda.memory_allocated(self.device), room.budget(budget)
                try:
                    evaluations = evaluate(grown)
                except torch.OutOfMemoryError:
                    if grown is budget:
                        raise
                    # the room was misjudged: the rule's passes, which held before, from now on
                    log.warning("an evaluation in passes of %d tokens ran out of GPU memory; evaluating in passes "
                                "of %d tokens from now on", grown.tokens, budget.tokens)
                    self.eval_room = None
                    torch.cuda.empty_cache()
                    evaluations = evaluate(budget)
                else:
                    room.learn(max(pass_tokens(self.eval_rows, grown, blocks)),
                               torch.cuda.max_memory_allocated(self.device) - held, device_room(self.device, self.share))
        evaluated = time.perf_counter() - started
        self._spent("evaluation", started, slots=len(evaluating))
        scored = []
        for (trial, train_loss), evaluation in zip(evaluating, evaluations):
            trial.progress.eval_seconds += evaluated
            if diverged := eval_diverged(evaluation.loss, trial.progress.step):
                with self.lock:
                    trial.error = diverged
            else:
                scored.append((trial, train_loss, evaluation))
        # the slots that answer at this step answer together, in one pass of the pack per decoding
        # step (`AnswerMetrics.blocks`), each charged the whole of it, as with the evaluation
        answering = [trial for trial, _, _ in scored if self.answer_metrics
                     and (setup.generate_every_round or trial.progress.step == setup.max_steps)]
        answers = {}
        if answering:
            generating = time.perf_counter()
            with self.pack.only(*(trial.index for trial in answering)) as model:
                answers = dict(zip((trial.index for trial in answering),
                                   self.answer_metrics.blocks(model, setup.pad_token_id, self.device, self.autocast,
                                                              blocks=len(answering))))
            generated = time.perf_counter() - generating
            self._spent("generation", generating, slots=len(answering))
            for trial in answering:
                trial.progress.generate_seconds += generated
                trial.progress.eval_seconds += generated
        for trial, train_loss, evaluation in scored:
            progress = trial.progress
            answered = answers.get(trial.index, {})
            report = trial_report(progress, evaluation, answered, train_loss, self.pack.trainable_params(trial.index),
                                  setup.total_params, self.cuda, packed_mode(self.pack.step_mode), pack_size=pack_size,
                                  trainer_pid=os.getpid())
            checkpointing = time.perf_counter()
            snapshot = self.pack.snapshot(trial.index, progress, self.pack.model.name_or_path)
            self._spent("checkpoints", checkpointing)
            progress.busy_from = time.time()
            with self.lock:
                trial.reports.append(_Taken(report, snapshot))
                if progress.step >= setup.max_steps:
                    trial.finished = True
                    trial.reports.append(None)
                self.lock.notify_all()
