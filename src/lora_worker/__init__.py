"""lora-worker: a RunPod serverless worker that fine-tunes Llama 3 70B with QLoRA on one H100."""

__version__ = "0.1.0"
