"""How the commands (`search.run`, `search.retrain`, `analysis.report`) say that their input is bad: each problem
on one line of its own that starts with `error: `, and exit status 2."""

from __future__ import annotations

import argparse
import sys

BAD_INPUT = 2


def print_errors(*problems: str) -> int:
    """Print each of `problems` to stderr as one line (its line breaks flattened) that starts
    with `error: `; return BAD_INPUT."""
    for problem in problems:
        print(f"error: {' '.join(problem.split()) or '(no message)'}", file=sys.stderr)
    return BAD_INPUT


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad argument is one `error: ` line (argparse prints its usage
    as well, over several lines) and exit 2."""

    def error(self, message: str):
        print_errors(f"{message}; see {self.prog} --help")
        raise SystemExit(BAD_INPUT)
