"""Tests of nanlab.compile_cache: where the cache goes, how it is turned off, and that a second process hits it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanlab import compile_cache


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


def test_default_dir_follows_xdg_cache_home(clean_env):
    assert compile_cache.default_dir() == clean_env / "xdg" / "nanlab" / "jax-cache"
    assert compile_cache.resolve() == compile_cache.default_dir()


def test_default_dir_without_xdg_is_under_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache.default_dir() == tmp_path / ".cache" / "nanlab" / "jax-cache"


def test_env_var_moves_or_turns_off_the_cache(clean_env, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV_VAR, str(clean_env / "elsewhere"))
    assert compile_cache.resolve() == clean_env / "elsewhere"
    monkeypatch.setenv(compile_cache.ENV_VAR, "OFF")
    assert compile_cache.resolve() is None


def test_flag_wins_over_the_env_var(clean_env, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.resolve(str(clean_env / "flagged")) == clean_env / "flagged"
    monkeypatch.setenv(compile_cache.ENV_VAR, str(clean_env / "env"))
    assert compile_cache.resolve("off") is None


def test_a_file_in_place_of_the_directory_is_bad_input(clean_env):
    blocker = clean_env / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="a-file.*is a file, not a directory"):
        compile_cache.resolve(str(blocker))


def test_resolving_creates_nothing(clean_env):
    path = compile_cache.resolve()
    assert not path.exists()  # only enable() creates it, once a run has passed its input checks


_PROGRAM = """
import sys
from pathlib import Path
import jax, jax.numpy as jnp
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
from nanlab import compile_cache
compile_cache.enable(Path(sys.argv[1]))
jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.ones(5)).block_until_ready()
print("hits", events.count("/jax/compilation_cache/cache_hits"),
      "misses", events.count("/jax/compilation_cache/cache_misses"))
"""


def _run_program(cache: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV_VAR}
    done = subprocess.run([sys.executable, "-c", _PROGRAM, str(cache)], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    cache = tmp_path / "cache"
    first = _run_program(cache)
    assert first.startswith("hits 0 ") and not first.endswith("misses 0")
    assert any(cache.iterdir())
    second = _run_program(cache)
    assert second.endswith("misses 0") and not second.startswith("hits 0 ")


def test_run_once_options_keep_a_uniform_init_bit_for_bit():
    # InceptionV3's kernels are glorot_uniform: the init compiled without optimization passes
    # (train's and compare's) must draw the same weights as the optimized one.
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nanlab.compile_cache import RUN_ONCE_OPTIONS

    model = nn.Sequential([nn.Conv(8, (3, 3), kernel_init=nn.initializers.glorot_uniform()), nn.relu,
                           nn.Dense(3, kernel_init=nn.initializers.glorot_uniform())])
    x = jnp.zeros((2, 9, 9, 3))
    init = lambda x: model.init(jax.random.key(7), x)  # noqa: E731
    plain = jax.jit(init)(x)
    run_once = jax.jit(init, compiler_options=RUN_ONCE_OPTIONS)(x)
    leaves = jax.tree.leaves(plain)
    assert len(leaves) == 4
    for a, b in zip(leaves, jax.tree.leaves(run_once)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
