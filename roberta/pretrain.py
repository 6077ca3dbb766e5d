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

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import PackedDataset, collate, mask_tokens, masking_for, sample_rng, step_samples
from .errors import RobertaError
from .fileio import atomic_write
from .model import Dropout, RobertaConfig, RobertaForMaskedLM
from .train import (check_reproducible, PRECISIONS, Dist, Metrics, Settings, adamw, load_checkpoint, lr_at, micro_steps,
                    precision_context, prepare_run_dir, save_checkpoint, set_lr, setup_distributed, train_step,
                    unwrap, wrap_ddp, write_dir)

MODELS = ("tiny", "small", "base", "large")


@dataclass
class PretrainConfig(Settings):
    """Everything that defines a run; saved as pretrain.json in the output directory."""

    data: str = ""                        # a directory made by `roberta preprocess`
    model: str = "base"                   # architecture preset: tiny, small, base, large
    init_from: str | None = None          # continued pretraining: a model to start from (any `roberta.load` input)
    max_len: int = 512                    # tokens per sequence, <s> included
    packing: str = "full-sentences"       # or "doc-sentences" (never crosses a document boundary)
    mask_prob: float = 0.15
    whole_word: bool = False
    dropout: float = 0.1
    # optimisation
    batch_size: int = 8192                # sequences per update, over all processes and micro-steps
    micro_batch_size: int = 16            # sequences per forward pass on one process (0: from update_freq)
    update_freq: int = 0                  # micro-steps per update (0: from micro_batch_size)
    lr: float = 6e-4                      # peak learning rate, reached at the end of warmup
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    weight_decay: float = 0.01            # not on biases and LayerNorm weights
    warmup_updates: int = 24_000
    total_updates: int = 500_000
    clip_norm: float = 0.0                # max gradient norm; 0 = no clipping (the paper's setting)
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
    device: str = "auto"                  # under torchrun, each process takes the GPU of its LOCAL_RANK

    WHAT = "pretraining setting"
    RANGES = dict(max_len=(2, None), mask_prob=(1e-6, 1.0), dropout=(0.0, 0.99), batch_size=(1, None),
                  micro_batch_size=(0, None), update_freq=(0, None), lr=(0.0, None), adam_betas=(0.0, 0.999999),
                  adam_eps=(0.0, 1.0), weight_decay=(0.0, None), warmup_updates=(0, None), total_updates=(1, None),
                  clip_norm=(0.0, None), log_every=(1, None), val_every=(0, None), val_samples=(0, None),
                  save_every=(1, None), keep_last=(1, None), threads=(0, 1024), seed=(0, 2**63 - 1))
    CHOICES = dict(model=MODELS, packing=("full-sentences", "doc-sentences"), precision=PRECISIONS)

    @classmethod
    def preset(cls, name: str, **overrides) -> "PretrainConfig":
        """base/large: the paper's settings (8K sequences of 512 tokens, 500K updates).
        small: 2,000 updates of 32 x 128 tokens (measured time in the README); tiny: for tests."""
        presets = {
            "base": dict(model="base", lr=6e-4, warmup_updates=24_000, precision="bf16"),
            "large": dict(model="large", lr=4e-4, warmup_updates=30_000, precision="bf16"),
            "small": dict(model="small", max_len=128, batch_size=32, micro_batch_size=16, lr=1e-3,
                          warmup_updates=100, total_updates=2000, clip_norm=1.0, log_every=10, val_every=200,
                          val_samples=256, save_every=200),
            "tiny": dict(model="tiny", max_len=64, batch_size=16, micro_batch_size=8, lr=2e-3, warmup_updates=20,
                         total_updates=300, clip_norm=1.0, log_every=10, val_every=50, val_samples=128,
                         save_every=100),
        }
        if name not in presets:
            raise RobertaError(f"unknown preset {name!r}: choose one of {', '.join(presets)}")
        return cls.from_dict({**presets[name], **overrides})


# Settings that may change when a run is resumed: they do not alter what is computed at a step.
CHANGEABLE_ON_RESUME = {"total_updates", "log_every", "val_every", "val_samples", "save_every", "keep_last",
                        "threads", "progress", "data", "device"}


