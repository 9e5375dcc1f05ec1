"""Checkpoints: checksummed markers, a corrupt newest checkpoint set aside and the previous one used,
nothing deleted by the resume query, retention, and a full volume met before a save, not during it."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import tmpfs
from training_builders import PAD_ID, lora_model, synthetic_examples, train_config
from transformers import TrainerCallback

from lora_worker.runtime.training.checkpoints import (
    COMPLETE_MARKER,
    checkpoint_dirs,
    clean_incomplete,
    complete_checkpoints,
    estimate_checkpoint_bytes,
    find_resumable,
    prune_checkpoints,
    step_of,
    verify_checkpoint,
    write_marker,
)
from lora_worker.runtime.training.trainer import train

FIXED_NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def fake_checkpoint(folder: Path, step: int, *, complete: bool = True) -> Path:
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (ckpt / "optimizer.pt").write_bytes(os.urandom(8192))
    if complete:
        write_marker(ckpt, step=step)
    return ckpt


def test_one_parser_for_checkpoint_names():
    assert step_of("checkpoint-12") == 12
    assert step_of(Path("/x/checkpoint-0")) == 0
    for name in (
        "checkpoint-12.corrupt-20250102T030405Z",
        "checkpoint-",
        "checkpoint-x",
        "ckpt-3",
        "checkpoint-3.tmp",
    ):
        assert step_of(name) is None


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
        (lambda c: os.truncate(c / "optimizer.pt", 100), "optimizer.pt has 100 bytes, 8192 were written"),
        (lambda c: _flip_a_byte(c / "adapter_model.safetensors"), "adapter_model.safetensors does not match"),
        (lambda c: (c / COMPLETE_MARKER).write_text("{not json"), "completion marker is unreadable"),
    ],
)
def test_verification_names_what_is_wrong(tmp_path, damage, problem):
    ckpt = fake_checkpoint(tmp_path, 5)
    assert verify_checkpoint(ckpt) is None
    damage(ckpt)
    assert problem in verify_checkpoint(ckpt)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_marker_without_checksums_is_used_unverified(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 7)
    (ckpt / COMPLETE_MARKER).write_text('{"step": 7, "time": 1.0}')
    point = find_resumable(tmp_path)
    assert point.step == 7 and point.reason == "resuming from checkpoint-7, unverified (no checksums)"


def test_resume_query_deletes_nothing_and_cleaning_is_separate(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4, complete=False)  # a worker killed mid-write
    point = find_resumable(tmp_path)
    assert point.checkpoint == tmp_path / "checkpoint-2" and point.step == 2 and point.warnings == ()
    assert (tmp_path / "checkpoint-4").is_dir()
    assert clean_incomplete(tmp_path) == ["checkpoint-4"]
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-2"]


def test_no_usable_checkpoint_says_why(tmp_path):
    assert find_resumable(tmp_path / "missing").checkpoint is None
    ckpt = fake_checkpoint(tmp_path, 3)
    os.truncate(ckpt / "optimizer.pt", 10)
    point = find_resumable(tmp_path, clock=lambda: FIXED_NOW)
    assert point.checkpoint is None and point.step is None
    assert (
        point.reason == "no usable checkpoint (every complete one was corrupt): training starts from step 0"
    )
    assert point.warnings == (
        "checkpoint moved aside as checkpoint-3.corrupt-20250102T030405Z, not resumed from: "
        "checkpoint-3: optimizer.pt has 10 bytes, 8192 were written",
    )


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tiny_model, tmp_path):
    """A real run's newest checkpoint, marker present, with its adapter weights truncated."""
    examples = synthetic_examples()
    cfg = train_config(tmp_path, checkpoint_steps=2)
    first = train(lora_model(tiny_model), examples, PAD_ID, cfg, [])
    assert [p.name for p in complete_checkpoints(cfg.output_dir)] == ["checkpoint-4", "checkpoint-5"]
    newest = cfg.output_dir / "checkpoint-5" / "adapter_model.safetensors"
    half = newest.stat().st_size // 2
    os.truncate(newest, half)

    point = find_resumable(cfg.output_dir, clock=lambda: FIXED_NOW)
    assert (
        point.step == 4 and point.reason == "resuming from checkpoint-4, verified (a newer one was corrupt)"
    )
    aside = cfg.output_dir / "checkpoint-5.corrupt-20250102T030405Z"
    assert (aside / "adapter_model.safetensors").stat().st_size == half  # kept as found
    assert "adapter_model.safetensors has" in point.warnings[0] and aside.name in point.warnings[0]

    # training resumes from step 4 and finishes; the corrupt copy stays where it was put
    again = train(lora_model(tiny_model), examples, PAD_ID, cfg, [])
    assert again.resumed_from_step == 4 and again.global_step == first.global_step == 5
    assert aside.is_dir() and verify_checkpoint(cfg.output_dir / "checkpoint-5") is None


