"""After training: everything the job measures about its adapter, in one call and one value.

Held-out loss after training (and, for a warm start, with the adapter it began from), the verdict
against the base model (and against that previous adapter), and the evidence: slices, scenarios
answered by both models, the judge, forgetting and end of turn. The report's before/after samples
are the first scenarios, so replies are generated once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_worker.runtime.contracts import Outcome
from lora_worker.runtime.data import PreparedData
from lora_worker.runtime.device import Device
from lora_worker.runtime.evaluation.evidence import Evidence, JudgeSettings, ScenarioResult, gather_evidence
from lora_worker.runtime.evaluation.loss import HeldOutLoss
from lora_worker.runtime.evaluation.scenarios import Scenario
from lora_worker.runtime.evaluation.verdict import decide
from lora_worker.runtime.model.prepare import held_out_with_adapter
from lora_worker.runtime.spec import JobSpec

Measure = Callable[[object], HeldOutLoss | None]


@dataclass(frozen=True)
class Assessment:
    before: HeldOutLoss | None  # the base model (adapter disabled)
    after: HeldOutLoss | None  # the trained adapter
    previous: HeldOutLoss | None  # the adapter a warm start began from, on the same held-out set
    verdict: Outcome  # after vs before
    versus_previous: Outcome | None  # after vs previous
    evidence: Evidence
    samples: list[dict]  # the report's side-by-side replies


def assess(
    model,
    tokenizer,
    data: PreparedData,
    spec: JobSpec,
    before: HeldOutLoss | None,
    *,
    measure: Measure,
    previous_adapter: Path | None,
    judge_settings: JudgeSettings,
    scenarios: Sequence[Scenario] | None,
    device: Device,
    warnings: list[str],
    should_stop: Callable[[], bool],
) -> Assessment:
    seed = spec.hyperparameters.seed
    after = measure(model)
    previous = held_out_with_adapter(model, previous_adapter, measure) if previous_adapter else None
    verdict = _decide(before, after, seed)
    if verdict.verdict == "not_measured":
        warnings.append(f"no verdict: {verdict.reason}")
    evidence = gather_evidence(
        model, tokenizer, data, spec, judge_settings, before, after, device=device, warnings=warnings,
        seed=seed, scenarios=scenarios, should_stop=should_stop,
    )  # fmt: skip
    return Assessment(
        before=before,
        after=after,
        previous=previous,
        verdict=verdict,
        versus_previous=_decide(previous, after, seed) if previous else None,
        evidence=evidence,
        samples=[_sample(s) for s in evidence.scenarios[: spec.evaluation.num_samples]],
    )


def _decide(before: HeldOutLoss | None, after: HeldOutLoss | None, seed: int) -> Outcome:
    return decide(
        before.mean if before else None,
        after.mean if after else None,
        per_conversation_before=before.per_conversation if before else None,
        per_conversation_after=after.per_conversation if after else None,
        seed=seed,
    )


def _sample(s: ScenarioResult) -> dict:
    users = [m.content for m in s.messages if m.role == "user"]
    return {
        "conversation_id": s.id,
        "arc": s.tags.get("arc"),
        "prompt": users[-1] if users else "",
        "reference": s.reference,
        "base": s.base,
        "adapted": s.adapted,
    }
