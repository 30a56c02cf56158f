# syntax=docker/dockerfile:1
# The trainer image: CUDA PyTorch, DeepSpeed, Triton and bloomrun, run by the operator's
# worker Pods as `torchrun ... -m bloomrun.trainer.train`. Install steps mirror
# scripts/install_venv.sh and read the same pins (requirements/trainer.txt): CI tests the
# versions this image ships. tests/chart/test_images.py keeps these invariants.

# Base images pinned to full version tags. torch's PyPI wheels carry their own CUDA
# libraries; the devel stage adds nvcc for DeepSpeed's op builds.
FROM nvidia/cuda:12.9.1-cudnn-devel-ubuntu24.04 AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev g++ \
 && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/ requirements/
# torch first and alone: DeepSpeed builds its ops against it without build isolation.
# DS_BUILD_* compile the ops now rather than as a JIT build in every fresh Pod.
RUN pip install --upgrade pip setuptools wheel \
 && pip install "$(grep -E '^torch==' requirements/trainer.txt)" \
 && DS_BUILD_SHM_COMM=1 DS_BUILD_FUSED_ADAM=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    pip install --no-build-isolation -r requirements/trainer.txt
COPY pyproject.toml README.md ./
COPY bloomrun/ bloomrun/
RUN pip install --no-deps --no-build-isolation .

FROM nvidia/cuda:12.9.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive
# g++ stays: Triton compiles its launcher stubs with the host compiler at first use.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 g++ \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 bloomrun \
 && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin bloomrun
COPY --from=build /opt/venv /opt/venv
# Caches go where a read-only root filesystem still lets them be written (an emptyDir).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/bloomrun \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
WORKDIR /home/bloomrun
# The UID the operator's worker Pods run as (bloomrun/operator/desired.py RUN_AS_USER); the
# Ubuntu base's own uid-1000 user is removed above to make room for it.
USER 1000:1000
EXPOSE 9400 29400
ENTRYPOINT ["python", "-m", "bloomrun.trainer.train"]
