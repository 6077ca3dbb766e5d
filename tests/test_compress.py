"""roberta.compress: bit-exact round trips, the file format's checks, checkpoint conversion, the CLI."""
import json
import os
import random
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

from roberta import RobertaConfig, RobertaForMaskedLM, compress
from roberta.cli import main as cli
from roberta.errors import RobertaError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.uint8, torch.bool]


def random_tensor(dtype, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    if dtype.is_floating_point:
        t = (torch.randn(n, generator=g) * 0.05).to(dtype)
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-42, -3e-40, 6e-8, 65504.0])
        k = min(n, specials.numel())
        t[:k] = specials[:k].to(dtype)
        return t
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(dtype)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool \
        else t.contiguous().numpy().tobytes()


def assert_same(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert bits(a) == bits(b)


@pytest.fixture(params=["C", "numpy"])
def reassembly(request, monkeypatch):
    """Run a test once with the C reassembly and once with the numpy fallback."""
    if request.param == "numpy":
        monkeypatch.setattr(compress, "_planes", None)
    elif compress._planes is None:
        if os.environ.get("CI") == "true":
            pytest.fail("roberta._planes is not built: `pip install -e .` compiles it")
        pytest.skip("roberta._planes is not built (pip install -e . compiles it)")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 3, 1000, compress.CHUNK_ELEMENTS + 1])
def test_round_trip_is_bit_exact(dtype, n, reassembly):
    t = random_tensor(dtype, n)
    out = compress.decompress_tensor(compress.compress_tensor(t))
    assert_same(out, t)


@pytest.mark.parametrize("nbytes", [1, 3, 262_145])
def test_odd_byte_sizes(nbytes):
    t = torch.randint(0, 7, (nbytes,), dtype=torch.uint8)
    assert_same(compress.decompress_tensor(compress.compress_tensor(t)), t)


def test_every_float32_bit_pattern_class_survives(reassembly):
    # Random words cover NaNs with payloads, infinities, subnormals and both zeros.
    words = np.random.default_rng(0).integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32)
    t = torch.from_numpy(words.view(np.float32).copy()).reshape(300, 1000)
    assert_same(compress.decompress_tensor(compress.compress_tensor(t)), t)


def test_fp16_exact_chunk_with_a_nan_payload_fp16_cannot_hold():
    t = (torch.randn(5000) * 0.05).half().float()
    t[17] = torch.from_numpy(np.array([0x7FC00001], np.uint32).view(np.float32))[0]
    assert_same(compress.decompress_tensor(compress.compress_tensor(t)), t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64], ids=str)
def test_c_and_numpy_reassembly_agree_bit_for_bit(dtype, monkeypatch):
    if compress._planes is None:
        pytest.skip("roberta._planes is not built")
    words = np.random.default_rng(1).integers(0, 2**63, 70_005, dtype=np.uint64)
    x = words.view(compress._BITS[torch.empty((), dtype=dtype).element_size()])[:70_005]
    if dtype == torch.float32:  # half the chunks fp16-exact, with every fp16 bit pattern among them
        fp16 = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
        x = np.concatenate([fp16.numpy().view(np.uint32), x])
    name, transforms = compress._dtype_name(dtype), set()
    for start in range(0, x.size, 65536):
        transform, planes = compress._encode_chunk(x[start:start + 65536], name)
        transforms.add(transform)
        with_c, with_numpy = np.empty_like(x[start:start + 65536]), np.zeros_like(x[start:start + 65536])
        compress._decode_chunk(transform, planes, with_c)
        with monkeypatch.context() as m:
            m.setattr(compress, "_planes", None)
            compress._decode_chunk(transform, planes, with_numpy)
        np.testing.assert_array_equal(with_c, x[start:start + 65536])
        np.testing.assert_array_equal(with_numpy, with_c)
    assert transforms == {torch.float32: {"fp16", "fp32"}, torch.bfloat16: {"bf16"}}.get(dtype, {"bytes"})