def test_a_corrupt_checkpoint_is_reported_by_train(tiny_model, tmp_path):
    examples = synthetic_examples()
    cfg = train_config(tmp_path, checkpoint_steps=2)
    train(lora_model(tiny_model), examples, PAD_ID, cfg, [])
    os.truncate(cfg.output_dir / "checkpoint-5" / "optimizer.pt", 64)
    outcome = train(lora_model(tiny_model), examples, PAD_ID, cfg, [])
    assert outcome.resumed_from_step == 4
    assert len(outcome.warnings) == 1 and "optimizer.pt has 64 bytes" in outcome.warnings[0]


def test_prune_keeps_the_newest_and_reports_bytes_freed(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 8, complete=False)
    aside = fake_checkpoint(tmp_path, 9).rename(tmp_path / "checkpoint-9.corrupt-20250102T030405Z")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    each = 4096 + 8192
    freed = prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["checkpoint-6"]
    assert not aside.exists() and (tmp_path / "notes.txt").exists()
    assert freed >= 4 * each  # 2 and 4, the incomplete 8 and the corrupt 9 (markers on top)
    assert prune_checkpoints(tmp_path) > each and checkpoint_dirs(tmp_path) == []
    assert prune_checkpoints(tmp_path / "missing") == 0


def test_estimate_without_a_checkpoint_is_the_adapter_plus_optimizer_state(tiny_model, tmp_path):
    cfg = train_config(tmp_path, checkpoint_steps=1)
    model = lora_model(tiny_model)
    seen = {}

    class Peek(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 1:
                seen["estimate"] = estimate_checkpoint_bytes(tmp_path / "empty", model, optimizer)

    train(model, synthetic_examples(), PAD_ID, cfg, [Peek()])
    ckpt = cfg.output_dir / "checkpoint-5"
    written = (ckpt / "adapter_model.safetensors").stat().st_size + (ckpt / "optimizer.pt").stat().st_size
    assert 0.7 * written < seen["estimate"] <= written
    assert estimate_checkpoint_bytes(cfg.output_dir) == sum(
        p.stat().st_size for p in ckpt.iterdir() if p.is_file()
    )


# ----------------------------------------------------------------------------- a full volume


@pytest.fixture
def small_volume(tmp_path):
    """A real 8 MiB tmpfs; skipped where mounting is not permitted."""
    with tmpfs(tmp_path / "volume", "8m") as mount:
        yield mount


class FillVolume(TrainerCallback):
    """At the end of step `step`, fill the volume until only `leave` bytes are free."""

    def __init__(self, folder: Path, step: int, leave: int):
        self.folder, self.step, self.leave = folder, step, leave

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step:
            return
        free = shutil.disk_usage(self.folder).free
        with open(self.folder / "filler", "wb") as f:
            chunk = b"\0" * (1 << 16)
            left = free - self.leave
            while left > 0:
                left -= f.write(chunk[: min(len(chunk), left)])


@pytest.mark.parametrize(
    "full_at", [1, 3]
)  # 1: no checkpoint yet (estimated from memory); 3: from the last one
def test_a_full_volume_stops_training_cleanly_before_the_save(tiny_model, small_volume, full_at):
    cfg = train_config(small_volume, checkpoint_steps=1)
    fill = FillVolume(small_volume, full_at, leave=100_000)  # a checkpoint is about 300 kB
    outcome = train(lora_model(tiny_model), synthetic_examples(), PAD_ID, cfg, [fill])

    assert outcome.global_step == full_at < outcome.max_steps
    assert outcome.stopped_reason.startswith(f"not enough free space for the checkpoint at step {full_at}: ")
    assert " GB free on the volume" in outcome.stopped_reason
    assert not (cfg.output_dir / f"checkpoint-{full_at}").exists()  # not even a partial folder
    kept = complete_checkpoints(cfg.output_dir)
    assert [p.name for p in kept] == [f"checkpoint-{s}" for s in range(max(1, full_at - 2), full_at)]
    assert all(verify_checkpoint(p) is None for p in kept)
