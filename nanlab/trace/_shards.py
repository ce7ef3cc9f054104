"""Blocks of a global array per shard of a shard_map, and back: the layout shard_map itself uses.

The localizer replays a shard_map body for all shards at once, each value holding one block per
shard stacked in leading dimensions (one per manual mesh axis, in mesh order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from nanlab.trace import _jax


def _shard_block(x: Any, spec: Any, axes: Sequence[str], sizes: Sequence[int], coords: Sequence[int],
                 shape: tuple[int, ...] | None = None) -> Any:
    """The block of a global array that the shard at `coords` holds (`x[index]`)."""
    shape = np.shape(x) if shape is None else shape
    index = []
    pos = dict(zip(axes, coords))
    size = dict(zip(axes, sizes))
    for d, split in enumerate(_jax.spec_axes(spec, len(shape))):
        split = [a for a in split if a in pos]
        if not split:
            index.append(slice(None))
            continue
        n, k = 1, 0
        for a in split:  # major first
            k, n = k * size[a] + pos[a], n * size[a]
        block = shape[d] // n
        index.append(slice(k * block, (k + 1) * block))
    return x[tuple(index)]


def to_shards(x: Any, spec: Any, axes: Sequence[str], sizes: Sequence[int]) -> Any:
    """Stack every shard's block of a global array: shape (*sizes, *block shape)."""
    x = np.asarray(x)  # host copy: blocks of a global array (of any sharding) by plain indexing
    blocks = [_shard_block(x, spec, axes, sizes, c) for c in np.ndindex(*sizes)]
    return jnp.asarray(np.stack(blocks).reshape(tuple(sizes) + blocks[0].shape))


def from_shards(stacked: Any, spec: Any, axes: Sequence[str], sizes: Sequence[int], aval: Any,
                 is_stacked: bool) -> Any:
    """The global array (of `aval`'s shape) from every shard's block; a block of axes that the spec
    does not split (replicated) is shard 0's copy along them."""
    if not is_stacked:
        return stacked
    blocks = np.asarray(stacked)
    out = np.empty(aval.shape, blocks.dtype)
    named = {a for split in _jax.spec_axes(spec, len(aval.shape)) for a in split}
    for c in np.ndindex(*sizes):
        if any(i and a not in named for a, i in zip(axes, c)):
            continue
        index = _shard_block(_Indexer(), spec, axes, sizes, c, shape=aval.shape)
        out[index] = blocks[c]
    return jnp.asarray(out)


class _Indexer:
    def __getitem__(self, index: Any) -> Any:
        return index
