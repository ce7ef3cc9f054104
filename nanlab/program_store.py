"""Traced programs kept between runs, so that a second run of the same configuration skips tracing.

JAX's persistent compilation cache (`nanlab.compile_cache`) saves XLA's compile, but a warm run
still traces every program in Python and lowers it to find the cache entry: for the README's main
job on a 2-core CPU, ~5 s of tracing and ~2 s of lowering before the first step. The store keeps
each program as `jax.export` leaves it (StableHLO, serialized), under a key made of everything that
shapes the trace: nanlab's source, the versions of the libraries that trace it, JAX's options and
XLA_FLAGS, the devices, and the run's own description (its config, data shape, picks). A warm run
deserializes it and compiles it through JAX's cache, in background threads that start before the
data is built: XLA's loading of the executable releases the GIL, so it overlaps the Python work of
the start-up. The executables themselves stay in JAX's cache: the store never holds machine code.

A program compiled from a stored entry is only used for arguments of the structure, shapes and
dtypes it was exported for: `StoredProgram` compares them at the first call and otherwise traces
afresh (as on an unreadable entry), so a wrong key costs a trace, never a wrong program. On a miss
the program is exported and compiled from the export (so that JAX's cache holds the executable the
next run asks for). `StoredProgram.prepare` makes that choice ahead of the first call, from the
arguments' shapes alone, and compiles in the store's background threads: a caller can trace its
next program while XLA compiles this one. At most `KEEP_PER_PROGRAM` entries are kept per program name, least recently
used first out. Entries are pickles in the user's cache directory, trusted as JAX's cache there is.
The store serves single-device processes (an export records its devices and shardings).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.metadata
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["KEEP_PER_PROGRAM", "SUFFIX", "ProgramStore", "StoredProgram", "source_digest"]

KEEP_PER_PROGRAM = 4
SUFFIX = ".stablehlo"
_TRACING_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")
# JAX options that do not change a program: where caches live, logging, and the debug checks
# (which the CLIs never combine with the store).
_NEUTRAL_OPTIONS = ("cache", "log", "debug_nans", "debug_infs")


def source_digest(package_dir: Path | None = None) -> str:
    """SHA-256 of every .py file of nanlab (names and bytes): any edit of the code changes it."""
    root = package_dir or Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _environment() -> dict[str, Any]:
    """What shapes a trace besides the run's own description: code, libraries, options, devices."""
    versions = {}
    for package in _TRACING_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    options = {name: repr(value) for name, value in jax.config.values.items()
               if not any(word in name for word in _NEUTRAL_OPTIONS)}
    return {
        "nanlab": source_digest(),
        "versions": versions,
        "python": sys.version_info[:2],
        "jax_options": options,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "devices": [(d.platform, d.device_kind, d.id) for d in jax.devices()],
        "processes": jax.process_count(),
    }


class _Entry(NamedTuple):
    """One stored program: the export of its flattened form and how to call it."""

    exported: bytes  # jax.export's serialization of ``f(*leaves) -> out_leaves``
    in_tree: Any  # the structure of the positional arguments
    in_types: list  # (shape, dtype name) of each argument leaf
    out_tree: Any
    out_types: list  # (shape, dtype name) of each output leaf
    jit_kwargs: dict  # donate_argnums, compiler_options: as the program was jitted


