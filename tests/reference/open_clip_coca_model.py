"""A minimal PyTorch transcription of open_clip's CoCa and CoCaLoss, shared by
tests/interop/test_coca_parity.py (outputs, losses, gradients) and
tests/reference/test_coca_trajectory.py (training steps).

Transcribed from open_clip (github.com/mlfoundations/open_clip) at commit
89fb801f1e6087880e951fc8354b8a2077b79c6d:
  - ``src/open_clip/coca_model.py`` ``CoCa.forward`` / ``_encode_image`` / ``_encode_text``;
  - ``src/open_clip/transformer.py``: ``Attention`` (fused ``in_proj_weight`` when kdim == dim,
    else ``{q,k,v}_proj_weight``; the cross path splits the fused weight), ``AttentionalPooler``,
    ``ResidualAttentionBlock`` (``ln_1_kv`` for cross-attention), ``VisionTransformer`` with
    ``attentional_pool=True`` (``attn_pool`` -> ``ln_post`` -> ``pool_type='tok'`` -> ``proj``)
    or ``attentional_pool='parallel'`` / ``'cascade'`` (``_pool``: ``ln_post`` on the tower's
    tokens, ``attn_pool`` for the caption tokens, ``attn_pool_contrastive`` with one query over
    the tokens or over ``attn_pool``'s output; open_clip sizes ``ln_post`` by output_dim, so
    these need width == embed: ``CoCa(..., width=EMBED)``),
    ``TextTransformer(embed_cls=True)`` (``_embeds``, ``_build_additive_mask``, ``forward``:
    ``ln_final`` on the appended class position only, tokens ``x[:, :-1]`` without it),
    ``MultimodalTransformer.forward``;
  - ``src/open_clip/loss.py`` ``CoCaLoss`` (``ClipLoss`` x clip_loss_weight + ``CrossEntropyLoss(
    ignore_index=pad_id)`` x caption_loss_weight) with ``src/open_clip/task/coca_task.py``'s shift
    (``logits[:, :-1]`` against ``text[:, 1:]``).
Shapes are module constants (tiny); ``CoCa(correct_cls_mask)`` picks the text mask.
"""
import math

import torch

nn = torch.nn
F = torch.nn.functional

WIDTH, DEPTH, PATCH, IMAGE = 48, 2, 8, 16       # vision tower (width != embed: separate pooler q/k/v)
EMBED, TEXT_DEPTH, DEC_DEPTH, VOCAB, CTX = 32, 2, 2, 50, 12
HEADS, QUERIES = 4, 5                            # head_dim 12 / 8; 1 contrastive + 4 caption queries


class Attention(nn.Module):
    def __init__(self, dim, heads, kdim=None):
        super().__init__()
        kdim = kdim or dim
        self.heads = heads
        if kdim == dim:
            self.in_proj_weight = nn.Parameter(torch.randn(3 * dim, dim) * dim ** -0.5)
        else:
            self.q_proj_weight = nn.Parameter(torch.randn(dim, dim) * dim ** -0.5)
            self.k_proj_weight = nn.Parameter(torch.randn(dim, kdim) * kdim ** -0.5)
            self.v_proj_weight = nn.Parameter(torch.randn(dim, kdim) * kdim ** -0.5)
        self.in_proj_bias = nn.Parameter(0.1 * torch.randn(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, k_x=None, v_x=None, attn_mask=None):
        n, length, c = x.shape
        if hasattr(self, "in_proj_weight"):
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq, bk, bv = self.in_proj_bias.chunk(3)
        k_x = x if k_x is None else k_x
        v_x = x if v_x is None else v_x
        q, k, v = F.linear(x, wq, bq), F.linear(k_x, wk, bk), F.linear(v_x, wv, bv)
        split = lambda t: t.reshape(n, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            logits = logits + attn_mask.reshape(-1, self.heads, *attn_mask.shape[-2:]) \
                if attn_mask.dim() == 3 else logits + attn_mask
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(n, length, c)
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d, heads, cross=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        if cross:
            self.ln_1_kv = nn.LayerNorm(d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(d, 4 * d))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * d, d))

    def forward(self, q_x, k_x=None, attn_mask=None):
        k_x = self.ln_1_kv(k_x) if hasattr(self, "ln_1_kv") and k_x is not None else None
        x = q_x + self.attn(self.ln_1(q_x), k_x=k_x, v_x=k_x, attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, d, depth, heads):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(d, heads) for _ in range(depth)])

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class AttentionalPooler(nn.Module):
    def __init__(self, d_model, context_dim, heads, queries):
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, d_model))
        self.attn = Attention(d_model, heads, kdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x):
        x = self.ln_k(x)
        q = self.ln_q(self.query)
        return self.attn(q.unsqueeze(0).expand(x.shape[0], -1, -1), k_x=x, v_x=x)


