"""`run_job`: one training job, told as one story.

parse spec -> load data -> resolve model -> load model -> baseline eval -> train -> evaluate ->
save adapter -> report and archive -> upload -> result. Everything the job writes lives under
`<volume>/jobs/<job_id>/`; the final output is also `result.json` there.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora_worker.runtime.events.progress import CostMeter, Reporter, RunPodChannel
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.spec import JobInputError, JobSpec, parse_job_input

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """A failure with a message meant for the person who sent the job."""


class JobCancelled(RuntimeError):
    pass


@dataclass
class Hooks:
    """Test seams: fault injection and extra channels. A real job uses the defaults."""

    inject_oom_above_tokens: int | None = None
    channels: list[Any] = field(default_factory=list)
    runpod_send: Any = None  # replaces the SDK's progress send (tests count calls)


def run_job(
    job_input: Any,
    *,
    runpod_job: dict | None = None,
    settings: Settings | None = None,
    cancel: threading.Event | None = None,
    hooks: Hooks | None = None,
    default_job_id: str | None = None,
) -> dict:
    """Run one job to its end and return its output (RunPod's `{"error": ...}` shape on failure)."""
    settings = settings or Settings.from_env()
    cancel = cancel or threading.Event()
    hooks = hooks or Hooks()
    try:
        spec = parse_job_input(job_input, runpod_job_id=(runpod_job or {}).get("id", default_job_id))
        if spec.webhook_url and not settings.webhook_secret:
            raise JobInputError(
                [
                    "webhook_url: the worker has no WEBHOOK_SECRET set, and unsigned webhooks are not sent; "
                    "set WEBHOOK_SECRET in the endpoint's environment or leave webhook_url out"
                ]
            )
        if spec.webhook_url:
            from lora_worker.runtime.events.webhooks import secret_key

            try:
                secret_key(settings.webhook_secret or "")
            except ValueError:
                raise JobInputError(
                    [
                        "WEBHOOK_SECRET: the worker's secret is not usable (a whsec_ secret must be 'whsec_' "
                        "followed by base64); fix it in the endpoint's environment"
                    ]
                ) from None
    except JobInputError as err:
        return {"error": str(err), "status": "failed", "error_message": str(err)}
    return Job(spec, settings, runpod_job, cancel, hooks).run()


class Job:
    def __init__(self, spec: JobSpec, settings: Settings, runpod_job: dict | None, cancel, hooks: Hooks):
        from lora_worker.runtime.model.load import device_info

        self.spec, self.settings, self.cancel, self.hooks = spec, settings, cancel, hooks
        self.dir = settings.job_dir(spec.job_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device, self.gpu_name = device_info()
        self.meter = CostMeter(settings.hourly_rate(self.gpu_name) if self.device == "cuda" else 0.0)
        self.timings: dict[str, float] = {}
        channels = list(hooks.channels)
        if runpod_job is not None:
            channels.append(RunPodChannel(runpod_job, send=hooks.runpod_send))
        if spec.webhook_url:
            from lora_worker.runtime.events.webhooks import WebhookSender

            channels.append(WebhookSender(spec.webhook_url, settings.webhook_secret or ""))
        self.reporter = Reporter(
            spec.job_id, meter=self.meter, channels=channels, min_interval_s=settings.progress_interval_s
        )
        self.model = None
        self.before: float | None = None
        self.warnings: list[str] = []  # things the sender should know that did not fail the job
        self.report_to = self.loggers()

    # -------------------------------------------------------------------------------- the story

    def run(self) -> dict:
        spec = self.spec
        self.reporter.stage("queued")
        try:
            self.reporter.stage("preprocessing")
            dataset_path = self.fetch_dataset()
            self.check_resumable(self.fingerprint(dataset_path))
            previous = self.previous_result()
            if previous is not None:  # before resolving the model or tokenizing: nothing left to do
                return self.replay(previous)
            data, tokenizer, model_path = self.prepare(dataset_path)
            if spec.dry_run:
                return self.finish(
                    "completed", {"dry_run": True, "dataset": data.summary.as_dict(), "plan": self.plan}
                )
            self.stop_if_cancelled()
            self.load_model(model_path)
            self.stop_if_cancelled()
            before = self.evaluate_baseline(data)
            outcome, history = self.train(data, tokenizer)
            if outcome.stopped_reason == "cancelled":
                raise JobCancelled()
            if outcome.stopped_reason:
                raise JobFailed(
                    f"stopped before the end: {outcome.stopped_reason}; a checkpoint at step "
                    f"{outcome.global_step} is in {self.dir / 'checkpoints'} and resubmitting the same job_id resumes it"
                )
            after, samples = self.evaluate(data, tokenizer)
            adapter = self.save_adapter(tokenizer)
            self.stop_if_cancelled()
            merged = self.merge(adapter)
            report = self.build_report(data, before, after, samples, outcome, history, adapter)
            self.stop_if_cancelled()
            uploads = self.upload(adapter)
            return self.finish("completed", self.output(report, adapter, uploads, outcome, merged))
        except JobCancelled:
            from lora_worker.runtime.training.trainer import latest_checkpoint

            ckpt = latest_checkpoint(self.dir / "checkpoints")
            where = f"cancelled during {self.reporter.status}"
            message = (
                f"{where}; checkpoint at step {ckpt.name.split('-')[-1]} kept, resubmit the job_id to resume"
                if ckpt
                else f"{where}, before any checkpoint"
            )
            return self.finish("cancelled", {"message": message})
        except Exception as err:  # every failure ends as a readable `failed`, never a bare traceback
            log.error("job %s failed:\n%s", spec.job_id, traceback.format_exc())
            return self.finish("failed", {"error": _describe(err)})
        finally:
            self.release()

    # -------------------------------------------------------------------------------- steps

    def stop_if_cancelled(self) -> None:
        """Between stages: a /cancel that came outside training stops here (training checks each step)."""
        if self.cancel.is_set():
            raise JobCancelled()

    def fingerprint(self, dataset_path: Path) -> dict:
        """What decides the trained weights: a checkpoint only resumes a job with the same values."""
        from lora_worker.runtime.delivery.artifacts import sha256_file

        spec = self.spec
        training = spec.training.model_dump(
            exclude={"checkpoint_steps", "checkpoint_minutes", "logging_steps"}
        )
        return {
            "base_model": spec.base_model,
            "base_model_revision": spec.base_model_revision,
            "dataset_sha256": sha256_file(dataset_path),
            "dataset_format": spec.dataset_format,
            "hyperparameters": spec.hyperparameters.model_dump(),
            "training": training,
            "evaluation": spec.evaluation.model_dump(include={"eval_fraction", "max_eval_conversations"}),
        }

    def check_resumable(self, fingerprint: dict) -> None:
        """A job folder from an earlier run must hold the same job, or nothing is reused from it."""
        from lora_worker.runtime.training.trainer import latest_checkpoint

        stored_file = self.dir / "job_fingerprint.json"
        if stored_file.exists() and latest_checkpoint(self.dir / "checkpoints") is not None:
            stored = json.loads(stored_file.read_text())
            changed = sorted(
                k
                for k in _flatten(fingerprint).keys() | _flatten(stored).keys()
                if _flatten(fingerprint).get(k) != _flatten(stored).get(k)
            )
            if changed:
                raise JobFailed(
                    f"job_id {self.spec.job_id!r} already has checkpoints from a different job "
                    f"(changed: {', '.join(changed)}); resubmit with the original input to resume it, "
                    "or use a new job_id"
                )
        _atomic_json(stored_file, fingerprint)

    def previous_result(self) -> dict | None:
        """The stored result of this same job if it already completed (RunPod may deliver a job twice)."""
        f = self.dir / "result.json"
        if not f.exists():
            return None
        previous = json.loads(f.read_text())
        return previous if previous.get("status") == "completed" and not previous.get("dry_run") else None

    def replay(self, previous: dict) -> dict:
        log.info("job %s already completed; returning its stored result", self.spec.job_id)
        self.reporter.stage(
            "completed", output=previous, lora_artifact_path=previous.get("lora_artifact_path")
        )
        self.reporter.close(timeout_s=WEBHOOK_DRAIN_S)
        return previous

    def prepare(self, dataset_path: Path):
        from transformers import AutoTokenizer

        from lora_worker.runtime.data.formats import prepare_dataset

        spec = self.spec
        t = time.monotonic()
        model_path = self.resolve_model()
        self.check_gpu_memory(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # right padding is masked out of the loss anyway
        self.pad_id = tokenizer.pad_token_id
        data = prepare_dataset(
            dataset_path,
            tokenizer,
            fmt=spec.dataset_format,
            fold=spec.training.fold_conversations,
            max_seq_length=spec.hyperparameters.max_seq_length,
            eval_fraction=spec.evaluation.eval_fraction,
            max_eval=spec.evaluation.max_eval_conversations,
            seed=spec.hyperparameters.seed,
            tokenizer_name=str(spec.base_model),
        )
        self.timings["preprocessing"] = round(time.monotonic() - t, 2)
        self.plan = self.estimate(data)
        self.reporter.stage("preprocessing", dataset=data.summary.as_dict(), plan=self.plan)
        return data, tokenizer, model_path

    def fetch_dataset(self) -> Path:
        spec = self.spec
        if spec.dataset_path:
            p = Path(spec.dataset_path)
            if not p.is_absolute() and not p.exists() and (self.settings.volume_dir / p).exists():
                p = self.settings.volume_dir / p
            if not p.is_file():
                raise JobFailed(f"dataset_path: no such file: {spec.dataset_path}")
            return p
        import requests

        target = self.dir / "dataset" / (Path(spec.dataset_url.split("?")[0]).name or "dataset.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        max_bytes = 1 << 30  # 1 GiB: far beyond any chat dataset; refuse rather than fill the volume
        try:
            with requests.get(spec.dataset_url, stream=True, timeout=60) as r:
                r.raise_for_status()
                size = 0
                with open(target, "wb") as f:
                    for chunk in r.iter_content(1 << 20):
                        size += len(chunk)
                        if size > max_bytes:
                            raise JobFailed("dataset_url: the file is larger than 1 GiB")
                        f.write(chunk)
        except requests.RequestException as err:
            raise JobFailed(
                f"dataset_url: download failed: {type(err).__name__}: {_strip_query(str(err))}"
            ) from None
        self.timings["dataset_download"] = round(time.monotonic() - t, 2)
        return target

    def resolve_model(self) -> Path:
        from lora_worker.runtime.model import resolve as model_cache

        resolved = model_cache.resolve_base_model(
            self.spec.base_model,
            volume_dir=self.settings.volume_dir,
            hf_token=self.settings.hf_token,
            hf_endpoint=self.settings.hf_endpoint,
            revision=self.spec.base_model_revision,
            on_progress=lambda p: self.reporter.progress(force=False, model_download=p),
        )
        self.resolved = resolved
        # model_resolve, model_download (and model_lock_wait when another worker was downloading)
        self.timings.update({f"model_{k}": round(v, 2) for k, v in resolved.timings.items()})
        return resolved.path

    def estimate(self, data) -> dict:
        """Steps, and (on a GPU) rough time and cost from the measured 70B rate in BENCHMARKS.md."""
        from lora_worker.runtime.training.trainer import plan_batches, steps_per_epoch

        hp = self.spec.hyperparameters
        plan = plan_batches(data.train, self.train_config())
        per_epoch = steps_per_epoch(len(plan), hp.gradient_accumulation_steps)
        tokens = data.summary.tokens_total * hp.num_epochs
        est = {
            "micro_batches_per_epoch": len(plan),
            "steps_per_epoch": per_epoch,
            # one schedule of all epochs: a step may straddle two epochs, so ceil over the whole
            "total_steps": steps_per_epoch(len(plan) * hp.num_epochs, hp.gradient_accumulation_steps),
            "tokens_to_train": tokens,
        }
        if self.device == "cuda":
            seconds = tokens / ASSUMED_70B_TOKENS_PER_S
            est["estimated_train_seconds_70b"] = round(seconds)
            est["estimated_cost_usd_70b"] = round(seconds / 3600 * self.meter.hourly, 2)
        return est

    def load_model(self, model_path: Path) -> None:
        from lora_worker.runtime.model.load import add_lora, count_params

        spec = self.spec
        hp, tr = spec.hyperparameters, spec.training
        self.reporter.stage("model_loading", base_model=spec.base_model)
        model = self.load_quantized(model_path)
        self.model, self.liger = add_lora(
            model,
            r=hp.lora_r,
            alpha=hp.lora_alpha,
            dropout=hp.lora_dropout,
            seed=hp.seed,
            gradient_checkpointing=tr.gradient_checkpointing,
            upcast_fp32=tr.upcast_fp32,
            liger=tr.liger_kernels,
        )
        self.params = count_params(self.model)
        if self.hooks.inject_oom_above_tokens is not None:
            from lora_worker.runtime.training.callbacks import InjectOOM

            self.oom = InjectOOM(self.hooks.inject_oom_above_tokens)
            self.model.register_forward_pre_hook(self.oom.hook, with_kwargs=True)
        self.reporter.stage(
            "model_loaded",
            model={
                "trainable_params": self.params[0],
                "total_params": self.params[1],
                "liger": self.liger,
                "device": self.device,
                "gpu": self.gpu_name,
            },
            timings_s={k: v for k, v in self.timings.items() if k.startswith("model_")},
        )

    def load_quantized(self, model_path: Path):
        """NF4 base model: from the saved NF4 copy on the volume when there is one (about 40 GB to
        read for 70B instead of 140 GB), else quantized on load and then saved for the next cold start."""
        from lora_worker.runtime.model import resolve as model_cache
        from lora_worker.runtime.model.load import QUANT_SETTINGS, load_base_model

        resolved = self.resolved
        cached = resolved.source != "local_dir"  # a local directory has no revision to key a copy by
        copy = (
            model_cache.find_prequantized(
                self.settings.volume_dir, resolved.model_id, resolved.revision, QUANT_SETTINGS
            )
            if cached
            else None
        )
        t = time.monotonic()
        model = load_base_model(copy or model_path, prequantized=copy is not None)
        self.timings["model_load_prequantized" if copy else "model_load_quantize"] = round(
            time.monotonic() - t, 2
        )
        if cached and copy is None:
            t = time.monotonic()
            try:  # before the first forward pass: bitsandbytes repacks weights on first use on the CPU
                target = model_cache.prequantized_dir(
                    self.settings.volume_dir, resolved.model_id, resolved.revision, QUANT_SETTINGS
                )
                model_cache.save_prequantized(model, self.tokenizer, target)
                self.timings["model_save_prequantized"] = round(time.monotonic() - t, 2)
            except Exception as err:  # a cache miss next time is not worth failing this job
                log.warning("could not save the NF4 copy: %s", err)
        return model

    def check_gpu_memory(self, model_path: Path) -> None:
        """Refuse early, with numbers, when the chosen model and settings cannot fit the GPU."""
        if self.device != "cuda":
            return
        import torch

        from lora_worker.runtime.model import resolve as model_cache

        config = json.loads((model_path / "config.json").read_text())
        need = model_cache.estimate_gpu_memory_gib(
            config, lora_r=self.spec.hyperparameters.lora_r, micro_batch_tokens=self.spec.micro_batch_tokens
        )
        _free, total = torch.cuda.mem_get_info()
        model_cache.check_gpu_memory(need, total / 2**30)

    def _eval_loss(self, data) -> float | None:
        from lora_worker.runtime.training.trainer import eval_loss

        hp = self.spec.hyperparameters
        return eval_loss(
            self.model,
            data.eval,
            self.pad_id,
            token_budget=self.spec.micro_batch_tokens,
            max_rows=hp.batch_size,
        )

    def evaluate_baseline(self, data) -> float | None:
        # A fresh LoRA adapter is the identity (B = 0), so this is the base model's held-out loss.
        t = time.monotonic()
        self.before = self._eval_loss(data)
        self.timings["eval_before"] = round(time.monotonic() - t, 2)
        return self.before

    def train(self, data, tokenizer):
        from lora_worker.runtime.training.callbacks import (
            CheckpointCallback,
            EvalCallback,
            ProgressCallback,
            StopCallback,
            history_from_log,
        )
        from lora_worker.runtime.training.trainer import latest_checkpoint, train

        spec = self.spec
        tr = spec.training
        ckpt_dir = self.dir / "checkpoints"
        resume = latest_checkpoint(ckpt_dir)
        tokens_per_epoch = data.summary.tokens_total
        self.reporter.stage(
            "training",
            resumed_from_step=int(resume.name.split("-")[-1]) if resume else None,
            metrics={"eval_loss_before": self.before},
        )
        progress = ProgressCallback(
            self.reporter.progress,
            tokens_per_epoch=tokens_per_epoch,
            num_epochs=spec.hyperparameters.num_epochs,
        )
        stop = StopCallback(
            self.cancel,
            max_seconds=spec.max_duration_hours * 3600,
            max_cost_usd=spec.max_cost_usd,
            hourly_usd=self.meter.hourly,
            elapsed=self.meter.seconds,
        )
        callbacks = [progress, CheckpointCallback(ckpt_dir, minutes=tr.checkpoint_minutes), stop]
        if data.eval:
            every = tr.eval_steps or max(1, self.plan["steps_per_epoch"])
            callbacks.append(EvalCallback(lambda: self._eval_loss(data), every, progress.record_eval))
        cfg = self.train_config()
        t = time.monotonic()
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        outcome = train(self.model, data.train, self.pad_id, cfg, callbacks, stop)
        self.timings["train"] = round(time.monotonic() - t, 2)
        return outcome, history_from_log(outcome.log_history)

    def train_config(self):
        """The trainer's plain values, from the spec (one place, for the estimate and the run)."""
        from lora_worker.runtime.training.trainer import TrainConfig

        spec = self.spec
        hp, tr = spec.hyperparameters, spec.training
        ckpt_dir = self.dir / "checkpoints"
        return TrainConfig(
            output_dir=ckpt_dir,
            logging_dir=self.dir / "tensorboard",
            num_epochs=hp.num_epochs,
            learning_rate=hp.learning_rate,
            warmup_ratio=hp.warmup_ratio,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            micro_batch_tokens=spec.micro_batch_tokens,
            max_rows=hp.batch_size,
            seed=hp.seed,
            optimizer=tr.optimizer,
            checkpoint_steps=tr.checkpoint_steps,
            logging_steps=tr.logging_steps,
            gradient_checkpointing=tr.gradient_checkpointing,
            packing=tr.packing,
            report_to=self.report_to,
        )

    def loggers(self) -> tuple[str, ...]:
        """TensorBoard always; Weights & Biases too when WANDB_API_KEY is set and wandb is installed."""
        import importlib.util

        if not self.settings.wandb_api_key:
            return ("tensorboard",)
        if importlib.util.find_spec("wandb") is None:
            self.warnings.append(
                "WANDB_API_KEY is set but the optional wandb package is not installed "
                "(pip install 'lora-worker[wandb]'); logged to TensorBoard only"
            )
            return ("tensorboard",)
        return ("tensorboard", "wandb")

    def evaluate(self, data, tokenizer):
        from lora_worker.runtime.training.trainer import generate

        ev = self.spec.evaluation
        self.reporter.stage("evaluating")
        t = time.monotonic()
        after = self._eval_loss(data)
        prompts, refs, ids = sample_prompts(data.eval_conversations, ev.num_samples)
        samples = []
        if prompts:
            adapted = generate(self.model, tokenizer, prompts, max_new_tokens=ev.max_new_tokens)
            with self.model.disable_adapter():
                base = generate(self.model, tokenizer, prompts, max_new_tokens=ev.max_new_tokens)
            samples = [
                {"conversation_id": cid, "prompt": p[-1]["content"], "reference": r, "base": b, "adapted": a}
                for cid, p, r, b, a in zip(ids, prompts, refs, base, adapted, strict=True)
            ]
        self.timings["evaluate"] = round(time.monotonic() - t, 2)
        return after, samples

    def save_adapter(self, tokenizer) -> Path:
        adapter = self.dir / "adapter"
        tmp = self.dir / "adapter.tmp"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)  # carries the chat template, so servers format prompts the same way
        shutil.rmtree(adapter, ignore_errors=True)
        tmp.rename(adapter)
        return adapter

    def merge(self, adapter: Path) -> dict | None:
        if not self.spec.output.merge:
            return None
        import shutil

        from lora_worker.runtime.model.load import (
            available_ram_bytes,
            merge_adapter,
            merge_problem,
            weights_bytes,
        )

        need = weights_bytes(self.resolved.path)
        problem = merge_problem(
            need, ram_bytes=available_ram_bytes(), disk_bytes=shutil.disk_usage(self.dir).free
        )
        if problem:
            return {"ok": False, "error": problem}
        t = time.monotonic()
        out = merge_adapter(self.resolved.path, adapter, self.dir / "merged")
        self.timings["merge"] = round(time.monotonic() - t, 2)
        return {"ok": True, "path": str(out), "size_bytes": weights_bytes(out)}

    def build_report(self, data, before, after, samples, outcome, history, adapter) -> dict:
        from lora_worker.runtime.delivery.artifacts import archive_dir
        from lora_worker.runtime.delivery.report import write_report
        from lora_worker.runtime.training.trainer import perplexity, resolve_optimizer

        spec = self.spec
        peak = None
        if self.device == "cuda":
            import torch

            peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        tokens_trained = int(outcome.epoch * data.summary.tokens_total)
        tokens_this_run = int(outcome.epochs_this_run * data.summary.tokens_total)  # rate: this process only
        report = {
            "job_id": spec.job_id,
            "status": "completed",
            "base_model": spec.base_model,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "dataset": data.summary.as_dict(),
            "settings": {
                **spec.hyperparameters.model_dump(),
                **spec.training.model_dump(),
                "micro_batch_tokens": outcome.micro_batch_tokens,
                "gradient_accumulation_steps": outcome.gradient_accumulation_steps,
                # what "auto" became on this machine
                "optimizer_used": resolve_optimizer(spec.training.optimizer, self.device),
                "liger_used": self.liger,
                "device": self.device,
                "gpu": self.gpu_name,
            },
            "metrics": {
                "train_loss": outcome.train_loss,
                "eval_loss_before": before,
                "eval_loss_after": after,
                "perplexity_before": perplexity(before),
                "perplexity_after": perplexity(after),
                "steps": outcome.global_step,
                "epochs": round(outcome.epoch, 4),
                "tokens_trained": tokens_trained,
                "tokens_per_second": round(tokens_this_run / outcome.train_seconds, 1)
                if outcome.train_seconds
                else None,
                "peak_gpu_memory_gib": peak,
                "padding_fraction": outcome.padding_fraction,
            },
            # the held-out curve runs from the base model (step 0) to the final adapter
            "history": {
                "train": history["train"],
                "eval": [{"step": 0, "eval_loss": before}] * (before is not None)
                + [e for e in history["eval"] if e["step"] not in (0, outcome.global_step)]
                + [{"step": outcome.global_step, "eval_loss": after}] * (after is not None),
            },
            "samples": samples,
            "timings_s": dict(self.timings),
            "gpu_seconds": round(self.meter.seconds(), 1),
            "cost_usd": self.meter.cost(),
            "eval_cost_usd": round(
                (self.timings.get("eval_before", 0) + self.timings.get("evaluate", 0))
                / 3600
                * self.meter.hourly,
                4,
            ),
            "adapter": None,
        }
        report_dir = self.dir / "report"
        paths = write_report(report_dir, report)
        archive = archive_dir(
            {"adapter": adapter, "report": report_dir}, self.dir / f"{spec.job_id}-adapter.tar.gz"
        )
        report["adapter"] = {
            "path": str(adapter),
            "archive": archive["path"],
            "sha256": archive["sha256"],
            "size_bytes": archive["size_bytes"],
        }
        write_report(report_dir, report)  # the copy on the volume names the archive; the archived one cannot
        self.report_paths = {k: str(v) for k, v in paths.items()}
        return report

    def upload(self, adapter: Path) -> dict:
        out = self.spec.output
        if not (out.upload_url or out.hf_repo):
            return {}
        from lora_worker.runtime.delivery.artifacts import upload_presigned, upload_to_hf_hub

        self.reporter.stage("uploading")
        t = time.monotonic()
        results: dict[str, Any] = {}
        archive = self.dir / f"{self.spec.job_id}-adapter.tar.gz"
        if out.upload_url:
            from lora_worker.runtime.delivery.artifacts import sha256_file

            results["presigned"] = upload_presigned(archive, out.upload_url, sha256=sha256_file(archive))
        if out.hf_repo:
            if not self.settings.hf_token:
                results["hf_hub"] = {
                    "ok": False,
                    "repo_id": out.hf_repo,
                    "error": "HF_TOKEN is not set on the worker",
                }
            else:
                results["hf_hub"] = upload_to_hf_hub(
                    adapter,
                    out.hf_repo,
                    token=self.settings.hf_token,
                    endpoint=self.settings.hf_endpoint,
                    commit_message=f"LoRA adapter from job {self.spec.job_id}",
                )
        self.timings["upload"] = round(time.monotonic() - t, 2)
        return results

    def output(self, report: dict, adapter: Path, uploads: dict, outcome, merged: dict | None) -> dict:
        warnings = self.warnings + [
            f"upload to {k} failed: {v.get('error')}; the adapter is on the volume at {adapter}"
            for k, v in uploads.items()
            if not v.get("ok")
        ]
        if merged and not merged["ok"]:
            warnings.append(merged["error"])
        return {
            "lora_artifact_path": str(adapter),
            "merged": merged,
            "adapter": report["adapter"],
            "report": self.report_paths,
            "metrics": report["metrics"],
            "dataset": report["dataset"],
            "timings_s": report["timings_s"],
            "gpu_seconds": report["gpu_seconds"],
            "cost_usd": report["cost_usd"],
            "resumed_from_step": outcome.resumed_from_step,
            "recoveries": outcome.recoveries,
            "uploads": uploads,
            "warnings": warnings,
        }

    # -------------------------------------------------------------------------------- end

    def finish(self, status: str, body: dict) -> dict:
        self.timings["total"] = round(self.meter.seconds(), 2)
        result = {
            "job_id": self.spec.job_id,
            "status": status,
            "gpu": self.gpu_name,
            "gpu_seconds": round(self.meter.seconds(), 1),
            "cost_usd": self.meter.cost(),
            **body,
        }
        result.setdefault("timings_s", dict(self.timings))
        if status == "failed":
            result["error_message"] = body["error"]
        elif "error" in result:
            result.pop("error")
        _atomic_json(self.dir / "result.json", result)
        self.reporter.stage(
            status,
            output=result if status == "completed" else None,
            lora_artifact_path=result.get("lora_artifact_path"),
            error_message=result.get("error_message"),
        )
        self.reporter.close(timeout_s=WEBHOOK_DRAIN_S)
        return result

    def release(self) -> None:
        """Let go of the model so the next job on this worker starts with a free GPU."""
        from lora_worker.runtime.model.load import free_memory

        self.model = None
        free_memory()


# How long the end of a job may wait for webhook/progress receivers (seconds): a receiver that never
# answers cannot hold the worker longer than this.
WEBHOOK_DRAIN_S = 30.0
# Tokens/s assumed for time and cost estimates on a GPU before a job has measured its own rate
# (the 70B reference rate for the project's recipe at 8K tokens per micro-batch; see BENCHMARKS.md).
ASSUMED_70B_TOKENS_PER_S = 1100.0


def sample_prompts(conversations, n: int) -> tuple[list[list[dict]], list[str], list[str]]:
    """For up to n held-out conversations: the context before a middle target turn, and that target."""
    prompts, refs, ids = [], [], []
    for c in conversations[:n]:
        targets = [i for i, m in enumerate(c.messages) if m.train]
        if not targets:
            continue
        t = targets[len(targets) // 2]
        prompts.append([{"role": m.role, "content": m.content} for m in c.messages[:t]])
        refs.append(c.messages[t].content)
        ids.append(c.id)
    return prompts, refs, ids


def _describe(err: BaseException) -> str:
    from lora_worker.runtime.data.formats import DatasetError

    if isinstance(err, JobFailed | DatasetError | JobInputError):
        return str(err)
    name = type(err).__name__
    known = {
        "ModelResolutionError": "",
        "OutOfMemoryError": "out of memory: ",
    }
    prefix = known.get(name)
    if prefix is not None:
        return f"{prefix}{err}"
    return f"{name}: {err}"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _strip_query(text: str) -> str:
    import re

    return re.sub(r"\?[^\s'\"]*", "?<redacted>", text)


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_worker run", description="Run one job from a JSON file.")
    p.add_argument(
        "input", help="a JSON file holding {'input': {...}} (like test_input.json) or the input itself"
    )
    p.add_argument("--job-id", default="local-job", help="job id when the input names none")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raw = json.loads(Path(a.input).read_text())
    job_input = raw.get("input", raw) if isinstance(raw, dict) else raw
    result = run_job(job_input, default_job_id=a.job_id)
    print(json.dumps(result, indent=2, default=str))
    return 0 if result.get("status") == "completed" else 1
