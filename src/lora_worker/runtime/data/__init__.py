"""The dataset: fetch the file, load and validate it, split it, tokenize it, plan its micro-batches.

    fetched = fetch_dataset(url=..., dest_dir=...)          # or path=...
    loaded = load_dataset(fetched.path, fmt, fold=..., min_quality_score=...)
    prepared = prepare_dataset(loaded, tokenizer, max_seq_length=..., ...)
    check_data_loss(prepared.summary, max_share)
    samples = pick_samples(prepared.eval_conversations, n, seed)

Module by module: `formats` (files to conversations), `examples` (tokens and labels), `split`
(held-out set and samples), `batches` (micro-batches), `prepare` (all of it and the summary),
`fetch` (the file itself).
"""

from lora_worker.runtime.data.batches import collate, collate_packed, plan_micro_batches, plan_packed
from lora_worker.runtime.data.conversation import (
    IGNORE_INDEX,
    ConsultantProfile,
    Conversation,
    DatasetError,
    Emotions,
    FileInfo,
    LoadedDataset,
    LoadStats,
    Message,
    PreprocessingCancelled,
    Scaffolding,
    TurnMeta,
)
from lora_worker.runtime.data.examples import Example, TokenStats, build_examples, end_of_turn_ids
from lora_worker.runtime.data.fetch import DatasetFetchError, FetchedDataset, fetch_dataset
from lora_worker.runtime.data.formats import load_dataset, parse_dataset
from lora_worker.runtime.data.prepare import (
    DEFAULT_MAX_DROPPED_SHARE,
    DatasetSummary,
    LengthReport,
    PreparedData,
    QualityReport,
    SliceReport,
    Slices,
    check_data_loss,
    prepare_dataset,
)
from lora_worker.runtime.data.split import Sample, pick_samples, split_conversations

__all__ = [
    "DEFAULT_MAX_DROPPED_SHARE",
    "IGNORE_INDEX",
    "ConsultantProfile",
    "Conversation",
    "DatasetError",
    "DatasetFetchError",
    "DatasetSummary",
    "Emotions",
    "Example",
    "FetchedDataset",
    "FileInfo",
    "LengthReport",
    "LoadStats",
    "LoadedDataset",
    "Message",
    "PreparedData",
    "PreprocessingCancelled",
    "QualityReport",
    "Sample",
    "Scaffolding",
    "SliceReport",
    "Slices",
    "TokenStats",
    "TurnMeta",
    "build_examples",
    "check_data_loss",
    "collate",
    "collate_packed",
    "end_of_turn_ids",
    "fetch_dataset",
    "load_dataset",
    "parse_dataset",
    "pick_samples",
    "plan_micro_batches",
    "plan_packed",
    "prepare_dataset",
    "split_conversations",
]
