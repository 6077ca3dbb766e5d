"""Lossless compressed checkpoints: smaller downloads and caches, loaded like any other.

Weights are floats whose exponents take few values and whose mantissas are noise. Each tensor is
cut into chunks of CHUNK_ELEMENTS elements; each chunk is rearranged into byte planes so that the
predictable bits share bytes, every plane is tried with zstd (its Huffman stage is what pays off
here) and kept raw when that does not shrink it, and the chunk's stored bytes carry an xxh3 hash
that is checked before anything is decoded. Chunks are independent, so both directions run on all
cores. Decoding is done by csrc/planes.c (built by setup.py): hash checks, zstd and reassembly
of each chunk in one pass, on all cores without the GIL; without it, the zstandard and xxhash
packages and numpy do the same, slower.

How a chunk is rearranged ("transform"):
  fp16   fp32 values that survive a round trip through fp16 bit for bit (released roberta-base is
         such a checkpoint) are stored as their fp16 bits: half the bytes before any coding.
  bf16   the 16 bits (sign s, exponent e7..e0, mantissa m6..m0) become five planes. First, one byte
         per value holding its exponent's offset from the chunk's base exponent (5 bits: the chunk's
         most populated window of 32 binades) with the top 2 mantissa bits: coded jointly, which also
         captures how the mantissa leans within a binade (nearly all the information, and the only
         plane that costs real decoding time; 2 mantissa bits code smaller and decode faster than 3).
         Values whose exponent falls outside the window (zeros, subnormals, infinities, NaNs, rare
         extremes) set the byte's top bit instead, and their exponents follow the base exponent, in
         order, in the second plane. Then noise stored raw: the signs and the mantissa bit m4 packed
         8 per byte, and the 4 low mantissa bits packed 2 per byte.
  fp32   the top 16 bits as bf16, then the low 16 bits (noise) as they are.
  bytes  plain byte planes (fp16, fp64, integers, bool).

File layout (little-endian):
  MAGIC | u32 version | u32 header length | u64 xxh3 of header | header JSON | tensor blobs
  header JSON: {"size": file size, "metadata": {str: str}, "tensors": {name: [offset, length]}}
  tensor blob: u32 length | u64 xxh3 | JSON {"dtype", "shape", "chunks": [[transform, elements,
               xxh3 of the chunk's stored bytes, [[codec, stored length, size] per plane]], ...]} | chunks
Every byte of the file is covered by a hash or a check, so corruption is an error, never weights.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import xxhash
import zstandard

from .checkpoint import (CONFIG_NAME, FAIRSEQ_NAME, PYTORCH_NAME, SAFETENSORS_NAME, check_checkpoint_output,
                         keep_beside_checkpoint, model_path, read_checkpoint)
from .errors import RobertaError
from .fileio import atomic_write, parse_json, replace_dir

try:  # the C decoder built by setup.py; numpy and the zstandard package do the same, slower, without it
    from . import _planes
except ImportError:
    _planes = None

MAGIC = b"ROBERTAZ"
VERSION = 3  # 3: exponents relative to a base per chunk, outliers listed; decoding in C on all cores
COMPRESSED_WEIGHTS_NAME = "model.rbz"
CHUNK_ELEMENTS = 1 << 17  # small enough that two threads share a 768 x 768 matrix evenly
ZSTD_LEVEL = 1  # higher levels only search harder for repeats, which weights do not have
KEEP_RAW_ABOVE = 0.98  # a plane that zstd shrinks by less than 2% is stored raw: faster to read

_PREFIX = struct.Struct("<8sIIQ")  # magic, version, header length, header hash
_BLOB_PREFIX = struct.Struct("<IQ")  # blob header length, blob header hash
RAW, ZSTD = 0, 1

DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
}
# The numpy integer type with the same width, through which tensor bits are read and written.
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class CorruptFileError(RobertaError):
    """A compressed checkpoint that fails its checks: truncated, altered or not ours."""


def _corrupt(what: str, source: str) -> CorruptFileError:
    return CorruptFileError(f"checksum mismatch in {what} of {source}: the file is corrupted; "
                            "download or copy it again")


def _malformed(what: str, source: str, detail: str = "") -> CorruptFileError:
    return CorruptFileError(f"malformed header of {what} in {source}{detail}: the file is corrupted or was not "
                            "written by `roberta compress`; download or copy it again")


# --- chunk transforms ----------------------------------------------------------------------------

def _split_bytes(x: np.ndarray) -> list[np.ndarray]:
    """Byte planes of an array of n k-byte words: k arrays of n bytes, least significant first."""
    k = x.itemsize
    if k == 1:
        return [x.view(np.uint8)]
    view = x.view(np.uint8).reshape(-1, k)
    return [np.ascontiguousarray(view[:, j]) for j in range(k)]


def _join_bytes(planes: list[np.ndarray], out: np.ndarray) -> None:
    view = out.view(np.uint8).reshape(-1, len(planes))
    for j, plane in enumerate(planes):
        view[:, j] = plane


def _split_high(h: np.ndarray) -> list[np.ndarray]:
    """The five bf16 planes of 16-bit words (see the module docstring), as the C decoder reads them."""
    exponent = (h >> 7).astype(np.uint8)  # the sign bit falls off
    # The window [base, base + 31] that holds the most values, judged on a sample (any base decodes);
    # of windows that tie, the middle one, to leave room for what the sample missed on both sides.
    in_window = np.convolve(np.bincount(exponent[::16], minlength=256), np.ones(32, np.int64), "valid")
    best = np.flatnonzero(in_window == in_window.max())
    base = int(best[len(best) // 2])
    offset = exponent - np.uint8(base)  # wraps around: outside the window is 32 or more
    mantissa = (h >> 5 & 3).astype(np.uint8)
    joint = offset << 2 | mantissa
    outside = np.flatnonzero(offset >= 32)
    joint[outside] = 0x80 | mantissa[outside]
    outliers = np.concatenate([np.array([base], np.uint8), exponent[outside]])
    low4 = (h & 0xF).astype(np.uint8)
    if low4.size % 2:
        low4 = np.append(low4, np.uint8(0))
    pairs = low4.view(np.uint16)  # (a, b) is a | b << 8; the plane wants a | b << 4
    return [joint, outliers, np.packbits((h >> 15).astype(np.uint8), bitorder="little"),
            np.packbits((h >> 4 & 1).astype(np.uint8), bitorder="little"), (pairs | pairs >> 4).astype(np.uint8)]


def _join_high(planes: list[np.ndarray], n: int) -> np.ndarray:
    """Undo _split_high: n 16-bit words. ValueError if the outlier count does not match."""
    joint, outliers, signs, m4, nibbles = planes
    low4 = np.stack([nibbles & 0xF, nibbles >> 4], axis=1).reshape(-1)[:n].astype(np.uint16)
    sign = np.unpackbits(signs, count=n, bitorder="little").astype(np.uint16)
    bit4 = np.unpackbits(m4, count=n, bitorder="little").astype(np.uint16)
    joint = joint.astype(np.uint16)
    words = sign << 15 | (np.uint16(outliers[0]) << 7) + ((joint & 0x7F) << 5) | bit4 << 4 | low4
    flagged = np.flatnonzero(joint & 0x80)
    if flagged.size != outliers.size - 1:
        raise ValueError("outlier count")
    words[flagged] = words[flagged] & 0x807F | outliers[1:].astype(np.uint16) << 7
    return words


def _encode_chunk(x: np.ndarray, dtype: str) -> tuple[str, list[np.ndarray]]:
    """Pick a transform for one chunk (an array of unsigned words) and return its byte planes."""
    if dtype == "float32":
        as_fp16 = torch.from_numpy(x.view(np.float32)).half()
        # NaNs stay fp32: how a NaN's payload survives a conversion differs between code paths.
        if np.array_equal(as_fp16.float().numpy().view(np.uint32), x) and not torch.isnan(as_fp16).any():
            return "fp16", _split_bytes(as_fp16.view(torch.int16).numpy())
        return "fp32", _split_high((x >> 16).astype(np.uint16)) + [(x & 0xFFFF).astype(np.uint16).view(np.uint8)]
    if dtype == "bfloat16":
        return "bf16", _split_high(x)
    return "bytes", _split_bytes(x)


def _decode_chunk(transform: str, planes: list, out: np.ndarray) -> None:
    """Write one chunk's words into `out` (a slice of the result, as unsigned words) from its planes
    (buffers of bytes): the numpy fallback of csrc/planes.c."""
    planes = [np.frombuffer(p, np.uint8) for p in planes]
    if transform == "bytes":
        _join_bytes(planes, out)
    elif transform == "bf16":
        out[:] = _join_high(planes, out.size)
    elif transform == "fp32":
        out[:] = _join_high(planes[:5], out.size).astype(np.uint32) << 16 | planes[5].view(np.uint16)
    elif transform == "fp16":
        half = np.empty(out.size, np.uint16)
        _join_bytes(planes, half)
        torch.from_numpy(out.view(np.float32)).copy_(torch.from_numpy(half.view(np.int16)).view(torch.float16))
    else:
        raise ValueError(transform)


def _plane_sizes(transform: str, elements: int, itemsize: int) -> list[int | None]:
    """The decoded size of each plane; None for the outlier plane, which holds 1 to elements + 1."""
    if transform == "fp16":
        return [elements, elements]
    high = [elements, None, (elements + 7) // 8, (elements + 7) // 8, (elements + 1) // 2]
    if transform == "bf16":
        return high
    if transform == "fp32":
        return high + [2 * elements]
    return [elements] * itemsize


# The transforms a dtype's chunks may use; anything else in a header is corruption.
_TRANSFORMS = {"float32": ("fp16", "fp32"), "bfloat16": ("bf16",)}


# --- zstd and threads ----------------------------------------------------------------------------

def _load_c_decoder() -> bool:
    """Give the C decoder zstd and xxh3 to call without the GIL. zstd: the system's libzstd where there
    is one (distributions build it with the assembly Huffman decoder, 15% faster on the coded planes
    than the copy inside the zstandard wheel, which is built without it), else the zstandard
    package's; xxh3: the xxhash package's (its extension module exports the API), else the system's."""
    if _planes is None:
        return False
    import ctypes.util
    zstd = [ctypes.util.find_library("zstd")] + sorted(Path(zstandard.__file__).parent.glob("_cffi*"))
    xxh3 = sorted(Path(xxhash.__file__).parent.glob("_xxhash*")) + [ctypes.util.find_library("xxhash")]
    if not any(_planes.load_zstd(str(path)) for path in zstd if path):
        return False
    if not any(_planes.load_xxh3(str(path)) for path in xxh3 if path):
        return False
    probes = [bytes(range(256))[:n] * 5 for n in (0, 3, 30, 256)]  # every length class of XXH3
    return all(_planes.xxh3(probe) == xxhash.xxh3_64_intdigest(probe) for probe in probes)


