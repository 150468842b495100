# syntax=docker/dockerfile:1.7
#
# The clipqc worker: the `clipqc` binary and the libtorch it links (torch/lib of the torch
# 2.11.0 CUDA 13.0 wheel, with the NVIDIA libraries the wheel depends on), on an NVIDIA CUDA
# base image. The model artifact is NOT in the image: mount it read-only (compose: ../models,
# Helm: a PVC or an init container) and point model.dir / CLIPQC__MODEL__DIR at it.
#
#   DOCKER_BUILDKIT=1 docker build -t clipqc:0.1.0 .
#   docker run --gpus all -v "$PWD/models/clip-b32:/models/current:ro" \
#     -e CLIPQC__KAFKA__BROKERS=kafka:9092 -p 9400:9400 clipqc:0.1.0
#
# Not built in CI here: the development and CI machines have no Docker daemon, and the CUDA
# wheel index below (download.pytorch.org/whl/cu130) is not reachable from them. PyPI's own
# torch 2.11.0 Linux x86_64 wheel is the same CUDA 13.0 build (torch.version.cuda == "13.0"),
# so `--build-arg TORCH_INDEX_URL=https://pypi.org/simple` works where only PyPI is reachable.
#
# The runtime base is CUDA's `base` flavour on purpose: the CUDA libraries torch needs (cuBLAS,
# cuDNN, NCCL, ...) come from the wheel, version-matched, and the driver (libcuda.so.1,
# libnvidia-ml.so.1) from the host through the NVIDIA container toolkit. The `runtime` or
# `cudnn-runtime` flavours work too (RUNTIME_IMAGE), at ~2-3 GB more of unused libraries.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04

# --------------------------------------------------------------------------- builder
FROM ${RUST_IMAGE} AS builder

ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

# nasm: libjpeg-turbo's SIMD (mozjpeg-sys); libssl-dev + pkg-config: rdkafka's ssl feature and
# native-tls; zlib1g-dev: librdkafka. No cmake: librdkafka builds with its own configure.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      nasm pkg-config libssl-dev zlib1g-dev python3 python3-venv binutils \
 && rm -rf /var/lib/apt/lists/*

# libtorch from the torch wheel (tch 0.24.0 expects exactly torch 2.11.0).
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && /opt/venv/bin/python -c 'import sys, torch; print("torch", torch.__version__, "cuda", torch.version.cuda); sys.exit(0 if (torch.version.cuda or "").startswith("13.") else "torch is not a CUDA 13 build")'

# torch-sys finds libtorch in the installed torch package (LIBTORCH_USE_PYTORCH).
# --no-as-needed: libtorch_cuda.so only registers the CUDA backend from static initialisers;
# nothing references its symbols, so --as-needed would drop it and tch would never see a GPU.
ENV PATH=/opt/venv/bin:$PATH \
    LIBTORCH_USE_PYTORCH=1 \
    RUSTFLAGS="-C link-args=-Wl,--no-as-needed" \
    CARGO_TERM_COLOR=never

WORKDIR /src
# The workspace as .dockerignore leaves it (sources, proto/, tests/ and benches/ for cargo's
# view of the targets; no target/, models, deploy/ or helm/).
COPY . .

RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin clipqc \
 && mkdir -p /out/bin \
 && cp target/release/clipqc /out/bin/clipqc

# Fail the build when libtorch_cuda.so was not kept as a NEEDED library (CPU-only binary).
RUN readelf -d /out/bin/clipqc | tee /tmp/dynamic | grep -E 'NEEDED' \
 && grep -q 'NEEDED.*\[libtorch_cuda\.so\]' /tmp/dynamic \
 || { echo "clipqc does not link libtorch_cuda.so: the CUDA backend would be missing" >&2; exit 1; }

# The shared libraries, in the wheel's layout: libtorch_cuda.so finds the NVIDIA libraries
# through its RPATH $ORIGIN/../../nvidia/<pkg>/lib. libtorch_python.so and static archives
# are not needed.
RUN set -eu; \
    SP="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
    mkdir -p /out/libtorch/torch /out/libtorch/nvidia; \
    cp -a "$SP/torch/lib" /out/libtorch/torch/lib; \
    rm -f /out/libtorch/torch/lib/libtorch_python.so; \
    for d in "$SP"/nvidia/*/; do \
      n="$(basename "$d")"; \
      if [ -d "$d/lib" ]; then mkdir -p "/out/libtorch/nvidia/$n" && cp -a "$d/lib" "/out/libtorch/nvidia/$n/lib"; fi; \
    done; \
    find /out/libtorch -name '*.a' -delete; \
    du -sh /out/libtorch/torch/lib /out/libtorch/nvidia/*

# --------------------------------------------------------------------------- runtime
FROM ${RUNTIME_IMAGE} AS runtime

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3t64 zlib1g \
 && rm -rf /var/lib/apt/lists/*

COPY --from=builder /out/libtorch /opt/libtorch
COPY --from=builder /out/bin/clipqc /usr/local/bin/clipqc

# The NVIDIA container toolkit mounts the driver's libcuda (compute) and libnvidia-ml
# (utility: the worker's GPU metrics through NVML).
ENV LD_LIBRARY_PATH=/opt/libtorch/torch/lib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CLIPQC_LOG_FORMAT=json \
    CLIPQC_CONFIG=/etc/clipqc/clipqc.toml

# Every library resolves (libcuda.so.1 comes from the host driver at run time).
RUN ldd /usr/local/bin/clipqc | tee /tmp/ldd \
 && ! grep 'not found' /tmp/ldd | grep -v 'libcuda\.so\.1' \
 && rm /tmp/ldd

# Defaults for a container: the model at /models/current, the ops endpoint on 9400, brokers
# from CLIPQC__KAFKA__BROKERS. Mount a full config over this file (or set CLIPQC_CONFIG).
COPY <<EOF /etc/clipqc/clipqc.toml
[model]
dir = "/models/current"
device = "auto"

[http]
listen = "0.0.0.0:9400"
EOF

RUN groupadd --gid 10001 clipqc \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin clipqc \
 && mkdir -p /models \
 && chmod 0644 /etc/clipqc/clipqc.toml

USER 10001:10001
EXPOSE 9400

# /healthz answers once the model is loaded and warmed up (minutes for a large model on a cold
# GPU). No curl in the image: bash's /dev/tcp.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9400 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]

ENTRYPOINT ["clipqc", "run"]
# The config file comes from CLIPQC_CONFIG (/etc/clipqc/clipqc.toml above); every key can be
# overridden with CLIPQC__SECTION__KEY variables. Extra flags (--device, --model) go here.
CMD []
