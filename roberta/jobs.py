"""Streaming batch jobs: features or predictions for inputs of any size, written in shards as they go.

    roberta features -m MODEL -i corpus.txt -o vectors/       # vectors/features-00000.npy ... index.json
    torchrun --nproc-per-node 4 -m roberta features ...        # the same files, four processes

Input is read line by line (plain text, a TAB separating the sentences of a pair; TSV with two
columns; or JSONL with a text field and an optional pair field), one input per line and one output
row per input, in input order: row i of the output is line i + 1 of the input. A blank line is an
error naming the line, unless `allow_empty` makes it the empty text (`<s></s>`, a row like any other).

Every `shard_rows` inputs make one shard, `<kind>-NNNNN.npy` (float32 [rows, width]: pooled features,
or class probabilities), written to a temporary name and renamed, so a shard file is whole or
absent, after its record `<kind>-NNNNN.json` (the xxh3-128 of the shard's input lines and of its
bytes). Memory holds one shard's inputs and results, whatever the input size. `job.json` records
the settings when the job starts, with the content identity of the input file and of the model
(xxh3-128 of their bytes: names and sizes say nothing of an edit in place); `index.json`, written
last, lists the shards, their first rows, row counts and checksums: its presence means the job is
complete. `resume=True` checks the settings and identities against job.json, reads the input again
and checks every shard on disk against the lines it now reads (what makes stdin resumable) and
against its checksum, and computes only the shards that are missing. Under torchrun each
process computes the shards k with k % world_size == rank (any world size can resume any other's
job); rank 0 writes job.json and the index, and gloo (or NCCL) barriers order the steps. Each shard's
timing goes to `metrics.jsonl` (rows, seconds, rows per second, rank). Each shard's record also says
what it was computed on (`computed_on`): the device and, on a CPU, what decides the float rounding of
its rows besides the model and the inputs (the CPU, the instruction sets the libraries may use, MKL's
code path, threads, torch, and the kernel mode); a job resumed on another machine says which shards
came from where (their rows may differ in the last bits, as float32 on two machines does).

Why `.npy` shards rather than Parquet: no new dependency, float32 rows stored exactly, and
`np.load(shard, mmap_mode="r")` reads one back without a copy; `load_rows(directory)` all of them,
each checked against its checksum.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import xxhash
from tqdm import tqdm

from .errors import InputError, RobertaError, RobertaWarning
from .fileio import atomic_write, file_digest, parse_json, read_json

FORMATS = ("text", "tsv", "jsonl")
KINDS = ("features", "predict")
SHARD_ROWS = 10_000
BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark, which some editors put first


# ---- reading inputs -----------------------------------------------------------------------------


def input_format(path: str | None, format: str | None, pairs: bool = True) -> str:
    """`format` if given, else from the file's suffix: .jsonl -> jsonl, .tsv -> tsv (text where the
    inputs are single texts, not `pairs`), anything else text."""
    if format is not None:
        if format not in FORMATS:
            raise RobertaError(f"input format must be one of {', '.join(FORMATS)}, got {format!r}")
        return format
    suffix = Path(path).suffix.lower() if path and path != "-" else ""
    return {".jsonl": "jsonl", ".tsv": "tsv" if pairs else "text"}.get(suffix, "text")


def read_inputs(lines: Iterator[bytes], format: str = "text", field: str = "text", pair_field: str | None = None,
                allow_empty: bool | None = False, name: str = "input") -> Iterator[list[str]]:
    """The sentences of each input line (one, or a pair), in order; bad lines are errors naming the line."""
    for number, raw in enumerate(lines, 1):
        if number == 1 and raw.startswith(BOM):  # an editor's byte-order mark is not text
            raw = raw[len(BOM):]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RobertaError(f"{name} line {number} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
        line = line[:-1] if line.endswith("\n") else line
        line = line[:-1] if line.endswith("\r") else line
        if format == "jsonl":
            sentences = _json_fields(line, number, field, pair_field, name) if line.strip() else [""]
        elif format == "tsv":
            sentences = line.split("\t")
            if line.strip() and len(sentences) != 2:
                raise RobertaError(f"{name} line {number} has {len(sentences)} columns; a TSV input has two "
                                   "(sentence TAB sentence); use --format text for single sentences")
        else:
            sentences = line.split("\t")
        if not allow_empty and not "".join(sentences).strip():  # allow_empty None: the command offers no such flag
            fix = "remove it" if allow_empty is None else \
                "remove it, or pass --allow-empty to read it as the empty text"
            raise RobertaError(f"{name} line {number} is empty; each line is one input and one output row, so {fix}")
        yield sentences


def _json_fields(line: str, number: int, field: str, pair_field: str | None, name: str) -> list[str]:
    record = parse_json(line, f"{name} line {number}")
    values = []
    for key in (field, pair_field) if pair_field else (field,):
        value = record.get(key) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise RobertaError(f"{name} line {number} has no string field {key!r}; name the field with --field")
        values.append(value)
    return values


def open_lines(path: str | None) -> Iterator[bytes]:
    """The lines of a file (or of stdin for None / '-'), as bytes, read as they are needed."""
    if path in (None, "-"):
        if hasattr(sys.stdin, "buffer"):
            yield from sys.stdin.buffer
        else:  # a text stream standing in for stdin (tests, notebooks)
            yield from (line.encode("utf-8", "surrogateescape") for line in sys.stdin)
        return
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise RobertaError(f"cannot read input {path}: {exc.strerror}") from None
    with handle:
        yield from handle


def scan_input(path: str) -> tuple[int, str]:
    """Lines in a file (a last line without a newline counts) and its content digest, in one pass
    of 1 MiB blocks."""
    count, last, digest = 0, b"\n", xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            count += block.count(b"\n")
            last = block[-1:]
            digest.update(block)
    return count + (last != b"\n"), digest.hexdigest()


def chunks(items, size: int, partial_before_error: bool = False) -> Iterator[list]:
    """Lists of `size` items (the last one shorter) from any iterable, read as they are needed.
    `partial_before_error`: an input refused while it is read (a RobertaError) ends the chunk: the items
    read before it come first, and the error when the next chunk is asked for (so that a command prints
    the outputs of the lines before a bad one)."""
    chunk = []
    iterator = iter(items)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            break
        except RobertaError:
            if partial_before_error and chunk:
                yield chunk
            raise
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---- computing ----------------------------------------------------------------------------------


def check_layer(hub, layer: int) -> None:
    """A hidden layer's index: 0 (embeddings) to N, or counted from the last as in Python (-1 the last)."""
    layers = hub.model.config.num_hidden_layers
    if not -layers - 1 <= layer <= layers:
        raise RobertaError(f"layer {layer} does not exist: this model has layers 0 (embeddings) to {layers}, "
                           f"or -1 (the last) to {-layers - 1} counting from the end")


