"""Loading never runs code from a model folder and never asks on stdin."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lora_worker
from lora_worker.runtime.model.layout import ModelResolutionError, custom_code_problem
from lora_worker.runtime.model.load import load_tokenizer

SRC = str(Path(lora_worker.__file__).resolve().parents[1])


def with_custom_code(tiny_model: Path, dest: Path, config_file: str) -> Path:
    """A copy of the tiny model whose `config_file` points `auto_map` at a .py file in the folder;
    importing that file would leave a marker file next to it."""
    shutil.copytree(tiny_model, dest)
    marker = dest / "CUSTOM_CODE_RAN"
    (dest / "custom_code.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast, LlamaConfig, LlamaForCausalLM\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"
        "class CustomConfig(LlamaConfig):\n    pass\n"
        "class CustomModel(LlamaForCausalLM):\n    pass\n"
    )
    data = json.loads((dest / config_file).read_text())
    if config_file == "tokenizer_config.json":
        data["auto_map"] = {"AutoTokenizer": ["custom_code.CustomTokenizer", None]}
    else:
        data["auto_map"] = {
            "AutoConfig": "custom_code.CustomConfig",
            "AutoModelForCausalLM": "custom_code.CustomModel",
        }
    (dest / config_file).write_text(json.dumps(data))
    return dest


def test_a_folder_with_custom_code_is_refused_without_prompting_or_running_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    names = ("tokenizer_config.json", "config.json")
    folders = [with_custom_code(tiny_model, tmp_path / f"custom-{i}", name) for i, name in enumerate(names)]
    script = (
        "from pathlib import Path\n"
        "from lora_worker.runtime.model.layout import ModelResolutionError\n"
        "from lora_worker.runtime.model.load import load_base_model, load_tokenizer\n"
        "from lora_worker.runtime.model.resolve import resolve_model_meta\n"
        f"for folder in [Path(p) for p in {[str(f) for f in folders]!r}]:\n"
        "    calls = [lambda: load_tokenizer(folder), lambda: load_base_model(folder),\n"
        "             lambda: resolve_model_meta(str(folder), volume_dir=folder.parent, hf_token=None)]\n"
        "    for call in calls:\n"
        "        try:\n"
        "            call()\n"
        "            print('LOADED')\n"
        "        except ModelResolutionError as e:\n"
        "            print('REFUSED', e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        stdin=subprocess.DEVNULL,  # a prompt would read EOF here rather than hang
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith("REFUSED") for line in lines), done.stdout
    for name, first in zip(names, (lines[0], lines[3]), strict=True):
        assert f"its {name} names custom code to run (custom_code." in first
        assert "never runs code from a model repository" in first
    assert "Do you wish to run the custom code" not in done.stdout + done.stderr
    assert not any((folder / "CUSTOM_CODE_RAN").exists() for folder in folders)


def test_the_refusal_is_the_loaders_own_check(tiny_model: Path, tmp_path: Path) -> None:
    folder = with_custom_code(tiny_model, tmp_path / "custom", "tokenizer_config.json")
    assert custom_code_problem(tiny_model) is None
    with pytest.raises(ModelResolutionError, match="custom code"):
        load_tokenizer(folder)
    assert not (folder / "CUSTOM_CODE_RAN").exists()


def test_the_tokenizer_loads_from_a_folder_without_weights(tiny_model: Path, tmp_path: Path) -> None:
    meta_only = tmp_path / "meta"
    shutil.copytree(tiny_model, meta_only, ignore=shutil.ignore_patterns("*.safetensors"))
    tok = load_tokenizer(meta_only)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith(
        "<|begin_of_text|><|start_header_id|>user"
    )
