"""`python -m nanlab.check MODULE:FUNCTION` — run the loss property battery on a user's loss.

Examples::

    python -m nanlab.check nanlab.losses:sigmoid_binary_cross_entropy        # passes, exit 0
    python -m nanlab.check nanlab.losses:naive_sigmoid_binary_cross_entropy  # fails, exit 1
    python -m nanlab.check mypkg.losses:my_bce --labels hard --skip gradient,limits

The function must map `(logits, labels)` float32 arrays of one shape to the per-element loss.
Exit codes: 0 every property holds, 1 a property failed, 2 bad argument (module or function not
found, not callable, unknown property).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from collections.abc import Callable, Sequence

from hypothesis import configuration, settings

from nanlab import _cli, testing

__all__ = ["build_parser", "main"]

PROG = "nanlab.check"


class BadArgument(ValueError):
    """A command-line argument that names nothing usable; its message is the one line printed."""


def resolve(spec: str) -> Callable:
    """Imports MODULE and returns its attribute FUNCTION from "MODULE:FUNCTION".

    Raises:
      BadArgument: malformed spec, module or attribute not found, or not callable.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise BadArgument(f"expected MODULE:FUNCTION, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise BadArgument(f"cannot import module {module_name!r}: {error}") from error
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise BadArgument(f"module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise BadArgument(f"{spec!r} is not callable (it is a {type(target).__name__})")
    return target


def check_signature(spec: str, fn: Callable) -> None:
    """Call `fn` once on two float32 zeros (logits, labels): a function that cannot take them is bad input.

    Raises:
      BadArgument: calling it raised a TypeError (wrong arity, keywords or argument types), named
        in one line, instead of the same TypeError in every row of the battery.
    """
    import numpy as np

    zeros = np.zeros((2,), np.float32)
    try:
        fn(zeros, zeros)
    except TypeError as error:
        raise BadArgument(f"{spec} does not accept (logits, labels): {error}") from None
    except Exception:  # noqa: BLE001 - any other failure is the battery's to report, property by property
        pass


def parse_skip(text: str) -> tuple[str, ...]:
    """Comma-separated property names -> tuple, each checked against `testing.PROPERTIES`."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in testing.PROPERTIES]
    if unknown:
        raise BadArgument(
            f"unknown property {unknown[0]!r} in --skip; known: {', '.join(testing.PROPERTIES)}"
        )
    return names


def format_table(results: Sequence[testing.PropertyResult]) -> str:
    """A plain-text pass/fail table, one row per property, counterexamples under failures."""
    width = max(len(result.name) for result in results)
    lines = [f"{'property':<{width}}  result  examples  detail"]
    for result in results:
        status = "PASS" if result.passed else "FAIL"
        detail = result.description if result.passed else result.message
        lines.append(f"{result.name:<{width}}  {status:<6}  {result.examples:>8}  {detail}")
        if result.counterexample is not None:
            lines.append(f"{'':<{width}}                    counterexample: {result.counterexample}")
    passed = sum(result.passed for result in results)
    lines.append(f"{passed}/{len(results)} properties hold")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (a bad flag: one line on stderr, exit 2)."""
    parser = _cli.Parser(
        PROG,
        description="Run nanlab's property battery on a binary loss fn(logits, labels).",
    )
    parser.add_argument("target", help="MODULE:FUNCTION, e.g. nanlab.losses:sigmoid_binary_cross_entropy")
    parser.add_argument("--labels", choices=("soft", "hard"), default="soft", help="label kind to draw")
    parser.add_argument("--skip", default="", help="comma-separated properties to leave out")
    parser.add_argument("--max-examples", type=int, default=200, help="Hypothesis examples per property")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code (0 pass, 1 fail, 2 bad argument)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed its one-line usage error
        return int(exit_.code or 0)
    try:
        fn = resolve(args.target)
        skip = parse_skip(args.skip)
        if args.max_examples < 1:
            raise BadArgument(f"--max-examples must be >= 1, got {args.max_examples}")
        check_signature(args.target, fn)
    except BadArgument as error:
        return _cli.report_bad_input(PROG, error)
    hypothesis_settings = settings(max_examples=args.max_examples, derandomize=True, database=None, deadline=None)
    # Hypothesis caches what it learns in ./.hypothesis; a user's checkout is not the place for it.
    previous_home = getattr(configuration, "__hypothesis_home_directory", None)  # None: Hypothesis's default
    with tempfile.TemporaryDirectory(prefix="nanlab-check-") as home:
        configuration.set_hypothesis_home_dir(home)
        try:
            results = testing.run_battery(
                fn, label_kind=args.labels, skip=skip, hypothesis_settings=hypothesis_settings
            )
        finally:
            configuration.set_hypothesis_home_dir(previous_home)
    print(f"nanlab.check {args.target} ({args.labels} labels, {args.max_examples} examples per property)")
    print(format_table(results))
    return 0 if all(result.passed for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
