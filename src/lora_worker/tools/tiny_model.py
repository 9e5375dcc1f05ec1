"""A tiny Llama-architecture causal LM and a Llama-3-style fast tokenizer, built fully offline.

Tests, the demo job and `test_input.json` use it in place of Llama 3 70B: same architecture class
(`LlamaForCausalLM`), same special tokens and chat template, random weights, a few layers. The
tokenizer is a byte-level BPE trained on the small corpus below, so it is deterministic and needs
no download.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# The Llama 3 Instruct chat template, as shipped in meta-llama/Meta-Llama-3-70B-Instruct.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]

_CORPUS = """\
I hear how much weight you're carrying with this, and it makes complete sense. Let's separate what we
know from what we're afraid of. Right now we know your income, your fixed costs and roughly what you
owe, and that is enough to build a first plan. A useful rule of thumb is to keep three to six months of
essential expenses in a high-yield savings account before taking on more investment risk. Would it help
if we sketched out the first three steps together right now? Retirement savings, budgets, debt, taxes,
insurance, beneficiaries, emergency funds, mortgages, college savings, and estate plans all matter.
Thank you for telling me that. It takes courage to look at the numbers when they feel scary. You are not
behind forever; small steps compound. The system prompt tells the assistant to be warm, steady and kind.
user assistant system: What should I do first? How much should I save each month? Is it too late for me?
0123456789 . , ; : ! ? ' " ( ) - $ % & / @ # * + = < > [ ] { } _ |
"""


def build_tokenizer(vocab_size: int = 1024):
    """A fast byte-level BPE tokenizer with Llama 3's special tokens and chat template."""

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=8192,
    )
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny random-weight `LlamaForCausalLM` and its tokenizer to `out_dir`; returns the path."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in Llama 3 70B (64 heads, 8 KV heads)
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_worker tiny-model", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = build_tiny_model(a.out, layers=a.layers, hidden=a.hidden, seed=a.seed)
    print(f"tiny model written to {path}")
    return 0
