"""`python -m lora_worker schemas [--check]`: the generated documentation of the contracts, from the
typed models: the JSON Schemas in docs/schemas/ (job input, progress event, result, report) and the
README's job-input table. `--check` exits 1 when any of it is out of date."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from lora_worker.cli import invocation
from lora_worker.runtime.contracts import json_schemas
from lora_worker.runtime.events.event import event_json_schema
from lora_worker.runtime.spec import JobSpec, input_table_markdown

REPO = Path(__file__).resolve().parents[3]
DEFAULT_DIR = REPO / "docs" / "schemas"
README = REPO / "README.md"
TABLE = re.compile(r"(<!-- input-table:start -->\n).*?(<!-- input-table:end -->)", re.S)


def all_schemas() -> dict[str, dict]:
    return {
        "job-input.schema.json": JobSpec.model_json_schema(),
        "progress-event.schema.json": event_json_schema(),
        **json_schemas(),
    }


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def readme_with_table(text: str) -> str:
    """The README with its job-input table regenerated from the field docs in runtime/spec.py."""
    return TABLE.sub(lambda m: m.group(1) + input_table_markdown() + "\n" + m.group(2), text)


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
    if README.exists():
        text = README.read_text(encoding="utf-8")
        if readme_with_table(text) != text:
            stale.append("README.md input table")
            if not a.check:
                README.write_text(readme_with_table(text), encoding="utf-8")
    if a.check and stale:
        print(f"out of date: {', '.join(stale)}; run {invocation()} schemas", file=sys.stderr)
        return 1
    print(
        f"{len(all_schemas())} schemas in {a.out}"
        + (f" ({len(stale)} written)" if stale and not a.check else "")
    )
    return 0
