"""The `generate` task: a trained adapter's replies by job id, folder or archive URL, compared with the
base model's; its input rules; the safe download and extraction of an archive; the handler's dispatch."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from pathlib import Path

import pytest
from adapter_builders import HUB_ID, NO_HUB, SHA, runpod_cached_model
from conftest import LoopbackServer, Recorder, small_job
from safetensors import safe_open

from lora_worker.runtime import handler as worker
from lora_worker.runtime.job import run_job
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.spec import JobInputError
from lora_worker.runtime.tasks.adapter_source import AdapterSourceError, fetch_adapter, find_adapter
from lora_worker.runtime.tasks.generate import run_generate
from lora_worker.runtime.tasks.listing import run_list
from lora_worker.runtime.tasks.spec import parse_generate_input, task_of

CHATS = [
    [{"role": "user", "content": "I feel ashamed about my credit card debt."}],
    [
        {"role": "system", "content": "You are a calm financial planner."},
        {"role": "user", "content": "Should I pay off debt or build an emergency fund first?"},
    ],
]


def generate_input(adapter: str, **over) -> dict:
    return {"task": "generate", "adapter": adapter, "messages": CHATS, "max_new_tokens": 16, **over}


# ---------------------------------------------------------------------------------- input rules


def test_the_task_is_train_by_default_and_an_unknown_one_names_the_valid_ones():
    assert task_of({"dataset_path": "x"}) == "train" and task_of(None) == "train"
    assert task_of({"task": "generate"}) == "generate"
    with pytest.raises(JobInputError, match=r"task: unknown task 'chat'; valid tasks: train, generate, list"):
        task_of({"task": "chat"})


def test_the_handler_refuses_an_unknown_task_naming_the_valid_ones(monkeypatch, tmp_path):
    monkeypatch.setattr(worker, "_settings", Settings.from_env({"VOLUME_DIR": str(tmp_path)}))
    out = asyncio.run(worker.handler({"id": "rp-1", "input": {"task": "chat"}}))
    assert out["status"] == "failed" and "valid tasks: train, generate, list" in out["error"]
    assert not (tmp_path / "jobs").exists()


def test_every_problem_of_a_generate_input_is_listed_by_field():
    raw = {
        "task": "generate",
        "adapter": "http://storage.example.com/a.tar.gz",
        "messages": [[{"role": "assistant", "content": "hi"}], [{"role": "user", "content": ""}]],
        "max_new_tokens": "3",
        "temperature": 5,
        "hf_token": "hf_secret",
        "webhook_url": "ftp://x",
        "colour": "red",
    }
    with pytest.raises(JobInputError) as err:
        parse_generate_input(raw, runpod_job_id="rp-1")
    problems = err.value.problems
    assert problems[0].startswith("hf_token: secrets are not accepted in the job input")
    text = "\n".join(problems)
    for expected in (
        "adapter: must be an https:// URL",
        "messages.1.0.content: String should have at least 1 character",
        "max_new_tokens: Input should be a valid integer",
        "temperature: Input should be less than or equal to 2",
        "webhook_url: must be an https:// URL",
        "colour: unknown field",
    ):
        assert expected in text, text
    assert "hf_secret" not in str(err.value)

    with pytest.raises(
        JobInputError, match=r"messages: conversation 0 ends with a message of role 'assistant'"
    ):
        parse_generate_input(
            {**generate_input("j"), "messages": [[{"role": "assistant", "content": "hi"}]]}, runpod_job_id="r"
        )
    spec = parse_generate_input(generate_input("job-1"), runpod_job_id="rp-9")
    assert spec.job_id == "rp-9" and spec.temperature == 0.0 and not spec.compare_base


# ---------------------------------------------------------------------------------- archives


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.fixture
def served():
    """A real loopback HTTP server answering GET /<name> with the bytes put in `files`."""
    files: dict[str, bytes] = {}

    def respond(method, path, headers, body):
        name = path.split("?")[0].lstrip("/")
        return (200, files[name]) if name in files else 404

    server = LoopbackServer(respond)
    yield server, files
    server.close()


@pytest.mark.parametrize(
    ("member", "refused"),
    [
        (_file("../escape.txt", b"x"), "is outside the destination"),
        (_link("adapter/link", "/etc/passwd"), "'adapter/link' is a link to an absolute path"),
        (_link("adapter/up", "../../x"), "which is outside the destination"),
        (
            _link("adapter/hard", "/etc/passwd", tarfile.LNKTYPE),
            "'adapter/hard' is a link to an absolute path",
        ),
        (_link("adapter/hard2", "../../etc/passwd", tarfile.LNKTYPE), "outside the destination"),
    ],
)
def test_an_archive_that_would_write_outside_its_folder_is_refused(served, tmp_path, member, refused):
    server, files = served
    files["a.tar.gz"] = _tar([_file("adapter/adapter_config.json", b"{}"), member])
    with pytest.raises(AdapterSourceError, match=refused) as err:
        fetch_adapter(f"{server.base}/a.tar.gz", tmp_path / "work")
    assert str(err.value).startswith("adapter: the archive is refused")
    assert not (tmp_path / "escape.txt").exists()
    assert list((tmp_path / "work" / "download").iterdir()) == []  # the download is not kept


def test_an_absolute_member_lands_inside_the_extraction_folder(served, tmp_path):
    server, files = served
    target = tmp_path / "outside" / "planted.txt"
    files["a.tar.gz"] = _tar([_file(str(target), b"x"), _file("adapter/adapter_config.json", b"{}")])
    with pytest.raises(AdapterSourceError, match="holds a None adapter, not LoRA"):
        fetch_adapter(f"{server.base}/a.tar.gz", tmp_path / "work")
    assert not target.exists()
    assert (tmp_path / "work" / "extracted" / str(target).lstrip("/")).read_bytes() == b"x"


def test_an_archive_download_is_checked_against_its_sha256_and_its_unpacked_size(served, tmp_path):
    server, files = served
    files["a.tar.gz"] = _tar([_file("adapter/adapter_config.json", b"{}")])
    with pytest.raises(AdapterSourceError, match="not the expected " + "0" * 64):
        fetch_adapter(f"{server.base}/a.tar.gz", tmp_path / "w1", expected_sha256="0" * 64)
    files["big.tar.gz"] = _tar([_file("adapter/adapter_model.safetensors", b"\0" * 4096)])
    with pytest.raises(AdapterSourceError, match="unpacks to 4,096 bytes, more than the limit of 1,000"):
        fetch_adapter(f"{server.base}/big.tar.gz", tmp_path / "w2", max_unpacked_bytes=1000)
    files["bad.tar.gz"] = b"this is not a tar archive"
    with pytest.raises(AdapterSourceError, match="not a readable tar archive"):
        fetch_adapter(f"{server.base}/bad.tar.gz", tmp_path / "w3")
    with pytest.raises(AdapterSourceError, match=r"adapter: HTTP 404"):
        fetch_adapter(f"{server.base}/missing.tar.gz?X-Amz-Signature=sekrit", tmp_path / "w4")


def test_a_folder_with_pickled_weights_or_without_safetensors_is_refused(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(AdapterSourceError, match="has no adapter_model.safetensors"):
        find_adapter(str(folder), tmp_path)
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterSourceError, match=r"pickled files \(adapter_model.bin\)"):
        find_adapter(str(folder), tmp_path)
    with pytest.raises(AdapterSourceError, match="no job 'job-404' on this volume"):
        find_adapter("job-404", tmp_path)


def test_a_job_that_has_not_completed_has_no_adapter_to_run(tmp_path):
    running = tmp_path / "jobs" / "running"
    running.mkdir(parents=True)
    with pytest.raises(AdapterSourceError, match="job 'running' has no result yet: it is running"):
        find_adapter("running", tmp_path)
    for name, result, says in (
        ("dry", {"status": "completed", "dry_run": True}, "its result is a dry run"),
        ("failed", {"status": "failed"}, "its result is train failed"),
    ):
        (tmp_path / "jobs" / name).mkdir()
        (tmp_path / "jobs" / name / "result.json").write_text(json.dumps(result))
        with pytest.raises(AdapterSourceError, match=says):
            find_adapter(name, tmp_path)
    assert sorted(p.name for p in running.iterdir()) == []  # read only


# ---------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, small_dataset):
    """One small training job on the tiny base, resolved by Hub id from RunPod's cache on the volume."""
    volume = tmp_path_factory.mktemp("volume")
    runpod_cached_model(volume, tiny_model)
    settings = Settings.from_env({"VOLUME_DIR": str(volume), "HF_ENDPOINT": NO_HUB})
    job = small_job(tiny_model, small_dataset, job_id="trained-1", base_model=HUB_ID)
    result = run_job(job, settings=settings)
    assert result["status"] == "completed", result.get("error")
    return settings, result


