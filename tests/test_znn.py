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
