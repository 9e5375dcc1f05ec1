"""The Python side of benchmarks/gpu_check.sh: each subcommand is one step of the check.

    env         versions, where each package is imported from, the device; work/device.json
    stage       a Llama of the shape in LAYERS HIDDEN INTER HEADS KV VOCAB (random bf16 weights),
                saved as a RunPod cached model: <volume>/huggingface-cache/hub/models--ORG--NAME/
                snapshots/<sha>/ + refs/main; work/stage.json
    job-input   the job JSON the killed run and its resubmission share
    after-kill  what the killed run left: the newest complete checkpoint, the NF4 copy; work/run1.json
    oom         a job in this process whose CUDA allocator is capped, once the model is loaded, so
                that its micro-batches cannot fit; work/oom.json
    summary     PASS/FAIL per part and the files a reader needs, into the output folder
                (gpu_check_summary.py: every check is read from what the jobs wrote)

Run by the script as `python benchmarks/gpu_check.py <step> ...`, with src/ on PYTHONPATH. torch
and transformers are imported inside the steps that use them, so job-input and after-kill take a
second, not the ten an import of torch takes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from gpu_check_summary import JOB_ID, cmd_summary, newest_complete_step, nf4_copies, nf4_state

from lora_worker.runtime.files import atomic_write_json, read_json

MODEL_ID = "lw-gpu-check/llama3-70b-width"
SNAPSHOT_SHA = hashlib.sha1(b"lora-worker gpu check").hexdigest()  # any 40-hex commit name
OOM_JOB_ID = "gpu-check-oom"
GIB = 2**30
# The distributions whose versions decide which code paths run (carried as wheels or the machine's).
VERSIONED = (
    "torch",
    "triton",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "liger-kernel",
    "pydantic",
    "pydantic-core",
    "huggingface-hub",
    "tokenizers",
    "safetensors",
    "numpy",
)
IMPORTED = ("transformers", "peft", "bitsandbytes", "liger_kernel", "pydantic", "lora_worker")


# ------------------------------------------------------------------------------------------ helpers


def write_json(path: Path, doc: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(path), doc, indent=1)


def shape_from_env(env: dict[str, str] | None = None) -> dict[str, int]:
    env = os.environ if env is None else env
    return {k.lower(): int(env[k]) for k in ("LAYERS", "HIDDEN", "INTER", "HEADS", "KV", "VOCAB")}


# ------------------------------------------------------------------------------------------ env


def unmet_requirements(wheel_dir: Path) -> list[str]:
    """Requirements of the carried distributions that what is installed does not meet."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    out = []
    for wheel in sorted(wheel_dir.glob("*.whl")):
        dist = wheel.name.split("-")[0]
        try:
            requires = md.requires(dist) or []
        except md.PackageNotFoundError:
            out.append(f"{dist}: carried but not installed")
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                out.append(f"{dist} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(Version(have), prereleases=True):
                out.append(f"{dist} needs {req}: {have} installed")
    return out


def cmd_env(a: argparse.Namespace) -> int:
    import torch

    versions = {}
    for dist in VERSIONED:
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    origin = {}
    for mod in IMPORTED:
        spec = importlib.util.find_spec(mod)
        origin[mod] = str(Path(spec.origin).parent) if spec and spec.origin else None
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "versions": versions,
        "imported_from": origin,
        "torch_cuda_build": torch.version.cuda,
        "cuda": torch.cuda.is_available(),
    }
    if info["cuda"]:
        p = torch.cuda.get_device_properties(0)
        info.update(
            device=p.name,
            total_gib=round(p.total_memory / GIB, 2),
            capability=f"{p.major}.{p.minor}",
            multiprocessors=p.multi_processor_count,
        )
    else:
        info["device"] = "cpu"
    wheels = Path(a.wheels) if a.wheels else None
    info["unmet_requirements"] = unmet_requirements(wheels) if wheels and wheels.is_dir() else []
    write_json(Path(a.work) / "device.json", info)
    print(
        f"python {info['python']}  torch CUDA build {info['torch_cuda_build']}  CUDA available {info['cuda']}"
    )
    print(
        f"device {info['device']}"
        + (f" ({info['total_gib']} GiB, sm {info['capability']})" if info["cuda"] else "")
    )
    for dist, v in versions.items():
        print(f"  {dist:16s} {v or 'MISSING'}")
    for mod, where in origin.items():
        print(f"  {mod:16s} from {where}")
    for line in info["unmet_requirements"]:
        print(f"  UNMET: {line}")
    return 0


