"""Evaluation networks: the nets trained from scratch on a synthetic set to score it.

Every net uses "instance norm" as the DC/IDC code defines it: ``GroupNorm(C, C, affine=True)`` (one group per channel,
no running statistics, so train and eval mode compute the same thing).

- :class:`ConvNet` follows DC's ``ConvNet`` (benchmarks.md section 1): ``depth`` x [conv3x3 (pad 1, bias) -> instance
  norm -> ReLU -> AvgPool2x2] -> Linear. A 28x28 input is treated as 32x32: the first conv pads by 3, so ConvNet-3 on
  Fashion-MNIST ends in Linear(128*4*4 = 2048 -> 10).
- :class:`ResNetAP` is IDC's ``resnet_ap.py`` (methods.md section 0.4): strided convs replaced by average pooling.
- :class:`ResNet` / :func:`ResNet18` is IDC's ``resnet.py`` with instance norm.

:func:`build_eval_net` maps the protocol names ("convnet", "convnet3".."convnet6", "resnet_ap10", "resnet18") to
modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raydistill.errors import UserError

__all__ = [
    "EVAL_NET_NAMES",
    "ConvNet",
    "ResNet",
    "ResNet18",
    "ResNetAP",
    "StemConv2d",
    "build_eval_net",
    "convnet_depth_for_size",
    "instance_norm",
]

EVAL_NET_NAMES: tuple[str, ...] = ("convnet", "convnet3", "convnet4", "convnet5", "convnet6", "resnet_ap10", "resnet18")


def instance_norm(channels: int) -> nn.GroupNorm:
    """Instance norm as DC/IDC define it: ``GroupNorm(C, C)`` with a learnable affine per channel."""
    return nn.GroupNorm(channels, channels, affine=True)


def _size_pair(im_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(im_size, int):
        return im_size, im_size
    h, w = im_size
    return int(h), int(w)


class StemConv2d(nn.Conv2d):
    """``nn.Conv2d`` for few input channels that, on the CPU, computes the same convolution as unfold + batched matmul.

    oneDNN is slow for 1-3 input channels (the Fashion-MNIST ConvNet's first conv took ~1.7x longer forward and
    backward than this im2col form); the parameters, the state dict and the maths are those of ``nn.Conv2d``
    (results agree up to float summation order). Other devices and configurations use ``nn.Conv2d.forward``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        if (
            x.device.type != "cpu"
            or x.dim() != 4
            or self.in_channels * kh * kw > 27
            or self.groups != 1
            or self.stride != (1, 1)
            or self.dilation != (1, 1)
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
        ):
            return super().forward(x)
        b, _, h, w = x.shape
        ph, pw = self.padding
        cols = F.unfold(x, self.kernel_size, padding=self.padding)  # [B, Cin*kh*kw, L]
        wmat = self.weight.reshape(1, self.out_channels, -1).expand(b, -1, -1)
        out = torch.bmm(wmat, cols) if self.bias is None else torch.baddbmm(self.bias.view(1, -1, 1), wmat, cols)
        return out.view(b, self.out_channels, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1)


class ConvNet(nn.Module):
    """DC's ConvNet with instance norm and average pooling (benchmarks.md section 1; methods.md section 0.4).

    Args:
        channels: input channels (1 for Fashion-MNIST, 3 for RGB).
        num_classes: output classes.
        depth: number of conv blocks (3 for 28/32 px, 6 for 224/256 px in the protocols).
        width: channels of every conv (128 in all protocols).
        im_size: input size, an int (square) or (H, W). 28x28 is treated as 32x32 (the first conv pads by 3), as in
            DC's ``_make_layers``.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        depth: int = 3,
        width: int = 128,
        im_size: int | tuple[int, int] = 32,
    ) -> None:
        super().__init__()
        h, w = _size_pair(im_size)
        first_pad = 1
        if (h, w) == (28, 28):
            # DC convention: 28x28 behaves as 32x32 (pad 3 on the first conv).
            first_pad = 3
            h, w = 32, 32
        layers: list[nn.Module] = []
        in_ch = channels
        for d in range(depth):
            conv_cls = StemConv2d if d == 0 else nn.Conv2d
            layers += [
                conv_cls(in_ch, width, kernel_size=3, padding=first_pad if d == 0 else 1, bias=True),
                instance_norm(width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            in_ch = width
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise UserError(
                f"ConvNet-{depth} cannot take {_size_pair(im_size)} px inputs (feature map shrinks to nothing)",
                "use a smaller depth or larger images",
            )
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * h * w
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features before the classifier, shape [B, feature_dim]."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape [B, num_classes]."""
        return self.classifier(self.embed(x))


def _net_size(im_size: int) -> str:
    """IDC's size classes: small (<= 64 px), mid (<= 128 px), large (> 128 px)."""
    if 0 < im_size <= 64:
        return "small"
    if im_size <= 128:
        return "mid"
    return "large"


