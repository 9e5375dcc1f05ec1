"""A Llama-3-shaped model in NF4 with random weights, built on the device linear by linear, and
synthetic training examples for it.

A `LlamaForCausalLM` is made on the meta device; then each linear of every decoder layer is drawn
in bf16 on the device and quantized at once with bitsandbytes (`Params4bit` -> `Linear4bit`);
embeddings, norms and the LM head are drawn directly in bf16; the rotary embedding is rebuilt on
the device. No checkpoint is needed and the bf16 weights of the full model never exist at once.
Random weights run the same kernels on the same shapes as real ones, so speed and memory carry
over; the loss values mean nothing.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from lora_worker.runtime.data.conversation import IGNORE_INDEX
from lora_worker.runtime.data.examples import Example
from lora_worker.tools.bench.shapes import Shape

INIT_STD = 0.02  # activations stay finite through 80 random layers


def llama_config(shape: Shape, max_positions: int) -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.inter,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv,
        max_position_embeddings=max(8192, max_positions),
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,  # Llama 3 70B has a separate LM head
        dtype=torch.bfloat16,
    )
    cfg._attn_implementation = "sdpa"  # what model.load_base_model asks for
    cfg.use_cache = False
    return cfg


def _nf4_linear(lin: nn.Linear, device: str, g: torch.Generator) -> bnb.nn.Linear4bit:
    """A Linear4bit of `lin`'s shape holding random weights, quantized on `device` as they are drawn."""
    q = bnb.nn.Linear4bit(
        lin.in_features,
        lin.out_features,
        bias=False,
        compute_dtype=torch.bfloat16,
        compress_statistics=True,  # double quantization, as the worker's quantization config
        quant_type="nf4",
        device="meta",
    )
    w = torch.randn(lin.out_features, lin.in_features, dtype=torch.bfloat16, device=device, generator=g)
    w.mul_(INIT_STD)
    q.weight = bnb.nn.Params4bit(
        w, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
    ).to(device)
    return q


def _materialize_rest(model: nn.Module, device: str, g: torch.Generator) -> None:
    """Embeddings, norms and the LM head: drawn directly in bf16 (norms at 1)."""
    for mod in model.modules():
        for pn, prm in list(mod._parameters.items()):
            if prm is None or not prm.is_meta:
                continue
            if "norm" in type(mod).__name__.lower():
                val = torch.ones(prm.shape, dtype=torch.bfloat16, device=device)
            else:
                val = torch.randn(prm.shape, dtype=torch.bfloat16, device=device, generator=g) * INIT_STD
            mod._parameters[pn] = nn.Parameter(val, requires_grad=False)


def build_nf4_model(
    shape: Shape, device: str, *, seed: int = 0, max_positions: int = 8192
) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` of `shape` in NF4 with random weights, built on `device` linear by linear."""
    cfg = llama_config(shape, max_positions)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, nn.Linear):
                    setattr(parent, name, _nf4_linear(lin, device, g))
    _materialize_rest(model, device, g)
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    left = [n for n, b in model.named_buffers() if b.is_meta] + [
        n for n, p in model.named_parameters() if p.is_meta
    ]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    model.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT and the Trainer read it
    return model


def synthetic_examples(n: int, length: int, vocab: int, *, label_fraction: float, seed: int) -> list[Example]:
    """Random-token `Example`s with labels on the last `label_fraction` of each (like assistant turns)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = ids.clone()
    labels[:, : length - int(length * label_fraction)] = IGNORE_INDEX
    return [Example(f"synthetic-{i}", tuple(ids[i].tolist()), tuple(labels[i].tolist())) for i in range(n)]
