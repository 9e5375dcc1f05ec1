"""Multi-GPU jobs on the CPU: two gloo processes under torchrun's launcher train the same optimizer
steps as one process; checkpoints move between 1 and 2 processes; /cancel stops every rank; a
killed rank fails the job naming it; an out-of-memory error on one rank relaunches the group with
smaller micro-batches.

Per-step losses of two processes match one process within 1e-3 (absolute, on losses near 6.5):
the same examples in every step, the loss normalised over the step's tokens on both ranks; what
differs is only the order in which gradients are summed (DDP's all-reduce), in bf16 weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, small_job, two_gpus

from lora_worker.runtime.device import Device
from lora_worker.runtime.job import run_job
from lora_worker.runtime.jobdir import JobPaths
from lora_worker.runtime.model.memory import GpuMemoryError, estimate_memory
from lora_worker.runtime.parallel.launch import describe_end, group_environment, group_size
from lora_worker.runtime.parallel.rundir import GroupDir, LaunchRequest, RankExit
from lora_worker.runtime.plan import check_fits_each, padding_warnings
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.spec import JobInputError, parse_job_input
from lora_worker.runtime.training.checkpoints import COMPLETE_MARKER, step_of
from lora_worker.runtime.training.oom import Recovery
from lora_worker.runtime.training.ranks import shard_schedule

TOLERANCE = 1e-3
JOB_END_S = 240  # a job on the tiny model, two processes, on a busy 2-core machine


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize("accumulation", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_step_splits_across_ranks_without_changing_its_examples(accumulation, world):
    schedule = [[i] for i in range(11)]  # 11 micro-batches: the last step is short
    sharded, per_rank = shard_schedule(schedule, accumulation, world)
    assert len(sharded) % world == 0
    # read as the Trainer reads it: rank r gets items r, r + world, ...; a step is per_rank of them
    per_rank_items = [sharded[r::world] for r in range(world)]
    steps = -(-len(schedule) // accumulation)
    for step in range(steps):
        trained = sorted(
            i for items in per_rank_items for b in items[step * per_rank : (step + 1) * per_rank] for i in b
        )
        assert trained == list(range(step * accumulation, min(len(schedule), (step + 1) * accumulation)))
    assert sum(len(items) for items in per_rank_items) == len(sharded)


def test_padding_is_named_in_the_plan():
    assert padding_warnings(4, 2) == []
    (text,) = padding_warnings(3, 2)
    assert "gradient_accumulation_steps 3 is not a multiple of the 2 processes" in text
    assert "1 empty micro-batch," in text and "75%" in text and "4 would keep every one busy" in text


def test_processes_default_to_the_visible_gpus_and_cannot_exceed_them():
    spec = parse_job_input({"dataset_path": "x.json", "job_id": "j"})
    assert group_size(spec, Device("cpu", "cpu")) == 1
    assert group_size(spec, Device("cuda", "H100", count=4)) == 4
    two = parse_job_input({"dataset_path": "x.json", "job_id": "j", "distributed": {"num_processes": 2}})
    assert group_size(two, Device("cpu", "cpu")) == 2  # gloo processes on the CPU
    with pytest.raises(
        JobInputError, match="distributed.num_processes: 2 processes need 2 GPUs; this worker has 1"
    ):
        group_size(two, Device("cuda", "H100", count=1))


def test_the_memory_pre_flight_is_per_card_and_says_more_gpus_do_not_help():
    llama3_70b = {
        "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672, "vocab_size": 128256,
        "num_attention_heads": 64, "num_key_value_heads": 8,
    }  # fmt: skip
    memory = estimate_memory(llama3_70b, lora_r=16, micro_batch_tokens=8192)
    small = Device("cuda", "NVIDIA L4", count=4, free_bytes=22 * 1024**3)
    with pytest.raises(GpuMemoryError) as one:
        check_fits_each(memory, small, 1)
    assert "More GPUs" not in str(one.value)
    with pytest.raises(GpuMemoryError, match="with 4 processes each GPU holds the whole model"):
        check_fits_each(memory, small, 4)
    check_fits_each(memory, Device("cuda", "H100", count=2, free_bytes=79 * 1024**3), 2)  # fits each card


def test_the_ranks_get_the_settings_and_the_input_through_their_environment(tmp_path):
    settings = Settings.from_env(
        {"VOLUME_DIR": str(tmp_path), "WEBHOOK_SECRET": "s3cret", "KEEP_CHECKPOINTS": "1"}
    )
    upload = "https://bucket.example.com/a.tar.gz?X-Amz-Signature=abc123"
    request = LaunchRequest({"job_id": "j", "output": {"upload_url": upload}}, {"id": "rp"}, None, 2)
    env = group_environment(settings, request, base={"PATH": "/bin"})
    assert Settings.from_env(env) == settings
    assert LaunchRequest.from_env(env) == request
    assert env["OMP_NUM_THREADS"] == "1"


def test_a_group_that_died_says_which_rank_where_and_what_is_kept(tmp_path):
    paths = JobPaths(tmp_path / "job", "job")
    (paths.checkpoints / "checkpoint-4").mkdir(parents=True)
    (paths.checkpoints / "checkpoint-4" / COMPLETE_MARKER).write_text("{}")
    gdir = GroupDir(paths.root / "group")
    gdir.root.mkdir()
    (gdir.progress).write_text(json.dumps({"stage": "training", "step": 5, "total_steps": 9}))
    (gdir.group_exit).write_text(
        json.dumps({"failures": [{"rank": 1, "exitcode": -9}, {"rank": 0, "exitcode": -15}]})
    )
    end = describe_end(gdir, 2, paths, 1, cancelled=False)
    assert end.output is None and end.stage == "training" and not end.recoveries
    assert end.message == (
        "rank 1 of 2 was killed by SIGKILL during training (step 5 of 9); checkpoint at step 4 kept, "
        "resubmit the same job_id to resume"
    )
    gdir.write_exit(RankExit(1, "error", "disk I/O error"))
    assert describe_end(gdir, 2, paths, 1, cancelled=False).message.startswith(
        "rank 1 of 2 failed: disk I/O error during training (step 5 of 9)"
    )
    oom = Recovery(5, 512, 4, 2, "OutOfMemoryError: CUDA out of memory")
    gdir.write_exit(RankExit(0, "out_of_memory", "rank 0 ran out of memory at step 5", (oom,)))
    assert describe_end(gdir, 2, paths, 1, cancelled=False).recoveries == (oom,)


# ----------------------------------------------------------------------------- whole jobs


def test_a_dry_run_plans_for_every_process_without_launching_them(tiny_model, small_dataset, tmp_path):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path), "GPU_HOURLY_USD": "4.0"})
    result = run_job({**job(tiny_model, small_dataset, "plan", 2), "dry_run": True}, settings=settings)
    assert result["status"] == "completed" and result["dry_run"], result
    plan = result["plan"]
    assert (plan["processes"], plan["per_process_accumulation"]) == (2, 1)
    assert any("data parallel" in a for a in plan["assumptions"])
    for estimate in plan["estimates"]:  # every GPU of the job is paid for
        assert estimate["gpus"] == 2
        assert estimate["cost_usd"] == pytest.approx(estimate["seconds"]["total"] / 3600 * 4.0 * 2, abs=0.01)
    assert result["gpu"] == "2x cpu" and not (tmp_path / "jobs" / "plan" / "group.log").exists()


def job(tiny_model, small_dataset, job_id: str, processes: int) -> dict:
    """Two epochs, two micro-batches per optimizer step (one per rank on two), a checkpoint every 2 steps."""
    return small_job(
        tiny_model,
        small_dataset,
        job_id=job_id,
        hyperparameters={"num_epochs": 3, "gradient_accumulation_steps": 2},
        training={"checkpoint_steps": 2, "eval_steps": 1000},
        evaluation={"num_samples": 0},
        output={"keep_checkpoints": True},
        distributed={"num_processes": processes},
    )


def losses(result: dict) -> dict[int, float]:
    report = json.loads(Path(result["report"]["json"]).read_text())
    return {r["step"]: r["loss"] for r in report["history"]["train"]}


def assert_same_curve(result: dict, reference: dict) -> None:
    ref, got = losses(reference), losses(result)
    assert sorted(got) == sorted(ref)
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], abs=TOLERANCE), step
    assert result["metrics"]["eval_loss_after"] == pytest.approx(
        reference["metrics"]["eval_loss_after"], abs=TOLERANCE
    )


def rank_processes(volume: Path) -> dict[int, int]:
    """pid -> rank of the live rank processes of the jobs on one volume (read from /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lora_worker.runtime.parallel.rank" in cmdline and f"VOLUME_DIR={volume}".encode() in environ:
            rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), -1)
            found[int(proc.name)] = rank
    return found


