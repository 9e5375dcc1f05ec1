"""`python -m lora_worker run INPUT.json`: one job, in this process, without a RunPod queue."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from lora_worker.runtime.files import dumps_strict
from lora_worker.runtime.job import run_job


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lora_worker run",
        description="Run one job from a JSON file, in this process, without the RunPod queue.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "input", help="a JSON file holding {'input': {...}} (like test_input.json) or the input itself"
    )
    p.add_argument("--job-id", default="local-job", help="job id when the input names none")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raw = json.loads(Path(a.input).read_text(encoding="utf-8"))
    job_input = raw.get("input", raw) if isinstance(raw, dict) else raw
    result = run_job(job_input, default_job_id=a.job_id)
    print(dumps_strict(result))
    return 0 if result.get("status") == "completed" else 1
