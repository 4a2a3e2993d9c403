"""ResNet feature-pyramid encoder (torchvision ResNet under ``encoder.resnet`` (v11) or ``encoder.net`` (DKMv3))."""
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
    of the official DKM checkpoints (which include ``encoder.resnet.fc.*`` / ``encoder.net.fc.*``) load unchanged.
    """

    def __init__(self, resnet: ResNet, attr: str = "resnet", freeze_bn: bool = False):
        super().__init__()
        self.freeze_bn = freeze_bn
        self.attr = attr  # "resnet" in the v11 checkpoints, "net" in DKMv3's
        setattr(self, attr, resnet)
        # The classifier is never used: frozen, so that DDP does not wait for its gradients.
        resnet.fc.requires_grad_(False)

    @property
    def backbone(self) -> ResNet:
        return getattr(self, self.attr)

    def forward(self, x: torch.Tensor, max_stride: int = 32) -> dict[int, torch.Tensor]:
        """``x`` (B, 3, H, W) ImageNet-normalized -> ``{stride: (B, C_stride, H/stride, W/stride)}``.

        Stride 1 is the input image itself. ``max_stride`` < 32 stops early (DKMv3's upsampling pass
        only needs strides up to 8).
        """
        r = self.backbone
        x1 = r.relu(r.bn1(r.conv1(x)))
        feats = {1: x, 2: x1}
        layers = ((4, lambda t: r.layer1(r.maxpool(t))), (8, r.layer2), (16, r.layer3), (32, r.layer4))
        t = x1
        for stride, layer in layers:
            if stride > max_stride:
                break
            t = feats[stride] = layer(t)
        return {s: feats[s] for s in (32, 16, 8, 4, 2, 1) if s in feats}

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_bn:  # the v11 release keeps the backbone's BatchNorm statistics fixed
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self
