#!/usr/bin/env bash
# Lead's GPU call: qa-serve with the PyTorch CUDA-graph engine on the H100, batcher off vs on.
# Run on the GPU machine from the repository root, with .whl/ (the wheels named in results/serve_h100.md)
# and .carry/serve/dev-v1.1.json.gz carried; EXTRA="--max-queue-delay-us 0" for the second table.
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/env.txt
python3 -c "import torch, grpc, google.protobuf as p; print(torch.__version__, grpc.__version__, p.__version__)" | tee -a $OUT/env.txt
python3 scripts/gen_protos.py || exit 1
mkdir -p ../shared/data/squad && cp .carry/serve/dev-v1.1.json.gz ../shared/data/squad/
python3 -m realtime_qa.builder.cli -m models/minilm-l6-squad -o /tmp/eng-torch --backend torch --fp16 -b 1 -b 8 -b 32 -s 128 -s 384 --force 2>&1 | tail -2
nproc | tee -a $OUT/env.txt
timeout 330 python3 -m realtime_qa.benchmarks.cli serve --engine /tmp/eng-torch --compare-batching --concurrency 1,8,32,128 \
  --max-batch-size 32 --duration-s 6 --warmup-s 2 ${EXTRA:-} \
  --json-out $OUT/serve_h100.json --markdown-out $OUT/serve_h100.md 2>&1 | tee $OUT/serve.log | grep -v " INFO " | tail -30
