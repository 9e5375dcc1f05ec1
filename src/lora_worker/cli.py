"""`python -m lora_worker <command> ...`: one entry point for the worker's terminal commands.

Each command lives in the module named for what it does and exposes `main(argv) -> int`;
this file only dispatches, importing the module lazily so `--help` stays fast.
"""

from __future__ import annotations

import importlib
import shlex
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny-model": (
        "lora_worker.tools.tiny_model",
        "write the tiny offline Llama-architecture model used by tests and the demo",
    ),
    "validate": ("lora_worker.tools.validate", "validate a dataset file and print its summary"),
    "fetch-model": (
        "lora_worker.tools.fetch_model",
        "download a base model onto the volume ahead of jobs",
    ),
    "run": ("lora_worker.tools.run_job", "run one job from a JSON input file, without the RunPod queue"),
    "bench": ("lora_worker.tools.bench.cli", "measure 70B-shaped QLoRA throughput and memory on the GPU"),
    "deploy": ("lora_worker.tools.deploy", "create or update the RunPod template and scale-to-zero endpoint"),
    "local-endpoint": (
        "lora_worker.tools.local_endpoint",
        "serve RunPod's queue protocol on loopback for local runs",
    ),
    "submit": (
        "lora_worker.tools.client",
        "submit a training job to an endpoint (optionally --wait with a progress bar)",
    ),
    "prune": ("lora_worker.tools.prune", "report and free what old jobs hold on the volume"),
    "schemas": ("lora_worker.tools.schemas", "write the JSON Schemas of input, events, result and report"),
    "human-eval": ("lora_worker.tools.human_eval", "score a job's blinded human A/B sheet"),
    "chat": ("lora_worker.tools.client", "talk to a trained adapter: its replies beside the base model's"),
    "list": ("lora_worker.tools.client", "list the trained adapters on the endpoint's volume"),
    "status": ("lora_worker.tools.client", "show a job's status"),
    "cancel": ("lora_worker.tools.client", "cancel a job"),
}


def invocation() -> str:
    """How to run this command line again as written, from any shell: this interpreter's path (a
    bare `python` is often not the virtualenv that has lora_worker installed)."""
    return f"{shlex.quote(sys.executable)} -m lora_worker"


def _usage() -> str:
    lines = [f"usage: {invocation()} <command> [options]", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    name = COMMANDS[command][0]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if name.startswith("lora_worker.tools.") and err.name and err.name.startswith("lora_worker.tools"):
            print(
                f"{command!r} is an operator tool, not shipped in the worker image; run it from a checkout "
                "of the repository (make demo sets one up)",
                file=sys.stderr,
            )
            return 2
        raise
    # client.py serves five commands; it gets the command name as its first argument.
    if module.__name__ == "lora_worker.tools.client":
        return int(module.main([command, *rest]) or 0)
    return int(module.main(rest) or 0)
