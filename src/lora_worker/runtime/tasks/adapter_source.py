"""Find an adapter to run or to start training from: a job's on this volume, a folder, or an archive
at an https URL.

- a job id: `<volume>/jobs/<id>/adapter`, only once the job's stored result says `completed` (not a
  dry run); the job's folder is only read, so a running job is never touched;
- a folder: relative paths are looked up on the volume first;
- a URL: downloaded with the dataset download's protections (URL rules on every redirect hop, a
  deadline, a size cap, free space checked, no partial file left), its SHA-256 checked when one is
  given, and extracted with tarfile's `data` filter (no absolute paths, no `..`, no links leading
  out, no devices), after its member count and unpacked size are checked against caps.

Whatever the source, the folder must hold adapter_config.json for a LoRA adapter and its weights as
adapter_model.safetensors; a folder with pickled weights (*.bin, *.pt, *.pth) is refused, since
loading a pickle can run code.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lora_worker.runtime.data.fetch import DatasetFetchError, download_dataset
from lora_worker.runtime.delivery.lineage import PreviousAdapter
from lora_worker.runtime.delivery.serving import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lora_worker.runtime.files import DiskSpaceError, read_json, require_free_space
from lora_worker.runtime.model.layout import custom_code_problem
from lora_worker.runtime.spec import JobSpec

MAX_ARCHIVE_BYTES = 8 << 30  # 8 GiB: an r=64 bf16 adapter on a 70B Llama is about 1.7 GB
MAX_UNPACKED_BYTES = 16 << 30  # what the archive may unpack to (a decompression bomb stops here)
MAX_MEMBERS = 10_000
ARCHIVE_DEADLINE_S = 1800.0
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class AdapterSourceError(ValueError):
    """The adapter cannot be found or used; the message starts with the input field."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.problems = [message]
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class AdapterSource:
    kind: Literal["job", "path", "url"]
    path: Path  # the folder holding adapter_config.json and adapter_model.safetensors
    config: dict[str, Any]  # adapter_config.json
    job_id: str | None = None  # the training job it came from, when known
    base_model: str | None = None  # Hub id (or folder) of the base model it was trained on
    base_revision: str | None = None  # that base's commit, when known
    dataset_sha256: str | None = None
    archive_sha256: str | None = None  # SHA-256 of the archive it was extracted from (url)

    def as_previous(self) -> PreviousAdapter:
        """This adapter as the lineage's `previous_adapter` of a job warm-started from it."""
        return PreviousAdapter(
            job_id=self.job_id,
            path=str(self.path),
            dataset_sha256=self.dataset_sha256,
            base_model=self.base_model,
            base_revision=self.base_revision,
        )


def is_url(ref: str) -> bool:
    return ref.startswith(("https://", "http://"))


def find_adapter(ref: str, volume_dir: Path, *, field: str = "adapter") -> AdapterSource:
    """A completed job's adapter (by job id) or an adapter folder; AdapterSourceError otherwise."""
    volume_dir = Path(volume_dir)
    if _is_job_id(ref) and (volume_dir / "jobs" / ref).is_dir():
        return job_adapter(ref, volume_dir, field=field)
    folder = Path(ref).expanduser()
    if not folder.is_absolute() and (volume_dir / folder).is_dir():
        folder = volume_dir / folder
    if folder.is_dir():
        config = check_adapter_folder(folder.resolve(), field=field)
        return AdapterSource(
            "path",
            folder.resolve(),
            config,
            base_model=_base_of(config),
            base_revision=config.get("revision"),
        )
    if _is_job_id(ref):
        raise AdapterSourceError(
            field, f"no job {ref!r} on this volume ({volume_dir / 'jobs' / ref}) and no folder {ref!r}"
        )
    raise AdapterSourceError(field, f"no such folder: {ref}")


def job_adapter(job_id: str, volume_dir: Path, *, field: str = "adapter") -> AdapterSource:
    """The adapter of a completed training job on this volume (its folder is only read)."""
    job_dir = Path(volume_dir) / "jobs" / job_id
    result = read_json(job_dir / "result.json")
    if not isinstance(result, dict):
        raise AdapterSourceError(
            field, f"job {job_id!r} has no result yet: it is running, or it stopped before writing one"
        )
    if result.get("status") != "completed" or result.get("dry_run") or result.get("task", "train") != "train":
        what = (
            "a dry run" if result.get("dry_run") else f"{result.get('task', 'train')} {result.get('status')}"
        )
        raise AdapterSourceError(field, f"job {job_id!r} has no trained adapter (its result is {what})")
    adapter = job_dir / "adapter"
    config = check_adapter_folder(adapter, field=field)
    lineage = result.get("lineage") if isinstance(result.get("lineage"), dict) else {}
    base = lineage.get("base_model") if isinstance(lineage.get("base_model"), dict) else {}
    dataset = lineage.get("dataset") if isinstance(lineage.get("dataset"), dict) else {}
    return AdapterSource(
        "job",
        adapter,
        config,
        job_id=job_id,
        base_model=base.get("model_id") or _base_of(config),
        base_revision=base.get("revision") or config.get("revision"),
        dataset_sha256=dataset.get("sha256"),
        archive_sha256=(result.get("adapter") or {}).get("sha256")
        if isinstance(result.get("adapter"), dict)
        else None,
    )


