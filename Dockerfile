# Turnout: gateway, worker and the sample-model job share this image (MLflow included, ~1 GB).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY workers ./workers
RUN pip install . \
    && useradd --create-home --uid 10001 turnout
USER turnout
WORKDIR /home/turnout

EXPOSE 8080
ENTRYPOINT ["turnout"]
CMD ["--help"]