def in_thread(job_input: dict, settings: Settings, cancel: threading.Event) -> tuple[threading.Thread, dict]:
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(run_job(job_input, settings=settings, cancel=cancel)))
    thread.start()
    return thread, box


def wait_for_checkpoint(job_root: Path, thread: threading.Thread) -> int:
    deadline = time.monotonic() + JOB_END_S
    while not (done := list((job_root / "checkpoints").glob(f"checkpoint-*/{COMPLETE_MARKER}"))):
        assert thread.is_alive(), "the job ended before its first checkpoint"
        assert time.monotonic() < deadline, f"no checkpoint within {JOB_END_S} s"
        time.sleep(0.05)
    return step_of(done[0].parent)


def cancel_at_first_checkpoint(job_input: dict, settings: Settings) -> dict:
    """Run `job_input`, send /cancel once its first checkpoint is complete; its result."""
    cancel = threading.Event()
    thread, box = in_thread(job_input, settings, cancel)
    wait_for_checkpoint(settings.job_dir(job_input["job_id"]), thread)
    cancel.set()
    thread.join(JOB_END_S)
    assert not thread.is_alive(), "the cancelled job did not end"
    assert box["status"] == "cancelled", box
    return box


@pytest.fixture(scope="module")
def reference(tiny_model, small_dataset, tmp_path_factory) -> dict:
    volume = tmp_path_factory.mktemp("reference")
    result = run_job(
        job(tiny_model, small_dataset, "one", 1), settings=Settings.from_env({"VOLUME_DIR": str(volume)})
    )
    assert result["status"] == "completed", result
    return result


