"""`python -m lora_worker bench`: QLoRA throughput and memory on a Llama-3-70B-shaped model.

What it measures (see BENCHMARKS.md for the method and the figures):

- The model is built directly in NF4 with random weights: a `LlamaForCausalLM` on the meta
  device, then each linear of every decoder layer is drawn in bf16 on the device and quantized at
  once with bitsandbytes (`Params4bit` -> `Linear4bit`); embeddings, norms and the LM head are drawn
  directly in bf16; the rotary embedding is rebuilt on the device. No checkpoint is needed and the
  bf16 weights of the full model never exist at once (the method of
  `shared/tools/seed_recipe_baseline.py`).
- `project`: the worker's own training path, unchanged: `model.add_lora` (no fp32 up-cast,
  non-reentrant checkpointing, Liger on CUDA when installed) + `trainer.build_trainer` with
  `optimizer="auto"` (paged 8-bit AdamW on CUDA), fed synthetic `Example`s planned into
  micro-batches of a token budget by `data.plan_micro_batches` (right-padded rows, no mask).
- `packed`: the same path with `training.packing = "packed"`: ROWS documents of SEQ tokens back to
  back in one row, positions restarting per document, an explicit block-diagonal mask (what
  padding-free isolation costs through sdpa).
- `seed`: the seed document's recipe: `prepare_model_for_kbit_training` (fp32 up-cast),
  `paged_adamw_32bit`, a plain HF `Trainer` on `batch x 2048` rows.

Each configuration runs in its own subprocess (`bench --one '<json>'`) so every run starts with
clean GPU memory; out-of-memory is a result, a crash is recorded with its output's tail.
Timing: the median optimizer-step time over the steps after the first (warm-up), with
`torch.cuda.synchronize()` at both ends of each step; tokens/s = real tokens per step / median.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GIB = 2**30
RESULT_MARK = "BENCH_RESULT "  # the line a `--one` child prints its result on
SCHEMA = 1
CPU_MAX_PARAMS = 2e9  # largest shape (matmul parameters) the CPU is allowed to build

# The seed's own time estimate for the full-size job (3 epochs), in hours.
SEED_ESTIMATE_HOURS = (10.0, 15.0)
# Targets of the issue; BENCHMARKS.md explains each.
TARGET_SPEEDUP_VS_SEED = 1.6
TARGET_TOKENS_PER_S_DEFAULT_BUDGET = 1300.0
TARGET_JOB_MINUTES = 20.0

# Reference figures from the issue (H200 capped at 79 GiB, 70B shape, r=16); NOT measured by this tool.
# Used by `--project-job` only when no measured rate is given, and labelled as such.
REFERENCE_RATES = {
    "seed 1x2048": 780.0,
    "project 1x2048": 1008.0,
    "project 1x8192": 1116.0,
    "project 4x2048": 1193.0,
}

# Dense bf16 tensor-core peak (FLOP/s) by card, from the vendors' data sheets (no sparsity).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),  # same tensor cores as the H100 SXM; more and faster memory
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
]


# ----------------------------------------------------------------------------- shapes and FLOPs


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    inter: int
    heads: int
    kv: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: the seven projections of each layer + LM head."""
        kv_width = self.kv * self.head_dim
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv_width + 3 * self.hidden * self.inter
        return self.layers * per_layer + self.vocab * self.hidden

    def flops_per_token(self) -> float:
        """FLOPs per trained token: forward (2N), checkpoint recompute (2N), activation grads (2N).

        No weight grads (the base is frozen; LoRA's are negligible) and no attention-score FLOPs
        (they grow with the sequence and are left out, so MFU at long budgets reads a little low).
        For the 70B shape N = 69.5e9, so about 417 GFLOP per token.
        """
        return 6.0 * self.matmul_params()


SHAPES: dict[str, Shape] = {
    "70b": Shape(layers=80, hidden=8192, inter=28672, heads=64, kv=8, vocab=128256),
    "8b": Shape(layers=32, hidden=4096, inter=14336, heads=32, kv=8, vocab=128256),
    # The CPU smoke test's shape: same architecture, a few thousand parameters per layer.
    "tiny": Shape(layers=2, hidden=64, inter=192, heads=4, kv=2, vocab=1024),
}


def peak_flops(card: str) -> float | None:
    """Dense bf16 peak FLOP/s of a card by its name, or None when unknown (or the CPU)."""
    name = card.upper()
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: useful FLOP/s over the card's dense bf16 peak."""
    if not peak or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / peak


