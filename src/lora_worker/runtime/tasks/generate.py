"""The `generate` task: a trained adapter's replies to chat prompts, and the base model's with
`compare_base` (the same model with the adapter disabled, so both replies come from one load).

    parse -> find the adapter (job id, folder, or archive URL) -> its base model's config and
    tokenizer -> base weights -> NF4 base exactly as training loads it + the adapter -> replies

Progress goes through the training job's channels: RunPod's `/status` and, with `webhook_url`,
signed webhooks (the same WEBHOOK_SECRET rule). Loading a 70B base takes minutes, so the stages
(`resolving_model`, `downloading_model`, `model_loading`, `model_loaded`) and one update per reply
are sent. Replies are returned together at the end, not streamed (see docs/serving.md: runpod
1.12 decides streaming per handler function, not per job).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_worker.runtime import outcomes, redaction
from lora_worker.runtime.data import PreprocessingCancelled
from lora_worker.runtime.data.examples import end_of_turn_ids
from lora_worker.runtime.delivery.serving import check_adapter_dir
from lora_worker.runtime.device import Device, detect_device, free_accelerator_memory, out_of_memory_message
from lora_worker.runtime.events.progress import CostMeter, Reporter
from lora_worker.runtime.events.runpod_status import RunPodChannel
from lora_worker.runtime.events.webhooks import WebhookSender
from lora_worker.runtime.job import WEBHOOK_DRAIN_S, Stopwatch
from lora_worker.runtime.model.load import load_tokenizer
from lora_worker.runtime.model.prepare import load_for_inference
from lora_worker.runtime.model.resolve import resolve_model_meta, resolve_model_weights
from lora_worker.runtime.net import redact_url
from lora_worker.runtime.outcomes import JobCancelled, JobFailed
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.spec import JobInputError
from lora_worker.runtime.tasks.adapter_source import (
    AdapterSource,
    AdapterSourceError,
    fetch_adapter,
    find_adapter,
    is_url,
)
from lora_worker.runtime.tasks.results import AdapterRef, Exchange, GenerateResult, Reply
from lora_worker.runtime.tasks.spec import GenerateSpec, parse_generate_input

log = logging.getLogger(__name__)
TMP_SUBDIR = "tmp"  # <volume>/tmp/generate-<job_id>-<random>/: a downloaded archive, removed at the end


def run_generate(
    job_input: Any,
    *,
    settings: Settings | None = None,
    runpod_job: dict | None = None,
    cancel: threading.Event | None = None,
    channels: tuple = (),
    default_job_id: str | None = None,
    runpod_send: Callable | None = None,
) -> dict:
    """Run one `generate` request to its end; RunPod's output (a failure in the same shape)."""
    settings = settings or Settings.from_env()
    redaction.install(settings.secrets())
    cancel = cancel or threading.Event()
    runpod_id = (runpod_job or {}).get("id", default_job_id)
    try:
        spec = parse_generate_input(job_input, runpod_job_id=runpod_id)
        outcomes.check_webhook_secret(spec, settings)  # type: ignore[arg-type]  (reads webhook_url only)
    except JobInputError as err:
        return _failed(_job_id_of(job_input, runpod_id), "queued", str(err), [], {}).to_output()
    device = detect_device()
    meter = CostMeter(settings.hourly_rate(device.name))
    reporter = _reporter(spec, settings, meter, runpod_job, channels, runpod_send)
    work_dir = Path(settings.volume_dir) / TMP_SUBDIR / f"generate-{spec.job_id}-{uuid.uuid4().hex[:8]}"
    watch, warnings = Stopwatch(), []
    try:
        result = generate_task(spec, settings, device, reporter, cancel, watch, warnings, work_dir)
    except (JobCancelled, PreprocessingCancelled):
        result = GenerateResult(
            job_id=spec.job_id, status="cancelled", stage=reporter.current_stage,
            message=f"cancelled during {reporter.current_stage}", timings_s=watch.timings, warnings=warnings,
        )  # fmt: skip
    except Exception as err:  # every failure ends as a readable `failed`, never a bare traceback
        log.error("generate %s failed:\n%s", spec.job_id, traceback.format_exc())
        result = _failed(spec.job_id, reporter.current_stage, describe(err), warnings, watch.timings)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        free_accelerator_memory()  # the model is unreferenced once generate_task returned
    result = result.model_copy(
        update={"gpu": device.name, "gpu_seconds": round(meter.seconds(), 2), "cost_usd": meter.cost()}
    )
    output = result.to_output()
    reporter.stage(
        result.status,
        output=output if result.status == "completed" else None,
        error_message=result.error_message or (result.message if result.status == "cancelled" else None),
    )
    reporter.close(WEBHOOK_DRAIN_S)
    return output


