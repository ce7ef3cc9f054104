"""The memory allocator a nanlab command-line process runs on: mimalloc where it is installed.

XLA's CPU runtime asks for each execution's temporary buffer (1.98 GB for InceptionV3's train step
at 299x299, batch 8) with malloc, on one of its worker threads. glibc serves a request that large
from a fresh `mmap` and returns it with `munmap` when the step ends, so every step faults the whole
buffer back in, page by page: measured on an Intel Xeon (2 cores, AVX-512; jax 0.10.2) 490,000
minor page faults and 0.7 s of kernel time per step. Its thread arenas cannot keep a block that
size, and routing every thread through glibc's main arena (which could) made the step slower still
from lock contention. mimalloc keeps freed blocks for reuse: the same step with mimalloc preloaded
ran 1659 against 1987 ms (1.20x), at 75x75, batch 32 279-290 against 334 ms, with no page faults
(`benchmarks/results/bench_model.md`).

A library cannot swap the allocator of a process that is already running, so the CLIs
(`python -m nanlab.train`, `python -m nanlab.compare`) start themselves again with mimalloc
preloaded (`rerun_with_mimalloc`), before they import JAX: the same process id, arguments and
environment plus ``LD_PRELOAD``. Nothing else changes; ``NANLAB_ALLOCATOR=system`` keeps glibc's,
and a process whose ``LD_PRELOAD`` is already set (the user's own allocator) is left as it is.
Linux only: the `cmeel-mimalloc` wheel that provides the library is a Linux dependency.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

__all__ = ["ALLOCATORS", "ALLOCATOR_ENV", "current", "mimalloc_library", "rerun_with_mimalloc", "without_preload"]

ALLOCATOR_ENV = "NANLAB_ALLOCATOR"  # "mimalloc" (the default) or "system"
ALLOCATORS = ("mimalloc", "system")
_RERUN_ENV = "NANLAB_ALLOCATOR_RERUN"  # set in the rerun process, so that it never reruns again


def mimalloc_library() -> Path | None:
    """The path of the installed libmimalloc shared library (the `cmeel-mimalloc` wheel), or None."""
    try:
        files = importlib.metadata.files("cmeel-mimalloc") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    candidates = sorted(f for f in files if f.name.startswith("libmimalloc.so"))
    for file in candidates:
        path = Path(file.locate()).resolve()
        if path.is_file():
            return path
    return None


def without_preload(env: dict[str, str]) -> dict[str, str]:
    """`env` without the preload and rerun marker `rerun_with_mimalloc` sets: a child process started
    with it runs on its own allocator (and a nanlab CLI among them chooses again)."""
    return {k: v for k, v in env.items() if k not in ("LD_PRELOAD", _RERUN_ENV)}


def current() -> str:
    """"mimalloc" when this process has libmimalloc mapped (preloaded), else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "mimalloc" if "libmimalloc" in maps else "system"


def rerun_with_mimalloc() -> None:
    """Replace this process with itself on mimalloc (`os.execve`), or return when it should not.

    It returns, changing nothing, when: the process already runs on mimalloc or was already rerun;
    ``NANLAB_ALLOCATOR`` is "system"; ``LD_PRELOAD`` is set (another allocator chosen by the user);
    the platform is not Linux; or no libmimalloc is installed. An unknown ``NANLAB_ALLOCATOR`` value
    is one line on stderr and exit code 2, before anything is written.
    """
    choice = os.environ.get(ALLOCATOR_ENV, "mimalloc")
    if choice not in ALLOCATORS:
        sys.stderr.write(f"error: {ALLOCATOR_ENV} must be one of {', '.join(ALLOCATORS)}, got {choice!r}\n")
        raise SystemExit(2)
    if (choice == "system" or os.environ.get(_RERUN_ENV) or os.environ.get("LD_PRELOAD")
            or not sys.platform.startswith("linux") or current() == "mimalloc"):
        return
    library = mimalloc_library()
    if library is None:
        return
    env = dict(os.environ, LD_PRELOAD=str(library), **{_RERUN_ENV: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv is the interpreter's own command line (its flags, -m and the module included).
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
