"""``gradnorm-engine report DIR``: figures and a markdown summary from DIR/results.jsonl.

Writes curves.png (mean +- std band over trials), times.png, per_class.png and summary.md
(Table-III-style accuracy table and timings) beside the results, or into ``--dest``.
"""
from __future__ import annotations

import argparse

from ..al.report import accuracy_table, read_records, write_report

HELP = "learning curves, accuracy table, timings and per-class accuracy from an al run folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="DIR", help="folder holding results.jsonl (or the file itself)")
    p.add_argument("--dest", help="folder for the figures and summary.md (default: DIR)")


def run(args: argparse.Namespace) -> int:
    paths = write_report(args.run_dir, args.dest)
    print(accuracy_table(read_records(args.run_dir), fmt="text"))
    print()
    for kind, path in paths.items():
        print(f"{kind:>9}: {path}")
    return 0
