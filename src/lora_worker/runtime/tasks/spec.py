"""The inputs of the endpoint's other tasks, parsed once into frozen, strict models.

The endpoint runs three tasks; `task` selects one and training is the default:

- `train` (runtime/spec.py): train an adapter;
- `generate`: replies of a trained adapter (and, when asked, of the base model) to chat prompts;
- `list`: the adapters on the volume, from their stored results.

The rules are those of the training input: a misspelled key is an error, "3" is not a number, every
problem is listed at once naming its field, secrets are refused, and URLs follow `net.check_url`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lora_worker.runtime.net import UrlNotAllowed, check_url
from lora_worker.runtime.spec import JobInputError, JobSpec, parse_input

TASKS: tuple[str, ...] = ("train", "generate", "list")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def task_of(raw: Any) -> str:
    """The task a job input asks for: `train` when it names none (or is not an object, which the
    training parser reports); JobInputError naming the valid tasks for anything else."""
    if not isinstance(raw, dict) or raw.get("task") is None:
        return "train"
    task = raw["task"]
    if task in TASKS:
        return task
    raise JobInputError([f"task: unknown task {task!r}; valid tasks: {', '.join(TASKS)}"])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1, max_length=100_000)


def _job_id(v: str | None) -> str | None:
    return JobSpec._safe_job_id(v)


def _url(v: str | None) -> str | None:
    if v is None:
        return None
    try:
        return check_url(v, allow_loopback_http=True)
    except UrlNotAllowed as err:
        raise ValueError(str(err)) from None


class GenerateSpec(_Strict):
    """Replies of a trained adapter to chat prompts; with `compare_base`, the base model's too."""

    task: Literal["generate"]
    job_id: str | None = Field(None, description="Names this request in events; default: the RunPod job id.")
    adapter: str = Field(
        min_length=1,
        max_length=2048,
        description="A training job's id on this volume, an adapter folder (relative paths are on the volume), "
        "or the https URL of a tar.gz archive holding one (a job's archive).",
    )
    adapter_sha256: str | None = Field(
        None, description="Expected SHA-256 of the archive at `adapter` (a job's `adapter.sha256`)."
    )
    messages: list[list[ChatMessage]] = Field(
        min_length=1, max_length=32, description="Conversations, each ending with a user message."
    )
    max_new_tokens: int = Field(256, ge=1, le=4096, description="Longest reply, in tokens.")
    temperature: float = Field(
        0.0, ge=0.0, le=2.0, description="0: greedy (deterministic); above 0: sampled."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (with temperature > 0).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for sampling; base and adapter use the same.")
    compare_base: bool = Field(False, description="Also reply with the base model (the adapter disabled).")
    base_model: str | None = Field(
        None, description="Override the base model the adapter names (a Hub id or a local folder)."
    )
    base_model_revision: str | None = Field(None, description="Hub revision of `base_model`.")
    webhook_url: str | None = Field(
        None, description="Signed progress webhooks go here (needs WEBHOOK_SECRET)."
    )

    @field_validator("job_id")
    @classmethod
    def _safe_job_id(cls, v: str | None) -> str | None:
        return _job_id(v)

    @field_validator("webhook_url")
    @classmethod
    def _webhook_https(cls, v: str | None) -> str | None:
        return _url(v)

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, v: str) -> str:
        if v.startswith(("http://", "https://")):
            return _url(v) or v
        if "://" in v:
            raise ValueError("must be a job id, a folder, or an https:// URL")
        return v

    @field_validator("adapter_sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and not _SHA256.fullmatch(v):
            raise ValueError("must be 64 lower-case hex digits")
        return v

    @field_validator("messages")
    @classmethod
    def _conversations(cls, v: list[list[ChatMessage]]) -> list[list[ChatMessage]]:
        problems = []
        for i, conversation in enumerate(v):
            if not conversation:
                problems.append(f"conversation {i} is empty")
            elif conversation[-1].role != "user":
                problems.append(
                    f"conversation {i} ends with a message of role {conversation[-1].role!r}, not 'user'"
                )
            if any(m.role == "system" for m in conversation[1:]):
                problems.append(f"conversation {i} has a system message after its first message")
        if problems:
            raise ValueError("; ".join(problems))
        return v

    def chats(self) -> list[list[dict[str, str]]]:
        return [[m.model_dump() for m in conversation] for conversation in self.messages]


class ListSpec(_Strict):
    """The adapters on the volume, newest first."""

    task: Literal["list"]
    job_id: str | None = Field(None, description="Names this request; default: the RunPod job id.")
    limit: int = Field(200, ge=1, le=10_000, description="At most this many adapters.")

    @field_validator("job_id")
    @classmethod
    def _safe_job_id(cls, v: str | None) -> str | None:
        return _job_id(v)


def parse_generate_input(raw: Any, *, runpod_job_id: str | None = None) -> GenerateSpec:
    """Parse a `generate` input; JobInputError listing every problem."""
    return parse_input(GenerateSpec, raw, runpod_job_id=runpod_job_id)


def parse_list_input(raw: Any, *, runpod_job_id: str | None = None) -> ListSpec:
    """Parse a `list` input; JobInputError listing every problem."""
    return parse_input(ListSpec, raw, runpod_job_id=runpod_job_id)
