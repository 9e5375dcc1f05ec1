"""`python -m lora_worker bench`: QLoRA throughput and memory on a Llama-3-shaped NF4 model.

Modes: the grid of configurations (default), `--find-max-budget` (the largest 1-row budget within
the memory cap, of the project recipe or, with `--search-recipe project-offload`, with activation
offload on) and `--project-job` (a whole job's time from a rate; no model is run). Each
configuration runs in its own subprocess (`--one`, internal) so it starts with clean GPU memory.
BENCHMARKS.md has the method and the figures.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from lora_worker.runtime.files import atomic_write_json
from lora_worker.tools.bench.projection import JobShape, project_job
from lora_worker.tools.bench.record import format_table, one_line
from lora_worker.tools.bench.runner import RESULT_MARK, Runner, find_max_budget
from lora_worker.tools.bench.shapes import (
    RECIPES,
    SEARCH_RECIPES,
    SHAPES,
    RunSpec,
    Shape,
    parse_ints,
    parse_runs,
    plan_runs,
)

# An 80 GB H100 shows torch about 79.2 GiB; the CUDA context and the paged optimizer's managed
# memory sit outside the allocator's count, which leaves a process about 78 GiB to allocate. The
# cap makes a run on a larger card (an H200) stand for what an H100 can hold.
DEFAULT_CAP_GIB = 78.0
DEFAULT_BUDGETS, TINY_BUDGETS = "2048,8192,16384,32768", "128,256"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_worker bench",
        description="QLoRA throughput and memory of the project's training path vs the seed recipe, "
        "on a Llama-3-shaped NF4 model with random weights (see BENCHMARKS.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="70b", help="model shape")
    p.add_argument("--tiny", action="store_true", help="the CPU smoke test: --shape tiny and small budgets")
    for dim in ("layers", "hidden", "inter", "heads", "kv", "vocab"):
        p.add_argument(f"--{dim}", type=int, help=f"override the shape's {dim}")
    p.add_argument(
        "--budgets", help=f"token budgets per micro-batch (default {DEFAULT_BUDGETS}; tiny: {TINY_BUDGETS})"
    )
    p.add_argument(
        "--rows", help="rows per micro-batch, capped so a row is >= --seed-seq tokens (default 1,4; tiny: 2)"
    )
    p.add_argument("--recipes", default="project,seed", help=f"any of {','.join(RECIPES)}")
    p.add_argument(
        "--configs",
        help="explicit list instead of the grid, e.g. seed:1x2048,project:4x2048,project-offload:1x32768",
    )
    p.add_argument("--seed-seq", type=int, help="row length of the seed recipe (default 2048; tiny: 128)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per config; the first is warm-up")
    p.add_argument("--cap-gib", type=float, default=DEFAULT_CAP_GIB, help="GPU memory cap (an 80 GB H100)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/DATE-CARD.json)")
    p.add_argument(
        "--peak-tflops", type=float, help="the card's dense bf16 peak, if not in the built-in table"
    )
    p.add_argument(
        "--config-timeout-s", type=float, help="per-config limit in seconds (default 1800; CPU 600)"
    )
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    g = p.add_argument_group("largest budget")
    g.add_argument(
        "--find-max-budget", action="store_true", help="largest 1-row budget that trains in the cap"
    )
    g.add_argument(
        "--search-recipe",
        choices=SEARCH_RECIPES,
        default="project",
        help="recipe the search probes (project-offload: activation offload on)",
    )
    g.add_argument("--search-start", type=int, default=8192, help="first budget tried (tokens)")
    g.add_argument("--search-granularity", type=int, default=1024, help="budgets are multiples of this")
    g.add_argument("--search-limit", type=int, default=1 << 18, help="stop doubling past this budget")
    j = p.add_argument_group("job projection (no model is run)")
    j.add_argument("--project-job", action="store_true", help="project a full job's time from a rate")
    j.add_argument(
        "--dataset", help="dataset file (default ../shared/data/brightrun-242.json, else the sample)"
    )
    j.add_argument("--tokenizer", help="tokenizer directory (default: the tiny offline tokenizer)")
    j.add_argument("--results", help="a bench JSON whose project-recipe rates to use")
    j.add_argument(
        "--tokens-per-s", type=float, help="a rate to use instead of --results or the per-GPU table"
    )
    j.add_argument("--load-seconds", type=float, help="model download+load time (default: unknown, left out)")
    j.add_argument("--epochs", type=int, default=3, help="the job's num_epochs")
    j.add_argument("--max-seq-length", type=int, default=2048, help="the job's max_seq_length")
    j.add_argument("--batch-size", type=int, default=4, help="the job's rows per micro-batch")
    j.add_argument(
        "--micro-batch-tokens", type=int, help="the job's token budget (default batch-size x max-seq-length)"
    )
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config JSON in this process
    return p


def shape_of(a: argparse.Namespace) -> Shape:
    """The named shape with any per-dimension overrides."""
    base = asdict(SHAPES[a.shape])
    for dim in base:
        if getattr(a, dim) is not None:
            base[dim] = getattr(a, dim)
    return Shape(**base)


def _run_one(config_json: str) -> int:
    # Imported here, in the child only: bitsandbytes opens a CUDA context on import, and the
    # parent must leave the whole GPU to the configurations it measures.
    from lora_worker.tools.bench.child import run_one

    print(RESULT_MARK + json.dumps(run_one(json.loads(config_json))), flush=True)
    return 0


def _project(a: argparse.Namespace) -> int:
    job = JobShape(a.epochs, a.max_seq_length, a.batch_size, a.micro_batch_tokens)
    doc = project_job(
        job,
        dataset=Path(a.dataset) if a.dataset else None,
        tokenizer_dir=a.tokenizer,
        tokens_per_s=a.tokens_per_s,
        results=Path(a.results) if a.results else None,
        load_seconds=a.load_seconds,
    )
    print(json.dumps(doc, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(a.out), doc)
    return 0


def _search(runner: Runner, a: argparse.Namespace) -> None:
    runner.doc["mode"] = "find-max-budget"
    runner.doc["search_recipe"] = a.search_recipe

    def fits(budget: int) -> bool:
        rec = runner.run(RunSpec(a.search_recipe, 1, budget), steps=2)
        runner.add(rec)
        print(f"  budget {budget}: {'fits' if rec.get('ok') else 'OOM' if rec.get('oom') else 'failed'}")
        if not rec.get("ok") and not rec.get("oom"):
            raise RuntimeError(f"budget {budget} failed without running out of memory: {rec.get('error')}")
        return bool(rec.get("ok"))

    found = find_max_budget(
        fits, start=a.search_start, granularity=a.search_granularity, limit=a.search_limit
    )
    runner.doc["max_budget"] = {**found, "recipe": a.search_recipe}
    print(f"largest 1-row budget of {a.search_recipe} within the cap: {found['max_budget']}")


def _grid(runner: Runner, a: argparse.Namespace, tiny: bool) -> None:
    runner.doc["mode"] = "grid"
    if a.configs:
        specs = parse_runs(a.configs)
    else:
        budgets = parse_ints(a.budgets or (TINY_BUDGETS if tiny else DEFAULT_BUDGETS))
        rows = parse_ints(a.rows or ("2" if tiny else "1,4"))
        specs = plan_runs(a.recipes.split(","), budgets, rows, seed_seq=a.seed_seq)
    print(f"{len(specs)} configuration(s): {', '.join(s.label for s in specs)}", flush=True)
    for spec in specs:
        rec = runner.run(spec)
        runner.add(rec)
        print(f"  {spec.label}: " + one_line(rec), flush=True)


def _measure(a: argparse.Namespace, argv: list[str]) -> int:
    if a.tiny:
        a.shape = "tiny"
    tiny = a.shape == "tiny"
    a.seed_seq = a.seed_seq or (128 if tiny else 2048)
    a.steps = max(2, a.steps)  # one warm-up + at least one timed step
    if a.config_timeout_s is None:
        a.config_timeout_s = 600.0 if tiny else 1800.0
    runner = Runner(a, shape_of(a), ["python", "-m", "lora_worker", "bench", *argv])

    def on_term(signum, frame):  # `timeout` sends SIGTERM: stop the child, keep what was measured
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (an embedding caller): no handler, children still reaped
        previous = None
    try:
        if a.find_max_budget:
            _search(runner, a)
        else:
            _grid(runner, a, tiny)
        runner.doc["complete"] = True
    except RuntimeError as err:
        runner.doc["error"] = str(err)
    finally:
        runner.stop_child()
        runner.save()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if runner.doc["results"]:
        print(format_table(runner.doc["results"]))
    if not runner.doc.get("timing_claims", False):
        print("(no timing claims: CPU or tiny-shape run; it checks the code path only)")
    print(f"wrote {runner.out}")
    return 0 if runner.doc["complete"] else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.one:
        return _run_one(a.one)
    if a.project_job:
        return _project(a)
    return _measure(a, argv)


if __name__ == "__main__":  # the per-configuration child: `python -m lora_worker.tools.bench.cli --one ...`
    sys.exit(main())
