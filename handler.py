"""RunPod serverless entry point: `python -u handler.py`.

A job's input (the body of POST /v2/<endpoint>/run is {"input": {...}}); see README.md for every field:

    {
      "input": {
        "dataset_url": "https://storage.example.com/brightrun-lora-v4.json",
        "base_model": "meta-llama/Meta-Llama-3-70B-Instruct",
        "webhook_url": "https://dashboard.example.com/api/training/webhook",
        "hyperparameters": {"num_epochs": 3, "learning_rate": 0.0002, "lora_r": 16, "lora_alpha": 32},
        "output": {"upload_url": "https://bucket.s3.amazonaws.com/adapter.tar.gz?X-Amz-Signature=..."}
      }
    }

Locally, `python handler.py` runs test_input.json (the runpod SDK's local test mode).
"""

import logging
import os

# The SDK logs every job input (presigned upload URLs included) and output at its default DEBUG
# level; WARN keeps its warnings and errors only. RUNPOD_LOG_LEVEL still overrides it.
os.environ.setdefault("RUNPOD_LOG_LEVEL", "WARN")

import runpod  # noqa: E402  (after the log level, which the SDK reads at import)

from lora_worker.runtime.handler import concurrency, handler  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency})
