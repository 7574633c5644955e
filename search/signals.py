"""Ctrl+C and SIGTERM: the run ends within seconds wherever they land, says what it saved, and
prints the command that continues it."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from rundir.cli import print_errors
from rundir.location import LocationError
from search import environment
from search.config import ConfigError


class GracefulStop:
    """Ctrl+C (SIGINT) and SIGTERM (what Slurm and Kubernetes send) end the run within seconds
    wherever they land inside the block, and the first one is remembered in `requested`.

    While Tune runs, the first signal asks it to stop gracefully: Tune's handler (the one on
    SIGUSR1, since its SIGINT handler is turned off) stops the trials and writes the experiment
    state one last time, so `--resume` continues it. Anywhere else, at a second signal, or when
    Tune has not stopped within GRACE_S, KeyboardInterrupt is raised at once; `--resume` then
    continues from Tune's last snapshot of the state, at most a second old.

    `saved` and `again` say what a stop at this point leaves and the flag that continues from
    there ("" for the same command): the run updates them as it goes, and `stopped` says them.
    """

    GRACE_S = 10.0

    def __init__(self, program: str = "search.run") -> None:
        self.program = program  # the module whose command line continues the run
        self.requested: str | None = None
        self.saved = "nothing was written"
        self.again = ""

    def __enter__(self) -> GracefulStop:
        self._previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
        # Tune installs a new SIGUSR1 handler each time it starts, and leaves it there when it ends
        self._tune_before = signal.getsignal(signal.SIGUSR1)
        environment.setenvs(environment.TUNE_SIGINT)
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


def stopped(stop: GracefulStop, saved: str, again: str = "--resume") -> int:
    """Say in one line what stopped the run, what was `saved`, and the command that continues
    it: this process's command line, plus `again` (--resume where there is something to resume,
    --overwrite where a half-made run directory is in the way, "" for neither). The exit code is
    a shell's for that signal: 130 for SIGINT, 143 for SIGTERM."""
    name = stop.requested or "SIGINT"
    how = "Resume with" if again == "--resume" else "Start again with"
    print(f"stopped by {name}: {saved}. {how}: {command_again(stop, again)}", file=sys.stderr, flush=True)
    return 128 + signal.Signals[name].value


def command_again(stop: GracefulStop, again: str) -> str:
    """This process's command line, plus `again` (--resume, --overwrite or "") where not in it."""
    import shlex

    command = ["python", "-m", stop.program, *sys.argv[1:]]
    if again and again not in command:
        command.append(again)
    return shlex.join(command)


def run_command(stop: GracefulStop, prepare: Callable[[], object]) -> int:
    """A command's run under `stop`, with the exit codes both commands share: `prepare` returns an
    exit code where the command ends before the run, else the `SearchRecipe` whose `setup`,
    `search` and `finish` run in turn until one returns a code. Bad input is one `error: ` line
    per problem and 2; a stop says what it saved; the environment is put back in any case."""
    try:
        with stop:
            recipe = prepare()
            if isinstance(recipe, int):
                return recipe
            code = recipe.setup()  # None: go on
            if code is None:
                code = recipe.search()
            return recipe.finish() if code is None else code
    except ConfigError as e:
        return print_errors(*e.problems)
    except LocationError as e:
        return print_errors(str(e))
    except KeyboardInterrupt:  # raised by `stop`, which knows the signal and what the run has saved by now
        return stopped(stop, stop.saved, stop.again)
    finally:
        environment.restore()