def _init_resnet(module: nn.Module) -> None:
    """IDC's init: conv weights ~ N(0, sqrt(2 / (k*k*out))), norm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
        elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _BasicBlockAP(nn.Module):
    """IDC ResNetAP BasicBlock: stride-1 convs; downsampling by AvgPool after conv1 (and in the shortcut)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn1 = instance_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = instance_norm(planes)
        self.stride = stride
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=1, bias=False),
                nn.AvgPool2d(kernel_size=stride, stride=stride),
                instance_norm(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.stride != 1:
            out = F.avg_pool2d(out, kernel_size=self.stride, stride=self.stride)
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class _BasicBlock(nn.Module):
    """Standard (torchvision/IDC) BasicBlock with strided conv1 and conv1x1-stride shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = instance_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = instance_norm(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                instance_norm(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


_RESNET_LAYERS: dict[int, list[int]] = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


class _ResNetBase(nn.Module):
    """Shared trunk: layer0 (stem) -> 4 stages (widths w, 2w, 4w, 8w) -> global average pool -> fc."""

    layer0: nn.Module

    def _make_stages(self, block: type[nn.Module], depth: int, width: int) -> None:
        if depth not in _RESNET_LAYERS:
            raise UserError(f"unsupported ResNet depth {depth}", f"use one of {sorted(_RESNET_LAYERS)}")
        counts = _RESNET_LAYERS[depth]
        in_planes = width
        stages = []
        for i, n in enumerate(counts):
            planes = width * (2**i)
            stride = 1 if i == 0 else 2
            blocks = [block(in_planes, planes, stride)]
            in_planes = planes
            blocks += [block(in_planes, planes, 1) for _ in range(1, n)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = in_planes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features, shape [B, feature_dim]."""
        x = self.layer0(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape [B, num_classes]."""
        return self.fc(self.embed(x))


class ResNetAP(_ResNetBase):
    """IDC's ResNetAP (methods.md section 0.4): ResNet with strides replaced by 2x2 average pooling.

    BasicBlock [1,1,1,1] for depth 10, widths 64/128/256/512. Stem by input size (IDC ``IntroBlock``):
    <= 64 px: 3x3 conv -> norm -> ReLU; <= 128 px: the same + AvgPool 2x2; > 128 px: 7x7 conv (stride 1, pad 3) ->
    norm -> ReLU -> AvgPool 4x4. Downsampling shortcut: conv1x1 -> AvgPool(stride) -> norm. Global average pool -> fc.
    Convs have no bias (a norm follows each).
    """

    def __init__(self, channels: int, num_classes: int, depth: int = 10, im_size: int = 224, width: int = 64) -> None:
        super().__init__()
        size = _net_size(im_size)
        if size == "large":
            self.layer0 = nn.Sequential(
                nn.Conv2d(channels, width, 7, stride=1, padding=3, bias=False),
                instance_norm(width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=4, stride=4),
            )
        else:
            stem: list[nn.Module] = [
                nn.Conv2d(channels, width, 3, stride=1, padding=1, bias=False),
                instance_norm(width),
                nn.ReLU(inplace=True),
            ]
            if size == "mid":
                stem.append(nn.AvgPool2d(kernel_size=2, stride=2))
            self.layer0 = nn.Sequential(*stem)
        self._make_stages(_BasicBlockAP, depth, width)
        self.fc = nn.Linear(self.feature_dim, num_classes)
        _init_resnet(self)


class ResNet(_ResNetBase):
    """IDC's ResNet (torchvision layout) with instance norm (methods.md section 0.4).

    Stem by input size (IDC ``IntroBlock``): > 128 px: 7x7 conv stride 2 -> norm -> ReLU -> MaxPool 3x3/2;
    <= 128 px: 3x3 stride-1 conv -> norm -> ReLU, followed by MaxPool 3x3/2 only for 65..128 px (none for <= 64 px).
    Global average pool -> fc.
    """

    def __init__(self, channels: int, num_classes: int, depth: int = 18, im_size: int = 224, width: int = 64) -> None:
        super().__init__()
        size = _net_size(im_size)
        if size == "large":
            self.layer0 = nn.Sequential(
                nn.Conv2d(channels, width, 7, stride=2, padding=3, bias=False),
                instance_norm(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        else:
            stem: list[nn.Module] = [
                nn.Conv2d(channels, width, 3, stride=1, padding=1, bias=False),
                instance_norm(width),
                nn.ReLU(inplace=True),
            ]
            if size == "mid":
                stem.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
            self.layer0 = nn.Sequential(*stem)
        self._make_stages(_BasicBlock, depth, width)
        self.fc = nn.Linear(self.feature_dim, num_classes)
        _init_resnet(self)


def ResNet18(channels: int, num_classes: int, im_size: int = 224) -> ResNet:  # noqa: N802 (class-like factory)
    """ResNet-18 (BasicBlock [2,2,2,2]) with instance norm; see :class:`ResNet`."""
    return ResNet(channels, num_classes, depth=18, im_size=im_size)


def convnet_depth_for_size(im_size: int) -> int:
    """ConvNet depth used by the protocols for a given input size: 3 (<= 32 px), 4 (<= 64), 5 (<= 128), else 6."""
    if im_size <= 32:
        return 3
    if im_size <= 64:
        return 4
    if im_size <= 128:
        return 5
    return 6


def build_eval_net(name: str, channels: int, num_classes: int, im_size: int) -> nn.Module:
    """Build a freshly initialised evaluation net by protocol name.

    Args:
        name: "convnet" (depth from the size: 3 for <= 32 px, 4 for 64, 5 for 128, 6 for >= 224), "convnet3" ..
            "convnet6", "resnet_ap10" or "resnet18" (case-insensitive).
        channels: input channels.
        num_classes: number of classes.
        im_size: square input size in pixels.

    Raises:
        UserError: unknown name or non-positive sizes.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in EVAL_NET_NAMES:
        raise UserError(f"unknown evaluation net {name!r}", f"use one of: {', '.join(EVAL_NET_NAMES)}")
    for label, value in (("channels", channels), ("num_classes", num_classes), ("im_size", im_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{label} must be a positive integer, got {value!r}", f"pass a positive integer {label}")
    if key.startswith("convnet"):
        depth = convnet_depth_for_size(im_size) if key == "convnet" else int(key[len("convnet") :])
        return ConvNet(channels, num_classes, depth=depth, width=128, im_size=im_size)
    if key == "resnet_ap10":
        return ResNetAP(channels, num_classes, depth=10, im_size=im_size)
    return ResNet18(channels, num_classes, im_size=im_size)
