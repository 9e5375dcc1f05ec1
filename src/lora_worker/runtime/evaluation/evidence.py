"""The evidence a job hands the studio besides held-out loss, gathered in one call after training:

- per-conversation held-out loss before and after, and tables by arc, persona and topic (slices);
- scenarios (the studio's file, or held-out turns across arcs) answered by the base model
  (adapter disabled) and the adapted model;
- a blind pairwise judge of those replies in both orders (`none`, `self`, `openai`);
- the end-of-turn check on those replies, and the forgetting probe;
- a headline sentence built from the judge's numbers only.

`resolve_judge` and `load_scenarios` (scenarios.py) belong before training, so that a judge that
cannot run or a broken scenarios file is refused before any GPU time; `estimate_judge` feeds the
plan.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Literal

import requests
from pydantic import BaseModel, ConfigDict, Field

from lora_worker.runtime.data import PreparedData
from lora_worker.runtime.data.conversation import Conversation
from lora_worker.runtime.device import Device
from lora_worker.runtime.evaluation.end_of_turn import EndOfTurn, end_of_turn_check
from lora_worker.runtime.evaluation.forgetting import Forgetting, forgetting_probe
from lora_worker.runtime.evaluation.judge import (
    SELF_JUDGE_NEW_TOKENS,
    JudgeError,
    JudgeReport,
    Pair,
    SelfJudge,
    build_rubric,
    run_judge,
)
from lora_worker.runtime.evaluation.judge_openai import JudgeSettings, OpenAIJudge
from lora_worker.runtime.evaluation.loss import HeldOutLoss
from lora_worker.runtime.evaluation.replies import greedy_replies
from lora_worker.runtime.evaluation.scenarios import ChatMessage, Scenario, held_out_scenarios
from lora_worker.runtime.evaluation.slices import SliceTables, slice_tables
from lora_worker.runtime.spec import JobInputError, JobSpec

JudgeKind = Literal["none", "self", "openai"]

# Assumptions behind the estimates (not measured here): greedy decoding of a 70B model in NF4 at
# batch 1 on an H100, prompt processing speed, the judge prompt's length, and one answer of a
# hosted judge endpoint.
GPU_DECODE_TOKENS_PER_S = 12.0
GPU_PREFILL_TOKENS_PER_S = 1500.0
JUDGE_PROMPT_TOKENS = 2500
OPENAI_SECONDS_PER_CALL = 8.0


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScenarioResult(_Frozen):
    id: str
    source: Literal["file", "held_out"]
    tags: dict[str, str] = Field(default_factory=dict)
    messages: tuple[ChatMessage, ...] = Field(description="The conversation the replies answer.")
    reference: str | None = None
    base: str = Field(description="Reply of the base model (adapter disabled), greedy.")
    adapted: str = Field(description="Reply of the adapted model, greedy.")
    base_stopped: bool = Field(description="The base reply ended with an end-of-turn token.")
    adapted_stopped: bool


class Evidence(_Frozen):
    slices: SliceTables
    scenarios: list[ScenarioResult] = Field(default_factory=list)
    judge: JudgeReport | None = Field(
        None, description="Null when no judge ran (judge none, or no scenario)."
    )
    judge_kind: JudgeKind = "none"
    forgetting: Forgetting | None = None
    end_of_turn: EndOfTurn | None = None
    headline: str
    notes: list[str] = Field(default_factory=list, description="What was left out or cut short, and why.")

    def brief(self) -> dict:
        """The figures without the texts, for the job's result and the dashboard (report.json keeps all)."""
        overall = self.judge.summary.overall if self.judge else None
        return {
            "headline": self.headline,
            "judge": None
            if self.judge is None
            else {
                "kind": self.judge.kind,
                "judged_by": self.judge.judged_by,
                "judged": self.judge.judged,
                "requested": self.judge.requested,
                "overall": overall.model_dump(mode="json") if overall else None,
            },
            "scenarios": len(self.scenarios),
            "slices": sorted(self.slices.tables),
            "slices_unavailable": self.slices.unavailable,
            "forgetting": None
            if self.forgetting is None
            else self.forgetting.model_dump(mode="json", include={"before", "after", "relative", "warning"}),
            "end_of_turn": None
            if self.end_of_turn is None
            else self.end_of_turn.model_dump(mode="json", include={"base_share", "adapted_share", "warning"}),
        }


