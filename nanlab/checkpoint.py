"""Orbax checkpoints of the train state: every N steps and at the end, keep K, finite states only.

Orbax writes each checkpoint into a temporary directory and renames it into place once complete,
so a process killed mid-save (even by SIGKILL) leaves the previous checkpoints intact; the torn
temporary directory is ignored by `latest_step` and deleted when the manager next opens.

Restoring checks the checkpoint's own metadata against the run's state before reading any array,
so a checkpoint of another configuration is named in the user's terms (which array, which shape)
rather than in orbax's. A checkpoint whose files were damaged afterwards (truncated, deleted,
overwritten) is `CorruptCheckpoint`; `restore_newest_intact` then falls back to the newest one
that reads back whole and says which it skipped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpointer", "nonfinite_leaves"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be written (non-finite state) or restored (corrupt, mismatched)."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint written by a run of another configuration (other shapes or arrays)."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files are missing, truncated or unreadable; `damage` says which in a phrase."""

    def __init__(self, step: int, directory: Path, error: BaseException | str):
        self.damage = error if isinstance(error, str) else _damage(error)
        super().__init__(f"checkpoint {step} in {directory} is corrupt: {self.damage}")


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


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints in `directory`, ascending, without opening a manager (none
    when it does not exist): orbax names a finished checkpoint by its step and writes it under a
    temporary name first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(path.name) for path in directory.iterdir() if path.is_dir() and path.name.isdigit())


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
        # The handler lets the manager read a checkpoint's metadata (shapes, dtypes) without its arrays.
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=ocp.StandardCheckpointHandler())

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
            written. Or the write failed (e.g. the disk is full): what it left is removed and the
            earlier checkpoints stay as they were.
        """
        bad = nonfinite_leaves(state)
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise CheckpointError(f"refusing to checkpoint a non-finite state at step {step}: {shown}")
        try:
            self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
            self._manager.wait_until_finished()
        except OSError as error:  # a full disk, a quota, a vanished mount: the user's terms, one line
            self._remove_partial(step)
            kept = self.latest_step()
            previous = f"checkpoint {kept} is intact" if kept is not None else "no earlier checkpoint exists"
            raise CheckpointError(f"could not write checkpoint {step} in {self.directory}: "
                                  f"{error.strerror or error}; {previous}") from None

    def restore(self, target: Any, step: int | None = None) -> tuple[int, Any]:
        """Restore the checkpoint of `step` (default: the latest) into the structure of `target`.

        Args:
          target: a state with the expected structure, shapes, dtypes (and shardings): arrays or
            `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape` of the init); only metadata is used.
          step: which checkpoint; None for the latest.

        Returns:
          (step, restored state).

        Raises:
          CheckpointMismatch: the checkpoint holds other arrays or shapes than `target`.
          CorruptCheckpoint: its files are missing, truncated or unreadable.
          CheckpointError: there is no checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
        self._check_metadata(step, target)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as error:  # orbax and TensorStore raise many types (ValueError, OSError, ...)
            raise CorruptCheckpoint(step, self.directory, error) from None
        _check_matches(target, restored, step)
        return step, restored

    def restore_newest_intact(self, target: Any) -> tuple[int, Any, list[str]]:
        """Restore the newest checkpoint that reads back whole, skipping corrupt newer ones.

        Returns:
          (step, restored state, one line per skipped checkpoint: `checkpoint N: why`).

        Raises:
          CheckpointMismatch: the newest readable checkpoint belongs to another configuration (an
            older one would too: a run's configuration is fixed).
          CheckpointError: no checkpoint at all, or every one is corrupt (the message says why).
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
        skipped: list[str] = []
        for step in reversed(steps):
            try:
                _, state = self.restore(target, step)
            except CorruptCheckpoint as error:
                skipped.append(f"checkpoint {step}: {error.damage}")
                continue
            return step, state, skipped
        raise CheckpointError(f"no intact checkpoint in {self.directory} ({'; '.join(skipped)})")

    def _check_metadata(self, step: int, target: Any) -> None:
        """Compare the checkpoint's recorded arrays with `target` before reading any of them."""
        try:
            metadata = self._manager.item_metadata(step)
        except Exception as error:  # the metadata files themselves are damaged
            raise CorruptCheckpoint(step, self.directory, error) from None
        saved = ocp.tree.to_flat_dict(getattr(metadata, "tree", metadata) or {})
        wanted = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(target, keep_empty_nodes=True))
        saved = {k: v for k, v in saved.items() if v is not None}
        wanted = {k: v for k, v in wanted.items() if v is not None}
        if not saved:
            raise CorruptCheckpoint(step, self.directory, "its metadata lists no arrays")
        # The parameters first: a differing kernel names the configuration change most plainly.
        for key in sorted(set(saved) | set(wanted), key=lambda k: (k[0] != "params", k)):
            name = "/".join(str(part) for part in key)
            if key not in wanted:
                raise CheckpointMismatch(f"checkpoint {step} does not match this run: it holds {name}, which this "
                                         "run does not have (written by a run of another configuration)")
            if key not in saved:
                raise CheckpointMismatch(f"checkpoint {step} does not match this run: it lacks {name}, which this "
                                         "run has (written by a run of another configuration)")
            got, want = saved[key], wanted[key]
            got_desc, want_desc = _describe(got), _describe(want)
            if got_desc != want_desc:
                raise CheckpointMismatch(f"checkpoint {step} does not match this run: it holds {name} as "
                                         f"{got_desc}, this run has {want_desc} (written by a run of another "
                                         "configuration)")

    def discard_after(self, step: int) -> list[int]:
        """Delete the checkpoints newer than `step` (corrupt ones a resume skipped: the run rewrites them).

        Returns:
          The steps deleted.
        """
        newer = [s for s in self.all_steps() if s > step]
        for s in newer:
            self._manager.delete(s)
        return newer

    def remove_temporary(self) -> None:
        """Delete the temporary folders of saves that never finished (a save aborted in this process)."""
        for path in self.directory.iterdir():
            if path.is_dir() and ".orbax-checkpoint-tmp" in path.name:
                shutil.rmtree(path, ignore_errors=True)

    def _remove_partial(self, step: int) -> None:
        """Delete what a failed save of `step` left (orbax's temporary folder, or an incomplete one)."""
        complete = step in self._manager.all_steps()
        for path in self.directory.iterdir():
            temporary = path.name.startswith(f"{step}.")  # orbax's '<step>.orbax-checkpoint-tmp-<time>'
            if path.is_dir() and (temporary or (path.name == str(step) and not complete)):
                shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Wait for pending writes and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def _describe(array: Any) -> str:
    """dtype[shape] of an array, a ShapeDtypeStruct or orbax's ArrayMetadata."""
    return f"{np.dtype(array.dtype)}{list(array.shape)}"


def _damage(error: BaseException) -> str:
    """What is wrong with a checkpoint's files, in one short phrase (not the storage layer's text)."""
    text = str(error)
    if isinstance(error, FileNotFoundError) or "NOT_FOUND" in text or "not found" in text.lower():
        return "a file is missing"
    return f"a file is truncated or unreadable ({type(error).__name__})"


def _check_matches(target: Any, restored: Any, step: int) -> None:
    """Raise CheckpointMismatch when `restored` differs from `target` in structure, shape or dtype."""
    target_leaves = jax.tree_util.tree_flatten_with_path(target)[0]
    restored_leaves = jax.tree.leaves(restored)
    if len(target_leaves) != len(restored_leaves):
        raise CheckpointMismatch(
            f"checkpoint {step} does not match this run: {len(restored_leaves)} arrays, expected {len(target_leaves)}"
        )
    for (path, want), got in zip(target_leaves, restored_leaves):
        if _describe(want) != _describe(got):
            raise CheckpointMismatch(
                f"checkpoint {step} does not match this run at {jax.tree_util.keystr(path)}: "
                f"{_describe(got)}, expected {_describe(want)}"
            )
