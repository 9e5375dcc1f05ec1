"""Builders for the adapter tests: a volume whose RunPod model cache holds the tiny model under a Hub
id, and small saved adapters."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

HUB_ID = "test-org/tiny-llama"
SHA = "c0ffee" + "0" * 34
# A closed port on loopback: any Hub request fails at once instead of reaching the network.
NO_HUB = "http://127.0.0.1:9"


def runpod_cached_model(volume: Path, tiny_model: Path, *, licence: bool = True) -> Path:
    """The tiny model in RunPod's cache layout (hub cache: blobs, snapshot links, refs/main) under
    HUB_ID at commit SHA, with the licence files a Llama repo ships; returns the snapshot folder."""
    repo = volume / "huggingface-cache" / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    blobs, snap = repo / "blobs", repo / "snapshots" / SHA
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    files = {f.name: f.read_bytes() for f in tiny_model.iterdir() if f.is_file()}
    if licence:
        files["LICENSE"] = b"META LLAMA 3 COMMUNITY LICENSE AGREEMENT (test copy)\n"
        files["USE_POLICY.md"] = b"# Meta Llama 3 Acceptable Use Policy (test copy)\n"
    for name, data in files.items():
        blob = blobs / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snap / name
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(SHA)
    return snap


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