# ----------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class RunSpec:
    recipe: str  # "project" | "packed" | "seed"
    rows: int
    seq: int  # tokens per row

    @property
    def budget(self) -> int:
        return self.rows * self.seq

    @property
    def label(self) -> str:
        return f"{self.recipe}:{self.rows}x{self.seq}"


def plan_runs(
    recipes: Sequence[str], budgets: Sequence[int], rows: Sequence[int], *, seed_seq: int
) -> list[RunSpec]:
    """The grid: for each budget (ascending), the seed recipe first, then the project's configs.

    The seed recipe always uses rows of `seed_seq` tokens (budget / seed_seq rows). The project
    uses each `rows` value, capped so that a row is at least `seed_seq` tokens long (budget 2048
    with rows 4 is 1 x 2048, not 4 x 512).
    """
    out: list[RunSpec] = []
    for b in sorted(set(budgets)):
        if "seed" in recipes and b >= seed_seq and b % seed_seq == 0:
            out.append(RunSpec("seed", b // seed_seq, seed_seq))
        if "project" in recipes:
            for r in rows:
                r = max(1, min(r, b // seed_seq))
                if b % r == 0:
                    out.append(RunSpec("project", r, b // r))
        if "packed" in recipes:
            for r in rows:
                r = max(1, min(r, b // seed_seq))
                if r > 1 and b % r == 0:  # one document per row is the plain project path
                    out.append(RunSpec("packed", r, b // r))
    seen: set[RunSpec] = set()
    return [s for s in out if not (s in seen or seen.add(s))]


def parse_runs(text: str) -> list[RunSpec]:
    """'seed:1x2048,project:4x2048' -> RunSpecs (recipe:ROWSxSEQ)."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        m = re.fullmatch(r"(project|packed|seed):(\d+)x(\d+)", item)
        if not m:
            raise ValueError(f"bad config {item!r}: expected recipe:ROWSxSEQ, e.g. project:4x2048")
        out.append(RunSpec(m[1], int(m[2]), int(m[3])))
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# ----------------------------------------------------------------------------- the child: one run


def build_nf4_model(shape: Shape, device: str, *, seed: int = 0, max_positions: int = 8192):
    """A `LlamaForCausalLM` of `shape` in NF4 with random weights, built on `device` linear by linear."""
    import bitsandbytes as bnb
    import torch
    import torch.nn as nn
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.inter,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv,
        max_position_embeddings=max(8192, max_positions),
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,  # Llama 3 70B has a separate LM head
        dtype=torch.bfloat16,
    )
    cfg._attn_implementation = "sdpa"  # what model.load_base_model asks for
    cfg.use_cache = False
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    lin.in_features,
                    lin.out_features,
                    bias=False,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,  # double quantization, as model.quantization_config
                    quant_type="nf4",
                    device="meta",
                )
                # std 0.02: activations stay finite through 80 random layers.
                w = torch.randn(
                    lin.out_features, lin.in_features, dtype=torch.bfloat16, device=device, generator=g
                )
                w.mul_(0.02)
                q.weight = bnb.nn.Params4bit(
                    w, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
                ).to(device)
                del w
                setattr(parent, name, q)
    for mod in model.modules():
        for pn, prm in list(mod._parameters.items()):
            if prm is not None and prm.is_meta:
                if "norm" in type(mod).__name__.lower():
                    val = torch.ones(prm.shape, dtype=torch.bfloat16, device=device)
                else:
                    val = torch.randn(prm.shape, dtype=torch.bfloat16, device=device, generator=g) * 0.02
                mod._parameters[pn] = nn.Parameter(val, requires_grad=False)
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    left = [n for n, b in model.named_buffers() if b.is_meta] + [
        n for n, p in model.named_parameters() if p.is_meta
    ]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    model.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT and the Trainer read it
    return model


def synthetic_examples(n: int, length: int, vocab: int, *, label_fraction: float, seed: int):
    """Random-token `Example`s with labels on the last `label_fraction` of each (like assistant turns)."""
    import torch

    from lora_worker.runtime.data.formats import IGNORE_INDEX, Example

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = ids.clone()
    labels[:, : length - int(length * label_fraction)] = IGNORE_INDEX
    return [Example(f"synthetic-{i}", tuple(ids[i].tolist()), tuple(labels[i].tolist())) for i in range(n)]


def _step_clock(device: str):
    """A TrainerCallback timing each optimizer step between device synchronisations (seconds)."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.ends: list[float] = []  # wall clock at each step's end: intervals include data loading
            self._t0 = 0.0

        def _sync(self) -> None:
            if device == "cuda":
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            now = time.perf_counter()
            self.steps.append(now - self._t0)
            self.ends.append(now)

    return StepClock()


def _project_trainer(model, cfg: dict, device: str, workdir: Path, clock) -> tuple[Any, dict]:
    from lora_worker.runtime.model.load import add_lora
    from lora_worker.runtime.training.trainer import TrainConfig, build_trainer

    model, liger_used = add_lora(
        model,
        r=cfg["lora_r"],
        alpha=cfg["lora_alpha"],
        dropout=cfg["lora_dropout"],
        seed=cfg["seed"],
        gradient_checkpointing=True,
        upcast_fp32=False,
        liger="auto",  # on CUDA when liger-kernel is installed; never on the CPU
    )
    rows, seq, steps = cfg["rows"], cfg["seq"], cfg["steps"]
    shape = Shape(**cfg["shape"])
    examples = synthetic_examples(
        rows * steps, seq, shape.vocab, label_fraction=cfg["label_fraction"], seed=cfg["seed"]
    )
    tcfg = TrainConfig(
        output_dir=workdir / "checkpoints",
        logging_dir=workdir / "tensorboard",
        num_epochs=1,
        learning_rate=2e-4,
        warmup_ratio=0.0,
        gradient_accumulation_steps=1,  # one micro-batch per timed step
        micro_batch_tokens=rows * seq,
        max_rows=rows,
        seed=cfg["seed"],
        optimizer="auto",
        checkpoint_steps=10**9,  # no checkpoint inside the timed steps
        logging_steps=1,
        gradient_checkpointing=True,
        packing="packed" if cfg["recipe"] == "packed" else "rows",
        report_to=(),
    )
    trainer, plan = build_trainer(model, examples, shape.vocab - 1, tcfg, [clock])
    if len(plan) != steps or any(len(b) != rows for b in plan):
        raise RuntimeError(
            f"planner made {[len(b) for b in plan]} rows per micro-batch, expected {rows} x {steps}"
        )
    info = {
        "liger": liger_used,
        "upcast_fp32": False,
        "gradient_checkpointing": "non-reentrant",
        "tokens_per_step": rows * seq,
        "labelled_tokens_per_step": sum(examples[i].trainable_tokens for i in plan[0]),
    }
    return trainer, info


def _seed_trainer(model, cfg: dict, device: str, workdir: Path, clock) -> tuple[Any, dict]:
    """The seed recipe, as shared/tools/seed_recipe_baseline.py runs it (upcast, paged 32-bit AdamW)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments

    from lora_worker.runtime.model.load import LORA_TARGETS

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    torch.manual_seed(cfg["seed"])
    model = get_peft_model(
        model,
        LoraConfig(
            r=cfg["lora_r"],
            lora_alpha=cfg["lora_alpha"],
            lora_dropout=cfg["lora_dropout"],
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=LORA_TARGETS,
        ),
    )
    rows, seq, steps = cfg["rows"], cfg["seq"], cfg["steps"]
    vocab = cfg["shape"]["vocab"]
    wanted = "paged_adamw_32bit"
    # bitsandbytes' paged optimizers need CUDA: on the CPU the seed recipe falls back to AdamW.
    optim = wanted if device == "cuda" else "adamw_torch"

    class Rows(torch.utils.data.Dataset):
        """The seed script's data: random rows, labels on every token, an all-ones attention mask."""

        def __len__(self) -> int:
            return rows * steps

        def __getitem__(self, i: int) -> dict:
            ids = torch.randint(0, vocab, (seq,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    args = TrainingArguments(
        output_dir=str(workdir / "seed"),
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=2e-4,
        bf16=True,
        optim=optim,
        gradient_checkpointing=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        lr_scheduler_type="cosine",
        max_grad_norm=0.3,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[clock])
    info = {
        "liger": False,
        "upcast_fp32": True,
        "gradient_checkpointing": "Trainer default",
        "tokens_per_step": rows * seq,
        "labelled_tokens_per_step": rows * (seq - 1),
    }
    if optim != wanted:
        info["optimizer_note"] = f"{wanted} needs CUDA; the seed recipe fell back to {optim} on the CPU"
    return trainer, info


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_one(cfg: dict) -> dict:
    """One configuration, in this process: build, prepare, train `steps` steps, measure."""
    import gc

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rec: dict[str, Any] = {
        "recipe": cfg["recipe"],
        "rows": cfg["rows"],
        "seq": cfg["seq"],
        "budget": cfg["rows"] * cfg["seq"],
        "steps": cfg["steps"],
        "device": device,
        "ok": False,
        "oom": False,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        rec["card"] = torch.cuda.get_device_name(0)
        rec["total_memory_gib"] = round(props.total_memory / GIB, 2)
        if cfg.get("cap_gib"):
            fraction = min(1.0, cfg["cap_gib"] * GIB / props.total_memory)
            torch.cuda.set_per_process_memory_fraction(fraction)
            rec["memory_fraction"] = round(fraction, 4)
    else:
        rec["card"] = "cpu"
    rec["versions"] = collect_versions(torch_loaded=True)
    shape = Shape(**cfg["shape"])
    if device == "cpu" and shape.matmul_params() > CPU_MAX_PARAMS:
        # 70B in NF4 is ~36 GiB of host memory, and hours per step: never on the CPU by mistake.
        rec["error"] = (
            f"the {shape.matmul_params() / 1e9:.1f}B-parameter shape needs a GPU; use --tiny on the CPU"
        )
        rec["failed_phase"] = "build"
        return rec
    phase = "build"
    workdir = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    try:
        t0 = time.perf_counter()
        model = build_nf4_model(shape, device, seed=cfg["seed"], max_positions=cfg["seq"])
        if device == "cuda":
            torch.cuda.synchronize()
            rec["weights_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
        rec["build_s"] = round(time.perf_counter() - t0, 2)
        phase = "prepare"
        clock = _step_clock(device)
        make = _seed_trainer if cfg["recipe"] == "seed" else _project_trainer
        trainer, info = make(model, cfg, device, workdir, clock)
        rec.update(info)
        rec["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        rec["optimizer"] = str(getattr(trainer.args.optim, "value", trainer.args.optim))
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()  # the peak from here on includes the weights
        phase = "train"
        out = trainer.train()
        opt = trainer.optimizer
        rec["optimizer_class"] = type(getattr(opt, "optimizer", opt)).__name__
        rec["train_loss"] = round(float(out.training_loss), 4)
        rec.update(step_stats(clock.steps, clock.ends, rec["tokens_per_step"]))
        rec["ok"] = rec.get("tokens_per_s", 0) > 0
        if device == "cuda":
            free, total = torch.cuda.mem_get_info()
            rec["device_used_gib"] = round((total - free) / GIB, 2)  # incl. CUDA context and paged state
    except Exception as err:
        if _is_oom(err):
            rec["oom"] = True
            rec["oom_message"] = str(err)[:300]
        else:
            rec["error"] = f"{type(err).__name__}: {err}"[:800]
            rec["traceback_tail"] = traceback.format_exc()[-2000:]
        rec["failed_phase"] = phase
    finally:
        if device == "cuda":
            rec["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
            rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return rec


def step_stats(step_s: Sequence[float], ends: Sequence[float], tokens_per_step: int) -> dict:
    """Median step time after the warm-up step, and the rates it gives (tokens per second)."""
    if not step_s:
        return {"step_s": []}
    timed = list(step_s[1:]) or list(step_s)  # the first step compiles kernels and allocates state
    median = statistics.median(timed)
    out = {
        "step_s": [round(x, 4) for x in step_s],
        "median_step_s": round(median, 4),
        "tokens_per_s": round(tokens_per_step / median, 1) if median > 0 else 0.0,
    }
    intervals = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    if intervals:  # end-to-end: includes the Trainer's data loading and logging between steps
        out["tokens_per_s_wall"] = round(tokens_per_step / statistics.median(intervals), 1)
    return out


def collect_versions(*, torch_loaded: bool = False) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "trl", "liger-kernel", "accelerate"):
        try:
            out[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = None  # not installed
    if torch_loaded:
        import torch

        out["cuda"] = torch.version.cuda
    return out


# ----------------------------------------------------------------------------- the parent


class Runner:
    """Runs configurations in subprocesses and keeps the JSON document up to date after each."""

    def __init__(self, args: argparse.Namespace, shape: Shape, command: list[str]):
        self.args, self.shape = args, shape
        self.doc: dict[str, Any] = {
            "tool": "lora_worker.tools.bench.bench",
            "schema": SCHEMA,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
            "shape": asdict(shape),
            "shape_name": args.shape,
            "flops_per_token": shape.flops_per_token(),
            "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout},
            "cap_gib": args.cap_gib,
            "steps": args.steps,
            "versions": collect_versions(),
            "complete": False,
            "results": [],
        }
        self.out: Path | None = Path(args.out) if args.out else None
        self.child: subprocess.Popen | None = None

    def config(self, spec: RunSpec, steps: int) -> dict:
        a = self.args
        return {
            "recipe": spec.recipe,
            "rows": spec.rows,
            "seq": spec.seq,
            "steps": steps,
            "shape": asdict(self.shape),
            "cap_gib": a.cap_gib,
            "lora_r": a.lora_r,
            "lora_alpha": a.lora_alpha,
            "lora_dropout": a.lora_dropout,
            "seed": 0,
            "label_fraction": 0.5,  # assistant-only labels cover roughly the second half of a chat
        }

    def run(self, spec: RunSpec, steps: int | None = None) -> dict:
        cfg = self.config(spec, steps or self.args.steps)
        rec = run_subprocess(cfg, timeout_s=self.args.config_timeout_s, on_start=self._started)
        self.child = None
        self._learn_device(rec)
        rec.pop("versions", None)  # the same for every child: kept once, in the document
        rec = summarize(rec, self.shape, self.doc.get("peak_flops"))
        return rec

    def _started(self, proc: subprocess.Popen) -> None:
        self.child = proc

    def _learn_device(self, rec: dict) -> None:
        """Card facts come from the children: the parent never touches CUDA (a context costs memory)."""
        if "device" in self.doc or "device" not in rec:
            return
        device = rec["device"]
        self.doc["device"] = device
        self.doc["card"] = rec.get("card", device)
        self.doc["total_memory_gib"] = rec.get("total_memory_gib")
        self.doc["versions"].update(rec.get("versions") or {})  # the child's torch knows the CUDA version
        self.doc["cuda"] = self.doc["versions"].get("cuda")
        self.doc["peak_flops"] = (
            self.args.peak_tflops * 1e12 if self.args.peak_tflops else peak_flops(self.doc["card"])
        )
        self.doc["timing_claims"] = device == "cuda" and self.args.shape != "tiny"
        if device != "cuda":
            self.doc["cap_gib"] = None  # no cap on the CPU
            self.doc["note"] = "CPU smoke run: checks the code path end to end; its timings mean nothing"

    def add(self, rec: dict) -> None:
        self.doc["results"].append(rec)
        self.doc["results"] = attach_ratios(self.doc["results"])
        self.save()

    def save(self) -> None:
        if self.out is None:
            if "device" not in self.doc:
                return
            card = "cpu" if self.doc["device"] == "cpu" else self.doc["card"]
            slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()
            tag = "-tiny" if self.args.shape == "tiny" else ""
            self.out = Path("benchmarks/results") / f"{self.doc['date'][:10]}-{slug}{tag}.json"
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2) + "\n")
        tmp.replace(self.out)  # a reader (or a killed run) never sees half a file

    def stop_child(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.wait()


def run_subprocess(cfg: dict, *, timeout_s: float, on_start: Callable | None = None) -> dict:
    """`bench --one cfg` in a fresh interpreter; its result, or a record of how it failed."""
    import lora_worker

    env = dict(os.environ)
    src = str(Path(lora_worker.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, "-m", "lora_worker", "bench", "--one", json.dumps(cfg)]
    base = {
        "recipe": cfg["recipe"],
        "rows": cfg["rows"],
        "seq": cfg["seq"],
        "budget": cfg["rows"] * cfg["seq"],
    }
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
        if on_start:
            on_start(proc)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        finally:
            if proc.poll() is None:  # the parent is being stopped: never leave a child holding the GPU
                proc.kill()
                proc.wait()
        log.seek(0)
        text = log.read()
    wall = round(time.monotonic() - t0, 1)
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_MARK):
            rec = json.loads(line[len(RESULT_MARK) :])
            rec["wall_s"] = wall
            return rec
    rec = {**base, "ok": False, "oom": False, "wall_s": wall, "returncode": rc}
    rec["error"] = f"timed out after {timeout_s:.0f} s" if rc is None else f"the subprocess exited with {rc}"
    rec["log_tail"] = text[-3000:]
    if rc is not None and "out of memory" in text[-3000:].lower():
        rec["oom"] = True  # e.g. an OOM raised where the child could not catch it
    return rec


def summarize(rec: dict, shape: Shape, peak: float | None) -> dict:
    """Adds MFU (fraction of the card's dense bf16 peak) to a measured result."""
    tps = rec.get("tokens_per_s") or 0.0
    value = mfu(tps, shape.flops_per_token(), peak)
    rec["mfu"] = round(value, 4) if value is not None else None
    return rec


def attach_ratios(results: list[dict]) -> list[dict]:
    """For each project result: its tokens/s and peak memory over the seed's at the same budget."""
    seeds = {r["budget"]: r for r in results if r.get("recipe") == "seed"}
    for r in results:
        if r.get("recipe") not in ("project", "packed"):
            continue
        s = seeds.get(r["budget"])
        r["vs_seed"] = None
        r["memory_vs_seed"] = None
        if s is None:
            r["seed_at_budget"] = "not measured"
            continue
        if s.get("oom"):
            r["seed_at_budget"] = "out of memory"
            continue
        if not s.get("tokens_per_s"):
            r["seed_at_budget"] = "failed"
            continue
        r["seed_at_budget"] = "measured"
        if r.get("tokens_per_s"):
            r["vs_seed"] = round(r["tokens_per_s"] / s["tokens_per_s"], 3)
        if r.get("peak_reserved_gib") and s.get("peak_reserved_gib") and not r.get("oom"):
            r["memory_vs_seed"] = round(r["peak_reserved_gib"] / s["peak_reserved_gib"], 3)
    return results


def format_table(results: Sequence[dict]) -> str:
    head = [
        "config",
        "budget",
        "tok/s",
        "step s",
        "alloc GiB",
        "resv GiB",
        "MFU",
        "vs seed",
        "optim",
        "liger",
        "status",
    ]
    rows = []
    for r in results:
        status = "ok" if r.get("ok") else ("OOM" if r.get("oom") else "failed")
        rows.append(
            [
                f"{r['recipe']}:{r['rows']}x{r['seq']}",
                str(r["budget"]),
                _fmt(r.get("tokens_per_s"), "{:.0f}"),
                _fmt(r.get("median_step_s"), "{:.3f}"),
                _fmt(r.get("peak_alloc_gib"), "{:.1f}"),
                _fmt(r.get("peak_reserved_gib"), "{:.1f}"),
                _fmt(r.get("mfu"), "{:.1%}"),
                _fmt(r.get("vs_seed"), "{:.2f}x"),
                str(r.get("optimizer", "-")),
                str(r.get("liger", "-")),
                status,
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else spec.format(v)


# ----------------------------------------------------------------------------- largest budget


def find_max_budget(
    fits: Callable[[int], bool], *, start: int = 8192, granularity: int = 1024, limit: int = 1 << 18
) -> dict:
    """The largest token budget that `fits`: double from `start` until one fails, then bisect.

    `fits(budget)` trains one configuration and says whether it stayed within memory. Budgets
    are multiples of `granularity`; the search stops doubling at `limit` (reported as reached).
    """
    probes: list[dict] = []

    def probe(b: int) -> bool:
        ok = bool(fits(b))
        probes.append({"budget": b, "fits": ok})
        return ok

    lo, hi = 0, None
    b = max(granularity, start // granularity * granularity)
    while b <= limit:
        if probe(b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    if hi is None:
        return {"max_budget": lo or None, "limit_reached": True, "probes": probes, "granularity": granularity}
    while hi - lo > granularity:
        mid = lo + (hi - lo) // granularity // 2 * granularity
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return {
        "max_budget": lo or None,
        "first_failing": hi,
        "limit_reached": False,
        "probes": probes,
        "granularity": granularity,
    }


# ----------------------------------------------------------------------------- job projection


def project_seconds(
    tokens_per_epoch: int, epochs: int, tokens_per_s: float, load_seconds: float | None
) -> dict:
    """Training time of a job from its token count and a measured rate; model load kept apart."""
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


def measured_rates(results_path: Path) -> dict[str, float]:
    """Project-recipe tokens/s by 'ROWSxSEQ' from a bench JSON."""
    doc = json.loads(results_path.read_text())
    return {
        f"project {r['rows']}x{r['seq']}": float(r["tokens_per_s"])
        for r in doc.get("results", [])
        if r.get("recipe") == "project" and r.get("tokens_per_s")
    }


def project_job(a: argparse.Namespace) -> dict:
    from lora_worker.runtime.data.formats import plan_micro_batches, prepare_dataset

    dataset = Path(a.dataset) if a.dataset else Path("../shared/data/brightrun-242.json")
    notes = []
    if not dataset.is_file():
        if a.dataset:
            raise SystemExit(f"--dataset: no such file: {dataset}")
        dataset = Path(__file__).resolve().parents[2] / "examples" / "brightrun-sample-24.json"
        notes.append(f"the full-size dataset was not found; using the 24-conversation sample {dataset.name}")
    if a.tokenizer:
        from transformers import AutoTokenizer

        tok, tok_name = AutoTokenizer.from_pretrained(a.tokenizer), a.tokenizer
    else:
        from lora_worker.tools.tiny_model import build_tokenizer

        tok, tok_name = build_tokenizer(), "tiny byte-level BPE (NOT Llama 3's)"
        notes.append(
            "token counts use the tiny offline tokenizer (1,024-token vocabulary), which splits text into "
            "more tokens than Llama 3's 128K vocabulary; pass --tokenizer DIR for real counts"
        )
    max_rows = a.batch_size
    budget = a.micro_batch_tokens or a.batch_size * a.max_seq_length
    prepared = prepare_dataset(dataset, tok, max_seq_length=a.max_seq_length, tokenizer_name=tok_name)
    s = prepared.summary
    lengths = [len(e.input_ids) for e in prepared.train]
    plan = plan_micro_batches(lengths, token_budget=budget, max_rows=max_rows)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    chars, whole = _chars_and_tokens(dataset, tok)
    dataset_side = {
        "dataset": str(dataset),
        "tokenizer": tok_name,
        "max_seq_length": a.max_seq_length,
        "micro_batch_tokens": budget,
        "max_rows": max_rows,
        "train_examples": s.examples,
        "tokens_per_epoch": s.tokens_total,
        "padded_tokens_per_epoch": padded,  # what the GPU computes on: rows x longest per micro-batch
        "trainable_tokens_per_epoch": s.trainable_tokens,
        "tokens_per_epoch_unfolded": s.tokens_unfolded,
        "fold_ratio": s.fold_ratio,
        "micro_batches_per_epoch": len(plan),
        # Whole conversations, chat template included, before any splitting: the tokenizer's density.
        "chars_per_token": round(chars / max(1, whole), 2),
        "eval_tokens": s.eval_tokens,
    }
    if a.tokens_per_s:
        rates, source = {"given": float(a.tokens_per_s)}, "--tokens-per-s"
    elif a.results:
        rates, source = measured_rates(Path(a.results)), f"measured ({a.results})"
    else:
        rates, source = dict(REFERENCE_RATES), "reference figures from the issue (not re-measured here)"
        notes.append(
            "no measured rate given (--results or --tokens-per-s): projected at the issue's reference rates"
        )
    key = f"project {max_rows}x{a.max_seq_length}"
    projections = {
        name: project_seconds(padded, a.epochs, rate, a.load_seconds)
        for name, rate in rates.items()
        if rate > 0
    }
    return {
        "mode": "project-job",
        "epochs": a.epochs,
        "rate_source": source,
        "rate_for_this_job": key if key in projections else None,
        "dataset_side": dataset_side,
        "projections": projections,
        "load_seconds": a.load_seconds,
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
    from lora_worker.runtime.data.formats import load_conversations

    chars = tokens = 0
    for c in load_conversations(path)[0]:
        msgs = [{"role": m.role, "content": m.content} for m in c.messages]
        text = tok.apply_chat_template(msgs, tokenize=False)
        chars += sum(len(m.content) for m in c.messages)
        tokens += len(tok(text, add_special_tokens=False)["input_ids"])
    return chars, tokens


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_worker bench",
        description="QLoRA throughput and memory of the project's training path vs the seed recipe, "
        "on a Llama-3-shaped NF4 model with random weights (see BENCHMARKS.md).",
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    p.add_argument("--tiny", action="store_true", help="the CPU smoke test: --shape tiny and small budgets")
    for dim in ("layers", "hidden", "inter", "heads", "kv", "vocab"):
        p.add_argument(f"--{dim}", type=int, help=f"override the shape's {dim}")
    p.add_argument(
        "--budgets", help="token budgets per micro-batch (default 2048,8192,16384,32768; tiny: 128,256)"
    )
    p.add_argument(
        "--rows", help="rows per micro-batch, capped so a row is >= --seed-seq tokens (default 1,4; tiny: 2)"
    )
    p.add_argument("--recipes", default="project,seed", help="any of project,packed,seed")
    p.add_argument("--configs", help="explicit list instead of the grid, e.g. seed:1x2048,project:4x2048")
    p.add_argument("--seed-seq", type=int, help="row length of the seed recipe (default 2048; tiny: 128)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per config; the first is warm-up")
    p.add_argument("--cap-gib", type=float, default=79.0, help="GPU memory cap (emulates an 80 GB H100)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/DATE-CARD.json)")
    p.add_argument(
        "--peak-tflops", type=float, help="the card's dense bf16 peak, if not in the built-in table"
    )
    p.add_argument("--config-timeout-s", type=float, help="per-config limit (default 1800; CPU 600)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    g = p.add_argument_group("largest budget")
    g.add_argument(
        "--find-max-budget", action="store_true", help="largest 1-row budget that trains in the cap"
    )
    g.add_argument("--search-start", type=int, default=8192)
    g.add_argument("--search-granularity", type=int, default=1024)
    g.add_argument("--search-limit", type=int, default=1 << 18)
    j = p.add_argument_group("job projection (no model is run)")
    j.add_argument("--project-job", action="store_true", help="project a full job's time from a rate")
    j.add_argument("--dataset", help="dataset file (default ../shared/data/brightrun-242.json)")
    j.add_argument("--tokenizer", help="tokenizer directory (default: the tiny offline tokenizer)")
    j.add_argument("--results", help="a bench JSON whose project-recipe rates to use")
    j.add_argument("--tokens-per-s", type=float, help="a rate to use instead of --results")
    j.add_argument("--load-seconds", type=float, help="model download+load time (default: unknown, left out)")
    j.add_argument("--epochs", type=int, default=3)
    j.add_argument("--max-seq-length", type=int, default=2048, help="the job's max_seq_length (job default)")
    j.add_argument("--batch-size", type=int, default=4, help="the job's rows per micro-batch (job default)")
    j.add_argument("--micro-batch-tokens", type=int, help="default batch-size x max-seq-length")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config JSON in this process
    return p


def _shape(a: argparse.Namespace) -> Shape:
    base = asdict(SHAPES[a.shape])
    for dim in base:
        if getattr(a, dim) is not None:
            base[dim] = getattr(a, dim)
    return Shape(**base)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.one:
        rec = run_one(json.loads(a.one))
        print(RESULT_MARK + json.dumps(rec), flush=True)
        return 0
    if a.project_job:
        doc = project_job(a)
        print(json.dumps(doc, indent=2))
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
        return 0

    if a.tiny:
        a.shape = "tiny"
    tiny = a.shape == "tiny"
    a.seed_seq = a.seed_seq or (128 if tiny else 2048)
    a.steps = max(2, a.steps)  # one warm-up + at least one timed step
    if a.config_timeout_s is None:
        a.config_timeout_s = 600.0 if tiny else 1800.0
    shape = _shape(a)
    runner = Runner(a, shape, ["python", "-m", "lora_worker", "bench", *argv])

    def on_term(signum, frame):  # `timeout` sends SIGTERM: stop the child, keep what was measured
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (an embedding caller): no handler, children still reaped
        previous = None
    try:
        if a.find_max_budget:
            runner.doc["mode"] = "find-max-budget"
            runner.doc["results"] = []

            def fits(budget: int) -> bool:
                rec = runner.run(RunSpec("project", 1, budget), steps=2)
                runner.add(rec)
                print(
                    f"  budget {budget}: {'fits' if rec.get('ok') else 'OOM' if rec.get('oom') else 'failed'}"
                )
                if not rec.get("ok") and not rec.get("oom"):
                    raise RuntimeError(
                        f"budget {budget} failed without running out of memory: {rec.get('error')}"
                    )
                return bool(rec.get("ok"))

            runner.doc["max_budget"] = find_max_budget(
                fits, start=a.search_start, granularity=a.search_granularity, limit=a.search_limit
            )
            print(f"largest 1-row budget within the cap: {runner.doc['max_budget']['max_budget']}")
        else:
            runner.doc["mode"] = "grid"
            if a.configs:
                specs = parse_runs(a.configs)
            else:
                budgets = _ints(a.budgets or ("128,256" if tiny else "2048,8192,16384,32768"))
                rows = _ints(a.rows or ("2" if tiny else "1,4"))
                specs = plan_runs(a.recipes.split(","), budgets, rows, seed_seq=a.seed_seq)
            print(f"{len(specs)} configuration(s): {', '.join(s.label for s in specs)}", flush=True)
            for spec in specs:
                rec = runner.run(spec)
                runner.add(rec)
                print(f"  {spec.label}: " + _one_line(rec), flush=True)
        runner.doc["complete"] = True
    except RuntimeError as err:
        runner.doc["error"] = str(err)
    finally:
        runner.stop_child()
        runner.save()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if runner.doc["results"]:
        print(format_table(runner.doc["results"]))
    if not runner.doc.get("timing_claims", False):
        print("(no timing claims: CPU or tiny-shape run; it checks the code path only)")
    print(f"wrote {runner.out}")
    return 0 if runner.doc["complete"] else 1


def _one_line(rec: dict) -> str:
    if rec.get("ok"):
        return (
            f"{rec['tokens_per_s']:.0f} tok/s, step {rec['median_step_s']:.3f} s, "
            f"peak {rec.get('peak_reserved_gib', '-')} GiB reserved "
            f"(build {rec.get('build_s', '-')} s, wall {rec.get('wall_s', '-')} s)"
        )
    if rec.get("oom"):
        return f"out of memory ({rec.get('failed_phase', '?')}), peak {rec.get('peak_alloc_gib', '-')} GiB"
    return f"failed: {rec.get('error')}"
