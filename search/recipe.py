"""The run as a recipe, read top to bottom: `setup` checks and prepares everything before the
search (bad input exits 2 with nothing written, a GPU not yet asked for; a new run's local Ray
starts meanwhile, in the background, and is shut down again on bad input), `search` runs the
Ray Tune search and the retrain of the pick, `finish` hands the run directory to `analysis`
for the pick, report and export, and uploads it where it is kept at a URI."""

from __future__ import annotations

import shutil
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from analysis.config import is_user_metric, needs_generations
from rundir.files import write_json_atomic
from rundir.layout import LOGS, SETUP_TIMES, TRAINER_HOST_LOG, TRAINER_TIME
from rundir.location import RunLocation, locate
from rundir.runconfig import CREATED_BY, DataInfo, RunConfig
from search import environment
from search.cluster.resume import record_driver, record_ray_session
from search.config import AUTO, SHARED, Config, ConfigError, to_dict
from search.output.console import keep_logs_in, ray_core_output_in_logs, say
from search.signals import GracefulStop, command_again, stopped
from trainables.config import BaseSpec, TrialSetup, cache_root
from trainables.host import TrainerArgs

if TYPE_CHECKING:  # the data's module imports torch, which the command imports later
    from search.inputs.data import Rows

# How long the driver waits for a shared trainer's account of its start: it answers between its
# packed steps, which take seconds on a CPU.
TRAINER_ANSWER_S = 30.0