def test_c_fp16_conversion_equals_torch_on_every_bit_pattern():
    if compress._planes is None:
        pytest.skip("roberta._planes is not built")
    half = np.arange(2**16, dtype=np.uint16)
    expected = torch.from_numpy(half.view(np.int16)).view(torch.float16).float().numpy().view(np.uint32)
    lo, hi = (np.ascontiguousarray(half.view(np.uint8)[j::2]) for j in (0, 1))
    out = np.empty_like(expected)
    compress._planes.join_fp16(lo, hi, out)  # vector loop
    np.testing.assert_array_equal(out, expected)
    out[:] = 0
    for start in range(0, 2**16, 7):  # fewer than 8 words: the plain loop that handles tails
        compress._planes.join_fp16(lo[start:start + 7], hi[start:start + 7], out[start:start + 7])
    np.testing.assert_array_equal(out, expected)


def test_c_zstd_decoding_checks_the_frame_and_the_output_size():
    if compress._planes is None:
        pytest.skip("roberta._planes is not built")
    assert compress._ZSTD_IN_C  # the zstandard package ships a zstd library the extension can use
    plane = np.random.default_rng(2).integers(0, 9, 5000).astype(np.uint8)
    frame = compress._zstd()[0].compress(plane)
    out = np.empty(5000, np.uint8)
    assert compress._planes.zstd_into(frame, out) == 5000
    np.testing.assert_array_equal(out, plane)
    assert compress._unzstd(frame, out) and not compress._unzstd(frame, out[:4999])
    assert not compress._unzstd(frame[:-3], out) and not compress._unzstd(b"not zstd", out)
    with pytest.raises(ValueError, match="not a valid zstd frame"):
        compress._planes.zstd_into(frame, np.empty(4999, np.uint8))


def test_c_reassembly_refuses_mismatched_buffers():
    if compress._planes is None:
        pytest.skip("roberta._planes is not built")
    planes = [np.zeros(10, np.uint8), np.zeros(10, np.uint8)]
    with pytest.raises(ValueError, match="sizes do not match"):
        compress._planes.join_bf16(*planes, *planes, np.zeros(5, np.uint8), np.zeros(11, np.uint16))
    with pytest.raises(ValueError, match="sizes do not match"):
        compress._planes.join_fp32(*planes, np.zeros(2, np.uint8), np.zeros(2, np.uint8), np.zeros(5, np.uint8), np.zeros(18, np.uint8), np.zeros(10, np.uint32))
    with pytest.raises(BufferError):
        compress._planes.join_fp16(*planes, np.zeros(10, np.uint32).data.toreadonly())


def test_shapes_scalars_and_non_contiguous_inputs():
    base = torch.randn(64, 48)
    for t in [base.t(), base[::3, 5:], base[:, 7], torch.tensor(3.5), torch.zeros(2, 0, 4), base.bfloat16().t()]:
        assert_same(compress.decompress_tensor(compress.compress_tensor(t)), t.contiguous())


def test_callers_tensors_are_not_modified():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = (torch.randn(700, 300) * 0.02).to(dtype)
        before = t.clone()
        compress.compress_tensor(t)
        compress.compress_tensor(t.t())
        assert bits(t) == bits(before)


def test_fp16_exact_fp32_is_stored_in_fewer_than_half_the_bytes():
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(1000, 768, generator=g) * 0.04).half().float()
    blob = compress.compress_tensor(t)
    assert len(blob) < 0.45 * t.numel() * 4
    # Full-mantissa fp32 still shrinks: only the exponent and a few mantissa bits are predictable.
    full = torch.randn(1000, 768, generator=g) * 0.04
    assert 0.75 * full.numel() * 4 < len(compress.compress_tensor(full)) < 0.86 * full.numel() * 4


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(RobertaError, match="complex64"):
        compress.compress_tensor(torch.zeros(3, dtype=torch.complex64))


# --- files ---------------------------------------------------------------------------------------

