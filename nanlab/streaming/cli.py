"""``python -m nanlab.data convert FOLDER OUT.array_record``: pack an image folder for streaming.

Exit codes: 0 written, 2 bad input (one line on stderr, no output file).
"""

from __future__ import annotations

import argparse
import sys

PROG = "python -m nanlab.data"
EXIT_OK, EXIT_BAD_INPUT = 0, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Data tools for nanlab's --data sources.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert", help="pack an image folder (one subfolder per class) into one ArrayRecord file",
        description="Packs FOLDER into OUT (.array_record); train on it with --data OUT. The batches "
                    "are the same as from the folder. Every image is decoded once on the way.")
    convert.add_argument("folder", help="image folder, one subfolder per class")
    convert.add_argument("out", help="output file, ending in .array_record (must not exist)")
    convert.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                         help="an unreadable image: stop with exit 2 (error, the default) or leave it out (skip)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from nanlab.data import DataError
    from nanlab.streaming._convert import convert_folder

    try:
        result = convert_folder(args.folder, args.out, on_bad_image=args.on_bad_image)
    except DataError as error:
        print(f"{PROG} convert: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    skipped = f", skipped {len(result['skipped'])} unreadable: {', '.join(result['skipped'][:5])}" \
        if result["skipped"] else ""
    print(f"wrote {args.out}: {result['images']} images, {len(result['classes'])} classes "
          f"({', '.join(result['classes'])}){skipped}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
