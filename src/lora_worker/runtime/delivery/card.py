"""The model card (the adapter folder's README.md) and the licence files that travel with the adapter.

The card says what the adapter is built on (base id and commit), what it was trained on (dataset
name, version, SHA-256, counts), how well it did (held-out numbers and the verdict), what it is for,
how to load it with PEFT and serve it with vLLM (the settings the serving check worked out), and
under which licence. `render_card` is pure: the same facts give the same text.

Llama 3 bases: the Meta Llama 3 Community Licence asks whoever redistributes a derivative to give
a copy of the licence, to display "Built with Meta Llama 3" (3.1 and later: "Built with Llama"),
to keep an attribution notice in a NOTICE file, and to start a distributed model's name with
"Llama 3" ("Llama"). The card carries the notice and the links; LICENSE and USE_POLICY.md are
copied from the base model's folder when it has them, and NOTICE is written.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_worker.runtime.files import atomic_write_text

CARD_NAME = "README.md"
# Files of a base model's repo that its licence asks to pass on (case as on the Hub).
LICENCE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "USE_POLICY.md", "NOTICE", "NOTICE.txt")
MAX_LICENCE_FILE_BYTES = 1 << 20  # a licence text is kilobytes; anything larger is not one

_LLAMA3 = re.compile(r"llama[-_ ]?3(?:[._](?P<minor>\d))?", re.IGNORECASE)


@dataclass(frozen=True)
class LlamaLicence:
    name: str  # "Meta Llama 3", "Llama 3.1", ...
    spdx: str  # the Hub's `license:` value: llama3, llama3.1, ...
    notice: str  # what must be displayed
    licence_url: str
    use_policy_url: str
    attribution: str  # the NOTICE file's text
    name_prefix: str  # what a distributed model's name must start with


def llama_licence(model_id: str) -> LlamaLicence | None:
    """The Llama 3 family licence terms for a base model id, or None when it is not a Llama 3 model."""
    found = _LLAMA3.search(model_id)
    if not found:
        return None
    minor = found["minor"]
    if minor is None:
        name, spdx, slug, notice, prefix = (
            "Meta Llama 3",
            "llama3",
            "llama3",
            "Built with Meta Llama 3",
            "Llama 3",
        )
    else:
        name, spdx, slug = f"Llama 3.{minor}", f"llama3.{minor}", f"llama3_{minor}"
        notice, prefix = "Built with Llama", "Llama"
    return LlamaLicence(
        name=name,
        spdx=spdx,
        notice=notice,
        licence_url=f"https://llama.meta.com/{slug}/license/",
        use_policy_url=f"https://llama.meta.com/{slug}/use-policy/",
        attribution=f"{name} is licensed under the {name} Community License, "
        "Copyright © Meta Platforms, Inc. All Rights Reserved.",
        name_prefix=prefix,
    )


def copy_licence_files(base_dir: Path, dest: Path) -> list[str]:
    """Copy the base model's licence files (when present, regular, small) into `dest`; their names."""
    copied = []
    for name in LICENCE_FILES:
        src = Path(base_dir) / name
        try:
            if not src.is_file() or src.stat().st_size > MAX_LICENCE_FILE_BYTES:
                continue
            shutil.copyfile(src, Path(dest) / name)  # follows the hub cache's snapshot -> blob links
            copied.append(name)
        except OSError:
            continue
    return copied


@dataclass(frozen=True)
class CardFacts:
    """Everything the card shows; plain values (the report's dicts), so the card is a pure function."""

    job_id: str
    base_model: str
    base_revision: str | None
    lora: dict[str, Any]  # adapter_config.json
    weights_dtype: str  # bf16 / fp32
    verdict: str
    headline: str
    metrics: dict[str, Any]
    dataset: dict[str, Any]  # the dataset summary
    lineage: dict[str, Any] | None = None
    versus_previous: dict[str, Any] | None = None  # Outcome of the new adapter against the previous one
    serving: dict[str, Any] | None = None  # ServingCheck
    licence_files: tuple[str, ...] = ()
    created_at: str | None = None
    extra_tags: tuple[str, ...] = field(default_factory=tuple)