class SearchRecipe:
    """One run of `config`; `stop` learns what the run has saved as it goes. Each step returns
    an exit code where the run ends there, else None."""

    def __init__(self, config: Config, address: str | None, stop: GracefulStop, *, dry_run: bool = False,
                 resume: bool = False, overwrite: bool = False, retrain_of: str | None = None,
                 started_at: float | None = None):
        """`retrain_of`: the trial id of a finished run's pick, to retrain alone on all the training
        data without searching (`search.retrain`); the run's config is then its recorded one.
        `started_at`: when the command started (epoch seconds), which a new run records."""
        self.config, self.address, self.stop = config, address, stop
        self.started_at = started_at
        self.dry_run, self.resume, self.overwrite, self.retrain_of = dry_run, resume, overwrite, retrain_of
        self.ray_start = None  # a local Ray starting in the background, from `setup` on
        self.host = None  # a shared trainer's process started with it (trainables/host.py)
        self.widest_rows = (0, 0)  # of a new run's training splits (`_start`, TrialSetup.widest_rows)
        self.ray_output = ExitStack()  # Ray's output kept in the logs while it shuts down (`search`, `finish`)
        self.setup_times: dict[str, float] = {}  # seconds from `started_at` to each step of the setup (`_done`)

    def _done(self, step: str) -> None:
        """Note when `step` of the driver's setup ended: with the trials' own clock readings, where
        the time before the first training step goes (written to the run's logs, SETUP_TIMES)."""
        if self.started_at is not None:
            self.setup_times[step] = round(time.time() - self.started_at, 3)

    def start_trainer_process(self) -> None:
        """Start a new local run's shared trainer's process where the run may share its GPU: first,
        before this process's own imports (`use_console`'s, `setup`'s), so that its imports run
        beside them (trainables/host.py); `setup` lets it go where the plan does not share."""
        from trainables.host import TrainerHost, gpu_likely

        resources = self.config.resources
        if (self.host is None and not self.dry_run and self.address is None and not (self.resume or self.retrain_of)
                and (resources.packing == SHARED or resources.packing == AUTO and gpu_likely())):
            self.host = TrainerHost(resources.cpus_per_trial, self.config.model.quantization,
                                    self.config.model.trust_remote_code)
            self._done("trainer_process_started")  # the interpreter's start and the config's reading before it

    def setup(self) -> int | None:
        try:
            return self._setup()
        except BaseException:  # bad input or a stop: the Ray and the trainer's process started meanwhile go too
            self.close_trainer_process()
            if self.ray_start is not None:
                self.ray_start.shut_down()
            raise

    def close_trainer_process(self) -> None:
        """Let a trainer's process started here go (a command that ends before the run's setup)."""
        if self.host is not None:
            self.host.close()
            self.host = None

    def _setup(self) -> int | None:
        from trainables.host import visible_gpu

        self.start_trainer_process()  # where the command did not start it before
        from search.cluster.connect import (
            LocalRayStart,
            check_cluster_gpus,
            connect,
            keep_local_ray_on_loopback,
            resolve_address,
        )
        from search.inputs.prepare import bytecode_line, check_device, check_shared_packing, prepare_model, read_data
        from search.output.tracking import mlflow_store_problem
        from search.resources.plan import plan_resources

        self._done("setup_began")  # the command's imports before it
        config = self.config
        if is_user_metric(config.selection.metric):  # the config allows it only with selection.trust_metric_code
            from trainables.generate import UserMetric

            try:  # here first, so that a module not found is bad input before Ray starts
                UserMetric.load(config.selection.metric)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            print(f"selection.trust_metric_code is true: every trial imports and runs {config.selection.metric}",
                  flush=True)
        if not self.dry_run:  # first, so that an output that cannot hold the run costs nothing
            self.location = locate(config.output, config.name, cache_root())
            _check_output(self.location, resume=self.resume or bool(self.retrain_of), overwrite=self.overwrite)
        self.cluster = cluster = resolve_address(self.address)
        self.prepared = prepare_model(config)
        self._done("model_prepared")
        self.config = config = replace(config, search=self.prepared.space(config.search))
        store_problem = mlflow_store_problem(config.tracking.mlflow, dry_run=self.dry_run)
        if store_problem:
            raise ConfigError(store_problem)
        local = self.address is None
        # the share by memory needs this machine's GPU; a cluster's GPUs are not known here
        self.plan = plan = plan_resources(config, self.prepared, local=local)
        if not plan.shared:
            self.close_trainer_process()
        self._done("resources_planned")  # the memory probe, or its cached answer, on a GPU
        if plan.shared:
            check_shared_packing(self.prepared.resolved)
        if plan.memory_probe:
            print(plan.memory_probe.line(), flush=True)
        if bytecode := bytecode_line():
            print(bytecode, flush=True)
        if self.dry_run:
            return self._dry_run()
        check_device(config, plan.gpus_per_trial, local=local)
        self._done("device_checked")
        self.config = config = plan.applied(config)
        if cluster is None:
            keep_local_ray_on_loopback()  # before this process first imports ray
        else:  # join the cluster before anything is written
            with GracefulStop() as joining:
                try:
                    connect(cluster)
                    check_cluster_gpus(plan.gpus_per_trial)
                except KeyboardInterrupt:
                    return stopped(joining, f"nothing was written (it was joining the Ray cluster at {cluster.address})",
                                   again="")
        location = self.location
        if self.resume or self.retrain_of:
            from analysis.results import read_run_config
            from search.cluster.resume import check_driver_gone, resume_check, stop_leftover_workers

            # the same command continues a retrain; a search continues with --resume
            self.stop.saved, self.stop.again = saved_line(location), "" if self.retrain_of else "--resume"
            location.pull()  # a run kept at a URI continues from any machine
            self.data_info = (read_run_config(location.local).data_info if self.retrain_of
                              else resume_check(location.local, config))
            check_driver_gone(location.local)
            stop_leftover_workers(location.local)
        else:
            rows = read_data(config)
            self._done("data_read")
            if cluster is None:
                # a new run's local Ray starts (seconds) while the data is tokenized; not before the
                # checks of the model, the device and every row, so that bad input starts nothing
                self.ray_start = LocalRayStart()
            if self.host is not None:  # the trainer's process learns its model and GPU, and waits for the go
                gpu = plan.gpus_per_trial > 0
                self.host.load(base_spec(config, plan, self.prepared), visible_gpu(gpu), warm=plan.compiled and gpu)
            self.data_info = self._start(rows)
            if self.host is not None:  # the input is checked: the trainer's process may take the GPU, and make its trainer
                self.host.go(self._trainer_args(self._trial_setup()))
            self.stop.saved, self.stop.again = saved_line(location), "--resume"
        keep_logs_in(location.local / LOGS)
        record_driver(location.local)
        return None

    def _dry_run(self) -> int:
        from search.inputs.dryrun import data_lines, dry_run_rows, format_table, packing_line

        config, prepared = self.config, self.prepared
        rows = dry_run_rows(prepared.model, config.search.module_sets, config.search.ranks, config.search.use_dora)
        data = data_lines(config, prepared)  # in memory: nothing is written
        architecture = next((res.architecture_note for res in prepared.resolved.values() if res.architecture_note), None)
        print(format_table(rows, config.model.path, architecture))
        print(data)
        print(packing_line(config.resources, self.plan, any(config.search.use_dora),
                           any(res.holds_fixed for res in prepared.resolved.values())))
        return 0

    def _start(self, rows: tuple[Rows, Rows]) -> DataInfo:
        """Tokenize the data's `rows` (in memory: bad data is input error with nothing written), then
        create the run directory with the data and the resolved config (uploaded at once to a
        URI output, where every node reads the data). A stop meanwhile leaves it incomplete."""
        from rundir.layout import DATA, RUN_CONFIG
        from search.inputs.data import eval_sample_line, template_fallback_line
        from search.inputs.prepare import load_tokenizer, prepare_data
        from trainables.data import save_splits
        from trainables.optim import OPTIMIZER, SCHEDULE

        config, prepared, location, stop = self.config, self.prepared, self.location, self.stop
        run_dir = location.local
        splits, prepared_data = prepare_data(config, load_tokenizer(config, prepared.path), rows)
        self._done("data_prepared")
        say(eval_sample_line(prepared_data, config.data.eval_examples))  # not with --quiet: it is no result
        fallback = template_fallback_line(prepared_data, config.data)
        if fallback:
            say(fallback)
        stop.saved = f"the run directory {location.remote or run_dir} was being made and is incomplete"
        stop.again = "--overwrite"  # a new run is refused where one is, even half made
        location.delete_remote()  # only reached with --overwrite when it holds anything
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        save_splits(splits, run_dir / DATA)
        if self.plan.shared:
            from trainables.step import widest

            self.widest_rows = widest(row for name in ("search_train", "train")
                                      for row in zip(splits[name]["input_ids"], splits[name]["labels"]))
        probe = self.plan.memory_probe
        record = RunConfig.from_json({
            **to_dict(config),
            "resources": {**to_dict(config)["resources"], "gpus_per_trial": self.plan.gpus_per_trial,
                          "packing_reason": self.plan.packing_reason, "memory_probe": asdict(probe) if probe else None},
            "base_model": {"path": prepared.path, "name": prepared.name, "origin": prepared.origin,
                           "total_params": prepared.total_params},
            "data_info": asdict(prepared_data),
            # expert weights beside the layers, as the dry run lists them
            "module_sets": {k: {"target_modules": v.target_modules + v.target_parameters,
                                "layers": len(v.layers) + len(v.parameters), "note": v.note}
                            for k, v in prepared.resolved.items()},
            "created_by": CREATED_BY,
            "training": {"optimizer": OPTIMIZER, "schedule": SCHEDULE},
            "started_at": self.started_at,
        })
        write_json_atomic(run_dir / RUN_CONFIG, record.to_json())
        self._done("run_directory_written")
        try:
            location.push(data=True)  # every node reads the data from there
        except Exception as e:  # noqa: BLE001 - the output was writable a moment ago: say what failed
            raise ConfigError(f"could not upload the run's data to {location.remote} ({type(e).__name__}: {e}). "
                              f"Fix: check the URI and its credentials, then start again with --overwrite") from None
        return record.data_info

    def _trial_setup(self) -> TrialSetup:
        """What every trial of the run reads (`trial_setup`), with the widest rows `_start` counted."""
        return replace(trial_setup(self.config, self.plan, self.prepared, self.location, self.data_info),
                       widest_rows=self.widest_rows)

    def _trainer_args(self, setup: TrialSetup) -> TrainerArgs:
        """What a shared run's trainers are made with, by the trainer's process at the go and by
        the actors that take it: the trials' `setup`, the slots, and each GPU's share but what a
        trial training beside the trainer takes (a DoRA trial, or one that adapts expert weights,
        trains in a process of its own)."""
        config = self.config
        alone = any(config.search.use_dora) or any(res.holds_fixed for res in self.prepared.resolved.values())
        beside = self.plan.gpus_per_trial if self.plan.shared and alone else 0.0
        return TrainerArgs(setup, config.resources.pack_slots, 1 - beside)

    def search(self) -> int | None:
        """The search's Tuner, and the retrain of the pick where asked, on a Ray this process
        starts (or joined in `setup`) and lets go at the end."""
        try:
            return self._search()
        finally:  # however the search ended, the trainer's process started in `setup` goes too
            self._close_host()

    def _trainers_setup(self, trainers: list) -> bool:
        """Add the first shared trainer's own steps of its start to `setup_times`, on the same clock
        (SharedTrainer.startup); whether it answered."""
        import ray

        if not trainers or self.started_at is None:
            return False
        try:
            startup = ray.get(trainers[0].startup.remote(), timeout=TRAINER_ANSWER_S)
        except (ray.exceptions.RayError, TimeoutError):  # a trainer that died says so in the trials' errors
            return False
        for step, at in startup.items():
            self.setup_times[step] = round(at - self.started_at, 3)
        return True

    def _close_host(self) -> None:
        if self.host is not None:  # its output kept with the run's logs
            self.host.close(self.location.local / LOGS / TRAINER_HOST_LOG)
            self.host = None

    def _search(self) -> int | None:
        import ray

        from rundir.layout import SEARCH_EXPERIMENT
        from search.cluster.connect import connect, trial_slots
        from search.cluster.ray_contract import import_what_tune_fit_imports
        from search.resources.trainers import shared_trainers, trainer_slots
        from search.tuning.prior import prior_points
        from search.tuning.space import LoraSpace
        from search.tuning.tuner import build_tuner, fit_or_restore, retrain, trainable_for

        config, plan, location, data_info = self.config, self.plan, self.location, self.data_info
        setup = self._trial_setup()
        environment.setenvs(environment.TUNE_STATE, keep_users=True)
        cluster = self.cluster  # resolved in `setup`
        stop = GracefulStop(self.stop.program)
        started_here = False  # this process started Ray, or joined a cluster in `setup`: it lets go at the end
        ended = False  # the search ran to its end: a local Ray goes down while `finish` analyses it
        with ExitStack() as output:
            output.enter_context(ray_core_output_in_logs())  # from Ray's start to its shutdown
            try:
                with stop:
                    import_what_tune_fit_imports()  # while Ray starts, not in fit before its first trial
                    if self.ray_start is not None:
                        started_here = self.ray_start.wait()
                    else:
                        started_here = connect(cluster) or cluster is not None
                    record_ray_session(location.local)
                    self._done("ray_started")
                    gpus = plan.gpus_per_trial
                    host = self.host.address if self.host is not None else None
                    with (shared_trainers(self._trainer_args(setup), config.resources.cpus_per_trial, host) if plan.shared
                          else nullcontext([])) as trainers:
                        # The limit at the cluster's slot count, and as many trials pending in Tune
                        # (environment.pending_trials): every slot starts at once (with one pending, on an
                        # H100 with 8 slots, 3 were running 30 s in), and Optuna proposes only when a slot is free.
                        if plan.shared:
                            slots = trainer_slots(trainers, config.resources.pack_slots,
                                                  config.resources.max_concurrent_trials)
                        else:
                            slots = config.resources.max_concurrent_trials or trial_slots(gpus, config.resources.cpus_per_trial)
                        config = replace(config, resources=replace(config.resources, max_concurrent_trials=slots))
                        trainable = trainable_for(setup, config.resources.cpus_per_trial, gpus, trainers)
                        self._trainers_setup(trainers)
                        self._done("trainers_started" if plan.shared else "tuner_starting")
                        (location.local / LOGS).mkdir(exist_ok=True)
                        write_json_atomic(location.local / LOGS / SETUP_TIMES, self.setup_times)
                        try:
                            if not self.retrain_of:
                                priors = prior_points(config.search, data_info.search_train_rows, config.task.kind,
                                                      config.budget.num_samples)
                                space = LoraSpace(config.search, self.prepared.resolved, config.seed, priors=len(priors))
                                fit_or_restore(SEARCH_EXPERIMENT, location, trainable,
                                               lambda: build_tuner(config, trainable, space, priors, location))
                            if (config.selection.retrain or self.retrain_of) and stop.requested is None:
                                retrain(config, trainable, location, self.retrain_of)
                        finally:  # the trainer's steps after its start (its pack prepared), a stopped run's too
                            if self._trainers_setup(trainers):
                                write_json_atomic(location.local / LOGS / SETUP_TIMES, self.setup_times)
                        if trainers:  # where each pack's time went, before the trainers are killed
                            write_json_atomic(location.local / LOGS / TRAINER_TIME,
                                              ray.get([trainer.time_spent.remote() for trainer in trainers]))
                    ended = True
            except KeyboardInterrupt:
                pass  # raised by `stop`, which remembers the signal; what was saved is said below
            except Exception as e:  # a failure of the search itself, not of one trial (those are results)
                failed(e, location, self.stop)
                return 1
            finally:
                self._close_host()  # its trainer's actor is gone: so is the process, before Ray goes down
                if self.ray_start is not None:
                    analysing = ended and stop.requested is None
                    self.ray_start.shut_down(wait=not analysing)
                    if analysing:  # its output stays in the logs until it is down (`finish`)
                        self.ray_output = output.pop_all()
                elif started_here:
                    ray.shutdown()
        if stop.requested:  # no analysis: the run ends within seconds, and `--resume` analyses at its end
            _push(location)
            return stopped(stop, saved_line(location), self.stop.again)
        return None

    def finish(self) -> int:
        try:
            return self._finish()
        finally:  # the local Ray that `search` began to shut down, down
            if self.ray_start is not None:
                self.ray_start.join()
            self.ray_output.close()

    def _finish(self) -> int:
        from analysis.pipeline import analyse

        config, location = self.config, self.location
        # a retrain's pick was made by pick.json's selection, which may differ from the recorded one
        code = analyse(location.local, config.selection if self.retrain_of else None)
        if config.tracking.mlflow.enabled:
            from search.output.tracker_callbacks import log_pick

            if not log_pick(config.tracking.mlflow.tracking_uri, location.local):
                code = code or 1
        if not _push(location):
            code = code or 1
        elif location.remote:
            print(f"The run is at {location.remote} (working copy: {location.local})")
        return code


