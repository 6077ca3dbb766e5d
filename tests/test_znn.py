"""ZipNN-compressed checkpoints, made in the test by the zipnn package itself from a real safetensors
file, in both of its layouts (whole-file `*.safetensors.znn`, per-tensor `*.znn.safetensors`) and
sharded: every tensor loads bit for bit, and `roberta decompress` restores what ZipNN restores."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import roberta
from roberta.checkpoint import read_checkpoint
from roberta.cli import main

zipnn = pytest.importorskip("zipnn")

KINDS = {  # name: how the fp32 weights of the tiny model are turned into that kind
    "fp32": lambda t: t,
    "fp16-exact-fp32": lambda t: t.half().float(),
    "bf16": lambda t: t.bfloat16(),
}


def whole_file(src, dst):
    """ZipNN's Hugging Face layout: the safetensors file compressed as one stream (zipnn's own call;
    it must be given a bytearray: given bytes, zipnn 0.5.4 does not round-trip)."""
    data = bytearray(src.read_bytes())
    dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        next(iter(load_file(str(src)).values())).dtype, "float32")
    dst.write_bytes(zipnn.ZipNN(is_streaming=True, bytearray_dtype=dtype).compress(data))


def per_tensor(src, dst):
    """ZipNN's safetensors layout, as its compression script writes it: each floating tensor a uint8
    blob from ZipNN(input_format="torch", method="HUFFMAN"), listed in the file's metadata."""
    from safetensors import safe_open
    from zipnn.util_safetensors import COMPRESSED_DTYPE, COMPRESSION_METHOD, build_compressed_tensor_info, \
        set_compressed_tensors_metadata

    tensors, infos = {}, {}
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
        for name in f.keys():
            tensor = f.get_tensor(name)
            if not tensor.is_floating_point():
                tensors[name] = tensor
                continue
            codec = zipnn.ZipNN(input_format="torch", bytearray_dtype=tensor.dtype, method=COMPRESSION_METHOD)
            blob = codec.compress(tensor)
            tensors[name] = torch.frombuffer(bytearray(blob), dtype=COMPRESSED_DTYPE)
            infos[name] = build_compressed_tensor_info(tensor)
    set_compressed_tensors_metadata(infos, metadata)
    save_file(tensors, str(dst), metadata)


@pytest.fixture(scope="module", params=list(KINDS))
def plain(request, hub_checkpoints, tmp_path_factory):
    """The tiny model's directory with its weights in one kind (fp32, fp16-exact fp32, bf16)."""
    root = tmp_path_factory.mktemp(request.param)
    state = load_file(str(hub_checkpoints["hf"] / "model.safetensors"))
    save_file({k: KINDS[request.param](v) if v.is_floating_point() else v for k, v in state.items()},
              str(root / "model.safetensors"), {"format": "pt"})
    for name in ("config.json", "vocab.json", "merges.txt"):
        (root / name).write_bytes((hub_checkpoints["hf"] / name).read_bytes())
    return root


def copy_without_weights(src, dst):
    dst.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        (dst / name).write_bytes((src / name).read_bytes())


def assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert torch.equal(got[key].view(torch.uint8), want[key].view(torch.uint8)), key  # bit for bit


@pytest.mark.parametrize("layout", ["model.safetensors.znn", "model.znn.safetensors"])
def test_both_layouts_load_bit_exact_and_decompress_as_zipnn_does(plain, tmp_path, layout, capsys):
    compressed = tmp_path / "znn"
    copy_without_weights(plain, compressed)
    (whole_file if layout.endswith(".znn") else per_tensor)(plain / "model.safetensors", compressed / layout)
    assert (compressed / layout).stat().st_size < (plain / "model.safetensors").stat().st_size
    _, want = read_checkpoint(plain)
    _, got = read_checkpoint(compressed)
    assert_same_tensors(got, want)
    ours, theirs = roberta.load(compressed, precision="fp32"), roberta.load(plain, precision="fp32")
    tokens = ours.encode("Hello world!")
    assert torch.equal(ours.extract_features(tokens), theirs.extract_features(tokens))

    assert main(["decompress", str(compressed), str(tmp_path / "out")]) == 0
    restored = tmp_path / "out" / "model.safetensors"
    if layout.endswith(".znn"):  # ZipNN restores the original file byte for byte, so must we
        assert restored.read_bytes() == (plain / "model.safetensors").read_bytes()
    else:  # ZipNN restores tensors (its SafeOpen); the file holds exactly those
        from zipnn.zipnn import SafeOpen
        with SafeOpen(str(compressed / layout), "pt") as f:
            zipnn_own = {name: f.get_tensor(name) for name in f.keys()}
        assert_same_tensors(load_file(str(restored)), zipnn_own)
        assert_same_tensors(zipnn_own, load_file(str(plain / "model.safetensors")))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                                     "vocab.json"]


