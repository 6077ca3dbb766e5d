"""Reading ZipNN checkpoints: this project's own ZipNN decoder against the zipnn package, side by
side in one run, passes interleaved, with plain safetensors and this project's model.rbz for scale.

For each layout ZipNN writes (whole-file `model.safetensors.znn`, per-tensor `model.znn.safetensors`)
and each kind of weights (fp16-exact fp32, bf16, fp32; trained-like values, see bench_compress.py),
files are made by the zipnn package and then read repeatedly by:
  roberta   roberta.checkpoint.read_weight_file with its own decoder (roberta/znn.py, csrc/planes.c)
  fallback  the same with the zipnn package decoding (what runs where the C extension is missing)
  zipnn     zipnn itself: ZipNN(is_streaming=True).decompress + safetensors.load / its SafeOpen
  plain     the uncompressed model.safetensors (safetensors.torch.load_file)
  rbz       this project's own format, model.rbz (roberta.compress.load_file)
Every read is checked bit for bit against the original tensors. Speeds are MB/s of uncompressed
weights (median wall time); `ratio` is the compressed size over the plain file's; `roberta/zipnn` is
zipnn's time over ours, by wall time and by CPU time of the process (all threads), the second being
the steadier on a loaded machine.

    PYTHONPATH=. python benchmarks/bench_zipnn.py --layers 4 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compress import trained_like  # noqa: E402

from roberta import compress, znn  # noqa: E402
from roberta.checkpoint import read_weight_file  # noqa: E402


def make_files(tensors: dict, root: Path) -> dict[str, Path]:
    import zipnn
    from zipnn.util_safetensors import COMPRESSED_DTYPE, COMPRESSION_METHOD, build_compressed_tensor_info, \
        set_compressed_tensors_metadata

    plain = root / "model.safetensors"
    save_file(tensors, str(plain), {"format": "pt"})
    dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(next(iter(tensors.values())).dtype, "float32")
    whole = root / "model.safetensors.znn"
    whole.write_bytes(zipnn.ZipNN(is_streaming=True, bytearray_dtype=dtype).compress(bytearray(plain.read_bytes())))
    packed, infos = {}, {}
    for name, t in tensors.items():
        blob = zipnn.ZipNN(input_format="torch", bytearray_dtype=t.dtype, method=COMPRESSION_METHOD).compress(t.clone())
        packed[name] = torch.frombuffer(bytearray(blob), dtype=COMPRESSED_DTYPE)
        infos[name] = build_compressed_tensor_info(t)
    metadata = {"format": "pt"}
    set_compressed_tensors_metadata(infos, metadata)
    per_tensor = root / "model.znn.safetensors"
    save_file(packed, str(per_tensor), metadata)
    rbz = root / "model.rbz"
    compress.save_file(tensors, rbz, {"format": "pt"})
    return {"plain": plain, "whole": whole, "per_tensor": per_tensor, "rbz": rbz}


def zipnn_whole(path: Path) -> dict:
    import zipnn

    return load_bytes(bytes(zipnn.ZipNN(is_streaming=True).decompress(path.read_bytes())))


def zipnn_per_tensor(path: Path) -> dict:
    from zipnn.zipnn import SafeOpen

    with SafeOpen(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def with_decoder(decoder: str, path: Path) -> dict:
    saved, znn.DECODER = znn.DECODER, decoder
    try:
        return read_weight_file(path)
    finally:
        znn.DECODER = saved


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    assert znn.DECODER == "roberta", "this project's ZipNN decoder is not available (C extension not built?)"
    base = trained_like(args.layers)
    kinds = {"fp16-exact fp32": {k: v.half().float() for k, v in base.items()},
             "bf16": {k: v.bfloat16() for k, v in base.items()},
             "fp32": base}
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; {args.layers} layers x 768, vocabulary 50265; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    names = ["roberta", "fallback", "zipnn", "plain", "rbz"]
    print(f"{'kind':<16} {'layout':<11} {'MB':>6} {'ratio':>6} " + " ".join(f"{n + ' MB/s':>13}" for n in names)
          + f" {'roberta/zipnn wall':>18} {'cpu':>6}")
    for kind, tensors in kinds.items():
        with tempfile.TemporaryDirectory() as tmp:
            files = make_files(tensors, Path(tmp))
            size = files["plain"].stat().st_size
            for layout, theirs in (("whole", zipnn_whole), ("per_tensor", zipnn_per_tensor)):
                readers = {"roberta": lambda: with_decoder("roberta", files[layout]),
                           "fallback": lambda: with_decoder("zipnn", files[layout]),
                           "zipnn": lambda: theirs(files[layout]),
                           "plain": lambda: load_file(str(files["plain"])), "rbz": lambda: compress.load_file(files["rbz"])}
                times, cpu = {name: [] for name in readers}, {name: [] for name in readers}
                for _ in range(args.repeats):  # interleaved: a busy machine slows every reader alike
                    for name, read in readers.items():
                        start, start_cpu = time.perf_counter(), time.process_time()
                        got = read()
                        times[name].append(time.perf_counter() - start)
                        cpu[name].append(time.process_time() - start_cpu)
                        assert all(torch.equal(got[k].view(torch.uint8), tensors[k].view(torch.uint8)) for k in tensors)
                t = {name: statistics.median(v) for name, v in times.items()}
                c = {name: statistics.median(v) for name, v in cpu.items()}
                print(f"{kind:<16} {layout:<11} {size / 1e6:6.1f} {files[layout].stat().st_size / size:6.3f} "
                      + " ".join(f"{size / 1e6 / t[n]:13.0f}" for n in names)
                      + f" {t['zipnn'] / t['roberta']:17.2f}x {c['zipnn'] / c['roberta']:5.2f}x")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