def base_spec(config: Config, plan, prepared) -> BaseSpec:
    """What a trial's base model is loaded from (`TrialSetup.base`)."""
    from trainables.model import resolve_dtype

    return BaseSpec(
        # the alias or a hub id is resolved on the node that runs the trial (its own cache);
        # a directory is passed as resolved here and must be visible to every node
        model_path=prepared.path if Path(config.model.path).is_dir() else config.model.path,
        dtype=resolve_dtype(config.model.dtype, cuda=plan.gpus_per_trial > 0),
        quantization=config.model.quantization,
        trust_remote_code=config.model.trust_remote_code,
        gradient_checkpointing=config.model.gradient_checkpointing,
        cpu_threads=config.resources.cpus_per_trial)


def trial_setup(config: Config, plan, prepared, location: RunLocation, data_info: DataInfo) -> TrialSetup:
    """What every trial of the run reads: the config's trial settings, as the plan resolved them."""
    tokenizer = config.model.tokenizer
    if tokenizer and Path(tokenizer).expanduser().is_dir():  # trials run in directories of their own
        tokenizer = str(Path(tokenizer).expanduser().resolve())
    return TrialSetup(
        **asdict(base_spec(config, plan, prepared)),
        data_dir=location.data_dir(),
        max_steps=config.budget.max_steps,
        eval_every=config.budget.eval_every,
        batch_size=config.budget.batch_size,
        warmup_steps=config.budget.warmup_steps,
        total_params=prepared.total_params,
        pad_token_id=data_info.pad_token_id,
        cuda_graphs=config.resources.cuda_graphs and not config.model.gradient_checkpointing,
        compile=plan.compiled,
        compile_layers=plan.layers_compiled,
        max_rank=max(config.search.ranks),
        dropout=config.search.dropout[1] > 0,  # [low, high] (SpaceConfig keeps one value as both)
        # a set that adapts expert weights trains beside the trainer (trainables.placement)
        module_sets=tuple(tuple(res.target_modules) for res in prepared.resolved.values() if not res.holds_fixed),
        generate_examples=config.data.eval_generate_examples,
        generate_every_round=needs_generations(config.selection.metric),
        tokenizer=tokenizer,
        metric_function=config.selection.metric if is_user_metric(config.selection.metric) else "",
    )