@pytest.mark.e2e
def test_two_processes_train_the_same_steps_as_one(tiny_model, small_dataset, tmp_path, reference):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    result = run_job(job(tiny_model, small_dataset, "two", 2), settings=settings)
    assert result["status"] == "completed", result
    assert_same_curve(result, reference)
    assert result["gpu"] == "2x cpu" and result["metrics"]["steps"] == reference["metrics"]["steps"]
    assert not rank_processes(tmp_path)
    # rank 0 alone wrote the job: one attempt, one event sequence, checkpoints with every rank's RNG
    (attempt,) = result["attempts"]
    assert attempt["status"] == "completed" and attempt["gpu"] == "2x cpu"
    markers = list((tmp_path / "jobs" / "two" / "checkpoints").glob(f"checkpoint-*/{COMPLETE_MARKER}"))
    marker = json.loads(markers[0].read_text())
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= set(marker["files"])


@pytest.mark.e2e
def test_cancel_stops_both_ranks_and_one_process_resumes_on_the_same_curve(
    tiny_model, small_dataset, tmp_path, reference
):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    root = tmp_path / "jobs" / "moved"
    box = cancel_at_first_checkpoint(job(tiny_model, small_dataset, "moved", 2), settings)
    assert "checkpoint at step" in box["message"] and "kept" in box["message"]
    assert not rank_processes(tmp_path), "a rank outlived the cancelled job"
    kept = sorted(step_of(p.parent) for p in (root / "checkpoints").glob(f"checkpoint-*/{COMPLETE_MARKER}"))
    assert kept and kept[-1] < reference["metrics"]["steps"]

    resumed = run_job(job(tiny_model, small_dataset, "moved", 1), settings=settings)
    assert resumed["status"] == "completed", resumed
    assert resumed["resumed_from_step"] == kept[-1]
    assert_same_curve(resumed, reference)


@pytest.mark.e2e
def test_a_one_process_checkpoint_resumes_on_two(tiny_model, small_dataset, tmp_path, reference):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    cancel_at_first_checkpoint(job(tiny_model, small_dataset, "grown", 1), settings)

    resumed = run_job(job(tiny_model, small_dataset, "grown", 2), settings=settings)
    assert resumed["status"] == "completed", resumed
    assert resumed["resumed_from_step"] is not None
    assert_same_curve(resumed, reference)


