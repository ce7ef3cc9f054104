"""Orbax checkpoints of the train state: every N steps and at the end, keep K, finite states only.

Orbax writes each checkpoint into a temporary directory and renames it into place once complete,
so a process killed mid-save (even by SIGKILL) leaves the previous checkpoints intact; the torn
temporary directory is ignored by `latest_step` and deleted when the manager next opens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpointer", "nonfinite_leaves"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be written (non-finite state) or restored (corrupt, mismatched)."""


def nonfinite_leaves(state: Any) -> list[str]:
    """Key paths of the floating-point leaves of `state` holding a NaN or an Inf (host check).

    Args:
      state: any pytree of arrays.

    Returns:
      The offending leaves' paths as strings, in tree order ([] when all finite).
    """
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        array = np.asarray(leaf)
        if np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16":
            if not np.all(np.isfinite(array.astype(np.float32))):
                bad.append(jax.tree_util.keystr(path))
    return bad


class Checkpointer:
    """Saves and restores `TrainState`s under ``<workdir>/checkpoints/<step>``.

    Args:
      directory: the checkpoint directory (created when missing).
      keep: how many of the latest checkpoints to keep (>= 1).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep!r}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            # Synchronous saves: when save() returns the checkpoint is complete on disk.
            enable_async_checkpointing=False,
            # A save torn by a kill leaves a tmp directory; remove it when the manager reopens.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Write `state` as the checkpoint of `step` (blocking; atomic).

        Raises:
          CheckpointError: the state holds a NaN or an Inf (naming the first leaves); nothing is
            written.
        """
        bad = nonfinite_leaves(state)
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise CheckpointError(f"refusing to checkpoint a non-finite state at step {step}: {shown}")
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, target: Any, step: int | None = None) -> tuple[int, Any]:
        """Restore the checkpoint of `step` (default: the latest) into the structure of `target`.

        Args:
          target: a state with the expected structure, shapes, dtypes (and shardings): arrays or
            `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape` of the init); only metadata is used.
          step: which checkpoint; None for the latest.

        Returns:
          (step, restored state).

        Raises:
          CheckpointError: no checkpoint, or one that is corrupt or does not match `target`.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as error:  # orbax raises many types (ValueError, KeyError, OSError, ...)
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            first_line = first_line.rstrip(":")  # orbax lists the details on the following lines
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} is corrupt or does not match this run: {first_line}"
            ) from None
        _check_matches(target, restored, self.directory / str(step))
        return step, restored

    def close(self) -> None:
        """Wait for pending writes and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def _check_matches(target: Any, restored: Any, where: Path) -> None:
    """Raise CheckpointError when `restored` differs from `target` in structure, shape or dtype."""
    target_leaves = jax.tree_util.tree_flatten_with_path(target)[0]
    restored_leaves = jax.tree.leaves(restored)
    if len(target_leaves) != len(restored_leaves):
        raise CheckpointError(
            f"checkpoint {where} does not match this run: {len(restored_leaves)} arrays, expected {len(target_leaves)}"
        )
    for (path, want), got in zip(target_leaves, restored_leaves):
        # Targets may be arrays or jax.ShapeDtypeStructs: compare only shape and dtype.
        want_dtype, got_dtype = np.dtype(want.dtype), np.dtype(got.dtype)
        if tuple(want.shape) != tuple(got.shape) or want_dtype != got_dtype:
            raise CheckpointError(
                f"checkpoint {where} does not match this run at {jax.tree_util.keystr(path)}: "
                f"{got_dtype}{list(got.shape)}, expected {want_dtype}{list(want.shape)}"
            )
