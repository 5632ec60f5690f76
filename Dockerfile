# syntax=docker/dockerfile:1
#
# The p2n runtime image: CUDA, Python 3.11, torch for CUDA, tiny-cuda-nn, and p2n with every extra
# (Ray 2.60 Data/Train/Serve, DeepSpeed, CLIP, refinement). Every Ray node runs it: cluster/aws.yaml,
# cluster/gcp.yaml and cluster/local.yaml name it under `docker:`, every manifest in cluster/kuberay/ names it
# as the container image. The code sits in /app, which is on PYTHONPATH, so `serve.app:app` and
# `ray_jobs/*.py` are importable and runnable on every node.
#
#   docker build -t registry.example.com/p2n:latest .
#   docker build --build-arg TCNN_CUDA_ARCHITECTURES="86;80;90" -t registry.example.com/p2n:latest .
#   docker build --build-arg WITH_TCNN=0 -t registry.example.com/p2n:latest .   # torch hash grid only
#
# TCNN_CUDA_ARCHITECTURES lists the GPUs tiny-cuda-nn is compiled for: A10G (g5) 86, A100 (p4d) 80, L4 (g6) 89,
# H100 (p5) 90, T4 (g4dn) 75. Building it needs no GPU; it takes 10-20 minutes per architecture.
# Keep CUDA_VERSION and TORCH_INDEX_URL on the same CUDA major version: tiny-cuda-nn is compiled with this
# image's nvcc and linked against torch, and torch refuses an extension built with another CUDA major version
# (a check below fails the build early if they differ).

ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=22.04
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TCNN_CUDA_ARCHITECTURES="86;80"
ARG TCNN_REF=master
ARG WITH_TCNN=1

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# Python 3.11 (Ubuntu 22.04 ships 3.10), a compiler for tiny-cuda-nn and DeepSpeed's JIT ops, and what the
# Ray cluster launcher and KubeRay expect inside a node image: bash, rsync, ssh client, wget (KubeRay probes).
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gnupg ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      python3.11 python3.11-dev python3.11-venv \
      build-essential git ninja-build \
      wget curl rsync openssh-client tmux less sudo \
      libgl1 libglib2.0-0 ffmpeg \
 && rm -rf /var/lib/apt/lists/*

# One virtual environment for everything. Login shells (the Ray cluster launcher runs `bash --login -c`) get it
# on PATH through profile.d, since /etc/profile may rebuild PATH.
RUN python3.11 -m venv ${VIRTUAL_ENV} \
 && pip install --upgrade pip setuptools wheel ninja \
 && echo 'export PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv' > /etc/profile.d/p2n-venv.sh

# torch (and the torchvision built for it) from the CUDA index first; then pin exactly what was installed so that
# no later `pip install` can swap torch for another build.
RUN pip install "torch==${TORCH_VERSION}" torchvision --index-url "${TORCH_INDEX_URL}" \
 && python -c "import torch, torchvision; print(f'torch=={torch.__version__}'); print(f'torchvision=={torchvision.__version__}')" \
      > /opt/torch-constraints.txt \
 && cat /opt/torch-constraints.txt \
 && python -c "import torch; assert torch.version.cuda, 'TORCH_INDEX_URL gave a CPU-only torch: ' + torch.__version__"

# tiny-cuda-nn's torch bindings, compiled against the torch above (hence --no-build-isolation). Built before the
# code is copied so that a code change does not rebuild it. Optional: p2n falls back to its torch hash grid.
RUN if [ "${WITH_TCNN}" = "1" ]; then \
      torch_cuda="$(python -c 'import torch; print(torch.version.cuda.split(".")[0])')" \
   && nvcc_cuda="$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')" \
   && if [ "${torch_cuda}" != "${nvcc_cuda}" ]; then \
        echo "torch is built for CUDA ${torch_cuda} but nvcc is CUDA ${nvcc_cuda}: set CUDA_VERSION and TORCH_INDEX_URL to the same major version" >&2; \
        exit 1; \
      fi \
   && TCNN_CUDA_ARCHITECTURES="${TCNN_CUDA_ARCHITECTURES}" \
      pip install --no-build-isolation -c /opt/torch-constraints.txt \
        "git+https://github.com/NVlabs/tiny-cuda-nn@${TCNN_REF}#subdirectory=bindings/torch" \
   && python -c "import torch, tinycudann; print('tiny-cuda-nn bindings built for torch', torch.__version__)"; \
    else echo "WITH_TCNN=${WITH_TCNN}: skipping tiny-cuda-nn"; fi

# p2n and its extras (ray, train, serve, clip, refine, dev), with torch held to the build above.
WORKDIR /app
COPY . /app
RUN pip install -c /opt/torch-constraints.txt -e '.[all]' \
 && python -c "import torch, ray, p2n; print('p2n image: torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__)" \
 && python -c "import torch; want = open('/opt/torch-constraints.txt').readline().split('==')[1].strip(); assert torch.__version__ == want, (torch.__version__, want)"

# `serve.app:app` (Ray Serve import path) and `ray_jobs` resolve from any working directory, on every node.
ENV PYTHONPATH=/app \
    TCNN_CUDA_ARCHITECTURES=${TCNN_CUDA_ARCHITECTURES}

# Serve HTTP, Ray dashboard / job API, GCS, Ray client.
EXPOSE 8000 8265 6379 10001
CMD ["bash"]
