"""report.json / report.md / loss_curve.png / report.html from a realistic report dict: content,
client-facing hygiene (no worker paths, honest time labels, readable numbers), escaping of model
text, determinism, and the evidence sections built from the real evidence models."""

from __future__ import annotations

import copy
import json
import math
import re
import struct
from pathlib import Path

import pytest
from conftest import SAMPLE
from report_builders import PNG_MAGIC, make_evidence, make_report

from lora_worker.runtime.data import prepare_dataset
from lora_worker.runtime.delivery.report import headline, render_markdown, write_report
from lora_worker.runtime.delivery.report_html import render_html
from lora_worker.runtime.delivery.report_plots import plots


@pytest.fixture(scope="module")
def dataset_summary(tokenizer) -> dict:
    return prepare_dataset(
        SAMPLE, tokenizer, max_seq_length=512, eval_fraction=0.25, max_eval=6
    ).summary.as_dict()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[12:16] == b"IHDR"  # the first chunk: 8-byte magic, length, type, then width and height
    return struct.unpack(">II", data[16:24])


def test_writes_four_files_and_json_round_trips(tmp_path: Path, dataset_summary) -> None:
    report = make_report(dataset_summary)
    paths = write_report(tmp_path / "r", report)
    assert set(paths) == {"json", "markdown", "plot", "html"}
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(report))
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "loss_curve.png",
        "report.html",
        "report.json",
        "report.md",
    ]


def test_json_is_sorted_indented_and_strict(tmp_path: Path, dataset_summary) -> None:
    report = make_report(dataset_summary)
    report["metrics"]["train_loss"] = math.nan  # a diverged run must still give parseable JSON
    report["adapter"]["path"] = Path("/runpod-volume/jobs/job-42/adapter")
    text = write_report(tmp_path, report)["json"].read_text()
    assert text.startswith('{\n  "adapter"')
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert (
        data["metrics"]["train_loss"] is None
        and data["adapter"]["path"] == "/runpod-volume/jobs/job-42/adapter"
    )


def test_markdown_leads_with_headline_and_verdict_then_the_evidence(dataset_summary) -> None:
    md = render_markdown(make_report(dataset_summary))
    assert md.startswith(
        "# Fine-tuning report: job-42\n\n## Summary\n\n**Held-out loss fell from 1.8765 to 1.2345"
    )
    assert "Judged blind by judge-model on 4 scenarios, the adapted model's reply was preferred in 50 %" in md
    assert "Verdict: Improved — held-out loss 1.8765 -&gt; 1.2345 (-34.2 %)" in md
    titles = re.findall(r"^## (.+)$", md, re.M)
    assert titles == [
        "Summary", "Held-out loss and training", "Judged comparison", "Held-out loss by slice",
        "Scenarios side by side", "Forgetting probe", "End of turn", "Notes on the evidence",
        "Before and after", "Dataset", "Settings", "Time and cost", "Adapter", "Warnings",
    ]  # fmt: skip
    assert "| Adapted model preferred (win) | 2 | 50 % |" in md
    assert "| grief | 2 | 2.1000 | 1.7500 | -0.3500 |" in md
    assert "| all | 6 | 1.0000 | 1.1000 | +0.1000 |" in md and "a rise above 5 % is flagged" in md
    assert "**forgetting probe: loss on 6 general questions rose from 1.0000 to 1.1000" in md
    assert "| With adapter | 3 of 4 | 75 % |" in md
    assert "*(cut at the token limit)*" in md
    assert "![Training and held-out loss by step](loss_curve.png)" in md
    assert "- the scenarios file holds 9; the first 4 were used" in md


def test_client_facing_hygiene(dataset_summary) -> None:
    report = make_report(dataset_summary, base_model="/opt/models/llama-70b")
    for text in (render_markdown(report), render_html(report, plots(report))):
        assert "/runpod-volume" not in text and "/opt/models" not in text
        assert "llama-70b (local folder)" in text
        assert "job-42-adapter.tar.gz" in text and "NF4 copy at nf4 was rebuilt" in text
        assert "30.0000" not in text and "[]" not in text
        assert "GPU time, all attempts (s)" in text and "Wall time on CPU" not in text
    md = render_markdown(report)
    assert "| checkpoint_minutes | 30 |" in md and "| learning_rate | 0.0002 |" in md
    assert "| target_modules | q_proj, v_proj |" in md and "| eval_steps | — |" in md
    assert "| Length limit: Conversations split into chunks |" in md
    assert "Length-limit figures count the training and held-out examples together." in md
    assert "| Folder | adapter |" in md and "| Size of the archive | 167,772,160 bytes (160.0 MiB) |" in md
    cpu = render_markdown(make_report(dataset_summary, gpu="cpu"))
    assert "| Wall time on CPU, all attempts (s) | 4,030.0 |" in cpu and "GPU time" not in cpu


def test_stage_total_and_wall_time_are_explained(dataset_summary) -> None:
    md = render_markdown(make_report(dataset_summary))
    assert "| Stages timed, this attempt | 4,023.3 |" in md
    assert "| Fetch the dataset | &lt; 0.1 |" in md
    assert "The stages add up to 4,023.3 s of this attempt's 4,030.0 s; the rest is work between stages" in md
    agree = make_report(dataset_summary, attempts=[{"seconds": 4023.5, "status": "running"}])
    assert "The stages add up to" not in render_markdown(agree)


