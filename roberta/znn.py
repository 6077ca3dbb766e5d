"""ZipNN-compressed checkpoints, read by this project's own decoder (the zipnn package as a fallback).

ZipNN stores weights in two layouts, and this project reads both (and sharded indexes naming either):

- `*.safetensors.znn` (its Hugging Face plugin): the whole safetensors file compressed as a series of
  ZipNN streams (1 MiB of the file each); decompressed it is the original file, byte for byte.
- `*.znn.safetensors` (its safetensors plugin): a safetensors file whose compressed tensors are stored
  as uint8 blobs (one ZipNN stream each), listed in the `znn_compressed_vectors` metadata entry with
  their dtype and shape; every other tensor is stored as it is.

A ZipNN stream (zipnn 0.5.x, read from its source) is a 32-byte header, little-endian:
  [0:2] b"ZN", [2:5] version, [5] byte grouping (220: four groups of fp32 bytes; 10: two groups of
  16-bit bytes, or one group of fp8), [6] bit order (1: each float's sign moved below its exponent),
  [7] method, [8] format (1 bytes, 2 torch, 3 numpy), [9] delta, [10:13] lossy settings, [13] 128 +
  log2 of the streaming piece when streamed, [14] log2 of the chunk size, [15] dtype code,
  [16:24] original length, [24:32] length of the whole stream;
then, for the torch and numpy formats, the shape (a dimension count, then per dimension a width byte
1/2/4/8 and the value); then, for k groups and n chunks, k*n codec bytes and k*n uint64 running
lengths (group-major: group 0's chunks first), then the groups' bytes, group 0's chunks first.
Each chunk (2**[14] bytes of the original, the last one shorter; 128 KiB at most for one group) is
split into k groups (byte i*k + b of the chunk goes to group b; the n % k bytes left over go to the
first groups), each group stored (codec 0) or Huffman-coded (codec 1) as one block of the
FiniteStateEntropy library's HUF_compress: 1 byte is a run of that byte, as many bytes as the group
a stored copy, else a Huffman table description and four streams, the format of zstd's literals.

The decoder here (`decode_znn` in csrc/planes.c) parses and checks all of this, then decodes the
chunks on all cores without the GIL, the Huffman blocks by zstd's own decoder
(`HUF_decompress4X_hufOnly_wksp`, taken from the zstandard wheel's library, the one zstd build that
exports it; zstd 1.5.5 to 1.5.x). Where that is not available (the C extension not built, another
zstd), the zipnn package decodes instead (`pip install 'roberta[zipnn]'`), after the same checks:
zipnn's own C decoder aborts the process on a truncated stream. Tests check both against zipnn's own
results bit for bit; README "ZipNN checkpoints" and benchmarks/RESULTS.md give the speeds.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from .errors import RobertaError
from .fileio import parse_json, read_json

METADATA_KEY = "znn_compressed_vectors"  # ZipNN's key for the per-tensor layout
HEADER = 32
# dtype code -> (torch dtype, number of byte groups, the byte grouping ZipNN writes for it)
DTYPES = {1: (torch.float32, 4, 220), 2: (torch.float32, 4, 220), 4: (torch.float16, 2, 10),
          5: (torch.float16, 2, 10), 6: (torch.bfloat16, 2, 10), 29: (torch.float8_e4m3fn, 1, 10),
          30: (torch.float8_e5m2, 1, 10)}
FORMATS = {1: "bytes", 2: "torch", 3: "numpy"}
ROW = 19  # int64s per chunk in decode_znn's table


def _load_decoder() -> bool:
    from . import compress

    load_huf = getattr(compress._planes, "load_huf", None)  # None: an extension built before decode_znn
    if not compress._C_DECODER or load_huf is None:
        return False
    import zstandard

    return any(load_huf(str(path)) for path in sorted(Path(zstandard.__file__).parent.glob("_cffi*")))


DECODER = "roberta" if _load_decoder() else "zipnn"  # which decoder reads ZipNN files in this process


def _zipnn():
    try:
        import zipnn
    except ImportError:
        raise RobertaError("this checkpoint is ZipNN-compressed and this installation cannot decode it itself "
                           "(the C extension is not built, or zstd is not 1.5.5 to 1.5.x): pip install "
                           "'roberta[zipnn]' (or pip install zipnn)") from None
    return zipnn


def is_whole_file(path: Path) -> bool:
    return path.name.endswith(".znn")


class _Corrupt(Exception):
    """A stream that is not what ZipNN writes; the message says how."""


def _stream(data: np.ndarray, at: int, out_at: int, rows: list) -> tuple[int, int, int, tuple | None]:
    """Parse the stream at byte `at` of `data` and append its chunks' rows (output from `out_at`).
    Returns (stream length, original length, dtype code, shape or None)."""
    if len(data) - at < HEADER or bytes(data[at:at + 2]) != b"ZN":
        raise _Corrupt(f"no ZipNN header at byte {at}" if len(data) - at >= HEADER else f"the stream at byte {at} is cut short")
    h = data[at:at + HEADER]
    original, length = int(h[16:24].view("<u8")[0]), int(h[24:32].view("<u8")[0])
    code, grouping, bits, form = int(h[15]), int(h[5]), int(h[6]), int(h[8])
    if length > len(data) - at:
        raise _Corrupt(f"the stream at byte {at} runs past the end ({length} bytes announced, {len(data) - at} there)")
    if code not in DTYPES or form not in FORMATS or h[9] or h[10] or DTYPES[code][2] != grouping or bits > 1:
        raise _Corrupt(f"the stream at byte {at} uses ZipNN settings this reader does not know (dtype code {code}, "
                       f"format {form}, grouping {grouping}, bit order {bits}, delta {h[9]}, lossy {h[10]})")
    body, shape = at + HEADER, None
    if FORMATS[form] != "bytes":
        dims, body = int(data[body]) if body < at + length else 0, body + 1
        shape = []
        for _ in range(dims):
            width = int(data[body]) if body < at + length else 0
            if width not in (1, 2, 4, 8) or body + 1 + width > at + length:
                raise _Corrupt(f"the stream at byte {at} has a damaged shape")
            shape.append(int.from_bytes(bytes(data[body + 1:body + 1 + width]), "little"))
            body += 1 + width
        shape = tuple(shape)
    dtype, k, _ = DTYPES[code]
    chunk = 1 << int(h[14])
    chunk = min(chunk, 128 * 1024) if k == 1 else chunk
    if original == 0 or chunk % k or chunk > 1 << 30:
        raise _Corrupt(f"the stream at byte {at} announces {original} bytes in chunks of {chunk}")
    n = -(-original // chunk)
    if body + 9 * k * n > at + length:
        raise _Corrupt(f"the stream at byte {at} is shorter than its chunk table")
    codecs = data[body:body + k * n].reshape(k, n).astype(np.int64)
    ends = data[body + k * n:body + 9 * k * n].view("<u8").reshape(k, n).astype(np.int64)
    starts = np.concatenate([np.zeros((k, 1), np.int64), ends[:, :-1]], axis=1)
    lengths = ends - starts
    first = body + 9 * k * n + np.concatenate([[0], np.cumsum(ends[:, -1])[:-1]])
    sizes = np.full(n, chunk, np.int64)
    sizes[-1] = original - chunk * (n - 1)
    groups = sizes // k + (np.arange(k)[:, None] < sizes % k)
    if (ends < 0).any() or (lengths < 0).any() or first[-1] + ends[-1, -1] != at + length:
        raise _Corrupt(f"the chunk table of the stream at byte {at} does not add up to its length")
    if ((codecs > 1) | ((codecs == 0) & (lengths != groups)) | ((codecs == 1) & ((lengths < 1) | (lengths > groups)))).any():
        raise _Corrupt(f"the chunk table of the stream at byte {at} is damaged")
    table = np.empty((n, ROW), np.int64)
    table[:, 0] = out_at + chunk * np.arange(n)
    table[:, 1] = sizes
    table[:, 2] = k | bits << 8
    for b in range(k):
        table[:, 3 + 4 * b:7 + 4 * b] = np.stack([codecs[b], first[b] + starts[b], lengths[b], groups[b]], axis=1)
    table[:, 3 + 4 * k:] = 0
    rows.append(table)
    return length, original, code, shape


def _decode(data: np.ndarray, rows: list, size: int) -> torch.Tensor:
    from . import compress

    try:
        out = torch.empty(size, dtype=torch.uint8)
    except (RuntimeError, MemoryError):  # over a memory limit (ulimit -v, a container's)
        raise RobertaError(f"decoding needs {size:,} bytes, more than this process may allocate; free memory or "
                           f"raise the limit") from None
    failed = compress._planes.decode_znn(data, np.concatenate(rows), out.numpy(), compress._thread_count(None))
    if failed >= 0:
        raise _Corrupt(f"chunk {failed} does not decode")
    return out


def decompress_whole_file(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """The original bytes of a `*.znn` file (a whole safetensors file, for `*.safetensors.znn`).

    `limit`: the most bytes the file may decompress to (what its config's weights can take): the
    sizes its streams declare are summed from their headers and checked before anything is decoded,
    since a few hundred bytes of ZipNN can declare gigabytes (a run of one byte per chunk)."""
    path = Path(path)
    data = np.fromfile(path, dtype=np.uint8)
    if bytes(data[:2]) != b"ZN":
        raise RobertaError(f"{path} is not a ZipNN file (it does not start with ZipNN's header); download it again")
    rows, at, size = [], 0, 0
    try:
        while at < len(data):
            length, original, _, shape = _stream(data, at, size, rows)
            if shape is not None:
                raise _Corrupt(f"the stream at byte {at} holds a tensor, not bytes of a file")
            at, size = at + length, size + original
        if limit is not None and size > limit:
            raise RobertaError(f"{path} declares {size:,} bytes of weights, more than the {limit:,} its config's "
                               f"model can hold; the file does not belong to this config or is corrupted")
        if DECODER == "roberta":
            return bytes(_decode(data, rows, size).numpy())
    except _Corrupt as exc:
        raise RobertaError(f"{path} is a truncated or corrupted ZipNN file ({exc}); download or copy it again") from None
    try:
        return bytes(_zipnn().ZipNN(is_streaming=True).decompress(data.tobytes()))
    except RobertaError:
        raise
    except Exception as exc:  # the C decoder's errors carry no common type
        raise RobertaError(f"{path} is a truncated or corrupted ZipNN file ({type(exc).__name__}: {exc}); "
                           "download it again") from None


def decompress_blob(blob: torch.Tensor, source: str, expected: tuple[torch.dtype, list[int]] | None = None
                    ) -> torch.Tensor:
    """The tensor one ZipNN torch-format stream (a `*.znn.safetensors` entry) holds; `expected` (the
    dtype and shape the file's metadata lists) is checked against the stream's header before decoding."""
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise RobertaError(f"{source} is not a ZipNN blob (it is {blob.dtype} {list(blob.shape)}, not uint8 bytes); "
                           "download the file again")
    data, rows = blob.contiguous().numpy(), []
    try:
        length, original, code, shape = _stream(data, 0, 0, rows)
        if shape is None or length != len(data):
            raise _Corrupt("it is not one tensor stream" if shape is None else f"{len(data) - length} bytes follow the stream")
        dtype = DTYPES[code][0]
        if math.prod(shape) * dtype.itemsize != original:
            raise _Corrupt(f"shape {list(shape)} of {dtype} is not the {original} bytes it announces")
        if expected is not None and (dtype, list(shape)) != (expected[0], list(expected[1])):
            raise _Corrupt(f"it holds {str(dtype).removeprefix('torch.')} {list(shape)} but the metadata lists "
                           f"{str(expected[0]).removeprefix('torch.')} {list(expected[1])}")
        if DECODER == "roberta":
            return _decode(data, rows, original).view(dtype).reshape(shape)
    except _Corrupt as exc:
        raise RobertaError(f"{source} is not a valid ZipNN blob ({exc}); download the file again") from None
    codec = _zipnn().ZipNN(input_format="torch", bytearray_dtype=torch.uint8, method="HUFFMAN")
    return codec.decompress(data)


def compressed_tensors(metadata: dict[str, str] | None, limit: int | None = None,
                       source: str = "the file") -> dict[str, tuple[torch.dtype, list[int]]]:
    """{name: (dtype, shape)} of the tensors a `*.znn.safetensors` file holds compressed; `limit`: the
    most bytes they may declare together (what the config's weights can take), checked here, before
    any is decoded."""
    if not metadata or METADATA_KEY not in metadata:
        return {}
    table = parse_json(metadata[METADATA_KEY], f"the {METADATA_KEY} metadata", kind=dict)
    dtypes = {str(dtype).removeprefix("torch."): dtype for dtype, _, _ in DTYPES.values()}
    out = {}
    for name, info in table.items():
        dtype = dtypes.get(str(info.get("dtype", "")).removeprefix("torch.")) if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if isinstance(shape, str) and shape.startswith("["):  # ZipNN writes the shape as the text of a list
            shape = parse_json(shape, f"the {METADATA_KEY} metadata's shape of {name}")
        if dtype is None or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise RobertaError(f"the {METADATA_KEY} metadata gives tensor {name} no float dtype and shape "
                               f"({repr(info)[:60]}); the file is corrupted")
        out[name] = (dtype, shape)
    declared = sum(math.prod(shape) * dtype.itemsize for dtype, shape in out.values())
    if limit is not None and declared > limit:
        raise RobertaError(f"{source} declares {declared:,} bytes of compressed tensors, more than the {limit:,} "
                           f"its config's model can hold; the file does not belong to this config or is corrupted")
    return out


def decompress_tensors(state: dict[str, torch.Tensor], metadata: dict[str, str] | None,
                       source: str, limit: int | None = None) -> dict[str, torch.Tensor]:
    """`state` with each tensor the metadata lists as compressed replaced by what ZipNN restores."""
    table = compressed_tensors(metadata, limit, source)
    out = dict(state)
    for name, expected in table.items():
        if name not in state:
            raise RobertaError(f"{source}: {METADATA_KEY} lists {name}, which the file does not hold")
        try:
            out[name] = decompress_blob(state[name], f"{source}: tensor {name}", expected)
        except RobertaError:
            raise
        except Exception as exc:  # zipnn's decoder (the fallback): its errors carry no common type
            raise RobertaError(f"{source}: tensor {name} is not a valid ZipNN blob ({type(exc).__name__}: {exc}); "
                               "download the file again") from None
    return out


def plain_name(name: str) -> str:
    """The file a ZipNN file decompresses to: model.safetensors.znn and model.znn.safetensors -> model.safetensors."""
    return name.removesuffix(".znn").replace(".znn.", ".")


def is_zipnn_checkpoint(directory: Path) -> bool:
    return any(p.name.endswith((".znn", ".znn.safetensors")) for p in directory.iterdir())


def decompress_checkpoint(src: Path, dst: Path) -> Path:
    """`roberta decompress` of a ZipNN directory: each `*.safetensors.znn` becomes the file ZipNN restores
    (byte for byte), each `*.znn.safetensors` a safetensors file of the tensors ZipNN restores (the
    other metadata kept), an index names the plain shards; the other files are copied. The directory
    is written whole or not at all (fileio.replace_dir)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save as safetensors_bytes

    from .checkpoint import CONFIG_NAME, keep_beside_checkpoint, read_index, weights_bound
    from .fileio import atomic_write, replace_dir
    from .model import RobertaConfig

    src, dst = Path(src), Path(dst)
    limit = weights_bound(RobertaConfig.load(src / CONFIG_NAME)) if (src / CONFIG_NAME).is_file() else None
    with replace_dir(dst, keep=keep_beside_checkpoint) as staging:
        for item in sorted(src.iterdir()):
            if not item.is_file():
                continue
            target = staging / plain_name(item.name)
            if item.name.endswith(".safetensors.znn"):
                atomic_write(target, decompress_whole_file(item, limit))
            elif item.name.endswith(".znn.safetensors"):
                with safe_open(str(item), framework="pt") as f:
                    metadata = dict(f.metadata() or {})
                    state = {name: f.get_tensor(name) for name in f.keys()}
                state = decompress_tensors(state, metadata, str(item), limit)
                metadata.pop(METADATA_KEY, None)
                atomic_write(target, safetensors_bytes(state, metadata=metadata or None))
            elif item.name.endswith(".index.json"):
                index = read_json(item)
                index["weight_map"] = {k: plain_name(v) for k, v in read_index(item).items()}
                atomic_write(target, json.dumps(index, indent=2) + "\n")
            else:
                shutil.copy2(item, target)
    return dst
