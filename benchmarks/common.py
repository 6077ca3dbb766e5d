"""What the speed benchmarks share: natural-length inputs from ../shared/data, timing and memory readings."""
from __future__ import annotations

import csv
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def tsv_column(path: Path, *columns: str) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row[c].strip() for row in rows for c in columns if row[c].strip()]


def corpus_lines(name: str = "wikitext2-valid.txt") -> list[str]:
    """Paragraph lines of a corpus file; headings (` = Title = `) and blank lines dropped."""
    lines = (DATA / "corpus" / name).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("=")]


def natural_sentences(n: int, seed: int = 0) -> list[str]:
    """A shuffled mix of what users encode: SST-2 sentences, RTE premises and hypotheses, corpus lines."""
    if not DATA.exists():
        sys.exit(f"error: {DATA} is missing; the benchmarks read real text from ../shared/data")
    rng = random.Random(seed)
    sst2 = tsv_column(DATA / "glue" / "SST-2" / "dev.tsv", "sentence")
    rte = tsv_column(DATA / "glue" / "RTE" / "dev.tsv", "sentence1", "sentence2")
    corpus = corpus_lines()
    third = n // 3
    picked = rng.sample(sst2, n - 2 * third) + rng.sample(rte, third) + rng.sample(corpus, third)
    rng.shuffle(picked)
    return picked


def sst2_sequences(count: int, max_length: int = 128) -> list[list[int]]:
    """The first `count` SST-2 dev sentences as token ids (`<s> ... </s>`, at most `max_length`)."""
    from roberta.tokenizer import RobertaTokenizer

    texts = tsv_column(DATA / "glue" / "SST-2" / "dev.tsv", "sentence")[:count]
    return RobertaTokenizer.from_pretrained(DATA / "roberta-bpe").encode_batch(texts, max_length=max_length)


def median(xs):
    return statistics.median(xs)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_memory(load, run) -> None:
    """In a child process: load, then run; print (JSON) the peak RSS, how far the run raised it, and the
    anonymous memory resident after loading or after the run, whichever is more.

    Resetting the peak after loading (Linux `clear_refs`) separates what loading a checkpoint costs
    from what inference or training costs. RSS counts the pages of files mapped in memory (a
    safetensors checkpoint read in place), which the kernel reclaims under pressure; the anonymous
    memory (RssAnon: copies, quantised weights, activations, the heap) is what it cannot.
    """
    loaded = load()
    whole, anon = peak_rss_mib(), rss_mib("RssAnon")
    Path("/proc/self/clear_refs").write_text("5")
    resident = rss_mib()
    run(loaded)
    print(json.dumps({"peak_mib": max(whole, peak_rss_mib()), "run_added_mib": peak_rss_mib() - resident,
                      "anon_mib": max(anon, rss_mib("RssAnon"))}))


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# what a child keeps of the environment: the instruction-set caps every library honours (so a capped run
# caps every engine), where the kernel choices are cached and whether they are measured
PASSED_ON = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
             "CT2_FORCE_CPU_ISA", "ROBERTA_CACHE", "ROBERTA_KERNELS", "HOME")
CHILD = {"cwd": ROOT, "env": {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",  # how children are started
                              **{k: os.environ[k] for k in PASSED_ON if k in os.environ}}}


def run_child(script: str, *args: str) -> dict:
    """Run `script --child ...` in a fresh interpreter (so its peak memory is its own); it prints one JSON line.

    With ROBERTA_KERNELS=remeasure the child reads the kernel choices the timed workers measured and
    cached instead of timing them again: the measurement's temporaries would count in its peak, and
    its choices (packed copies of weights or not) could differ from the timed ones."""
    env = {**CHILD["env"], **({"ROBERTA_KERNELS": "measure"} if CHILD["env"].get("ROBERTA_KERNELS") == "remeasure" else {})}
    out = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True,
                         cwd=CHILD["cwd"], env=env)
    if out.returncode:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


PASS = "@@pass "  # the worker protocol's lines; anything else a library prints is passed over


class Worker:
    """One engine in its own interpreter, timed one pass at a time when asked (`run_pass`), so that passes
    of several engines still interleave but nothing one engine does to its process (malloc settings,
    thread pools spinning after their work, caches) speeds up or slows down another.

    The child runs `script --worker ...`, which must call `serve_passes`.
    """

    def __init__(self, script: str, *args: str):
        self.proc = subprocess.Popen([sys.executable, script, "--worker", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, **CHILD)
        self._answer()  # loaded and warmed up

    def _answer(self) -> str:
        for line in self.proc.stdout:
            if line.startswith(PASS):
                return line[len(PASS):].strip()
        raise RuntimeError(f"worker {self.proc.args[2:]} exited with status {self.proc.wait()}")

    def run_pass(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return float(self._answer())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def serve_passes(run) -> None:
    """The worker's side: say it is ready, then time `run()` once per line read from stdin."""
    import time

    print(PASS + "ready", flush=True)
    for _ in sys.stdin:
        t = time.perf_counter()
        run()
        print(PASS + repr(time.perf_counter() - t), flush=True)


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    fmt = lambda v: f"{v:,.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_ticks() -> list[int]:
    """The machine's CPU time so far (/proc/stat's first line, in ticks): user, nice, system, idle,
    iowait, irq, softirq, steal; empty where it cannot be read."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return []


def stolen_share(before: list[int]) -> str:
    """How much of the CPU time since `before` (`cpu_ticks`) the hypervisor gave to other guests: on a
    virtual machine, time stolen during timed passes is noise of that size in the figures."""
    after = cpu_ticks()
    if not before or not after:
        return "steal time unknown"
    spent = [b - a for a, b in zip(before, after)]
    return f"{100 * spent[7] / max(1, sum(spent)):.1f}% of the CPU time stolen by the hypervisor"


def cpu_line() -> str:
    """The CPU as figures are recorded beside it: model name, cores and the flags that decide speed."""
    import os

    sys.path.insert(0, str(ROOT))
    from roberta.inference import cpu_flags, cpu_name

    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
    return (f"CPU: {cpu_name()}, {len(os.sched_getaffinity(0))} cores; flags: "
            f"{' '.join(f for f in wanted if f in cpu_flags())}")