def tokenize(hub, inputs: list[list[str]], truncate: bool, windowed: bool, first_line: int | None = None,
             name: str = "input") -> list[list[int]]:
    """Token ids of each input (`<s> A </s>` or `<s> A </s></s> B </s>`), refused or cut at the model's
    limit (a pair longest first) unless windows will read it. A long input is tokenized a chunk at a
    time, no further than the limit needs (`hub.encode_within`). Errors name the line when
    `first_line` (the first input's) is given."""
    from .hub import cut, encode_within, too_long
    from .tokenizer import CHUNK_CHARS

    tokenizer, limit = hub.tokenizer, hub.max_tokens

    def what(i):
        return "input" if first_line is None else f"{name} line {first_line + i}"

    long = {i for i, s in enumerate(inputs) if len(s) > 2 or sum(map(len, s)) > CHUNK_CHARS}
    ids: list = [None] * len(inputs)
    for size in (1, 2):  # the short ones in one parallel call per shape
        group = [i for i, s in enumerate(inputs) if len(s) == size and i not in long]
        if group:
            for i, row in zip(group, tokenizer.encode_batch(*([inputs[i][j] for i in group] for j in range(size)))):
                ids[i] = row
    for i in sorted(long):
        ids[i] = encode_within(tokenizer, inputs[i], None if windowed else limit, truncate, what(i))
    if windowed:
        return ids
    for i, row in enumerate(ids):
        if len(row) > limit:
            if not truncate:
                raise InputError(too_long(what(i), len(row), limit, truncate))
            ids[i] = cut(tokenizer, row, limit)
    return ids


