"""The client report's sections, in reading order: the verdict and headline first, then the evidence
(report_evidence.py), then the data, settings, time and cost, and the adapter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_worker.runtime.delivery import report_evidence as evidence
from lora_worker.runtime.delivery.report_view import (
    MISSING,
    Bullets,
    Image,
    Para,
    Section,
    SideBySide,
    Table,
    client_text,
    dataset_rows,
    file_name,
    fmt,
    model_name,
    number,
    seconds,
    section,
    setting,
    size,
    usd,
)

METRIC_LABELS: dict[str, str] = {
    "eval_loss_before": "Held-out loss, base model",
    "eval_loss_after": "Held-out loss, with adapter",
    "eval_loss_previous": "Held-out loss, adapter it started from (warm start)",
    "perplexity_before": "Held-out perplexity, base model",
    "perplexity_after": "Held-out perplexity, with adapter",
    "train_loss": "Training loss (last logged step)",
    "steps": "Optimizer steps",
    "total_steps": "Optimizer steps planned",
    "epochs": "Epochs",
    "tokens_trained": "Tokens trained",
    "tokens_per_second": "Throughput (tokens/s)",
    "peak_gpu_memory_gib": "Peak GPU memory (GiB)",
    "padding_fraction": "Padding share of trained positions",
}
STAGE_LABELS: dict[str, str] = {
    "dataset_fetch": "Fetch the dataset",
    "dataset_load": "Read and validate the dataset",
    "model_config": "Model config and tokenizer",
    "tokenize": "Tokenize and split",
    "model_download": "Model weights download",
    "model_load": "Load the model (4-bit) and LoRA",
    "model_load_quantize": "Load and quantize the model (4-bit)",
    "model_load_prequantized": "Load the saved 4-bit copy",
    "model_save_prequantized": "Save a 4-bit copy for later jobs",
    "model_load_adapter": "Load the starting adapter",
    "eval_before": "Held-out loss, base model",
    "train": "Training",
    "evaluate": "Evaluation after training",
    "evidence": "Scenarios, judge and probes",
    "save": "Save the adapter",
    "merge": "Merge (when asked)",
    "report": "Report and archive",
    "upload": "Upload",
}
VERDICT_WORDS = {
    "improved": "Improved",
    "unchanged": "No measurable change",
    "worse": "Worse",
    "not_measured": "Not measured",
}


def loss_sentence(report: Mapping[str, Any]) -> str:
    """One sentence on held-out loss before and after, from the numbers only."""
    metrics = section(report, "metrics")
    before, after = number(metrics.get("eval_loss_before")), number(metrics.get("eval_loss_after"))
    if before is None or after is None:
        return "No held-out evaluation is available for this job, so there is no before/after comparison."
    ppl_b, ppl_a = number(metrics.get("perplexity_before")), number(metrics.get("perplexity_after"))
    notes = []
    if after != before and before != 0:
        notes.append(f"{(after - before) / before * 100:+.1f} %")
    if ppl_b is not None and ppl_a is not None:
        notes.append(f"perplexity {fmt(ppl_b, 2)} → {fmt(ppl_a, 2)}")
    detail = f" ({', '.join(notes)})" if notes else ""
    n_eval = number(section(report, "dataset").get("eval_conversations"))
    on = (
        f" on {int(n_eval):,} held-out conversation{'' if n_eval == 1 else 's'}" if n_eval is not None else ""
    )
    if after == before:
        return f"Held-out loss was unchanged at {fmt(before)}{detail}{on}."
    if after < before:
        return f"Held-out loss fell from {fmt(before)} to {fmt(after)}{detail}{on}."
    return (
        f"Held-out loss rose from {fmt(before)} to {fmt(after)}{detail}{on}: "
        "the adapter does worse than the base model on held-out data."
    )


def headline(report: Mapping[str, Any]) -> str:
    """The report's headline: held-out loss, then the judged comparison when there is one."""
    ev = section(report, "evidence")
    extra = ev.get("headline") if isinstance(ev.get("headline"), str) else ""
    return f"{loss_sentence(report)} {extra}".strip()