class JudgeEstimate(_Frozen):
    """For the plan: how many scenarios, how many judge calls, and roughly how long."""

    kind: JudgeKind
    scenarios: int
    judged: int = Field(description="Scenarios judged within max_judge_minutes (by the estimate).")
    calls: int = Field(description="Judge calls: two per judged scenario (both orders).")
    generation_seconds: float | None = Field(None, description="Base and adapted replies; null on the CPU.")
    judge_seconds: float | None = Field(None, description="Null on the CPU or without a judge.")
    prompt_tokens_per_call: int = Field(JUDGE_PROMPT_TOKENS, description="Assumed judge prompt length.")
    warnings: list[str] = Field(default_factory=list)


# ----------------------------------------------------------------------------- before training


def resolve_judge(choice: str, settings: JudgeSettings, device: Device) -> JudgeKind:
    """`auto` -> self on CUDA, none on the CPU; `openai` needs the worker's JUDGE_* settings
    (JobInputError naming each missing one)."""
    if choice == "auto":
        return "self" if device.is_cuda else "none"
    if choice == "openai":
        problems = settings.problems()
        if problems:
            raise JobInputError([f"evaluation.judge: openai needs {p}" for p in problems])
    return choice  # type: ignore[return-value]


def count_scenarios(spec: JobSpec, scenarios: Sequence[Scenario] | None, eval_conversations) -> int:
    """Scenarios the job will answer: the file's, or held-out turns, at most num_scenarios."""
    n = spec.evaluation.num_scenarios
    if scenarios is not None:
        return min(n, len(scenarios))
    return len(held_out_scenarios(eval_conversations, n, seed=0))


def _pair_seconds(kind: JudgeKind, device: Device) -> float | None:
    if kind == "openai":
        return 2 * OPENAI_SECONDS_PER_CALL
    if kind == "self" and device.is_cuda:
        return 2 * (
            JUDGE_PROMPT_TOKENS / GPU_PREFILL_TOKENS_PER_S + SELF_JUDGE_NEW_TOKENS / GPU_DECODE_TOKENS_PER_S
        )
    return None


def estimate_judge(
    spec: JobSpec,
    device: Device,
    settings: JudgeSettings,
    *,
    scenarios: Sequence[Scenario] | None,
    eval_conversations: Sequence[Conversation],
) -> JudgeEstimate:
    """Scenarios, judge calls and time for the plan (time only on CUDA or for an endpoint)."""
    ev = spec.evaluation
    kind = resolve_judge(ev.judge, settings, device)
    n = count_scenarios(spec, scenarios, eval_conversations)
    gen_s = 2 * n * ev.max_new_tokens / GPU_DECODE_TOKENS_PER_S if device.is_cuda else None
    per_pair = _pair_seconds(kind, device) if kind != "none" else None
    judged = 0 if kind == "none" else n
    if per_pair:
        judged = min(n, math.floor(ev.max_judge_minutes * 60 / per_pair))
    warnings = []
    if kind != "none" and judged < n:
        warnings.append(
            f"evaluation.max_judge_minutes {ev.max_judge_minutes:g} allows about {judged} of {n} scenarios "
            f"to be judged (about {per_pair:.0f} s each, both orders)"
        )
    return JudgeEstimate(
        kind=kind,
        scenarios=n,
        judged=judged,
        calls=2 * judged,
        generation_seconds=None if gen_s is None else round(gen_s, 1),
        judge_seconds=None if per_pair is None else round(judged * per_pair, 1),
        warnings=warnings,
    )


# ----------------------------------------------------------------------------- after training


def _choose(spec: JobSpec, scenarios, data: PreparedData, seed: int, notes: list[str]) -> list[Scenario]:
    n = spec.evaluation.num_scenarios
    if scenarios is not None:
        if len(scenarios) > n:
            notes.append(
                f"the scenarios file holds {len(scenarios)}; the first {n} (evaluation.num_scenarios) were used"
            )
        return list(scenarios)[:n]
    chosen = held_out_scenarios(data.eval_conversations, n, seed=seed)
    if len(chosen) < n:
        notes.append(f"{len(chosen)} scenarios from held-out turns (all there are; {n} asked for)")
    return chosen


