"""The job spec: every bad input is refused with a message naming its field, all at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_worker.runtime.spec import DEFAULT_BASE_MODEL, JobInputError, input_table_markdown, parse_job_input

OK = {"dataset_path": "data.json"}


def problems(raw, **kw) -> list[str]:
    with pytest.raises(JobInputError) as err:
        parse_job_input(raw, **kw)
    return err.value.problems


def test_defaults_are_the_seeds_balanced_config():
    spec = parse_job_input(OK, runpod_job_id="abc-123")
    hp = spec.hyperparameters
    assert spec.job_id == "abc-123"
    assert spec.base_model == DEFAULT_BASE_MODEL
    assert (hp.num_epochs, hp.learning_rate, hp.lora_r, hp.lora_alpha, hp.lora_dropout) == (
        3,
        2e-4,
        16,
        32,
        0.05,
    )
    assert (hp.batch_size, hp.gradient_accumulation_steps, hp.max_seq_length) == (4, 4, 2048)
    assert spec.micro_batch_tokens == 4 * 2048
    assert spec.max_duration_hours == 24


def test_spec_is_immutable():
    spec = parse_job_input(OK, runpod_job_id="a")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        spec.base_model = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        ({**OK, "bogus": 1}, "bogus", "unknown field"),
        ({**OK, "hyperparameters": {"learning_rat": 1e-4}}, "hyperparameters.learning_rat", "unknown field"),
        ({**OK, "hyperparameters": {"learning_rate": 0}}, "hyperparameters.learning_rate", "greater than 0"),
        (
            {**OK, "hyperparameters": {"learning_rate": -1e-4}},
            "hyperparameters.learning_rate",
            "greater than 0",
        ),
        ({**OK, "hyperparameters": {"lora_r": 1.5}}, "hyperparameters.lora_r", "valid integer"),
        ({**OK, "hyperparameters": {"lora_r": 0}}, "hyperparameters.lora_r", "greater than or equal to 1"),
        ({**OK, "hyperparameters": {"lora_r": "16"}}, "hyperparameters.lora_r", "valid integer"),
        ({**OK, "hyperparameters": {"lora_dropout": 1.0}}, "hyperparameters.lora_dropout", "less than 1"),
        (
            {**OK, "hyperparameters": {"lora_dropout": -0.1}},
            "hyperparameters.lora_dropout",
            "greater than or equal",
        ),
        (
            {**OK, "hyperparameters": {"num_epochs": 0}},
            "hyperparameters.num_epochs",
            "greater than or equal to 1",
        ),
        ({**OK, "hyperparameters": {"num_epochs": True}}, "hyperparameters.num_epochs", "valid integer"),
        ({**OK, "dry_run": "yes"}, "dry_run", "valid boolean"),
        ({"dataset_url": "http://example.com/d.json"}, "dataset_url", "https://"),
        ({"dataset_url": "ftp://example.com/d.json"}, "dataset_url", "https://"),
        ({**OK, "webhook_url": "http://dashboard.example.com/hook"}, "webhook_url", "https://"),
        ({**OK, "job_id": "../x"}, "job_id", "no '..'"),
        ({**OK, "job_id": "a/b"}, "job_id", "letters, digits"),
        ({**OK, "job_id": ""}, "job_id", "letters, digits"),
        ({**OK, "output": {"hf_repo": "no-slash"}}, "output.hf_repo", "org/name"),
        (
            {**OK, "webhook_secret": "whsec_abc"},
            "webhook_secret",
            "WEBHOOK_SECRET in the worker's environment",
        ),
        ({**OK, "hf_token": "hf_abc"}, "hf_token", "HF_TOKEN in the worker's environment"),
    ],
)
def test_bad_input_names_the_field(raw, field, words):
    found = problems(raw, runpod_job_id="j1")
    assert any(p.startswith(f"{field}:") and words in p for p in found), found


def test_both_or_neither_dataset():
    for raw in ({}, {"dataset_path": "a.json", "dataset_url": "https://x/y.json"}):
        found = problems(raw, runpod_job_id="j1")
        assert found == ["dataset_url, dataset_path: give exactly one of them"]


def test_every_problem_is_listed_at_once():
    raw = {
        "job_id": "../../etc",
        "dataset_url": "http://example.com/x",
        "hyperparameters": {"learning_rate": 0, "lora_r": 2.5, "lora_dropout": 1.5, "num_epochs": 0},
        "webhook_secret": "s3cret",
        "nope": True,
    }
    found = problems(raw)
    fields = {p.split(":")[0] for p in found}
    assert {
        "job_id",
        "dataset_url",
        "hyperparameters.learning_rate",
        "hyperparameters.lora_r",
        "hyperparameters.lora_dropout",
        "hyperparameters.num_epochs",
        "webhook_secret",
        "nope",
    } <= fields
    assert "s3cret" not in str(found)  # a secret sent by mistake is not echoed back


def test_loopback_http_is_allowed_for_local_runs():
    spec = parse_job_input({**OK, "webhook_url": "http://127.0.0.1:9000/hook", "job_id": "x"})
    assert spec.webhook_url.startswith("http://127.0.0.1")


def test_not_an_object():
    assert problems(["a"]) == ["input: must be a JSON object, got list"]


def test_job_id_required_outside_runpod():
    assert problems(OK) == ["job_id: required when the request does not come from RunPod's queue"]


def test_readme_input_table_is_current():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"<!-- input-table:start -->\n(.*?)\n<!-- input-table:end -->", readme, re.S)
    assert m, "README.md lacks the generated input table markers"
    assert m.group(1).strip() == input_table_markdown().strip(), (
        "README's input table is stale: regenerate it with `.venv/bin/python -m lora_worker schemas`"
    )