def test_sharded_index_pointing_at_either_layout(hub_checkpoints, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    sharded = tmp_path / "sharded"
    transformers.RobertaForMaskedLM.from_pretrained(hub_checkpoints["hf"]).save_pretrained(sharded, max_shard_size="4MB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2
    compressed = tmp_path / "znn"
    copy_without_weights(hub_checkpoints["hf"], compressed)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    renamed = {}
    for i, shard in enumerate(shards):  # one shard in each layout, as an index may mix them
        stem = shard.removesuffix(".safetensors")
        renamed[shard] = f"{stem}.safetensors.znn" if i % 2 == 0 else f"{stem}.znn.safetensors"
        (whole_file if i % 2 == 0 else per_tensor)(sharded / shard, compressed / renamed[shard])
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (compressed / "model.safetensors.index.json").write_text(json.dumps(index))
    _, want = read_checkpoint(sharded)
    _, got = read_checkpoint(compressed)
    assert_same_tensors(got, want)
    assert main(["decompress", str(compressed), str(tmp_path / "out")]) == 0
    _, restored = read_checkpoint(tmp_path / "out")
    assert_same_tensors(restored, want)
    original = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"] == original


def test_corrupt_zipnn_files_are_one_line_errors(plain, tmp_path):
    from roberta.errors import RobertaError

    compressed = tmp_path / "znn"
    copy_without_weights(plain, compressed)
    whole_file(plain / "model.safetensors", compressed / "model.safetensors.znn")
    data = bytearray((compressed / "model.safetensors.znn").read_bytes())
    (compressed / "model.safetensors.znn").write_bytes(data[: len(data) // 2])
    with pytest.raises(RobertaError, match="model.safetensors.znn is a truncated or corrupted ZipNN file|truncated"):
        read_checkpoint(compressed)
    (compressed / "model.safetensors.znn").write_bytes(b"PK" + bytes(data[2:]))
    with pytest.raises(RobertaError, match="not a ZipNN file"):
        read_checkpoint(compressed)


# ---- this project's own decoder against zipnn's, on the cases its format has --------------------

def zipnn_blob(tensor) -> torch.Tensor:
    codec = zipnn.ZipNN(input_format="torch", bytearray_dtype=tensor.dtype, method="HUFFMAN")
    return torch.frombuffer(bytearray(codec.compress(tensor.clone())), dtype=torch.uint8)


def zipnn_restores(blob: torch.Tensor) -> torch.Tensor:
    return zipnn.ZipNN(input_format="torch", bytearray_dtype=torch.uint8, method="HUFFMAN").decompress(blob.numpy())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8).reshape(-1), b.contiguous().view(torch.uint8).reshape(-1))


g = torch.Generator().manual_seed(0)
TENSORS = {  # what each case reaches: Huffman groups, stored groups, one-symbol runs, chunk tails
    "fp32 2 chunks + tail": torch.randn(131_111, generator=g),
    "fp16-exact fp32": torch.randn(300, 129, generator=g).half().float(),
    "bf16 (sign bits moved)": torch.randn(777, 129, generator=g).bfloat16(),
    "bf16 odd count (tail word unmoved)": torch.randn(3, generator=g).bfloat16(),
    "fp16": torch.randn(513, 257, generator=g).half(),
    "fp8 e4m3": torch.randn(200_001, generator=g).to(torch.float8_e4m3fn),
    "zeros (one-symbol runs)": torch.zeros(70_000),
    "random bits (stored)": torch.randint(-2**15, 2**15 - 1, (300_001,), dtype=torch.int16, generator=g).view(torch.bfloat16),
    "one element": torch.randn(1, generator=g),
}


@pytest.mark.parametrize("case", list(TENSORS))
def test_own_decoder_restores_each_tensor_bit_for_bit_as_zipnn_does(case):
    from roberta import znn

    assert znn.DECODER == "roberta", "roberta._planes is not built or predates decode_znn: pip install -e '.[test]'"
    tensor = TENSORS[case]
    blob = zipnn_blob(tensor)
    ours = znn.decompress_blob(blob, case)
    assert same_bits(ours, zipnn_restores(blob)) and same_bits(ours, tensor)


@pytest.mark.parametrize("dtype,length", [("bfloat16", 2_097_155), ("float32", 1_048_580), ("float16", 999)])
def test_own_decoder_restores_whole_files_as_zipnn_does(tmp_path, dtype, length):
    """Whole files: several 1 MiB streams, an odd-length tail (bytes left over after the groups)."""
    from roberta import znn

    data = bytearray(torch.randn(length // 2 + 1, generator=g).bfloat16().view(torch.uint8).numpy().tobytes()[:length])
    compressed = zipnn.ZipNN(is_streaming=True, bytearray_dtype=dtype).compress(bytearray(data))
    (tmp_path / "f.znn").write_bytes(compressed)
    ours = znn.decompress_whole_file(tmp_path / "f.znn")
    assert ours == bytes(zipnn.ZipNN(is_streaming=True).decompress(bytes(compressed))) == bytes(data)


def test_zipnn_package_is_the_fallback_and_agrees(plain, tmp_path, monkeypatch):
    from roberta import znn

    compressed = tmp_path / "znn"
    copy_without_weights(plain, compressed)
    per_tensor(plain / "model.safetensors", compressed / "model.znn.safetensors")
    _, ours = read_checkpoint(compressed)
    monkeypatch.setattr(znn, "DECODER", "zipnn")
    _, theirs = read_checkpoint(compressed)
    assert_same_tensors(ours, theirs)


def flip(data: bytes, at: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[at] ^= 1 << bit
    return bytes(out)


def test_damaged_streams_are_one_line_errors_never_a_crash(tmp_path):
    """Truncations, flipped header and table bits and garbage: one line each. ZipNN keeps no checksum:
    a flipped bit inside Huffman-coded bytes mostly decodes to other bytes of the right length, in
    zipnn as here (zipnn's decoder then also crashed the process, free(): invalid pointer); here it is
    never a crash. A file downloaded from the Hub is hashed against its etag instead."""
    from roberta import znn
    from roberta.errors import RobertaError

    tensor = torch.randn(70_000, generator=g).bfloat16()
    blob = bytes(zipnn_blob(tensor).numpy())
    body = 32 + 1 + 1 + 4  # header, then the shape: 1 dimension of 4 bytes; then 2 codec bytes
    bad = {"empty": b"", "header only": blob[:32], "cut in the table": blob[:body + 2], "cut in the data": blob[:-100],
           "one byte short": blob[:-1], "one byte more": blob + b"\0", "garbage": bytes(range(256)) * 8,
           "magic": flip(blob, 0), "dtype code": flip(blob, 15, 4), "grouping": flip(blob, 5),
           "length": flip(blob, 24, 3), "original length": flip(blob, 17), "delta": flip(blob, 9),
           "codec byte": flip(blob, body + 1, 2), "running length": flip(blob, body + 2 + 1, 6),
           "shape": flip(blob, 32 + 2, 1), "chunk size": flip(blob, 14, 1)}
    for name, data in bad.items():
        with pytest.raises(RobertaError) as info:
            znn.decompress_blob(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else
                                torch.empty(0, dtype=torch.uint8), "w")
        assert "\n" not in str(info.value) and str(info.value).startswith("w "), name
    for at in range(len(blob) - 2000, len(blob), 97):  # inside Huffman streams
        try:
            out = znn.decompress_blob(torch.frombuffer(bytearray(flip(blob, at, 5)), dtype=torch.uint8), "w")
            assert out.shape == tensor.shape
        except RobertaError as exc:
            assert "\n" not in str(exc)
    whole = tmp_path / "model.safetensors.znn"
    stream = bytes(zipnn.ZipNN(is_streaming=True, bytearray_dtype="bfloat16").compress(bytearray(tensor.view(torch.uint8).numpy().tobytes())))
    for cut in (1, 31, 32, 200, len(stream) - 1):
        whole.write_bytes(stream[:cut])
        with pytest.raises(RobertaError, match="truncated or corrupted|not a ZipNN file"):
            znn.decompress_whole_file(whole)