@pytest.mark.e2e
def test_generate_by_job_id_differs_from_the_base_and_reports_its_progress(trained):
    settings, result = trained
    events = Recorder()
    out = run_generate(
        generate_input("trained-1", compare_base=True),
        settings=settings,
        channels=(events,),
        default_job_id="gen-1",
    )
    assert out["status"] == "completed", out.get("error")
    assert out["task"] == "generate" and out["job_id"] == "gen-1" and "error" not in out
    assert out["adapter"]["source"] == "job" and out["adapter"]["job_id"] == "trained-1"
    assert out["adapter"]["serving"]["ok"] and out["adapter"]["serving"]["vllm"]["max_lora_rank"] == 16
    assert [r["index"] for r in out["replies"]] == [0, 1]
    assert out["replies"][1]["prompt"] == CHATS[1][-1]["content"]
    for r in out["replies"]:
        for side in ("adapted", "base"):
            assert r[side]["new_tokens"] >= 1 and r[side]["seconds"] > 0
            assert r[side]["finish_reason"] in ("stop", "length")
    assert any(r["adapted"]["text"] != r["base"]["text"] for r in out["replies"])
    assert {"adapter", "model_config", "model_load", "generate_adapted", "generate_base"} <= out[
        "timings_s"
    ].keys()
    stages = [e["stage"] for e in events.events]
    assert stages[0] == "queued" and stages[-1] == "completed"
    assert {"resolving_model", "downloading_model", "model_loading", "model_loaded"} <= set(stages)
    assert [e["message"] for e in events.events if e["message"].startswith("generating")] == [
        "generating reply 1 of 2",
        "generating reply 2 of 2",
    ]
    assert events.events[-1]["output"]["replies"] == out["replies"]
    # the generate request wrote nothing into the training job's folder, and left no work folder
    assert not (settings.volume_dir / "jobs" / "gen-1").exists()
    assert not any((settings.volume_dir / "tmp").glob("generate-*"))


@pytest.mark.e2e
def test_the_trained_adapter_is_bf16_with_a_card_and_the_same_replies_come_from_its_archive_url(
    trained, served
):
    settings, result = trained
    adapter = Path(result["lora_artifact_path"])
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    card = (adapter / "README.md").read_text()
    assert "## Serving with vLLM" in card and "--max-lora-rank 16" in card and "trained-1" in card

    by_id = run_generate(generate_input("trained-1"), settings=settings, default_job_id="gen-2")
    server, files = served
    files["trained-1.tar.gz"] = Path(result["adapter"]["archive"]).read_bytes()
    url = f"{server.base}/trained-1.tar.gz?X-Amz-Signature=sekrit"
    by_url = run_generate(
        generate_input(url, adapter_sha256=result["adapter"]["sha256"]),
        settings=settings,
        default_job_id="gen-3",
    )
    assert by_url["status"] == "completed", by_url.get("error")
    assert (
        by_url["adapter"]["source"] == "url"
        and by_url["adapter"]["archive_sha256"] == result["adapter"]["sha256"]
    )
    assert [r["adapted"]["text"] for r in by_url["replies"]] == [
        r["adapted"]["text"] for r in by_id["replies"]
    ]
    assert "sekrit" not in json.dumps(by_url)
    assert not any((settings.volume_dir / "tmp").glob("generate-*"))  # the extracted archive is removed


@pytest.mark.e2e
def test_list_shows_the_trained_job_with_its_lineage(trained):
    settings, result = trained
    out = run_list({"task": "list"}, settings=settings, default_job_id="list-1")
    assert out["status"] == "completed" and out["count"] == 1
    entry = out["adapters"][0]
    assert entry["job_id"] == "trained-1" and entry["adapter_present"]
    assert entry["verdict"] == result["verdict"] and entry["lora_r"] == 16
    assert entry["dataset"]["name"] == result["dataset"]["name"] and entry["dataset"]["conversations"] == 6
    assert entry["metrics"]["eval_loss_after"] == result["metrics"]["eval_loss_after"]
    assert entry["archive_sha256"] == result["adapter"]["sha256"]
    assert entry["base_model"] == HUB_ID


@pytest.mark.e2e
def test_the_trained_adapter_names_its_hub_base_and_lists_its_lineage(trained):
    settings, result = trained
    config = json.loads((Path(result["lora_artifact_path"]) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID and config["revision"] == SHA
    lineage = result["lineage"]
    assert lineage["base_model"] == {"model_id": HUB_ID, "revision": SHA, "source": "runpod_cache"}
    assert (
        lineage["dataset"]["file_name"] == "brightrun-small-6.json"
        and len(lineage["dataset"]["sha256"]) == 64
    )
    entry = run_list({"task": "list"}, settings=settings, default_job_id="l")["adapters"][0]
    assert entry["base_model"] == HUB_ID and entry["base_revision"] == SHA
    assert entry["dataset"]["sha256"] == lineage["dataset"]["sha256"]
