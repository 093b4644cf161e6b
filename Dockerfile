# The shardtune image for RayJob/RayCluster/RayService pods: Ray's own image of the pinned Ray
# version plus this project installed from constraints.txt (the file `make test` installs from).
#   docker build --build-arg VARIANT=cpu  -t shardtune:2.60.0-cpu  .   # CPU-only head, submitter
#   docker build --build-arg VARIANT=cuda -t shardtune:2.60.0-cuda .   # GPU workers
# RAY_VERSION must equal ray's pin in constraints.txt and the manifests' tags (a test checks).
ARG RAY_VERSION=2.60.0
ARG VARIANT=cpu

FROM rayproject/ray:${RAY_VERSION}-py311 AS base-cpu
# The CPU build of torch: a bare `torch` requirement would pull the multi-GB CUDA build.
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM rayproject/ray:${RAY_VERSION}-py311-gpu AS base-cuda
# PyPI's torch wheels are the CUDA builds.
ENV TORCH_INDEX=https://pypi.org/simple

FROM base-${VARIANT}
ARG TORCH_VERSION=2.13.0
# Ray's images run as the unprivileged user `ray` (uid 1000); the manifests keep it non-root.
WORKDIR /home/ray/shardtune
COPY --chown=ray:users constraints.txt /home/ray/constraints.txt
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
# The repo root is the package (pyproject.toml maps it to `shardtune`); [serve] so the same
# image runs k8s/rayservice.yaml.
COPY --chown=ray:users . /home/ray/shardtune
RUN pip install --no-cache-dir -c /home/ray/constraints.txt "/home/ray/shardtune[serve]"
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
