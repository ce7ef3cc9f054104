"""Tests for nanlab.compare: chain syntax, statistics, the vmapped runner, outputs, the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanlab import compare, losses, models, optim, stats
from nanlab.compare import chains, runner
from nanlab.compare import cli as compare_cli
from nanlab.data import batch_at
from nanlab.step import create_train_state, make_train_step

# --------------------------------------------------------------------------------- chain syntax


@pytest.mark.parametrize(
    "spec, clip, skip, label",
    [
        ("none", "none", False, "none"),
        ("global_norm:1.0", "global_norm:1", False, "global_norm:1"),
        ("agc:0.01,global_norm:5", "agc:0.01,global_norm:5", False, "agc:0.01,global_norm:5"),
        ("skip", "none", True, "skip"),
        ("none+skip", "none", True, "skip"),
        ("value:0.5+skip", "value:0.5", True, "value:0.5+skip"),
    ],
)
def test_parse_chain_normalizes(spec, clip, skip, label):
    chain = compare.parse_chain(spec)
    assert (chain.clip, chain.skip_nonfinite, chain.label) == (clip, skip, label)
    assert compare.parse_chain(chain.label) == chain  # the label parses back to the same chain


@pytest.mark.parametrize("spec", ["bogus:1", "global_norm:-1", "global_norm:1+skip+skip", "+skip", "", "value"])
def test_parse_chain_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="chain spec"):
        compare.parse_chain(spec)


def test_parse_chains_rejects_duplicates_after_normalization():
    with pytest.raises(ValueError, match="duplicate chain 'global_norm:1.0'"):
        compare.parse_chains(["global_norm:1", "global_norm:1.0"])
    with pytest.raises(ValueError, match="duplicate"):
        compare.parse_chains(["skip", "none+skip"])
    assert len(compare.parse_chains(["none", "skip", "global_norm:1", "global_norm:1+skip"])) == 4


def test_chain_structure_shares_the_canonical_program_and_keeps_other_orders():
    canonical = compare.CANONICAL_STRUCTURE
    for spec in ["none", "skip", "global_norm:1", "agc:0.01,global_norm:5", "value:0.1+skip"]:
        assert compare.chain_structure(compare.parse_chain(spec)) == canonical
    reordered = compare.parse_chain("global_norm:5,agc:0.01")
    assert compare.chain_structure(reordered) == ("global_norm", "agc")
    np.testing.assert_array_equal(
        compare.chain_thresholds(compare.parse_chain("agc:0.01,global_norm:5"), canonical),
        np.asarray([0.01, np.inf, 5.0], np.float32),
    )
    np.testing.assert_array_equal(
        compare.chain_thresholds(reordered, ("global_norm", "agc")), np.asarray([5.0, 0.01], np.float32)
    )


# ------------------------------------------------------------------------- the lab's chain = optax's


def _tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"w": (scale * rng.normal(size=(3, 4))).astype(np.float32), "b": (scale * rng.normal(size=(4,))).astype(np.float32)}


@pytest.mark.parametrize("spec", ["none", "global_norm:0.5", "value:0.1", "agc:0.01", "agc:0.01,global_norm:0.3"])
def test_lab_tx_equals_make_tx(spec):
    """Thresholds as data (inf = off) give nanlab.optim.make_tx's updates, and the probe flags
    activity exactly when the clip changed something."""
    chain = compare.parse_chain(spec)
    structure = compare.chain_structure(chain)
    lab = compare.make_lab_tx(structure, compare.chain_thresholds(chain, structure), "adam", 0.1)
    ref = optim.make_tx(chain.clip, "adam", 0.1)
    params, grads = _tree(0), _tree(1, scale=3.0)
    lab_state, ref_state = lab.init(params), ref.init(params)
    lab_update = jax.jit(lambda g, s, p: lab.update(g, s, p, loss=1.0))
    ref_update = jax.jit(ref.update)
    for _ in range(3):
        lab_updates, lab_state = lab_update(grads, lab_state, params)
        ref_updates, ref_state = ref_update(grads, ref_state, params)
        for key in params:
            # Different programs (the guard's lax.cond) may round Adam's arithmetic differently in
            # the last bits (a few ulps, 1 ulp = 6e-8 relative); a clip applied or missed is ~1e-1.
            np.testing.assert_allclose(np.asarray(lab_updates[key]), np.asarray(ref_updates[key]), rtol=5e-7)
    probe = compare.find_probe_state(lab_state)
    assert bool(probe.active) == (spec != "none")


def test_clip_part_off_passes_overflowing_gradients_through():
    """optax's global-norm clip at max_norm=inf turns a gradient whose norm overflows into NaN;
    the lab's 'off' part must not."""
    grads = {"g": np.asarray([3e38, 3e38], np.float32)}
    raw = optax.clip_by_global_norm(np.float32(np.inf)).update(grads, optax.EmptyState())[0]
    assert np.isnan(np.asarray(raw["g"])).all()  # the gap this part closes
    part = chains._clip_part("global_norm", np.float32(np.inf))
    passed, _ = part.update(grads, part.init(grads))
    np.testing.assert_array_equal(np.asarray(passed["g"]), grads["g"])


# ----------------------------------------------------------------------------------- statistics


def test_bootstrap_mean_ci_is_deterministic_and_brackets_the_mean():
    values = np.random.default_rng(1).normal(loc=2.0, size=12)
    mean, low, high = stats.bootstrap_mean_ci(values)
    assert (mean, low, high) == stats.bootstrap_mean_ci(values)
    assert low < mean < high
    assert mean == pytest.approx(values.mean())
    assert low > 0  # clearly positive data: the interval excludes 0
    assert stats.bootstrap_mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert all(math.isnan(v) for v in stats.bootstrap_mean_ci([]))
    with pytest.raises(ValueError, match="finite"):
        stats.bootstrap_mean_ci([1.0, float("nan")])


def test_bootstrap_ci_of_the_median_resists_an_outlier_and_narrows_with_more_samples():
    rng = np.random.default_rng(2)
    values = np.append(rng.normal(loc=1.0, scale=0.05, size=200), 50.0)  # one stalled round
    median, low, high = stats.bootstrap_ci(values, statistic=np.median)
    assert median == pytest.approx(np.median(values))
    assert low <= median <= high < 1.05  # the mean's interval would be dragged toward 50
    assert stats.bootstrap_mean_ci(values)[2] > 1.1
    few = stats.bootstrap_ci(values[:20], statistic=np.median)
    assert few[2] - few[1] > high - low


def _cell_run(finite, clip_active=None, val_loss=None, grad_norm=None):
    finite = np.asarray(finite, bool)
    steps, seeds = finite.shape
    ran = np.ones_like(finite)
    for s in range(seeds):  # without the guard a seed stops running after its first bad step
        bad = np.flatnonzero(~finite[:, s])
        if bad.size:
            ran[bad[0] + 1:, s] = False
    return compare.CellRun(
        seeds=np.arange(seeds),
        loss=np.where(finite, 0.5, np.nan),
        accuracy=np.full(finite.shape, 0.5),
        grad_norm=np.ones(finite.shape) if grad_norm is None else np.asarray(grad_norm, float),
        finite=finite,
        clip_active=np.zeros_like(finite) if clip_active is None else np.asarray(clip_active, bool),
        ran=ran,
        final_train_loss=np.full(seeds, 0.4),
        final_train_accuracy=np.full(seeds, 0.8),
        final_val_loss=np.full(seeds, 0.5) if val_loss is None else np.asarray(val_loss, float),
        final_val_accuracy=np.full(seeds, 0.75),
        seconds=1.0,
    )


def test_summarize_cell_counts_failures_steps_and_deltas():
    t, f = True, False
    # 4 steps x 4 seeds; baseline: seeds 0 and 1 fail at steps 1 and 3.
    base = _cell_run([[t, t, t, t], [f, t, t, t], [t, t, t, t], [t, f, t, t]], val_loss=[9, 9, 0.6, 0.7])
    clipped = _cell_run(
        [[t, t, t, t]] * 4,
        clip_active=[[t, f, f, f], [t, t, f, f], [f, f, f, f], [f, f, f, f]],
        val_loss=[0.5, 0.5, 0.5, 0.5],
    )
    row = compare.summarize_cell("high-lr", compare.parse_chain("global_norm:1"), clipped, base)
    assert list(row) == list(compare.COLUMNS)
    assert row["failed_frac"] == 0.0 and row["nonfinite_frac"] == 0.0
    assert row["clip_active_frac"] == pytest.approx(3 / 16)
    assert row["delta_failed_frac"] == pytest.approx(-0.5)
    assert row["delta_failed_ci_low"] <= -0.5 <= row["delta_failed_ci_high"] <= 0.0
    assert row["delta_pairs"] == 2  # seeds 2 and 3 are finite in both
    assert row["delta_val_loss"] == pytest.approx(np.mean([0.5 - 0.6, 0.5 - 0.7]))
    base_row = compare.summarize_cell("high-lr", compare.parse_chain("none"), base, None)
    assert base_row["failed_frac"] == 0.5
    assert (base_row["first_nonfinite_q25"], base_row["first_nonfinite_median"],
            base_row["first_nonfinite_q75"]) == (1.5, 2.0, 2.5)
    assert base_row["final_val_loss"] == pytest.approx(0.65)  # the failed seeds' 9s are left out
    assert math.isnan(base_row["delta_failed_frac"])


def test_guarded_seed_fails_only_if_still_nonfinite_at_the_end():
    t, f = True, False
    run = _cell_run([[t, t], [f, f], [t, f]])
    run = compare.CellRun(**{**run.__dict__, "ran": np.ones((3, 2), bool)})  # the guard keeps seeds running
    outcome = compare.seed_outcomes(run, skip_nonfinite=True)
    np.testing.assert_array_equal(outcome["nonfinite"], [True, True])
    np.testing.assert_array_equal(outcome["failed"], [False, True])
    np.testing.assert_array_equal(outcome["skipped_steps"], [1, 2])


def test_chunk_lengths():
    assert compare.chunk_lengths(40, 10) == [10] * 4
    assert compare.chunk_lengths(12, 5) == [4, 4, 4]
    assert compare.chunk_lengths(13, 10) == [10, 3]
    assert compare.chunk_lengths(3, 10) == [3]
    assert sum(compare.chunk_lengths(97, 10)) == 97


# ------------------------------------------------------------------- the vmapped runner, tiny model


class TinyNet(nn.Module):
    """Conv -> BatchNorm -> relu -> pool -> dense: a cheap stand-in with every moving part."""

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(4, (3, 3), strides=(2, 2))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(1)(x)


