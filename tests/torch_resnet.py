"""A torchvision-compatible ResNet in pure PyTorch, for the checkpoint-import tests.

torchvision cannot be installed beside this torch, so this is its `ResNet` /
`Bottleneck` (v1.5: the stride on the 3x3 conv) with the state-dict key names
exactly as torchvision and facebookresearch/vicreg's resnet.py write them
(conv1, bn1, layer1.0.conv1, ..., layer1.0.downsample.0/1, fc), plus the
official code's `widen`: every width, the stem's included, times `widen`.
The official model pads the input by 1 and then convolves with padding 2; this
pads 3 in the conv, which is the same function with the same keys.
"""
from __future__ import annotations

import torch
from torch import nn

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers, widen: int = 1, num_classes: int = 0):
        super().__init__()
        width = 64 * widen
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # The official backbone has fc = Identity (no parameters); a classifier has a Linear.
        self.fc = nn.Linear(self.inplanes, num_classes) if num_classes else nn.Identity()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(depth: int = 50, widen: int = 1, num_classes: int = 0) -> ResNet:
    return ResNet(DEPTHS[depth], widen=widen, num_classes=num_classes)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and random BatchNorm statistics, so that a wrong eps, a swapped
    mean/variance or a misplaced pad changes the output. Kept near unit scale so the
    activations neither vanish nor explode over the depth."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                # Variances down to 0.002, where eps 1e-5 vs Keras' default 1e-3 shows; gamma
                # scaled by the standard deviation keeps the outputs near unit scale.
                module.running_var.copy_(uniform(n, 0.002, 2.0))
                module.running_mean.copy_(uniform(n, -0.3, 0.3))
                module.weight.copy_(uniform(n, 0.5, 1.0) * module.running_var.sqrt())
                module.bias.copy_(uniform(n, -0.2, 0.2))
            elif isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.01)
                module.bias.copy_(uniform(module.bias.shape, -0.1, 0.1))
    return model.eval()


def torch_features(model: nn.Module, images, mean, std):
    """images: NHWC float32 in [0, 1] (NumPy). Normalises as the Keras backbone does; eval mode."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.eval()(x).numpy()