def _cell(value: Any) -> str:
    """A value for one table cell: one line, no pipes, no raw HTML."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows)])


def _front_matter(f: CardFacts, licence: LlamaLicence | None) -> str:
    lines = ["---", f"base_model: {f.base_model}", "library_name: peft", "pipeline_tag: text-generation"]
    if licence:
        lines.append(f"license: {licence.spdx}")
    tags = ["lora", "peft", "qlora", f"base_model:adapter:{f.base_model}", *f.extra_tags]
    lines += ["tags:", *(f"- {t}" for t in tags), "---"]
    return "\n".join(lines)


def _dataset_section(f: CardFacts) -> str:
    lin = (f.lineage or {}).get("dataset") or {}
    d = f.dataset or {}
    rows = [
        ("Name", lin.get("name") or d.get("name")),
        ("Version", lin.get("version") or d.get("version")),
        ("File", lin.get("file_name")),
        ("SHA-256", f"`{lin['sha256']}`" if lin.get("sha256") else None),
        ("Format", lin.get("format") or d.get("format")),
        ("Conversations", lin.get("conversations") or d.get("conversations")),
        ("Prompt/response pairs", lin.get("pairs") or d.get("pairs")),
        (
            "Trained on / held out",
            f"{d.get('train_conversations')} / {d.get('eval_conversations')} conversations",
        ),
        ("Trainable tokens", lin.get("trainable_tokens") or d.get("trainable_tokens")),
    ]
    return "## Training data\n\n" + _table(rows)


def _evaluation_section(f: CardFacts) -> str:
    m = f.metrics or {}
    rows = [
        ("Verdict", f.verdict),
        ("Held-out loss, base model", m.get("eval_loss_before")),
        ("Held-out loss, this adapter", m.get("eval_loss_after")),
        (
            "Perplexity, base -> adapter",
            f"{_cell(m.get('perplexity_before'))} -> {_cell(m.get('perplexity_after'))}",
        ),
        ("Final training loss", m.get("train_loss")),
        ("Optimizer steps / epochs", f"{m.get('steps')} / {m.get('epochs')}"),
    ]
    text = f"## Evaluation\n\n{_cell(f.headline)}\n\n" + _table(rows)
    prev = f.versus_previous
    if prev:
        text += (
            f"\n\nAgainst the previous adapter it started from: **{prev.get('verdict')}** "
            f"({_cell(prev.get('reason'))})."
        )
    text += (
        "\n\nLoss is the mean cross-entropy per assistant token of the held-out conversations "
        "(nats per token; lower is better). The verdict counts a change only beyond the noise threshold."
    )
    return text


def _settings_section(f: CardFacts) -> str:
    hp = ((f.lineage or {}).get("settings") or {}).get("hyperparameters") or {}
    rows = [
        ("LoRA rank r / alpha", f"{f.lora.get('r')} / {f.lora.get('lora_alpha')}"),
        ("Target modules", ", ".join(sorted(f.lora.get("target_modules") or []))),
        ("Weights dtype", f.weights_dtype),
        ("Epochs", hp.get("num_epochs")),
        ("Learning rate", hp.get("learning_rate")),
        ("max_seq_length", hp.get("max_seq_length")),
        ("Seed", hp.get("seed")),
        (
            "Quantization during training",
            "base model in 4-bit NF4 (QLoRA), double quantization, bf16 compute",
        ),
    ]
    prev = (f.lineage or {}).get("previous_adapter")
    if prev:
        rows.append(("Started from", prev.get("job_id") or prev.get("path")))
    return "## Training settings\n\n" + _table(rows)


def _usage_section(f: CardFacts) -> str:
    rev = f', revision="{f.base_revision}"' if f.base_revision else ""
    return f"""## How to use

With PEFT (the base model loads from `{f.base_model}`{" at commit `" + f.base_revision + "`" if f.base_revision else ""}):

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder", torch_dtype="bfloat16")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")  # with the chat template used in training
```

or on a base model already loaded (`AutoModelForCausalLM.from_pretrained("{f.base_model}"{rev})`):
`PeftModel.from_pretrained(base, "path/to/this/folder")`. Format prompts with the folder's chat template
(`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`)."""


def _serving_section(f: CardFacts) -> str:
    s = f.serving or {}
    if not s.get("ok"):
        problems = "\n".join(f"- {_cell(p)}" for p in s.get("problems") or ["not checked"])
        return (
            f"## Serving with vLLM\n\nThis adapter would **not** load in vLLM's LoRA support:\n\n{problems}"
        )
    v = s.get("vllm") or {}
    rank, name = v.get("max_lora_rank"), v.get("lora_name", "adapter")
    rev = f" --revision {f.base_revision}" if f.base_revision else ""
    modules = f'[{{"name":"{name}","path":"/runpod-volume/path/to/this/folder"}}]'
    runpod_rev = f"\nMODEL_REVISION={f.base_revision}" if f.base_revision else ""
    return f"""## Serving with vLLM

Checked against vLLM's LoRA rules (rank within `--max-lora-rank`, supported Llama target modules, no
`modules_to_save`, bias "none", no DoRA): it loads. Settings to use:

```bash
vllm serve {f.base_model}{rev} --enable-lora --max-lora-rank {rank} --max-loras 1 \\
  --lora-modules {name}=path/to/this/folder
