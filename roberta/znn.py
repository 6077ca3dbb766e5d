"""ZipNN-compressed checkpoints, read with the `zipnn` package (an optional dependency).

ZipNN stores weights in two layouts, and this project reads both (and sharded indexes naming either):

- `*.safetensors.znn` (its Hugging Face plugin): the whole safetensors file compressed as one ZipNN
  stream; decompressed it is the original file, byte for byte.
- `*.znn.safetensors` (its safetensors plugin): a safetensors file whose compressed tensors are stored
  as uint8 blobs, listed in the `znn_compressed_vectors` metadata entry with their dtype and shape;
  every other tensor is stored as it is.

The decoding is ZipNN's own (its C extension), so every tensor is what ZipNN itself restores; see
README "ZipNN checkpoints" and benchmarks/RESULTS.md for why it is the package and not a reader here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import RobertaError

METADATA_KEY = "znn_compressed_vectors"  # ZipNN's key for the per-tensor layout


def _zipnn():
    try:
        import zipnn
    except ImportError:
        raise RobertaError("this checkpoint is ZipNN-compressed and reading it needs the zipnn package: "
                           "pip install 'roberta[zipnn]' (or pip install zipnn)") from None
    return zipnn


def is_whole_file(path: Path) -> bool:
    return path.name.endswith(".znn")


def decompress_whole_file(path: str | os.PathLike) -> bytes:
    """The original bytes of a `*.znn` file (a whole safetensors file, for `*.safetensors.znn`)."""
    path = Path(path)
    data = path.read_bytes()
    if data[:2] != b"ZN":
        raise RobertaError(f"{path} is not a ZipNN file (it does not start with ZipNN's header); download it again")
    _check_chunks(data, path)
    try:
        return bytes(_zipnn().ZipNN(is_streaming=True).decompress(data))
    except RobertaError:
        raise
    except Exception as exc:  # the C decoder's errors carry no common type
        raise RobertaError(f"{path} is a truncated or corrupted ZipNN file ({type(exc).__name__}: {exc}); "
                           "download it again") from None


def _check_chunks(data: bytes, path: Path) -> None:
    """Walk the chunk headers of a ZipNN stream before decoding: ZipNN's C decoder aborts the whole
    process on a truncated stream instead of raising, so a cut file must be caught here."""
    offset = 0
    while offset < len(data):
        header = data[offset:offset + 32]
        length = int.from_bytes(header[24:32], "little") if len(header) == 32 else 0
        if header[:2] != b"ZN" or length < 32 or offset + length > len(data):
            raise RobertaError(f"{path} is a truncated or corrupted ZipNN file (chunk at byte {offset} "
                               f"{'runs past the end' if header[:2] == b'ZN' else 'has no ZipNN header'}); "
                               "download or copy it again")
        offset += length


def compressed_tensors(metadata: dict[str, str] | None) -> dict[str, dict]:
    """{name: {"dtype", "shape"}} of the tensors a `*.znn.safetensors` file holds compressed."""
    if not metadata or METADATA_KEY not in metadata:
        return {}
    try:
        table = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        table = None
    if not isinstance(table, dict):
        raise RobertaError(f"the {METADATA_KEY} metadata is not a JSON object; the file is corrupted")
    return table


def decompress_tensors(state: dict[str, torch.Tensor], metadata: dict[str, str] | None,
                       source: str) -> dict[str, torch.Tensor]:
    """`state` with each tensor the metadata lists as compressed replaced by what ZipNN restores."""
    table = compressed_tensors(metadata)
    if not table:
        return state
    zipnn = _zipnn()
    codec = zipnn.ZipNN(input_format="torch", bytearray_dtype=torch.uint8, method="HUFFMAN")
    out = dict(state)
    for name, info in table.items():
        if name not in state:
            raise RobertaError(f"{source}: {METADATA_KEY} lists {name}, which the file does not hold")
        try:
            tensor = codec.decompress(state[name].contiguous().numpy())
        except Exception as exc:
            raise RobertaError(f"{source}: tensor {name} is not a valid ZipNN blob ({type(exc).__name__}: {exc}); "
                               "download the file again") from None
        want_dtype = str(info.get("dtype", "")).removeprefix("torch.")
        want_shape = str(info.get("shape"))
        if str(tensor.dtype).removeprefix("torch.") != want_dtype or str(list(tensor.shape)) != want_shape:
            raise RobertaError(f"{source}: tensor {name} decompresses to {tensor.dtype} {list(tensor.shape)} but "
                               f"the metadata says {want_dtype} {want_shape}; the file is corrupted")
        out[name] = tensor
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

    from .checkpoint import keep_beside_checkpoint, read_index
    from .fileio import atomic_write, replace_dir

    src, dst = Path(src), Path(dst)
    with replace_dir(dst, keep=keep_beside_checkpoint) as staging:
        for item in sorted(src.iterdir()):
            if not item.is_file():
                continue
            target = staging / plain_name(item.name)
            if item.name.endswith(".safetensors.znn"):
                atomic_write(target, decompress_whole_file(item))
            elif item.name.endswith(".znn.safetensors"):
                with safe_open(str(item), framework="pt") as f:
                    metadata = dict(f.metadata() or {})
                    state = {name: f.get_tensor(name) for name in f.keys()}
                state = decompress_tensors(state, metadata, str(item))
                metadata.pop(METADATA_KEY, None)
                atomic_write(target, safetensors_bytes(state, metadata=metadata or None))
            elif item.name.endswith(".index.json"):
                index = json.loads(item.read_text(encoding="utf-8"))
                index["weight_map"] = {k: plain_name(v) for k, v in read_index(item).items()}
                atomic_write(target, json.dumps(index, indent=2) + "\n")
            else:
                shutil.copy2(item, target)
    return dst
