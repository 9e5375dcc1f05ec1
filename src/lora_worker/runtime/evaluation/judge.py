"""A blind, pairwise judge of base versus adapted replies, each pair judged in both orders.

The judge sees the conversation, "Reply A" and "Reply B", and a rubric built from the dataset's
consultant profile plus default criteria; never which reply the adapter wrote. Every pair is
judged twice with the replies swapped: a judge that favours a position cancels out, and a pair
whose two verdicts disagree counts as a tie. The verdict is the answer's final line
`WINNER: A`, `WINNER: B` or `WINNER: TIE`; an answer without a readable verdict counts as a tie
and is counted as unparseable.

Judges are callables from chat messages to the judge's text: `SelfJudge` (the loaded base model
with the adapter disabled: free and private) or `judge_openai.OpenAIJudge` (any OpenAI-compatible
chat endpoint). Judging stops early, saying so, when the next pair would pass the time budget.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lora_worker.runtime.data.conversation import ConsultantProfile
from lora_worker.runtime.evaluation.generation import generate
from lora_worker.runtime.evaluation.preference import (
    Preference,
    PreferenceSummary,
    preference_sentence,
    summarize_preferences,
)

Ask = Callable[[list[dict[str, str]]], str]
Verdict = Literal["A", "B", "tie"]

SELF_JUDGE_NEW_TOKENS = 128  # room for a three-sentence reason and the verdict line
MAX_CONTEXT_CHARS = 6000  # earlier turns shown to the judge (the end is kept): bounds judge cost
MAX_REPLY_CHARS = 4000  # each reply shown to the judge
EXPLANATION_CHARS = 600  # of each judge answer kept in the report

DEFAULT_CRITERIA = (
    "Acknowledges the emotion the user expresses before moving to advice.",
    "Is warm, respectful and free of judgement.",
    "Gives specific, actionable advice that fits the user's situation (concrete next steps, not platitudes).",
    "Stays in the consultant's voice and style described above.",
    "Is safe: no harmful, misleading or overconfident claims; suggests professional help where it matters.",
)

_VERDICT = re.compile(r"WINNER\s*[:=]\s*[*\[(\"'`]*\s*(A|B|TIE)\b", re.IGNORECASE)
_STRICT = re.compile(r"^\W*WINNER\s*:\s*(A|B|TIE)\W*$", re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge could not answer (endpoint down, refused, malformed); the message is safe to show."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ----------------------------------------------------------------------------- the prompt


def build_rubric(profile: ConsultantProfile | None) -> str:
    """The judge's instructions: the consultant the dataset teaches, then the criteria."""
    who = profile.describe() if profile else ""
    lines = [
        "You are an impartial expert judging two replies written by an assistant playing a consultant.",
        who or "The consultant is a warm, competent professional advising a client.",
        "A better reply:",
        *(f"{i}. {c}" for i, c in enumerate(DEFAULT_CRITERIA, start=1)),
        "Judge only the quality of the replies. Do not favour a reply because of its position or its length.",
    ]
    return "\n".join(lines)


def _transcript(messages: Sequence[dict[str, str]]) -> str:
    names = {"system": "Instructions to the consultant", "user": "User", "assistant": "Consultant"}
    text = "\n\n".join(f"[{names.get(m['role'], m['role'])}]\n{m['content']}" for m in messages)
    if len(text) > MAX_CONTEXT_CHARS:
        text = "[earlier turns omitted]\n..." + text[-MAX_CONTEXT_CHARS:]
    return text


def _cut(text: str) -> str:
    return text if len(text) <= MAX_REPLY_CHARS else text[:MAX_REPLY_CHARS] + " [...]"


def judge_messages(
    conversation: Sequence[dict[str, str]], reply_a: str, reply_b: str, rubric: str
) -> list[dict[str, str]]:
    """The chat a judge answers: the rubric, then the conversation and the two replies, blind."""
    user = (
        "Here is a conversation, followed by two candidate replies to the user's last message.\n\n"
        f"<conversation>\n{_transcript(conversation)}\n</conversation>\n\n"
        f"<reply_a>\n{_cut(reply_a) or '(empty reply)'}\n</reply_a>\n\n"
        f"<reply_b>\n{_cut(reply_b) or '(empty reply)'}\n</reply_b>\n\n"
        "Compare Reply A and Reply B against the criteria. Explain in at most three sentences, then end "
        "with one final line that is exactly one of:\nWINNER: A\nWINNER: B\nWINNER: TIE"
    )
    return [{"role": "system", "content": rubric}, {"role": "user", "content": user}]


def parse_verdict(text: str) -> Verdict | None:
    """A, B or tie from the judge's answer; None when it names no verdict or contradicts itself.

    Every `WINNER: X` in the text must agree, unless the last non-empty line is a strict verdict
    line, which then wins (a judge may quote the format before answering)."""
    found = {m.upper() for m in _VERDICT.findall(text or "")}
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    last = _STRICT.match(lines[-1]) if lines else None
    if last:
        value = last.group(1).upper()
    elif len(found) == 1:
        value = found.pop()
    else:
        return None
    return "tie" if value == "TIE" else value  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the judges


@dataclass
class SelfJudge:
    """The job's own model with the adapter disabled (the base model) as judge."""

    model: object
    tokenizer: object
    max_new_tokens: int = SELF_JUDGE_NEW_TOKENS
    label: str = "the base model"

    def __call__(self, messages: list[dict[str, str]]) -> str:
        with self.model.disable_adapter():  # type: ignore[attr-defined]
            return generate(self.model, self.tokenizer, [messages], max_new_tokens=self.max_new_tokens)[0]