def summary(report: Mapping[str, Any]) -> Section:
    outcome = section(report, "outcome")
    verdict = report.get("verdict") or outcome.get("verdict")
    parts: list = [Para(headline(report), strong=True)]
    if verdict:
        reason = outcome.get("reason")
        text = f"Verdict: {VERDICT_WORDS.get(str(verdict), str(verdict))}"
        parts.append(Para(f"{text} — {client_text(str(reason))}." if reason else f"{text}."))
    attempts = [a for a in report.get("attempts") or [] if isinstance(a, Mapping)]
    resumed_from = next((a.get("resumed_from_step") for a in attempts if a.get("resumed_from_step")), None)
    facts = [
        ("Status", fmt(report.get("status"))),
        ("Base model", model_name(report.get("base_model"))),
        ("Created", fmt(report.get("created_at"))),
    ]
    if report.get("resumed") or len(attempts) > 1:
        how = f"yes, from step {resumed_from}" if resumed_from else "yes"
        facts.append(("Resumed", f"{how} ({len(attempts)} attempts)"))
    parts.append(Table(("Item", "Value"), facts))
    return Section("summary", "Summary", parts)


def results(report: Mapping[str, Any]) -> Section:
    metrics = section(report, "metrics")
    # a figure that does not apply to this job (None: no GPU, no warm start) is left out, not shown as a dash
    keys = [k for k in METRIC_LABELS if metrics.get(k) is not None]
    keys += sorted(k for k in metrics if k not in METRIC_LABELS and metrics[k] is not None)
    rows = []
    for k in keys:
        digits = 2 if k.startswith("perplexity") or k.endswith(("_gib", "_per_second", "epochs")) else 4
        rows.append((METRIC_LABELS.get(k, k), fmt(metrics[k], digits)))
    return Section(
        "results",
        "Held-out loss and training",
        [
            Table(("Metric", "Value"), rows, (False, True)),
            Image("loss", "Training and held-out loss by step"),
        ],
    )


def samples(report: Mapping[str, Any]) -> Section | None:
    items = [s for s in report.get("samples") or [] if isinstance(s, Mapping)]
    if not items:
        return Section("samples", "Before and after", [Para("No held-out samples were generated.")])
    parts: list = [
        Para(
            "Replies to held-out prompts from the base model and from the base model with the adapter, "
            "next to the reference reply from the dataset."
        )
    ]
    for i, s in enumerate(items, 1):
        conv = s.get("conversation_id")
        meta = f"arc: {s['arc']}" if s.get("arc") else ""
        fields = [
            ("Prompt (last user message)", str(s.get("prompt") or ""), ""),
            ("Reference reply", str(s.get("reference") or ""), ""),
            ("Base model", str(s.get("base") or ""), ""),
            ("With adapter", str(s.get("adapted") or ""), ""),
        ]
        parts.append(SideBySide(f"Sample {i}" + (f": {conv}" if conv else ""), meta, fields))
    return Section("samples", "Before and after", parts)


def dataset(report: Mapping[str, Any]) -> Section:
    ds = section(report, "dataset")
    parts: list = [Table(("Quantity", "Value"), dataset_rows(ds), (False, True))]
    if "length" in ds:
        parts.append(Para("Length-limit figures count the training and held-out examples together."))
    notes = [client_text(str(n)) for n in ds.get("notes") or []]
    if notes:
        parts.append(Bullets(notes))
    return Section("dataset", "Dataset", parts)


def settings(report: Mapping[str, Any]) -> Section:
    s = section(report, "settings")
    rows = [(k, setting(s[k])) for k in sorted(s)]
    return Section("settings", "Settings", [Table(("Setting", "Value"), rows)])


def _stages(timings: Mapping[str, Any]) -> list[str]:
    return [k for k in STAGE_LABELS if k in timings] + [k for k in timings if k not in STAGE_LABELS]


