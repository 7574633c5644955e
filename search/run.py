"""`python -m search.run`: find the LoRA configuration for a model and a dataset.

The command line: its arguments, the signals and the exit codes (0 done, 1 failure while
running, 2 bad input, 130 and 143 stopped by SIGINT and SIGTERM); the run itself is
`search.recipe.SearchRecipe`.
"""

from __future__ import annotations

import time

# The command's start, read before its imports, which it counts: the run measures from here to its
# first training step (`first_step_seconds`). Only the interpreter's own start, some 0.05 s, is earlier.
STARTED_AT = time.time()

import argparse
import json
import os

from rundir.cli import ArgumentParser
from search.config import Config, leaves, load, to_yaml
from search.output.console import Console, use_console
from search.recipe import SearchRecipe
from search.signals import GracefulStop, run_command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    keys = "\n".join(f"  {key} = {json.dumps(value)}\n      {f.metadata['help']}" for key, f, value in leaves(Config()))
    parser = ArgumentParser(
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
                        help="print module sets, ranks and trainable parameter counts from the model's config; "
                             "no Ray, no training")
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


def main(argv: list[str] | None = None, started_at: float | None = None) -> int:
    """The command with `argv` (default: this process's arguments); `started_at`, when the command
    started (epoch seconds), default now: the run measures from it to its first training step."""
    started_at = time.time() if started_at is None else started_at
    try:
        args = parse_args(argv)
    except SystemExit as done:  # --help, or a bad argument said in one line
        return done.code
    overrides = list(args.overrides)
    # quoted, so YAML keeps them strings: --name 2024 is a name, not a number
    overrides += [f"name={json.dumps(args.name)}"] if args.name else []
    overrides += [f"output={json.dumps(args.output)}"] if args.output else []
    stop = GracefulStop()  # whatever it is doing, the run ends the same way on Ctrl+C or SIGTERM

    def prepare() -> int | SearchRecipe:
        config = load(args.config, overrides)
        if args.print_config:
            print(to_yaml(config), end="")
            return 0
        recipe = SearchRecipe(config, args.address, stop, dry_run=args.dry_run, resume=args.resume,
                              overwrite=args.overwrite, started_at=started_at)
        recipe.start_trainer_process()  # before the libraries' imports that the console makes
        try:
            use_console(args.console)
        except BaseException:
            recipe.close_trainer_process()
            raise
        return recipe

    return run_command(stop, prepare)


if __name__ == "__main__":
    raise SystemExit(main(started_at=STARTED_AT))