def feature_rows(hub, tokens: list[list[int]], pool: str = "cls", layer: int = -1, batch_tokens: int = 4096,
                 window: int | None = None, stride: int | None = None) -> list[np.ndarray]:
    """Features of each token sequence, float32: the `<s>` vector (`pool` "cls"), the mean over the
    tokens ("mean"), or every token ("none", [length, hidden]), from `layer` (0: the embeddings).
    Sequences go in batches of similar length under `batch_tokens`, pooled as a batch; longer than
    the model with `window`/`stride`, in overlapping windows."""
    from . import windows
    from .inference import length_batches, pad_batch

    layers = hub.model.config.num_hidden_layers
    all_layers = layer not in (-1, layers)
    limit = hub.max_tokens
    out: list = [None] * len(tokens)
    short = [i for i, t in enumerate(tokens) if len(t) <= limit]
    for batch in length_batches([len(tokens[i]) for i in short], batch_tokens):
        batch = [short[i] for i in batch]
        ids, layout = hub._placed(*pad_batch([tokens[i] for i in batch], hub.tokenizer.pad_token_id))
        with torch.inference_mode():
            result = hub.model.roberta(ids, output_hidden_states=all_layers, layout=layout)
        h = (result.hidden_states[layer] if all_layers else result.last_hidden_state).float()
        if pool == "cls":
            pooled = list(h[:, 0].cpu().numpy())
        elif pool == "mean":
            m = layout.mask.unsqueeze(-1).to(h.dtype)
            pooled = list(((h * m).sum(1) / m.sum(1)).cpu().numpy())
        else:
            pooled = [h[r, :len(tokens[i])].cpu().numpy() for r, i in enumerate(batch)]
        for i, vector in zip(batch, pooled):
            out[i] = vector
    plan = windows.check(window, stride, limit)
    for i in (i for i, t in enumerate(tokens) if len(t) > limit):
        if pool == "none":
            h = hub.extract_features(torch.tensor(tokens[i]), return_all_hiddens=all_layers, window=window,
                                     stride=stride)
            out[i] = (h[layer] if all_layers else h)[0].float().cpu().numpy()
            continue
        # Pooled as the windows go: the stitched sequence (of every layer) is never held.
        total, first = 0, None
        with torch.inference_mode():
            for _, layers in hub.stitched_rows(tokens[i], plan, all_layers):
                h = (layers[layer] if all_layers else layers[0]).float()
                if pool == "cls":  # the first piece holds <s>: no other window is needed
                    first = h[0]
                    break
                total = total + h.sum(0)
        out[i] = (first if pool == "cls" else total / len(tokens[i])).cpu().numpy()
    return out


def prediction_rows(hub, tokens: list[list[int]], head: str, batch_tokens: int = 4096, window: int | None = None,
                    stride: int | None = None, pool: str = "mean") -> np.ndarray:
    """Class probabilities [inputs, classes] of a classification head (windows pooled by `pool`); a head
    with one output (a regression such as STS-B, a cross-encoder) gives its score as it is [inputs, 1],
    since a softmax over one class is always 1."""
    from .inference import length_batches, pad_batch

    scores = hub.model.config.classification_heads[head] == 1
    as_rows = (lambda out: out) if scores else (lambda out: out.exp())
    probs: list = [None] * len(tokens)
    limit = hub.max_tokens
    short = [i for i, t in enumerate(tokens) if len(t) <= limit]
    for batch in length_batches([len(tokens[i]) for i in short], batch_tokens):
        batch = [short[i] for i in batch]
        ids, _ = pad_batch([tokens[i] for i in batch], hub.tokenizer.pad_token_id)
        rows = as_rows(hub.predict(head, ids, return_logits=scores)).cpu().numpy()
        for i, row in zip(batch, rows):
            probs[i] = row
    for i in (i for i, t in enumerate(tokens) if len(t) > limit):
        probs[i] = as_rows(hub.predict(head, torch.tensor(tokens[i]), window=window, stride=stride, pool=pool,
                                       return_logits=scores))[0].cpu().numpy()
    return np.stack(probs).astype(np.float32)


# ---- the job ------------------------------------------------------------------------------------


def shard_name(kind: str, index: int) -> str:
    return f"{kind}-{index:05d}.npy"


