"""BEiT's ViT building blocks, transcribed for the trajectory tests (test code, not product
code): microsoft/unilm ``beit/modeling_finetune.py`` (commit 768a3c873f598bb9b4d4dfb9267b099e35f8fe56)
and microsoft/SimMIM ``models/vision_transformer.py`` (commit d3e29bcac950b83edc34ca33fe4404f38309052c),
which is the same code: ``Attention`` with a bias-free fused ``qkv`` plus ``q_bias`` / ``v_bias``
(q scaled before the product) and an optional per-block relative position table, ``Block`` with
layer scale ``gamma_1`` / ``gamma_2``, the shared ``RelativePositionBias``, ``PatchEmbed``.
Dropout and drop path are 0 in the tests and left out; LayerNorm eps 1e-6; mlp ratio 4.
"""
import torch
from torch import nn
import torch.nn.functional as F


def trunc_normal_(t, std=0.02):                     # timm's trunc_normal_(std) (a=-2, b=2 absolute)
    nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def relative_position_index(wh, ww):               # Attention / RelativePositionBias
    coords = torch.stack(torch.meshgrid([torch.arange(wh), torch.arange(ww)], indexing="ij"))
    coords_flatten = torch.flatten(coords, 1)
    rel = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    num = (2 * wh - 1) * (2 * ww - 1) + 3
    index = torch.zeros(size=(wh * ww + 1,) * 2, dtype=rel.dtype)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num - 3
    index[0:, 0] = num - 2
    index[0, 0] = num - 1
    return index, num


class Attention(nn.Module):
    def __init__(self, dim, num_heads, window_size=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.window_size = window_size
        if window_size:
            index, num = relative_position_index(*window_size)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(num, num_heads))
            self.register_buffer("relative_position_index", index)
        else:
            self.relative_position_bias_table = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rel_pos_bias=None):
        B_, N, C = x.shape
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        qkv = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        if self.relative_position_bias_table is not None:
            n = self.window_size[0] * self.window_size[1] + 1
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
            attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if rel_pos_bias is not None:
            attn = attn + rel_pos_bias
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, dim, num_heads, init_values, window_size=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, window_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x, rel_pos_bias=None):
        x = x + self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class RelativePositionBias(nn.Module):
    def __init__(self, window_size, num_heads):
        super().__init__()
        self.window_size = window_size
        index, num = relative_position_index(*window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num, num_heads))
        self.register_buffer("relative_position_index", index)

    def forward(self):
        n = self.window_size[0] * self.window_size[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)