```

Requests select it with `"model": "{name}"`. On RunPod's vLLM worker (runpod-workers/worker-vllm) set:

```
MODEL_NAME={f.base_model}{runpod_rev}
ENABLE_LORA=true
MAX_LORA_RANK={rank}
MAX_LORAS=1
LORA_MODULES={modules}
```"""


def _licence_section(f: CardFacts, licence: LlamaLicence | None) -> str:
    files = ", ".join(f"`{n}`" for n in f.licence_files)
    if licence is None:
        shipped = f" Its licence files are included: {files}." if files else ""
        return (
            f"## Licence\n\nThis adapter is a derivative of `{f.base_model}` and is subject to that model's "
            f"licence.{shipped}"
        )
    shipped = (
        f"Included here: {files}."
        if files
        else f"Pass on a copy of the licence ({licence.licence_url}) with the adapter."
    )
    return f"""## Licence

**{licence.notice}.** This adapter is a derivative of `{f.base_model}` and is distributed under the
[{licence.name} Community License]({licence.licence_url}); its use must follow the
[Acceptable Use Policy]({licence.use_policy_url}). {shipped} A model distributed from it must have a name
that begins with "{licence.name_prefix}", and the attribution notice in `NOTICE` must be kept:
"{licence.attribution}\""""


def render_card(f: CardFacts) -> str:
    licence = llama_licence(f.base_model)
    title = f"# LoRA adapter {f.job_id} for {f.base_model}"
    notice = f"\n\n**{licence.notice}**" if licence else ""
    revision = f" at commit `{f.base_revision}`" if f.base_revision else ""
    consultant = (f.dataset or {}).get("consultant")
    name = (
        ((f.lineage or {}).get("dataset") or {}).get("name") or (f.dataset or {}).get("name") or "its dataset"
    )
    intended = (
        "## Intended use\n\n"
        f"Replies in the voice and domain of the training conversations ({_cell(name)}"
        + (f", consultant persona {_cell(consultant)}" if consultant else "")
        + "). It was evaluated only by held-out loss on conversations of the same dataset and by side-by-side "
        "samples; it is not a source of professional advice, and its replies should be reviewed by a person "
        "before they reach a client. Out of scope: uses the base model's licence or use policy forbids, and "
        "domains unlike the training data."
    )
    summary = (
        f"A LoRA adapter trained with QLoRA on `{f.base_model}`{revision} by job `{f.job_id}`"
        + (f" ({f.created_at})" if f.created_at else "")
        + f". Verdict on held-out data: **{f.verdict}**."
    )
    parts = [
        _front_matter(f, licence),
        title + notice,
        summary,
        intended,
        _dataset_section(f),
        _evaluation_section(f),
        _settings_section(f),
        _usage_section(f),
        _serving_section(f),
        _licence_section(f, licence),
    ]
    return "\n\n".join(parts) + "\n"


def write_notice(adapter_dir: Path, base_model: str) -> None:
    """NOTICE with the attribution a Llama 3 family licence asks for (kept when the base shipped one)."""
    licence = llama_licence(base_model)
    if licence is not None and not (Path(adapter_dir) / "NOTICE").exists():
        atomic_write_text(Path(adapter_dir) / "NOTICE", licence.attribution + "\n")


def licence_files_in(adapter_dir: Path) -> tuple[str, ...]:
    return tuple(n for n in LICENCE_FILES if (Path(adapter_dir) / n).is_file())


def write_card(adapter_dir: Path, facts: CardFacts) -> Path:
    """README.md in the adapter folder."""
    path = Path(adapter_dir) / CARD_NAME
    atomic_write_text(path, render_card(facts))
    return path
