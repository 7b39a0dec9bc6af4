# syntax=docker/dockerfile:1
# Images of disagg, one file, several targets:
#   docker build --target operator -t ghcr.io/disagg/operator:0.1.0 .   # kopf operator, no torch
#   docker build --target runtime  -t ghcr.io/disagg/runtime:0.1.0  .   # router / prefill / decode workers
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- wheels: the project and its dependencies, built once, copied into the slim stages ----
FROM ${PYTHON_IMAGE} AS wheels
WORKDIR /src
RUN pip install --no-cache-dir --upgrade pip build
COPY pyproject.toml README.md ./
COPY planner planner
COPY runtime runtime
COPY operator operator
COPY cli cli
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[operator]"

# ---- operator: plain Python (planner + kopf + kubernetes client); never installs torch ----
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=wheels /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels "disagg[operator]" \
    && rm -rf /wheels \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin disagg
USER 10001
ENTRYPOINT ["disagg"]
# Latency profiles: mount a ConfigMap and add --profiles-dir (the Helm chart's profilesConfigMap does).
CMD ["operator"]

# ---- runtime: the serving workers; CUDA wheels of torch from the PyTorch index ----
FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /src
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY planner planner
COPY runtime runtime
COPY operator operator
COPY cli cli
RUN pip install --no-cache-dir ".[runtime]" && useradd --uid 10001 --no-create-home disagg
USER 10001
ENTRYPOINT ["disagg"]
CMD ["serve", "--help"]