class ProgramStore:
    """A directory of traced programs for one run description.

    Args:
      directory: where the entries live (created on the first save).
      description: JSON-able facts that shape the run's programs (its config, data shape, ...);
        with `_environment()` they make every entry's key.
      warn: called with one line when an entry cannot be read or written (the run goes on).

    Attributes:
      sources: program name -> "stored" (its trace loaded) or "traced", as each program got compiled.
    """

    def __init__(self, directory: Path, description: Mapping[str, Any], *,
                 warn: Callable[[str], Any] | None = None):
        if jax.device_count() != 1:
            # An export records its devices and shardings; re-creating a mesh at load is not done here.
            raise ValueError(f"a ProgramStore serves single-device processes; this one has {jax.device_count()} devices")
        self.directory = Path(directory)
        facts = {"run": description, "environment": _environment()}
        self._context = json.dumps(facts, sort_keys=True, default=repr)
        self._loading: dict[Path, tuple[_Entry, concurrent.futures.Future]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.warn = warn or (lambda line: None)
        self.sources: dict[str, str] = {}

    def path(self, name: str, **parts: Any) -> Path:
        """The entry of program `name` (with `parts` that shape it beyond the run description)."""
        key = hashlib.sha256(json.dumps([self._context, name, parts], sort_keys=True, default=repr).encode())
        return self.directory / f"{name}-{key.hexdigest()[:24]}{SUFFIX}"

    # ---------------------------------------------------------------------------- loading

    def prefetch(self, name: str, **parts: Any) -> None:
        """Start compiling stored program `name` in a background thread (no-op without an entry)."""
        path = self.path(name, **parts)
        if path in self._loading or not path.exists():
            return
        entry = self._read(path)
        if entry is not None:
            self._loading[path] = (entry, self.compile_in_background(entry, name))

    def take(self, name: str, **parts: Any) -> tuple[_Entry, concurrent.futures.Future | None] | None:
        """Program `name`'s entry and, when `prefetch` started it, the future of its executable; None
        when there is no entry or it cannot be read."""
        path = self.path(name, **parts)
        if path in self._loading:
            return self._loading.pop(path)
        entry = self._read(path) if path.exists() else None
        return None if entry is None else (entry, None)

    def compile_in_background(self, entry: _Entry, name: str, *, lower_here: bool = False) -> concurrent.futures.Future:
        """The future of `entry`'s executable, compiled (or loaded from JAX's cache) in a background thread.

        `lower_here`: lower it in the calling thread first (a fraction of a second of Python), so that
        the thread starts XLA's compile, which releases the GIL, at once; else the thread lowers it
        too (the calling thread goes on at once).
        """
        if self._pool is None:
            # Two threads, the programs taken in the order asked for: on 2 cores this measured
            # faster to the first step than one thread (train step 4-5 s, init ~1.5 s to load).
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="nanlab-compile")
        if lower_here:
            return self._pool.submit(_lower(entry, name).compile)
        return self._pool.submit(lambda: _lower(entry, name).compile())

    def _read(self, path: Path) -> _Entry | None:
        try:
            entry = _Entry(*pickle.loads(path.read_bytes()))
        except Exception as error:  # a truncated or foreign entry: trace instead, and overwrite it
            self.unreadable(path.name, error)
            return None
        os.utime(path)  # recently used: kept by the eviction in `save`
        return entry

    def unreadable(self, entry_name: str, error: BaseException) -> None:
        """Warn that a stored entry could not be read or compiled (its program is traced again)."""
        self.warn(f"stored program {entry_name} unreadable ({type(error).__name__}: {error}); tracing it again")

    # ----------------------------------------------------------------------------- saving

    def save(self, name: str, entry: _Entry, **parts: Any) -> Path | None:
        """Write `entry` as program `name` (atomically); None, and a warning, when it cannot be."""
        path = self.path(name, **parts)
        temporary = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=f".{name}-", suffix=".tmp",
                                             delete=False) as handle:
                temporary = Path(handle.name)
                pickle.dump(tuple(entry), handle)
                handle.flush()
            os.replace(temporary, path)
        except OSError as error:  # a full disk, a read-only cache: this run goes on, the next traces
            if temporary is not None:
                temporary.unlink(missing_ok=True)
            self.warn(f"could not store program {name} in {self.directory} ({error.strerror or error})")
            return None
        self._evict(name)
        return path

    def _evict(self, name: str) -> None:
        entries = sorted(self.directory.glob(f"{name}-*{SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[KEEP_PER_PROGRAM:]:
            old.unlink(missing_ok=True)

    # ----------------------------------------------------------------------------- programs

    def jit(self, name: str, **parts: Any) -> Callable[..., "StoredProgram"]:
        """A `jax.jit` stand-in (donate_argnums, compiler_options) whose program this store keeps."""

        def jit(fun: Callable, *, donate_argnums: int | Sequence[int] = (), static_argnums: Sequence[int] = (),
                compiler_options: Mapping[str, Any] | None = None) -> StoredProgram:
            if static_argnums:
                raise ValueError("a stored program takes no static arguments (bind them into the function)")
            donated = (donate_argnums,) if isinstance(donate_argnums, int) else tuple(donate_argnums)
            jit_kwargs = {"donate_argnums": donated,
                          "compiler_options": None if compiler_options is None else dict(compiler_options)}
            return StoredProgram(self, name, fun, jit_kwargs, parts)

        return jit


def _flat_donation(in_tree: Any, donate_argnums: tuple[int, ...]) -> tuple[int, ...]:
    """The leaf positions of the donated positional arguments of a call of structure `in_tree`."""
    donated, start = [], 0
    for position, child in enumerate(in_tree.children()):
        if position in donate_argnums:
            donated.extend(range(start, start + child.num_leaves))
        start += child.num_leaves
    return tuple(donated)


def _lower(entry: _Entry, name: str) -> jax.stages.Lowered:
    """A stored program lowered for XLA; ``.compile()`` goes through JAX's cache (a load when it holds it)."""
    exported = jax.export.deserialize(bytearray(entry.exported))
    donated = _flat_donation(entry.in_tree, entry.jit_kwargs["donate_argnums"])

    def call(*leaves):
        return exported.call(*leaves)

    call.__name__ = call.__qualname__ = f"stored_{name}"  # JAX's name for it: jit(stored_train), ...
    call = jax.jit(call, donate_argnums=donated, compiler_options=entry.jit_kwargs["compiler_options"])
    specs = [jax.ShapeDtypeStruct(aval.shape, aval.dtype) for aval in exported.in_avals]
    return call.lower(*specs)


class StoredProgram:
    """A jitted function whose program comes from a `ProgramStore` when it holds a matching one.

    Arguments are positional. The first call (or `prepare`) takes the stored program when it was
    exported for arguments of this call's structure, shapes and dtypes and jitted the same way;
    otherwise it exports the function for them, stores that, and compiles the export. Later calls
    run that executable; a call with other argument types, or with traced arguments (under
    `jax.eval_shape` or an outer jit), goes through `jax.jit` as usual.

    Attributes:
      source: "stored" or "traced" once the program is chosen, None before.
    """

    def __init__(self, store: ProgramStore, name: str, fun: Callable, jit_kwargs: dict, parts: Mapping[str, Any]):
        self.store, self.name, self.parts, self.jit_kwargs = store, name, dict(parts), jit_kwargs
        self.fun, self.jitted = fun, jax.jit(fun, **jit_kwargs)
        self.source: str | None = None
        self._entry: _Entry | None = None
        # The executable, or the future of one compiling in the store's threads (`prepare`).
        self._compiled: jax.stages.Compiled | concurrent.futures.Future | None = None

    def lower(self, *args: Any) -> jax.stages.Lowered:
        return self.jitted.lower(*args)

    def prepare(self, *args: Any) -> Any:
        """Choose the program for arguments like `args` (arrays or `jax.ShapeDtypeStruct`s) now, and
        compile it in the store's background threads; the first call waits for it.

        The choice (reading the store, or tracing and exporting) runs here, in the caller's thread:
        only XLA's compile, which releases the GIL, runs beside the caller's next Python work.

        Returns:
          The outputs' shapes and dtypes (`jax.ShapeDtypeStruct`s in the outputs' structure).
        """
        if self._compiled is None:
            self._choose(args, background=True)
        outputs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in self._entry.out_types]
        return jax.tree.unflatten(self._entry.out_tree, outputs)

    def _choose(self, args: tuple, *, background: bool, stored: bool = True) -> None:
        taken = self.store.take(self.name, **self.parts) if stored else None
        if taken is not None and _accepts(taken[0], self.jit_kwargs, args):
            (self._entry, compiling), self.source = taken, "stored"
        else:
            self._entry, compiling, self.source = self._export(args), None, "traced"
            self.store.save(self.name, self._entry, **self.parts)
        self.store.sources[self.name] = self.source
        if compiling is None:
            try:
                # Lowered here in both cases: on a cold start a background thread's lowering would
                # contend for the GIL with the caller's next trace (the train step's, while the
                # init compiles); XLA's compile releases it.
                compiling = (self.store.compile_in_background(self._entry, self.name, lower_here=True) if background
                             else _lower(self._entry, self.name).compile())
            except Exception as error:
                self._refuse_stored(error)
                return self._choose(args, background=background, stored=False)
        self._compiled = compiling

    def _refuse_stored(self, error: Exception) -> None:
        """A stored entry that XLA cannot compile (a foreign or damaged export) is one warning and a
        trace; a fresh export's error is raised, as jax.jit would raise it."""
        if self.source != "stored":
            raise error
        self.store.unreadable(self.store.path(self.name, **self.parts).name, error)

    def _export(self, args: tuple) -> _Entry:
        leaves, in_tree = jax.tree.flatten(args)
        out_tree = None

        def flat(*leaves):
            nonlocal out_tree
            outputs, out_tree = jax.tree.flatten(self.fun(*jax.tree.unflatten(in_tree, leaves)))
            return outputs

        flat.__name__ = flat.__qualname__ = f"export_{self.name}"  # JAX's name for the trace
        in_types = _types(leaves)
        specs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in in_types]
        exported = jax.export.export(jax.jit(flat))(*specs)
        out_types = [(tuple(aval.shape), str(aval.dtype)) for aval in exported.out_avals]
        return _Entry(bytes(exported.serialize()), in_tree, in_types, out_tree, out_types, self.jit_kwargs)

    def _executable(self, args: tuple) -> jax.stages.Compiled:
        """The chosen executable, waiting for a background compile."""
        if self._compiled is None:
            self._choose(args, background=False)
        if isinstance(self._compiled, concurrent.futures.Future):
            try:
                self._compiled = self._compiled.result()
            except Exception as error:
                self._refuse_stored(error)
                self._choose(args, background=False, stored=False)
        return self._compiled

    def __call__(self, *args: Any) -> Any:
        leaves, in_tree = jax.tree.flatten(args)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return self.jitted(*args)  # inside a transformation: as jax.jit
        compiled = self._executable(args)
        if in_tree != self._entry.in_tree:
            return self.jitted(*args)
        try:
            outputs = compiled(*leaves)
        except TypeError:  # other shapes or dtypes than the first call's (checked before it runs)
            return self.jitted(*args)
        return jax.tree.unflatten(self._entry.out_tree, outputs)


def _types(leaves: Sequence[Any]) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype name) of each argument leaf: arrays, Python scalars or `jax.ShapeDtypeStruct`s."""
    return [(tuple(np.shape(leaf)), str(jnp.result_type(leaf))) for leaf in leaves]


def _accepts(entry: _Entry, jit_kwargs: dict, args: tuple) -> bool:
    """Whether a stored program was exported for arguments like `args` and jitted with `jit_kwargs`."""
    if entry.jit_kwargs != jit_kwargs:
        return False
    leaves, in_tree = jax.tree.flatten(args)
    if in_tree != entry.in_tree:
        return False
    return _types(leaves) == entry.in_types