# Decoding in C: hashes, zstd and reassembly on all cores without the GIL (the zstandard and
# xxhash packages hold the GIL while they work, so Python threads cannot run them side by side).
_C_DECODER = _load_c_decoder()

_local = threading.local()


def _zstd():
    """This thread's (compressor, decompressor): zstd contexts must not be shared between threads."""
    if not hasattr(_local, "zstd"):
        _local.zstd = (zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False),
                       zstandard.ZstdDecompressor())
    return _local.zstd


def _plane_buffer(index: int, size: int) -> np.ndarray:
    """This thread's reusable buffer for plane `index`: decoding allocates nothing per chunk, so it
    pays no page faults."""
    buffers = _local.__dict__.setdefault("planes", {})
    if index not in buffers or buffers[index].size < size:
        buffers[index] = np.empty(max(size, CHUNK_ELEMENTS), np.uint8)
    return buffers[index][:size]


def _unzstd(frame, buf: np.ndarray) -> bool:
    """Decode one zstd frame into buf; False unless it is valid and fills buf exactly."""
    try:
        with _zstd()[1].stream_reader(frame) as reader:
            filled = reader.readinto(buf)
            while filled < buf.size and (more := reader.readinto(buf[filled:])):
                filled += more
            return filled == buf.size and not reader.read(1)
    except zstandard.ZstdError:
        return False


