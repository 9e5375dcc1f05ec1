"""`python -m lora_worker human-eval score SHEET.csv --key KEY.json`: score the blinded A/B sheet.

A job with scenarios writes `report/human_eval_sheet.csv` and `.html` for the studio's reviewers
and keeps the key (`human_eval_key.json`, which reply is the adapter's) in the job folder. After a
reviewer writes A, B or tie in the sheet's `choice` column, this command counts the adapted
model's win / tie / loss rates with 95 % intervals, overall and per tag (arc, persona, topic), the
same way the model judge is counted. Exit status 0 when scored, 1 when the sheet or key is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_worker.runtime.evaluation.human_sheet import HumanScore, SheetError, score_sheet
from lora_worker.runtime.evaluation.preference import PreferenceRates
from lora_worker.runtime.files import dumps_strict


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_worker human-eval",
        description="Blinded human A/B evaluation of base versus adapted replies.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="score")
    score = sub.add_parser(
        "score",
        help="count win / tie / loss rates from a filled-in sheet",
        description="Count the adapted model's win / tie / loss rates from a filled-in sheet and its key.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    score.add_argument("sheet", type=Path, help="the filled-in human_eval_sheet.csv")
    score.add_argument("--key", type=Path, required=True, help="the job's human_eval_key.json")
    score.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    return p


def _pct(x: float) -> str:
    return f"{x * 100:.0f} %"


def _iv(iv: tuple[float, float] | None) -> str:
    return f"[{iv[0] * 100:.0f}, {iv[1] * 100:.0f}] %" if iv else "—"


def _line(name: str, r: PreferenceRates) -> str:
    return (
        f"  {name:<32} n={r.n:<4} win {_pct(r.win.share):>5} {_iv(r.win.interval_95):<12} "
        f"tie {_pct(r.tie.share):>5}  loss {_pct(r.loss.share):>5} {_iv(r.loss.interval_95):<12} "
        f"net {r.net.share * 100:+.0f} points"
    )


def render(score: HumanScore) -> str:
    out = [score.headline, ""]
    out.append(f"answered {score.answered} of {score.items} items")
    if score.unanswered:
        out.append(f"not answered (left out): items {', '.join(score.unanswered)}")
    if score.summary.overall is not None:
        out += ["", _line("all items", score.summary.overall)]
    for tag, rows in score.summary.slices.items():
        out += ["", f"by {tag}:"] + [_line(r.value, r.rates) for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        score = score_sheet(args.sheet, args.key)
    except SheetError as err:
        print(f"human-eval: {err}", file=sys.stderr)
        return 1
    print(dumps_strict(score.model_dump(mode="json")) if args.json else render(score))
    return 0


if __name__ == "__main__":
    sys.exit(main())