def _results(chosen: Sequence[Scenario], base, adapted) -> list[ScenarioResult]:
    return [
        ScenarioResult(
            id=s.id,
            source=s.source,
            tags=s.tags,
            messages=s.messages,
            reference=s.reference,
            base=b.text,
            adapted=a.text,
            base_stopped=b.stopped,
            adapted_stopped=a.stopped,
        )  # fmt: skip
        for s, b, a in zip(chosen, base, adapted, strict=True)
    ]


def _judge(kind, model, tokenizer, settings, session, sleep) -> tuple[Callable, str]:
    if kind == "self":
        judge = SelfJudge(model, tokenizer)
        return judge, judge.label
    judge = OpenAIJudge(settings, session=session, sleep=sleep)
    return judge, judge.label


def evidence_headline(judge: JudgeReport | None, kind: JudgeKind, scenarios: int) -> str:
    """One sentence from the numbers only."""
    if judge is not None:
        return judge.headline
    if kind == "none":
        return (
            f"{scenarios} scenario(s) were answered by both models; no judge compared them "
            "(evaluation.judge none, the default on the CPU); the replies are shown side by side."
        )
    return "No scenario was answered, so no judge compared the two models."


def gather_evidence(
    model,
    tokenizer,
    data: PreparedData,
    spec: JobSpec,
    judge_settings: JudgeSettings,
    before: HeldOutLoss | None,
    after: HeldOutLoss | None,
    *,
    device: Device,
    warnings: list[str],
    seed: int,
    scenarios: Sequence[Scenario] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    clock: Callable[[], float] = time.monotonic,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Evidence:
    """Everything above for a trained PEFT `model`. Warnings (forgetting, end of turn, judge cut
    short) are appended to `warnings`. When `should_stop()` turns True it returns what it has,
    with a note; the caller then stops the job as cancelled."""
    ev, notes = spec.evaluation, []
    slices = slice_tables(before, after, data.eval_conversations, seed=seed)
    kind = resolve_judge(ev.judge, judge_settings, device)
    chosen = _choose(spec, scenarios, data, seed, notes)
    prompts = [s.chat() for s in chosen]
    results: list[ScenarioResult] = []
    eot = judge = forgetting = None
    if prompts and not should_stop():
        adapted = greedy_replies(
            model, tokenizer, prompts, max_new_tokens=ev.max_new_tokens, warnings=warnings
        )
        with model.disable_adapter():
            base = greedy_replies(
                model, tokenizer, prompts, max_new_tokens=ev.max_new_tokens, warnings=warnings
            )
        results = _results(chosen, base, adapted)
        eot = end_of_turn_check(base, adapted, max_new_tokens=ev.max_new_tokens)
    if kind != "none" and results and not should_stop():
        ask, judged_by = _judge(kind, model, tokenizer, judge_settings, session, sleep)
        pairs = [Pair(r.id, [m.model_dump() for m in r.messages], r.base, r.adapted, r.tags) for r in results]
        judge = run_judge(
            ask, pairs, build_rubric(data.dataset.profile), kind=kind, judged_by=judged_by, seed=seed,
            max_minutes=ev.max_judge_minutes, estimated_pair_s=_pair_seconds(kind, device), clock=clock,
        )  # fmt: skip
        if judge.stopped:
            warnings.append(judge.stopped)
    if ev.forgetting_probe and not should_stop():
        measured = after or before
        forgetting = forgetting_probe(
            model, tokenizer, pad_id=tokenizer.pad_token_id, seed=seed,
            token_budget=measured.token_budget if measured else spec.micro_batch_tokens,
            max_rows=spec.hyperparameters.batch_size, max_seq_length=spec.hyperparameters.max_seq_length,
        )  # fmt: skip
    if should_stop():
        notes.append("a cancel arrived: evidence gathering stopped early")
    warnings += [w for w in (eot and eot.warning, forgetting and forgetting.warning) if w]
    return Evidence(
        slices=slices,
        scenarios=results,
        judge=judge,
        judge_kind=kind,
        forgetting=forgetting,
        end_of_turn=eot,
        headline=evidence_headline(judge, kind, len(results)),
        notes=notes,
    )


__all__ = [
    "Evidence",
    "JudgeError",
    "JudgeEstimate",
    "JudgeSettings",
    "ScenarioResult",
    "estimate_judge",
    "gather_evidence",
    "resolve_judge",
]
