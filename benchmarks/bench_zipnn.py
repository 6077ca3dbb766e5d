"""Reading ZipNN checkpoints: this project's loader (which calls the zipnn package) against zipnn's own
decompression, plain safetensors and this project's model.rbz, in one run, passes interleaved.

For each layout ZipNN writes (whole-file `model.safetensors.znn`, per-tensor `model.znn.safetensors`)
and each kind of weights (fp16-exact fp32, bf16; trained-like values, see bench_compress.py), files are
made by the zipnn package and then read repeatedly by:
  roberta   roberta.checkpoint.read_weight_file (chunk walk, dtype/shape checks, zipnn's decoder)
  zipnn     zipnn itself: ZipNN(is_streaming=True).decompress + safetensors.load / its SafeOpen
  plain     the uncompressed model.safetensors (safetensors.torch.load_file)
  rbz       this project's own format, model.rbz (roberta.compress.load_file)
The question it answers: what reading through the package costs against zipnn itself (our wrapper's
overhead), and what a reader of our own would have to beat (see README "ZipNN checkpoints").

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

from roberta import compress  # noqa: E402
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base = trained_like(args.layers)
    kinds = {"fp16-exact fp32": {k: v.half().float() for k, v in base.items()},
             "bf16": {k: v.bfloat16() for k, v in base.items()}}
    print(f"{args.layers} layers x 768, vocabulary 50265; torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'kind':<16} {'layout':<11} {'MiB':>7} {'roberta s':>10} {'zipnn s':>8} {'roberta/zipnn':>13} "
          f"{'plain s':>8} {'rbz s':>7} {'rbz MiB':>8}")
    for kind, tensors in kinds.items():
        with tempfile.TemporaryDirectory() as tmp:
            files = make_files(tensors, Path(tmp))
            for layout, theirs in (("whole", zipnn_whole), ("per_tensor", zipnn_per_tensor)):
                readers = {"roberta": lambda: read_weight_file(files[layout]), "zipnn": lambda: theirs(files[layout]),
                           "plain": lambda: load_file(str(files["plain"])), "rbz": lambda: compress.load_file(files["rbz"])}
                times = {name: [] for name in readers}
                for _ in range(args.repeats):  # interleaved: a busy machine slows every reader alike
                    for name, read in readers.items():
                        start = time.perf_counter()
                        got = read()
                        times[name].append(time.perf_counter() - start)
                        assert all(torch.equal(got[k].view(torch.uint8), tensors[k].view(torch.uint8)) for k in tensors)
                t = {name: statistics.median(v) for name, v in times.items()}
                print(f"{kind:<16} {layout:<11} {files[layout].stat().st_size / 2**20:7.1f} {t['roberta']:10.3f} "
                      f"{t['zipnn']:8.3f} {t['roberta'] / t['zipnn']:13.2f} {t['plain']:8.3f} {t['rbz']:7.3f} "
                      f"{files['rbz'].stat().st_size / 2**20:8.1f}")


if __name__ == "__main__":
    main()
