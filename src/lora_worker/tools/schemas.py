"""`python -m lora_worker schemas [--check]`: the JSON Schemas of what the worker sends and returns,
written to docs/schemas/ from the typed models (the job input, the progress event, the result,
the report). `--check` exits 1 when a file there is out of date."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora_worker.runtime.contracts import json_schemas
from lora_worker.runtime.events.event import event_json_schema
from lora_worker.runtime.spec import JobSpec

DEFAULT_DIR = Path(__file__).resolve().parents[3] / "docs" / "schemas"


def all_schemas() -> dict[str, dict]:
    return {
        "job-input.schema.json": JobSpec.model_json_schema(),
        "progress-event.schema.json": event_json_schema(),
        **json_schemas(),
    }


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lora_worker schemas",
        description="Write (or check) the JSON Schemas of the job input, progress event, result and report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=DEFAULT_DIR, help="folder for the *.schema.json files")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when a file is out of date")
    a = p.parse_args(argv)
    stale = []
    for name, schema in all_schemas().items():
        path = a.out / name
        text = render(schema)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(name)
        if not a.check:
            a.out.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if a.check and stale:
        print(
            f"out of date in {a.out}: {', '.join(stale)}; run python -m lora_worker schemas", file=sys.stderr
        )
        return 1
    print(
        f"{len(all_schemas())} schemas in {a.out}"
        + (f" ({len(stale)} written)" if stale and not a.check else "")
    )
    return 0