@lru_cache(maxsize=None)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="roberta-compress")


def _thread_count(threads: int | None) -> int:
    if threads is None:
        return os.cpu_count() or 1
    if type(threads) is not int or threads < 1:
        raise RobertaError(f"threads must be a whole number of at least 1, got {threads!r}")
    return threads


def _map(fn, items: list, threads: int | None) -> list:
    threads = _thread_count(threads)
    if threads == 1 or len(items) <= 1:
        return [fn(item) for item in items]
    return list(_pool(threads).map(fn, items))


# --- tensors -------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise RobertaError(f"cannot compress tensors of dtype {name}; supported: {', '.join(DTYPES)}")
    return name


def _words(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU tensor's bits as unsigned words."""
    flat = t.reshape(-1)
    if t.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    elif t.dtype in (torch.bfloat16, torch.float16):
        flat = flat.view(torch.int16)
    return flat.numpy().view(_BITS[t.element_size()])


def compress_tensor(tensor: torch.Tensor, threads: int | None = None) -> bytes:
    """Compress one tensor into a self-describing blob; the tensor itself is left untouched."""
    dtype = _dtype_name(tensor.dtype)
    # contiguous() copies only when needed; nothing below writes to x, so the caller's data is safe.
    x = _words(tensor.detach().cpu().contiguous())
    starts = range(0, x.size, CHUNK_ELEMENTS)

    def encode(start: int) -> tuple[list, bytes]:
        chunk = x[start:start + CHUNK_ELEMENTS]
        transform, planes = _encode_chunk(chunk, dtype)
        compressor = _zstd()[0]
        stored, table = [], []
        for plane in planes:
            packed = compressor.compress(plane)
            codec = ZSTD if len(packed) < KEEP_RAW_ABOVE * plane.nbytes else RAW
            data = packed if codec == ZSTD else plane.tobytes()
            stored.append(data)
            table.append([codec, len(data), plane.nbytes])
        data = b"".join(stored)
        return [transform, chunk.size, xxhash.xxh3_64_intdigest(data), table], data

    encoded = _map(encode, list(starts), threads)
    header = json.dumps({"dtype": dtype, "shape": list(tensor.shape),
                         "chunks": [entry for entry, _ in encoded]}, separators=(",", ":")).encode()
    prefix = _BLOB_PREFIX.pack(len(header), xxhash.xxh3_64_intdigest(header))
    return b"".join([prefix, header] + [data for _, data in encoded])


def _parse_blob_header(blob: memoryview, what: str, source: str) -> tuple[dict, int]:
    if len(blob) < _BLOB_PREFIX.size:
        raise _corrupt(f"the header of {what}", source)
    length, digest = _BLOB_PREFIX.unpack_from(blob)
    end = _BLOB_PREFIX.size + length
    if end > len(blob) or xxhash.xxh3_64_intdigest(blob[_BLOB_PREFIX.size:end]) != digest:
        raise _corrupt(f"the header of {what}", source)
    try:
        header = parse_json(bytes(blob[_BLOB_PREFIX.size:end]))
        dtype, shape, chunks = header["dtype"], [int(d) for d in header["shape"]], header["chunks"]
        if dtype not in DTYPES or min(shape, default=0) < 0:
            raise ValueError
        itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
        allowed = _TRANSFORMS.get(dtype, ("bytes",))
        total, offset, layout = 0, end, []
        for transform, elements, digest, table in chunks:
            sizes = _plane_sizes(transform, elements, itemsize)
            if (transform not in allowed or type(elements) is not int or not 0 < elements <= CHUNK_ELEMENTS
                    or len(table) != len(sizes)):
                raise ValueError
            planes = [(int(codec), int(length), int(size)) for codec, length, size in table]
            if any(codec not in (RAW, ZSTD) or length < 0 or (codec == RAW and length != size)
                   or (size != expect if expect is not None else not 1 <= size <= elements + 1)
                   for (codec, length, size), expect in zip(planes, sizes)):
                raise ValueError
            at = offset
            for codec, length, size in planes:  # each zstd frame must hold what the table declares
                if codec == ZSTD and zstandard.frame_content_size(blob[at:at + length]) != size:
                    raise ValueError
                at += length
            stored = sum(length for _, length, _ in planes)
            layout.append((transform, total, elements, int(digest), offset, planes))
            total += elements
            offset += stored
        numel = int(np.prod(shape, dtype=np.int64))
        if total != numel or offset != len(blob):
            raise ValueError
    except (RobertaError, ValueError, KeyError, TypeError, zstandard.ZstdError) as exc:
        raise _malformed(what, source) from exc
    return {"dtype": dtype, "shape": shape, "chunks": layout}, end


def decompress_tensor(blob, threads: int | None = None, name: str = "tensor", source: str = "<bytes>") -> torch.Tensor:
    """Rebuild the exact tensor from compress_tensor's blob, checking every chunk's hash first."""
    blob = memoryview(blob).cast("B")
    what = f"tensor '{name}'"
    header, _ = _parse_blob_header(blob, what, source)
    dtype = DTYPES[header["dtype"]]
    # numpy backs large arrays with huge pages, which halves the cost of first touching the output.
    out = np.empty(int(np.prod(header["shape"], dtype=np.int64)), _BITS[torch.empty((), dtype=dtype).element_size()])
    if out.size == 0:  # numpy gives empty arrays zero strides, which torch views refuse
        return torch.empty(header["shape"], dtype=dtype)
    result = torch.from_numpy(out).view(dtype).reshape(header["shape"])

    def decode(item: tuple[int, tuple]) -> None:
        index, (transform, start, elements, digest, offset, planes) = item
        stored = blob[offset:offset + sum(length for _, length, _ in planes)]
        if xxhash.xxh3_64_intdigest(stored) != digest:
            raise _corrupt(f"{what} chunk {index}", source)
        arrays, at = [], 0
        for plane, (codec, length, size) in enumerate(planes):
            data = stored[at:at + length]
            at += length
            if codec == ZSTD:
                buf = _plane_buffer(plane, size)
                if not _unzstd(data, buf):
                    raise _corrupt(f"{what} chunk {index}", source)
                data = buf
            arrays.append(data)
        try:
            _decode_chunk(transform, arrays, out[start:start + elements])
        except ValueError:  # hashes match, yet the planes disagree: written wrong, or forged
            raise _corrupt(f"{what} chunk {index}", source) from None

    if _C_DECODER:
        try:
            failed = _planes.decode_chunks(blob, _chunk_table(header["chunks"]), out, _thread_count(threads))
        except ValueError as exc:  # the C side's own layout checks; the header checks above should catch it first
            raise _malformed(what, source, f" ({exc})") from None
        if failed >= 0:
            raise _corrupt(f"{what} chunk {failed}", source)
    else:
        _map(decode, list(enumerate(header["chunks"])), threads)
    return result


_TRANSFORM_CODES = {"bytes": 0, "fp16": 1, "bf16": 2, "fp32": 3}  # as csrc/planes.c numbers them


def _chunk_table(chunks: list) -> np.ndarray:
    """The parsed chunk layout as the int64 rows decode_chunks reads: transform, first element,
    elements, hash, offset, plane count, then (codec, stored length, size) for up to 8 planes."""
    table = np.zeros((len(chunks), 30), np.uint64)
    for row, (transform, start, elements, digest, offset, planes) in zip(table, chunks):
        row[:6] = _TRANSFORM_CODES[transform], start, elements, digest, offset, len(planes)
        row[6:6 + 3 * len(planes)] = [value for plane in planes for value in plane]
    return table.view(np.int64)


# --- files ---------------------------------------------------------------------------------------

def save_file(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None,
              threads: int | None = None) -> None:
    """Write tensors to one compressed file, atomically: readers never see half a file."""
    path = Path(path)
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise RobertaError("compressed checkpoint metadata must map strings to strings")
    blobs = {name: compress_tensor(t, threads) for name, t in tensors.items()}
    # The header holds the offsets of the blobs and its own length decides them: iterate to a fixpoint.
    header, offset = b"", 0
    while True:
        start, entries = _PREFIX.size + len(header), {}
        for name, blob in blobs.items():
            entries[name] = [start, len(blob)]
            start += len(blob)
        new = json.dumps({"size": start, "metadata": metadata, "tensors": entries},
                         separators=(",", ":")).encode()
        if len(new) == len(header):
            header = new
            break
        header = new
    prefix = _PREFIX.pack(MAGIC, VERSION, len(header), xxhash.xxh3_64_intdigest(header))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, b"".join([prefix, header, *blobs.values()]))