@pytest.mark.e2e
def test_a_killed_rank_fails_the_job_naming_it(tiny_model, small_dataset, tmp_path):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    root = tmp_path / "jobs" / "killed"
    thread, box = in_thread(job(tiny_model, small_dataset, "killed", 2), settings, threading.Event())
    kept = wait_for_checkpoint(root, thread)
    (rank1,) = [pid for pid, rank in rank_processes(tmp_path).items() if rank == 1]
    os.kill(rank1, signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(JOB_END_S)
    assert not thread.is_alive(), "the job hung after a rank died"
    assert time.monotonic() - killed_at < 120  # the launcher noticed; no collective timeout was waited out
    assert box["status"] == "failed", box
    assert box["error"].startswith("rank 1 of 2 was killed by SIGKILL during training (step "), box["error"]
    assert "kept, resubmit the same job_id to resume" in box["error"]
    assert f"checkpoint at step {kept}" in box["error"] or "checkpoint at step" in box["error"]
    stored = json.loads((root / "result.json").read_text())
    assert stored["status"] == "failed" and stored["error"] == box["error"]
    (attempt,) = stored["attempts"]
    assert attempt["status"] == "failed" and attempt["seconds"] > 0
    assert not rank_processes(tmp_path), "rank 0 outlived the failed job"
    log = (root / "group.log").read_text()  # the group's output, kept beside the failure
    assert "rank0 " in log and "'rank': 1, 'exitcode': -9" in log


@pytest.mark.e2e
def test_a_worker_that_dies_takes_its_process_group_with_it(tiny_model, small_dataset, tmp_path):
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"input": job(tiny_model, small_dataset, "orphan", 2)}))
    worker = subprocess.Popen(
        [sys.executable, "-m", "lora_worker", "run", str(spec)],
        cwd=REPO,
        env={**os.environ, "VOLUME_DIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + JOB_END_S
        while not list(
            (tmp_path / "jobs" / "orphan" / "checkpoints").glob(f"checkpoint-*/{COMPLETE_MARKER}")
        ):
            assert worker.poll() is None and time.monotonic() < deadline, "no checkpoint while the worker ran"
            time.sleep(0.05)
        assert len(rank_processes(tmp_path)) == 2
    finally:
        worker.kill()
        worker.wait()
    deadline = time.monotonic() + 90  # the agent sees its parent gone within 0.5 s, then stops its ranks
    while rank_processes(tmp_path):
        assert time.monotonic() < deadline, f"ranks outlived their worker: {rank_processes(tmp_path)}"
        time.sleep(0.2)


INJECT_OOM = """
import os, pathlib

if os.environ.get("RANK") == "1":
    import torch

    fired = pathlib.Path(os.environ["OOM_MARKER"])
    seen = {"forwards": 0}

    def _oom(module, args, output):
        if type(module).__name__ != "LlamaDecoderLayer" or not module.training or fired.exists():
            return None
        seen["forwards"] += 1
        hidden = output[0] if isinstance(output, tuple) else output
        if seen["forwards"] > 8 and hidden.shape[0] > 1:
            fired.write_text("1")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 MiB (injected on rank 1)")
        return None

    torch.nn.modules.module.register_module_forward_hook(_oom)
"""


@pytest.mark.e2e
def test_out_of_memory_on_one_rank_relaunches_the_group_with_split_micro_batches(
    tiny_model, small_dataset, tmp_path, monkeypatch, reference
):
    """A real torch.OutOfMemoryError raised inside rank 1's decoder forward (a module hook installed by
    a sitecustomize on the ranks' PYTHONPATH), once."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(INJECT_OOM)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OOM_MARKER", str(tmp_path / "oom-fired"))
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    result = run_job(job(tiny_model, small_dataset, "oom", 2), settings=settings)
    assert (tmp_path / "oom-fired").exists(), "the injected error never fired"
    assert result["status"] == "completed", result
    (recovery,) = result["recoveries"]
    assert recovery["gradient_accumulation_steps"] == 2 and recovery["max_rows"] > 1
    assert "injected on rank 1" in recovery["message"]
    assert len(result["attempts"]) == 2  # the launch that ran out of memory, and the relaunch
    assert_same_curve(result, reference)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_a_data_parallel_job_on_two_gpus_matches_one(tiny_model, small_dataset, tmp_path):
    """NCCL, NF4 on each rank's own card (virtual local ranks), paged 8-bit AdamW, Liger when installed."""
    two_gpus()
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path), "REQUIRE_CUDA": "1"})
    one = run_job(job(tiny_model, small_dataset, "gpu-one", 1), settings=settings)
    two = run_job(job(tiny_model, small_dataset, "gpu-two", 2), settings=settings)
    assert one["status"] == "completed" and two["status"] == "completed", (one, two)
    assert two["gpu"].startswith("2x ")
    ref, got = losses(one), losses(two)
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], abs=5e-3), step
