"""`roberta serve` under load: dynamic batching against the same server with batching off.

Two servers on loopback hold the same model: one with the default batching, one with
`--max-batch-requests 1` (one request per forward pass, what a naive server does). Closed-loop clients
(aiohttp, one keep-alive connection each; httpx's client was measured here at a tenth of aiohttp's
request rate against the same server's /health, so it measured itself more than the server) send one SST-2 dev sentence per `POST /embed` request; at each concurrency
the two servers get interleaved passes of a fixed number of requests, each pass also bounded in time.
Reported per server and concurrency: requests/s, real tokens/s (as the server counted them), p50 and
p99 latency of the requests answered, the requests the server refused under load (503 past its
--timeout, 429 with its queue full; medians over the passes), and the ratios batched / unbatched. A
second table does the same for `POST /rerank` (TEI's cross-encoder route): each request ranks
`--rerank-texts` SST-2 sentences against another one as the query, and its rate is counted in (query,
text) pairs per second.

    PYTHONPATH=. python benchmarks/bench_serve.py                  # base size, random weights
    PYTHONPATH=. python benchmarks/bench_serve.py --model DIR      # any model roberta.load reads
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import urllib.error
import urllib.request

import aiohttp

from common import DATA, ROOT, table, tsv_column


class Server:
    """`roberta serve` in a subprocess on a free port, until `stop`."""

    def __init__(self, model: str, *flags: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "roberta", "serve", "-m", model, "--port", "0", *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 300
        for line in self.proc.stdout:
            match = re.search(r"on (http://\S+?:\d+)", line)
            if match:
                self.url = match.group(1)
                break
        else:
            sys.exit(f"error: the server did not start: {self.proc.wait()}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep its log pipe drained
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                sys.exit("error: the server did not become healthy")
            time.sleep(0.2)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=120)


def request(route: str, sentences: list[str], i: int, texts: int) -> tuple[dict, int]:
    """The i-th request's body for `route`, and the model inputs it holds (texts, or query-text pairs)."""
    if route == "/embed":
        return {"inputs": sentences[i % len(sentences)]}, 1
    query, start = sentences[i % len(sentences)], (i * texts + 1) % len(sentences)
    return {"query": query, "texts": [sentences[(start + j) % len(sentences)] for j in range(texts)]}, texts