def _read_header(f, source: str) -> dict:
    raw = f.read(_PREFIX.size)
    if not MAGIC.startswith(raw[:len(MAGIC)]) or not raw:
        raise CorruptFileError(f"{source} is not a roberta compressed checkpoint (bad magic number "
                               f"{raw[:len(MAGIC)]!r}); pass a file written by `roberta compress`")
    if len(raw) < _PREFIX.size:
        raise CorruptFileError(f"{source} is truncated: download or copy it again")
    _, version, length, digest = _PREFIX.unpack(raw)
    if version != VERSION:
        raise CorruptFileError(f"{source} has compressed format version {version}, this roberta reads "
                               f"version {VERSION}: upgrade roberta, or decompress it with the version that wrote it")
    size = os.fstat(f.fileno()).st_size
    if _PREFIX.size + length > size:
        raise CorruptFileError(f"{source} is truncated or its header is corrupted: download or copy it again")
    text = f.read(length)
    if xxhash.xxh3_64_intdigest(text) != digest:
        raise _corrupt("the header", source)
    try:
        header = parse_json(text)
        declared, tensors, metadata = int(header["size"]), header["tensors"], header["metadata"]
        end = _PREFIX.size + length
        for offset, blob_length in tensors.values():
            if offset != end or blob_length < 0:
                raise ValueError
            end += blob_length
        if end != declared or not isinstance(metadata, dict):
            raise ValueError
    except (RobertaError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptFileError(f"malformed header in {source}: the file is corrupted or was not written by "
                               "`roberta compress`; download or copy it again") from exc
    if size != declared:
        raise CorruptFileError(f"{source} is truncated or has extra bytes ({size} bytes, the header says "
                               f"{declared}): download or copy it again")
    return header


def _open(path):
    path = Path(path)
    if not path.is_file():
        raise RobertaError(f"{path} does not exist; pass the path of a {COMPRESSED_WEIGHTS_NAME} file")
    return open(path, "rb")


def read_metadata(path) -> dict[str, str]:
    with _open(path) as f:
        return dict(_read_header(f, str(path))["metadata"])


def tensor_names(path) -> list[str]:
    with _open(path) as f:
        return list(_read_header(f, str(path))["tensors"])


def tensor_shapes(path) -> dict[str, tuple[torch.dtype, list[int]]]:
    """Each tensor's dtype and shape, from the blob headers alone (nothing is decoded), so that sizes
    can be checked against a config before any memory is spent on them."""
    out = {}
    with _open(path) as f:
        entries = _read_header(f, str(path))["tensors"]
        for name, (offset, length) in entries.items():
            f.seek(offset)
            prefix = f.read(_BLOB_PREFIX.size)
            if len(prefix) != _BLOB_PREFIX.size or _BLOB_PREFIX.unpack(prefix)[0] > length - _BLOB_PREFIX.size:
                raise _corrupt(f"the header of tensor '{name}'", str(path))
            header_length, digest = _BLOB_PREFIX.unpack(prefix)
            text = f.read(header_length)
            if xxhash.xxh3_64_intdigest(text) != digest:
                raise _corrupt(f"the header of tensor '{name}'", str(path))
            try:
                header = parse_json(text)
                dtype, shape = DTYPES[header["dtype"]], [int(d) for d in header["shape"]]
                if min(shape, default=0) < 0:
                    raise ValueError
            except (RobertaError, ValueError, KeyError, TypeError) as exc:
                raise _malformed(f"tensor '{name}'", str(path)) from exc
            out[name] = (dtype, shape)
    return out


def load_file(path, names=None, device="cpu", threads: int | None = None) -> dict[str, torch.Tensor]:
    """Load all tensors, or only `names`, reading only their bytes."""
    with _open(path) as f:
        header = _read_header(f, str(path))
        entries = header["tensors"]
        missing = [n for n in (names or []) if n not in entries]
        if missing:
            raise RobertaError(f"{path} has no tensor {missing[0]!r}; it has {len(entries)}: "
                               f"{', '.join(list(entries)[:8])}{', ...' if len(entries) > 8 else ''}")
        tensors = {}
        for name in (names if names is not None else entries):
            offset, length = entries[name]
            f.seek(offset)
            blob = bytearray(length)
            if f.readinto(blob) != length:
                raise CorruptFileError(f"{path} is truncated: download or copy it again")
            tensors[name] = decompress_tensor(blob, threads, name=name, source=str(path)).to(device)
    return tensors


# --- checkpoint directories ----------------------------------------------------------------------

def _check_dirs(src, dst) -> tuple[Path, Path]:
    src, dst = model_path(src), Path(dst)
    if not src.is_dir():
        raise RobertaError(f"{src} is not a checkpoint directory")
    return src, check_checkpoint_output(dst, src)


def _copy_other_files(src: Path, dst: Path) -> None:
    """Everything but the weights (config.json, tokenizer files, ...) is copied as it is."""
    weights = {SAFETENSORS_NAME, COMPRESSED_WEIGHTS_NAME, PYTORCH_NAME, FAIRSEQ_NAME}
    for item in src.iterdir():
        if item.is_file() and item.name not in weights:
            shutil.copy2(item, dst / item.name)


def compress_checkpoint(src_dir, dst_dir, threads: int | None = None) -> Path:
    """Copy a checkpoint directory with its weights stored as model.rbz.

    A model.safetensors is kept tensor for tensor (names and metadata too), so decompressing gives
    it back; any other layout the project reads (pytorch_model.bin, fairseq model.pt) is converted
    to Hugging Face names on the way, with a config.json written beside it.
    """
    from safetensors import SafetensorError, safe_open

    src, dst = _check_dirs(src_dir, dst_dir)
    weights, config = src / SAFETENSORS_NAME, None
    if weights.is_file():
        try:
            with safe_open(weights, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise RobertaError(f"{weights} is truncated or corrupted ({exc}); download or copy it again") from None
    else:
        config, tensors = read_checkpoint(src)
        metadata = {"format": "pt"}
    with replace_dir(dst, keep=keep_beside_checkpoint) as tmp:  # whole or not at all; nothing stale kept
        _copy_other_files(src, tmp)
        if config is not None and not (tmp / CONFIG_NAME).exists():
            config.save(tmp / CONFIG_NAME)
        save_file(tensors, tmp / COMPRESSED_WEIGHTS_NAME, metadata, threads)
    return dst / COMPRESSED_WEIGHTS_NAME


def decompress_checkpoint(src_dir, dst_dir, threads: int | None = None) -> Path:
    """Copy a compressed checkpoint directory back to one with a plain model.safetensors (ZipNN's
    layouts too: see roberta/znn.py)."""
    from safetensors.torch import save as safetensors_bytes

    from . import znn

    if Path(src_dir).is_dir() and not (Path(src_dir) / COMPRESSED_WEIGHTS_NAME).is_file() \
            and znn.is_zipnn_checkpoint(Path(src_dir)):
        return znn.decompress_checkpoint(_check_dirs(src_dir, dst_dir)[0], Path(dst_dir))
    src, dst = _check_dirs(src_dir, dst_dir)
    weights = src / COMPRESSED_WEIGHTS_NAME
    if not weights.is_file():
        raise RobertaError(f"{src} has no {COMPRESSED_WEIGHTS_NAME} to decompress")
    tensors = load_file(weights, threads=threads)
    with replace_dir(dst, keep=keep_beside_checkpoint) as tmp:  # whole or not at all; nothing stale kept
        _copy_other_files(src, tmp)
        atomic_write(tmp / SAFETENSORS_NAME, safetensors_bytes(tensors, metadata=read_metadata(weights) or None))
    return dst / SAFETENSORS_NAME
