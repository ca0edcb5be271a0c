"""The paper's models and a registry by name.

* ``mlp``: fully-connected ReLU nets, 3x512 and 3x4096 hidden units in the paper.
* ``all_cnn_c``: the nine-layer all-convolutional net of Springenberg et al. (2015): 3x3 convs
  with stride-2 convs instead of pooling, 1x1 convs, global average pooling.
* ``cifar_resnet``: residual nets with BatchNorm for 32x32 inputs: ResNet-20 of He et al. (2016,
  section 4.2: three stages of 16/32/64 channels, option-A shortcuts) and the CIFAR ResNet-18
  (four stages of 64..512 channels, 1x1-conv projection shortcuts). Their BatchNorms train with
  batch statistics; the tape takes them with ``GradNormTape(batch_norm=...)``.
All activations are out-of-place so the curvature tape can record layer outputs.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
ACTIVATIONS = tuple(_ACTIVATIONS)


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def mlp(widths: Sequence[int] = (512, 512, 512), activation: str = "relu",
        in_features: int = 3 * 32 * 32, num_classes: int = 10) -> nn.Sequential:
    """Flatten -> [Linear -> act] * len(widths) -> Linear(num_classes)."""
    layers: list = [nn.Flatten()]
    d = in_features
    for w in widths:
        layers += [nn.Linear(d, w), _activation(activation)]
        d = w
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def all_cnn_c(num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
              activation: str = "relu", dropout: float = 0.0) -> nn.Sequential:
    """All-CNN-C with ``96*width`` / ``192*width`` channels; input ``[N, 3, 32, 32]``.

    Weights are He-normal, Var(w) = 2 / fan_in (biases 0). Under PyTorch's default
    (Var(w) = 1 / (3 fan_in)) the activations shrink by about 0.4 per layer, the nine-layer
    net starts with a nearly constant output, and on a 5,000-image CIFAR-10 subset it stayed at
    chance for 3 epochs.
    """
    a, b = max(1, round(96 * width)), max(1, round(192 * width))

    def conv(cin, cout, k, stride=1, padding=0):
        return [nn.Conv2d(cin, cout, k, stride=stride, padding=padding), _activation(activation)]

    drop = [nn.Dropout(dropout)] if dropout > 0 else []
    layers = (conv(in_channels, a, 3, padding=1) + conv(a, a, 3, padding=1)
              + conv(a, a, 3, stride=2, padding=1) + drop
              + conv(a, b, 3, padding=1) + conv(b, b, 3, padding=1)
              + conv(b, b, 3, stride=2, padding=1) + drop
              + conv(b, b, 3) + conv(b, b, 1)
              + [nn.Conv2d(b, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()])
    model = nn.Sequential(*layers)
    gain = "relu" if activation in ("relu", "gelu") else "tanh"
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity=gain)
            nn.init.zeros_(m.bias)
    return model


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by the stride and zero-pad the new channels (no parameters)."""

    def __init__(self, stride: int, extra: int):
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """conv3x3-BN-act-conv3x3-BN, plus the shortcut, then act."""

    def __init__(self, cin: int, cout: int, stride: int, activation: str, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = _activation(activation)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = _activation(activation)
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "pad":
            self.shortcut = _PadShortcut(stride, cout - cin)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        h = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(h)) + self.shortcut(x))


def cifar_resnet(stages: Sequence[int], widths: Sequence[int], num_classes: int = 10,
                 activation: str = "relu", shortcut: str = "pad", width: float = 1.0,
                 in_channels: int = 3) -> nn.Sequential:
    """conv3x3-BN-act, then ``stages[k]`` BasicBlocks of ``widths[k] * width`` channels (stride 2
    at the first block of every stage after the first), global average pooling, Linear.
    ``shortcut``: ``"pad"`` (option A) or ``"conv"`` (1x1 conv + BN) where the shape changes."""
    widths = [max(1, round(w * width)) for w in widths]
    layers = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
              _activation(activation)]
    cin = widths[0]
    for k, (blocks, cout) in enumerate(zip(stages, widths)):
        for b in range(blocks):
            layers.append(BasicBlock(cin, cout, 2 if (b == 0 and k > 0) else 1, activation, shortcut))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "fc512": lambda num_classes=10, **kw: mlp((512,) * 3, num_classes=num_classes, **kw),
    "fc4096": lambda num_classes=10, **kw: mlp((4096,) * 3, num_classes=num_classes, **kw),
    "allcnn": lambda num_classes=10, **kw: all_cnn_c(num_classes=num_classes, **kw),
    "resnet20": lambda num_classes=10, **kw: cifar_resnet((3, 3, 3), (16, 32, 64), num_classes,
                                                          shortcut="pad", **kw),
    "resnet18": lambda num_classes=10, **kw: cifar_resnet((2, 2, 2, 2), (64, 128, 256, 512),
                                                          num_classes, shortcut="conv", **kw),
}


def build_model(name: str, **kwargs) -> nn.Module:
    """Model from the registry by name (see ``MODELS``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
