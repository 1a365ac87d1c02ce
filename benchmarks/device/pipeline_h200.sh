#!/usr/bin/env bash
# qa-bench pipeline on the GPU machine (issue 8; written, not yet run: no GPU machine was free): the chain with
# the PyTorch CUDA-graph engine (fp16), one process and split, each against its baseline. Run from the
# repository root on the GPU machine with .carry/pipeline (the wheels the image lacks or has in other versions:
# grpcio, protobuf, grpcio-health-checking, grpcio-reflection, aiostream; and dev-v1.1.json.gz) and the
# generated protobuf packages (qa, assistant, asr, response) carried; the results land in $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/pipeline/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc
  python3 -c "import torch, grpc, google.protobuf as p, aiostream; print(torch.__version__, grpc.__version__, p.__version__)"; } 2>&1 | tee $OUT/env.txt
timeout 240 python3 -m realtime_qa.builder.cli -m models/minilm-l6-squad -o /tmp/eng-torch --backend torch --fp16 -b 1 -b 8 \
  -s 128 -s 384 --force 2>&1 | tail -3
timeout 300 python3 -m realtime_qa.benchmarks.cli --log-level WARNING pipeline --engine /tmp/eng-torch \
  --squad .carry/pipeline/dev-v1.1.json.gz ${EXTRA:-} \
  --json-out $OUT/pipeline_h200.json --markdown-out $OUT/pipeline_h200.md 2>&1 | tail -70
