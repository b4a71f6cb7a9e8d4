"""openai/DALL-E's dVAE, transcribed in plain torch (test code shared by
tests/interop/test_dall_e_parity.py and tests/reference/test_dvae_trajectory.py).

The reference is ``dall_e``'s ``utils.py`` (Conv2d, map_pixels, unmap_pixels), ``encoder.py``
and ``decoder.py`` at commit 5be4b236bc3ade6943662354117a0e83752cc322. The ``dall_e`` pip
package pulls torchvision; the transcription drops only the ``attr`` validators, the device /
requires_grad plumbing and the CUDA half-precision branch, which the CPU never takes, and
keeps the parameter names, so ``state_dict()`` has the published keys
(``blocks.group_1.block_1.res_path.conv_1.w``, ...). ``group_count`` other than 4 extends
the published pattern (see Encoder / Decoder).
"""
import math
from collections import OrderedDict
from functools import partial

import torch

nn = torch.nn
F = torch.nn.functional

LOGIT_LAPLACE_EPS = 0.1


class Conv2d(nn.Module):
    def __init__(self, n_in, n_out, kw, use_float16=True):
        super().__init__()
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        w = torch.empty((n_out, n_in, kw, kw), dtype=torch.float32)
        w.normal_(std=1 / math.sqrt(n_in * kw ** 2))
        b = torch.zeros((n_out,), dtype=torch.float32)
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x):
        return F.conv2d(x.float(), self.w, self.b, padding=(self.kw - 1) // 2)


def map_pixels(x):
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x):
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


class EncoderBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers ** 2)
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ('relu_1', nn.ReLU()), ('conv_1', Conv2d(n_in, self.n_hid, 3)),
            ('relu_2', nn.ReLU()), ('conv_2', Conv2d(self.n_hid, self.n_hid, 3)),
            ('relu_3', nn.ReLU()), ('conv_3', Conv2d(self.n_hid, self.n_hid, 3)),
            ('relu_4', nn.ReLU()), ('conv_4', Conv2d(self.n_hid, n_out, 1))]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    """dall_e.Encoder; ``group_count`` other than 4 extends its pattern (group g has width
    2^(g-1) n_hid, a max-pool after every group but the last)."""

    def __init__(self, group_count=4, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192):
        super().__init__()
        blk_range = range(n_blk_per_group)
        n_layers = group_count * n_blk_per_group
        make_blk = partial(EncoderBlock, n_layers=n_layers)
        groups = [('input', Conv2d(input_channels, 1 * n_hid, 7))]
        for g in range(1, group_count + 1):
            w_in, w = (2 ** (g - 2) if g > 1 else 1) * n_hid, 2 ** (g - 1) * n_hid
            layers = [(f'block_{i + 1}', make_blk(w_in if i == 0 else w, w)) for i in blk_range]
            if g < group_count:
                layers.append(('pool', nn.MaxPool2d(kernel_size=2)))
            groups.append((f'group_{g}', nn.Sequential(OrderedDict(layers))))
        groups.append(('output', nn.Sequential(OrderedDict([
            ('relu', nn.ReLU()), ('conv', Conv2d(w, vocab_size, 1, use_float16=False))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x):
        return self.blocks(x)


class DecoderBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers ** 2)
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ('relu_1', nn.ReLU()), ('conv_1', Conv2d(n_in, self.n_hid, 1)),
            ('relu_2', nn.ReLU()), ('conv_2', Conv2d(self.n_hid, self.n_hid, 3)),
            ('relu_3', nn.ReLU()), ('conv_3', Conv2d(self.n_hid, self.n_hid, 3)),
            ('relu_4', nn.ReLU()), ('conv_4', Conv2d(self.n_hid, n_out, 3))]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Decoder(nn.Module):
    """dall_e.Decoder, extended the same way (group g has width 2^(G-g) n_hid)."""

    def __init__(self, group_count=4, n_init=128, n_hid=256, n_blk_per_group=2, output_channels=3,
                 vocab_size=8192):
        super().__init__()
        blk_range = range(n_blk_per_group)
        n_layers = group_count * n_blk_per_group
        make_blk = partial(DecoderBlock, n_layers=n_layers)
        groups = [('input', Conv2d(vocab_size, n_init, 1, use_float16=False))]
        for g in range(1, group_count + 1):
            w_in, w = (2 ** (group_count - g + 1) * n_hid if g > 1 else n_init), 2 ** (group_count - g) * n_hid
            layers = [(f'block_{i + 1}', make_blk(w_in if i == 0 else w, w)) for i in blk_range]
            if g < group_count:
                layers.append(('upsample', nn.Upsample(scale_factor=2, mode='nearest')))
            groups.append((f'group_{g}', nn.Sequential(OrderedDict(layers))))
        groups.append(('output', nn.Sequential(OrderedDict([
            ('relu', nn.ReLU()), ('conv', Conv2d(n_hid, 2 * output_channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x):
        return self.blocks(x)


def perturbed(module, seed):
    """dall_e's init, plus noise on the (zero) biases so that every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".b"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module
