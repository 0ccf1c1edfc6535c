"""The `python -m training` command line. Sub-commands import their heavy dependencies lazily."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FILE_LIST = REPO.parent / "shared" / "cnmc_samples" / "kaggle_file_list.txt"


def cmd_index(args) -> int:
    from core.dataset import format_summary, index, summarize

    result = index(args.dir)
    summary = summarize(result)
    if args.json:
        summary["problems"] = result.problems.to_dict(orient="records")
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        if len(result.problems):
            print("\nproblems:")
            for row in result.problems.itertuples():
                print(f"  {row.path}: {row.reason}")
    return 0


def cmd_synth(args) -> int:
    from core.synthetic import synthesize

    file_list = args.file_list
    if args.replica is not None and file_list is None:
        if not DEFAULT_FILE_LIST.exists():
            print("error: --replica needs --file-list PATH (the Kaggle kaggle_file_list.txt)", file=sys.stderr)
            return 2
        file_list = DEFAULT_FILE_LIST
    truth = synthesize(args.dir, cells_per_subject=args.cells_per_subject, noise=args.noise,
                       difficulty=args.difficulty, seed=args.seed, replica=args.replica, file_list=file_list,
                       workers=args.workers)
    flipped = int(truth["morphology_flipped"].sum())
    print(f"wrote {len(truth)} synthetic cells to {args.dir} "
          f"({flipped} with label-noise-flipped morphology; best achievable accuracy ~{1 - args.noise:.3f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description="C-NMC leukemia workbench")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("index", help="index a C-NMC folder: summary and problems")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("synth", help="generate a synthetic C-NMC-like dataset in the Kaggle layout")
    s.add_argument("dir")
    s.add_argument("--replica", type=float, metavar="FRACTION",
                   help="reproduce the real tree's names, counts and subjects, scaled to FRACTION")
    s.add_argument("--file-list", help="kaggle_file_list.txt for --replica (the label CSV must sit beside it)")
    s.add_argument("--cells-per-subject", type=int, default=20)
    s.add_argument("--noise", type=float, default=0.0, help="label-noise rate epsilon")
    s.add_argument("--difficulty", type=float, default=0.3, help="0 easy ... 1 classes identical")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=None)
    s.set_defaults(func=cmd_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
