"""Evaluation networks: output shapes, ConvNet feature sizes (DC/IDC conventions), parameter count, name lookup."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raydistill.errors import UserError
from raydistill.models.evalnets import (
    ConvNet,
    ResNet18,
    ResNetAP,
    StemConv2d,
    build_eval_net,
    convnet_depth_for_size,
)

CASES = [(1, 28), (3, 32), (3, 224), (3, 256)]


def _classifier(model: nn.Module) -> nn.Linear:
    return model.classifier if isinstance(model, ConvNet) else model.fc


@pytest.mark.parametrize("channels,size", CASES)
@pytest.mark.parametrize("name", ["convnet", "resnet_ap10", "resnet18"])
def test_output_shapes(name: str, channels: int, size: int) -> None:
    model = build_eval_net(name, channels, 10, size)
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 10)


def test_convnet_depth_by_size() -> None:
    assert [convnet_depth_for_size(s) for s in (28, 32, 64, 128, 224, 256)] == [3, 3, 4, 5, 6, 6]
    assert len(build_eval_net("convnet", 3, 10, 224).features) == 6 * 4
    assert len(build_eval_net("convnet4", 3, 10, 64).features) == 4 * 4


def test_convnet_feature_sizes() -> None:
    # DC: 28x28 grey input is treated as 32x32 (first conv pads by 3) -> Linear(2048 -> 10)
    fm = build_eval_net("convnet3", 1, 10, 28)
    assert fm.features[0].padding == (3, 3)
    assert _classifier(fm).in_features == 2048
    # methods.md 0.4: ConvNet-6 feature is 128*4*4 at 256 px and 128*3*3 at 224 px
    assert _classifier(build_eval_net("convnet6", 3, 10, 256)).in_features == 2048
    assert _classifier(build_eval_net("convnet6", 3, 10, 224)).in_features == 1152


def test_convnet3_fmnist_parameter_count() -> None:
    w = 128
    conv1 = 1 * w * 3 * 3 + w
    conv23 = 2 * (w * w * 3 * 3 + w)
    norms = 3 * (2 * w)
    linear = 2048 * 10 + 10
    expected = conv1 + conv23 + norms + linear  # = 317706
    model = build_eval_net("convnet3", 1, 10, 28)
    assert sum(p.numel() for p in model.parameters()) == expected == 317_706


def test_instance_norm_everywhere() -> None:
    for model in (ConvNet(3, 10, 3, im_size=32), ResNetAP(3, 10, im_size=224), ResNet18(3, 10, im_size=224)):
        norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
        assert norms and all(isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels for m in norms)
        assert all(m.affine for m in norms)


def test_resnet_stems() -> None:
    ap = ResNetAP(3, 10, im_size=224)
    assert ap.layer0[0].kernel_size == (7, 7) and ap.layer0[0].stride == (1, 1)
    assert isinstance(ap.layer0[3], nn.AvgPool2d) and ap.layer0[3].kernel_size == 4
    ds = ap.layer2[0].downsample
    assert isinstance(ds[0], nn.Conv2d) and ds[0].kernel_size == (1, 1) and isinstance(ds[1], nn.AvgPool2d)
    assert [len(s) for s in (ap.layer1, ap.layer2, ap.layer3, ap.layer4)] == [1, 1, 1, 1]
    assert ap.fc.in_features == 512
    small = ResNetAP(3, 10, im_size=32)
    assert small.layer0[0].kernel_size == (3, 3) and len(small.layer0) == 3
    r18 = ResNet18(3, 10, im_size=224)
    assert r18.layer0[0].kernel_size == (7, 7) and r18.layer0[0].stride == (2, 2)
    assert isinstance(r18.layer0[3], nn.MaxPool2d)
    assert [len(s) for s in (r18.layer1, r18.layer2, r18.layer3, r18.layer4)] == [2, 2, 2, 2]
    r18s = ResNet18(3, 10, im_size=32)
    assert r18s.layer0[0].kernel_size == (3, 3) and not any(isinstance(m, nn.MaxPool2d) for m in r18s.layer0)


def test_unknown_net_raises_user_error() -> None:
    with pytest.raises(UserError, match="resnet_ap10"):
        build_eval_net("vgg11", 3, 10, 32)
    with pytest.raises(UserError):
        build_eval_net("convnet", 0, 10, 32)


@pytest.mark.parametrize("channels,pad", [(1, 3), (3, 1)])
def test_stem_conv_matches_conv2d(channels: int, pad: int) -> None:
    torch.manual_seed(0)
    stem = StemConv2d(channels, 8, kernel_size=3, padding=pad)
    ref = nn.Conv2d(channels, 8, kernel_size=3, padding=pad)
    ref.load_state_dict(stem.state_dict())
    x = torch.randn(4, channels, 10, 10)
    a, b = stem(x), ref(x)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    assert torch.allclose(stem.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(stem.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
