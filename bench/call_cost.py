"""What one gRPC call costs the server, apart from decoding: `python -m bench.call_cost`.

The throughput target compares the service with the engine alone; what separates them is per-call
work. This measures it as server CPU per call, under a closed loop of N clients, each on a
connection of its own, for a fixed time:

1. a bare grpc.aio server answering `translator.v1.Translator/Translate` with the text echoed
   (`--serve-echo`: no model, no scheduler): grpc.aio's own floor;
2. `python -m service` (one process, its defaults on this machine) with `max_output_tokens` 1: one
   encoder row and one decoder step per call, so nearly all the rest is per-call work — the
   servicer, the hand-offs to the decode thread and back, admission and retirement;
3. the same server with ordinary requests (the sentences decoded to their end token);
4. the encoder alone (library level) per sentence at a few batch sizes: the one model cost every
   call pays whatever its length.

Each server runs in a subprocess; its CPU is summed over its process tree from /proc. Writes a
markdown page (default docs/call-cost.md) with the machine. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from bench.cli import add_out, benchmark_parser
from bench.inputs import load_texts
from bench.load_client import OWN_CONNECTION
from bench.processes import process_tree_cpu_seconds, service_argv, serving_process
from bench.report import describe_machine, machine_table
from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.config import EngineConfig
from service.engine.engine import Engine
from service.modeldir.tokenizer import Tokenizer

DEFAULT_OUT = Path("docs/call-cost.md")


@dataclass(frozen=True)
class CallCost:
    server: str  # what answered, in words
    calls_per_s: float
    server_cores: float
    cpu_ms_per_call: float
    output_tokens_per_call: float


class _Echo(pb_grpc.TranslatorServicer):
    """Translate echoes its texts; the other methods answer UNIMPLEMENTED."""

    async def Translate(
        self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext
    ) -> pb.TranslateResponse:
        return pb.TranslateResponse(translations=[pb.Translation(text=t) for t in request.texts])

    async def TranslateStream(  # type: ignore[override]
        self, request: pb.TranslateStreamRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the echo server only has Translate")

    async def Attend(self, request: pb.AttendRequest, context: grpc.aio.ServicerContext) -> pb.AttendResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the echo server only has Translate")
        raise AssertionError("unreachable")

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the echo server only has Translate")
        raise AssertionError("unreachable")


async def serve_echo(port: int) -> None:
    """The bare server: Translate echoes, health SERVING (for `wait_serving`), until killed."""
    server = grpc.aio.server()
    pb_grpc.add_TranslatorServicer_to_server(_Echo(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def closed_loop(
    target: str, pid: int, request: pb.TranslateRequest, clients: int, duration_s: float
) -> tuple[float, float, float, float]:
    """`clients` clients back to back on their own connections: calls/s, server cores, server CPU
    ms per call, output tokens per call."""
    channels = [grpc.aio.insecure_channel(target, options=OWN_CONNECTION) for _ in range(clients)]
    stubs = [pb_grpc.TranslatorStub(c) for c in channels]
    try:
        for stub in stubs:  # connected and warm
            await stub.Translate(request, timeout=60)
        calls, tokens = 0, 0
        cpu, start = process_tree_cpu_seconds(pid), time.perf_counter()
        deadline = start + duration_s

        async def client(stub: pb_grpc.TranslatorAsyncStub) -> None:
            nonlocal calls, tokens
            while time.perf_counter() < deadline:
                response = await stub.Translate(request, timeout=60)
                calls += 1
                tokens += sum(t.output_tokens for t in response.translations)

        await asyncio.gather(*(client(s) for s in stubs))
        wall, used = time.perf_counter() - start, process_tree_cpu_seconds(pid) - cpu
        return calls / wall, used / wall, 1000 * used / calls, tokens / calls
    finally:
        for channel in channels:
            await channel.close()


async def measure_server(
    argv: list[str],
    label_requests: Sequence[tuple[str, pb.TranslateRequest]],
    clients: int,
    duration_s: float,
) -> list[CallCost]:
    """Serve `argv` (`serving_process`) and run a closed loop per request kind."""
    async with serving_process(argv) as (target, pid):
        results = []
        for label, request in label_requests:
            rate, cores, ms, tokens = await closed_loop(target, pid, request, clients, duration_s)
            results.append(CallCost(label, rate, cores, ms, tokens))
        return results


def encoder_cost(
    model_dir: Path, texts: Sequence[str], batches: Sequence[int], seconds: float = 1.5
) -> dict[int, float]:
    """Microseconds of encoder wall time per sentence at each batch size (one thread)."""
    engine = Engine(EngineConfig(model_dirs=(model_dir,), intra_op_threads=1))
    graphs = engine.graphs()
    tokenizer = Tokenizer.from_file(graphs.model_dir / graphs.manifest.tokenizer)
    sources = [tokenizer.encode_source(t, engine.model().limits.max_source_tokens) for t in texts]
    costs = {}
    for batch in batches:
        runs = []
        for _ in range(3):
            start, done = time.perf_counter(), 0
            while time.perf_counter() - start < seconds / 3:
                for i in range(0, len(sources), batch):
                    engine.encode(None, sources[i : i + batch])
                    done += len(sources[i : i + batch])
            runs.append((time.perf_counter() - start) / done)
        costs[batch] = 1e6 * statistics.median(runs)
    return costs


def render(
    costs: Sequence[CallCost], encoder: dict[int, float], args: argparse.Namespace, load_before: float
) -> str:
    command = f"python -m bench.call_cost --clients {args.clients} --duration {args.duration:g}"
    rows = "\n".join(
        f"| {c.server} | {c.calls_per_s:,.0f} | {c.output_tokens_per_call:.1f} | {c.server_cores:.2f} | "
        f"{c.cpu_ms_per_call:.3f} |"
        for c in costs
    )
    floor = costs[0].cpu_ms_per_call
    tiny = next((c for c in costs if "max_output_tokens 1" in c.server), None)
    encoder_rows = "\n".join(f"| {b} | {us:.0f} |" for b, us in encoder.items())
    reading = ""
    if tiny is not None:
        reading = (
            f"A call that decodes one token cost the server {tiny.cpu_ms_per_call:.2f} ms of CPU, against "
            f"{floor:.2f} ms for grpc.aio alone; the encoder accounts for about "
            f"{min(encoder.values()) / 1000:.2f} ms of it, one decoder step shared by the batch for less, "
            "and the rest is the server's per-call Python (servicer, hand-offs between the event loop and "
            "the decode thread, admission and retirement), on the one interpreter lock."
        )
    intro = (
        "Server CPU per call (user + system, its whole process tree, from /proc) under a closed loop of "
        f"{args.clients} clients, each on a connection of its own, for {args.duration:g} s per row; the "
        "load generator runs in another process on the same cores. See `bench/call_cost.py` for what "
        "each row is. One run on a shared machine: compare within the page."
    )
    return f"""# What a call costs the server

