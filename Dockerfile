# The CPU service image: ONNX Runtime engine of the shipped model, built at image build time.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY scripts ./scripts
COPY proto ./proto
COPY qacore ./qacore
COPY builder ./builder
COPY services ./services
COPY pipeline ./pipeline
COPY training ./training
COPY benchmarks ./benchmarks
COPY models ./models
RUN pip install --no-cache-dir . \
 && QA_ENGINE_CACHE=/app/engines qa-build --default

ENV QA_ENGINE_CACHE=/app/engines \
    QA_SERVE_HOST=0.0.0.0 \
    QA_SERVE_PORT=50051 \
    QA_SERVE_METRICS_HOST=0.0.0.0 \
    QA_SERVE_METRICS_PORT=9100
EXPOSE 50051 9100
STOPSIGNAL SIGTERM
CMD ["qa-serve"]
