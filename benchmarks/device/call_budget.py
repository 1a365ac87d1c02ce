"""Where one question's time goes inside the service process, step by step (issue 12, goal 1's profile).

Times, on the machine it runs on, each host-side step the service takes for one SQuAD question at
concurrency 1, with the engine it is given (the torch CUDA-graph engine on a GPU host):

* the CPU steps: question tokenization, cutting windows, padding, the span masks, decoding the spans;
* the engine call as the batcher makes it (`infer_batch`), and the GPU time of the replay alone (CUDA events);
* the two ways a thread can wait for the GPU: spinning (`stream.synchronize()`, CUDA's default while
  fewer contexts than cores are active) and a blocking-sync event (the thread sleeps until the driver wakes it);
* the hand-offs between the event loop and a worker thread: `run_in_executor` of a no-op (both directions),
  and one `call_soon_threadsafe` wake-up.

    python -m realtime_qa.benchmarks.device.call_budget --engine DIR --squad dev-v1.1.json.gz --out budget.json

Prints a table of medians and p90s (microseconds) and writes them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from realtime_qa.qacore.bundle import open_bundle
from realtime_qa.qacore.decoding import span_masks
from realtime_qa.qacore.features import Features
from realtime_qa.qacore.squad import read_dataset
from realtime_qa.qacore.window_results import decode_results, infer_batch, results_table, scatter_results

Steps = dict[str, list[float]]


def timed(steps: Steps, name: str, function: Callable[..., Any], *args: Any) -> Any:
    begin = time.perf_counter_ns()
    result = function(*args)
    steps.setdefault(name, []).append((time.perf_counter_ns() - begin) / 1e3)
    return result


def question_steps(bundle: Any, pairs: list[tuple[str, str]], rounds: int) -> Steps:
    """The CPU steps and the engine call, per question (batch of its windows, as at concurrency 1)."""
    engine, featurizer = bundle.engine, bundle.featurizer
    config = bundle.decoder_defaults
    limits = engine.span_search_limits()
    span_length = config.max_answer_length if limits is not None else None
    pad_id = featurizer.special.pad_id
    steps: Steps = {}
    passages = {passage: featurizer.encode_passage(passage) for _, passage in pairs}  # the passage cache
    for round_ in range(rounds):
        for question, passage_text in pairs:
            record = steps if round_ else {}  # the first round warms every shape
            question_ids = timed(record, "tokenize question", featurizer.encode_question, question)
            passage = passages[passage_text]
            windows = timed(record, "cut windows", featurizer.windows, question_ids, passage)
            timed(record, "pad batch", featurizer.batch, windows)
            if span_length is not None:
                timed(record, "span masks", span_masks, windows, max(window.seq_len for window in windows))
            result, _ = timed(record, "engine call (infer_batch)", infer_batch, engine, windows, pad_id, span_length)
            kept = limits[0] if limits is not None else 0
            table = results_table(windows, span_length, kept)
            widths = [window.seq_len for window in windows]
            timed(record, "scatter results", scatter_results, table, range(len(windows)), widths, result,
                  range(len(windows)))  # fmt: skip
            features = Features(passage, question_ids, windows)
            timed(record, "decode", decode_results, features, table, config)
    return steps


def gpu_waits(engine: Any, repeats: int) -> Steps:
    """One batch-1, sequence-128 replay: its GPU time, and the wall time of launch + wait both ways."""
    import torch

    steps: Steps = {}
    graph = engine._graphed((1, 128))  # the shape a SQuAD question's single window pads to
    stream = engine.stream
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    blocking = torch.cuda.Event(blocking=True)
    for _ in range(repeats):
        with torch.cuda.stream(stream):
            begin.record(stream)
            graph.graph.replay()
            end.record(stream)
        end.synchronize()
        steps.setdefault("GPU: replay (CUDA events)", []).append(begin.elapsed_time(end) * 1e3)
        started = time.perf_counter_ns()
        with torch.cuda.stream(stream):
            graph.inputs.copy_(graph.host_inputs, non_blocking=True)
            graph.graph.replay()
            graph.host_outputs.copy_(graph.outputs, non_blocking=True)
        launched = time.perf_counter_ns()
        stream.synchronize()
        done = time.perf_counter_ns()
        steps.setdefault("host: copy in + replay + copy out, launch", []).append((launched - started) / 1e3)
        steps.setdefault("host: launch + spin wait (stream.synchronize)", []).append((done - started) / 1e3)
        started = time.perf_counter_ns()
        with torch.cuda.stream(stream):
            graph.inputs.copy_(graph.host_inputs, non_blocking=True)
            graph.graph.replay()
            graph.host_outputs.copy_(graph.outputs, non_blocking=True)
            blocking.record(stream)
        blocking.synchronize()
        steps.setdefault("host: launch + blocking-sync event wait", []).append((time.perf_counter_ns() - started) / 1e3)
    return steps


async def loop_handoffs(repeats: int) -> Steps:
    steps: Steps = {}
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)
    await loop.run_in_executor(executor, lambda: None)
    for _ in range(repeats):
        started = time.perf_counter_ns()
        await loop.run_in_executor(executor, lambda: None)
        steps.setdefault("loop -> thread -> loop (run_in_executor no-op)", []).append(
            (time.perf_counter_ns() - started) / 1e3
        )
        woken: asyncio.Future[int] = loop.create_future()
        sent: list[int] = []
        executor.submit(_wake, loop, woken, sent)
        await woken
        steps.setdefault("thread -> loop wake (call_soon_threadsafe)", []).append(
            (time.perf_counter_ns() - sent[0]) / 1e3
        )
    executor.shutdown()
    return steps


def _wake(loop: asyncio.AbstractEventLoop, future: asyncio.Future[int], sent: list[int]) -> None:
    sent.append(time.perf_counter_ns())
    loop.call_soon_threadsafe(future.set_result, 0)


def summary(steps: Steps) -> dict[str, dict[str, float]]:
    return {
        name: {
            "n": len(values),
            "p50_us": round(statistics.median(values), 1),
            "p90_us": round(float(np.percentile(values, 90)), 1),
        }
        for name, values in steps.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, required=True)
    parser.add_argument("--squad", type=Path, required=True)
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dataset = read_dataset(args.squad)
    pairs = [(question.question, paragraph.context) for paragraph, question in dataset.questions(args.questions)]
    steps: Steps = {}
    with open_bundle(args.engine) as bundle:
        steps.update(question_steps(bundle, pairs, args.rounds))
        if getattr(bundle.engine, "stream", None) is not None:
            steps.update(gpu_waits(bundle.engine, 500))
    steps.update(asyncio.run(loop_handoffs(500)))
    table = summary(steps)
    print("| step | n | p50 us | p90 us |\n| --- | ---: | ---: | ---: |")
    for name, row in table.items():
        print(f"| {name} | {row['n']} | {row['p50_us']} | {row['p90_us']} |")
    if args.out:
        args.out.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
