"""`python -m lora_worker validate FILE`: check a dataset file as a job would, before paying for a GPU.

Prints a pass/fail line, the summary with readable labels, and every warning: targets dropped by
the length limit (with the max_seq_length that keeps them), context cut, conversations split.
Exit status 0 when a job would accept the file, 1 when it would refuse it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora_worker.runtime.data import (
    DEFAULT_MAX_DROPPED_SHARE,
    DatasetError,
    DatasetSummary,
    check_data_loss,
    load_dataset,
    prepare_dataset,
)
from lora_worker.runtime.data.fetch import local_dataset
from lora_worker.runtime.data.formats import FORMATS
from lora_worker.runtime.data.prepare import summary_rows
from lora_worker.runtime.model.load import load_tokenizer
from lora_worker.tools.tiny_model import build_tokenizer

TINY_TOKENIZER = "tiny byte-level BPE (not Llama 3's; pass --tokenizer for real counts)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_worker validate",
        description="Validate a dataset file as a job would and print its summary.",
    )
    p.add_argument("path", help="the dataset file (brightrun-lora-v4 JSON or chat JSONL)")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", *FORMATS],
        help="dataset layout; auto detects it (default: %(default)s)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory of the base model; default: the tiny offline Llama-3-style tokenizer",
    )
    p.add_argument(
        "--max-seq-length",
        type=int,
        default=2048,
        help="longest training example in tokens (default: %(default)s)",
    )
    p.add_argument(
        "--no-fold", action="store_true", help="train pair by pair instead of folding conversations"
    )
    p.add_argument(
        "--min-quality-score",
        type=float,
        default=None,
        help="train only targets rated at least this (lower ones stay as context); default: no filter",
    )
    p.add_argument(
        "--max-dropped-share",
        type=float,
        default=DEFAULT_MAX_DROPPED_SHARE,
        help="refuse the file when the length limit drops more than this share (0..1) of the target tokens (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _tokenizer(directory: str | None):
    if directory is None:
        return build_tokenizer(), TINY_TOKENIZER
    return load_tokenizer(directory), directory  # as a job loads it: custom tokenizer code refused


def _print_text(path: str, summary: DatasetSummary | None, problems: list[str]) -> None:
    if problems:
        print(f"FAIL: a job would refuse {path}:")
        for p in problems:
            print(f"  - {p}")
    elif summary is not None:
        print(
            f"PASS: {path} is a valid {summary.format} file: {summary.conversations} conversations, "
            f"{summary.examples} training examples at max_seq_length {summary.max_seq_length}"
        )
    if summary is None:
        return
    rows = summary_rows(summary)
    width = max(len(label) for label, _ in rows)
    print()
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    for title, lines in (("Warnings", summary.warnings), ("Notes", summary.notes)):
        if lines:
            print(f"\n{title}:")
            for line in lines:
                print(f"  - {line}")


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    summary: DatasetSummary | None = None
    problems: list[str] = []
    try:
        tokenizer, name = _tokenizer(a.tokenizer)
        fetched = local_dataset(Path(a.path))
        loaded = load_dataset(
            fetched.path, a.format, fold=not a.no_fold, min_quality_score=a.min_quality_score
        )
        prepared = prepare_dataset(loaded, tokenizer, max_seq_length=a.max_seq_length, tokenizer_name=name)
        summary = prepared.summary
        check_data_loss(summary, a.max_dropped_share, option="--max-dropped-share")
    except DatasetError as err:
        problems = err.problems
    except OSError as err:
        problems = [f"tokenizer {a.tokenizer}: {err}"]
    if a.json:
        out = {"ok": not problems, "problems": problems, **(summary.as_dict() if summary else {})}
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        _print_text(a.path, summary, problems)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
