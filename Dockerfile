# lora-worker: RunPod serverless worker that QLoRA-fine-tunes Llama 3 70B on one H100.
#
# Build:  docker build --platform linux/amd64 -t <registry>/lora-worker:<tag> .
# Size:   roughly 8-10 GB uncompressed, 4-5 GB compressed (an estimate, not a measurement;
#         see docs/deploy.md). No model weights are baked in: the 70B base model is read from
#         the Hugging Face cache on the network volume (/runpod-volume) at run time.

# Base image: PyTorch's official CUDA 12.8 + cuDNN 9 *runtime* image.
# - CUDA 12.8 has native sm_90 (Hopper/H100) kernels and runs on RunPod hosts whose driver
#   supports CUDA >= 12.8 (the endpoint's allowedCudaVersions says the same).
# - "runtime", not "devel": no nvcc/compilers in the image; every dependency ships wheels.
# - The tag matches the torch pin in builder/requirements.txt (torch==2.13.0), so pip finds
#   torch already satisfied and does not download a second 2-3 GB copy of it.
# If that tag is not published for your torch pin, pass another CUDA 12.x PyTorch runtime
# tag with --build-arg BASE_IMAGE=...; pip then installs the pinned torch from TORCH_INDEX_URL.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Where pip finds CUDA 12.8 builds of torch ("+cu128" local versions). It is an *extra*
# index: every other pin resolves from PyPI as in CI; for torch, PEP 440 ranks
# 2.13.0+cu128 above plain 2.13.0, so the CUDA 12.8 build wins over PyPI's wheel, while
# CI (no extra index) installs the CPU/default build of the same version.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# Runtime environment.
# - PYTHONUNBUFFERED: logs reach RunPod's log stream as they happen.
# - PYTHONDONTWRITEBYTECODE: never write .pyc next to /app at run time (read-only for non-root).
# - HF_HOME / HF_HUB_CACHE: the Hugging Face cache lives on the network volume, in the layout
#   RunPod's cached models use (/runpod-volume/huggingface-cache/hub/models--org--name/...), so
#   a model downloaded once (or pre-warmed, docs/deploy.md) is found by every later worker.
#   (TRANSFORMERS_CACHE is deprecated in favour of HF_HUB_CACHE and is not set.)
# - The remaining caches go to /tmp so the image works under any uid: nothing under /app
#   needs to be writable.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/runpod-volume/huggingface-cache \
    HF_HUB_CACHE=/runpod-volume/huggingface-cache/hub \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.triton \
    MPLCONFIGDIR=/tmp/matplotlib \
    WANDB_DIR=/tmp

WORKDIR /app

# Dependencies first: this layer (the big one) is rebuilt only when the pins change,
# not on every source edit. Same pinned file CI installs.
COPY builder/requirements.txt builder/requirements-cuda.txt builder/
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
        -r builder/requirements.txt -r builder/requirements-cuda.txt

# The package itself (no dependencies: they are all pinned above), then the tiny offline
# model that .runpod/tests.json trains on. The tiny model is a few MB of random weights with
# Llama 3's architecture and tokenizer specials, generated offline -- it is NOT a copy of any
# real model's weights. Its build gets a throwaway HF_HOME, and pip's in-tree build
# leftovers are removed so the layer holds only what runs.
COPY pyproject.toml ./
COPY src/ src/
RUN pip install --no-cache-dir --no-deps . \
    && HF_HOME=/tmp/hf-build python -m lora_worker tiny-model --out /app/tiny-model \
    && rm -rf /tmp/hf-build /app/build /app/src/*.egg-info

# Entry point, the Hub test input and the example dataset change most often: last.
COPY handler.py test_input.json ./
COPY examples/ examples/

# Readable (and directories traversable) by any uid, whatever umask the build host had.
RUN chmod -R a+rX /app

CMD ["python", "-u", "handler.py"]