# Ray's memory monitor kills a worker when the machine runs low on memory, and Tune then ends the
# whole search rather than the trial: the words that name it, and what to do about it.
MEMORY_MONITOR = "killed due to the node running low on memory"
MEMORY_HINT = ("Ray's memory monitor killed a trial's worker because the machine ran low on memory: run fewer "
               "trials at once (resources.max_concurrent_trials) or close other programs")


def failed(error: Exception, location: RunLocation, stop: GracefulStop) -> None:
    """Say in one line why the search failed, where the whole error is where it is longer than a
    line (logs/failure.log), what is saved and the command that continues it (`stop.again`)."""
    _push(location)
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    whole = ""
    if "\n" in text:
        path = location.local / LOGS / "failure.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{type(error).__name__}: {text}\n")
        whole = f" (the whole error: {path})"
    hint = f". {MEMORY_HINT}" if MEMORY_MONITOR in text else ""
    how = "resume with" if stop.again == "--resume" else "run again with"
    print(f"error: the search failed: {type(error).__name__}: {first}{whole}{hint}. {saved_line(location)}; "
          f"{how}: {command_again(stop, stop.again)}", file=sys.stderr)


def saved_line(location: RunLocation) -> str:
    return (f"the run so far is saved in {location.remote or location.local} (finished trials, and unfinished "
            f"ones at their last checkpoint)")


def _push(location: RunLocation) -> bool:
    """Upload the driver's files to a URI output; on failure say where they are kept."""
    try:
        location.push()
        return True
    except Exception as e:  # noqa: BLE001 - the run's results are safe locally: say so, exit 1
        print(f"error: could not upload the run's files to {location.remote} ({type(e).__name__}: {e}); "
              f"they are in {location.local}, and --resume uploads them again", file=sys.stderr)
        return False


def _check_output(location: RunLocation, *, resume: bool, overwrite: bool) -> None:
    """ConfigError or LocationError where the run cannot be written at `location`: a path that is
    a file or cannot be made, a bucket not writable; and, for a new run, a run already there
    (unless `overwrite`)."""
    run_dir = location.local
    location.check_writable()
    if resume:
        return
    if location.remote:
        if location.remote_exists() and not overwrite:
            raise ConfigError(f"the run {location.remote} already exists and is not empty; nothing in it was touched. "
                              f"Fix: choose another --name, or pass --overwrite to replace it")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(f"the run directory {run_dir} already exists and is not empty; nothing in it was touched. "
                          f"Fix: choose another --name, or pass --overwrite to replace it")
