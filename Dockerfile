# Lens on the Ray image of the same Ray version, for the KubeRay manifests in infra/kuberay/.
#
#   docker build -t ghcr.io/your-org/lens:0.1.0-cpu .                      # CPU nodes (ONNX Runtime / OpenVINO)
#   docker build -t ghcr.io/your-org/lens:0.1.0-gpu --build-arg DEVICE=gpu .  # GPU nodes (CUDA torch)
#   docker push ghcr.io/your-org/lens:0.1.0-cpu && docker push ghcr.io/your-org/lens:0.1.0-gpu
#
# `make image REGISTRY=ghcr.io/your-org` runs both builds. The tags are the ones infra/kuberay/*.yaml name, and
# RAY_VERSION is the Ray that pyproject.toml pins (tests/test_container.py checks all three agree). Every node
# of one cluster must run the same Ray and Python, which both variants share.
ARG RAY_VERSION=2.60.0
ARG PYTHON=py311
ARG DEVICE=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-${DEVICE}
ARG RAY_VERSION

# The Ray images run as the unprivileged user "ray" (uid 1000); Lens adds nothing that needs root.
USER ray
WORKDIR /home/ray/lens
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users lens ./lens
COPY --chown=ray:users serve ./serve
COPY --chown=ray:users batch ./batch
COPY --chown=ray:users index ./index
COPY --chown=ray:users train ./train
COPY --chown=ray:users cli ./cli
COPY --chown=ray:users LICENSE ./
COPY --chown=ray:users infra ./infra
# Ray itself stays the image's version (the pin makes pip keep it); Lens and its extras on top.
RUN pip install --no-cache-dir ".[samples,train,plots,int8]" "ray[serve,data,train]==${RAY_VERSION}"

# Replicas start warm: the embedded model's ONNX export (and the backend choice) built into the image's cache.
ENV LENS_CACHE_DIR=/home/ray/.cache/lens
RUN lens tag --samples --top-k 1 > /dev/null

# Serve's HTTP port and the Prometheus metrics port `lens serve` uses.
EXPOSE 8000 8080
