# syntax=docker/dockerfile:1
# The trainer image: PyTorch, DeepSpeed, Triton and bloomrun, run by the operator's worker
# Pods as `torchrun ... -m bloomrun.trainer.train`. Every package is installed by hash from
# requirements/trainer.lock, the lock (scripts/lock_requirements.sh) of trainer.txt, the
# pins scripts/install_venv.sh installs for CI: CI tests the versions this image ships.
# tests/chart/test_images.py and test_locks.py keep these invariants.
#
# BASE picks the base, the recipe is otherwise the same:
# - releases: the CUDA runtime image below. Its CUDA major must be torch's: torch 2.15's
#   PyPI wheels are CUDA 13 builds (they require cuda-toolkit==13.2.2) carrying their own
#   CUDA libraries; a 12.x base beside them was the fault issue 11 found.
# - CPU tests: a Debian bookworm base made with mmdebstrap (no registry is reachable there),
#   with --build-arg PYTHON=python3.11 (tools/images, docs/cluster.md).
# No nvcc and no DeepSpeed op builds: the optimizer is torch's fused AdamW
# (bloomrun/trainer/parallel.py), so DeepSpeed's FusedAdam/SHM ops are never loaded, and
# DeepSpeed refused to build them against a CUDA major other than torch's anyway.
ARG BASE=nvidia/cuda:13.2.2-runtime-ubuntu24.04
ARG PYTHON=python3.12

FROM ${BASE} AS build
ARG PYTHON
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends ${PYTHON} ${PYTHON}-venv ${PYTHON}-dev g++ \
 && rm -rf /var/lib/apt/lists/*
RUN ${PYTHON} -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/build.lock requirements/trainer.lock requirements/
# The pip cache is a build cache mount (torch is not downloaded per build, nor left in a
# layer). A machine whose TLS is intercepted passes its CA bundle as the secret `ca`
# (`--secret id=ca,src=/etc/ssl/certs/ca-certificates.crt`): used by pip, never written
# into the image.
# Only what the locks list, each file checked against its sha256 (--require-hashes), nothing
# else (--no-deps): first pip, setuptools and wheel (build.lock), then the trainer's lock.
# No build isolation: the sdist-only packages (DeepSpeed, rouge-score, sqlitedict,
# word2number) build with that setuptools; an isolated build would fetch one unhashed. pip
# builds them before it installs any wheel, so DeepSpeed's setup.py finds no torch: with
# DS_BUILD_OPS=0 it prebuilds no op, the one thing it needs torch for.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install --require-hashes --no-deps -r requirements/build.lock \
 && DS_BUILD_OPS=0 pip install --require-hashes --no-deps --no-build-isolation -r requirements/trainer.lock

FROM ${BASE}
ARG PYTHON
ENV DEBIAN_FRONTEND=noninteractive
# g++ and the Python headers stay: Triton compiles its launcher stubs against Python.h with
# the host compiler at first use on a GPU.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ${PYTHON} ${PYTHON}-dev g++ \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 bloomrun \
 && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin bloomrun
COPY --from=build /opt/venv /opt/venv
# bloomrun itself last and apart from its dependencies: a change to the code rebuilds this
# small layer only, not the 7 GB one above (the dependencies' layer is cached by the locks).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bloomrun/ bloomrun/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation --disable-pip-version-check . \
 && rm -rf /src
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
