"""What the `generate` and `list` tasks hand back, as typed models (RunPod's output).

Like a training job's result, every ending has one shape: `status`, `stage` and, when failed,
`error` (RunPod marks a job FAILED when the key is present) with the same text in `error_message`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lora_worker.runtime.contracts import Status, Verdict
from lora_worker.runtime.delivery.serving import ServingCheck


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_output(self) -> dict[str, Any]:
        out = self.model_dump(mode="json")
        if out.get("error") is None:
            out.pop("error", None)
        return out


class Reply(_Out):
    text: str
    new_tokens: int = Field(description="Tokens generated.")
    seconds: float = Field(description="Wall-clock seconds of this reply.")
    finish_reason: Literal["stop", "length"] = Field(
        description="`stop`: the model ended its turn; `length`: cut at max_new_tokens."
    )


class Exchange(_Out):
    index: int = Field(description="Position of the conversation in `messages`.")
    prompt: str = Field(description="The conversation's last user message.")
    adapted: Reply
    base: Reply | None = Field(
        None, description="The base model's reply (adapter disabled), with compare_base."
    )


class AdapterRef(_Out):
    source: Literal["job", "path", "url"]
    job_id: str | None = None
    path: str = Field(description="The adapter folder on the worker.")
    base_model: str
    base_revision: str | None = None
    archive_sha256: str | None = None
    serving: ServingCheck | None = Field(None, description="Would vLLM load it (see docs/serving.md).")


class GenerateResult(_Out):
    job_id: str | None
    task: Literal["generate"] = "generate"
    status: Status
    stage: str
    error: str | None = None
    error_message: str | None = None
    message: str | None = None
    adapter: AdapterRef | None = None
    replies: list[Exchange] = Field(default_factory=list)
    settings: dict[str, Any] = Field(
        default_factory=dict, description="max_new_tokens, temperature, top_p, seed."
    )
    timings_s: dict[str, float] = Field(default_factory=dict)
    gpu: str = "cpu"
    gpu_seconds: float = 0.0
    cost_usd: float = 0.0
    warnings: list[str] = Field(default_factory=list)


class DatasetRef(_Out):
    name: str | None = None
    version: str | None = None
    file_name: str | None = None
    sha256: str | None = None
    conversations: int | None = None
    pairs: int | None = None


class AdapterEntry(_Out):
    """One trained adapter on the volume: a row of the dashboard's model list."""

    job_id: str
    trained_at: str | None = Field(None, description="When its first attempt started (ISO 8601).")
    base_model: str | None = None
    base_revision: str | None = None
    dataset: DatasetRef = Field(default_factory=DatasetRef)
    verdict: Verdict | None = None
    headline: str | None = Field(None, description="The numbers behind the verdict.")
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Held-out loss before/after, steps, epochs."
    )
    lora_r: int | None = None
    adapter_path: str | None = None
    adapter_present: bool = Field(description="Whether the adapter folder is still on the volume.")
    archive: str | None = None
    archive_sha256: str | None = None
    size_bytes: int | None = None
    previous_adapter: str | None = Field(None, description="The job or folder it was warm-started from.")
    lineage: dict[str, Any] | None = None


class ListResult(_Out):
    job_id: str | None
    task: Literal["list"] = "list"
    status: Status
    stage: str
    error: str | None = None
    error_message: str | None = None
    adapters: list[AdapterEntry] = Field(default_factory=list)
    count: int = 0
    skipped: list[str] = Field(
        default_factory=list, description="Job folders whose result could not be read."
    )
