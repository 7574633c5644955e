"""Which processes a test's Ray left running: every Ray process keeps its log files open in its
session directory (worker command lines are rewritten to `ray::IDLE`, and workers have process
groups of their own), so open files, not names or groups, tell them apart."""

from __future__ import annotations

import os
from pathlib import Path


def processes_using(*paths: Path) -> list[int]:
    """PIDs with a file open under one of `paths`."""
    prefixes = tuple(map(str, paths))
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd).startswith(prefixes) for fd in fd_dir.iterdir()):
                pids.append(int(fd_dir.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids
