"""`python -m lora_worker fetch-model ORG/NAME`: put a base model on the network volume ahead of jobs.

Run it on a pod with the volume mounted to pay the first download (~141 GB for Llama 3 70B) before
users submit jobs. It takes the same lock as the workers, so it is safe while they start.
`--meta-only` fetches the config and tokenizer alone (what a dry run needs). Prints the result as
JSON on stdout and download progress on stderr; exit status 0, or 2 with the reason.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lora_worker.runtime.files import GB, dumps_strict
from lora_worker.runtime.model.layout import ModelResolutionError
from lora_worker.runtime.model.resolve import resolve_model_meta, resolve_model_weights
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.volume_lock import LockTimeoutError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_worker fetch-model", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
    )
    parser.add_argument("base_model", help="Hub id (ORG/NAME) or a local directory")
    parser.add_argument("--revision", default=None, help="branch, tag or commit sha (default: main)")
    parser.add_argument(
        "--volume-dir", type=Path, default=None, help="default: VOLUME_DIR / /runpod-volume / ./.volume"
    )
    parser.add_argument("--meta-only", action="store_true", help="fetch config and tokenizer only")
    return parser


def _show(event: dict) -> None:
    print(
        f"{event['files_done']}/{event['files_total']} files, {event['bytes_done'] / GB:.2f}/"
        f"{event['bytes_total'] / GB:.2f} GB, {event['rate_mb_s']:.0f} MB/s",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    volume_dir = args.volume_dir or settings.volume_dir
    hub = {"hf_token": settings.hf_token, "hf_endpoint": settings.hf_endpoint}
    try:
        meta = resolve_model_meta(args.base_model, revision=args.revision, volume_dir=volume_dir, **hub)
        if args.meta_only:
            out = {k: v for k, v in meta.__dict__.items() if k != "config"}
        else:
            resolved = resolve_model_weights(meta, volume_dir=volume_dir, on_progress=_show, **hub)
            out = dict(resolved.__dict__)
    except (ModelResolutionError, LockTimeoutError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(dumps_strict(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