def tokens_run(url: str) -> float:
    """The server's count of tokens it ran through the model (its /metrics)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        return float(re.search(r"^roberta_tokens_total (\S+)$", response.read().decode(), re.M).group(1))


async def one_pass(url: str, route: str, sentences: list[str], concurrency: int, requests: int, time_limit: float,
                   texts: int = 1) -> dict:
    """`requests` requests from `concurrency` clients, each sending its next one when answered. A 503 (the
    server's --timeout passed) or 429 (its queue full) is the server refusing under load: counted, not
    timed, and the client goes on."""
    latencies: list[float] = []
    inputs = refused = 0
    next_index = 0
    tokens = tokens_run(url)
    start = time.perf_counter()

    async def client(http: aiohttp.ClientSession):
        nonlocal next_index, inputs, refused
        while next_index < requests and time.perf_counter() - start < time_limit:
            body, n = request(route, sentences, next_index, texts)
            next_index += 1
            t = time.perf_counter()
            async with http.post(url + route, json=body) as response:
                await response.read()
                if response.status in (429, 503):
                    refused += 1
                    continue
                response.raise_for_status()
            latencies.append(time.perf_counter() - t)
            inputs += n

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    tokens = tokens_run(url) - tokens
    latencies.sort()
    at = (lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]) if latencies else \
        (lambda q: float("nan"))
    return {"requests/s": len(latencies) / seconds, "inputs/s": inputs / seconds, "tokens/s": tokens / seconds,
            "done": len(latencies), "refused": refused, "p50 ms": at(0.5), "p99 ms": at(0.99)}


def cpu() -> str:
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", info)
    flags = set(re.search(r"Flags:\s*(.+)", info).group(1).split()) if "Flags:" in info else set()
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return f"{model.group(1).strip() if model else 'unknown CPU'}, {os.cpu_count()} cores; flags: " + \
        " ".join(f for f in wanted if f in flags)


def main() -> None:
    sentences = tsv_column(DATA / "glue" / "SST-2" / "dev.tsv", "sentence")
    model = args.model
    if model is None:
        import torch

        from roberta.hub import RobertaHub
        from roberta.model import RobertaConfig, RobertaForMaskedLM
        from roberta.tokenizer import RobertaTokenizer

        torch.manual_seed(0)
        tokenizer = RobertaTokenizer.from_pretrained(DATA / "roberta-bpe")
        model = tempfile.mkdtemp(prefix="bench_serve_")
        # its main head has one output: a cross-encoder for /rerank (and /embed as for any model)
        encoder = RobertaForMaskedLM(RobertaConfig.base(num_hidden_layers=args.layers, head_name="rank"))
        encoder.register_classification_head("rank", 1)
        RobertaHub(encoder, tokenizer).save(model)
    flags = ["--threads", str(args.threads), "--precision", args.precision]
    described = args.model or f"base size, {args.layers} layers, random weights"
    print(f"CPU: {cpu()}\nload average at the start: {os.getloadavg()}\nmodel: {described}; {args.precision}; "
          f"{args.threads} threads per server; {len(sentences)} SST-2 dev sentences", flush=True)
    sides = {"batched": Server(model, *flags), "unbatched": Server(model, *flags, "--max-batch-requests", "1")}
    try:
        with urllib.request.urlopen(sides["batched"].url + "/info", timeout=30) as response:
            reranker = "reranker" in json.loads(response.read())["model_type"]
        routes = {"/embed": 1, **({"/rerank": args.rerank_texts} if reranker else {})}
        if not reranker:
            print("no /rerank row: the model's main head does not have one output (not a cross-encoder)")
        results = {route: {} for route in routes}
        for route, texts in routes.items():
            for url in (s.url for s in sides.values()):  # warm-up
                asyncio.run(one_pass(url, route, sentences, 8, 32, 60, texts))
            for c in args.concurrency:
                passes = {side: [] for side in sides}
                n = max(args.requests, 4 * c)
                for repeat in range(args.repeats):
                    for side, server in sides.items():
                        passes[side].append(asyncio.run(one_pass(server.url, route, sentences, c, n, args.time_limit,
                                                                 texts)))
                    print(f"{route} concurrency {c}, pass {repeat + 1}: " + ", ".join(
                        f"{side} {p[-1]['requests/s']:.1f} req/s p99 {p[-1]['p99 ms']:.0f} ms"
                        + (f" ({p[-1]['refused']} refused)" if p[-1]["refused"] else "")
                        for side, p in passes.items()), flush=True)
                results[route][c] = {side: {k: statistics.median(p[k] for p in ps) for k in ps[0]}
                                     for side, ps in passes.items()}
    finally:
        codes = [s.stop() for s in sides.values()]
    for route, by_concurrency in results.items():
        rows = []
        for c, by_side in by_concurrency.items():
            b, u = by_side["batched"], by_side["unbatched"]
            for side, r in by_side.items():
                rate = r["tokens/s"] if route == "/embed" else r["inputs/s"]
                rows.append([c, side, r["requests/s"], rate, r["p50 ms"], r["p99 ms"], r["refused"],
                             f"{b['inputs/s'] / u['inputs/s']:.2f}x" if side == "batched" else "1",
                             f"{b['p99 ms'] / u['p99 ms']:.2f}" if side == "batched" else "1"])
        print(f"\nPOST {route}" + ("" if route == "/embed" else f": {routes[route]} texts per request"))
        print(table(["concurrency", "server", "requests/s", "tokens/s" if route == "/embed" else "pairs/s", "p50 ms",
                     "p99 ms", "refused (median)", "throughput vs unbatched", "p99 vs unbatched"], rows))
    print(f"load average at the end: {os.getloadavg()}; servers exited {codes}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model directory (default: a base-size model with random weights)")
    parser.add_argument("--layers", type=int, default=12, help="layers of the default model (12: base size)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=2, help="threads of each server's forward passes")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per pass (at least 4 x concurrency)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved passes per server and concurrency")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds a pass may take at most")
    parser.add_argument("--rerank-texts", type=int, default=8, help="texts ranked per /rerank request")
    args = parser.parse_args()
    main()
