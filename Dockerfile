# The CPU service image: the shipped model's ONNX Runtime INT8 engine (shipped calibration), built at image build time.
#   docker build -t realtime-qa:cpu .
# Runs as an unprivileged user; the HEALTHCHECK asks grpc.health.v1 whether qa.v1 is SERVING.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY scripts ./scripts
COPY proto ./proto
COPY realtime_qa/__init__.py ./realtime_qa/__init__.py
COPY qacore ./qacore
COPY builder ./builder
COPY services ./services
COPY pipeline ./pipeline
COPY training ./training
COPY benchmarks ./benchmarks
COPY models ./models
# The engine goes to a fixed path named explicitly (not the user cache, not site-packages), so the image
# serves exactly the engine it was built with and never builds at start-up.
RUN pip install --no-cache-dir . \
 && qa-build --checkpoint /app/models/minilm-l6-squad --backend onnxruntime --output /app/engines/minilm-l6-squad-cpu \
    --int8 --calib-path /app/models/minilm-l6-squad/calibration.json \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin qa

ENV QA_SERVE_ENGINE=/app/engines/minilm-l6-squad-cpu \
    QA_SERVE_HOST=0.0.0.0 \
    QA_SERVE_PORT=50051 \
    QA_SERVE_METRICS_HOST=0.0.0.0 \
    QA_SERVE_METRICS_PORT=9100
USER 10001
EXPOSE 50051 9100
STOPSIGNAL SIGTERM
# Health checks are exempt from authentication, so the probe needs no token (TLS servers: see compose.yaml).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(service='qa.v1.QuestionAnswering'), timeout=2).status; sys.exit(0 if s == h.HealthCheckResponse.SERVING else 1)"]
CMD ["qa-serve"]
