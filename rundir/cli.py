"""How both commands (`search.run`, `analysis.report`) say that their input is bad: each problem
on one line of its own that starts with `error: `, and exit status 2."""

from __future__ import annotations

import argparse
import sys

BAD_INPUT = 2


def print_errors(error: Exception) -> int:
    """Print `error`'s problems (its message, one problem a line) to stderr, one line each
    starting with `error: `, any line breaks inside a problem flattened; return BAD_INPUT."""
    for problem in str(error).splitlines() or ["(no message)"]:
        if problem.strip():
            print(f"error: {' '.join(problem.split())}", file=sys.stderr)
    return BAD_INPUT


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad argument is one `error: ` line (argparse prints its usage
    as well, over several lines) and exit 2."""

    def error(self, message: str):
        print_errors(ValueError(f"{message}; see {self.prog} --help"))
        raise SystemExit(BAD_INPUT)
