"""open_flamingo's Flamingo blocks, transcribed without einops for tests/models/test_flamingo.py
(test code, not product code). Source: mlfoundations/open_flamingo commit
655f693fbfa04cd6e9a987d960654624d48917cf (``open_flamingo/src/helpers.py``: ``FeedForward``, ``PerceiverAttention``,
``PerceiverResampler`` without frame embeddings, ``MaskedCrossAttention`` without cached media,
``GatedCrossAttentionBlock``)."""
import torch
from torch import einsum, nn


def FeedForward(dim, mult=4):
    inner_dim = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner_dim, bias=False), nn.GELU(),
                         nn.Linear(inner_dim, dim, bias=False))


def _split(t, h):  # "b ... n (h d) -> b h ... n d" for rank-3 and rank-4 inputs
    t = t.reshape(*t.shape[:-1], h, t.shape[-1] // h)
    return t.movedim(-2, 1)


def _merge(t):  # "b h ... n d -> b ... n (h d)"
    t = t.movedim(1, -2)
    return t.reshape(*t.shape[:-2], -1)


class PerceiverAttention(nn.Module):
    def __init__(self, *, dim, dim_head=64, heads=8):
        super().__init__()
        self.scale, self.heads = dim_head ** -0.5, heads
        inner_dim = dim_head * heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (_split(t, self.heads) for t in (q, k, v))
        q = q * self.scale
        sim = einsum("... i d, ... j d -> ... i j", q, k)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = einsum("... i j, ... j d -> ... i d", sim.softmax(dim=-1), v)
        return self.to_out(_merge(out))


class PerceiverResampler(nn.Module):
    def __init__(self, *, dim, depth=6, dim_head=64, heads=8, num_latents=64, max_num_media=None,
                 ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.media_time_embs = (nn.Parameter(torch.randn(max_num_media, 1, dim))
                                if max_num_media else None)
        self.layers = nn.ModuleList([nn.ModuleList([
            PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
            FeedForward(dim=dim, mult=ff_mult)]) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # (b, T, v, D): one frame per media item
        b, T = x.shape[:2]
        if self.media_time_embs is not None:
            x = x + self.media_time_embs[:T]
        latents = self.latents[None, None].expand(b, T, *self.latents.shape)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class MaskedCrossAttention(nn.Module):
    def __init__(self, *, dim, dim_visual, dim_head=64, heads=8, only_attend_immediate_media=True):
        super().__init__()
        self.scale, self.heads = dim_head ** -0.5, heads
        inner_dim = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)
        self.only_attend_immediate_media = only_attend_immediate_media

    def forward(self, x, media, media_locations):
        _, T_img, n = media.shape[:3]
        x = self.norm(x)
        q = self.to_q(x)
        media = media.reshape(media.shape[0], T_img * n, media.shape[-1])
        k, v = self.to_kv(media).chunk(2, dim=-1)
        q, k, v = (_split(t, self.heads) for t in (q, k, v))
        q = q * self.scale
        sim = einsum("... i d, ... j d -> ... i j", q, k)
        media_time = torch.arange(T_img) + 1
        text_time = media_locations.cumsum(dim=-1)
        mask_op = torch.eq if self.only_attend_immediate_media else torch.ge
        mask = mask_op(text_time[:, None, :, None], media_time.repeat_interleave(n)[None, None, None, :])
        sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        attn = sim.softmax(dim=-1)
        if self.only_attend_immediate_media:
            attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
        out = einsum("... i j, ... j d -> ... i d", attn, v)
        return self.to_out(_merge(out))


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, *, dim, dim_visual, dim_head=64, heads=8, ff_mult=4,
                 only_attend_immediate_media=True):
        super().__init__()
        self.attn = MaskedCrossAttention(dim=dim, dim_visual=dim_visual, dim_head=dim_head,
                                         heads=heads,
                                         only_attend_immediate_media=only_attend_immediate_media)
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.ff = FeedForward(dim, mult=ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x, media, media_locations):
        x = self.attn(x, media, media_locations) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x