class VisionTransformer(nn.Module):
    def __init__(self, attn_pool_type="", width=WIDTH):
        super().__init__()
        grid = IMAGE // PATCH
        self.attn_pool_type = attn_pool_type
        self.conv1 = nn.Conv2d(3, width, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(width ** -0.5 * torch.randn(width))
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, DEPTH, HEADS)
        self.attn_pool = AttentionalPooler(EMBED, width, HEADS, QUERIES)
        if attn_pool_type:  # 'parallel' / 'cascade': open_clip builds both poolers with context_dim=width
            self.attn_pool_contrastive = AttentionalPooler(EMBED, width, HEADS, 1)
        self.ln_post = nn.LayerNorm(EMBED)
        self.proj = nn.Parameter(EMBED ** -0.5 * torch.randn(EMBED, EMBED))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1)
        x = self.ln_pre(x + self.positional_embedding)
        x = self.transformer(x)
        if self.attn_pool_type:  # "untested, WIP pooling that should match paper"
            x = self.ln_post(x)
            tokens = self.attn_pool(x)
            pooled = self.attn_pool_contrastive(x if self.attn_pool_type == "parallel" else tokens)[:, 0]
        else:
            x = self.ln_post(self.attn_pool(x))
            pooled, tokens = x[:, 0], x[:, 1:]
        return pooled @ self.proj, tokens


class TextTransformer(nn.Module):
    def __init__(self, correct_cls_mask):
        super().__init__()
        self.correct_cls_mask = correct_cls_mask
        self.token_embedding = nn.Embedding(VOCAB, EMBED)
        self.cls_emb = nn.Parameter(0.1 * torch.randn(EMBED))
        self.positional_embedding = nn.Parameter(0.1 * torch.randn(CTX + 1, EMBED))
        self.transformer = Transformer(EMBED, TEXT_DEPTH, HEADS)
        self.ln_final = nn.LayerNorm(EMBED)
        self.text_projection = nn.Parameter(EMBED ** -0.5 * torch.randn(EMBED, EMBED))

    def forward(self, text):
        b, seq_len = text.shape
        x = torch.cat([self.token_embedding(text), self.cls_emb.expand(b, 1, -1)], 1)
        seq_len += 1
        mask = torch.full((CTX + 1, CTX + 1), float("-inf")).triu(1)[:seq_len, :seq_len]
        valid = text != 0
        ones = valid.new_ones(b, 1)
        valid = torch.cat([valid, ones] if self.correct_cls_mask else [ones, valid], 1)
        add = torch.zeros(b, seq_len, seq_len).masked_fill(~valid.unsqueeze(1).expand(-1, seq_len, -1),
                                                           float("-inf"))
        attn_mask = mask.unsqueeze(0) + add.repeat_interleave(HEADS, 0)
        x = self.transformer(x + self.positional_embedding[:seq_len], attn_mask=attn_mask)
        pooled = self.ln_final(x[:, -1])
        return pooled @ self.text_projection, x[:, :-1]


class MultimodalTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(EMBED, HEADS) for _ in range(DEC_DEPTH)])
        self.cross_attn = nn.ModuleList([ResidualAttentionBlock(EMBED, HEADS, cross=True)
                                         for _ in range(DEC_DEPTH)])
        self.ln_final = nn.LayerNorm(EMBED)
        self.text_projection = nn.Parameter(EMBED ** -0.5 * torch.randn(EMBED, VOCAB))

    def forward(self, image_embs, text_embs):
        n = text_embs.shape[1]
        mask = torch.full((CTX, CTX), float("-inf")).triu(1)[:n, :n]
        for resblock, cross in zip(self.resblocks, self.cross_attn):
            text_embs = resblock(text_embs, attn_mask=mask)
            text_embs = cross(text_embs, k_x=image_embs)
        return self.ln_final(text_embs) @ self.text_projection


class CoCa(nn.Module):
    def __init__(self, correct_cls_mask=False, attn_pool_type="", width=WIDTH):
        super().__init__()
        self.text = TextTransformer(correct_cls_mask)
        self.visual = VisionTransformer(attn_pool_type, width)
        self.text_decoder = MultimodalTransformer()
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def forward(self, image, text):
        image_latent, image_embs = self.visual(image)
        text_latent, token_embs = self.text(text)
        return dict(image_features=F.normalize(image_latent, dim=-1),
                    text_features=F.normalize(text_latent, dim=-1),
                    logits=self.text_decoder(image_embs, token_embs),
                    logit_scale=self.logit_scale.exp())


def coca_loss(image_features, text_features, logits, labels, logit_scale,
              caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0):
    per_image = logit_scale * image_features @ text_features.T
    target = torch.arange(per_image.shape[0])
    clip = (F.cross_entropy(per_image, target) + F.cross_entropy(per_image.T, target)) / 2
    caption = nn.CrossEntropyLoss(ignore_index=pad_id)(logits.permute(0, 2, 1), labels)
    return clip_loss_weight * clip, caption_loss_weight * caption
