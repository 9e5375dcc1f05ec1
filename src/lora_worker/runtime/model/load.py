"""Load the tokenizer and the base model in 4-bit NF4, and wrap it with LoRA adapters.

Nothing here runs code from a model repository: every `from_pretrained` passes
`trust_remote_code=False`, and a folder whose config or tokenizer config names custom code
(`auto_map`) is refused before transformers reads it (transformers would otherwise quietly load a
stock class in place of the custom one, or ask on stdin).

The choices that cost or save memory are explicit arguments (each measured in BENCHMARKS.md):
- no fp32 up-cast of the frozen embeddings and LM head (PEFT's `prepare_model_for_kbit_training`
  does it; `upcast_fp32=True` restores that recipe);
- non-reentrant gradient checkpointing;
- Liger fused kernels (fused linear cross-entropy never materialises the 128K-vocab logits) on CUDA.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from lora_worker.runtime.device import detect_device, free_accelerator_memory
from lora_worker.runtime.model.layout import require_no_custom_code

log = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantization_config(*, sharded: bool = False) -> BitsAndBytesConfig:
    """The one NF4 config: the loader uses it and the NF4 copy on the volume is keyed by it.

    `sharded` (FSDP-QLoRA): the packed NF4 bytes are stored as bf16 elements, the dtype of the
    model's other weights, so FSDP can shard and all-gather them with the rest (the same values)."""
    return BitsAndBytesConfig(
        **({"bnb_4bit_quant_storage": torch.bfloat16} if sharded else {}),
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        # Keep the LM head in bf16: it is not adapted, and quantizing it costs quality for little memory.
        llm_int8_skip_modules=["lm_head"],
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder (config/tokenizer-only folders work), without custom code."""
    require_no_custom_code(Path(path), f"the model folder {path}")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def load_base_model(path: str | Path, *, prequantized: bool = False, sharded: bool = False):
    """The base model in NF4 (or a saved NF4 copy), frozen, on the GPU if there is one (`sharded`:
    stored for FSDP, see quantization_config)."""
    require_no_custom_code(Path(path), f"the model folder {path}")
    on_cuda = detect_device().is_cuda
    kwargs = {} if prequantized else {"quantization_config": quantization_config(sharded=sharded)}
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.bfloat16,
        device_map={"": 0 if on_cuda else "cpu"},
        attn_implementation="sdpa",
        trust_remote_code=False,  # never run code from a model repository
        low_cpu_mem_usage=True,
        **kwargs,
    )
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    keep_cpu_layout(model)
    return model


def keep_cpu_layout(model) -> None:
    """Turn off bitsandbytes' CPU inference repack: on a CPU with AVX512-BF16 it rewrites each NF4
    weight in place, into another layout, at its first forward without gradients. A sharded (FSDP)
    weight is gathered anew for every forward and cannot keep the rewrite (its quantization state
    would then describe the wrong layout), and training and evaluation on the CPU should run the
    same kernel. On the GPU the flag has no effect."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def add_lora(
    model,
    *,
    r: int,
    alpha: int,
    dropout: float,
    seed: int,
    gradient_checkpointing: bool = True,
    upcast_fp32: bool = False,
    liger: str = "auto",
    init_adapter: Path | None = None,
):
    """Wrap a frozen 4-bit model with LoRA on all seven projections; returns (peft_model, liger_used).

    `init_adapter` (a saved adapter folder whose config matches r, alpha and the targets: see
    `lora_config_mismatch`) starts training from its weights instead of a fresh adapter."""
    liger_used = False
    if liger == "on" or (liger == "auto" and detect_device().is_cuda):
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama(model=model)
            liger_used = True
        except ImportError:
            if liger == "on":
                raise RuntimeError(
                    "training.liger_kernels is 'on' but liger-kernel is not installed"
                ) from None
            log.info("liger-kernel not installed; using the stock kernels")
    if upcast_fp32:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        # Transformers 5.2x renamed it; older 5.x (the GPU image's 5.17) only has the old name.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Inputs need grad so checkpointed segments of a frozen base still carry grads to the LoRA weights.
        model.enable_input_require_grads()
    torch.manual_seed(seed)  # LoRA A matrices are drawn here: same seed, same initial adapter
    if init_adapter is not None:
        return load_trainable_adapter(model, init_adapter, dropout=dropout), liger_used
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=LORA_TARGETS,
    )
    return get_peft_model(model, config), liger_used


def load_trainable_adapter(model, adapter_dir: Path, *, dropout: float):
    """A saved adapter on `model`, trainable: its weights are upcast to fp32 for the optimizer (PEFT's
    `autocast_adapter_dtype`), and the job's dropout replaces the saved one."""
    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.lora_dropout = dropout
    return PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=True)


def load_inference_adapter(model, adapter_dir: Path):
    """A saved adapter on `model` for generation: frozen, eval mode, KV cache on."""
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    peft_model.eval()
    return peft_model


def lora_config_mismatch(
    config: dict, *, r: int, alpha: int, targets: list[str] | tuple[str, ...]
) -> list[str]:
    """How a saved adapter_config.json differs from the LoRA a job trains (empty when it matches)."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"it is a {config.get('peft_type')} adapter, not LoRA")
    if config.get("r") != r:
        problems.append(f"its rank r is {config.get('r')}, this job's hyperparameters.lora_r is {r}")
    if config.get("lora_alpha") != alpha:
        problems.append(
            f"its lora_alpha is {config.get('lora_alpha')}, this job's hyperparameters.lora_alpha is {alpha}"
        )
    saved = config.get("target_modules")
    if not isinstance(saved, list) or set(saved) != set(targets):
        problems.append(f"its target_modules are {saved}, this job trains {sorted(targets)}")
    for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"it sets {key}, which this worker's training does not")
    return problems


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def weights_bytes(model_dir: Path) -> int:
    """Bytes of the base model's safetensors (its bf16 size, for a bf16 checkpoint)."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def available_ram_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def merge_problem(need_bytes: int, *, ram_bytes: int, disk_bytes: int) -> str | None:
    """Why a bf16 merge cannot run here, or None. The merge holds the whole bf16 model in CPU RAM
    (plus ~10% working room) and writes a copy of the same size to the volume."""
    gb = 1e9
    problems = []
    if ram_bytes < need_bytes * 1.1:
        problems.append(
            f"needs about {need_bytes * 1.1 / gb:.1f} GB of free RAM, {ram_bytes / gb:.1f} GB available"
        )
    if disk_bytes < need_bytes * 1.05:
        problems.append(
            f"needs about {need_bytes * 1.05 / gb:.1f} GB free on the volume, {disk_bytes / gb:.1f} GB free"
        )
    if problems:
        return (
            "output.merge refused: " + "; ".join(problems) + ". The adapter itself is saved and usable as is."
        )
    return None


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Write base + adapter merged into plain bf16 weights (servable without PEFT), on the CPU.

    The merge uses the original bf16 weights, not the NF4 copy: merging into dequantized NF4
    weights would bake the quantization error into the released model.
    """
    require_no_custom_code(Path(base_dir), f"the model folder {base_dir}")
    base = AutoModelForCausalLM.from_pretrained(
        base_dir,
        dtype=torch.bfloat16,
        device_map={"": "cpu"},
        low_cpu_mem_usage=True,
        trust_remote_code=False,
    )
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=False).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    del base, merged
    free_accelerator_memory()
    return out_dir
