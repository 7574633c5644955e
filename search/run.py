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
import sys
from pathlib import Path

from search.config import Config, ConfigError, load, to_dict


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m search.run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (default: the embedded configs/default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, value read as YAML, e.g. --set search.ranks=[8,16]")
    parser.add_argument("--name", help="run name (overrides the config's name)")
    parser.add_argument("--output", help="directory that holds runs (overrides the config's output)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="join a Ray cluster: auto or ray://HOST:PORT (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    parser.add_argument("--dry-run", action="store_true",
                        help="print module sets, ranks and trainable parameter counts from the model's config; no Ray, no training")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    overrides += [f"name={args.name}"] if args.name else []
    overrides += [f"output={args.output}"] if args.output else []
    try:
        config = load(args.config, overrides)
        return run(config, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(config: Config, args: argparse.Namespace) -> int:
    from search.prepare import check_device, prepare_model

    prepared = prepare_model(config)
    if args.dry_run:
        from search.dryrun import dry_run_rows, format_table

        rows = dry_run_rows(prepared.model, config.search.module_sets, config.search.ranks, config.search.use_dora)
        print(format_table(rows, config.model.path))
        return 0

    import torch

    gpus = config.resources.gpus(torch.cuda.is_available(), prepared.total_params)
    check_device(config, gpus, local=args.address is None)
    run_dir = config.run_dir
    _check_run_dir(run_dir, args.overwrite)

    from trainables.data import prepare, save_splits

    try:
        splits, data_info = prepare(config.data, prepared.path, config.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    save_splits(splits, run_dir / "data")
    _write_json(run_dir / "run_config.json", {
        **to_dict(config),
        "resources": {**to_dict(config)["resources"], "gpus_per_trial": gpus},
        "base_model": {"path": prepared.path, "total_params": prepared.total_params},
        "data_info": data_info,
        "module_sets": {k: {"target_modules": v.target_modules, "layers": len(v.layers), "note": v.note}
                        for k, v in prepared.resolved.items()},
    })
    return _search(config, args, prepared, gpus, data_info, run_dir)


def _search(config: Config, args, prepared, gpus: float, data_info: dict, run_dir: Path) -> int:
    import ray

    from search.prior import prior_point
    from search.space import LoraSpace
    from search.tuner import build_tuner
    from trainables.config import TrialSetup
    from trainables.model import resolve_dtype

    setup = TrialSetup(
        model_path=prepared.path,
        dtype=resolve_dtype(config.model.dtype, cuda=gpus > 0),
        quantization=config.model.quantization,
        trust_remote_code=config.model.trust_remote_code,
        data_dir=str((run_dir / "data").resolve()),
        max_steps=config.budget.max_steps,
        eval_every=config.budget.eval_every,
        batch_size=config.budget.batch_size,
        cpu_threads=config.resources.cpus_per_trial,
        warmup_steps=config.budget.warmup_steps,
        total_params=prepared.total_params,
        pad_token_id=data_info["pad_token_id"],
    )
    started_here = not ray.is_initialized()
    if started_here:
        if args.address:
            ray.init(address=args.address, log_to_driver=False)
        else:
            # A local run listens on loopback only, with no dashboard.
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        space = LoraSpace(config.search, prepared.resolved, config.seed, with_prior=True)
        prior = prior_point(config.search, data_info["search_train_rows"], config.task.kind)
        tuner = build_tuner(config, setup, space, prior, gpus, run_dir)
        tuner.fit()
    except KeyboardInterrupt:
        print(f"interrupted; partial results stay in {run_dir}", file=sys.stderr)
        return 1
    except Exception as e:  # a failure of the search itself, not of one trial (those are results)
        print(f"error: the search failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if started_here:
            ray.shutdown()
    from analysis.report import analyse

    return analyse(run_dir)


def _check_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(f"the run directory {run_dir} already exists and is not empty; nothing in it was touched. "
                          f"Fix: choose another --name, or pass --overwrite to replace it")
    parent = run_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"output {run_dir.parent} is not writable (checked {parent}). Fix: choose another --output")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