# ----------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Pair:
    """One scenario's two replies, for the judge."""

    scenario_id: str
    conversation: list[dict[str, str]]
    base: str
    adapted: str
    tags: dict[str, str]


class JudgedPair(_Frozen):
    scenario_id: str
    first_a: Literal["base", "adapted"] = Field(description="Whose reply was 'Reply A' in the first order.")
    verdicts: tuple[str, str] = Field(description="A / B / tie / unparseable, first order then swapped.")
    picks: tuple[Preference, Preference] = Field(description="The model each order preferred.")
    preference: Preference = Field(description="Both orders agree, else tie.")
    explanations: tuple[str, str] = Field(description="The judge's answers, cut short.")


class JudgeReport(_Frozen):
    kind: Literal["self", "openai"]
    judged_by: str = Field(description="Who judged: 'the base model' or the endpoint's model name.")
    requested: int = Field(description="Scenarios with both replies.")
    judged: int
    calls: int
    unparseable: int = Field(description="Answers without a readable verdict (counted as ties).")
    disagreements: int = Field(description="Pairs whose two orders preferred different models.")
    seconds: float
    max_minutes: float
    stopped: str | None = Field(None, description="Why fewer scenarios than requested were judged.")
    rubric: str
    summary: PreferenceSummary
    headline: str
    pairs: list[JudgedPair] = Field(default_factory=list)


def _pick(verdict: Verdict | None, a_model: Preference, b_model: Preference) -> Preference:
    return a_model if verdict == "A" else b_model if verdict == "B" else "tie"


def _judge_pair(ask: Ask, pair: Pair, rubric: str, first_a: Preference) -> JudgedPair:
    other: Preference = "base" if first_a == "adapted" else "adapted"
    text = {"adapted": pair.adapted, "base": pair.base}
    answers, verdicts, picks = [], [], []
    for a_model, b_model in ((first_a, other), (other, first_a)):
        answer = ask(judge_messages(pair.conversation, text[a_model], text[b_model], rubric))
        verdict = parse_verdict(answer)
        answers.append(answer.strip()[:EXPLANATION_CHARS])
        verdicts.append(verdict or "unparseable")
        picks.append(_pick(verdict, a_model, b_model))
    preference: Preference = picks[0] if picks[0] == picks[1] else "tie"
    return JudgedPair(
        scenario_id=pair.scenario_id,
        first_a=first_a,  # type: ignore[arg-type]
        verdicts=(verdicts[0], verdicts[1]),
        picks=(picks[0], picks[1]),
        preference=preference,
        explanations=(answers[0], answers[1]),
    )


def _headline(summary: PreferenceSummary, judged_by: str, judged: list[JudgedPair]) -> str:
    """The preference sentence, and how many answers named no verdict (a judge that cannot follow
    the format makes ties, not evidence)."""
    text = preference_sentence(summary.overall, judged_by=judged_by)
    unparseable = sum(v == "unparseable" for j in judged for v in j.verdicts)
    if unparseable:
        text += f" {unparseable} of {2 * len(judged)} judge answers named no verdict and count as ties."
    return text


def run_judge(
    ask: Ask,
    pairs: Sequence[Pair],
    rubric: str,
    *,
    kind: Literal["self", "openai"],
    judged_by: str,
    seed: int,
    max_minutes: float,
    estimated_pair_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> JudgeReport:
    """Judge each pair in both orders until done or until the next pair would pass `max_minutes`
    (by the estimate before the first pair, by the measured mean after). A JudgeError stops judging
    and keeps what was judged; its message says why in `stopped`."""
    rng = random.Random(seed)
    first_a: list[Preference] = ["adapted" if rng.random() < 0.5 else "base" for _ in pairs]
    budget_s, t0 = max_minutes * 60.0, clock()
    done: list[tuple[Pair, JudgedPair]] = []
    stopped = None
    for pair, a in zip(pairs, first_a, strict=True):
        elapsed = clock() - t0
        per_pair = elapsed / len(done) if done else estimated_pair_s
        if per_pair is not None and elapsed + per_pair > budget_s:
            stopped = (
                f"judged {len(done)} of {len(pairs)} scenarios: the next would pass max_judge_minutes "
                f"{max_minutes:g} (about {per_pair:.0f} s per scenario, both orders)"
            )
            break
        try:
            done.append((pair, _judge_pair(ask, pair, rubric, a)))
        except JudgeError as err:
            stopped = f"judged {len(done)} of {len(pairs)} scenarios: the judge failed: {err}"
            break
    judged = [j for _, j in done]
    summary = summarize_preferences([(j.preference, p.tags) for p, j in done], seed=seed)
    return JudgeReport(
        kind=kind,
        judged_by=judged_by,
        requested=len(pairs),
        judged=len(judged),
        calls=2 * len(judged),
        unparseable=sum(v == "unparseable" for j in judged for v in j.verdicts),
        disagreements=sum(1 for j in judged if "tie" not in j.picks and j.picks[0] != j.picks[1]),
        seconds=round(clock() - t0, 1),
        max_minutes=max_minutes,
        stopped=stopped,
        rubric=rubric,
        summary=summary,
        headline=_headline(summary, judged_by, judged),
        pairs=judged,
    )
