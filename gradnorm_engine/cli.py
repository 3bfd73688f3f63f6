"""``gradnorm-engine``: one entry point, one module per subcommand in ``gradnorm_engine.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. A ``UsageError`` raised by a command, or a ``MissingExtraError`` (an optional
package not installed), prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UsageError
from .extras import MissingExtraError

# subcommand -> module under gradnorm_engine.commands
COMMANDS = {
    "demo": "demo",
    "rank": "rank",
    "score": "score",
    "al": "al",
    "report": "report",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradnorm-engine",
        description="Exact per-sample gradient-norm scoring for active learning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"gradnorm_engine.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (UsageError, MissingExtraError) as err:
        print(f"gradnorm-engine {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
