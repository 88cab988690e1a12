"""``python -m protext.datasets check --root DATA``: which datasets are there, and what to place where.

Exit status: 0 when nothing is incomplete (missing datasets are reported, not errors, unless named
with ``--dataset``), 1 when a dataset is incomplete or a named one is missing, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import run_command


def build_parser() -> argparse.ArgumentParser:
    from .catalog import DATASET_NAMES

    parser = argparse.ArgumentParser(
        prog="python -m protext.datasets",
        description="Inspect the image datasets under a data root (CoOp's or TPT's layout).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser(
        "check",
        help="report every supported dataset as found, incomplete or missing, with a one-line fix",
        description="For each dataset: found / incomplete / missing, test images on disk against what its "
        "split file lists, the layout found (CoOp or TPT) and exactly what to place where.",
    )
    check.add_argument(
        "--root", required=True, help="the data root (the folder holding dtd/, imagenet/, ... or DTD/, ImageNet/, ...)"
    )
    check.add_argument(
        "--dataset",
        action="append",
        metavar="NAME",
        help=f"check only this dataset (repeatable) [all of {', '.join(DATASET_NAMES)}]",
    )
    check.add_argument(
        "--splits",
        metavar="DIR",
        help="folder holding the split_zhou_*.json files in TPT's layout "
        "[ROOT/data_splits or ROOT/data/data_splits]",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    return parser


def _table(statuses) -> str:
    rows = [("dataset", "state", "layout", "test images", "published", "classes")]
    for s in statuses:
        images = "-" if s.state == "missing" else (f"{s.images}/{s.listed}" if s.listed is not None else str(s.images))
        classes = "-" if s.classes is None else str(s.classes)
        rows.append((s.name, s.state, s.layout or "-", images, str(s.published), classes))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for s in statuses:
        if s.note():
            lines.append(f"note {s.name}: {s.note()}")
    for s in statuses:
        if s.state == "missing":
            lines.append(f"missing {s.name}: {s.fix}")
    for s in statuses:
        if s.state == "incomplete":
            lines.append(f"incomplete {s.name}: {s.problem}")
            lines.append(f"  fix: {s.fix}")
    return "\n".join(lines)


def _as_json(statuses) -> str:
    fields = ("name", "state", "layout", "images", "listed", "published", "classes", "problem", "fix")
    payload = [
        {**{k: getattr(s, k) for k in fields}, "folder": str(s.folder) if s.folder else None, "note": s.note()}
        for s in statuses
    ]
    return json.dumps(payload, indent=2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from pathlib import Path

        from ..errors import UserError
        from .status import check

        # A mistyped --splits would otherwise be ignored silently, and every split file reported missing.
        if args.splits and not Path(args.splits).is_dir():
            raise UserError(f"--splits {args.splits}: no such folder (the folder holding the split_zhou_*.json files)")
        statuses = check(args.root, datasets=args.dataset, splits_dir=args.splits)
        print(_as_json(statuses) if args.json else _table(statuses))
        named = set(args.dataset or ())
        bad = [s for s in statuses if s.state == "incomplete" or (s.state == "missing" and named)]
        return 1 if bad else 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
