"""The published contracts: JSON Schemas in docs/schemas/ are generated from the typed models and
kept current; every event and result a job emits validates against them (see the job tests)."""

from __future__ import annotations

from conftest import REPO

from lora_worker.tools import schemas


def test_the_published_schemas_are_current():
    out = REPO / "docs" / "schemas"
    for name, schema in schemas.all_schemas().items():
        path = out / name
        assert path.exists(), f"{name} missing: run python -m lora_worker schemas"
        assert path.read_text(encoding="utf-8") == schemas.render(schema), (
            f"{name} is stale: run python -m lora_worker schemas"
        )
    assert schemas.main(["--check"]) == 0


def test_the_event_schema_allows_only_the_dashboards_statuses():
    event = schemas.all_schemas()["progress-event.schema.json"]
    status = event["properties"]["status"]
    assert set(status["enum"]) == {
        "queued",
        "preprocessing",
        "model_loaded",
        "training",
        "completed",
        "failed",
        "cancelled",
    }
    metrics = event["$defs"]["TrainingMetrics"]
    assert set(metrics["properties"]) == {"loss", "learning_rate", "grad_norm", "epoch"}
    assert metrics.get("additionalProperties") is False