# ------------------------------------------------------------------------------------------ stage


def cmd_stage(a: argparse.Namespace) -> int:
    """Write the model where RunPod's model cache puts it, with refs/main naming the snapshot."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from lora_worker.tools.tiny_model import build_tokenizer

    t0 = time.monotonic()
    shape = shape_from_env()
    repo = Path(a.volume) / "huggingface-cache" / "hub" / f"models--{MODEL_ID.replace('/', '--')}"
    snap = repo / "snapshots" / SNAPSHOT_SHA
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT_SHA)
    tok = build_tokenizer()
    if len(tok) > shape["vocab"]:
        raise SystemExit(f"VOCAB {shape['vocab']} is smaller than the tokenizer's {len(tok)} tokens")
    cfg = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # drawn in bf16: the fp32 model never exists
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(snap, max_shard_size="5GB")
    tok.save_pretrained(snap)
    size = sum(f.stat().st_size for f in snap.glob("*.safetensors"))
    params = sum(p.numel() for p in model.parameters())
    rec = {
        "model_id": MODEL_ID,
        "snapshot": str(snap),
        "shape": shape,
        "params": params,
        "bf16_gb": round(size / 1e9, 3),
        "seconds": round(time.monotonic() - t0, 1),
        "nf4_copy_before_first_run": bool(nf4_copies(Path(a.volume))),
    }
    write_json(Path(a.work) / "stage.json", rec)
    print(
        f"staged {params / 1e6:,.1f} M parameters ({size / 1e9:.2f} GB bf16) at {snap} in {rec['seconds']} s"
    )
    return 0


# ------------------------------------------------------------------------------------------ job input


def job_input(
    job_id: str, dataset: str, *, rows: int, maxlen: int, epochs: int, liger: str, oom: bool = False
) -> dict[str, Any]:
    """The job: the real spec, small evaluation; the OOM job trains one epoch with no held-out set
    (its first micro-batches must run out of memory in training, not in an evaluation)."""
    spec: dict[str, Any] = {
        "job_id": job_id,
        "dataset_path": dataset,
        "base_model": MODEL_ID,
        "hyperparameters": {
            "num_epochs": epochs,
            "max_seq_length": maxlen,
            "batch_size": rows,
            "gradient_accumulation_steps": 1,
        },
        "training": {"liger_kernels": liger, "optimizer": "auto", "checkpoint_steps": 2, "eval_steps": 1000},
        "evaluation": {
            "num_samples": 2,
            "max_new_tokens": 16,
            "num_scenarios": 0,
            "judge": "none",
            "forgetting_probe": False,
        },
        "output": {"keep_checkpoints": True},  # the optimizer state is read after the job
    }
    if oom:
        spec["training"]["checkpoint_steps"] = 1000
        spec["evaluation"].update(eval_fraction=0.0, num_samples=0)
        spec["output"] = {"keep_checkpoints": False}
    return {"input": spec}


def cmd_job_input(a: argparse.Namespace) -> int:
    doc = job_input(
        a.job_id,
        str(Path(a.dataset).resolve()),
        rows=a.rows,
        maxlen=a.maxlen,
        epochs=a.epochs,
        liger=a.liger,
        oom=a.oom,
    )
    write_json(Path(a.out), doc)
    return 0


# ------------------------------------------------------------------------------------------ after the kill


def cmd_after_kill(a: argparse.Namespace) -> int:
    job = Path(a.volume) / "jobs" / JOB_ID
    rec = {
        "killed": a.killed == "yes",
        "returncode": a.returncode,
        "seconds_to_kill": a.seconds,
        "checkpoint_at_kill": newest_complete_step(job / "checkpoints"),
        "checkpoints_at_kill": sorted(p.name for p in (job / "checkpoints").glob("checkpoint-*")),
        "result_written": (job / "result.json").exists(),
        "nf4_copy": nf4_state(Path(a.volume)),
    }
    write_json(Path(a.work) / "run1.json", rec)
    print(json.dumps(rec, default=str))
    return 0


# ------------------------------------------------------------------------------------------ OOM


class CapAtTraining:
    """A progress channel of the job: when the job reaches its training stage (model loaded, baseline
    measured, nothing trained), it caps the CUDA allocator at what is allocated then plus
    `factor` x the extra memory the resubmitted run needed at its peak (its training or its
    evaluation, whichever was larger). The OOM job's micro-batches hold about four times as many
    tokens as that run's (OOM_ROWS = 4 x ROWS), so the first of them cannot fit; quarters of them
    can, with room to spare."""

    def __init__(self, reference_peak_gib: float | None, factor: float):
        self.reference_peak_gib, self.factor = reference_peak_gib, factor
        self.record: dict[str, Any] = {"applied": False, "reference_peak_gib": reference_peak_gib}

    def send(self, event: dict, *, kind: str) -> None:
        if event.get("stage") != "training" or self.record["applied"] or "error" in self.record:
            return
        try:
            self._cap()
        except Exception as err:  # the job's reporter would log only the type: keep the message
            self.record["error"] = f"{type(err).__name__}: {err}"

    def _cap(self) -> None:
        import torch

        if not torch.cuda.is_available() or not self.reference_peak_gib:
            self.record["why_not"] = (
                "no CUDA device" if not torch.cuda.is_available() else "no reference peak"
            )
            return
        allocated = torch.cuda.memory_allocated(0) / GIB
        extra = max(self.reference_peak_gib - allocated, 0.5)
        cap = allocated + self.factor * extra
        total = torch.cuda.get_device_properties(0).total_memory / GIB
        torch.cuda.empty_cache()  # the cap counts reserved memory: start from what is allocated
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)
        self.record.update(
            applied=True,
            allocated_at_training_gib=round(allocated, 2),
            cap_gib=round(cap, 2),
            factor=self.factor,
        )
        print(
            f"OOM part: allocator capped at {cap:.2f} GiB ({allocated:.2f} GiB allocated + "
            f"{self.factor} x {extra:.2f} GiB)",
            flush=True,
        )

    def close(self, timeout_s: float) -> bool:
        return True


def cmd_oom(a: argparse.Namespace) -> int:
    import torch

    from lora_worker.runtime.job import run_job
    from lora_worker.runtime.settings import Settings

    run2 = read_json(Path(a.volume) / "jobs" / JOB_ID / "result.json") or {}
    peak = (run2.get("metrics") or {}).get("peak_gpu_memory_gib")
    channel = CapAtTraining(peak, a.factor)
    job = read_json(Path(a.job))["input"]
    settings = Settings.from_env({**os.environ, "VOLUME_DIR": str(a.volume)})
    t0 = time.monotonic()
    result = run_job(job, settings=settings, channels=(channel,))
    rec = {
        "cap": channel.record,
        "seconds": round(time.monotonic() - t0, 1),
        "result": result,
        "cuda": torch.cuda.is_available(),
    }
    write_json(Path(a.work) / "oom.json", rec)
    m = result.get("metrics") or {}
    print(
        f"OOM part: status {result.get('status')}, {len(result.get('recoveries') or [])} recoveries, "
        f"steps {m.get('steps')}/{m.get('total_steps')}, error {result.get('error_message')}"
    )
    return 0


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("env")
    s.add_argument("--work", required=True)
    s.add_argument("--wheels", help="the carried wheels' folder, to check their requirements")
    s = sub.add_parser("stage")
    s.add_argument("--work", required=True)
    s.add_argument("--volume", required=True)
    s = sub.add_parser("job-input")
    for name in ("--out", "--dataset", "--job-id", "--liger"):
        s.add_argument(name, required=True)
    for name in ("--rows", "--maxlen", "--epochs"):
        s.add_argument(name, type=int, required=True)
    s.add_argument("--oom", action="store_true")
    s = sub.add_parser("after-kill")
    for name in ("--work", "--volume", "--killed"):
        s.add_argument(name, required=True)
    s.add_argument("--returncode", type=int)
    s.add_argument("--seconds", type=int)
    s = sub.add_parser("oom")
    for name in ("--work", "--volume", "--job"):
        s.add_argument(name, required=True)
    s.add_argument("--factor", type=float, default=1.5)
    s = sub.add_parser("summary")
    for name in ("--work", "--out"):
        s.add_argument(name, required=True)
    s.add_argument("--bench-configs", default="")
    s.add_argument("--skip-bench", action="store_true")
    a = p.parse_args(argv)
    commands = {
        "env": cmd_env,
        "stage": cmd_stage,
        "job-input": cmd_job_input,
        "after-kill": cmd_after_kill,
        "oom": cmd_oom,
        "summary": cmd_summary,
    }
    return commands[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
