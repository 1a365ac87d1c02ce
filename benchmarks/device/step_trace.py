"""Where one question's time goes between the client and the server, step by step, at concurrency 1.

    python3 -m realtime_qa.benchmarks.device.step_trace --engine /tmp/eng-torch --squad dev-v1.1.json.gz \
        --questions 2000 --out trace.json

Starts `qa-serve` (one process, default flags plus `--server-arg`) with timestamps taken at each step of the
service's path (wrappers installed in that process only: the service's code is unchanged), then asks
`--questions` SQuAD questions one at a time over one `AnswerStream` and then over unary `Answer` calls, with
its own timestamps on the client side (the bare generated stub on uvloop where installed: request and reply
conversions timed apart).
Server and client run on the same host, so `time.perf_counter_ns()` (CLOCK_MONOTONIC) is one clock for both;
the questions are strictly sequential, so the k-th mark of each step belongs to the k-th question. Prints
the median and p90 of every gap and writes them as JSON. The first 10 % of each API is warm-up, not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from realtime_qa.services.cli import event_loop_factory

SERVING = "] serving "


def serve_traced(argv: list[str]) -> int:
    """`qa-serve argv` with step marks; they are written to $STEP_TRACE_OUT when the server exits."""
    import atexit

    from realtime_qa.services import batcher, qa_service
    from realtime_qa.services.cli import main as serve

    marks: list[tuple[str, int]] = []
    now = time.perf_counter_ns

    def marked(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            marks.append((name, now()))
            return function(*args, **kwargs)

        return wrapper

    service = qa_service.QuestionAnsweringService
    answer, unary = service.answer, service.Answer

    async def traced_answer(self: Any, query: Any, arrival_ns: int, *args: Any) -> Any:
        marks.append(("arrival", arrival_ns))
        marks.append(("answer_start", now()))
        result = await answer(self, query, arrival_ns, *args)
        marks.append(("answer_end", now()))
        return result

    async def traced_unary(self: Any, request: Any, context: Any) -> Any:
        marks.append(("rpc_start", now()))
        result = await unary(self, request, context)
        marks.append(("rpc_end", now()))
        return result

    to_pb = qa_service.answer_to_pb

    def traced_to_pb(served: Any) -> Any:
        result = to_pb(served)
        marks.append(("to_pb_end", now()))
        return result

    session_init = qa_service.StreamSession.__init__

    def traced_session(self: Any, owner: Any, stream_id: str, context: Any) -> None:
        session_init(self, owner, stream_id, context)
        self.context = _TracedContext(context, marks)

    infer = batcher.Batcher._infer

    def traced_infer(self: Any, *args: Any, **kwargs: Any) -> Any:
        marks.append(("infer_start", now()))
        result = infer(self, *args, **kwargs)
        marks.append(("infer_end", now()))
        return result

    polling: Any = getattr(batcher.Batcher, "_infer_polling", None)  # absent before the batcher launched from the loop

    async def traced_polling(self: Any, *args: Any, **kwargs: Any) -> Any:  # the engine call launched from the loop
        marks.append(("infer_start", now()))
        result = await polling(self, *args, **kwargs)
        marks.append(("infer_end", now()))
        return result

    batcher_class = batcher.Batcher
    wrappers: list[tuple[Any, str, Any]] = [
        (service, "answer", traced_answer),
        (service, "Answer", traced_unary),
        (qa_service, "answer_to_pb", traced_to_pb),
        (qa_service.StreamSession, "__init__", traced_session),
        (batcher_class, "_infer", traced_infer),
        (batcher_class, "submit", marked("submit", batcher_class.submit)),
        (batcher_class, "_take", marked("take", batcher_class._take)),
        (batcher_class, "_deliver", marked("deliver", batcher_class._deliver)),
    ]
    if polling is not None:
        wrappers.append((batcher_class, "_infer_polling", traced_polling))
    for owner, name, wrapper in wrappers:  # setattr: replacing methods is the point here
        setattr(owner, name, wrapper)
    atexit.register(lambda: Path(os.environ["STEP_TRACE_OUT"]).write_text(json.dumps(marks)))
    return serve(argv)


class _TracedContext:
    """A stream's servicer context whose writes are marked."""

    def __init__(self, context: Any, marks: list[tuple[str, int]]) -> None:
        self._context, self._marks = context, marks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        self._marks.append(("write_start", time.perf_counter_ns()))
        await self._context.write(message)


async def ask(target: str, squad: Path, questions: int) -> list[tuple[Any, ...]]:
    """(api, before request conversion, after it, after the write, reply read, after reply conversion) per question."""
    import grpc
    from realtime_qa.benchmarks.serve_bench import load_questions
    from realtime_qa.pipeline.client import Answer, Question

    from realtime_qa.qa.v1 import qa_pb2_grpc

    now = time.perf_counter_ns
    pairs = load_questions(squad, 500)
    metadata = (("x-request-id", "step-trace"),)
    rows: list[tuple[Any, ...]] = []
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 60)
        stub = qa_pb2_grpc.QuestionAnsweringStub(channel)
        call = stub.AnswerStream(metadata=metadata)
        for api in ("stream", "unary"):
            for index in range(questions):
                question, passage = pairs[index % len(pairs)]
                began = now()
                message = Question(question, passage).to_pb()
                converted = now()
                if api == "stream":
                    await call.write(message)
                    written = now()
                    reply = await call.read()
                else:
                    written = converted
                    reply = await stub.Answer(message, metadata=metadata, timeout=30)
                read = now()
                Answer.from_pb(reply)
                rows.append((api, began, converted, written, read, now()))
            if api == "stream":
                await call.done_writing()
                await call.read()  # the end of the stream
    return rows


