"""JAX's persistent compilation cache for nanlab's CLIs: a second run loads its programs.

A run of `python -m nanlab.train` compiles InceptionV3's init, train, eval and statistics programs
before its first step; on a 2-core CPU that is most of the wall time of a short run. With the cache
on, XLA's executables are written to disk and a later run with the same program, JAX version and
flags loads them instead of compiling.

Where it lives (never inside the repository): `$XDG_CACHE_HOME/nanlab/jax-cache`, or
`~/.cache/nanlab/jax-cache` when XDG_CACHE_HOME is unset. `NANLAB_COMPILE_CACHE` moves it (a
directory) or turns it off (`off`); the CLIs' `--compile-cache DIR|off` flag wins over both.

Only the CLIs call `enable`: it sets process-wide JAX options, which a library must not do behind a
user's back.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["ENV_VAR", "OFF", "RUN_ONCE_OPTIONS", "default_dir", "resolve", "enable"]

ENV_VAR = "NANLAB_COMPILE_CACHE"
OFF = "off"

# `jax.jit(..., compiler_options=RUN_ONCE_OPTIONS)` for programs that run once or a few times
# (a model's init, the localizer's one-equation programs): XLA's CPU backend compiles them several
# times faster without its optimization passes, and a program that runs once cannot win that back.
# The values are XLA's own (no fast-math change): a one-equation program gives the same bits at
# either level, and an init's random normal draws may differ by a few ulp (measured: 1 ulp on jax
# 0.10, up to 4 on 0.12), uniform ones not at all.
RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0}


def default_dir() -> Path:
    """The user's cache directory for nanlab's compiled programs (XDG base directory rules)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nanlab" / "jax-cache"


def resolve(flag: str | None = None) -> Path | None:
    """The cache directory to use, or None when the cache is off.

    Args:
      flag: the CLI's `--compile-cache` value (a directory or 'off'); None when not given, then
        `NANLAB_COMPILE_CACHE` decides, then the default directory.

    Raises:
      ValueError: the chosen path exists and is not a directory.
    """
    choice = flag if flag is not None else os.environ.get(ENV_VAR, "")
    if choice.strip().lower() == OFF:
        return None
    path = Path(choice).expanduser() if choice.strip() else default_dir()
    if path.exists() and not path.is_dir():
        source = "--compile-cache" if flag is not None else ENV_VAR
        raise ValueError(f"{source} {str(path)!r} is a file, not a directory (give a directory or 'off')")
    return path


def enable(directory: Path | None) -> Path | None:
    """Point JAX's persistent compilation cache at `directory` (None: leave it off).

    Every program is cached, however quick its compile: nanlab's runs compile a few dozen programs
    of 0.1-5 s each, and loading beats compiling for all of them on CPU.

    Returns:
      `directory`, for the run's summary.
    """
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
