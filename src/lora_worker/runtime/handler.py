"""The RunPod handler: one job at a time, cancellable, never a bare traceback.

One endpoint, three tasks, chosen by the input's `task` (training when absent): `train`
(`job.run_job`), `generate` (a trained adapter's replies, `tasks.generate`) and `list` (the adapters
on the volume, `tasks.listing`); any other `task` is an error naming the valid ones.

RunPod's SDK runs an async handler as an asyncio task and cancels that task on `/cancel` (and on
its execution timeout). The task runs in a worker thread; on cancellation the handler sets the
stop flag, waits for the thread to checkpoint (training), report `cancelled` and free the GPU, and
then re-raises the cancellation as the SDK requires, so the next job starts on a clean worker.

The handler is a coroutine, not a generator: runpod 1.12 streams only when the handler function
itself is a generator, for every job, which would turn a training job's output into a list and
drop the per-job `refresh_worker`; so `generate` returns its replies with the result.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from lora_worker.runtime.device import detect_device
from lora_worker.runtime.files import dumps_strict
from lora_worker.runtime.job import run_job
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.spec import JobInputError
from lora_worker.runtime.tasks.generate import run_generate
from lora_worker.runtime.tasks.listing import run_list
from lora_worker.runtime.tasks.spec import task_of

log = logging.getLogger(__name__)
_settings: Settings | None = None


def settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = Settings.from_env()  # read once per worker process
    return _settings


async def handler(job: dict) -> dict:
    cancel = threading.Event()
    env = settings()
    # Outside a RunPod queue (`python handler.py` on test_input.json) there is no /status to update.
    runpod_job = job if env.runpod_queue else None
    task = asyncio.ensure_future(
        asyncio.to_thread(
            run_task,
            job.get("input"),
            runpod_job=runpod_job,
            env=env,
            cancel=cancel,
            default_job_id=job.get("id"),
        )
    )
    try:
        result = await asyncio.shield(task)
    except asyncio.CancelledError:
        log.info("job %s: cancel received; stopping at the next optimizer step", job.get("id"))
        cancel.set()
        # Wait for the thread to checkpoint, report `cancelled` and release the model, even if a
        # second stop (cancel plus timeout) arrives meanwhile: returning early would let the SDK
        # hand this GPU a new job while the old one is still training on it.
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                continue
        raise
    if not env.runpod_queue:
        print(dumps_strict(result), flush=True)  # local test mode: the output, once
        return result
    if detect_device().is_cuda and result.get("task", "train") == "train":
        # A fresh worker process for the next job: bitsandbytes' paged optimizer memory and Liger's
        # class-level patches outlive a training job inside one process (the SDK pops this key).
        return {**result, "refresh_worker": True}
    return result


def run_task(
    job_input: Any,
    *,
    runpod_job: dict | None,
    env: Settings,
    cancel: threading.Event,
    default_job_id: str | None,
) -> dict:
    """The job's task, run to its end: RunPod's output (failures included, in the same shape)."""
    try:
        task = task_of(job_input)
    except JobInputError as err:
        return {"job_id": default_job_id, "status": "failed", "stage": "queued", "error": str(err),
                "error_message": str(err)}  # fmt: skip
    if task == "list":
        return run_list(job_input, settings=env, default_job_id=default_job_id)
    run = run_generate if task == "generate" else run_job
    return run(job_input, runpod_job=runpod_job, settings=env, cancel=cancel, default_job_id=default_job_id)


def concurrency(current: int) -> int:
    return 1  # one job per worker: the whole GPU belongs to it
