# lora-worker: RunPod serverless worker that QLoRA-fine-tunes Llama 3 70B on one H100.
#
# Build:  docker build --platform linux/amd64 -t <registry>/lora-worker:<tag> .
# Size:   roughly 8-10 GB uncompressed, 4-5 GB compressed (an estimate, not a measurement;
#         see docs/deploy.md). No model weights are baked in: the 70B base model is read from
#         the Hugging Face cache on the network volume (/runpod-volume) at run time.

# Base image: PyTorch's official CUDA 12.6 + cuDNN 9 *runtime* image of the pinned torch.
# - PyTorch 2.13 is published for CUDA 12.6 and 13.0 (stable) and 13.2 (experimental); there is no
#   12.8 build any more. 12.6 has native kernels for the A100 (sm_80) and the H100/H200 (sm_90) and
#   runs on any host whose driver supports CUDA 12.6 or newer (R560+), which covers the 12.x driver
#   generation RunPod's H100 and A100 hosts run. CUDA 13.0 needs a driver of R580 or newer and so
#   would shut out every host still on a 12.x driver, for nothing these cards use (13.0 adds
#   Blackwell). PyPI's torch 2.13.0 wheel is the CUDA 13.0 build; the 12.6 one is on the cu126 index.
# - "runtime", not "devel": no CUDA toolkit; only gcc and libc headers are added (below).
# - TORCH_VERSION matches the torch pin in builder/requirements.txt, so pip finds torch already
#   satisfied (2.13.0+cu126 satisfies ==2.13.0) and keeps the base image's copy.
# tests/test_dockerfile.py keeps TORCH_VERSION, CUDA_VERSION, TORCH_INDEX_URL, builder/ pins,
# .runpod/*.json and the deploy command's allowedCudaVersions consistent with each other.
ARG TORCH_VERSION=2.13.0
ARG CUDA_VERSION=12.6
ARG BASE_IMAGE=pytorch/pytorch:${TORCH_VERSION}-cuda${CUDA_VERSION}-cudnn9-runtime

# ------------------------------------------------------------------------------ dependencies
FROM ${BASE_IMAGE} AS deps
ARG CUDA_VERSION
# Where pip would find CUDA 12.6 builds of torch ("+cu126" local versions) if torch ever needed
# installing; every other pin resolves from PyPI as in CI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126

# Triton (under Liger) compiles a small C launcher that includes Python.h at first use. The
# base's conda Python under /opt/conda ships its headers; gcc and the C library headers it links
# against come from the distribution (unpinned: the archive replaces patch versions, and a pin
# would break the build when it does).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Runtime environment.
# - PYTHONUNBUFFERED: logs reach RunPod's log stream as they happen.
# - PYTHONDONTWRITEBYTECODE: never write .pyc next to /app at run time (read-only for non-root).
# - HF_HOME / HF_HUB_CACHE: the Hugging Face cache lives on the network volume, in the layout
#   RunPod's cached models use (/runpod-volume/huggingface-cache/hub/models--org--name/...), so
#   a model downloaded once (or pre-warmed, docs/deploy.md) is found by every later worker.
# - The remaining caches go to /tmp so the image works under any uid: nothing under /app
#   needs to be writable.
# - REQUIRE_CUDA=1: a job on a host without a usable GPU (e.g. a driver older than CUDA 12.6)
#   fails within seconds, naming the cause, instead of training a 70B model on the CPU.
# - PYTORCH_CUDA_ALLOC_CONF: expandable segments let the allocator grow blocks in place, which
#   cuts fragmentation with micro-batches of varying length and makes OOM recovery more reliable.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/runpod-volume/huggingface-cache \
    HF_HUB_CACHE=/runpod-volume/huggingface-cache/hub \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.triton \
    MPLCONFIGDIR=/tmp/matplotlib \
    WANDB_DIR=/tmp \
    REQUIRE_CUDA=1 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

WORKDIR /app

# Dependencies first: this layer (the big one) is rebuilt only when the pins change, not on
# every source edit. Same pinned file CI installs. Then the build-time check: every pin is what
# got installed, torch is the CUDA build chosen above, gcc builds a Python extension.
COPY builder/requirements.txt builder/requirements-cuda.txt builder/check_image.py builder/
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
        -r builder/requirements.txt -r builder/requirements-cuda.txt \
    && python builder/check_image.py --cuda "${CUDA_VERSION}" \
        builder/requirements.txt builder/requirements-cuda.txt

# ------------------------------------------------------------------------------ tiny model
# The whole source tree is only needed here: the operator tools (src/lora_worker/tools) build the
# tiny offline model that .runpod/tests.json trains on, then are removed, so the worker stage
# below gets the runtime package and the model but no tools. The tiny model is a few MB of random
# weights with Llama 3's architecture and tokenizer specials, generated offline -- NOT a copy of
# any real model's weights. Its build gets a throwaway HF_HOME.
FROM deps AS tiny-model
COPY pyproject.toml ./
COPY src/ src/
RUN HF_HOME=/tmp/hf-build PYTHONPATH=src python -m lora_worker tiny-model --out tiny-model \
    && rm -rf src/lora_worker/tools /tmp/hf-build

# ------------------------------------------------------------------------------ the worker
FROM deps AS worker

# The package itself (no dependencies: they are all pinned above); pip's in-tree build leftovers
# are removed so the layer holds only what runs.
COPY --from=tiny-model /app/pyproject.toml ./
COPY --from=tiny-model /app/src/ src/
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /app/build /app/src/*.egg-info
COPY --from=tiny-model /app/tiny-model/ tiny-model/

# Entry point, the Hub test input and the example dataset change most often: last.
COPY handler.py test_input.json ./
COPY examples/ examples/

# Readable (and directories traversable) by any uid, whatever umask the build host had.
RUN chmod -R a+rX /app

CMD ["python", "-u", "handler.py"]
