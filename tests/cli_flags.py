"""The train CLI's argv from a dict of TrainConfig fields, for the tests that run it in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def train_argv(workdir: str | Path, flags: dict[str, Any]) -> list[str]:
    """['--workdir', workdir, ...]: True -> --flag, False -> --no-flag, else --flag value."""
    argv = ["--workdir", str(workdir)]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv
