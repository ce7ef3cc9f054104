"""Chains of the clipping lab: the spec syntax, and chains as data of one compiled program.

A chain is a train-CLI clip spec (`none`, `global_norm:1.0`, `value:0.5`, `agc:0.01`, parts joined
by commas) optionally suffixed `+skip` for nanlab.optim's skip-nonfinite guard (`skip` alone: no
clipping plus the guard). `parse_chain` normalizes a spec into a `Chain`.

Chains whose clip parts come in the order of `CANONICAL_STRUCTURE` share one program: their
thresholds are data (`chain_thresholds`, inf where a part is off) of `make_lab_tx`, whose
`probe_clip` records in the optimizer state whether the clip changed the gradients.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanlab import optim

__all__ = [
    "CANONICAL_STRUCTURE", "Chain", "ClipProbeState", "SKIP_MARKER", "chain_structure", "chain_thresholds",
    "find_probe_state", "make_lab_tx", "parse_chain", "parse_chains", "probe_clip",
]

SKIP_MARKER = "skip"


@dataclasses.dataclass(frozen=True)
class Chain:
    """One gradient-processing chain of the grid.

    Attributes:
      clip: the clip spec in the train CLI's syntax, normalized ("none" when no clipping).
      skip_nonfinite: whether nanlab.optim's skip-nonfinite guard wraps the chain.
    """

    clip: str
    skip_nonfinite: bool

    @property
    def parts(self) -> tuple[tuple[str, float], ...]:
        """The clip parts (name, value) in order; () for no clipping."""
        return optim.parse_clip_spec(self.clip)

    @property
    def label(self) -> str:
        """The chain as written on the command line (normalized)."""
        if self.skip_nonfinite:
            return SKIP_MARKER if self.clip == "none" else f"{self.clip}+{SKIP_MARKER}"
        return self.clip

    @property
    def is_baseline(self) -> bool:
        """True for the unclipped, unguarded chain every other chain is compared against."""
        return self.clip == "none" and not self.skip_nonfinite


def _format_clip(parts: Sequence[tuple[str, float]]) -> str:
    """Clip parts (name, value) back to the spec syntax; () or (("none", ...),) gives "none"."""
    named = [(name, value) for name, value in parts if name != "none"]
    if not named:
        return "none"
    return ",".join(f"{name}:{value:g}" for name, value in named)


def parse_chain(spec: str) -> Chain:
    """Parses one chain spec (a train-CLI clip spec, optionally suffixed `+skip`, or `skip`).

    Args:
      spec: e.g. "none", "global_norm:1.0", "agc:0.01,global_norm:5", "skip", "value:0.5+skip".

    Returns:
      The normalized Chain (so "global_norm:1" and "global_norm:1.0" compare equal).

    Raises:
      ValueError: naming the spec and the offending part.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"chain spec must be a non-empty string, got {spec!r}")
    text = spec.strip()
    pieces = text.split("+")
    skip = False
    if pieces[-1].strip() == SKIP_MARKER:
        skip = True
        pieces = pieces[:-1]
    if len(pieces) > 1:
        raise ValueError(
            f"chain spec {spec!r}: only one '+{SKIP_MARKER}' suffix is allowed after the clip spec"
        )
    clip_text = pieces[0].strip() if pieces else "none"
    if not clip_text:
        raise ValueError(f"chain spec {spec!r}: empty clip spec before '+{SKIP_MARKER}'")
    try:
        parts = optim.parse_clip_spec(clip_text)
    except ValueError as err:
        raise ValueError(f"chain spec {spec!r}: {err}") from None
    return Chain(clip=_format_clip(parts), skip_nonfinite=skip)


def parse_chains(specs: Sequence[str]) -> tuple[Chain, ...]:
    """Parses the grid's chains; duplicates (after normalization) are an error.

    Args:
      specs: chain specs, one per chain.

    Returns:
      The chains in the given order.

    Raises:
      ValueError: on an empty list, a bad spec, or a duplicate chain.
    """
    if not specs:
        raise ValueError("chains: need at least one chain spec")
    chains: list[Chain] = []
    for spec in specs:
        chain = parse_chain(spec)
        if chain in chains:
            raise ValueError(f"duplicate chain {spec!r} (same as {chain.label!r})")
        chains.append(chain)
    return tuple(chains)


# Chains whose clip parts appear in this order (each at most once) share one compiled program:
# a part a chain lacks gets an infinite threshold, which `_clip_part` turns into a pass-through.
CANONICAL_STRUCTURE: tuple[str, ...] = ("agc", "value", "global_norm")


def chain_structure(chain: Chain) -> tuple[str, ...]:
    """The clip structure a chain is compiled with.

    Chains whose part names are an ordered subsequence of `CANONICAL_STRUCTURE` (no repeats)
    map to it, so `none`, `global_norm:1`, `agc:0.01,global_norm:5`, `value:0.1+skip` ... all
    share one program per scenario; any other order keeps its own structure (own program).
    """
    names = tuple(name for name, _ in chain.parts)
    positions = [CANONICAL_STRUCTURE.index(n) for n in names if n in CANONICAL_STRUCTURE]
    if len(positions) == len(names) and positions == sorted(set(positions)):
        return CANONICAL_STRUCTURE
    return names


def chain_thresholds(chain: Chain, structure: Sequence[str]) -> np.ndarray:
    """The chain's clip thresholds laid out on `structure` (inf where a part is off).

    Args:
      chain: the chain.
      structure: `chain_structure(chain)`.

    Returns:
      float32 array of shape (len(structure),).
    """
    parts = chain.parts
    if tuple(structure) == tuple(name for name, _ in parts):
        return np.asarray([value for _, value in parts], np.float32)
    by_name = dict(parts)
    return np.asarray([by_name.get(name, math.inf) for name in structure], np.float32)


def _clip_part(name: str, threshold: jax.Array) -> optax.GradientTransformation:
    """One clip transform whose threshold is a (possibly traced) array; inf means off."""
    base = optim.CLIP_FACTORIES[name](threshold)  # nanlab.optim's transform, with a traced threshold

    def update(updates, state, params=None):
        clipped, state = base.update(updates, state, params)
        # Off must be the identity bit for bit: optax's global-norm clip at max_norm=inf would
        # still turn a finite gradient whose norm overflows to inf into inf/inf = NaN.
        off = jnp.isinf(threshold)
        return jax.tree.map(lambda c, g: jnp.where(off, g, c), clipped, updates), state

    return optax.GradientTransformation(base.init, update)


class ClipProbeState(NamedTuple):
    """State of `probe_clip`.

    Attributes:
      clip_state: the wrapped clip chain's state (the clips are stateless: empty).
      active: bool scalar, whether the most recent update changed any gradient element.
    """

    clip_state: Any
    active: jax.Array


def probe_clip(clip_tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wraps a clip chain so that its state records whether it changed the gradients.

    The outputs are exactly those of `clip_tx`; only the state gains a flag. The flag lives in
    the optimizer state so that the lab reuses nanlab.step's train step unchanged (it hands
    back the optimizer state, not the gradients) and still measures clip activity.

    Args:
      clip_tx: a clip chain (needs `params` for agc).

    Returns:
      The probed transformation; its state is a `ClipProbeState`.
    """

    def init(params):
        return ClipProbeState(clip_state=clip_tx.init(params), active=jnp.asarray(False))

    def update(updates, state, params=None):
        clipped, clip_state = clip_tx.update(updates, state.clip_state, params)
        return clipped, ClipProbeState(clip_state=clip_state, active=optim.clip_activity(updates, clipped))

    return optax.GradientTransformation(init, update)


def find_probe_state(opt_state: Any) -> ClipProbeState | None:
    """The `ClipProbeState` inside an optax state, or None when the chain has no probe."""
    found = [
        node
        for node in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, ClipProbeState))
        if isinstance(node, ClipProbeState)
    ]
    return found[0] if found else None


def make_lab_tx(
    structure: Sequence[str],
    thresholds: jax.Array,
    optimizer: str,
    schedule: optim.Schedule,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """nanlab.optim.make_tx's chain (clip -> optimizer) with data thresholds, probed, guarded.

    The skip-nonfinite guard is always in the program (it is the identity on finite steps);
    whether a chain *uses* it is decided per replica by the step's mask (`Replica.skip`), so
    chains with and without '+skip' share the compiled program.

    Args:
      structure: clip part names in order (see `chain_structure`).
      thresholds: (len(structure),) thresholds, inf for an absent part.
      optimizer: optimizer name (see `nanlab.optim.make_optimizer`).
      schedule: learning rate or optax schedule.
      weight_decay: see `nanlab.optim.make_optimizer`.

    Returns:
      The optax transformation.
    """
    parts = [_clip_part(name, thresholds[i]) for i, name in enumerate(structure)]
    clip_tx = optax.chain(*parts) if parts else optax.identity()
    inner = optax.chain(probe_clip(clip_tx), optim.make_optimizer(optimizer, schedule, weight_decay))
    return optim.skip_nonfinite(inner)
