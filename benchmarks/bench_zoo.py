"""Real architectures: exact regularized step / plain step, measured side by side in one process
(float32), and which method the tape used for each recorded layer.

Models (random init, CPU-sized inputs): torchvision ResNet-18 (BatchNorm in eval mode),
ConvNeXt-Tiny and a ResNet-18-sized timm ResNetV2 with BiT's weight-standardized convolutions
and GroupNorm at 64x64, timm ViT-Tiny (192 wide, 12 blocks, 3 heads) on 32x32 with 4x4
patches, and a GPT-2-small-shaped classifier (12 layers, 768 wide, 12 heads, T = 128), as configured by
default (``gelu_new``, a GELU written in Python arithmetic) and with ``gelu_pytorch_tanh``.
Targets: transformers <= 2.5x, ResNet / ConvNeXt <= 4x, no layer on the per-example loop.
The "flops" column is the same ratio in matmul and convolution flops (``flop_ratio``): what the
algorithm itself asks for, against which the measured ratio shows the cost of everything else
(elementwise work, memory, dispatch).
Usage:
    python benchmarks/bench_zoo.py [--rounds 3] [--models resnet18 vit_tiny gpt2_small gpt2_small_tanh ...]
"""
from __future__ import annotations

import argparse
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

import curvreg
from curvreg.objective import cross_entropy
from bench_step import ALPHA, machine, medians

TARGETS = {"resnet18": 4.0, "convnext_tiny": 4.0, "vit_tiny": 2.5, "gpt2_small": 2.5,
           "gpt2_small_tanh": 2.5, "resnetv2_bit": 4.0}


def resnet18():
    import torchvision
    return torchvision.models.resnet18(num_classes=10).eval(), torch.randn(16, 3, 64, 64), 10


def convnext_tiny():
    import torchvision
    return torchvision.models.convnext_tiny(num_classes=10), torch.randn(8, 3, 64, 64), 10


def resnetv2_bit():
    from timm.models.resnetv2 import ResNetV2  # StdConv2d and GroupNormAct: BiT's layers
    model = ResNetV2(layers=(2, 2, 2, 2), channels=(64, 128, 256, 512), basic=True,
                     bottle_ratio=1.0, num_classes=10)
    return model, torch.randn(16, 3, 64, 64), 10


def vit_tiny():
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
                              num_classes=10)
    return model, torch.randn(16, 3, 32, 32), 10


def gpt2_small(activation="gelu_new"):
    from transformers import GPT2Config, GPT2ForSequenceClassification
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=128, vocab_size=50257,
                     num_labels=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     activation_function=activation)
    model = GPT2ForSequenceClassification(cfg)
    model.config.use_cache = False
    return model, torch.randint(1, 50257, (2, 128)), 2


def gpt2_small_tanh():
    """GPT-2 with PyTorch's tanh GELU kernel, which the tape runs for GPT-2's Python-written
    GELU (``curvreg.taped_gelu``): the plain step that pays for no Python GELU either."""
    return gpt2_small("gelu_pytorch_tanh")


MODELS = {"resnet18": resnet18, "vit_tiny": vit_tiny, "gpt2_small": gpt2_small,
          "gpt2_small_tanh": gpt2_small_tanh, "convnext_tiny": convnext_tiny,
          "resnetv2_bit": resnetv2_bit}


def logits(out):
    """The logits of a model's output (Hugging Face models return an output object)."""
    return out.logits if hasattr(out, "logits") else out


def plain_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(logits(model(x)), y).backward()
    opt.step()


def exact_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    obj = curvreg.penalized_objective(model, x, y, ALPHA,
                                      loss_fn=lambda out, t: cross_entropy(logits(out), t))
    obj.value.backward()
    opt.step()
    return obj.tape.methods


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                        transposed, _output_padding, _groups, output_mask, out_shape=None,
                        **_kwargs) -> int:
    """Flops of ``aten.convolution_backward``: each of the input and weight gradients costs what
    the forward does. (torch.utils.flop_counter's own formula ignores groups, so that it counts a
    depthwise convolution's weight gradient as a dense one's: ConvNeXt's 300x over.)"""
    return (conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
            * (int(output_mask[0]) + int(output_mask[1])))


def addmm_inplace_flops(_self_shape, a_shape, b_shape, out_shape=None, **_kwargs) -> int:
    """Flops of ``Tensor.addmm_`` (the fused dense path accumulates its second weight-gradient
    product in place), which torch.utils.flop_counter does not count; as for ``addmm``, the
    product's."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


FLOP_FORMULAS = {torch.ops.aten.convolution_backward: conv_backward_flops,
                 torch.ops.aten.addmm_: addmm_inplace_flops}


def flop_ratio(model, opt, x, y) -> float:
    """Matmul and convolution flops of one exact step / one plain step (torch.utils.flop_counter),
    with attention through the math backend in both (the tape's route; PyTorch's fused CPU
    attention kernel has no flop formula)."""
    flops = []
    for step in (plain_step, exact_step):
        counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
        with counter, sdpa_kernel(SDPBackend.MATH):
            step(model, opt, x, y)
        flops.append(counter.get_total_flops())
    return flops[1] / flops[0]


def bench(name, rounds, device="cpu", scale=1):
    torch.manual_seed(0)
    model, x, classes = MODELS[name]()
    x = x.repeat(scale, *[1] * (x.dim() - 1))  # a larger batch of the same inputs (GPU)
    model, x = model.to(device), x.to(device)
    y = torch.randint(0, classes, (x.shape[0],), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvreg.FallbackWarning)  # reported in the table instead
        methods = exact_step(model, opt, x, y)  # warm-up; records the methods
    plain_step(model, opt, x, y)
    flops = flop_ratio(model, opt, x, y)
    med, _ = medians({"plain": plain_step, "exact": exact_step}, (model, opt, x, y), rounds,
                     warmup=False, device=device)
    kinds = Counter(methods.values())
    fallback = sorted(p for p, m in methods.items() if "fallback" in m)
    return med, flops, kinds, fallback, list(x.shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (CUDA-event timings)")
    ap.add_argument("--scale", type=int, default=1, help="batch size multiplier (e.g. 8 on a GPU)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {machine(args.device)}, float32, alpha={ALPHA}")
    print("| model | input | plain step (ms) | exact step | flops | target | layers by method "
          "| on the loop |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        med, flops, kinds, fallback, shape = bench(name, args.rounds, args.device, args.scale)
        ratio = med["exact"] / med["plain"]
        by = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        print(f"| {name} | {shape} | {med['plain'] * 1e3:.0f} | {ratio:.2f}x | {flops:.2f}x | "
              f"<= {TARGETS[name]}x | {by} | {', '.join(fallback) or 'none'} |", flush=True)


if __name__ == "__main__":
    main()
