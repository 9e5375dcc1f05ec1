"""report.json / report.md / loss_curve.png rendering, on a realistic report dict."""

from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path

import pytest

from lora_worker.runtime.delivery.report import headline, render_markdown, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_report() -> dict:
    return {
        "job_id": "job-42",
        "status": "succeeded",
        "base_model": "meta-llama/Meta-Llama-3-70B-Instruct",
        "created_at": "2025-06-01T12:00:00+00:00",
        "dataset": {
            "format": "openai-chat",
            "conversations": 120,
            "pairs": 180,
            "skipped_null_targets": 3,
            "train_conversations": 108,
            "eval_conversations": 12,
            "examples": 108,
            "truncated": 2,
            "dropped": 1,
            "tokens_total": 91234,
            "tokens_unfolded": 95000,
            "trainable_tokens": 40321,
        },
        "settings": {
            "learning_rate": 2e-4,
            "lora_r": 16,
            "lora_alpha": 32,
            "target_modules": ["q_proj", "v_proj"],
        },
        "metrics": {
            "train_loss": 1.1234,
            "eval_loss_before": 1.8765,
            "eval_loss_after": 1.2345,
            "perplexity_before": 6.53,
            "perplexity_after": 3.44,
            "steps": 40,
            "epochs": 3.0,
            "tokens_trained": 273702,
            "tokens_per_second": 812.5,
            "peak_gpu_memory_gib": 61.2,
        },
        "history": {
            "train": [
                {"step": s, "loss": 2.0 - 0.02 * s, "learning_rate": 2e-4, "grad_norm": 0.9}
                for s in range(1, 41)
            ],
            "eval": [{"step": 20, "eval_loss": 1.4}, {"step": 40, "eval_loss": 1.2345}],
        },
        "samples": [
            {
                "conversation_id": "conv-7",
                "prompt": "Summarise the brief | in one line\nthen list risks",
                "reference": "A one-line summary.\n\n- risk A\n- risk B",
                "base": "I am a language model <b>and</b> here is text",
                "adapted": "```python\nprint('hi')\n```\nShort answer.",
            }
        ],
        "timings_s": {"load": 120.5, "train": 3600.0, "eval": 300.25},
        "gpu_seconds": 4020.75,
        "cost_usd": 4.67,
        "eval_cost_usd": 0.35,
        "adapter": {
            "path": "/runpod-volume/jobs/job-42/adapter",
            "archive": "/runpod-volume/jobs/job-42/adapter.tar.gz",
            "sha256": "0" * 64,
            "size_bytes": 167772160,
        },
    }


def png_size(data: bytes) -> tuple[int, int]:
    # IHDR is the first chunk: 8-byte magic, 4-byte length, 4-byte type, then width and height.
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_writes_all_three_files_and_json_round_trips(tmp_path: Path) -> None:
    report = make_report()
    paths = write_report(tmp_path / "job-42", report)

    assert set(paths) == {"json", "markdown", "plot"}
    assert all(p.parent == tmp_path / "job-42" and p.is_file() for p in paths.values())
    assert json.loads(paths["json"].read_text()) == report
    # No temporary files left behind by the atomic writes.
    assert sorted(p.name for p in (tmp_path / "job-42").iterdir()) == [
        "loss_curve.png",
        "report.json",
        "report.md",
    ]


def test_json_is_sorted_indented_and_strict(tmp_path: Path) -> None:
    report = make_report()
    report["metrics"]["train_loss"] = math.nan  # a diverged run must still give parseable JSON
    report["adapter"]["path"] = Path("/runpod-volume/jobs/job-42/adapter")
    text = write_report(tmp_path, report)["json"].read_text()

    assert text.startswith('{\n  "adapter"')  # sorted keys, two-space indent
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert data["metrics"]["train_loss"] is None
    assert data["adapter"]["path"] == "/runpod-volume/jobs/job-42/adapter"


def test_markdown_has_headline_numbers_plot_tables_and_samples(tmp_path: Path) -> None:
    md = write_report(tmp_path, make_report())["markdown"].read_text()

    assert md.startswith("# Fine-tuning report: job-42\n")
    assert (
        "Held-out loss fell from 1.8765 to 1.2345 (-34.2 %, perplexity 6.53 → 3.44) on 12 held-out conversations."
        in md
    )
    assert "![loss](loss_curve.png)" in md
    assert "| Held-out loss, base model | 1.8765 |" in md
    assert "| Held-out conversations | 12 |" in md
    assert "| Tokens per epoch (conversations folded) | 91,234 |" in md
    assert '| target_modules | ["q_proj", "v_proj"] |' in md
    assert "| learning_rate | 0.0002 |" in md
    assert "| **total** | **4,020.8** |" in md
    assert "| Cost (USD) | $4.67 |" in md
    assert "| SHA-256 | `" + "0" * 64 + "` |" in md
    assert "160.0 MiB" in md

    # Samples: every text present, quoted line by line, raw HTML neutralised.
    assert "### Sample 1: conv-7" in md
    assert "> Summarise the brief | in one line\\\n> then list risks" in md  # hard break keeps the line
    assert "> A one-line summary.\n>\n> - risk A\\\n> - risk B" in md
    assert "> I am a language model &lt;b&gt;and&lt;/b&gt; here is text" in md
    assert "<b>" not in md
    assert "> ```python\n> print('hi')\n> ```\n> Short answer." in md  # no break markers inside code


def test_markdown_is_deterministic_and_plot_is_a_real_png(tmp_path: Path) -> None:
    first = write_report(tmp_path / "a", make_report())
    second = write_report(tmp_path / "b", copy.deepcopy(make_report()))

    for key in ("json", "markdown", "plot"):
        assert first[key].read_bytes() == second[key].read_bytes(), key
    png = first["plot"].read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert len(png) > 10_000  # two plotted series, labels and a legend, not a blank canvas
    assert png_size(png) == (800, 450)


def test_table_cells_escape_pipes_and_newlines() -> None:
    report = make_report()
    report["settings"] = {"system_prompt": "be brief | be kind\nalways"}
    md = render_markdown(report)
    assert "| system_prompt | be brief \\| be kind<br>always |" in md


def test_report_without_eval_history_or_samples_still_renders(tmp_path: Path) -> None:
    report = make_report()
    report["history"] = {"train": report["history"]["train"], "eval": []}
    report["metrics"].update(
        eval_loss_before=None, eval_loss_after=None, perplexity_before=None, perplexity_after=None
    )
    report["samples"] = []
    report["adapter"] = None
    report["eval_cost_usd"] = None

    paths = write_report(tmp_path, report)
    md = paths["markdown"].read_text()
    assert "No held-out evaluation is available" in md
    assert "| Held-out loss, with adapter | — |" in md
    assert "No held-out samples were generated." in md
    assert "No adapter was produced." in md
    assert paths["plot"].read_bytes().startswith(PNG_MAGIC)


def test_nearly_empty_report_renders(tmp_path: Path) -> None:
    paths = write_report(tmp_path, {"job_id": "failed-job", "status": "failed"})
    md = paths["markdown"].read_text()
    assert "# Fine-tuning report: failed-job" in md
    assert "- **Status:** `failed`" in md
    assert paths["plot"].read_bytes().startswith(PNG_MAGIC)
    assert json.loads(paths["json"].read_text()) == {"job_id": "failed-job", "status": "failed"}


def test_headline_is_honest_when_loss_rose() -> None:
    report = make_report()
    report["metrics"].update(
        eval_loss_before=1.2, eval_loss_after=1.5, perplexity_before=3.32, perplexity_after=4.48
    )
    line = headline(report)
    assert line.startswith("Held-out loss rose from 1.2000 to 1.5000 (+25.0 %, perplexity 3.32 → 4.48)")
    assert "does worse than the base model" in line
    assert "fell" not in line
    assert line in render_markdown(report)


def test_headline_unchanged_and_singular() -> None:
    report = make_report()
    report["metrics"].update(eval_loss_before=1.5, eval_loss_after=1.5, perplexity_before=None)
    report["dataset"]["eval_conversations"] = 1
    assert headline(report) == "Held-out loss was unchanged at 1.5000 on 1 held-out conversation."
