"""Masked-LM pretraining, the RoBERTa recipe, as one script: data, model, optimizer, schedule, loop.

    config = PretrainConfig.preset("small", data="corpus-dir")
    pretrain(config, "runs/small")            # or, on many processes: torchrun ... -m roberta pretrain

The recipe (Liu et al., 2019, section 4 and table 9): masked LM only (no next-sentence task), masks
drawn afresh each time a sequence is seen, FULL-SENTENCES inputs of up to 512 tokens, large batches
reached by gradient accumulation, AdamW (0.9, 0.98, eps 1e-6, decay 0.01), linear warmup then linear
decay. The global batch of step s is a pure function of (seed, s), and every random draw the model
makes is restored from the checkpoint, so a resumed run ends with bitwise the same weights on CPU.

The output directory holds pretrain.json (this config), metrics.jsonl, curves.png,
checkpoints/step-NNNNNNNN/ (the last `keep_last`, each written to a temporary directory and renamed)
and, at the end, model/ (weights, config and tokenizer, ready for `RobertaForMaskedLM.from_pretrained`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from .data import PackedDataset, collate, mask_tokens, masking_for, sample_rng, step_samples
from .errors import RobertaError
from .fileio import atomic_write
from .model import Dropout, RobertaConfig, RobertaForMaskedLM


@dataclass
class PretrainConfig:
    """Everything that defines a run; saved as pretrain.json in the output directory."""

    data: str = ""                        # a directory made by `roberta preprocess`
    model: str = "base"                   # architecture preset: tiny, small, base, large
    init_from: str | None = None          # continued pretraining: a checkpoint directory to start from
    max_len: int = 512                    # tokens per sequence, <s> included
    packing: str = "full-sentences"       # or "doc-sentences" (never crosses a document boundary)
    mask_prob: float = 0.15
    whole_word: bool = False
    dropout: float = 0.1
    # optimisation
    batch_size: int = 8192                # sequences per update, over all processes and micro-steps
    micro_batch_size: int = 16            # sequences per forward pass on one process
    lr: float = 6e-4                      # peak learning rate, reached at the end of warmup
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01            # not on biases and LayerNorm weights
    warmup_steps: int = 24_000
    max_steps: int = 500_000
    clip_grad: float = 0.0                # max gradient norm; 0 = no clipping (the paper's setting)
    precision: str = "fp32"               # fp32, bf16, or fp16 (with dynamic loss scaling)
    activation_checkpointing: bool = False
    fsdp: bool = False                    # shard parameters and optimizer state (large models, many GPUs)
    # operations
    seed: int = 0
    log_every: int = 10
    val_every: int = 1000
    val_samples: int = 2048               # validation sequences used for each evaluation
    save_every: int = 1000
    keep_last: int = 3
    threads: int = 0                      # CPU threads per process; 0 = PyTorch's default
    progress: bool = True

    @classmethod
    def preset(cls, name: str, **overrides) -> "PretrainConfig":
        """base/large: the paper's settings (8K sequences of 512 tokens, 500K steps).
        small/tiny: minutes on a laptop CPU."""
        presets = {
            "base": dict(model="base", lr=6e-4, warmup_steps=24_000, precision="bf16"),
            "large": dict(model="large", lr=4e-4, warmup_steps=30_000, precision="bf16"),
            "small": dict(model="small", max_len=128, batch_size=32, micro_batch_size=16, lr=1e-3,
                          warmup_steps=100, max_steps=2000, clip_grad=1.0, log_every=10, val_every=200,
                          val_samples=256, save_every=200),
            "tiny": dict(model="tiny", max_len=64, batch_size=16, micro_batch_size=8, lr=2e-3, warmup_steps=20,
                         max_steps=300, clip_grad=1.0, log_every=10, val_every=50, val_samples=128, save_every=100),
        }
        if name not in presets:
            raise RobertaError(f"unknown preset {name!r}: choose one of {', '.join(presets)}")
        return cls.from_dict({**presets[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise RobertaError(f"unknown pretraining setting(s) {', '.join(sorted(unknown))}; "
                               f"known: {', '.join(fields)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def set(self, key: str, value: str) -> "PretrainConfig":
        """Override one setting from its text form (`--set lr=3e-4`), parsed as the field's type."""
        field = {f.name: f for f in dataclasses.fields(self)}.get(key)
        if field is None:
            raise RobertaError(f"unknown pretraining setting {key!r}; known: "
                               f"{', '.join(f.name for f in dataclasses.fields(self))}")
        current = getattr(self, key)
        try:
            if isinstance(current, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                parsed = value.lower() in ("true", "1")
            elif isinstance(current, tuple):
                parsed = tuple(float(v) for v in value.split(","))
            elif isinstance(current, int):
                parsed = int(float(value)) if "e" in value.lower() else int(value)
            elif isinstance(current, float):
                parsed = float(value)
            else:  # str or None
                parsed = None if value.lower() == "none" and key == "init_from" else value
        except ValueError:
            raise RobertaError(f"--set {key}={value}: expected a value of type {type(current).__name__}") from None
        return dataclasses.replace(self, **{key: parsed})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings that may change when a run is resumed: they do not alter what is computed at a step.
CHANGEABLE_ON_RESUME = {"max_steps", "log_every", "val_every", "val_samples", "save_every", "keep_last",
                        "threads", "progress", "data"}


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup to the peak, then linear decay to zero at max_steps (the paper's schedule)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - cfg.warmup_steps))


# ----------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain run is rank 0 of 1.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


# ----------------------------------------------------------------------------------------------------
# The run directory and its checkpoints


def prepare_run_dir(cfg: PretrainConfig, out: Path, resume: bool | str) -> tuple[PretrainConfig, Path | None]:
    """Check the output directory; on resume return the saved config and the checkpoint to load."""
    saved = out / "pretrain.json"
    if not resume:
        if saved.exists():
            raise RobertaError(f"{out} holds another run: pass --resume to continue it, or choose another --out")
        if out.exists() and any(out.iterdir()):
            raise RobertaError(f"{out} is not empty: choose an empty or new --out directory")
        return cfg, None
    if not saved.exists():
        raise RobertaError(f"nothing to resume in {out} (no pretrain.json): start a run there without --resume")
    run_cfg = PretrainConfig.from_dict(json.loads(saved.read_text()))
    changed = {k for k, v in cfg.to_dict().items() if run_cfg.to_dict()[k] != v} - CHANGEABLE_ON_RESUME
    if changed:
        raise RobertaError(f"settings {', '.join(sorted(changed))} differ from the run in {out}; "
                           f"resume with its pretrain.json (only {', '.join(sorted(CHANGEABLE_ON_RESUME))} may change)")
    run_cfg = dataclasses.replace(run_cfg, **{k: getattr(cfg, k) for k in CHANGEABLE_ON_RESUME})
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


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[1])


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first; a half-written one has no final name and is ignored."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith("step-")), key=step_of)


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


def save_checkpoint(out: Path, step: int, model, optimizer, scaler, d: Dist, cfg: PretrainConfig,
                    tokenizer_dir: Path) -> None:
    """Write checkpoints/step-N atomically: build it under a temporary name, then rename."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = rng_state(d)  # a collective: every process takes part
    if not d.main:
        return
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if cfg.fsdp:  # the shards were gathered above; a plain copy of the model writes them
        with torch.random.fork_rng():  # its initialisation must not move the training RNG
            host = RobertaForMaskedLM(unwrap(model).config)
        host.load_state_dict(model_state)
    else:
        host = unwrap(model)
    host.save_pretrained(tmp)
    for f in tokenizer_dir.iterdir():  # so the checkpoint loads with its tokenizer
        if f.is_file():
            shutil.copyfile(f, tmp / f.name)
    torch.save({"step": step, "optimizer": optim_state, "scaler": scaler.state_dict(), "rng": rng},
               tmp / "trainer.pt")
    if os.environ.get("ROBERTA_TEST_STALL_CHECKPOINT") == str(step):  # lets a test kill -9 mid-write
        time.sleep(60)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)  # only after a resume from an older checkpoint
    os.replace(tmp, final)
    for old in list_checkpoints(out)[:-cfg.keep_last]:
        shutil.rmtree(old)


def load_checkpoint(ckpt: Path, model, optimizer, scaler, d: Dist) -> int:
    """Restore weights, optimizer, loss scale and this process's RNG; returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    try:
        model_state = load_file(str(ckpt / "model.safetensors"))
        trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
        step = int(trainer["step"])
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=trainer["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    except Exception as exc:  # a truncated or foreign file fails in many ways; all mean the same here
        raise RobertaError(f"checkpoint {ckpt} is unreadable ({type(exc).__name__}: {str(exc)[:200]}); "
                           "remove it to resume from the one before, or start a new run") from None
    scaler.load_state_dict(trainer["scaler"])
    rng = trainer["rng"]
    if rng.shape[0] == d.world:  # the same number of processes: continue every generator exactly
        n = torch.get_rng_state().numel()
        state = rng[d.rank]  # copies below: set_rng_state reads the storage, not the view (rank > 0 crashed)
        torch.set_rng_state(state[:n].clone())
        if d.device.type == "cuda":
            torch.cuda.set_rng_state(state[n:].clone(), d.device)
    return step


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """metrics.jsonl (one JSON object per logged step) and curves.png, written by the main process."""

    def __init__(self, out: Path, enabled: bool):
        self.path, self.enabled = out / "metrics.jsonl", enabled

    def truncate(self, step: int) -> None:
        """On resume, drop entries the interrupted run logged after its last checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step] \
            if step else []
        atomic_write(self.path, "".join(line + "\n" for line in keep))

    def log(self, **entry) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def plot(self) -> None:
        if self.enabled and self.path.exists():
            plot_curves(self.path, self.path.parent / "curves.png")


def plot_curves(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    train = [r for r in rows if "loss" in r]
    valid = [r for r in rows if "val_loss" in r]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    ax_loss.plot([r["step"] for r in valid], [r["val_loss"] for r in valid], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="MLM loss", title="loss")
    ax_loss.legend()
    ax_acc.plot([r["step"] for r in valid], [r["val_acc"] for r in valid], "o-")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="masked-token accuracy (validation)")
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=80)
    plt.close(fig)
    atomic_write(png, image.getvalue())


@torch.no_grad()
def evaluate(model, valid: PackedDataset, masking, cfg: PretrainConfig, d: Dist, autocast) -> dict:
    """MLM loss, perplexity and masked-token accuracy on fixed masks of the first val_samples sequences."""
    model = unwrap(model)  # no gradient exchange here, and processes may see different counts
    model.eval()
    n = min(len(valid), cfg.val_samples)
    # every process runs the same number of batches (FSDP gathers weights in each forward); the
    # padding entries (-1) repeat sample 0 with no labels, so they count for nothing
    per_rank = -(-n // d.world)
    indices = [i if i < n else -1 for i in range(d.rank, per_rank * d.world, d.world)]
    loss_sum = correct = count = 0.0
    for start in range(0, len(indices), cfg.micro_batch_size):
        pairs = []
        for j in indices[start:start + cfg.micro_batch_size]:
            inputs, labels = mask_tokens(valid[max(j, 0)], masking, sample_rng(cfg.seed, 0, max(j, 0)))
            pairs.append((inputs, labels if j >= 0 else np.full_like(labels, -100)))
        batch = {k: v.to(d.device) for k, v in collate(pairs, masking.pad_id).items()}
        with autocast:
            out = model(**batch)
        targets = batch["labels"][batch["labels"] != -100]
        loss_sum += float(out.loss) * len(targets)
        correct += float((out.logits.argmax(-1) == targets).sum())
        count += len(targets)
    model.train()
    loss_sum, correct, count = d.all_sum([loss_sum, correct, count])
    val_loss = loss_sum / max(count, 1)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)), "val_acc": correct / max(count, 1)}


# ----------------------------------------------------------------------------------------------------
# The training script


def pretrain(cfg: PretrainConfig, out: str | Path, resume: bool | str = False) -> Path:
    """Run (or resume) a pretraining run in `out`; returns the directory of the final model."""
    from tqdm import tqdm

    out = Path(out)
    d = setup_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg, ckpt = prepare_run_dir(cfg, out, resume)
    d.barrier()  # every process has checked the directory before the main one writes to it

    # ---- data: packed blocks, and the masking rule (which knows the special ids)
    if not cfg.data:
        raise RobertaError("no corpus given: pass --data DIR, a directory made by `roberta preprocess`")
    train = PackedDataset(cfg.data, "train", cfg.max_len, cfg.packing)
    valid = PackedDataset(cfg.data, "valid", cfg.max_len, cfg.packing)
    masking = masking_for(cfg.data, cfg.whole_word, cfg.mask_prob)
    tokenizer_dir = Path(cfg.data) / "tokenizer"
    per_step = cfg.micro_batch_size * d.world
    if cfg.batch_size % per_step:
        raise RobertaError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size x processes = "
                           f"{per_step}: change one of them")
    accum = cfg.batch_size // per_step  # micro-steps per update on each process
    if len(train) == 0:
        raise RobertaError(f"{cfg.data} has no training text: preprocess a larger corpus")

    # ---- model: same initial weights on every process (the seed), then per-process dropout streams
    torch.manual_seed(cfg.seed)
    if cfg.init_from:  # continued pretraining: anything roberta.load reads (name, directory, archive)
        from .hub import load
        from .tokenizer import RobertaTokenizer

        hub = load(cfg.init_from, progress=d.main, precision="fp32")  # trained on: the exact weights
        if hub.tokenizer.get_vocab() != RobertaTokenizer.from_pretrained(tokenizer_dir).get_vocab():
            raise RobertaError(f"{cfg.data} was tokenized with another vocabulary than {cfg.init_from}: "
                               f"preprocess the corpus with --vocab pointing at the model's tokenizer")
        model = hub.model.train()
        for p in model.classification_heads.parameters():  # kept as they are: pretraining trains the LM
            p.requires_grad_(False)
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = cfg.dropout
        for m in model.modules():
            if isinstance(m, Dropout):
                m.p = cfg.dropout
            elif hasattr(m, "dropout_p"):
                m.dropout_p = cfg.dropout
    else:
        preset = getattr(RobertaConfig, cfg.model, None) if cfg.model in ("tiny", "small", "base", "large") else None
        if preset is None:
            raise RobertaError(f"unknown model preset {cfg.model!r}: choose tiny, small, base or large")
        model = RobertaForMaskedLM(preset(vocab_size=masking.vocab_size, max_position_embeddings=cfg.max_len + 2,
                                          hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout))
    if cfg.max_len > model.config.max_tokens:
        raise RobertaError(f"max_len {cfg.max_len} exceeds the model's {model.config.max_tokens} positions: "
                           f"set max_len <= {model.config.max_tokens}")
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(d.device)
    torch.manual_seed(cfg.seed + 1 + d.rank)

    # ---- optimizer: AdamW, no weight decay on biases and LayerNorm weights (the 1-d parameters)
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.roberta.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        # FSDP initialises itself in the first forward and draws from the RNG there; do it now, with
        # the RNG put back, so that a resumed run's dropout continues exactly where it stopped
        with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []), torch.no_grad():
            model(torch.tensor([[masking.mask_id, masking.mask_id]], device=d.device))
        model.reshard()  # back to the sharded parameters the optimizer must hold
    elif d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device] if d.device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # the fused kernel updates every parameter in one pass (CPU and CUDA, float32 and bf16 weights);
    # FSDP's sharded parameters and other devices take the default multi-tensor path
    fused = not cfg.fsdp and d.device.type in ("cpu", "cuda") and all(
        p.dtype in (torch.float32, torch.bfloat16) for p in params)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        raise RobertaError(f"precision {cfg.precision!r} is not one of fp32, bf16, fp16")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    autocast = torch.autocast(d.device.type, dtype=dtype, enabled=cfg.precision != "fp32")
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16")  # fp16 needs loss scaling

    # ---- start or resume
    step = load_checkpoint(ckpt, model, optimizer, scaler, d) if ckpt else 0
    metrics = Metrics(out, d.main)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "pretrain.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        metrics.truncate(step)
        n_params = sum(p.numel() for p in unwrap(model).parameters())
        print(f"pretraining {cfg.model} ({n_params / 1e6:.1f}M parameters) on {len(train)} sequences of <= "
              f"{cfg.max_len} tokens, batch {cfg.batch_size} = {cfg.micro_batch_size} x {accum} micro-steps x "
              f"{d.world} process(es), {'resuming at step ' + str(step) if step else 'from scratch'}")
    if step == 0 and cfg.val_every and len(valid):
        metrics.log(step=0, **evaluate(model, valid, masking, cfg, d, autocast))

    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", disable=not (d.main and cfg.progress),
               dynamic_ncols=True)
    window_loss = window_steps = window_tokens = 0.0
    window_start = time.perf_counter()
    while step < cfg.max_steps:
        # this process's share of the global batch, masked for (seed, epoch, sample)
        samples = step_samples(step, cfg.batch_size, len(train), cfg.seed)
        share = samples[d.rank * accum * cfg.micro_batch_size:(d.rank + 1) * accum * cfg.micro_batch_size]
        batches = [collate([mask_tokens(train[i], masking, sample_rng(cfg.seed, epoch, i))
                            for epoch, i in share[m * cfg.micro_batch_size:(m + 1) * cfg.micro_batch_size]],
                           masking.pad_id) for m in range(accum)]
        # the loss is the mean over every masked token of the global batch, whatever its split
        n_masked = [int((b["labels"] != -100).sum()) for b in batches]
        (n_global,) = d.all_sum([sum(n_masked)])

        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for m, batch in enumerate(batches):
            batch = {k: v.to(d.device) for k, v in batch.items()}
            sync = m == accum - 1  # gradients are exchanged once per update, not per micro-step
            no_sync = model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not sync \
                else contextlib.nullcontext()
            if cfg.fsdp:
                model.set_requires_gradient_sync(sync)
            with no_sync:
                with autocast:
                    out_ = model(**batch)
                # DDP averages gradients over processes, hence the factor world
                loss = out_.loss * (n_masked[m] * d.world / max(n_global, 1))
                scaler.scale(loss).backward()
            step_loss += float(out_.loss.detach()) * n_masked[m]
            window_tokens += int(batch["attention_mask"].sum())
        step_loss, tokens = d.all_sum([step_loss / max(n_global, 1), window_tokens])
        if not math.isfinite(step_loss):
            raise RobertaError(f"the loss became {step_loss} at step {step}: resume from the last checkpoint "
                               "with a lower lr, more warmup, clip_grad > 0 or bf16 instead of fp16")
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad if cfg.clip_grad > 0 else float("inf")))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_loss += step_loss
        window_steps += 1

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            entry = {"step": step, "loss": window_loss / window_steps, "lr": lr,
                     "tokens_per_s": tokens / elapsed, "grad_norm": grad_norm}
            metrics.log(**entry)
            bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}", lr=f"{lr:.2e}")
            window_loss = window_steps = window_tokens = 0.0
            window_start = time.perf_counter()
        bar.update(1)
        if cfg.val_every and len(valid) and (step % cfg.val_every == 0 or step == cfg.max_steps):
            result = evaluate(model, valid, masking, cfg, d, autocast)
            metrics.log(step=step, **result)
            metrics.plot()
            if d.main:
                bar.write(f"step {step}: val_loss {result['val_loss']:.3f}, ppl {result['val_ppl']:.1f}, "
                          f"acc {result['val_acc']:.3f}")
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save_checkpoint(out, step, model, optimizer, scaler, d, cfg, tokenizer_dir)
        if step % cfg.log_every == 0:
            window_start = time.perf_counter()  # tokens/s counts training time only
    bar.close()

    # ---- the final model, where the rest of the project picks it up
    final = out / "model"
    if d.main:
        last = out / "checkpoints" / f"step-{step:08d}"
        tmp = out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(last, tmp, ignore=shutil.ignore_patterns("trainer.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        metrics.plot()
        print(f"model: {final}\nmetrics: {metrics.path}\nplot: {out / 'curves.png'}")
    d.barrier()
    return final