def time_and_cost(report: Mapping[str, Any]) -> Section:
    timings = section(report, "timings_s")
    stages = [k for k in _stages(timings) if k != "total"]
    rows = [(STAGE_LABELS.get(k, k), seconds(timings[k])) for k in stages]
    values = [number(timings[k]) for k in stages]
    stage_total = sum(v for v in values if v is not None)
    if rows:
        rows.append(("Stages timed, this attempt", seconds(stage_total)))
    parts: list = [Table(("Stage", "Seconds"), rows, (False, True))]
    on_gpu = str(report.get("gpu") or "cpu").lower() != "cpu"
    attempts = [a for a in report.get("attempts") or [] if isinstance(a, Mapping)]
    this = number(attempts[-1].get("seconds")) if attempts else None
    label = "GPU time, all attempts (s)" if on_gpu else "Wall time on CPU, all attempts (s)"
    cost_rows = [(label, seconds(report.get("gpu_seconds")))]
    if on_gpu:
        cost_rows.insert(0, ("GPU", fmt(report.get("gpu"))))
    if this is not None:
        cost_rows.append(("This attempt until the report (s)", seconds(this)))
    cost_rows += [
        ("Cost, all attempts (USD)", usd(report.get("cost_usd"))),
        ("of which held-out evaluation (USD)", usd(report.get("eval_cost_usd"))),
    ]
    parts.append(Table(("Item", "Value"), cost_rows, (False, True)))
    if rows and this is not None and abs(this - stage_total) >= 0.5:  # more than rounding
        parts.append(
            Para(
                f"The stages add up to {seconds(stage_total)} s of this attempt's {seconds(this)} s; the rest is "
                "work between stages (claiming the job folder, events, checkpoints' bookkeeping). Time after "
                "the report was written (archive, upload, result) is in neither figure."
            )
        )
    if len(attempts) > 1:
        parts.append(Para(f"The job ran in {len(attempts)} attempts; time and cost count all of them."))
        parts.append(_attempts(attempts))
    return Section("cost", "Time and cost", parts)


def _attempts(attempts: list[Mapping[str, Any]]) -> Table:
    rows = []
    for i, a in enumerate(attempts, 1):
        status = str(a.get("status") or MISSING)
        rows.append(
            (
                str(i),
                fmt(a.get("started_at")),
                "this attempt" if status == "running" else status,
                fmt(a.get("resumed_from_step")),
                seconds(a.get("seconds")),
                usd(a.get("cost_usd")),
            )
        )
    cols = ("Attempt", "Started", "Status", "Resumed from step", "Seconds", "Cost")
    return Table(cols, rows, (True, False, False, True, True, True))


def adapter(report: Mapping[str, Any]) -> Section:
    a = report.get("adapter")
    if not isinstance(a, Mapping) or not a:
        return Section("adapter", "Adapter", [Para("No adapter was produced.")])
    rows = [
        ("Folder", file_name(a.get("path"))),
        ("Archive", file_name(a.get("archive"))),
        ("SHA-256 of the archive", fmt(a.get("sha256"))),
        ("Size of the archive", size(a.get("size_bytes"))),
    ]
    return Section("adapter", "Adapter", [Table(("Item", "Value"), rows)])


def _flat(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, Mapping):
        return [
            row
            for k, v in value.items()
            for row in _flat(f"{prefix}{k}" if not prefix else f"{prefix}: {k}", v)
        ]
    return [(prefix.replace("_", " "), fmt(value))]


def lineage(report: Mapping[str, Any]) -> Section | None:
    """Where the adapter came from (dataset file and checksum, base model commit, starting adapter)."""
    ln = section(report, "lineage")
    if not ln:
        return None
    rows = [row for k, v in ln.items() if k != "job_id" for row in _flat(k, v) if row[1] != MISSING]
    return Section("lineage", "Lineage", [Table(("Item", "Value"), rows)])


def warnings(report: Mapping[str, Any]) -> Section | None:
    items = list(dict.fromkeys(client_text(str(w)) for w in report.get("warnings") or []))
    return Section("warnings", "Warnings", [Bullets(items)]) if items else None


def build_sections(
    report: Mapping[str, Any], *, scenario_limit: int = evidence.HTML_SCENARIOS
) -> list[Section]:
    """Every section, in reading order; sections without anything to show are left out."""
    out = [
        summary(report),
        results(report),
        *evidence.sections(report, scenario_limit=scenario_limit),
        samples(report),
        dataset(report),
        settings(report),
        time_and_cost(report),
        lineage(report),
        adapter(report),
        warnings(report),
    ]
    return [s for s in out if s is not None]
