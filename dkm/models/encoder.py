"""ResNet feature-pyramid encoder (torchvision ResNet under ``encoder.resnet`` (v11) or ``encoder.net`` (DKMv3))."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import ResNet
from torchvision.models.resnet import BasicBlock, Bottleneck

from .fused import conv2d_relu, fold_batchnorm

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

    def forward_fused(self, images: list[torch.Tensor], max_stride: int = 32) -> list[dict[int, torch.Tensor]]:
        """Inference: the pyramids of several inputs (each (B, 3, H, W), channels-last preferred) as
        :meth:`forward` computes them, with every BatchNorm folded into its convolution once for all
        inputs and the ReLUs and residual additions fused into the convolutions (:mod:`.fused`).
        Needs eval mode (folding uses BatchNorm's running statistics) and the stock torchvision stem
        and blocks (else it falls back to :meth:`forward` per input)."""
        r = self.backbone
        blocks = [b for layer in (r.layer1, r.layer2, r.layer3, r.layer4) for b in layer]
        if self.training or not all(type(b) in (Bottleneck, BasicBlock) for b in blocks):
            return [self.forward(x, max_stride=max_stride) for x in images]
        feats = [{1: x} for x in images]

        def conv_bn(conv, bn, xs, relu=True, residuals=None):
            weight, bias = fold_batchnorm(conv, bn)
            residuals = residuals or [None] * len(xs)
            return [conv2d_relu(x, weight, bias, conv, relu=relu, residual=res) for x, res in zip(xs, residuals)]

        xs = conv_bn(r.conv1, r.bn1, images)
        for f, x in zip(feats, xs):
            f[2] = x
        xs = [r.maxpool(x) for x in xs]
        for stride, layer in ((4, r.layer1), (8, r.layer2), (16, r.layer3), (32, r.layer4)):
            if stride > max_stride:
                break
            for block in layer:
                identity = xs if block.downsample is None else conv_bn(*block.downsample, xs, relu=False)
                convs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
                if isinstance(block, Bottleneck):
                    convs.append((block.conv3, block.bn3))
                for conv, bn in convs[:-1]:
                    xs = conv_bn(conv, bn, xs)
                xs = conv_bn(*convs[-1], xs, residuals=identity)
                del identity
            for f, x in zip(feats, xs):
                f[stride] = x
        return [{s: f[s] for s in (32, 16, 8, 4, 2, 1) if s in f} for f in feats]

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_bn:  # optional (DKMv3's ResNet50 wrapper has it; its training scripts turn it off)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self
