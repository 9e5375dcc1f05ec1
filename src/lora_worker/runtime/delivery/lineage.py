"""Where an adapter came from: the dataset file, the base model commit, the job's settings and the
adapter it started from. Built once per job and carried unchanged by the result, the report and the
model card, so "which data and which base made this model" has one answer everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lora_worker.runtime.data.fetch import FetchedDataset
from lora_worker.runtime.data.prepare import DatasetSummary
from lora_worker.runtime.model.resolve import ModelMeta
from lora_worker.runtime.spec import JobSpec


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetLineage(_Frozen):
    file_name: str = Field(description="The dataset file's name.")
    source: str = Field(description="The path, or the URL without its query (no signature).")
    name: str | None = Field(None, description="training_file_metadata.file_name, if any.")
    version: str | None = Field(None, description="training_file_metadata.version, if any.")
    format: str = Field(description="brightrun-lora-v4 or chat-jsonl.")
    sha256: str = Field(description="SHA-256 of the file's bytes.")
    size_bytes: int
    conversations: int = Field(description="Conversations in the file.")
    pairs: int = Field(description="Prompt/response pairs (brightrun) or assistant targets (JSONL).")
    train_conversations: int
    eval_conversations: int
    trainable_tokens: int = Field(description="Labelled tokens of the training examples.")


class BaseModelLineage(_Frozen):
    model_id: str = Field(description="Hugging Face repo id (or the folder, for a local base model).")
    revision: str | None = Field(
        None, description="The commit the weights came from (None for a local folder)."
    )
    source: str = Field(description="local_dir, runpod_cache, volume_cache or hub.")


class PreviousAdapter(_Frozen):
    """The adapter a warm-started job began from."""

    job_id: str | None = Field(None, description="Its job on this volume, when it came from one.")
    path: str = Field(description="Its folder.")
    dataset_sha256: str | None = Field(
        None, description="SHA-256 of the dataset it was trained on, if known."
    )
    base_model: str | None = None
    base_revision: str | None = None


class Lineage(_Frozen):
    job_id: str
    dataset: DatasetLineage
    base_model: BaseModelLineage
    settings: dict[str, Any] = Field(description="hyperparameters, training and data options of the job.")
    previous_adapter: PreviousAdapter | None = None


def build_lineage(
    spec: JobSpec,
    dataset: FetchedDataset,
    summary: DatasetSummary,
    meta: ModelMeta,
    previous: PreviousAdapter | None = None,
) -> Lineage:
    """The lineage of the adapter `spec` trains: pure, from values the job already holds."""
    return Lineage(
        job_id=str(spec.job_id),
        dataset=DatasetLineage(
            file_name=Path(dataset.path).name,
            source=dataset.source,
            name=summary.name,
            version=summary.version,
            format=summary.format,
            sha256=dataset.sha256,
            size_bytes=dataset.size_bytes,
            conversations=summary.conversations,
            pairs=summary.pairs,
            train_conversations=summary.train_conversations,
            eval_conversations=summary.eval_conversations,
            trainable_tokens=summary.trainable_tokens,
        ),
        base_model=BaseModelLineage(model_id=meta.model_id, revision=meta.revision, source=meta.source),
        settings={
            "hyperparameters": spec.hyperparameters.model_dump(mode="json"),
            "training": spec.training.model_dump(mode="json"),
            "data": spec.data.model_dump(mode="json"),
        },
        previous_adapter=previous,
    )
