"""`python -m search.run`: find the LoRA configuration for a model and a dataset.

Order of work: read and check the config, resolve the model's module sets, tokenize
the data (all before Ray starts: bad input exits 2 with nothing written), then run the
Ray Tune search, then hand the run directory to `analysis` for the pick, report and export.
Exit codes: 0 done, 1 failure while running, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

from analysis.config import is_user_metric, needs_generations
from rundir.layout import LOGS
from rundir.location import LocationError, RunLocation, locate
from rundir.runconfig import CREATED_BY, DataInfo, RunConfig
from search.config import SHARED, Config, ConfigError, leaves, load, resolve_packing, to_dict, to_yaml
from search.console import Console, keep_logs_in, use_console
from search.resume import record_driver, record_ray_session
from trainables.config import cache_root


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    keys = "\n".join(f"  {key} = {json.dumps(value)}\n      {f.metadata['help']}" for key, f, value in leaves(Config()))
    parser = argparse.ArgumentParser(
        prog="python -m search.run", description=__doc__.splitlines()[0],
        epilog=f"configuration keys, with the embedded default's values (set any with --set KEY=VALUE):\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the embedded configs/default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, value read as YAML, e.g. --set search.ranks=[8,16]")
    parser.add_argument("--name", help="run name (overrides the config's name)")
    parser.add_argument("--output", help="directory that holds runs (overrides the config's output)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="join a Ray cluster: auto or ray://HOST:PORT (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run of the same name and config: finished trials are kept, "
                             "unfinished ones continue from their last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    parser.add_argument("--dry-run", action="store_true",
                        help="print module sets, ranks and trainable parameter counts from the model's config; no Ray, no training")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as YAML (a file for --config) and exit")
    console = parser.add_mutually_exclusive_group()
    console.add_argument("--quiet", dest="console", action="store_const", const=Console.QUIET, default=Console.DEFAULT,
                         help="print the result and errors only")
    console.add_argument("--verbose", dest="console", action="store_const", const=Console.VERBOSE,
                         help="print Ray Tune's own tables and what Ray, Optuna, datasets and transformers print, "
                              "instead of a line per trial event and a status line (their logs then stay out of "
                              "runs/<name>/logs/)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    # quoted, so YAML keeps them strings: --name 2024 is a name, not a number
    overrides += [f"name={json.dumps(args.name)}"] if args.name else []
    overrides += [f"output={json.dumps(args.output)}"] if args.output else []
    stop = GracefulStop()  # whatever it is doing, the run ends the same way on Ctrl+C or SIGTERM
    try:
        with stop:
            config = load(args.config, overrides)
            if args.print_config:
                print(to_yaml(config), end="")
                return 0
            use_console(args.console)
            return run(config, args, stop)
    except (ConfigError, LocationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # raised by `stop`, which knows the signal and what `run` has saved by now
        return _stopped(stop, stop.saved, stop.again)


def run(config: Config, args: argparse.Namespace, stop: GracefulStop) -> int:
    """The run of `config`, or its dry run; `stop` learns what the run has saved as it goes."""
    from search.prepare import check_device, check_shared_packing, prepare_model
    from search.tracking import mlflow_store_problem

    if is_user_metric(config.selection.metric):  # the config allows it only with selection.trust_metric_code
        from trainables.generate import UserMetric

        try:  # here first, so that a module not found is bad input before Ray starts
            UserMetric.load(config.selection.metric)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        print(f"selection.trust_metric_code is true: every trial imports and runs {config.selection.metric}", flush=True)
    prepared = prepare_model(config)
    store_problem = mlflow_store_problem(config.tracking.mlflow)
    if store_problem:
        raise ConfigError(store_problem)
    packing = resolve_packing(config)
    if packing == SHARED:
        check_shared_packing(prepared.resolved)
    import torch

    cuda, local = torch.cuda.is_available(), args.address is None
    # the share by memory needs this machine's GPU; a cluster's GPUs are not known here
    gpu_memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda and local else None
    bytes_per_param = 0.5 if config.model.quantization == "4bit" else 4.0 if config.model.dtype == "float32" else 2.0
    gpus = config.resources.gpus(cuda, prepared.total_params, gpu_memory_gb, bytes_per_param)
    steps_every_trial = min(config.budget.grace_period, config.budget.max_steps)
    compiled = config.resources.compiled(gpus, prepared.total_params, steps_every_trial,
                                         config.model.quantization == "none" and not config.model.gradient_checkpointing)
    memory_probe = None
    # before Ray asks for slots; a shared trial holds no share of a GPU, its trainer holds the GPU
    if config.resources.gpus_per_trial == "auto" and gpu_memory_gb and packing != SHARED:
        memory_probe = _probe_memory(config, prepared, compiled, gpu_memory_gb)
        gpus = memory_probe.share
        print(memory_probe.line(), flush=True)
    if args.dry_run:
        from search.dryrun import data_line, dry_run_rows, format_table, packing_line

        rows = dry_run_rows(prepared.model, config.search.module_sets, config.search.ranks, config.search.use_dora)
        data = data_line(config, prepared)  # in memory: nothing is written
        print(format_table(rows, config.model.path))
        print(data)
        print(packing_line(config.resources, packing, any(config.search.use_dora)))
        return 0
    check_device(config, gpus, local=local)
    # as resolved, in run_config.json
    config = replace(config, resources=replace(config.resources, compile=compiled, packing=packing))
    from search.cluster import check_cluster_gpus, connect, keep_local_ray_on_loopback, resolve_address

    cluster = resolve_address(args.address)
    if cluster is None:
        keep_local_ray_on_loopback()  # before this process first imports ray, in `_search`
    else:  # join the cluster before anything is written
        with GracefulStop() as joining:
            try:
                connect(cluster)
                check_cluster_gpus(gpus)
            except KeyboardInterrupt:
                return _stopped(joining, f"nothing was written (it was joining the Ray cluster at {cluster.address})",
                                again="")
    location = locate(config.output, config.name, cache_root())
    run_dir = location.local
    if args.resume:
        from search.resume import check_driver_gone, resume_check, stop_leftover_workers

        stop.saved, stop.again = _saved(location), "--resume"
        location.check_writable()
        location.pull()  # a run kept at a URI resumes from any machine
        data_info = resume_check(run_dir, config)
        check_driver_gone(run_dir)
        stop_leftover_workers(run_dir)
    else:
        data_info = _start(config, prepared, gpus, location, args.overwrite, stop, memory_probe)
    stop.saved, stop.again = _saved(location), "--resume"
    keep_logs_in(run_dir / LOGS)
    record_driver(run_dir)
    return _search(config, args, prepared, gpus, data_info, location)


def _probe_memory(config: Config, prepared, compiled: bool, gpu_memory_gb: float):
    """One trial of the space's heaviest configuration, measured on this machine's GPU, and the
    share `auto` takes from it (search/memory.py)."""
    import torch

    from search.memory import Probe, ProbeSpec, heaviest_lora_config, probe
    from trainables.model import resolve_dtype

    search = config.search
    lora = heaviest_lora_config(prepared.resolved, search.ranks, search.use_dora, search.dropout)
    measured = probe(ProbeSpec(
        model_path=prepared.path, dtype=resolve_dtype(config.model.dtype, cuda=True),
        quantization=config.model.quantization, trust_remote_code=config.model.trust_remote_code,
        gradient_checkpointing=config.model.gradient_checkpointing, lora_config=lora,
        batch_size=config.budget.batch_size, max_length=config.data.max_length,
        cuda_graphs=config.resources.cuda_graphs and not config.model.gradient_checkpointing, compiled=compiled),
        cache_dir=cache_root() / "memory-probes", device=torch.cuda.get_device_name(0))
    share = config.resources.gpus(True, prepared.total_params, gpu_memory_gb, footprint_gb=measured["footprint_gb"])
    return Probe(**measured, margin=config.resources.memory_margin, share=share, lora_config=lora)


def _start(config: Config, prepared, gpus: float, location: RunLocation, overwrite: bool, stop: GracefulStop,
           memory_probe=None) -> DataInfo:
    """Tokenize the data (in memory: bad data is input error with nothing written), then
    create the run directory with the data and the resolved config (uploaded at once to a
    URI output, where every node reads the data). A stop meanwhile leaves it incomplete."""
    from rundir.files import write_json_atomic
    from rundir.layout import DATA, RUN_CONFIG
    from search.prepare import load_tokenizer, prepare_data
    from trainables.data import save_splits

    run_dir = location.local
    _check_run_dir(location, overwrite)
    splits, prepared_data = prepare_data(config, load_tokenizer(config, prepared.path))
    stop.saved = f"the run directory {location.remote or run_dir} was being made and is incomplete"
    stop.again = "--overwrite"  # a new run is refused where one is, even half made
    location.delete_remote()  # only reached with --overwrite when it holds anything
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    save_splits(splits, run_dir / DATA)
    record = RunConfig.from_json({
        **to_dict(config),
        "resources": {**to_dict(config)["resources"], "gpus_per_trial": gpus,
                      "memory_probe": asdict(memory_probe) if memory_probe else None},
        "base_model": {"path": prepared.path, "name": prepared.name, "origin": prepared.origin,
                       "total_params": prepared.total_params},
        "data_info": asdict(prepared_data),
        "module_sets": {k: {"target_modules": v.target_modules, "layers": len(v.layers), "note": v.note}
                        for k, v in prepared.resolved.items()},
        "created_by": CREATED_BY,
    })
    write_json_atomic(run_dir / RUN_CONFIG, record.to_json())
    try:
        location.push(data=True)  # every node reads the data from there
    except Exception as e:  # noqa: BLE001 - the output was writable a moment ago: say what failed
        raise ConfigError(f"could not upload the run's data to {location.remote} ({type(e).__name__}: {e}). "
                          f"Fix: check the URI and its credentials, then start again with --overwrite") from None
    return record.data_info


def _search(config: Config, args, prepared, gpus: float, data_info: DataInfo, location: RunLocation) -> int:
    import ray

    from rundir.layout import SEARCH_EXPERIMENT
    from search.cluster import connect, resolve_address, trial_slots
    from search.prior import prior_points
    from search.space import LoraSpace
    from search.trainers import shared_trainers, trainer_slots
    from search.tuner import build_tuner, fit_or_restore, retrain, trainable_for
    from trainables.config import TrialSetup
    from trainables.model import resolve_dtype

    tokenizer = config.model.tokenizer
    if tokenizer and Path(tokenizer).expanduser().is_dir():  # trials run in directories of their own
        tokenizer = str(Path(tokenizer).expanduser().resolve())
    setup = TrialSetup(
        # the alias or a hub id is resolved on the node that runs the trial (its own cache);
        # a directory is passed as resolved here and must be visible to every node
        model_path=prepared.path if Path(config.model.path).is_dir() else config.model.path,
        dtype=resolve_dtype(config.model.dtype, cuda=gpus > 0),
        quantization=config.model.quantization,
        trust_remote_code=config.model.trust_remote_code,
        data_dir=location.data_dir(),
        max_steps=config.budget.max_steps,
        eval_every=config.budget.eval_every,
        batch_size=config.budget.batch_size,
        cpu_threads=config.resources.cpus_per_trial,
        warmup_steps=config.budget.warmup_steps,
        total_params=prepared.total_params,
        pad_token_id=data_info.pad_token_id,
        cuda_graphs=config.resources.cuda_graphs and not config.model.gradient_checkpointing,
        compile=config.resources.compile,
        gradient_checkpointing=config.model.gradient_checkpointing,
        generate_examples=config.data.eval_generate_examples,
        generate_every_round=needs_generations(config.selection.metric),
        tokenizer=tokenizer,
        metric_function=config.selection.metric if is_user_metric(config.selection.metric) else "",
    )
    # Experiment state written at most every second (Ray's default: 10 s), so a killed
    # run loses at most a second of bookkeeping and no finished trial is trained twice.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # frequent on purpose
    cluster = resolve_address(args.address)
    stop = GracefulStop()
    started_here = False  # this process started Ray, or joined a cluster in `run`: it lets go at the end
    try:
        with stop:
            started_here = connect(cluster) or cluster is not None
            record_ray_session(location.local)
            shared = config.resources.packing == SHARED
            # a DoRA trial of a shared run trains in a process of its own, beside its GPU's trainer
            beside = gpus if shared and any(config.search.use_dora) else 0.0
            with shared_trainers(config.resources, setup, beside) if shared else nullcontext([]) as trainers:
                # Tune keeps one trial pending at a time for a searcher without a concurrency limit
                # (ray.tune.execution.tune_controller._get_max_pending_trials), so trials would start one
                # after another: on an H100 with 8 slots, 3 were running 30 s in. With the limit at the
                # cluster's slot count, every slot starts at once, and Optuna proposes only when a slot is free.
                if shared:
                    slots = trainer_slots(trainers, config.resources.pack_slots, config.resources.max_concurrent_trials)
                else:
                    slots = config.resources.max_concurrent_trials or trial_slots(gpus, config.resources.cpus_per_trial)
                config = replace(config, resources=replace(config.resources, max_concurrent_trials=slots))
                trainable = trainable_for(setup, config.resources.cpus_per_trial, gpus, trainers)
                priors = prior_points(config.search, data_info.search_train_rows, config.task.kind,
                                      config.budget.num_samples)
                space = LoraSpace(config.search, prepared.resolved, config.seed, priors=len(priors))
                fit_or_restore(SEARCH_EXPERIMENT, location, trainable,
                               lambda: build_tuner(config, trainable, space, priors, location))
                if config.selection.retrain and stop.requested is None:
                    retrain(config, trainable, location)
    except KeyboardInterrupt:
        pass  # raised by `stop`, which remembers the signal; what was saved is said below
    except Exception as e:  # a failure of the search itself, not of one trial (those are results)
        _push(location)
        print(f"error: the search failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if started_here:
            ray.shutdown()
    if stop.requested:  # no analysis: the run ends within seconds, and `--resume` analyses at its end
        _push(location)
        return _stopped(stop, _saved(location))
    from analysis.pipeline import analyse

    code = analyse(location.local)
    if config.tracking.mlflow.enabled:
        from search.trackers import log_pick

        if not log_pick(config.tracking.mlflow.tracking_uri, location.local):
            code = code or 1
    if not _push(location):
        code = code or 1
    elif location.remote:
        print(f"The run is at {location.remote} (working copy: {location.local})")
    return code


class GracefulStop:
    """Ctrl+C (SIGINT) and SIGTERM (what Slurm and Kubernetes send) end the run within seconds
    wherever they land inside the block, and the first one is remembered in `requested`.

    While Tune runs, the first signal asks it to stop gracefully: Tune's handler (the one on
    SIGUSR1, since its SIGINT handler is turned off) stops the trials and writes the experiment
    state one last time, so `--resume` continues it. Anywhere else, at a second signal, or when
    Tune has not stopped within GRACE_S, KeyboardInterrupt is raised at once; `--resume` then
    continues from Tune's last snapshot of the state, at most a second old.

    `saved` and `again` say what a stop at this point leaves and the flag that continues from
    there ("" for the same command): `run` updates them as it goes, and `_stopped` says them.
    """

    GRACE_S = 10.0

    def __init__(self) -> None:
        self.requested: str | None = None
        self.saved = "nothing was written"
        self.again = ""

    def __enter__(self) -> GracefulStop:
        self._previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
        # Tune installs a new SIGUSR1 handler each time it starts, and leaves it there when it ends
        self._tune_before = signal.getsignal(signal.SIGUSR1)
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        first = self.requested is None
        self.requested = self.requested or signal.Signals(signum).name
        tune = signal.getsignal(signal.SIGUSR1)
        if not (first and callable(tune) and tune is not self._tune_before):
            raise KeyboardInterrupt
        tune(signal.SIGUSR1, frame)
        signal.signal(signal.SIGALRM, self._give_up)
        signal.setitimer(signal.ITIMER_REAL, self.GRACE_S)

    def _give_up(self, signum: int, frame) -> None:
        raise KeyboardInterrupt  # Tune did not stop within GRACE_S

    def __exit__(self, *exc) -> bool:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._tune_before is not None:  # Tune's handler outlives its run: a block around this one
            signal.signal(signal.SIGUSR1, self._tune_before)  # would take it for a Tune still running
        return False


def _stopped(stop: GracefulStop, saved: str, again: str = "--resume") -> int:
    """Say in one line what stopped the run, what was `saved`, and the command that continues
    it: this process's command line, plus `again` (--resume where there is something to resume,
    --overwrite where a half-made run directory is in the way, "" for neither). The exit code is
    a shell's for that signal: 130 for SIGINT, 143 for SIGTERM."""
    import shlex

    name = stop.requested or "SIGINT"
    command = ["python", "-m", "search.run", *sys.argv[1:]]
    if again and again not in command:
        command.append(again)
    how = "Resume with" if again == "--resume" else "Start again with"
    print(f"stopped by {name}: {saved}. {how}: {shlex.join(command)}", file=sys.stderr, flush=True)
    return 128 + signal.Signals[name].value


def _saved(location: RunLocation) -> str:
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


def _check_run_dir(location: RunLocation, overwrite: bool) -> None:
    run_dir = location.local
    location.check_writable()
    if location.remote:
        if location.remote_exists() and not overwrite:
            raise ConfigError(f"the run {location.remote} already exists and is not empty; nothing in it was touched. "
                              f"Fix: choose another --name, or pass --overwrite to replace it")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(f"the run directory {run_dir} already exists and is not empty; nothing in it was touched. "
                          f"Fix: choose another --name, or pass --overwrite to replace it")


if __name__ == "__main__":
    raise SystemExit(main())
