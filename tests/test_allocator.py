"""nanlab.allocator: a CLI process starts itself again on mimalloc, once, and only when it should."""

import os
import platform
import subprocess
import sys

import pytest

from nanlab import allocator

LINUX_X86 = sys.platform.startswith("linux") and platform.machine() == "x86_64"

# A stand-in for a CLI's first lines: the pid and arguments before the rerun, then what it runs on.
_CLI = """
import os, sys
print("start", os.getpid(), sys.argv[1:], flush=True)
from nanlab import allocator
allocator.rerun_with_mimalloc()
print("runs on", allocator.current(), flush=True)
"""


def _run(**env):
    base = allocator.without_preload(dict(os.environ))
    return subprocess.run([sys.executable, "-c", _CLI, "--steps", "3"], env={**base, **env},
                          capture_output=True, text=True, timeout=120)


def test_the_library_is_installed_where_its_wheel_exists():
    # pyproject.toml depends on cmeel-mimalloc on Linux x86_64: a broken dependency fails here.
    library = allocator.mimalloc_library()
    if LINUX_X86:
        assert library is not None and library.is_file()
    else:
        assert library is None


@pytest.mark.skipif(not LINUX_X86, reason="mimalloc is a Linux x86_64 dependency")
def test_a_cli_reruns_itself_once_on_mimalloc_with_its_pid_and_arguments():
    done = _run()
    assert done.returncode == 0, done.stderr
    starts = [line for line in done.stdout.splitlines() if line.startswith("start")]
    # Two starts, the same process id and arguments: os.execve replaced the process, once.
    assert len(starts) == 2 and starts[0] == starts[1]
    assert starts[0].endswith("['--steps', '3']")
    assert done.stdout.splitlines()[-1] == "runs on mimalloc"


@pytest.mark.parametrize("env", [{"NANLAB_ALLOCATOR": "system"}, {"LD_PRELOAD": "libm.so.6"}],
                         ids=["system-chosen", "user-preload"])
def test_the_system_allocator_or_a_users_preload_is_left_alone(env):
    done = _run(**env)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["start", "runs"]
    assert done.stdout.splitlines()[-1] == "runs on system"


def test_an_unknown_allocator_is_one_line_and_exit_2():
    done = _run(NANLAB_ALLOCATOR="jemalloc")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: NANLAB_ALLOCATOR must be one of mimalloc, system, got 'jemalloc'"]
    assert "runs on" not in done.stdout
