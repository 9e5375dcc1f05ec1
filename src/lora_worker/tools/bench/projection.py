"""A whole job's training time from its dataset and a rate: measured (a bench JSON), given, or the
per-GPU table in `lora_worker.runtime.gpu_rates` (each entry marked measured or estimated).

The dataset is prepared exactly as a job would prepare it (folding, the same split, the job's
max_seq_length and micro-batch budget), and the time charged is padded tokens (rows x longest row
per micro-batch) x epochs / tokens per second. No model is run; the CPU is fine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from lora_worker.runtime.data.batches import plan_micro_batches
from lora_worker.runtime.data.formats import load_conversations
from lora_worker.runtime.data.prepare import prepare_dataset
from lora_worker.runtime.gpu_rates import GPU_RATES
from lora_worker.tools.tiny_model import build_tokenizer

REPO = Path(__file__).resolve().parents[4]
FULL_DATASET = Path("../shared/data/brightrun-242.json")  # beside the checkout, where it is kept
SAMPLE_DATASET = REPO / "examples" / "brightrun-sample-24.json"

# The seed's own time estimate for the full-size job (3 epochs), in hours.
SEED_ESTIMATE_HOURS = (10.0, 15.0)
TARGET_JOB_MINUTES = 20.0  # the projected 3-epoch job's target (BENCHMARKS.md, Targets)
# The micro-batch shape the table's rates stand for (the job default: 4 rows x 2048 tokens).
TABLE_SHAPE = (4, 2048)
MIN_MEMORY_GB_70B = 80  # the 4-bit 70B model (~37 GiB) plus activations needs an 80 GB card


@dataclass(frozen=True)
class JobShape:
    """The job being projected; defaults are the job's own."""

    epochs: int = 3
    max_seq_length: int = 2048
    batch_size: int = 4  # most rows per micro-batch
    micro_batch_tokens: int | None = None  # default batch_size x max_seq_length

    @property
    def budget(self) -> int:
        return self.micro_batch_tokens or self.batch_size * self.max_seq_length


@dataclass(frozen=True)
class Rate:
    tokens_per_s: float
    basis: str  # "measured", "estimated" or "given"
    source: str


def project_seconds(
    tokens_per_epoch: int, epochs: int, tokens_per_s: float, load_seconds: float | None
) -> dict:
    """Training time of a job from its token count and a rate; model load kept apart."""
    train_s = tokens_per_epoch * epochs / tokens_per_s
    total = train_s + load_seconds if load_seconds is not None else None
    basis = total if total is not None else train_s
    lo_h, hi_h = SEED_ESTIMATE_HOURS
    return {
        "tokens_per_s": tokens_per_s,
        "tokens_to_process": tokens_per_epoch * epochs,
        "train_seconds": round(train_s, 1),
        "train_minutes": round(train_s / 60, 1),
        "load_seconds": load_seconds,  # None: unknown, not included
        "total_minutes": round(total / 60, 1) if total is not None else None,
        "vs_seed_estimate": f"{lo_h * 3600 / basis:.0f}x to {hi_h * 3600 / basis:.0f}x shorter than 10-15 h",
        "meets_20_min_target": basis <= TARGET_JOB_MINUTES * 60,
    }


def measured_rates(results_path: Path) -> dict[str, Rate]:
    """Project-recipe rates by 'project ROWSxSEQ' from a bench JSON."""
    doc = json.loads(Path(results_path).read_text())
    card = doc.get("card", "?")
    return {
        f"project {r['rows']}x{r['seq']}": Rate(
            float(r["tokens_per_s"]), "measured", f"{results_path} ({card})"
        )
        for r in doc.get("results", [])
        if r.get("recipe") == "project" and r.get("tokens_per_s")
    }


def table_rates() -> dict[str, Rate]:
    """The per-GPU table's rates for the cards that hold a 70B job, by card label."""
    return {
        g.label: Rate(g.tokens_per_s, g.basis, g.source)
        for g in GPU_RATES
        if g.memory_gb >= MIN_MEMORY_GB_70B
    }


def _dataset(path: Path | None, notes: list[str]) -> Path:
    if path is not None:
        if not path.is_file():
            raise SystemExit(f"--dataset: no such file: {path}")
        return path
    if FULL_DATASET.is_file():
        return FULL_DATASET
    notes.append(
        f"the full-size dataset was not found; using the 24-conversation sample {SAMPLE_DATASET.name}"
    )
    return SAMPLE_DATASET


