"""The field's DeepLab-V2, written here from its public description as the oracle of tests/test_weights.py.

What AdaptSegNet's ``model/deeplab.py`` (``Res_Deeplab``) and ``model/deeplab_multi.py`` (``DeeplabMulti``)
build, and what DASS and ProDA copied (their code was read for the description, none of it is reproduced):

- a ResNet-101 whose bottleneck puts a stage's stride on the first 1x1 convolution (caffe), plain
  ``nn.BatchNorm2d`` layers (frozen: evaluated with their running statistics), a 3x3/2 max-pool with
  ``ceil_mode=True``, layer3 and layer4 with dilation 2 and 4 in every block (output stride 8), and a
  downsample branch ``(1x1 conv, BN)`` on the first block of every stage;
- the classifier ``Classifier_Module``: four 3x3 convolutions with bias, dilation = padding = 6, 12, 18, 24, in a
  ``ModuleList`` named ``conv2d_list``; DASS (and protocl) sum the four outputs, AdaptSegNet's forward returns
  inside its loop and sums only the first two (``first_two=True`` here);
- ``Res_Deeplab``: the classifier on layer4 as ``layer5``; ``DeeplabMulti``: one on layer3 (1024 channels in) as
  ``layer5`` and one on layer4 as ``layer6``;
- the input: BGR, minus the caffe mean ``IMG_MEAN`` (B, G, R) = (104.00698793, 116.66876762, 122.67891434), no
  scaling. A torchvision ResNet (``stride_in_1x1=False``) takes RGB ``(x / 255 - mean) / std`` instead.

The tests build these networks in float64 with random weights, save their state dicts in each layout and compare
the pipeline's network after loading against them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CAFFE_MEAN_BGR = torch.tensor([104.00698793, 116.66876762, 122.67891434], dtype=torch.float64)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)


def caffe_input(rgb: Tensor) -> Tensor:
    """What the peers feed their network: BGR channels minus the caffe mean (RGB 0..255 in)."""
    return rgb.double().flip(1) - CAFFE_MEAN_BGR.view(1, 3, 1, 1)


def torchvision_input(rgb: Tensor) -> Tensor:
    return (rgb.double() / 255 - IMAGENET_MEAN.view(1, 3, 1, 1)) / IMAGENET_STD.view(1, 3, 1, 1)


class PeerBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, dilation: int, stride_in_1x1: bool, first: bool) -> None:
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(cin, planes, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.downsample = None
        if first:  # the stage's first block: AdaptSegNet's condition (stride, width or dilation 2/4) always holds
            self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(4 * planes))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class PeerClassifier(nn.Module):
    """``Classifier_Module``: ``conv2d_list`` of four dilated 3x3 convolutions; ``first_two``: AdaptSegNet's sum."""

    def __init__(self, cin: int, num_classes: int, first_two: bool = False) -> None:
        super().__init__()
        self.conv2d_list = nn.ModuleList(nn.Conv2d(cin, num_classes, 3, padding=d, dilation=d, bias=True)
                                         for d in (6, 12, 18, 24))
        self.first_two = first_two

    def forward(self, x: Tensor) -> Tensor:
        used = self.conv2d_list[:2] if self.first_two else self.conv2d_list
        return sum(conv(x) for conv in used)


class PeerDeepLab(nn.Module):
    """``Res_Deeplab`` (``multi=False``) or ``DeeplabMulti`` (``multi=True``); ``stride_in_1x1=False`` with
    ``head=False`` is a torchvision-style dilated ResNet (for the torchvision-layout oracle).

    ``forward`` returns ``(layer4 output, logits of the layer4 head)`` (the head's logits are None without one).
    """

    def __init__(self, num_classes: int = 19, *, blocks=(3, 4, 23, 3), multi: bool = False, first_two: bool = False,
                 stride_in_1x1: bool = True, head: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        cin = 64
        for i, (planes, n, stride, dilation) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 1, 1),
                                                             (1, 1, 2, 4))):
            layer = []
            for j in range(n):
                layer.append(PeerBlock(cin, planes, stride if j == 0 else 1, dilation, stride_in_1x1, j == 0))
                cin = 4 * planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.multi = multi
        if head and multi:
            self.layer5 = PeerClassifier(1024, num_classes, first_two)
            self.layer6 = PeerClassifier(2048, num_classes, first_two)
        elif head:
            self.layer5 = PeerClassifier(2048, num_classes, first_two)
        self.head = head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x3 = self.layer3(self.layer2(self.layer1(x)))
        x4 = self.layer4(x3)
        if not self.head:
            return x4, None
        return x4, (self.layer6(x4) if self.multi else self.layer5(x4))


@torch.no_grad()
def randomize(net: nn.Module, seed: int) -> nn.Module:
    """Random float64 weights with well-scaled activations, BatchNorm statistics included (eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    net.double().eval()
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen, dtype=torch.float64)
                                * (1.0 / fan_in) ** 0.5)
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen, dtype=torch.float64) * 0.1)
        elif isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.weight.copy_(0.5 + torch.rand(c, generator=gen, dtype=torch.float64))
            module.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.1)
            module.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.1)
            module.running_var.copy_(0.5 + torch.rand(c, generator=gen, dtype=torch.float64))
    return net