def small_state():
    g = torch.Generator().manual_seed(1)
    return {"w": torch.randn(40, 30, generator=g) * 0.02, "b": torch.zeros(30).bfloat16(),
            "ids": torch.arange(50), "e": torch.empty(0, 3), "h": (torch.randn(5000, generator=g)).half()}


def test_file_round_trip_metadata_and_names(tmp_path):
    state = small_state()
    path = tmp_path / "model.rbz"
    compress.save_file(state, path, metadata={"format": "pt", "note": "x"})
    assert compress.tensor_names(path) == list(state)
    assert compress.read_metadata(path) == {"format": "pt", "note": "x"}
    loaded = compress.load_file(path)
    assert list(loaded) == list(state)
    for name in state:
        assert_same(loaded[name], state[name])
    only = compress.load_file(path, names=["ids"])
    assert list(only) == ["ids"]
    with pytest.raises(RobertaError, match="no tensor 'nope'"):
        compress.load_file(path, names=["nope"])
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_tensor_is_read_without_touching_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(compress, "CHUNK_ELEMENTS", 512)
    path = tmp_path / "model.rbz"
    compress.save_file({"a": torch.randn(3000), "b": torch.randn(3000)}, path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x40  # inside the last chunk of 'b'
    path.write_bytes(bytes(data))
    assert compress.load_file(path, names=["a"])["a"].shape == (3000,)
    with pytest.raises(RobertaError, match=r"checksum mismatch in tensor 'b' chunk 5 of .*model.rbz: the file is corrupted"):
        compress.load_file(path)


def test_a_flipped_bit_anywhere_is_an_error_never_wrong_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(compress, "CHUNK_ELEMENTS", 700)  # several chunks per tensor, small file
    state = small_state()
    good = tmp_path / "good.rbz"
    compress.save_file(state, good, metadata={"format": "pt"})
    data = good.read_bytes()
    bad = tmp_path / "bad.rbz"
    rng = random.Random(0)
    positions = rng.sample(range(len(data)), 250) + list(range(40)) + [len(data) - 1]
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(flipped))
        with pytest.raises(RobertaError, match="corrupted|not a roberta compressed|version|truncated"):
            compress.load_file(bad)


