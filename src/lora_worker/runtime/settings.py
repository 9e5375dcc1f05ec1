"""Worker settings from the environment, read once at start-up and passed down as a value.

`Settings.from_env()` reads `os.environ`; tests pass their own dict (`Settings.from_env({...})`).
Secrets stay in this object: they are never written back to `os.environ`, logged, or put into
outputs and events (`repr` hides them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

RUNPOD_VOLUME = Path("/runpod-volume")
LOCAL_VOLUME = Path(".volume")

# On-demand $/hour by GPU name, used when GPU_HOURLY_USD is unset (RunPod serverless list prices as
# quoted in the studio's plan; override per endpoint with GPU_HOURLY_USD).
DEFAULT_GPU_HOURLY_USD = {
    "H100": 4.18,
    "H200": 5.58,
    "A100": 2.72,
    "L40S": 1.90,
    "cpu": 0.0,
}


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _secret(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


@dataclass(frozen=True)
class Settings:
    volume_dir: Path
    """Root of everything the worker writes (`VOLUME_DIR`, else `/runpod-volume`, else `./.volume`)."""
    webhook_secret: str | None = field(default=None, repr=False)
    """`WEBHOOK_SECRET`: signs webhooks (`whsec_<base64>` or a raw string)."""
    hf_token: str | None = field(default=None, repr=False)
    """`HF_TOKEN`: for gated base models and Hub uploads."""
    hf_endpoint: str | None = None
    """`HF_ENDPOINT`: Hub URL override (tests point it at a loopback stand-in)."""
    gpu_hourly_usd: float | None = None
    """`GPU_HOURLY_USD`: cost rate; unset means the default for the detected GPU."""
    wandb_api_key: str | None = field(default=None, repr=False)
    """`WANDB_API_KEY`: also log to Weights & Biases when set (needs the optional `wandb` package)."""
    progress_interval_s: float = 10.0
    """`PROGRESS_INTERVAL_S`: minimum seconds between RunPod progress updates within a stage."""
    runpod_queue: bool = False
    """True when a RunPod queue feeds this worker (`RUNPOD_WEBHOOK_GET_JOB` set); False in local test mode."""
    require_cuda: bool = False
    """`REQUIRE_CUDA=1`: refuse jobs within seconds when no usable CUDA GPU is visible (set in the image)."""
    keep_checkpoints: bool = False
    """`KEEP_CHECKPOINTS=1`: keep optimizer checkpoints after a job completes (a job may override)."""
    job_lock_wait_s: float = 180.0
    """`JOB_LOCK_WAIT_S`: how long a second delivery of a running job waits before it is refused; longer
    than `job_lock_stale_s`, so a redelivery after a worker death takes over the dead worker's lock."""
    job_lock_stale_s: float = 120.0
    """`JOB_LOCK_STALE_S`: a job lock whose holder has not refreshed it for this long is broken."""
    judge_base_url: str | None = None
    """`JUDGE_BASE_URL`: an OpenAI-compatible chat endpoint for `evaluation.judge: openai`."""
    judge_api_key: str | None = field(default=None, repr=False)
    """`JUDGE_API_KEY`: its key (a secret: never in logs, outputs or files)."""
    judge_model: str | None = None
    """`JUDGE_MODEL`: the judge model's name at that endpoint."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        if env.get("VOLUME_DIR"):
            volume = Path(env["VOLUME_DIR"])
        elif RUNPOD_VOLUME.is_dir():
            volume = RUNPOD_VOLUME
        else:
            volume = LOCAL_VOLUME
        rate = env.get("GPU_HOURLY_USD")
        return cls(
            volume_dir=volume.absolute(),
            webhook_secret=_secret(env.get("WEBHOOK_SECRET")),
            hf_token=_secret(env.get("HF_TOKEN")),
            hf_endpoint=env.get("HF_ENDPOINT") or None,
            gpu_hourly_usd=float(rate) if rate else None,
            wandb_api_key=_secret(env.get("WANDB_API_KEY")),
            progress_interval_s=float(env.get("PROGRESS_INTERVAL_S", "10")),
            runpod_queue=bool(env.get("RUNPOD_WEBHOOK_GET_JOB")),
            require_cuda=_flag(env.get("REQUIRE_CUDA")),
            keep_checkpoints=_flag(env.get("KEEP_CHECKPOINTS")),
            job_lock_wait_s=float(env.get("JOB_LOCK_WAIT_S", "180")),
            job_lock_stale_s=float(env.get("JOB_LOCK_STALE_S", "120")),
            judge_base_url=env.get("JUDGE_BASE_URL") or None,
            judge_api_key=_secret(env.get("JUDGE_API_KEY")),
            judge_model=env.get("JUDGE_MODEL") or None,
        )

    def secrets(self) -> list[str]:
        """Every secret value held, for tests and log scrubbing."""
        return [s for s in (self.webhook_secret, self.hf_token, self.wandb_api_key, self.judge_api_key) if s]

    def hourly_rate(self, gpu_name: str) -> float:
        if self.gpu_hourly_usd is not None:
            return self.gpu_hourly_usd
        for key, rate in DEFAULT_GPU_HOURLY_USD.items():
            if key.lower() in gpu_name.lower():
                return rate
        return DEFAULT_GPU_HOURLY_USD["H100"]

    def job_dir(self, job_id: str) -> Path:
        return self.volume_dir / "jobs" / job_id