<!-- Generated by `{command}`; a regeneration overwrites the page. -->

{intro}

| server | calls/s | output tokens per call | server cores | server CPU per call (ms) |
|---|---:|---:|---:|---:|
{rows}

{reading}

Encoder alone (library level, one thread), per sentence, on the test sentences:

| batch | µs per sentence |
|---:|---:|
{encoder_rows}

## Machine

{machine_table(describe_machine(), load_before, [("command", f"`{command}`")])}
"""


def _parser() -> argparse.ArgumentParser:
    parser = benchmark_parser("bench.call_cost", __doc__, loop_seconds=8.0)
    add_out(parser, DEFAULT_OUT)
    # the bare server's process: `--serve-echo --port P`
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.serve_echo:
        asyncio.run(serve_echo(args.port))
        return 0
    if args.clients < 1 or args.duration <= 0:
        raise SystemExit("--clients and --duration must be positive")
    load_before = describe_machine().load
    texts, _ = load_texts(args.corpus, 256)
    text = "The old man gives the red book to the child."
    one_token = pb.TranslateOptions(stopping=pb.StoppingCriteria(max_output_tokens=1))

    async def run() -> list[CallCost]:
        echo = [sys.executable, "-m", "bench.call_cost", "--serve-echo"]  # `--port P` is appended
        costs = await measure_server(
            echo,
            [("grpc.aio alone (echo, no model)", pb.TranslateRequest(texts=[text]))],
            args.clients,
            args.duration,
        )
        service = service_argv()
        service += ["--log-level", "WARNING", "--model-dirs", str(args.model_dir)]
        costs += await measure_server(
            service,
            [
                (
                    "`python -m service`, max_output_tokens 1",
                    pb.TranslateRequest(texts=[text], options=one_token),
                ),
                ("`python -m service`, decoded to the end", pb.TranslateRequest(texts=[text])),
            ],
            args.clients,
            args.duration,
        )
        return costs

    costs = asyncio.run(run())
    for c in costs:
        print(
            f"{c.server}: {c.calls_per_s:,.0f} calls/s, {c.server_cores:.2f} cores, "
            f"{c.cpu_ms_per_call:.3f} ms/call",
            file=sys.stderr,
        )
    encoder = encoder_cost(args.model_dir, texts, [1, 8, 32])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(costs, encoder, args, load_before))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