def generate_task(
    spec: GenerateSpec,
    settings: Settings,
    device: Device,
    reporter: Reporter,
    cancel: threading.Event,
    watch: Stopwatch,
    warnings: list[str],
    work_dir: Path,
) -> GenerateResult:
    """The request, top to bottom. Raises on failure; returns the completed result."""
    reporter.stage("queued")
    reporter.stage(
        "resolving_model", message=f"finding the adapter and its base model ({_shown(spec.adapter)})"
    )
    with watch("adapter"):
        source = adapter_source(spec, settings.volume_dir, work_dir, cancel, reporter)
    if source.kind == "url":
        reporter.stage("resolving_model", message="fetching the base model's config and tokenizer")
    base_model, revision = base_of(spec, source)
    serving = check_adapter_dir(source.path, lora_name=source.job_id or "adapter")
    if not serving.ok:
        warnings.append("this adapter would not load in vLLM: " + "; ".join(serving.problems))
    with watch("model_config"):
        meta = resolve_model_meta(
            base_model, revision=revision, volume_dir=settings.volume_dir,
            hf_token=settings.hf_token, hf_endpoint=settings.hf_endpoint,
        )  # fmt: skip
        has_tokenizer = (source.path / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(source.path if has_tokenizer else meta.path)
    outcomes.stop_if_cancelled(cancel)
    reporter.stage("downloading_model")
    with watch("model_download"):
        weights = resolve_model_weights(
            meta, volume_dir=settings.volume_dir, hf_token=settings.hf_token,
            hf_endpoint=settings.hf_endpoint, on_progress=lambda p: reporter.progress(download=p),
        )  # fmt: skip
    outcomes.stop_if_cancelled(cancel)
    reporter.stage("model_loading")
    with watch("model_load"):
        loaded = load_for_inference(weights, tokenizer, source.path, settings.volume_dir)
    warnings += loaded.warnings
    reporter.stage("model_loaded", model=loaded.info(device.name))
    replies = reply_all(loaded.model, tokenizer, spec, reporter, cancel, watch)
    return GenerateResult(
        job_id=spec.job_id,
        status="completed",
        stage="completed",
        adapter=AdapterRef(
            source=source.kind,
            job_id=source.job_id,
            path=str(source.path),
            base_model=meta.model_id,
            base_revision=meta.revision,
            archive_sha256=source.archive_sha256,
            serving=serving,
        ),  # fmt: skip
        replies=replies,
        settings=spec.model_dump(include={"max_new_tokens", "temperature", "top_p", "seed", "compare_base"}),
        timings_s=watch.timings,
        warnings=list(dict.fromkeys(warnings)),
    )


def adapter_source(
    spec: GenerateSpec, volume_dir: Path, work_dir: Path, cancel: threading.Event, reporter: Reporter
) -> AdapterSource:
    if not is_url(spec.adapter):
        return find_adapter(spec.adapter, volume_dir)
    reporter.stage("downloading_model", message="downloading the adapter archive")

    def progress(done: int, total: int) -> None:
        reporter.progress(download={"what": "adapter archive", "bytes": done, "total_bytes": total or None})

    return fetch_adapter(
        spec.adapter,
        work_dir,
        expected_sha256=spec.adapter_sha256,
        should_stop=cancel.is_set,
        on_progress=progress,
    )


def base_of(spec: GenerateSpec, source: AdapterSource) -> tuple[str, str | None]:
    """The base model to load: the request's override, else the one the adapter was trained on."""
    if spec.base_model:
        return spec.base_model, spec.base_model_revision
    if not source.base_model:
        raise AdapterSourceError(
            "adapter",
            f"{source.path}/adapter_config.json names no base model; give base_model in the request",
        )
    return source.base_model, spec.base_model_revision or source.base_revision


def reply_all(
    model, tokenizer, spec: GenerateSpec, reporter: Reporter, cancel: threading.Event, watch: Stopwatch
) -> list[Exchange]:
    """Each conversation's adapted reply, then (with compare_base) the base model's, same seed."""
    chats = spec.chats()
    out = []
    for i, chat in enumerate(chats):
        outcomes.stop_if_cancelled(cancel)
        reporter.progress(message=f"generating reply {i + 1} of {len(chats)}", force=True)
        with watch("generate_adapted"):
            adapted = generate_reply(model, tokenizer, chat, spec)
        base = None
        if spec.compare_base:
            with watch("generate_base"), model.disable_adapter():
                base = generate_reply(model, tokenizer, chat, spec)
        out.append(Exchange(index=i, prompt=chat[-1]["content"], adapted=adapted, base=base))
    return out


@torch.no_grad()
def generate_reply(model, tokenizer, messages: list[dict[str, str]], spec: GenerateSpec) -> Reply:
    """One reply: greedy at temperature 0, else sampled with `seed` (so the base and the adapter
    draw from the same random stream). Out of memory is a readable failure naming what to lower."""
    t = time.monotonic()
    device = next(p.device for p in model.parameters())
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    inputs = {k: v.to(device) for k, v in inputs.items()}
    stop_ids = sorted(end_of_turn_ids(tokenizer))
    sampled = spec.temperature > 0
    options: dict[str, Any] = {"do_sample": sampled}
    if sampled:
        options |= {"temperature": spec.temperature, "top_p": spec.top_p}
    else:  # greedy: no sampling knobs, whatever the base's generation_config says
        options |= {"temperature": None, "top_p": None, "top_k": None}
    torch.manual_seed(spec.seed)
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            ids = model.generate(
                **inputs, max_new_tokens=spec.max_new_tokens, eos_token_id=stop_ids,
                pad_token_id=stop_ids[0] if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
                use_cache=True, **options,
            )  # fmt: skip
    except Exception as err:
        message = out_of_memory_message(err)
        if message is None:
            raise
        raise JobFailed(
            f"out of GPU memory generating up to {spec.max_new_tokens} tokens ({message}); lower max_new_tokens "
            "or shorten the conversation"
        ) from None
    new = ids[0, inputs["input_ids"].shape[1] :]
    ended = new.numel() > 0 and int(new[-1]) in stop_ids
    return Reply(
        text=tokenizer.decode(new, skip_special_tokens=True).strip(),
        new_tokens=int(new.numel()),
        seconds=round(time.monotonic() - t, 3),
        finish_reason="stop" if ended else "length",
    )


def _reporter(
    spec: GenerateSpec,
    settings: Settings,
    meter: CostMeter,
    runpod_job: dict | None,
    channels: tuple,
    runpod_send: Callable | None,
) -> Reporter:
    out: list = list(channels)
    if runpod_job is not None:
        out.append(RunPodChannel(runpod_job, send=runpod_send))
    if spec.webhook_url:
        out.append(WebhookSender(spec.webhook_url, settings.webhook_secret or ""))
    return Reporter(str(spec.job_id), meter=meter, channels=out, min_interval_s=settings.progress_interval_s)


def _failed(job_id: str | None, stage: str, text: str, warnings: list[str], timings: dict) -> GenerateResult:
    return GenerateResult(
        job_id=job_id, status="failed", stage=stage, error=text, error_message=text,
        timings_s=timings, warnings=list(dict.fromkeys(warnings)),
    )  # fmt: skip


def describe(err: BaseException) -> str:
    """The failure's message for the sender (errors written for them keep their text as it is)."""
    if isinstance(err, AdapterSourceError):
        return str(err)
    return outcomes.describe(err)


def _job_id_of(raw: Any, runpod_id: str | None) -> str | None:
    value = raw.get("job_id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) else runpod_id


def _shown(ref: str) -> str:
    """The adapter reference for messages: a URL without its query (a presigned signature)."""
    return redact_url(ref) if is_url(ref) else ref