def gaps(server_marks: list[tuple[str, int]], client_rows: list[tuple[Any, ...]]) -> dict[str, dict[str, Any]]:
    """Median and p90 (µs) of every step of each API, from the k-th mark of each step per question."""
    marks: dict[str, list[int]] = {}
    for name, when in server_marks:
        marks.setdefault(name, []).append(when)
    per_api: dict[str, list[dict[str, int]]] = {"stream": [], "unary": []}
    counts = {"stream": 0, "unary": 0}  # the k-th question of an API: its index in the API-only marks
    for k, (api, began, converted, written, read, done) in enumerate(client_rows):
        nth = counts[api]
        counts[api] += 1

        def at(step: str, k: int = k) -> int:
            return marks[step][k]

        steps = {"client: request to protobuf": converted - began}
        if api == "stream":
            steps["client write (gRPC)"] = written - converted
            steps["client write done -> server read the question"] = at("arrival") - written
            steps["question read -> answer task running"] = at("answer_start") - at("arrival")
        else:
            steps["client call -> server method called (gRPC, interceptors)"] = marks["rpc_start"][nth] - converted
            steps["question read -> answer task running"] = at("answer_start") - marks["rpc_start"][nth]
        steps.update({
            "tokenize, passage, windows": at("submit") - at("answer_start"),
            "batcher: worker wakes, forms the batch": at("take") - at("submit"),
            "batcher: hop to the engine thread": at("infer_start") - at("take"),
            "engine call (pad, masks, copies, GPU, wait)": at("infer_end") - at("infer_start"),
            "batcher: hop back to the event loop": at("deliver") - at("infer_end"),
            "deliver, decode, metrics": at("answer_end") - at("deliver"),
            "answer to protobuf": at("to_pb_end") - at("answer_end"),
        })  # fmt: skip
        if api == "stream":
            # The server's write call returns only after the client has the reply (its completion comes later).
            write_start = marks["write_start"][nth]
            steps["to the stream's writer"] = write_start - at("to_pb_end")
            steps["server write -> client read the reply (gRPC)"] = read - write_start
        else:
            rpc_end = marks["rpc_end"][nth]
            steps["server method returns"] = rpc_end - at("to_pb_end")
            steps["method return -> client read the reply (gRPC, interceptors)"] = read - rpc_end
        steps["client: reply from protobuf"] = done - read
        steps["total (client)"] = done - began
        per_api[api].append(steps)
    summary: dict[str, dict[str, Any]] = {}
    for api, rows in per_api.items():
        kept = rows[len(rows) // 10 :]
        summary[api] = {"questions": len(kept)} | {
            step: {
                "p50_us": round(float(np.median([row[step] for row in kept])) / 1e3, 1),
                "p90_us": round(float(np.percentile([row[step] for row in kept], 90)) / 1e3, 1),
            }
            for step in kept[0]
        }
    return summary


def markdown(summary: dict[str, dict[str, Any]]) -> str:
    lines = []
    for api, steps in summary.items():
        lines += [f"\n{api} ({steps['questions']} questions)\n", "| step | p50 µs | p90 µs |", "| --- | ---: | ---: |"]
        lines += [
            f"| {step} | {v['p50_us']:.1f} | {v['p90_us']:.1f} |" for step, v in steps.items() if step != "questions"
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True, type=Path)
    parser.add_argument("--squad", required=True, type=Path)
    parser.add_argument("--questions", type=int, default=2000, help="per API")
    parser.add_argument("--port", type=int, default=50199)
    parser.add_argument("--server-arg", action="append", default=[], help="extra qa-serve flag (repeatable)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.questions < 10:
        print("step_trace: --questions must be at least 10", file=sys.stderr)
        return 2
    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    marks_file, log_file = scratch / f"step-trace-{os.getpid()}.json", scratch / f"step-trace-{os.getpid()}.log"
    with log_file.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "realtime_qa.benchmarks.device.step_trace", "--serve", "--engine", str(args.engine),
             "--port", str(args.port), *args.server_arg],
            env={**os.environ, "STEP_TRACE_OUT": str(marks_file)}, stderr=log,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while SERVING not in log_file.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qa-serve did not start:\n" + log_file.read_text()[-2000:])
            time.sleep(0.2)
        with asyncio.Runner(loop_factory=event_loop_factory("auto")) as runner:
            rows = runner.run(ask(f"127.0.0.1:{args.port}", args.squad, args.questions))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    summary = gaps(json.loads(marks_file.read_text()), rows)
    marks_file.unlink()
    log_file.unlink()
    print(markdown(summary))
    if args.out is not None:
        args.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        raise SystemExit(serve_traced(sys.argv[2:]))
    raise SystemExit(main())
