"""A realistic report dict for the report tests: the dataset summary of the shipped sample, and
evidence built by the real evidence code from chosen numbers."""

from __future__ import annotations

import re

from lora_worker.runtime.data.conversation import Conversation, Message, Scaffolding
from lora_worker.runtime.evaluation.end_of_turn import end_of_turn_check
from lora_worker.runtime.evaluation.evidence import Evidence, ScenarioResult
from lora_worker.runtime.evaluation.forgetting import compare, load_probe
from lora_worker.runtime.evaluation.judge import Pair, run_judge
from lora_worker.runtime.evaluation.loss import HeldOutLoss
from lora_worker.runtime.evaluation.replies import Reply
from lora_worker.runtime.evaluation.scenarios import ChatMessage
from lora_worker.runtime.evaluation.slices import slice_tables

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCRIPT = "<script>alert('x')</script>"


def loss(per: dict[str, float]) -> HeldOutLoss:
    return HeldOutLoss(mean=sum(per.values()) / len(per), tokens=500, per_conversation=per, token_budget=4096)


def make_evidence(*, adapted_wins: int = 2) -> dict:
    """Evidence built by the real evidence code from chosen numbers: 4 scenarios, a scripted judge."""
    arcs = ["grief", "grief", "conflict", "conflict"]
    convs = [
        Conversation(
            f"c{i}", (Message("user", "q"), Message("assistant", "a", train=True)), Scaffolding("p", arc, "t")
        )
        for i, arc in enumerate(arcs)
    ]
    slices = slice_tables(
        loss({"c0": 2.0, "c1": 2.2, "c2": 1.9, "c3": 2.1}),
        loss({"c0": 1.7, "c1": 1.8, "c2": 1.95, "c3": 2.0}),
        convs,
        seed=1,
    )
    scenarios = [
        ScenarioResult(
            id=f"c{i}@1",
            source="held_out",
            tags={"arc": arc},
            messages=(ChatMessage(role="user", content=f"We keep fighting about money {i}"),),
            reference="A warm reply.",
            base=f"base reply {i}",
            adapted=f"adapted reply {i}" + (SCRIPT if i == 0 else ""),
            base_stopped=True,
            adapted_stopped=i != 3,
        )  # fmt: skip
        for i, arc in enumerate(arcs)
    ]

    def ask(messages):
        text = messages[-1]["content"]
        i = int(re.search(r"money (\d)", text).group(1))
        a = re.search(r"<reply_a>\n(.*?)\n</reply_a>", text, re.S).group(1)
        winner = "adapted" if i < adapted_wins else "base"
        return f"WINNER: {'A' if a.startswith(winner) else 'B'}"

    pairs = [Pair(s.id, [m.model_dump() for m in s.messages], s.base, s.adapted, s.tags) for s in scenarios]
    judge = run_judge(
        ask, pairs, "Rubric text", kind="openai", judged_by="judge-model", seed=1, max_minutes=30
    )
    items = load_probe()[:6]
    forgetting = compare(
        items, loss({i.id: 1.0 for i in items}), loss({i.id: 1.1 for i in items}), seed=0, threshold=0.05
    )
    replies = (
        [Reply("x", 3, s.base_stopped, 8) for s in scenarios],
        [Reply("x", 3, s.adapted_stopped, 8) for s in scenarios],
    )
    eot = end_of_turn_check(*replies, max_new_tokens=8)
    ev = Evidence(
        slices=slices, scenarios=scenarios, judge=judge, judge_kind="openai", forgetting=forgetting,
        end_of_turn=eot, headline=judge.headline, notes=["the scenarios file holds 9; the first 4 were used"],
    )  # fmt: skip
    return ev.model_dump(mode="json")


def make_report(dataset: dict, **over) -> dict:
    report = {
        "job_id": "job-42",
        "status": "completed",
        "verdict": "improved",
        "headline": "held-out loss 1.8765 -> 1.2345",
        "outcome": {
            "verdict": "improved",
            "reason": "held-out loss 1.8765 -> 1.2345 (-34.2 %); 95 % interval of the per-conversation change [-0.7, -0.5]",
            "threshold": 0.005,
        },
        "base_model": "meta-llama/Meta-Llama-3-70B-Instruct",
        "created_at": "2025-06-01T12:00:00+00:00",
        "resumed": False,
        "attempts": [
            {
                "started_at": "2025-06-01T10:00:00+00:00",
                "seconds": 4030.0,
                "cost_usd": 4.68,
                "status": "running",
            }
        ],
        "dataset": dataset,
        "settings": {
            "learning_rate": 2e-4,
            "checkpoint_minutes": 30.0,
            "lora_r": 16,
            "target_modules": ["q_proj", "v_proj"],
            "eval_steps": None,
            "seed": 7,
            "upcast_fp32": False,
        },  # fmt: skip
        "metrics": {
            "train_loss": 1.1234,
            "eval_loss_before": 1.8765,
            "eval_loss_after": 1.2345,
            "perplexity_before": 6.53,
            "perplexity_after": 3.44,
            "steps": 40,
            "epochs": 3.0,
            "tokens_trained": 273702,
        },  # fmt: skip
        "history": {
            "train": [{"step": s, "loss": 2.0 - 0.02 * s} for s in range(1, 41)],
            "eval": [
                {"step": 0, "eval_loss": 1.8765},
                {"step": 20, "eval_loss": 1.4},
                {"step": 40, "eval_loss": 1.2345},
            ],
        },
        "samples": [
            {
                "conversation_id": "conv-7",
                "arc": "grief",
                "prompt": "Summarise the brief | in one line\nthen list risks",
                "reference": "A one-line summary.\n\n- risk A\n- risk B",
                "base": f"I am a model <b>and</b> {SCRIPT}",
                "adapted": "```python\nprint('hi')\n```\nShort answer.",
            }  # fmt: skip
        ],
        "timings_s": {
            "dataset_fetch": 0.01,
            "tokenize": 2.5,
            "model_load": 120.5,
            "train": 3600.0,
            "evaluate": 300.25,
        },
        "gpu": "NVIDIA H100 80GB HBM3",
        "gpu_seconds": 4030.0,
        "cost_usd": 4.68,
        "eval_cost_usd": 0.35,
        "warnings": [
            "NF4 copy at /runpod-volume/models/abc/nf4 was rebuilt",
            "only 7 optimizer steps planned",
        ],
        "adapter": {
            "path": "/runpod-volume/jobs/job-42/adapter",
            "archive": "/runpod-volume/jobs/job-42/job-42-adapter.tar.gz",
            "sha256": "0" * 64,
            "size_bytes": 167772160,
        },
        "evidence": make_evidence(),
    }
    return {**report, **over}
