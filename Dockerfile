# The image the Kubernetes manifests of `soho-scale launch --scheduler k8s` run: the repo at
# /workspace (the manifests' workingDir) with its dependencies at the pins `make setup` installs
# (constraints.txt: torch and its CUDA libraries from PyPI, DeepSpeed, mosaicml-streaming, ...).
#   docker build -t registry.example/soho-scale:$(git rev-parse --short HEAD) .
#   soho-scale launch JOB --scheduler k8s --image registry.example/soho-scale:<tag> --out job.yaml
# The node launcher (soho_scale.launch.node) is each pod's PID 1 and handles SIGTERM itself, so
# no init process is needed. Weights are not baked in: specs name them by s3:// URL, or mount
# the Hugging Face / torch hub caches (HF_HOME, TORCH_HOME) from a volume.
FROM python:3.11-slim-bookworm

# g++: DeepSpeed compiles its CPU communication op on first use (CPU ranks, `--cpu`).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
# Dependencies first, in a layer of their own: code changes do not reinstall torch.
COPY pyproject.toml constraints.txt README.md ./
RUN mkdir soho_scale data_pipeline \
    && touch soho_scale/__init__.py data_pipeline/__init__.py \
    && pip install --no-cache-dir -c constraints.txt -e . \
    && rm -rf soho_scale data_pipeline
# Editable: the code finds ds_configs/ and jobs/ beside itself, as in a checkout.
COPY soho_scale soho_scale
COPY data_pipeline data_pipeline
COPY ds_configs ds_configs
COPY jobs jobs
ENV PYTHONUNBUFFERED=1
