"""A small 3D U-Net for deep-image-prior fitting (imported only by the ``dip`` package).

Encoder: ``depth + 1`` levels of two 3x3x3 convolutions + ReLU, channels ``base * 2**level``,
2x max-pooling between levels (no normalisation in the encoder).  Decoder, per level: a 3x3x3
convolution at the coarse level halving the channels, nearest-neighbour 2x upsampling (the
convolution runs before the upsampling: 8x fewer multiply-adds than after), concatenation with
the encoder skip, then ``1 + decoder_blocks`` convolutions with instance normalisation + ReLU
(residual sum over the extra blocks).  A 1x1x1 convolution maps to ``out_channels``.

With ``depth=1, base=32, decoder_blocks=1`` this is the size of MoDIP's generator (Xiong et al.
2024: about 0.33 M parameters, about 0.28 MFLOP per voxel per forward pass).  The spatial size
must be divisible by ``2**depth`` (:func:`pad_to_multiple`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv(cin: int, cout: int, *, bias: bool = True) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel_size=3, padding=1, bias=bias)


class _EncoderLevel(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.c1 = _conv(cin, cout, bias=False)
        self.c2 = _conv(cout, cout, bias=False)

    def forward(self, x):
        return F.relu(self.c2(F.relu(self.c1(x))))


class _DecoderLevel(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int):
        super().__init__()
        self.reduce = _conv(cin, cout)
        self.merge = _conv(2 * cout, cout)
        self.n_merge = nn.InstanceNorm3d(cout)
        self.blocks = nn.ModuleList(_conv(cout, cout) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.InstanceNorm3d(cout) for _ in range(blocks))

    def forward(self, x, skip):
        x = F.interpolate(self.reduce(x), scale_factor=2, mode="nearest")
        x = F.relu(self.n_merge(self.merge(torch.cat([x, skip], dim=1))))
        y = x
        for conv, norm in zip(self.blocks, self.norms):
            y = F.relu(norm(conv(y)))
        return x + y if len(self.blocks) else x


class UNet3D(nn.Module):
    """3D U-Net ``(B, in_channels, X, Y, Z) -> (B, out_channels, X, Y, Z)``.

    Parameters
    ----------
    in_channels, out_channels : int
    depth : int >= 0
        Number of 2x down-samplings.
    base : int
        Channels of the finest level.
    decoder_blocks : int
        Extra convolution blocks per decoder level.
    checkpoint : bool
        Activation checkpointing per level while training: only each level's input is kept
        for the backward pass and its convolutions are recomputed (about 1/5 more time; peak
        memory of a MoDIP fit on a 256^3 brain crop 6.96 -> 5.65 GB, benchmarks/RESULTS_dip.md:
        the FFT buffers of the data-consistency steps are not checkpointed).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        depth: int = 1,
        base: int = 32,
        decoder_blocks: int = 1,
        checkpoint: bool = False,
    ):
        super().__init__()
        self.checkpoint = bool(checkpoint)
        if depth < 0 or base < 1:
            raise ValueError("depth must be >= 0 and base >= 1")
        self.depth = depth
        ch = [base * 2**i for i in range(depth + 1)]
        self.enc = nn.ModuleList(
            _EncoderLevel(in_channels if i == 0 else ch[i - 1], ch[i]) for i in range(depth + 1)
        )
        self.dec = nn.ModuleList(
            _DecoderLevel(ch[i], ch[i - 1], decoder_blocks) for i in range(depth, 0, -1)
        )
        self.out = nn.Conv3d(ch[0], out_channels, kernel_size=1, bias=False)

    def _run(self, level, *args):
        if self.checkpoint and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(level, *args, use_reentrant=False)
        return level(*args)

    def forward(self, x):
        skips = []
        for i, level in enumerate(self.enc):
            if i:
                x = F.max_pool3d(x, 2)
            x = self._run(level, x)
            skips.append(x)
        skips.pop()
        for level in self.dec:
            x = self._run(level, x, skips.pop())
        return self.out(x)


def n_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def pad_to_multiple(shape, multiple: int) -> tuple[int, ...]:
    """Smallest shape >= ``shape`` whose entries are multiples of ``multiple``."""
    m = int(multiple)
    return tuple(-(-int(n) // m) * m for n in shape)