@torch.no_grad()
def evaluate(model, valid: PackedDataset, masking, cfg: PretrainConfig, micro: int, d: Dist, autocast) -> dict:
    """MLM loss, perplexity and masked-token accuracy on fixed masks of the first val_samples sequences."""
    model = unwrap(model)  # no gradient exchange here, and processes may see different counts
    model.eval()
    n = min(len(valid), cfg.val_samples)
    # every process runs the same number of batches (FSDP gathers weights in each forward); the
    # padding entries (-1) repeat sample 0 with no labels, so they count for nothing
    per_rank = -(-n // d.world)
    indices = [i if i < n else -1 for i in range(d.rank, per_rank * d.world, d.world)]
    loss_sum = correct = count = 0.0
    for start in range(0, len(indices), micro):
        pairs = []
        for j in indices[start:start + micro]:
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
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "acc": correct / max(count, 1)}


def build_model(cfg: PretrainConfig, masking, tokenizer_dir: Path, d: Dist) -> RobertaForMaskedLM:
    """A fresh model of the preset, or (continued pretraining) anything `roberta.load` opens."""
    if not cfg.init_from:
        preset = getattr(RobertaConfig, cfg.model)
        return RobertaForMaskedLM(preset(vocab_size=masking.vocab_size, max_position_embeddings=cfg.max_len + 2,
                                         hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout))
    from .hub import load
    from .tokenizer import RobertaTokenizer

    hub = load(cfg.init_from, progress=d.main, precision="fp32")  # trained on: the exact weights
    if cfg.max_len > hub.model.config.max_tokens:
        raise RobertaError(f"max_len {cfg.max_len} exceeds the {hub.model.config.max_tokens} positions of "
                           f"{cfg.init_from}: set max_len <= {hub.model.config.max_tokens}")
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
    return model


# ----------------------------------------------------------------------------------------------------
# The training script


