"""The NF4 copy of the base model: saved in shards with checksums, verified at load, a corrupt copy
moved aside (never used, never deleted), keyed by the loader's one quantization config."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lora_worker.runtime.model.load import (
    keep_cpu_layout,
    load_base_model,
    load_tokenizer,
    quantization_config,
)
from lora_worker.runtime.model.nf4_cache import (
    check_prequantized,
    discard_prequantized,
    find_prequantized,
    prequantized_dir,
    quant_key,
    save_prequantized,
    use_prequantized,
)

MODEL = "test-org/tiny-llama"
SHA = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Saved:
    model: Any
    tokenizer: Any
    copy: Path  # a pristine saved copy; tests work on their own copies of it


@pytest.fixture(scope="module")
def saved(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    model = load_base_model(tiny_model)  # NF4 on the CPU; no forward before the save
    tokenizer = load_tokenizer(tiny_model)
    target = prequantized_dir(tmp_path_factory.mktemp("pristine"), MODEL, SHA)
    assert save_prequantized(model, tokenizer, target, max_shard_size="100KB") == target
    return Saved(model, tokenizer, target)


@pytest.fixture
def copy_on_volume(saved: Saved, tmp_path: Path) -> tuple[Path, Path]:
    """(volume, the copy's folder on it): an intact copy where `find_prequantized` looks."""
    volume = tmp_path / "volume"
    target = prequantized_dir(volume, MODEL, SHA)
    shutil.copytree(saved.copy, target)
    return volume, target


def shards(target: Path) -> list[Path]:
    return sorted(target.glob("*.safetensors"))


def test_the_copy_is_sharded_and_every_file_has_its_checksum(saved: Saved) -> None:
    marker = json.loads((saved.copy / ".complete").read_text())
    assert len(shards(saved.copy)) >= 3  # forced by max_shard_size on the tiny model
    assert (saved.copy / "model.safetensors.index.json").is_file()
    assert set(marker["sha256"]) == set(marker["files"]) >= {p.name for p in shards(saved.copy)}
    assert "tokenizer.json" in marker["files"] and "config.json" in marker["files"]
    assert marker["quantization"]["bnb_4bit_quant_type"] == "nf4"
    assert not list(saved.copy.parent.glob(f".{saved.copy.name}.partial-*"))


def test_the_copy_round_trips_bit_identically(saved: Saved, copy_on_volume: tuple[Path, Path]) -> None:
    import bitsandbytes as bnb

    volume, target = copy_on_volume
    found = find_prequantized(volume, MODEL, SHA)
    assert found.state == "ok" and found.path == target and found.problem is None

    reloaded = AutoModelForCausalLM.from_pretrained(
        found.path, dtype=torch.bfloat16, device_map={"": "cpu"}, trust_remote_code=False
    )
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    keep_cpu_layout(reloaded)  # the kernel the worker's loader gave the saved model
    ids = saved.tokenizer("How much should I save each month?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(saved.model(ids).logits, reloaded(ids).logits)
    tok = load_tokenizer(found.path)
    assert tok("How much")["input_ids"] == saved.tokenizer("How much")["input_ids"]


def test_a_copy_with_flipped_bytes_of_the_same_size_is_caught_and_moved_aside(
    copy_on_volume: tuple[Path, Path],
) -> None:
    volume, target = copy_on_volume
    shard = shards(target)[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a tensor: same size
    shard.write_bytes(bytes(data))

    found = find_prequantized(volume, MODEL, SHA)
    assert found.state == "corrupt" and found.path is None
    assert found.problem is not None and shard.name in found.problem and "SHA-256" in found.problem
    assert target.is_dir()  # looking never moves or removes anything

    used = use_prequantized(volume, MODEL, SHA)
    assert used.path is None and used.moved_to is not None
    assert used.warning is not None and "failed verification" in used.warning and shard.name in used.warning
    assert not target.exists()
    assert used.moved_to.parent == target.parent and used.moved_to.name.startswith(f"{target.name}.corrupt-")
    assert (used.moved_to / shard.name).read_bytes() == bytes(data)  # kept as it was, for a look
    assert find_prequantized(volume, MODEL, SHA).state == "absent"  # the next load re-quantizes


def test_a_missing_shard_is_caught(copy_on_volume: tuple[Path, Path]) -> None:
    volume, target = copy_on_volume
    missing = shards(target)[-1]
    missing.unlink()

    found = find_prequantized(volume, MODEL, SHA)

    assert found.state == "corrupt" and found.problem == f"{missing.name} is missing"


def test_a_copy_without_checksums_or_marker_is_not_used(copy_on_volume: tuple[Path, Path]) -> None:
    volume, target = copy_on_volume
    marker = json.loads((target / ".complete").read_text())
    del marker["sha256"]  # what a worker that checked sizes only wrote
    (target / ".complete").write_text(json.dumps(marker))
    found = find_prequantized(volume, MODEL, SHA)
    assert found.state == "corrupt" and "records no SHA-256" in (found.problem or "")

    (target / ".complete").unlink()
    assert check_prequantized(target).state == "corrupt"


def test_discard_moves_aside_once_and_a_save_replaces_a_corrupt_copy(
    saved: Saved, copy_on_volume: tuple[Path, Path]
) -> None:
    volume, target = copy_on_volume
    aside = discard_prequantized(target, "non-finite loss on the first evaluation")
    assert aside is not None and aside.is_dir() and not target.exists()
    assert discard_prequantized(target, "again") is None  # another worker moved it first

    shutil.copytree(aside, target)
    shards(target)[0].write_bytes(b"\0" * shards(target)[0].stat().st_size)
    save_prequantized(saved.model, saved.tokenizer, target, max_shard_size="100KB")

    assert find_prequantized(volume, MODEL, SHA).state == "ok"
    corrupt = sorted(p.name for p in target.parent.iterdir() if ".corrupt-" in p.name)
    assert len(corrupt) == 2  # the discarded one and the one the save replaced, both kept


def test_the_key_is_derived_from_the_loaders_quantization_config(tmp_path: Path) -> None:
    default = prequantized_dir(tmp_path, MODEL, SHA)
    assert default == prequantized_dir(tmp_path, MODEL, SHA, quantization_config())
    assert default.name == f"{SHA}--q{quant_key(quantization_config().to_dict())}"

    changed = quantization_config().to_dict()
    changed["bnb_4bit_use_double_quant"] = False
    assert quant_key(changed) != quant_key()
    fp4 = BitsAndBytesConfig(**{**quantization_config().to_dict(), "bnb_4bit_quant_type": "fp4"})
    assert prequantized_dir(tmp_path, MODEL, SHA, fp4) != default
    assert prequantized_dir(tmp_path, MODEL, "f" * 40) != default