def not_a_job(out: Path) -> str | None:
    """Why the directory `out` is not a job's own (None when it is): its job.json must be a job's
    record, and every entry a file a job writes (shards, their records, the index, the metrics, and
    the temporary files of a write cut short). --overwrite removes nothing else: a file named job.json
    does not make a directory of the user's a job's."""
    if not (out / "job.json").is_file():
        return "holds no job.json: it is not a job's output"
    try:
        record = read_json(out / "job.json")
    except RobertaError:
        return "has a job.json that is not a job's record"
    kind = record.get("kind")
    if kind not in ("features", "predict") or not {"input", "model", "shard_rows"} <= record.keys():
        return "has a job.json that is not a job's record"
    own = re.compile(rf"job\.json|metrics\.jsonl|index\.json|{kind}-\d{{5,}}\.(npy|json)|\..+\.tmp")
    others = sorted(p.name for p in out.iterdir() if p.is_symlink() or not p.is_file() or not own.fullmatch(p.name))
    if others:
        return f"holds {others[0]}, which no job writes"
    return None


def prepare_output(out: str | os.PathLike, resume: bool, overwrite: bool = False, remove: bool = True) -> Path:
    """Check the output directory before any work: its parent must exist; an existing one needs `resume`
    (continue it) or `overwrite` (start it over: only a job's own directory, `not_a_job`, is removed,
    unless `remove` is False: a check before the model loads)."""
    out = Path(out)
    if resume and overwrite:
        raise RobertaError("give --resume (continue the job) or --overwrite (start it over), not both")
    if overwrite and out.is_dir() and any(out.iterdir()):
        reason = not_a_job(out)
        if reason:
            raise RobertaError(f"{out} {reason}, so --overwrite leaves it alone; choose a new directory")
        if not remove:
            return out
        shutil.rmtree(out)
    if not out.parent.is_dir():
        raise RobertaError(f"cannot write to {out}: the directory {out.parent} does not exist; create it first")
    if out.exists() and not out.is_dir():
        raise RobertaError(f"{out} is a file; the output of a sharded job is a directory")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise RobertaError(f"{out} already exists; pass --resume to continue the job in it, --overwrite to start it "
                           "over, or choose a new directory")
    if resume and out.is_dir() and any(out.iterdir()) and not (out / "job.json").is_file():
        raise RobertaError(f"{out} holds no job.json: it is not a job to resume")
    return out