def _tiny_cell_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype(np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype(np.float32)[:, None]
    return compare.CellData(x[:48], y[:48], x[48:], y[48:], num_eval_train=16)


@pytest.fixture(scope="module")
def tiny_data():
    return _tiny_cell_data()


def _tiny_problem(lr=0.1, optimizer="sgd"):
    return compare.Problem(
        model=TinyNet(), loss_fn=losses.sigmoid_binary_cross_entropy, structure=compare.CANONICAL_STRUCTURE,
        optimizer=optimizer, schedule=lr, weight_decay=0.0, batch_size=8,
    )


@pytest.fixture(scope="module")
def tiny_group(tiny_data):
    chains = compare.parse_chains(["none", "global_norm:0.05", "value:0.01+skip"])
    return chains, compare.train_group(_tiny_problem(), tiny_data, chains, [0, 1, 2], 6, chunk_steps=3)


@pytest.fixture(scope="module")
def tiny_alone(tiny_group, tiny_data):
    chains, _ = tiny_group
    picked = [chains[0], chains[2]]
    return compare.train_group(_tiny_problem(), tiny_data, picked, [1], 6, vmapped=False, chunk_steps=3)


def test_one_seed_alone_equals_the_same_seed_inside_the_vmapped_batch(tiny_group, tiny_alone):
    chains, runs = tiny_group
    for chain, alone in tiny_alone.items():
        together = runs[chain]
        # vmap turns the matmuls/convs into batched ones; float32 sums may round differently in
        # the last bits, so compare to a few ulps rather than bit for bit.
        np.testing.assert_allclose(alone.loss[:, 0], together.loss[:, 1], rtol=2e-6, atol=0)
        np.testing.assert_allclose(alone.grad_norm[:, 0], together.grad_norm[:, 1], rtol=2e-5, atol=0)
        np.testing.assert_allclose(alone.final_val_loss[0], together.final_val_loss[1], rtol=2e-5)
        np.testing.assert_array_equal(alone.clip_active[:, 0], together.clip_active[:, 1])
    # the seeds and the chains really differ (the comparison above is not vacuous)
    assert not np.allclose(runs[chains[0]].loss[:, 0], runs[chains[0]].loss[:, 1])
    assert not np.allclose(runs[chains[0]].loss[1:, 1], runs[chains[2]].loss[1:, 1])


def test_looped_evaluation_equals_the_vmapped_one(tiny_data):
    # On CPU the vmapped group evaluates its replicas one after another (lax.map): same sums.
    problem = _tiny_problem()
    compiled = runner._compile(problem, True)
    state = compiled.init(tiny_data.x_train[:8], compare.replicas_of(problem, [(compare.parse_chain("none"), s) for s in range(3)]))
    mask = np.ones(16, np.float32)
    mask[-3:] = 0.0
    args = (state, tiny_data.x_val, tiny_data.y_val, mask)
    vmapped, looped = compiled.evaluate(*args), compiled.evaluate_looped(*args)
    assert vmapped["loss_sum"].shape == (3,)
    np.testing.assert_allclose(looped["loss_sum"], vmapped["loss_sum"], rtol=1e-6)
    np.testing.assert_array_equal(looped["correct_sum"], vmapped["correct_sum"])
    assert len(set(np.asarray(looped["loss_sum"]).tolist())) == 3  # three different replicas


def test_lab_none_chain_equals_the_train_step_run_by_hand(tiny_alone, tiny_data):
    """The 'none' replica is nanlab.step's train step with make_tx('none') run by hand: same
    init, same batches (nanlab.data.batch_at), same updates."""
    alone = tiny_alone[compare.parse_chain("none")]
    problem = _tiny_problem()
    tx = optim.make_tx("none", "sgd", 0.1)
    state = create_train_state(problem.model, tx, tiny_data.x_train[:8], 1)
    step = jax.jit(make_train_step(problem.model, problem.loss_fn, tx, schedule=0.1))
    losses_by_hand = []
    for t in range(6):
        xb, yb = batch_at(tiny_data.x_train, tiny_data.y_train, t, 8, 1)
        state, stats = step(state, (xb, yb))
        losses_by_hand.append(float(stats.loss))
    np.testing.assert_allclose(alone.loss[:, 0], losses_by_hand, rtol=2e-6)


def test_clipping_is_recorded_and_changes_training(tiny_group):
    chains, runs = tiny_group
    assert not runs[chains[0]].clip_active.any()
    assert runs[chains[1]].clip_active.all()  # grad norms of this task are far above 0.05
    assert not np.allclose(runs[chains[0]].loss[1:], runs[chains[1]].loss[1:])


def test_nonfinite_seed_is_masked_and_guarded_seed_goes_on(tiny_group, tiny_data):
    """Poison one training example: a seed dies at the first step whose batch holds it (state
    frozen), a guarded seed skips those steps and trains on. (Same grid shape as tiny_group, so
    the compiled program is reused.)"""
    x = tiny_data.x_train.copy()
    x[5] = np.nan
    data = compare.CellData(x, tiny_data.y_train, tiny_data.x_val, tiny_data.y_val, 16)
    chains = compare.parse_chains(["none", "skip", "global_norm:0.05"])
    runs = compare.train_group(_tiny_problem(), data, chains, [0, 1, 2], 6, chunk_steps=3, keep_states=True)
    poisoned = np.stack([(compare.batch_indices(48, range(6), 8, s) == 5).any(axis=1) for s in (0, 1, 2)], axis=1)
    first = np.argmax(poisoned, axis=0)
    assert poisoned.any(axis=0).all() and not poisoned.all(axis=0).any()
    dead, guarded = runs[chains[0]], runs[chains[1]]
    np.testing.assert_array_equal(dead.first_nonfinite_step(), first)
    np.testing.assert_array_equal(guarded.first_nonfinite_step(), first)
    for s in (0, 1, 2):
        assert dead.ran[: first[s] + 1, s].all() and not dead.ran[first[s] + 1:, s].any()
        assert guarded.ran[:, s].all()
        np.testing.assert_array_equal(~guarded.finite[:, s], poisoned[:, s])
    assert np.isfinite(dead.final_val_loss).all() and np.isfinite(guarded.final_val_loss).all()
    outcome = compare.seed_outcomes(guarded, skip_nonfinite=True)
    np.testing.assert_array_equal(outcome["skipped_steps"], poisoned.sum(axis=0))
    assert compare.seed_outcomes(dead, skip_nonfinite=False)["failed"].all()
    # The dead seed's frozen state replays its first non-finite step: the NaN came in with the batch.
    diagnosis = compare.diagnose_first_failure(_tiny_problem(), data, chains[0], dead)
    assert (diagnosis["seed"], diagnosis["step"]) == (0, first[0])
    assert diagnosis["verdict"] == "bad-data" and diagnosis["cause"] == "nan-input"
    assert diagnosis["replay"] == "op-by-op"
    assert compare.diagnose_first_failure(_tiny_problem(), data, chains[1], guarded) is None  # trains on
    with pytest.raises(ValueError, match="keep_states"):
        compare.diagnose_first_failure(_tiny_problem(), data, chains[0], dataclasses.replace(dead, final_states=None))


# ------------------------------------------------------------------------------------------ the CLI


@pytest.fixture
def tiny_model(monkeypatch):
    """The grid with TinyNet in place of InceptionV3 (the CLI path is otherwise unchanged)."""
    monkeypatch.setitem(models.BUILDERS, "inception_v3", lambda config, num_classes: TinyNet())


def _read_csv(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_cli_tiny_grid_end_to_end_and_clipping_rescues_high_lr(tmp_path, tiny_model, capsys, monkeypatch):
    """high-lr (lr 1e4) with plain SGD explodes geometrically (weights and activations feed each
    other) until float32 overflows; global-norm clipping bounds each step to lr * 1, so growth is
    linear and no seed overflows in these steps."""
    workdir = tmp_path / "grid"
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal: rich folds nothing, cells read whole
    code = compare_cli.main([
        "--scenarios", "high-lr", "--chains", "none", "global_norm:1", "skip", "--seeds", "4", "--steps", "12",
        "--optimizer", "sgd", "--batch-size", "8", "--num-train", "64", "--num-val", "32",
        "--chunk-steps", "6", "--workdir", str(workdir), "--no-progress", "--diagnose",
    ])
    out = capsys.readouterr().out
    assert code == 0, out
    for name in compare.OUTPUT_FILES:
        assert (workdir / name).stat().st_size > 0, name
    for name in ("loss_curves.png", "nonfinite_rate.png", "grad_norms.png"):
        assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header, rows = _read_csv(workdir / "results.csv")
    assert header == list(compare.COLUMNS)
    assert [row["chain"] for row in rows] == ["none", "global_norm:1", "skip"]
    payload = json.loads((workdir / "results.json").read_text())
    assert payload["columns"] == compare.COLUMNS
    assert payload["grid"]["configs"]["high-lr"]["lr"] == 1e4  # the scenario's lr, not a test value
    cells = {cell["chain"]: cell for cell in payload["cells"]}
    none, clipped = cells["none"], cells["global_norm:1"]
    assert clipped["failed_frac"] < none["failed_frac"]
    assert clipped["delta_failed_frac"] < 0
    assert clipped["clip_active_frac"] > 0
    assert len(payload["per_seed"]) == 3 and len(payload["per_seed"][0]["seeds"]) == 4
    # --diagnose: the baseline's first dead seed replayed through trace + diagnose; cells whose seeds
    # all lived (and the guarded one) have none.
    assert none["verdict"] in ("exploding-gradients", "learning-rate-too-high"), none["verdict"]
    diagnosis = payload["per_seed"][0]["diagnosis"]
    assert diagnosis["verdict"] == none["verdict"] and diagnosis["origin"] and diagnosis["fix"]
    assert clipped["verdict"] == "" and cells["skip"]["verdict"] == ""
    assert payload["per_seed"][1]["diagnosis"] is None
    assert none["verdict"] in out  # the terminal table shows the verdict column
    assert "clipping lab" in out and "results in" in out


@pytest.mark.parametrize(
    "argv, optimizer, lr",
    [
        ([], "sgd", 1e4),  # the default grid: high-lr with SGD, where a clip bounds the step
        (["--optimizer", "adam"], "adam", 1e4),  # an explicit flag wins
        (["--scenarios", "high-lr"], "sgd", 1e4),  # a named scenario keeps its own recipe (SGD)
        (["--scenarios", "high-lr", "--optimizer", "adam"], "adam", 1e4),
    ],
)
def test_default_grid_trains_high_lr_with_sgd_unless_told_otherwise(argv, optimizer, lr):
    grid, _ = compare_cli.grid_from_args(compare_cli.build_parser().parse_args(argv))
    assert grid.scenarios == ("high-lr",)
    assert (grid.configs["high-lr"].optimizer, grid.configs["high-lr"].lr) == (optimizer, lr)
    assert [c.label for c in grid.chains] == list(compare.DEFAULT_CHAINS)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scenarios", "nope"], "unknown scenario 'nope'"),
        (["--chains", "none", "clip:1"], "clip:1"),
        (["--seeds", "0"], "--seeds must be a whole number >= 1, got 0"),
        (["--chains", "none", "global_norm:1", "global_norm:1.0"], "duplicate chain 'global_norm:1.0'"),
        (["--steps", "0"], "--steps must be a whole number >= 1, got 0"),
        (["--lr", "-1"], "-1"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    workdir = tmp_path / "out"
    assert compare_cli.main([*args, "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanlab.compare: error:") and "\n" not in err
    assert message in err
    assert not workdir.exists()


def test_cli_refuses_unwritable_folder_and_existing_results(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert compare_cli.main(["--workdir", str(blocker / "sub")]) == 2
    assert "not writable" in capsys.readouterr().err
    workdir = tmp_path / "done"
    workdir.mkdir()
    (workdir / "results.csv").write_text("old")
    assert compare_cli.main(["--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert "already holds results" in err and "--overwrite" in err
    assert (workdir / "results.csv").read_text() == "old"


def test_chunk_as_one_scan_equals_chunk_as_step_calls(tiny_data):
    # GPU/TPU run a chunk as one lax.scan, a CPU as one jitted call per step: same training.
    problem = _tiny_problem()
    replica = compare.replicas_of(problem, [(compare.parse_chain("global_norm:0.05"), s) for s in (0, 1)])
    indices = np.stack([compare.batch_indices(48, range(4), 8, seed) for seed in (0, 1)], axis=1)
    x, y = jnp.asarray(tiny_data.x_train), jnp.asarray(tiny_data.y_train)
    results = []
    for scan in (True, False):
        compiled = runner._compile_for(problem, True, scan)
        state = compiled.init(tiny_data.x_train[:8], replica)
        results.append(compiled.run_chunk(replica, state, x, y, indices))
    (scan_state, scan_record), (loop_state, loop_record) = results
    assert np.asarray(loop_record.loss).shape == (4, 2)
    for a, b in zip(scan_record, loop_record):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(scan_state), jax.tree.leaves(loop_state)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-7)
    assert np.asarray(loop_record.clip_active).any()  # the clip really acted


_SHARDED_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import jax
from tests import test_compare as t
from nanlab import compare
data = t._tiny_cell_data()
chain = compare.parse_chain("global_norm:0.05")
problem = t._tiny_problem()
assert compare.replica_mesh(4) is not None
sharded = compare.train_group(problem, data, [chain], [0, 1, 2, 3], 4, chunk_steps=2)[chain]
alone = compare.train_group(problem, data, [chain], [0, 1, 2, 3], 4, vmapped=False, chunk_steps=2)[chain]
print(json.dumps({"devices": jax.device_count(),
                  "loss": float(np.abs(sharded.loss - alone.loss).max() / np.abs(alone.loss).max()),
                  "val": float(np.abs(sharded.final_val_loss - alone.final_val_loss).max()),
                  "spread": float(np.ptp(alone.loss[-1]))}))
"""


def test_replicas_sharded_over_four_simulated_devices_train_as_they_do_alone():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, root], env=env, capture_output=True,
                            text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    assert out["loss"] < 1e-5 and out["val"] < 1e-4
    assert out["spread"] > 1e-3  # four different seeds, not one seed four times


def test_cli_sigint_stops_after_the_cells_in_training_and_writes_them(tmp_path, tiny_model, capsys, monkeypatch):
    import signal

    from nanlab.compare import grid as lab_grid

    real_train_group, calls = lab_grid.train_group, []

    def interrupted_train_group(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while the first group of cells trains
        return real_train_group(*args, **kwargs)

    monkeypatch.setattr(lab_grid, "train_group", interrupted_train_group)
    workdir = tmp_path / "grid"
    code = compare_cli.main([
        "--scenarios", "clean", "high-lr", "--chains", "none", "--seeds", "2", "--steps", "4",
        "--optimizer", "sgd", "--batch-size", "8", "--num-train", "64", "--num-val", "32",
        "--chunk-steps", "2", "--workdir", str(workdir), "--no-progress",
    ])
    err = capsys.readouterr().err
    assert code == 130 and len(calls) == 1, err
    lines = [line for line in err.splitlines() if line.startswith("nanlab.compare: SIGINT: stopped")]
    assert lines == [f"nanlab.compare: SIGINT: stopped after 1 of 2 cells; the finished cells' results are in {workdir}/"]
    _, rows = _read_csv(workdir / "results.csv")
    assert len(rows) == 1 and rows[0]["scenario"] == "clean"
    assert (workdir / "loss_curves.png").exists()  # the finished scenario is plotted


def test_results_table_switches_to_a_list_when_narrow_or_piped():
    from rich.console import Console

    row = {"scenario": "high-lr", "chain": "global_norm:1", "nonfinite_frac": 0.25, "failed_frac": 0.0,
           "first_nonfinite_median": 3.0, "first_nonfinite_q25": 2.0, "first_nonfinite_q75": 4.0,
           "final_val_loss": 0.5, "final_val_accuracy": 0.75, "clip_active_frac": 1.0,
           "delta_failed_frac": -0.5, "delta_failed_ci_low": -1.0, "delta_failed_ci_high": 0.0,
           "delta_val_loss": 0.1, "delta_val_loss_ci_low": 0.0, "delta_val_loss_ci_high": 0.2, "verdict": ""}
    console = Console(width=60, record=True, file=open(os.devnull, "w"))
    console.print(compare.results_table([row], width=console.width))
    text = console.export_text()
    assert "high-lr / global_norm:1" in text and "  first NaN step (IQR): 3 (2-4)" in text
    assert max(len(line) for line in text.splitlines()) <= 60  # nothing folded or cut
    assert "┃" not in text  # no table box
    wide = Console(width=250, record=True, file=open(os.devnull, "w"))
    wide.print(compare.results_table([row], width=wide.width))
    wide_text = wide.export_text()  # (export_text empties the record)
    assert "first NaN step (IQR)" in wide_text and "┃" in wide_text