def fetch_adapter(
    url: str,
    work_dir: Path,
    *,
    expected_sha256: str | None = None,
    field: str = "adapter",
    max_bytes: int = MAX_ARCHIVE_BYTES,
    max_unpacked_bytes: int = MAX_UNPACKED_BYTES,
    deadline_s: float = ARCHIVE_DEADLINE_S,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> AdapterSource:
    """Download the archive at `url` into `work_dir`, check it, extract it safely, find the adapter."""
    work_dir = Path(work_dir)
    try:
        got = download_dataset(
            url, work_dir / "download", max_bytes=max_bytes, deadline_s=deadline_s,
            should_stop=should_stop, on_progress=on_progress,
        )  # fmt: skip
    except DatasetFetchError as err:
        raise AdapterSourceError(field, err.problems[0]) from None
    try:
        if expected_sha256 is not None and got.sha256 != expected_sha256:
            raise AdapterSourceError(
                field,
                f"the archive's SHA-256 is {got.sha256}, not the expected {expected_sha256} (adapter_sha256)",
            )
        root = extract_archive(got.path, work_dir / "extracted", max_unpacked_bytes, field=field)
    finally:
        got.path.unlink(missing_ok=True)  # the extracted copy is what is used
    folder = adapter_folder(root, field=field)
    config = check_adapter_folder(folder, field=field)
    return AdapterSource(
        "url", folder, config, base_model=_base_of(config), base_revision=config.get("revision"),
        archive_sha256=got.sha256,
    )  # fmt: skip


def extract_archive(archive: Path, dest: Path, max_unpacked_bytes: int, *, field: str = "adapter") -> Path:
    """Extract a tar archive (any compression tarfile reads) into `dest` with the `data` filter."""
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS:
                raise AdapterSourceError(
                    field, f"the archive has {len(members)} entries, more than {MAX_MEMBERS}"
                )
            unpacked = sum(m.size for m in members if m.isfile())
            if unpacked > max_unpacked_bytes:
                raise AdapterSourceError(
                    field,
                    f"the archive unpacks to {unpacked:,} bytes, more than the limit of {max_unpacked_bytes:,}",
                )
            dest.mkdir(parents=True, exist_ok=True)
            require_free_space(dest, unpacked, "the adapter archive")
            tar.extractall(dest, filter="data")
    except tarfile.FilterError as err:  # an absolute path, `..`, a link leading out, a device
        raise AdapterSourceError(field, f"the archive is refused: {err}") from None
    except (tarfile.TarError, EOFError, OSError) as err:
        if isinstance(err, DiskSpaceError):
            raise AdapterSourceError(field, str(err)) from None
        raise AdapterSourceError(field, f"not a readable tar archive: {type(err).__name__}: {err}") from None
    return dest


def adapter_folder(root: Path, *, field: str = "adapter") -> Path:
    """The folder of an extracted archive that holds adapter_config.json: the root, or one level down
    (a job's archive holds `adapter/` and `report/`)."""
    if (root / ADAPTER_CONFIG).is_file():
        return root
    found = sorted(p.parent for p in root.glob(f"*/{ADAPTER_CONFIG}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise AdapterSourceError(
            field, f"the archive holds no {ADAPTER_CONFIG} (at its top or one folder down)"
        )
    raise AdapterSourceError(field, f"the archive holds several adapters: {', '.join(p.name for p in found)}")


def check_adapter_folder(folder: Path, *, field: str = "adapter") -> dict[str, Any]:
    """The folder's adapter_config.json, once the folder is a usable LoRA adapter (safetensors weights,
    no pickles, no custom tokenizer code)."""
    config = read_json(folder / ADAPTER_CONFIG)
    if not isinstance(config, dict):
        raise AdapterSourceError(field, f"{folder} has no readable {ADAPTER_CONFIG}")
    if config.get("peft_type") != "LORA":
        raise AdapterSourceError(field, f"{folder} holds a {config.get('peft_type')!r} adapter, not LoRA")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterSourceError(
            field, f"{folder} holds pickled files ({', '.join(pickles)}); only safetensors weights are loaded"
        )
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise AdapterSourceError(field, f"{folder} has no {ADAPTER_WEIGHTS}")
    problem = custom_code_problem(folder)
    if problem:
        raise AdapterSourceError(
            field, f"{folder}: {problem}; the worker never runs code from a model folder"
        )
    return config


def _base_of(config: dict[str, Any]) -> str | None:
    base = config.get("base_model_name_or_path")
    return str(base) if base else None


def _is_job_id(ref: str) -> bool:
    try:
        return JobSpec._safe_job_id(ref) is not None
    except ValueError:
        return False