def run(hub, kind: str, source: str | None, out: str | os.PathLike, *, format: str | None = None,
        field: str = "text", pair_field: str | None = None, allow_empty: bool = False, pool: str = "cls",
        layer: int = -1, head: str | None = None, truncate: bool = False, window: int | None = None,
        stride: int | None = None, window_pool: str = "mean", shard_rows: int = SHARD_ROWS,
        batch_tokens: int = 4096, resume: bool = False, overwrite: bool = False, progress: bool = True,
        model_name: str = "") -> dict:
    """Run a `kind` ("features" or "predict") job from `source` (a file, or stdin for None / '-') into
    the directory `out`; returns the index (also written to out/index.json)."""
    from . import windows

    if kind not in KINDS:
        raise RobertaError(f"job kind must be features or predict, got {kind!r}")
    if shard_rows < 1:
        raise RobertaError(f"shard_rows must be at least 1, got {shard_rows}")
    if kind == "features" and pool not in ("cls", "mean"):
        raise RobertaError(f"pool must be cls or mean for sharded features (one row per input), got {pool!r}")
    check_layer(hub, layer)
    if kind == "predict":
        heads = getattr(hub.model, "classification_heads", {})
        if head not in heads:
            raise RobertaError(f"the model has no classification head {head!r}; it has: {', '.join(heads) or 'none'}")
    windowed = windows.check(window, stride, hub.max_tokens) is not None
    format = input_format(source, format)
    out = prepare_output(out, resume, overwrite)
    existed = out.exists()
    new = not existed or not any(out.iterdir())  # a job that fails before its first shard removes what it made
    stdin = source in (None, "-")
    if not stdin and not Path(source).is_file():
        raise RobertaError(f"input {source} is not a file")
    # Content, not names: a file edited in place or a model retrained in place is another job.
    # stdin cannot be read twice, so its identity is each shard's own input digest (checked below).
    total, input_digest = (None, None) if stdin else scan_input(source)
    settings = {"kind": kind, "model": model_name, "precision": getattr(hub, "precision", "fp32"),
                "input": "-" if stdin else str(Path(source).resolve()),
                "input_xxh3_128": input_digest, "model_xxh3_128": model_digest(hub),
                "format": format, "field": field, "pair_field": pair_field, "allow_empty": allow_empty,
                "pool": pool if kind == "features" else None, "layer": layer if kind == "features" else None,
                "head": head, "truncate": truncate, "window": window, "stride": stride,
                "window_pool": window_pool if kind == "predict" else None, "shard_rows": shard_rows}
    rank, world, bar = *_distributed(), None
    try:
        if rank == 0:
            out.mkdir(exist_ok=True)
            if (out / "job.json").is_file():
                _check_settings(out, settings)
            else:
                atomic_write(out / "job.json", json.dumps(settings, indent=2) + "\n")
        _barrier(world)
        _check_settings(out, settings)
        mine = None if total is None else sum(min(shard_rows, total - k * shard_rows)
                                              for k in range(rank, -(-total // shard_rows), world))
        bar = tqdm(total=mine, unit="line", unit_scale=True, desc=kind, disable=not progress or rank != 0,
                   smoothing=0.1, file=sys.stderr)
        name = "stdin" if stdin else str(source)
        digest = xxhash.xxh3_128()  # of the raw lines of the shard being read
        here, elsewhere = computed_on(hub), {}  # shard -> what an earlier process computed it on, where not here

        def hashed(lines):
            for raw in lines:
                digest.update(raw)
                yield raw

        def shard_done(k, shard):
            nonlocal digest
            options = (truncate, windowed, pool, layer, head, batch_tokens, window, stride, window_pool, name, here)
            theirs = _shard(hub, kind, out, k, k * shard_rows, shard, digest.hexdigest(), rank, world, bar, *options)
            if theirs is not None:
                elsewhere[k] = theirs
            digest = xxhash.xxh3_128()

        rows_seen, shard = 0, []
        for sentences in read_inputs(hashed(open_lines(source)), format, field, pair_field, allow_empty, name=name):
            shard.append(sentences)
            rows_seen += 1
            if len(shard) == shard_rows:
                shard_done((rows_seen - 1) // shard_rows, shard)
                shard = []
        if shard:
            shard_done((rows_seen - 1) // shard_rows, shard)
        bar.close()
        if rows_seen == 0:
            raise RobertaError(f"{name} holds no inputs; give one input per line")
        count = -(-rows_seen // shard_rows)
        if elsewhere:
            warnings.warn(_resumed_elsewhere(elsewhere, here), RobertaWarning, stacklevel=2)
        for stale in sorted(out.glob(f"{kind}-*.npy")):
            if stale.stem[len(kind) + 1:].isdigit() and int(stale.stem[len(kind) + 1:]) >= count:
                raise RobertaError(f"cannot resume {out}: {name} ended after {rows_seen} rows but the job holds "
                                   f"{stale.name} for later rows: the input changed since the job started; resume "
                                   "with the same input, or start a new directory")
        _barrier(world)
        shards = []
        for k in range(count):
            rows = min(shard_rows, rows_seen - k * shard_rows)
            record = _record(out, kind, k)
            shards.append({"file": shard_name(kind, k), "first_row": k * shard_rows, "rows": rows,
                           "width": _shard_shape(out / shard_name(kind, k), rows)[1],
                           "xxh3_128": record["xxh3_128"], "input_xxh3_128": record["input_xxh3_128"],
                           "computed_on": record.get("computed_on")})
        index = {"kind": kind, "rows": rows_seen, "width": shards[0]["width"], "dtype": "float32",
                 "shards": shards, "settings": settings}
        if kind == "predict":
            index["labels"] = _labels(hub, head, shards[0]["width"])
        if rank == 0:
            atomic_write(out / "index.json", json.dumps(index, indent=2) + "\n")
        _barrier(world)
        return index
    except BaseException:
        if bar is not None:  # cleared now, so that it is not drawn again after the error
            bar.leave = False
            bar.close()
        if new and rank == 0 and out.is_dir() and not any(out.glob(f"{kind}-*.npy")):
            if existed:  # nothing computed yet: leave no job that asks for --resume
                for made in ("job.json", "metrics.jsonl"):
                    (out / made).unlink(missing_ok=True)
            else:
                shutil.rmtree(out)
        raise
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def computed_on(hub) -> dict:
    """What this process computes shards on: the device, and on a CPU what roberta.kernels' measured
    choices hold for (`kernels.machine()`) and whether they are measured (`kernels.mode()`)."""
    from . import kernels

    device = hub.device
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device), "torch": str(torch.__version__)}
    if device.type != "cpu":
        return {"device": device.type, "torch": str(torch.__version__)}
    return {"device": "cpu", **kernels.machine(), "kernels": kernels.mode()}


def _resumed_elsewhere(elsewhere: dict[int, dict], here: dict) -> str:
    """The warning for a job resumed on another machine, or with other threads or kernels: which shards came
    from where, by what differs from here."""
    groups: dict[str, list[int]] = {}
    for k, theirs in sorted(elsewhere.items()):
        groups.setdefault(_difference(theirs, here), []).append(k)
    earlier = "; ".join(f"shard{'s' if len(ks) > 1 else ''} {_ranges(ks)} with {what}" for what, ks in groups.items())
    return (f"this job was resumed on another machine or setup: {earlier}. Rows computed under different "
            "conditions may differ in the last bits (float rounding), not in meaning; start a new directory on "
            "one machine for rows that are the same bits throughout")


def _ranges(numbers: list[int]) -> str:
    """Sorted shard numbers as runs: 0-3, 7, 9-12."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _difference(theirs, here: dict) -> str:
    if not isinstance(theirs, dict):
        return repr(theirs)
    keys = [key for key in {**theirs, **here} if theirs.get(key) != here.get(key)]
    return ", ".join(f"{key} {theirs.get(key)} (here {here.get(key)})" for key in keys)


def _shard(hub, kind, out, k, first_row, inputs, input_digest, rank, world, bar, truncate, windowed, pool,
           layer, head, batch_tokens, window, stride, window_pool, name, here):
    """Compute and write shard k if it is this process's and not already on disk. A shard already
    there is checked against the record written with it: the same input lines, the same bytes; what it
    was computed on is returned where that is not `here` (None otherwise)."""
    path = out / shard_name(kind, k)
    if k % world != rank:
        return
    if path.is_file():  # written before a crash: whole, since shards are renamed into place
        record = _record(out, kind, k)
        if record["input_xxh3_128"] != input_digest:
            raise RobertaError(f"cannot resume {out}: {name} lines {first_row + 1}-{first_row + len(inputs)} differ "
                               f"from those {path.name} was computed from (the input changed since the job started); "
                               "resume with the same input, or start a new directory")
        _check_shard(path, record["xxh3_128"], len(inputs))
        bar.update(len(inputs))
        theirs = record.get("computed_on")
        return theirs if theirs is not None and theirs != here else None
    started = time.perf_counter()
    tokens = tokenize(hub, inputs, truncate, windowed, first_line=first_row + 1, name=name)
    if kind == "features":
        rows = np.stack(feature_rows(hub, tokens, pool, layer, batch_tokens, window, stride)).astype(np.float32)
    else:
        rows = prediction_rows(hub, tokens, head, batch_tokens, window, stride, window_pool)
    buffer = io.BytesIO()
    np.save(buffer, rows)
    data = buffer.getvalue()
    # The record and the metrics line first, then the shard: a shard on disk always has its record (a
    # record alone is a shard to compute again, and is rewritten with it), and every shard computed has
    # its line, even when the process is killed the moment the shard is in place (a kill before that
    # leaves a line for a computation that is then done again, as it was).
    record = {"rows": len(inputs), "first_row": first_row, "input_xxh3_128": input_digest,
              "xxh3_128": xxhash.xxh3_128_hexdigest(data), "computed_on": here}
    atomic_write(_record_path(out, kind, k), json.dumps(record) + "\n")
    seconds = time.perf_counter() - started
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"shard": k, "rows": len(inputs), "seconds": round(seconds, 4),
                            "rows_per_second": round(len(inputs) / max(seconds, 1e-9), 1), "rank": rank}) + "\n")
    atomic_write(path, data)
    bar.update(len(inputs))


def _record_path(out: Path, kind: str, k: int) -> Path:
    return out / f"{kind}-{k:05d}.json"


def _record(out: Path, kind: str, k: int) -> dict:
    """The record written with shard k: its rows, its input lines' digest and its bytes' digest."""
    path = _record_path(out, kind, k)
    try:
        record = parse_json(path.read_text(), kind=dict)
        if not all(isinstance(record.get(key), str) for key in ("input_xxh3_128", "xxh3_128")):
            raise ValueError("it lacks the digests")
    except (OSError, ValueError, RobertaError) as exc:
        reason = "is missing" if not path.exists() else f"is unreadable ({exc})"
        raise RobertaError(f"the record {path} of shard {shard_name(kind, k)} {reason}; delete the shard and "
                           "resume to recompute it") from None
    return record


def _check_shard(path: Path, checksum: str, rows: int) -> tuple[int, int]:
    """The shape of a shard whose bytes match `checksum` and which holds `rows` rows; else an error."""
    if not path.is_file():
        raise RobertaError(f"shard {path} is missing; resume the job (the same command with --resume) to "
                           "recompute it")
    if file_digest(path).hexdigest() != checksum:
        raise RobertaError(f"shard {path} is damaged: its bytes do not match the checksum written with it; "
                           "delete it and resume the job to recompute it")
    return _shard_shape(path, rows)


def _shard_shape(path: Path, rows: int) -> tuple[int, int]:
    try:
        shape = np.load(path, mmap_mode="r").shape
    except (OSError, ValueError) as exc:
        raise RobertaError(f"shard {path} is unreadable ({exc}); delete it and resume to recompute it") from None
    if len(shape) != 2 or shape[0] != rows:
        raise RobertaError(f"shard {path} holds {shape} but should hold {rows} rows; delete it and resume")
    return shape


def model_digest(hub) -> str:
    """The content identity of the model a job runs: xxh3-128 over the files it was loaded from
    (weights, config, tokenizer: what `checkpoint.is_checkpoint_file` names), or, for a model built
    in memory, over its parameters."""
    from .checkpoint import is_checkpoint_file

    digest = xxhash.xxh3_128()
    source = getattr(hub, "source", None)
    if source is None:
        for key, tensor in sorted(hub.model.state_dict().items()):
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            digest.update(f"{key}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
            digest.update(data.tobytes())
        return digest.hexdigest()
    source = Path(source)
    files = [source] if source.is_file() else sorted(
        p for p in source.rglob("*") if p.is_file()
        and all(is_checkpoint_file(part) or part.endswith(".znn") for part in p.relative_to(source).parts))
    for path in files:
        digest.update(f"{path.relative_to(source) if path != source else path.name}\0{path.stat().st_size}\0".encode())
        file_digest(path, digest)
    return digest.hexdigest()


CHANGED = {"input_xxh3_128": "the input's content",
           "model_xxh3_128": "the model's files (weights, config or tokenizer)"}


def _check_settings(out: Path, settings: dict) -> None:
    saved = read_json(out / "job.json")
    changed = [key for key in settings if saved.get(key) != settings[key]]
    if changed:
        key = changed[0]
        what = (f"{CHANGED[key]} changed since the job started" if key in CHANGED and saved.get(key)
                else f"{key} was {saved.get(key)!r} and is now {settings[key]!r}")
        raise RobertaError(f"cannot resume {out}: {what}; resume with the same model, input and settings, or "
                           "start a new directory")


def _labels(hub, head: str, width: int) -> list[str]:
    config = hub.model.config
    if config.id2label and len(config.id2label) == width and (config.head_name in (None, head)):
        return [config.id2label[i] for i in range(width)]
    return [str(i) for i in range(width)]


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun (the process group is set up here), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def load_rows(directory: str | os.PathLike) -> np.ndarray:
    """All rows of a finished job as one array, in input order. Each shard is checked against the
    checksum in the index first (a deleted, cut or damaged shard is an error naming it)."""
    directory = Path(directory)
    if not (directory / "index.json").is_file():
        raise RobertaError(f"{directory} has no index.json: the job is not finished (resume it)")
    try:
        index = read_json(directory / "index.json")
        shards = [(s["file"], s["xxh3_128"], int(s["rows"])) for s in index["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RobertaError(f"{directory / 'index.json'} is unreadable or lacks the shards' checksums ({exc}); "
                           "run the job again in a new directory") from None
    for file, checksum, rows in shards:
        _check_shard(directory / Path(file).name, checksum, rows)
    return np.concatenate([np.load(directory / Path(file).name, mmap_mode="r") for file, _, _ in shards])
