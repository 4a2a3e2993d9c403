"""ResNet feature-pyramid encoder (torchvision ResNet, stored under ``encoder.resnet``)."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import ResNet

#: Output channels per stride ``{32, 16, 8, 4, 2, 1}`` of the supported torchvision ResNets.
PYRAMID_CHANNELS = {
    "resnet50": {32: 2048, 16: 1024, 8: 512, 4: 256, 2: 64, 1: 3},
    "resnet18": {32: 512, 16: 256, 8: 128, 4: 64, 2: 64, 1: 3},
}


class Encoder(nn.Module):
    """Wraps a torchvision :class:`~torchvision.models.ResNet` and returns its feature pyramid.

    The ResNet's ``avgpool``/``fc`` head stays registered (unused, frozen) so that the state_dict keys
    of the official DKM checkpoints (which include ``encoder.resnet.fc.*``) load unchanged.
    """

    def __init__(self, resnet: ResNet):
        super().__init__()
        self.resnet = resnet
        # The classifier is never used: frozen, so that DDP does not wait for its gradients.
        self.resnet.fc.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """``x`` (B, 3, H, W) ImageNet-normalized -> ``{stride: (B, C_stride, H/stride, W/stride)}``.

        Stride 1 is the input image itself.
        """
        r = self.resnet
        x1 = r.relu(r.bn1(r.conv1(x)))
        x2 = r.layer1(r.maxpool(x1))
        x3 = r.layer2(x2)
        x4 = r.layer3(x3)
        x5 = r.layer4(x4)
        return {32: x5, 16: x4, 8: x3, 4: x2, 2: x1, 1: x}