def pretrain(cfg: PretrainConfig, out: str | Path, resume: bool | str = False) -> Path:
    """Run (or resume) a pretraining run in `out`; returns the directory of the final model."""
    from tqdm import tqdm

    out = Path(out)
    d = setup_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg, ckpt = prepare_run_dir(cfg, out, "pretrain.json", resume, CHANGEABLE_ON_RESUME)
    micro, accum = micro_steps(cfg.batch_size, cfg.micro_batch_size, cfg.update_freq, d.world)
    d.barrier()  # every process has checked the directory before the main one writes to it

    # ---- data: packed blocks, and the masking rule (which knows the special ids)
    if not cfg.data:
        raise RobertaError("no corpus given: pass --data DIR, a directory made by `roberta preprocess`")
    table = RobertaConfig().max_tokens  # checked before anything is read or allocated
    if not cfg.init_from and cfg.max_len > table:
        raise RobertaError(f"max_len {cfg.max_len} exceeds RoBERTa's {table} positions: set max_len <= {table}")
    masking = masking_for(cfg.data, cfg.whole_word, cfg.mask_prob)
    train = PackedDataset(cfg.data, "train", cfg.max_len, cfg.packing)
    valid = PackedDataset(cfg.data, "valid", cfg.max_len, cfg.packing)
    tokenizer_dir = Path(cfg.data) / "tokenizer"
    if len(train) == 0:
        raise RobertaError(f"{cfg.data} has no training text: preprocess a larger corpus")

    # ---- model: same initial weights on every process (the seed), then per-process dropout streams
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, masking, tokenizer_dir, d)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(d.device)
    torch.manual_seed(cfg.seed + 1 + d.rank)
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
    else:
        model = wrap_ddp(model, d)
    optimizer = adamw(model, cfg.lr, cfg.adam_betas, cfg.adam_eps, cfg.weight_decay, sharded=cfg.fsdp)
    autocast, scaler = precision_context(cfg.precision, d.device)
    check_reproducible(d)

    # ---- start or resume
    step = int(load_checkpoint(ckpt, model, optimizer, scaler, d)["step"]) if ckpt else 0
    metrics = Metrics(out, d.main)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "pretrain.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        metrics.truncate(step)
        n_params = sum(p.numel() for p in unwrap(model).parameters())
        start = f"resuming at update {step}" if step else f"from {cfg.init_from}" if cfg.init_from else "from scratch"
        print(f"pretraining {cfg.model} ({n_params / 1e6:.1f}M parameters) on {len(train)} sequences of <= "
              f"{cfg.max_len} tokens, batch {cfg.batch_size} = {micro} x {accum} micro-steps x "
              f"{d.world} process(es), {cfg.total_updates} updates ({cfg.warmup_updates} warmup), {start}")
    if step == 0 and cfg.val_every and len(valid):
        metrics.log(step=0, valid=evaluate(model, valid, masking, cfg, micro, d, autocast))

    bar = tqdm(total=cfg.total_updates, initial=step, unit="upd", disable=not (d.main and cfg.progress),
               dynamic_ncols=True)
    window_loss = window_steps = window_tokens = 0.0
    window_start = time.perf_counter()
    while step < cfg.total_updates:
        # this process's share of the global batch, masked for (seed, epoch, sample)
        samples = step_samples(step, cfg.batch_size, len(train), cfg.seed)
        share = samples[d.rank * accum * micro:(d.rank + 1) * accum * micro]
        batches = [collate([mask_tokens(train[i], masking, sample_rng(cfg.seed, epoch, i))
                            for epoch, i in share[m * micro:(m + 1) * micro]], masking.pad_id) for m in range(accum)]
        # the loss is the mean over every masked token of the global batch, whatever its split
        n_masked = [int((b["labels"] != -100).sum()) for b in batches]
        (n_global,) = d.all_sum([sum(n_masked)])
        lr = lr_at(step, cfg.lr, cfg.warmup_updates, cfg.total_updates)
        set_lr(optimizer, lr)
        loss, grad_norm, tokens = train_step(model, optimizer, scaler, autocast, batches,
                                             [n / max(n_global, 1) for n in n_masked], d, cfg.clip_norm, step, cfg.fsdp)
        step += 1
        window_loss, window_steps, window_tokens = window_loss + loss, window_steps + 1, window_tokens + tokens

        if step % cfg.log_every == 0 or step == cfg.total_updates:
            (all_tokens,) = d.all_sum([window_tokens])
            entry = {"step": step, "loss": window_loss / window_steps, "lr": lr,
                     "tokens_per_s": all_tokens / (time.perf_counter() - window_start), "grad_norm": grad_norm}
            metrics.log(**entry)
            bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}", lr=f"{lr:.2e}")
            window_loss = window_steps = window_tokens = 0.0
        bar.update(1)
        if cfg.val_every and len(valid) and (step % cfg.val_every == 0 or step == cfg.total_updates):
            result = evaluate(model, valid, masking, cfg, micro, d, autocast)
            metrics.log(step=step, valid=result)
            metrics.plot()
            if d.main:
                bar.write(f"update {step}: valid loss {result['loss']:.3f}, ppl {result['ppl']:.1f}, "
                          f"acc {result['acc']:.3f}")
        if step % cfg.save_every == 0 or step == cfg.total_updates:
            save_checkpoint(out, step, model, optimizer, scaler, d, cfg.keep_last, {},
                            lambda state, tmp: _write_model(model, state, cfg, tokenizer_dir, tmp))
        if step % cfg.log_every == 0:
            window_start = time.perf_counter()  # tokens/s counts training time only
    bar.close()

    # ---- the final model, where the rest of the project picks it up
    final = out / "model"
    if d.main:
        last = out / "checkpoints" / f"step-{step:08d}"
        write_dir(final, lambda tmp: [shutil.copyfile(f, tmp / f.name) for f in last.iterdir()
                                      if f.name not in ("trainer.pt", "checksums.json")])
        metrics.plot()
        print(f"model: {final}\nmetrics: {metrics.path}\nplot: {out / 'curves.png'}")
    d.barrier()
    d.close()
    return final


def _write_model(model, state: dict, cfg: PretrainConfig, tokenizer_dir: Path, directory: Path) -> None:
    """The weights (gathered from the shards under FSDP), the config and the tokenizer."""
    if cfg.fsdp:
        with torch.random.fork_rng():  # its initialisation must not move the training RNG
            host = RobertaForMaskedLM(unwrap(model).config)
        host.load_state_dict(state)
    else:
        host = unwrap(model)
    host.save_pretrained(directory)
    for f in tokenizer_dir.iterdir():  # so the checkpoint loads with its tokenizer
        if f.is_file():
            shutil.copyfile(f, directory / f.name)
