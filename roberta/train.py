"""The training layer pretraining and fine-tuning share: plain functions, no Trainer class.

    settings:    `Settings` (one vocabulary, one `--set` grammar, checked when built)
    schedule:    `lr_at` (fairseq's polynomial_decay with power 1, the RoBERTa recipe)
    optimizer:   `adamw` (no weight decay on biases and LayerNorm; the fused kernel where it is safe)
    precision:   `precision_context` (autocast, and loss scaling for fp16)
    one update:  `train_step` (accumulation over micro-batches, gradients exchanged once per update)
    processes:   `setup_distributed` (torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a plain run is rank 0 of 1)
    run folder:  `prepare_run_dir`, `save_checkpoint`, `load_checkpoint` (atomic, checksummed, with every
                 RNG for bitwise resume), `Metrics` (metrics.jsonl, truncated on resume) and `plot_curves`

`pretrain.py` and `finetune.py` are the two scripts on top of it; their loops stay their own (steps
against epochs, keep-last against keep-best).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .device import resolve_device
from .errors import RobertaError, RobertaWarning
from .fileio import atomic_write, parse_json, read_json, replace_dir

# ----------------------------------------------------------------------------------------------------
# Settings: one vocabulary and one grammar for pretraining and fine-tuning

# Names used before the two scripts shared a vocabulary; still accepted, with a message.
RENAMED = {"betas": "adam_betas", "eps": "adam_eps", "clip_grad": "clip_norm", "warmup_steps": "warmup_updates",
           "max_steps": "total_updates"}


class Settings:
    """Base of the settings dataclasses (`PretrainConfig`, `Recipe`).

    Subclasses list `RANGES` ({name: (low, high)}, both inclusive, None for open) and `CHOICES`
    ({name: allowed values}); every value is checked for its type and range when the object is built,
    so a bad setting is a one-line error before any data is read or any memory allocated.
    """
    RANGES: dict = {}
    CHOICES: dict = {}
    WHAT = "setting"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = _coerce(self, f, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            if value is None:
                continue
            low, high = self.RANGES.get(f.name, (None, None))
            for v in value if isinstance(value, tuple) and f.name in self.RANGES else (value,):
                if (low is not None and v < low) or (high is not None and v > high) or \
                        (isinstance(v, float) and not math.isfinite(v)):
                    bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
                    raise RobertaError(f"{self.WHAT} {f.name}={_show(value)} is out of range: it must be {bounds}")
            if f.name in self.CHOICES and value not in self.CHOICES[f.name]:
                raise RobertaError(f"{self.WHAT} {f.name}={value!r} is not one of {', '.join(map(str, self.CHOICES[f.name]))}")

    @classmethod
    def from_dict(cls, d: dict, quiet: bool = False):
        """Build from {name: value}; old names are renamed (with a message), unknown ones refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        out = {}
        for key, value in d.items():
            key = _new_name(key, known, quiet)
            if key not in known:
                raise RobertaError(f"unknown {cls.WHAT} {key!r}; known: {', '.join(sorted(known))}")
            out[key] = value
        return cls(**out)

    def replace(self, **changes):
        return type(self).from_dict({**self.to_dict(), **changes})

    def with_sets(self, pairs: list[str]):
        """`--set key=value` items applied in order; a value is parsed as its setting's type."""
        changes = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise RobertaError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set lr=2e-5")
            changes[key.strip()] = value.strip()
        return self.replace(**changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def help_text(cls) -> str:
        """The accepted settings with their defaults, for `--help`."""
        items = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                items.append(f"{f.name}={_show(f.default)}")
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                items.append(f"{f.name}={_show(f.default_factory())}")  # type: ignore[misc]
        return "settings for --set KEY=VALUE (defaults before a preset or recipe is applied): " + ", ".join(items)


def _new_name(key: str, known: set, quiet: bool) -> str:
    if key in RENAMED and key not in known and RENAMED[key] in known:
        if not quiet:
            print(f"note: setting {key!r} is now called {RENAMED[key]!r}; the old name still works")
        return RENAMED[key]
    return key


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _coerce(cfg, field, value):
    """`value` as the field's type: text (from --set) is parsed; other values are checked."""
    kind = str(field.type).replace(" ", "")
    optional = kind.endswith("|None")
    kind = kind.removesuffix("|None")
    original = value
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional or kind == "str":
            return None if optional else ""
        raise RobertaError(f"{cfg.WHAT} {field.name} needs a value of type {kind}")
    try:
        if kind.startswith("tuple"):
            if isinstance(value, str):
                text = value.strip().strip("[]()")
                value = [v.strip().strip("'\"") for v in text.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            item = float if "float" in kind else str
            value = tuple(item(v) if item is str or not isinstance(v, bool) else _fail(v) for v in value)
            if kind.count(",") == 1 and "..." not in kind and len(value) != 2:
                raise ValueError(value)
            return value
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, str):
                number = float(value)
                value = int(number) if number.is_integer() else _fail(value)
            elif isinstance(value, float):
                value = int(value) if value.is_integer() else _fail(value)
            elif not isinstance(value, int):
                raise ValueError(value)
            return value
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    except (TypeError, ValueError):
        raise RobertaError(f"{cfg.WHAT} {field.name}={original!r} is not a valid {kind}"
                           f"{' (e.g. 0.9,0.98)' if kind.startswith('tuple') else ''}") from None


def _fail(value):
    raise ValueError(value)


# ----------------------------------------------------------------------------------------------------
# Schedule, optimizer, precision


def lr_at(update: int, peak: float, warmup: int, total: int) -> float:
    """The learning rate of update `update` (counted from 0): fairseq's `polynomial_decay` with power 1
    and end lr 0, which RoBERTa was trained and fine-tuned with. fairseq sets the rate for the number of
    updates done so far, so the first update runs at 0 when there is warmup, the peak is reached after
    `warmup` updates and the rate is 0 from update `total` on."""
    if warmup > 0 and update <= warmup:
        return peak * update / warmup
    if update >= total:
        return 0.0
    return peak * (1 - (update - warmup) / (total - warmup))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def adamw(model, lr: float, betas, eps: float, weight_decay: float, sharded: bool = False):
    """AdamW over the trainable parameters; biases and LayerNorm weights (the 1-d ones) get no decay.
    The fused kernel updates every parameter in one pass on CPU and CUDA (it matters on CPU, where the
    50K-row embedding makes the per-tensor loop the slowest step); FSDP's sharded parameters and other
    devices take the default path."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = not sharded and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16)
                                for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


PRECISIONS = ("fp32", "bf16", "fp16")


def precision_context(precision: str, device: torch.device):
    """The autocast context for the forward passes and the gradient scaler (active for fp16 only,
    whose small range needs dynamic loss scaling; bf16 has float32's range)."""
    if precision not in PRECISIONS:
        raise RobertaError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")
    return autocast, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def micro_steps(batch_size: int, micro_batch_size: int, update_freq: int, world: int) -> tuple[int, int]:
    """(sequences per forward pass on one process, micro-steps per update) for a global batch.
    Give either the micro-batch size or update_freq (0 = derive it from the other)."""
    if micro_batch_size and update_freq:
        if micro_batch_size * update_freq * world != batch_size:
            raise RobertaError(f"batch_size {batch_size} != micro_batch_size {micro_batch_size} x update_freq "
                               f"{update_freq} x {world} process(es): set one of micro_batch_size, update_freq to 0")
        return micro_batch_size, update_freq
    if micro_batch_size:
        per_step = micro_batch_size * world
        if batch_size % per_step:
            raise RobertaError(f"batch_size {batch_size} is not a multiple of micro_batch_size x processes = "
                               f"{per_step}: change one of them")
        return micro_batch_size, batch_size // per_step
    update_freq = update_freq or 1
    if batch_size % (update_freq * world):
        raise RobertaError(f"batch_size {batch_size} is not a multiple of update_freq x processes = "
                           f"{update_freq * world}: change one of them")
    return batch_size // (update_freq * world), update_freq


# ----------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owned: bool = False  # the process group was started by `setup_distributed`, so the run ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """End the process group this run started, after its last barrier. Left to the interpreter's
        exit, gloo's worker threads can outlive its teardown and abort a process that succeeded
        (SIGABRT, "terminate called without an active exception")."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def all_gather(self, value) -> list:
        """Every process's `value` (any picklable object), in rank order."""
        if self.world == 1:
            return [value]
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: str | None = "auto") -> Dist:
    """This process's place: under torchrun each process takes the GPU of its LOCAL_RANK."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    chosen = resolve_device(device)
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    owned = world > 1 and not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Dist(rank, world, chosen, owned)


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model, d: Dist):
    if d.world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------------------
# One update


def train_step(model, optimizer, scaler, autocast, batches: list[dict], weights: list[float], d: Dist,
               clip_norm: float, step: int, fsdp: bool = False) -> tuple[float, float, int]:
    """Forward and backward every micro-batch of this process, then one optimizer step.

    `weights[m]` is micro-batch m's share of the whole update (its masked tokens or examples over the
    global batch's), so that 4 micro-batches of 8 give the gradient of one batch of 32 and N processes
    that of one process; DDP averages over processes, hence the factor `world`. Gradients are exchanged
    once, on the last micro-batch. Returns (the update's loss, the gradient norm, tokens processed).
    """
    step_loss, tokens = 0.0, 0
    for m, batch in enumerate(batches):
        batch = {k: v.to(d.device) for k, v in batch.items()}
        sync = m == len(batches) - 1
        if fsdp:
            model.set_requires_gradient_sync(sync)
        no_sync = model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not sync \
            else contextlib.nullcontext()
        with no_sync:
            with autocast:
                out = model(**batch)
            scaler.scale(out.loss * (weights[m] * d.world)).backward()
        step_loss += float(out.loss.detach()) * weights[m]
        tokens += int(batch["attention_mask"].sum())
    (step_loss,) = d.all_sum([step_loss])
    if not math.isfinite(step_loss):
        raise RobertaError(f"the loss became {step_loss} at update {step}: resume from the last checkpoint "
                           "with a lower lr, more warmup, clip_norm > 0 or bf16 instead of fp16")
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm > 0 else float("inf")))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, tokens


# ----------------------------------------------------------------------------------------------------
# The run directory: settings, checkpoints, metrics


def prepare_run_dir(cfg: Settings, out: Path, settings_file: str, resume: bool | str, changeable: set[str]):
    """Check the output directory; on resume return the saved settings and the checkpoint to load."""
    saved = out / settings_file
    if out.exists() and not out.is_dir():
        raise RobertaError(f"--out {out} is a file: choose a new or empty directory")
    if not resume:
        if saved.exists():
            raise RobertaError(f"{out} holds another run: pass --resume to continue it, or choose another --out")
        if out.exists() and any(out.iterdir()):
            raise RobertaError(f"{out} is not empty: choose an empty or new --out directory")
        return cfg, None
    if not saved.exists():
        raise RobertaError(f"nothing to resume in {out} (no {settings_file}): start a run there without --resume")
    run_cfg = read_settings(type(cfg), saved)
    ours, theirs = cfg.to_dict(), run_cfg.to_dict()
    changed = sorted({k for k in ours if theirs[k] != ours[k]} - changeable)
    if changed:
        command = {"pretrain.json": f"roberta pretrain --out {out} --resume",
                   "recipe.json": f"roberta finetune --task {theirs.get('task')} --data DATA --model MODEL --out {out} "
                                  "--resume"}.get(settings_file, f"--resume with the settings in {saved}")
        differ = ", ".join(f"{k} is {theirs[k]!r} in the run, {ours[k]!r} here" for k in changed)
        raise RobertaError(f"cannot resume {out} with other settings: {differ}; `{command}` continues it with its "
                           f"own (only {', '.join(sorted(changeable))} may change)")
    run_cfg = run_cfg.replace(**{k: ours[k] for k in changeable})
    checkpoints = list_checkpoints(out)
    if isinstance(resume, str):
        ckpt = Path(resume)
        if not (ckpt / "trainer.pt").is_file():
            raise RobertaError(f"checkpoint {ckpt} does not exist or is incomplete: pass one of "
                               f"{', '.join(str(c) for c in checkpoints) or '(none saved yet)'}")
        newer = [c for c in checkpoints if step_of(c) > step_of(ckpt)]
        if newer:
            raise RobertaError(f"{len(newer)} checkpoint(s) newer than {ckpt.name} exist; move them out of "
                               f"{out / 'checkpoints'} to resume from an older one")
        return run_cfg, ckpt
    return run_cfg, (checkpoints[-1] if checkpoints else None)


def read_settings(cls, path: Path):
    """A run's saved settings file, checked as if typed in."""
    try:
        settings = read_json(path)
    except RobertaError as exc:
        raise RobertaError(f"{path} is not a valid settings file ({str(exc).removeprefix(f'{path} is ')}): "
                           "restore it, or start a new run in another --out") from None
    try:
        return cls.from_dict(settings, quiet=True)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise RobertaError(f"{path} is not a valid settings file ({type(exc).__name__}: {str(exc)[:100]}): "
                           "restore it, or start a new run in another --out") from None


def step_of(ckpt: Path) -> int:
    try:
        return int(ckpt.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A half-written one has no final name; anything else that is
    not `step-<number>` (a stray file or folder) is not a checkpoint and is left alone."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and step_of(p) >= 0),
                  key=step_of)


def rng_state(d: Dist) -> torch.Tensor:
    """Each process's torch generator (dropout), gathered to one [world, n] tensor."""
    state = torch.get_rng_state()
    if d.device.type == "cuda":
        state = torch.cat([state, torch.cuda.get_rng_state(d.device)])
    if d.world == 1:
        return state[None]
    gathered = [torch.empty_like(state, device=d.device) for _ in range(d.world)]
    dist.all_gather(gathered, state.to(d.device))
    return torch.stack([g.cpu() for g in gathered])


CHECKSUMS = "checksums.json"


def write_dir(final: Path, write) -> None:
    """Build a directory with `write(tmp)` and record the SHA-256 of every file; it replaces `final`
    whole (`fileio.replace_dir`), so the directory under its final name is complete or absent."""
    with replace_dir(final) as tmp:
        write(tmp)
        sums = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        atomic_write(tmp / CHECKSUMS, json.dumps(sums, indent=1) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_dir(ckpt: Path) -> None:
    """Every file of a checkpoint against its recorded SHA-256: a flipped bit is found before use."""
    fix = "remove it to resume from the one before, or start a new run"
    try:
        sums = read_json(ckpt / CHECKSUMS)
    except RobertaError:
        raise RobertaError(f"checkpoint {ckpt} is unreadable (no valid {CHECKSUMS}); {fix}") from None
    for name, digest in sums.items():
        if not (ckpt / name).is_file() or _sha256(ckpt / name) != digest:
            raise RobertaError(f"checkpoint {ckpt} is unreadable: {name} does not match its checksum "
                               f"(a flipped bit or a partial copy); {fix}")


def numerics(d: Dist) -> dict:
    """What decides a CPU run's float rounding besides the code and the data: recorded in each checkpoint
    so that a resume under other conditions says so (a GPU run records nothing here)."""
    if d.device.type != "cpu":
        return {}
    from . import runtime
    from .inference import cpu_name

    return {"threads": torch.get_num_threads(), "cpu": cpu_name(), "torch": str(torch.__version__),
            "capability": torch.backends.cpu.get_cpu_capability(), "mkl_paths": runtime.mkl_paths()}


def check_reproducible(d: Dist) -> None:
    """Say at the start, not after, when a CPU run cannot be resumed bitwise: MKL's float32 products
    depend on buffer alignment unless its reproducible mode was set before it loaded (roberta/runtime.py
    sets it when `roberta` is imported before torch, and the command line always is)."""
    if d.device.type == "cpu" and not os.environ.get("MKL_CBWR"):
        warnings.warn("MKL's reproducible mode is off (torch was imported before roberta and MKL_CBWR is unset): "
                      "a resumed run may differ from an uninterrupted one in the last bits; import roberta first "
                      "or set MKL_CBWR=AUTO,STRICT", RobertaWarning, stacklevel=2)


def save_checkpoint(out: Path, step: int, model, optimizer, scaler, d: Dist, keep_last: int, state: dict,
                    write_model) -> None:
    """checkpoints/step-N: the weights (written by `write_model(model_state, directory)`), the optimizer,
    the loss scale, every process's RNG and the loop's own `state`; atomic and checksummed."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = rng_state(d)  # a collective: every process takes part
    if not d.main:
        return

    def write(tmp: Path):
        write_model(model_state, tmp)
        torch.save({"step": step, "optimizer": optim_state, "scaler": scaler.state_dict(), "rng": rng,
                    "numerics": numerics(d), **state}, tmp / "trainer.pt")

    write_dir(out / "checkpoints" / f"step-{step:08d}", write)
    for old in list_checkpoints(out)[:-keep_last]:
        if old.is_symlink():  # a checkpoint linked in from elsewhere: drop the link, not what it points to
            old.unlink()
        else:
            shutil.rmtree(old)


def load_checkpoint(ckpt: Path, model, optimizer, scaler, d: Dist) -> dict:
    """Verify, then restore weights, optimizer, loss scale and this process's RNG; returns trainer.pt."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    verify_dir(ckpt)
    try:
        model_state = load_file(str(ckpt / "model.safetensors"))
        trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=trainer["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    except Exception as exc:  # a foreign file fails in many ways; all mean the same here
        raise RobertaError(f"checkpoint {ckpt} is unreadable ({type(exc).__name__}: {str(exc)[:200]}); "
                           "remove it to resume from the one before, or start a new run") from None
    scaler.load_state_dict(trainer["scaler"])
    changed = {k: (v, numerics(d).get(k)) for k, v in (trainer.get("numerics") or {}).items() if numerics(d).get(k) != v}
    if changed:
        warnings.warn(f"this resume differs from the run in {', '.join(f'{k} ({a} then, {b} now)' for k, (a, b) in changed.items())}: "
                      "CPU kernels round by it, so the resumed run may differ from an uninterrupted one in the last bits"
                      + ("; pass --threads " + str(changed["threads"][0]) + " for a bitwise-exact resume" if "threads" in changed else ""),
                      RobertaWarning, stacklevel=2)
    rng = trainer["rng"]
    if rng.shape[0] == d.world:  # the same number of processes: continue every generator exactly
        n = torch.get_rng_state().numel()
        mine = rng[d.rank]  # copies below: set_rng_state reads the storage, not the view
        torch.set_rng_state(mine[:n].clone())
        if d.device.type == "cuda":
            torch.cuda.set_rng_state(mine[n:].clone(), d.device)
    return trainer


class Metrics:
    """metrics.jsonl (one JSON object per logged update or evaluation) and curves.png, written by the
    main process. Training rows hold "loss", "lr", "tokens_per_s", "grad_norm"; evaluation rows a
    dictionary under the split's name ("valid" in pretraining, "dev" in fine-tuning)."""

    def __init__(self, out: Path, enabled: bool):
        self.path, self.enabled = out / "metrics.jsonl", enabled

    def truncate(self, step: int) -> None:
        """On resume, drop entries the interrupted run logged after its last checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines() if step else []:
            try:
                if parse_json(line)["step"] <= step:
                    keep.append(line)
            except (RobertaError, KeyError, TypeError):  # a line cut by the kill
                continue
        atomic_write(self.path, "".join(line + "\n" for line in keep))

    def log(self, **entry) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def plot(self) -> None:
        if self.enabled and self.path.exists():
            plot_curves(self.path, self.path.parent / "curves.png")


def plot_curves(metrics: Path, png: Path) -> None:
    """Training and evaluation loss, every other evaluation metric, and the learning rate, by update."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [parse_json(line, f"{metrics} line {number}", kind=dict)
            for number, line in enumerate(Path(metrics).read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [(r["step"], split, r[split]) for r in rows for split in ("valid", "dev") if split in r]
    fig, (ax_loss, ax_eval, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    names = sorted({k for _, _, m in evals for k in m})
    for name in names:
        points = [(s, m[name]) for s, _, m in evals if isinstance(m.get(name), (int, float))]
        if not points:
            continue
        ax = ax_loss if name == "loss" else ax_eval
        if name in ("ppl", "mse"):
            continue
        ax.plot(*zip(*points), "o-", label=f"{evals[0][1]} {name}")
    ax_loss.set(xlabel="update", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_eval.set(xlabel="update", title="evaluation")
    if len(names) > 1:
        ax_eval.legend()
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax_lr.set(xlabel="update", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=80)
    plt.close(fig)
    atomic_write(png, image.getvalue())
