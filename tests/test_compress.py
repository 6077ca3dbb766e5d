"""roberta.compress: bit-exact round trips, the file format's checks, checkpoint conversion, the CLI."""
import json
import os
import random
import struct

import numpy as np
import pytest
import torch
import xxhash
from safetensors import safe_open

from roberta import RobertaConfig, RobertaForMaskedLM, compress
from roberta.cli import main as cli
from roberta.errors import RobertaError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.uint8, torch.bool]


_FP16 = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
FP16_NOT_NAN = _FP16[~_FP16.isnan()]  # every other fp16 bit pattern: subnormals, zeros, infinities


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


def require_c_decoder():
    if compress._C_DECODER:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("the C decoder is not available: `pip install -e .` compiles roberta._planes, and the "
                    "zstandard and xxhash packages must ship their libraries")
    pytest.skip("the C decoder is not available (pip install -e . compiles roberta._planes)")


@pytest.fixture(params=["C", "numpy"])
def reassembly(request, monkeypatch):
    """Run a test once with the C decoder and once with the numpy fallback."""
    if request.param == "numpy":
        monkeypatch.setattr(compress, "_C_DECODER", False)
    else:
        require_c_decoder()
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 3, 17, 1000, 2 * compress.CHUNK_ELEMENTS + 33])
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
def test_c_and_numpy_decoders_agree_bit_for_bit(dtype, monkeypatch):
    require_c_decoder()
    words = np.random.default_rng(1).integers(0, 2**63, 70_005, dtype=np.uint64)
    x = words.view(compress._BITS[torch.empty((), dtype=dtype).element_size()])[:70_005]
    if dtype == torch.float32:  # a chunk of every fp16 bit pattern but NaNs: the fp16 transform
        fp16 = torch.zeros(compress.CHUNK_ELEMENTS)
        fp16[:len(FP16_NOT_NAN)] = FP16_NOT_NAN.float()
        x = np.concatenate([fp16.numpy().view(np.uint32), x])
    if dtype in (torch.float32, torch.bfloat16):  # and a chunk of trained-like weights, few outliers
        weights = (torch.randn(compress.CHUNK_ELEMENTS) * 0.03).to(dtype)
        x = np.concatenate([x, compress._words(weights)])
    t = torch.from_numpy(x).view(dtype) if dtype != torch.float16 else torch.from_numpy(x.view(np.int16)).view(dtype)
    blob = compress.compress_tensor(t)
    header, _ = compress._parse_blob_header(memoryview(blob), "t", "test")
    transforms = {transform for transform, *_ in header["chunks"]}
    assert transforms == {torch.float32: {"fp16", "fp32"}, torch.bfloat16: {"bf16"}}.get(dtype, {"bytes"})
    with_c = compress.decompress_tensor(blob)
    monkeypatch.setattr(compress, "_C_DECODER", False)
    assert_same(with_c, t)
    assert_same(compress.decompress_tensor(blob), t)


def test_exponents_outside_the_window_are_outliers_and_come_back():
    # Weights spread over 200 binades: most of each chunk falls outside any 32-binade window.
    exponents = torch.randint(-100, 100, (50_000,), generator=torch.Generator().manual_seed(3))
    t = torch.randn(50_000) * torch.exp2(exponents.float())
    for dtype in (torch.float32, torch.bfloat16):
        blob = compress.compress_tensor(t.to(dtype))
        header, _ = compress._parse_blob_header(memoryview(blob), "t", "test")
        (transform, _, elements, _, _, planes), = header["chunks"]
        assert planes[1][2] > elements // 2  # the outlier plane holds most exponents
        assert_same(compress.decompress_tensor(blob), t.to(dtype))


def test_c_fp16_conversion_equals_torch_on_every_bit_pattern():
    require_c_decoder()
    for n in (len(FP16_NOT_NAN), 7, 1):  # the vector loop, and the plain loop that handles tails
        t = FP16_NOT_NAN[-n:].float()
        assert_same(compress.decompress_tensor(compress.compress_tensor(t)), t)


def test_the_c_decoder_uses_the_same_xxh3():
    require_c_decoder()
    for n in (0, 1, 16, 17, 128, 129, 240, 241, 5000):
        data = bytes(range(256)) * 20
        assert compress._planes.xxh3(data[:n]) == xxhash.xxh3_64_intdigest(data[:n])


def test_c_decoder_refuses_a_table_that_does_not_fit_the_buffers():
    require_c_decoder()
    blob = compress.compress_tensor(torch.randn(1000).bfloat16())
    header, _ = compress._parse_blob_header(memoryview(blob), "t", "test")
    table = compress._chunk_table(header["chunks"])
    out = np.empty(1000, np.uint16)
    assert compress._planes.decode_chunks(blob, table, out, 2) == -1
    for column, value, message in [(2, 1001, "outside the output"), (4, len(blob), "outside the blob"),
                                   (8, 999, "plane sizes"), (0, 9, "unknown transform")]:
        bad = table.copy()
        bad[0, column] = value
        with pytest.raises(ValueError, match=message):
            compress._planes.decode_chunks(blob, bad, out, 2)
    with pytest.raises(ValueError, match="outside the output"):
        compress._planes.decode_chunks(blob, table, np.empty(999, np.uint16), 2)
    with pytest.raises(BufferError):
        compress._planes.decode_chunks(blob, table, out.data.toreadonly(), 2)


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


def test_a_flipped_bit_anywhere_is_an_error_never_wrong_weights(tmp_path, monkeypatch, reassembly):
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


def test_forged_chunk_with_valid_hashes_but_a_wrong_outlier_count(reassembly):
    # A blob that passes every hash yet flags more outliers than it lists: an error naming the chunk.
    t = torch.rand(4000, generator=torch.Generator().manual_seed(4)).bfloat16() + 0.5
    t[5] = 0.0  # an exponent outside the window: one outlier
    blob = bytearray(compress.compress_tensor(t))
    header, start = compress._parse_blob_header(memoryview(blob), "t", "test")
    (_, _, _, _, offset, planes), = header["chunks"]
    assert [codec for codec, _, _ in planes[:2]] == [compress.ZSTD, compress.RAW] and planes[1][2] == 2
    entry = json.loads(bytes(blob[12:start]))
    joint = np.frombuffer(compress._zstd()[1].decompress(bytes(blob[offset:offset + planes[0][1]])), np.uint8).copy()
    joint[7] |= 0x80  # a second flagged word, with no exponent for it in the outlier plane
    frame = compress._zstd()[0].compress(joint)
    stored = frame + bytes(blob[offset + planes[0][1]:])
    entry["chunks"][0][2] = xxhash.xxh3_64_intdigest(stored)
    entry["chunks"][0][3][0][1] = len(frame)
    text = json.dumps(entry, separators=(",", ":")).encode()
    forged = struct.pack("<IQ", len(text), xxhash.xxh3_64_intdigest(text)) + text + stored
    with pytest.raises(RobertaError, match="chunk 0"):
        compress.decompress_tensor(forged, name="w")


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
    with pytest.raises(RobertaError, match="is the input"):
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
    hub = roberta.load(tmp_path / "packed", device="cpu", precision="fp32")
    for name, t in model.state_dict().items():
        assert_same(hub.model.state_dict()[name], t)