def _tokenizer(tokenizer_dir: str | None, notes: list[str]):
    if tokenizer_dir:
        return AutoTokenizer.from_pretrained(tokenizer_dir), tokenizer_dir
    notes.append(
        "token counts use the tiny offline tokenizer (1,024-token vocabulary), which splits text into "
        "more tokens than Llama 3's 128K vocabulary; pass --tokenizer DIR for real counts"
    )
    return build_tokenizer(), "tiny byte-level BPE (NOT Llama 3's)"


def dataset_side(dataset: Path, tok, tok_name: str, job: JobShape) -> dict:
    """What the GPU would process for this dataset and job shape, per epoch."""
    prepared = prepare_dataset(dataset, tok, max_seq_length=job.max_seq_length, tokenizer_name=tok_name)
    s = prepared.summary
    lengths = [len(e.input_ids) for e in prepared.train]
    plan = plan_micro_batches(lengths, token_budget=job.budget, max_rows=job.batch_size)
    chars, whole = _chars_and_tokens(dataset, tok)
    return {
        "dataset": str(dataset),
        "tokenizer": tok_name,
        "max_seq_length": job.max_seq_length,
        "micro_batch_tokens": job.budget,
        "max_rows": job.batch_size,
        "train_examples": s.examples,
        "tokens_per_epoch": s.tokens_total,
        # What the GPU computes on: rows x longest row of each micro-batch.
        "padded_tokens_per_epoch": sum(len(b) * max(lengths[i] for i in b) for b in plan),
        "trainable_tokens_per_epoch": s.trainable_tokens,
        "tokens_per_epoch_unfolded": s.tokens_unfolded,
        "fold_ratio": s.fold_ratio,
        "micro_batches_per_epoch": len(plan),
        # Whole conversations, chat template included, before any splitting: the tokenizer's density.
        "chars_per_token": round(chars / max(1, whole), 2),
        "eval_tokens": s.eval_tokens,
    }


def _rates(tokens_per_s: float | None, results: Path | None, job: JobShape, notes: list[str]):
    if tokens_per_s:
        return {"given": Rate(float(tokens_per_s), "given", "--tokens-per-s")}, "--tokens-per-s"
    if results:
        return measured_rates(results), f"measured ({results})"
    if (job.batch_size, job.max_seq_length) != TABLE_SHAPE:
        notes.append(
            f"the per-GPU table's rates stand for {TABLE_SHAPE[0]} x {TABLE_SHAPE[1]} micro-batches; "
            "this job's shape runs at a different rate"
        )
    return table_rates(), "per-GPU table (lora_worker.runtime.gpu_rates), see each projection's basis"


def project_job(
    job: JobShape,
    *,
    dataset: Path | None = None,
    tokenizer_dir: str | None = None,
    tokens_per_s: float | None = None,
    results: Path | None = None,
    load_seconds: float | None = None,
) -> dict:
    """The projection document: the dataset side and one projection per rate."""
    notes: list[str] = []
    path = _dataset(dataset, notes)
    tok, tok_name = _tokenizer(tokenizer_dir, notes)
    side = dataset_side(path, tok, tok_name, job)
    rates, source = _rates(tokens_per_s, results, job, notes)
    projections = {
        name: {
            **project_seconds(side["padded_tokens_per_epoch"], job.epochs, r.tokens_per_s, load_seconds),
            "basis": r.basis,
            "source": r.source,
        }
        for name, r in rates.items()
        if r.tokens_per_s > 0
    }
    key = f"project {job.batch_size}x{job.max_seq_length}"
    return {
        "mode": "project-job",
        "epochs": job.epochs,
        "rate_source": source,
        "rate_for_this_job": key if key in projections else None,
        "dataset_side": side,
        "projections": projections,
        "load_seconds": load_seconds,
        "notes": notes
        + [
            "time = padded tokens per epoch x epochs / tokens/s: held-out evaluation, sample generation "
            "and model download/load are not included",
            "the rate that fits a job is the one measured at its micro-batch shape (rows x max_seq_length); "
            "shorter micro-batches than the measured ones run at a lower rate",
        ],
    }


def _chars_and_tokens(path: Path, tok) -> tuple[int, int]:
    """Message characters and tokens of every conversation rendered whole (no splitting, no folding)."""
    chars = tokens = 0
    for c in load_conversations(path)[0]:
        msgs = [{"role": m.role, "content": m.content} for m in c.messages]
        text = tok.apply_chat_template(msgs, tokenize=False)
        chars += sum(len(m.content) for m in c.messages)
        tokens += len(tok(text, add_special_tokens=False)["input_ids"])
    return chars, tokens
