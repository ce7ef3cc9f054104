"""localize inside shard_map and pmap, on 2 and 4 simulated CPU devices.

XLA_FLAGS must be set before JAX initializes, so every case runs in one subprocess per device count;
the subprocess prints one JSON line per case and the test asserts on them.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, sys, types
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jax import shard_map
    from nanlab.trace import localize, _shards

    n = jax.device_count()
    assert n == int(sys.argv[1]), n
    mesh = jax.make_mesh((n,), ("i",))
    bad = n - 1  # the shard holding the planted zero
    x = np.arange(1.0, 2 * n + 1, dtype=np.float32)
    x[2 * bad] = 0.0
    x = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("i")))

    def show(name, report):
        o = report.origin
        print(json.dumps({"case": name, "found": report.found, "cause": report.cause,
                          "primitive": o and o.primitive, "phase": o and o.phase, "module": o and o.module,
                          "source": o and o.source, "shard": o and o.shard,
                          "inputs": o and o.inputs}))

    def div(x):
        with jax.named_scope("layer"):
            return 2.0 / x

    for vma in (True, False):
        f = shard_map(div, mesh=mesh, in_specs=P("i"), out_specs=P("i"), check_vma=vma)
        show(f"forward vma={vma}", localize(f, x))
        g = shard_map(lambda x: jnp.sqrt(x), mesh=mesh, in_specs=P("i"), out_specs=P("i"), check_vma=vma)
        show(f"backward vma={vma}", localize(jax.grad(lambda x: jnp.sum(g(x))), x))
        h = shard_map(lambda x: x * jax.lax.psum(jnp.sum(jnp.log(x)), "i"), mesh=mesh, in_specs=P("i"),
                      out_specs=P("i"), check_vma=vma)
        show(f"psum vma={vma}", localize(h, x))
        ok = shard_map(lambda x: jnp.sqrt(x + 1.0), mesh=mesh, in_specs=P("i"), out_specs=P("i"), check_vma=vma)
        show(f"finite vma={vma}", localize(jax.grad(lambda x: jnp.sum(ok(x))), x))
    show("pmap", localize(jax.pmap(lambda v: jnp.sin(v) / v), np.asarray(x).reshape(n, 2)))

    # The replay reassembles shard outputs into the global array exactly as shard_map does.
    spec_cases = [(mesh, P("i"), (2 * n, 3)), (mesh, P(None, "i"), (3, 2 * n)), (mesh, P(), (2, 2))]
    if n == 4:
        mesh2 = jax.make_mesh((2, 2), ("a", "b"))
        spec_cases += [(mesh2, P("a", "b"), (4, 6)), (mesh2, P(("a", "b")), (8, 3)), (mesh2, P("b"), (4, 5))]
        y = jax.device_put(jnp.arange(16.0).reshape(4, 4) - 5.0, NamedSharding(mesh2, P("a", "b")))
        s2 = shard_map(lambda y: jnp.sqrt(y) + 1.0, mesh=mesh2, in_specs=P("a", "b"), out_specs=P("a", "b"))
        show("mesh 2x2", localize(s2, y))
    roundtrip = []
    for m, spec, shape in spec_cases:
        axes, sizes = tuple(m.axis_names), tuple(m.axis_sizes)
        g = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        stacked = _shards.to_shards(g, spec, axes, sizes)
        back = _shards.from_shards(stacked, spec, axes, sizes, types.SimpleNamespace(shape=shape), True)
        want = shard_map(lambda v: v, mesh=m, in_specs=spec, out_specs=spec)(jax.device_put(g, NamedSharding(m, spec)))
        roundtrip.append(bool(np.array_equal(np.asarray(back), np.asarray(want))))
    print(json.dumps({"case": "roundtrip", "ok": roundtrip}))
''')


def _run(devices):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(devices)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {c["case"]: c for c in map(json.loads, out.stdout.strip().splitlines())}


@pytest.fixture(scope="module", params=[2, 4], ids=["2-devices", "4-devices"])
def cases(request):
    return request.param, _run(request.param)


@pytest.mark.parametrize("vma", [True, False])
def test_forward_division_inside_shard_map_names_the_inner_primitive_and_shard(cases, vma):
    n, got = cases
    c = got[f"forward vma={vma}"]
    assert (c["found"], c["primitive"], c["cause"], c["phase"], c["module"]) == (
        True, "div", "division-by-zero", "forward", "layer"), c
    assert c["shard"]["mesh"] == {"i": n - 1} and c["shard"]["device"] == n - 1, c
    assert c["shard"]["shards"] == [{"i": n - 1}]
    assert c["source"].endswith("(div)"), c
    # The operands summarized are the failing shard's block: 2 entries, one of them 0.
    assert c["inputs"][1]["shape"] == [2] and c["inputs"][1]["zeros"] == 1, c


@pytest.mark.parametrize("vma", [True, False])
def test_gradient_of_a_shard_mapped_function_is_localized_in_the_backward_body(cases, vma):
    n, got = cases
    c = got[f"backward vma={vma}"]
    assert (c["found"], c["phase"], c["cause"]) == (True, "backward", "sqrt-at-zero"), c
    assert c["primitive"] != "shard_map" and c["shard"]["mesh"] == {"i": n - 1}, c


@pytest.mark.parametrize("vma", [True, False])
def test_collective_spreads_a_shards_log_of_zero_but_the_origin_is_that_shard(cases, vma):
    n, got = cases
    c = got[f"psum vma={vma}"]
    assert (c["primitive"], c["cause"], c["shard"]["mesh"]) == ("log", "log-of-zero", {"i": n - 1}), c


@pytest.mark.parametrize("vma", [True, False])
def test_finite_shard_mapped_gradient_raises_no_alarm(cases, vma):
    _, got = cases
    assert not got[f"finite vma={vma}"]["found"]


def test_pmap_is_replayed_per_device(cases):
    n, got = cases
    c = got["pmap"]
    assert (c["primitive"], c["cause"], c["shard"]["device"]) == ("div", "division-by-zero", n - 1), c


def test_shard_blocks_reassemble_as_shard_map_lays_them_out(cases):
    _, got = cases
    assert all(got["roundtrip"]["ok"]) and got["roundtrip"]["ok"], got["roundtrip"]


def test_two_axis_mesh_names_both_coordinates(cases):
    n, got = cases
    if n != 4:
        pytest.skip("a 2x2 mesh needs 4 devices; the 4-device run covers it")
    c = got["mesh 2x2"]
    assert (c["primitive"], c["cause"]) == ("sqrt", "sqrt-of-negative"), c
    # -5..-1 sit in rows 0-1: shards (a=0, b=0) and (a=0, b=1) hold them; the first is named.
    assert c["shard"]["mesh"] == {"a": 0, "b": 0} and c["shard"]["shards"] == [{"a": 0, "b": 0}, {"a": 0, "b": 1}]