def test_truncated_files_and_extra_bytes(tmp_path):
    path = tmp_path / "model.rbz"
    compress.save_file(small_state(), path)
    data = path.read_bytes()
    for cut in [0, 5, 12, 30, len(data) // 2, len(data) - 1]:
        path.write_bytes(data[:cut])
        with pytest.raises(RobertaError, match="truncated|not a roberta compressed|corrupted"):
            compress.load_file(path)
    path.write_bytes(data + b"\0")
    with pytest.raises(RobertaError, match="extra bytes"):
        compress.load_file(path)


def test_wrong_magic_and_unsupported_version(tmp_path):
    path = tmp_path / "model.rbz"
    compress.save_file(small_state(), path)
    data = path.read_bytes()
    path.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(RobertaError, match="not a roberta compressed checkpoint .*bad magic"):
        compress.load_file(path)
    path.write_bytes(data[:8] + struct.pack("<I", 7) + data[12:])
    with pytest.raises(RobertaError, match=f"format version 7, this roberta reads version {compress.VERSION}"):
        compress.read_metadata(path)
    with pytest.raises(RobertaError, match="does not exist"):
        compress.load_file(tmp_path / "missing.rbz")


def test_a_valid_hash_over_a_malformed_header_is_still_an_error(tmp_path):
    # A header that passes its checksum but lies about the layout (a file not written by us).
    path = tmp_path / "model.rbz"
    compress.save_file({"w": torch.randn(10)}, path)
    data = path.read_bytes()
    magic, version, length, _ = struct.unpack_from("<8sIIQ", data)
    header = json.loads(data[24:24 + length])
    header["size"] += 1
    text = json.dumps(header, separators=(",", ":")).encode()
    import xxhash
    forged = struct.pack("<8sIIQ", magic, version, len(text), xxhash.xxh3_64_intdigest(text)) + text
    path.write_bytes(forged + data[24 + length:])
    with pytest.raises(RobertaError, match="malformed header"):
        compress.load_file(path)


def test_failed_save_leaves_the_old_file(tmp_path):
    path = tmp_path / "model.rbz"
    compress.save_file({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(RobertaError):
        compress.save_file({"w": torch.ones(3), "c": torch.zeros(2, dtype=torch.complex64)}, path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


# --- checkpoints ---------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = RobertaForMaskedLM(RobertaConfig.tiny()).eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    (src / "vocab.json").write_text('{"<s>": 0}')
    return model, src


def tensors_and_metadata(file):
    with safe_open(file, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_compress_and_decompress_a_checkpoint_gives_back_identical_tensors(checkpoint, tmp_path):
    model, src = checkpoint
    packed = tmp_path / "packed"
    compress.compress_checkpoint(src, packed)
    assert sorted(p.name for p in packed.iterdir()) == ["config.json", compress.COMPRESSED_WEIGHTS_NAME, "vocab.json"]
    assert (packed / compress.COMPRESSED_WEIGHTS_NAME).stat().st_size < (src / "model.safetensors").stat().st_size
    unpacked = tmp_path / "unpacked"
    compress.decompress_checkpoint(packed, unpacked)
    original, original_meta = tensors_and_metadata(src / "model.safetensors")
    restored, restored_meta = tensors_and_metadata(unpacked / "model.safetensors")
    assert list(restored) == list(original) and restored_meta == original_meta
    for name, t in original.items():
        assert_same(restored[name], t)
    assert (unpacked / "vocab.json").read_text() == '{"<s>": 0}'


def test_models_load_compressed_checkpoints_transparently(checkpoint, tmp_path):
    model, src = checkpoint
    packed = tmp_path / "packed"
    compress.compress_checkpoint(src, packed)
    loaded = RobertaForMaskedLM.from_pretrained(packed)
    ids = torch.tensor([[0, 5, 9, 33, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_other_layouts_are_compressed_under_hugging_face_names(checkpoint, tmp_path):
    model, src = checkpoint
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((src / "config.json").read_text())
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    compress.compress_checkpoint(bin_dir, tmp_path / "packed")
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == ["config.json", "model.rbz"]
    loaded = RobertaForMaskedLM.from_pretrained(tmp_path / "packed")
    for name, t in model.state_dict().items():
        assert_same(loaded.state_dict()[name], t)


def test_checkpoint_errors(checkpoint, tmp_path):
    _, src = checkpoint
    with pytest.raises(RobertaError, match="differ from the source"):
        compress.compress_checkpoint(src, src)
    with pytest.raises(RobertaError, match="no model.rbz to decompress"):
        compress.decompress_checkpoint(src, tmp_path / "x")
    with pytest.raises(RobertaError, match="not a checkpoint directory"):
        compress.compress_checkpoint(tmp_path / "missing", tmp_path / "y")


def test_cli_compress_and_decompress(checkpoint, tmp_path, capsys):
    _, src = checkpoint
    assert cli(["compress", str(src), str(tmp_path / "c")]) == 0
    assert "model.rbz" in capsys.readouterr().out
    assert cli(["decompress", str(tmp_path / "c"), str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "model.safetensors").exists()
    (tmp_path / "c" / compress.COMPRESSED_WEIGHTS_NAME).write_bytes(b"garbage!" * 4)
    assert cli(["decompress", str(tmp_path / "c"), str(tmp_path / "e")]) == 2
    assert "error: " in capsys.readouterr().err


def test_roberta_load_reads_a_compressed_directory(bpe_dir, tmp_path):
    import shutil

    import roberta

    torch.manual_seed(0)
    model = RobertaForMaskedLM(RobertaConfig.tiny(vocab_size=50265)).eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bpe_dir / name, src / name)
    compress.compress_checkpoint(src, tmp_path / "packed")
    hub = roberta.load(tmp_path / "packed", device="cpu")
    for name, t in model.state_dict().items():
        assert_same(hub.model.state_dict()[name], t)
