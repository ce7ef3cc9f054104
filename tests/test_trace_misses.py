"""Issue #14's misses 1 and 3: non-finite constants that reach an output, and vmapped while loops.

Each case runs under both evaluators (compiled segments and pure eager replay) and checks that they
agree, since a constant-only equation takes a different path in each.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from nanlab.trace import localize

MODES = pytest.mark.parametrize("segment_size", [0, 4], ids=["eager", "segments"])


def _same(fn, *args):
    fast = localize(fn, *args, segment_size=4)
    eager = localize(fn, *args, segment_size=0)
    assert fast.to_dict()["origin"] == eager.to_dict()["origin"]
    assert (fast.found, fast.cause, fast.num_events) == (eager.found, eager.cause, eager.num_events)
    return eager


# ------------------------------------------------------------------ miss 1: constants reaching an output

@MODES
def test_cond_branch_returning_a_nan_literal_is_reported_at_the_cond(segment_size):
    f = lambda x: lax.cond(x > 0, lambda v: jnp.nan, lambda v: v, x)  # noqa: E731
    assert np.isnan(f(1.0))
    report = localize(f, 1.0, segment_size=segment_size)
    assert report.found, str(report)
    assert (report.origin.primitive, report.cause, report.origin.kind) == ("cond", "non-finite-constant", "nan")
    assert report.origin.source.startswith("tests/test_trace_misses.py:"), report.origin.source
    assert report.first_nan is report.origin
    assert not localize(f, -1.0, segment_size=segment_size).found  # the finite branch


@MODES
def test_cond_branch_broadcasting_inf_names_the_broadcast(segment_size):
    def f(x):
        return lax.cond(x > 0, lambda v: jnp.full((3,), jnp.inf), lambda v: jnp.ones(3) * v, x)

    report = localize(f, 2.0, segment_size=segment_size)
    assert report.found, str(report)
    assert (report.origin.primitive, report.cause, report.origin.kind) == (
        "broadcast_in_dim", "non-finite-constant", "inf")
    assert report.origin.outputs[0]["posinf"] == 3


@MODES
def test_jitted_function_returning_a_nan_constant(segment_size):
    literal = localize(jax.jit(lambda x: jnp.nan), 1.0, segment_size=segment_size)
    assert (literal.found, literal.cause, literal.origin.primitive) == (True, "non-finite-constant", "jit")
    captured = np.array([np.nan, 1.0], np.float32)
    closed = localize(jax.jit(lambda x: (x, jnp.asarray(captured))), 1.0, segment_size=segment_size)
    assert (closed.found, closed.cause, closed.origin.primitive) == (True, "non-finite-constant", "jit")
    assert closed.origin.outputs[1]["nan"] == 1


def test_constant_computation_reaching_an_output_names_its_first_equation():
    report = _same(lambda x: (x, jnp.full((3,), jnp.nan) * 2.0), jnp.ones(3))
    assert (report.origin.primitive, report.cause, report.num_events) == ("broadcast_in_dim", "non-finite-constant", 1)


def test_constant_that_does_not_reach_an_output_stays_folded():
    # jnp.var fills a NaN for an empty reduction internally; a masked -inf never reaches the output.
    assert not _same(lambda x: jnp.var(x), jnp.arange(3.0)).found
    assert not _same(lambda x: jnp.where(x > -1, x, jnp.full((3,), -jnp.inf)).sum(), jnp.arange(3.0)).found


def test_constant_mixed_with_data_is_still_a_root_where_they_meet():
    report = _same(lambda x: x + jnp.full((3,), jnp.nan), jnp.ones(3))
    assert (report.origin.primitive, report.cause) == ("add", "non-finite-constant")


def test_function_returning_a_nan_literal_without_any_equation():
    report = localize(lambda x: jnp.nan, 1.0)
    assert (report.found, report.cause, report.origin) == (True, "non-finite-constant", None)


# ------------------------------------------------------------ miss 3: vmap of a while_loop (batched predicate)

def _repeat_scale(n, x):
    return lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] * 1e15), (0.0, x))[1]


@MODES
def test_vmapped_while_with_a_batched_predicate_names_iteration_and_running_lanes(segment_size):
    n, x = jnp.array([1.0, 4.0, 2.0]), jnp.ones(3)
    out = jax.vmap(_repeat_scale)(n, x)
    assert np.isinf(out[1]) and np.isfinite(out[jnp.array([0, 2])]).all()
    report = localize(jax.vmap(_repeat_scale), n, x, segment_size=segment_size)
    assert (report.origin.primitive, report.cause) == ("mul", "overflow"), str(report)
    # 1e15 ** 3 overflows float32 at iteration 2; by then lanes 0 and 2 have finished.
    assert report.origin.iterations == [{"loop": "while", "index": 2, "lanes": [1]}]


@MODES
def test_vmapped_while_finished_lanes_keep_their_carry(segment_size):
    # Lane 0 finishes after 1 step; had its carry kept running, 1e15 ** 4 would overflow.
    n, x = jnp.array([1.0, 2.0]), jnp.ones(2)
    assert np.isfinite(jax.vmap(_repeat_scale)(n, x)).all()
    assert not localize(jax.vmap(_repeat_scale), n, x, segment_size=segment_size).found


def test_vmapped_while_division_names_the_lanes_still_running():
    def f(c):
        return lax.while_loop(lambda c: c < 10, lambda c: c + 1 + 1 / (c - 3), c)

    report = _same(jax.vmap(f), jnp.array([4.0, 3.0, 11.0]))
    assert (report.origin.primitive, report.cause) == ("div", "division-by-zero")
    assert report.origin.iterations == [{"loop": "while", "index": 0, "lanes": [0, 1]}]


def test_unbatched_while_predicate_keeps_plain_iterations():
    def f(x):
        return lax.while_loop(lambda c: c[0] < 4, lambda c: (c[0] + 1, c[1] * 1e15), (0, x))[1]

    report = _same(jax.vmap(f), jnp.ones(2))  # the counter is not batched: neither is the predicate
    assert report.origin.iterations == [{"loop": "while", "index": 2}]
