"""The paper's models: shapes and an initialization under which the all-conv net can train."""
import pytest
import torch
from torch import nn

from curvreg.lab.models import build_model


@pytest.mark.parametrize("width", [1.0, 0.25])
def test_allcnn_init_keeps_activation_scale(width):
    # He-normal init keeps E[h^2] of order 1 through the nine layers. PyTorch's default conv
    # init shrinks it about 5x per layer (to ~1e-4 by the sixth ReLU), and the net then stayed
    # at chance on CIFAR-10; the second half of the test shows the check catches that.
    torch.manual_seed(0)
    model = build_model("allcnn", width=width)
    x = torch.randn(32, 3, 32, 32)
    moments = relu_second_moments(model, x)
    assert len(moments) == 8
    assert all(0.1 < m < 10 for m in moments), moments
    assert model(x).shape == (32, 10)
    assert all(float(c.bias.abs().max()) == 0 for c in model if isinstance(c, nn.Conv2d))
    for conv in model:
        if isinstance(conv, nn.Conv2d):
            conv.reset_parameters()  # PyTorch's default init
    assert min(relu_second_moments(model, x)) < 1e-2


def relu_second_moments(model, h):
    out = []
    for layer in model:
        h = layer(h)
        if isinstance(layer, nn.ReLU):
            out.append(h.pow(2).mean().item())
    return out


def test_model_output_shapes_and_errors():
    x = torch.randn(2, 3, 32, 32)
    assert build_model("fc512")(x).shape == (2, 10)
    assert build_model("allcnn", num_classes=100, width=0.1)(x).shape == (2, 100)
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")


@pytest.mark.parametrize("name, params, bns", [("resnet20", 269_722, 19), ("resnet18", 11_173_962, 20)])
def test_cifar_resnets(name, params, bns):
    """He et al.'s ResNet-20 has 0.27M parameters (option-A shortcuts); the CIFAR ResNet-18 11.2M."""
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bns
    assert build_model(name, num_classes=100, width=0.25)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
