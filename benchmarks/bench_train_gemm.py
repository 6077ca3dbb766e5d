"""fp32 training steps with each CPU GEMM: does training gain from the kernel inference measures faster?

Inference picks, per weight shape, the faster of MKL's sgemm (`F.linear`) and oneDNN (`roberta.kernels`).
Training keeps `F.linear`, whose backward is MKL too. This times one fp32 training step (forward,
backward, fused AdamW) of a masked-LM of base width on random full-length batches, alternating two
ways of running every dense layer's three products (y = x W^T + b, dx = dy W, dW = dy^T x):
- mkl: `F.linear` and its autograd backward (what training runs);
- onednn: all three through oneDNN's inner product (`torch.ops.mkldnn._linear_pointwise`), the
  backward's operands transposed into the layout it takes (a copy each).
The medians of alternated steps are printed with the CPU, so the choice for training rests on a figure.

    PYTHONPATH=. python benchmarks/bench_train_gemm.py --layers 4 --batch 8 --length 128 --steps 6
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from common import cpu_line, median


class OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with the forward and both backward products on oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.ops.mkldnn._linear_pointwise(x2, weight.contiguous(), bias, "none", [], "")
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dy = grad.reshape(-1, grad.shape[-1]).contiguous()
        x2 = x.reshape(-1, x.shape[-1])
        dx = torch.ops.mkldnn._linear_pointwise(dy, weight.t().contiguous(), None, "none", [], "")
        dw = torch.ops.mkldnn._linear_pointwise(dy.t().contiguous(), x2.t().contiguous(), None, "none", [], "")
        return dx.view(x.shape), dw, dy.sum(0)


def onednn_linear(x, weight, bias):
    return OneDNNLinear.apply(x, weight, bias) if torch.is_grad_enabled() else F.linear(x, weight, bias)


def main() -> None:
    from roberta import RobertaConfig, RobertaForMaskedLM, kernels
    from roberta.train import adamw

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = RobertaConfig.base(num_hidden_layers=args.layers, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = RobertaForMaskedLM(config).train()
    optimizer = adamw(model, 1e-4, (0.9, 0.98), 1e-6, 0.01)
    ids = torch.randint(4, config.vocab_size, (args.batch, args.length))
    labels = torch.where(torch.rand(ids.shape) < 0.15, ids, -100)
    plain = kernels.linear
    ways = {"mkl": plain, "onednn": onednn_linear}

    def step(way):
        kernels.linear = ways[way]
        start = time.perf_counter()
        model(ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    # the two agree (to float rounding) before anything is timed
    kernels.linear = onednn_linear
    a = model(ids, labels=labels).loss
    a.backward()
    ga = model.lm_head.dense.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    kernels.linear = plain
    b = model(ids, labels=labels).loss
    b.backward()
    gb = model.lm_head.dense.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    print(f"loss mkl {b.item():.6f} onednn {a.item():.6f}; lm_head.dense grad max diff {(ga - gb).abs().max().item():.2e}")

    times = {way: [] for way in ways}
    for way in ways:
        step(way)  # warm-up
    for _ in range(args.steps):
        for way in ways:
            times[way].append(step(way))
    kernels.linear = plain
    print(f"{cpu_line()}; load average {os.getloadavg()[0]:.2f}")
    print(f"base width, {args.layers} layers, batch {args.batch} x {args.length} tokens, fp32, {args.threads} threads")
    tokens = args.batch * args.length
    for way, t in times.items():
        print(f"{way:<7} median step {median(t):.3f} s ({tokens / median(t):.0f} tokens/s); steps: "
              + " ".join(f"{x:.3f}" for x in t))
    print(f"onednn / mkl step time: {median(times['onednn']) / median(times['mkl']):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    main()
