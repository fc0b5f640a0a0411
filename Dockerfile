# The one modelfleet image: `modelfleet operator | agent | gateway | ...`.
#
#   docker build -t modelfleet:dev .
#
# The builder installs the package and its exact pinned dependencies (constraints.txt) into a
# virtual environment; the runtime stage copies only that environment onto a slim Python base
# and runs as an unprivileged numeric user, so Kubernetes can verify runAsNonRoot.
# The Python that CI tests on.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/modelfleet
WORKDIR /src
# Dependencies first, from the pins alone, so a source change reuses this layer.
COPY constraints.txt pyproject.toml README.md ./
COPY operator ./operator
RUN /opt/modelfleet/bin/pip wheel --wheel-dir /wheels --constraint constraints.txt . \
 && /opt/modelfleet/bin/pip install --no-index --find-links /wheels --constraint constraints.txt modelfleet \
 && /opt/modelfleet/bin/modelfleet --help >/dev/null

FROM python:${PYTHON_VERSION}-slim-bookworm
LABEL org.opencontainers.image.title="modelfleet" \
      org.opencontainers.image.description="Runs LLM model replicas (vLLM) across NVIDIA GPU nodes on Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/modelfleet/modelfleet"
ENV PATH=/opt/modelfleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=builder /opt/modelfleet /opt/modelfleet
# A numeric user (and group) that the chart's securityContext names too (runAsUser 10001).
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 9400
ENTRYPOINT ["modelfleet"]
CMD ["--help"]