def test_lineage_is_shown_without_worker_paths(dataset_summary) -> None:
    lineage = {
        "job_id": "job-42",
        "dataset": {
            "file_name": "data.json",
            "source": "/runpod-volume/uploads/data.json",
            "sha256": "ab" * 32,
        },
        "base_model": {
            "model_id": "meta-llama/Meta-Llama-3-70B-Instruct",
            "revision": "e1945c4",
            "source": "hub",
        },
        "previous": None,
    }
    md = render_markdown(make_report(dataset_summary, lineage=lineage))
    assert "## Lineage" in md and "| dataset: source | data.json |" in md
    assert (
        "| base model: revision | e1945c4 |" in md
        and "previous" not in md.split("## Lineage")[1].split("##")[0]
    )


def test_a_resumed_job_shows_its_attempts(dataset_summary) -> None:
    attempts = [
        {"started_at": "2025-06-01T10:00:00+00:00", "seconds": 65.5, "cost_usd": 0.08, "status": "cancelled"},
        {"started_at": "2025-06-01T11:00:00+00:00", "seconds": 69.9, "cost_usd": 0.08, "status": "running", "resumed_from_step": 12},
    ]  # fmt: skip
    md = render_markdown(make_report(dataset_summary, resumed=True, attempts=attempts, gpu_seconds=135.4))
    assert "| Resumed | yes, from step 12 (2 attempts) |" in md
    assert "The job ran in 2 attempts; time and cost count all of them." in md
    assert "| 1 | 2025-06-01T10:00:00+00:00 | cancelled | — | 65.5 | $0.08 |" in md
    assert "| 2 | 2025-06-01T11:00:00+00:00 | this attempt | 12 | 69.9 | $0.08 |" in md


def test_model_text_never_becomes_markup(dataset_summary) -> None:
    report = make_report(dataset_summary)
    md = render_markdown(report)
    assert "<script>" not in md and "<b>" not in md
    assert "&lt;script&gt;alert('x')&lt;/script&gt;" in md
    assert "> Summarise the brief | in one line\\\n> then list risks" in md  # hard break keeps the line
    assert "> ```python\n> print('hi')\n> ```\n> Short answer." in md  # no break markers in code
    page = render_html(report, plots(report))
    assert "<script" not in page.lower() and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "default-src 'none'" in page  # and the page may not run or load anything even if it tried


def test_outputs_are_deterministic_and_the_plots_real(tmp_path: Path, dataset_summary) -> None:
    first = write_report(tmp_path / "a", make_report(dataset_summary))
    second = write_report(tmp_path / "b", copy.deepcopy(make_report(dataset_summary)))
    for key in ("json", "markdown", "plot", "html"):
        assert first[key].read_bytes() == second[key].read_bytes(), key
    images = plots(make_report(dataset_summary))
    assert set(images) == {"loss", "slices", "judge"}
    assert all(png.startswith(PNG_MAGIC) for png in images.values())
    assert png_size(images["loss"]) == (800, 450) and len(images["loss"]) > 10_000
    page = first["html"].read_text()
    assert page.count('src="data:image/png;base64,') == 3 and "http://" not in page and "https://" not in page


def test_a_nearly_empty_report_renders(tmp_path: Path) -> None:
    paths = write_report(tmp_path, {"job_id": "failed-job", "status": "failed"})
    md = paths["markdown"].read_text()
    assert "# Fine-tuning report: failed-job" in md and "| Status | failed |" in md
    assert "No held-out evaluation is available" in md and "No adapter was produced." in md
    assert "No held-out samples were generated." in md
    assert (
        paths["plot"].read_bytes().startswith(PNG_MAGIC)
        and "<h1>Fine-tuning report: failed-job</h1>" in paths["html"].read_text()
    )


def test_headlines_come_from_the_numbers(dataset_summary) -> None:
    report = make_report(dataset_summary, evidence=None)
    report["metrics"] = {
        **report["metrics"],
        "eval_loss_before": 1.2,
        "eval_loss_after": 1.5,
        "perplexity_before": 3.32,
        "perplexity_after": 4.48,
    }
    line = headline(report)
    assert line.startswith("Held-out loss rose from 1.2000 to 1.5000 (+25.0 %, perplexity 3.32 → 4.48)")
    assert "does worse than the base model" in line
    report["metrics"].update(eval_loss_before=1.5, eval_loss_after=1.5, perplexity_before=None)
    report["dataset"] = {"eval_conversations": 1}
    assert headline(report) == "Held-out loss was unchanged at 1.5000 on 1 held-out conversation."
    # The judge's clause: four wins of four is still too few to claim anything.
    few = headline(make_report(dataset_summary, evidence=make_evidence(adapted_wins=4)))
    assert "preferred in 100 %" in few and few.endswith(
        "4 decisive scenarios are too few to claim a difference (sign test p = 0.12)."
    )
    wide = headline(make_report(dataset_summary))
    assert wide.endswith("too wide to claim a difference.")
    assert "Change +10.0 % (95 % interval" in render_markdown(make_report(dataset_summary))


def test_the_human_sheet_is_written_beside_the_report_only_when_asked(
    tmp_path: Path, dataset_summary
) -> None:
    report = make_report(dataset_summary)
    assert "human_sheet_csv" not in write_report(tmp_path / "a", report)
    paths = write_report(
        tmp_path / "b" / "report", report, human_key_path=tmp_path / "b" / "human_eval_key.json"
    )
    assert paths["human_sheet_csv"].parent == paths["human_sheet_html"].parent == tmp_path / "b" / "report"
    assert paths["human_key"] == tmp_path / "b" / "human_eval_key.json" and paths["human_key"].is_file()
