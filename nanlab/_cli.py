"""What the three command lines (`nanlab.train`, `nanlab.compare`, `nanlab.check`) share.

The exit-code contract (0 success, 2 bad input, 3 the run went non-finite), an argparse parser
that reports a bad flag as one line and exits 2, and the workdir check: a folder that can be
written, refused with one line naming it otherwise. Standard library only; no CLI module is
imported from here, and no library module imports this one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanlab.config import BadInput

__all__ = ["EXIT_BAD_INPUT", "EXIT_NONFINITE", "EXIT_OK", "Parser", "check_workdir", "report_bad_input"]

EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE = 0, 2, 3


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line, ``NAME: error: ...`` (no usage block), and exits 2.

    Args:
      name: the module run as ``python -m NAME`` (the program shown in --help is that command).
      **kwargs: argparse.ArgumentParser's other arguments.
    """

    def __init__(self, name: str, **kwargs):
        super().__init__(prog=f"python -m {name}", **kwargs)
        self.name = name

    def error(self, message: str) -> None:  # noqa: D401 - argparse's hook
        report_bad_input(self.name, message)
        raise SystemExit(EXIT_BAD_INPUT)


def report_bad_input(name: str, error: object) -> int:
    """Print ``NAME: error: ERROR`` on stderr; return the bad-input exit code."""
    print(f"{name}: error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def check_workdir(workdir: Path, *, shown: str, noun: str = "directory", refusal: str | None = None,
                  create: bool = True) -> None:
    """Make sure `workdir` is a folder this process can write, creating it (and its parents) if needed.

    Args:
      workdir: the folder.
      shown: how the messages name it (e.g. ``"workdir runs/x"``, ``"--workdir runs/x"``).
      noun: what the first message calls a folder.
      refusal: the caller's reason to refuse the folder as it is (e.g. it holds results), checked
        after "it is a file" and before anything is created; None to accept it.
      create: False checks only what needs no folder (a file in the way, the refusal), creating
        nothing: the check to run before the rest of the input is validated.

    Raises:
      BadInput: one line naming the folder and the problem.
    """
    if workdir.exists() and not workdir.is_dir():
        raise BadInput(f"{shown} exists and is not a {noun}")
    if refusal is not None:
        raise BadInput(refusal)
    if not create:
        return
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".nanlab-write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise BadInput(f"{shown} is not writable: {error.strerror or error}") from None
