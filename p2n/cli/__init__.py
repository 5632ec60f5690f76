"""The ``p2n`` command: one sub-command per module in this package, each with ``--help``.

A sub-command module exposes ``register(subparsers)`` (adds its parser, sets ``func``) and keeps its work in
``p2n`` proper; this package only parses arguments, calls the library and prints results.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules in the order ``p2n --help`` lists them.
COMMANDS = ["fit", "dataset", "train", "generate", "generate_batch", "interpolate", "eval", "refine", "serve", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2n",
        description="Prompt2NeRF-PIL: fit NeRFs, build datasets, train the latent and aligner, generate, refine, serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"p2n.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"p2n.cli.{name}":
                continue  # not built yet in this checkout
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from p2n.errors import P2NError

    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except P2NError as e:
        print(f"p2n {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"p2n {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
