"""facebookresearch/deit's training step on timm 0.3.2, transcribed for the trajectory tests
(test code, not product code): tests/reference/test_supervised_trajectory.py and
test_distill_trajectory.py.

Sources: facebookresearch/deit at commit 7e160fe43f0252d17191b71cbb5826254114ea5b
(``models.py`` ``DistilledVisionTransformer``, ``losses.py`` ``DistillationLoss``,
``engine.py`` ``train_one_epoch``, ``main.py``'s set-up), on timm 0.3.2 (the version DeiT's
requirements pin; huggingface/pytorch-image-models commit
6504a42832cb6687e3f595c37e003ea920268365): ``models/vision_transformer.py``
``VisionTransformer``, ``loss/cross_entropy.py`` ``LabelSmoothingCrossEntropy``,
``optim/optim_factory.py`` ``create_optimizer`` / ``add_weight_decay``,
``scheduler/scheduler_factory.py`` ``create_scheduler`` and ``scheduler/cosine_lr.py`` /
``scheduler/scheduler.py`` ``CosineLRScheduler``. Dropout and drop path are 0 in the tests and
left out; the blocks are timm032_blocks.py's.
"""
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from timm032_blocks import Block, PatchEmbed  # noqa: E402  (timm 0.3.2)


# ----------------------------------------------------------------------------------------------
# Models: timm 0.3.2's VisionTransformer (as DeiT's models.py builds deit_*_patch16_224) and
# DeiT's DistilledVisionTransformer.
# ----------------------------------------------------------------------------------------------

class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4., qkv_bias=False, norm_layer=nn.LayerNorm):
        super().__init__()
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        nn.init.trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}

    def forward_features(self, x):
        B = x.shape[0]
        x = self.patch_embed(x)
        cls_tokens = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 0]

    def forward(self, x):
        return self.head(self.forward_features(x))


class DistilledVisionTransformer(VisionTransformer):
    """deit models.py: a distillation token after the class token, its own pos_embed row and
    head; training returns both heads' logits, evaluation their mean. It inherits timm 0.3.2's
    ``no_weight_decay()`` = {pos_embed, cls_token}: ``dist_token`` ([1, 1, D]) is decayed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        embed_dim = self.cls_token.shape[-1]
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 2, embed_dim))
        self.head_dist = nn.Linear(embed_dim, self.num_classes)
        nn.init.trunc_normal_(self.dist_token, std=.02)
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        self.head_dist.apply(self._init_weights)

    def forward_features(self, x):
        B = x.shape[0]
        x = self.patch_embed(x)
        cls_tokens = self.cls_token.expand(B, -1, -1)
        dist_token = self.dist_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, dist_token, x), dim=1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 0], x[:, 1]

    def forward(self, x):
        x, x_dist = self.forward_features(x)
        x = self.head(x)
        x_dist = self.head_dist(x_dist)
        if self.training:
            return x, x_dist
        else:
            return (x + x_dist) / 2


# ----------------------------------------------------------------------------------------------
# Losses: timm 0.3.2's LabelSmoothingCrossEntropy and deit losses.py DistillationLoss.
# ----------------------------------------------------------------------------------------------

class LabelSmoothingCrossEntropy(nn.Module):
    """deit losses.py (DeiT HEAD keeps its own copy; timm 0.3.2's is the same)."""

    def __init__(self, smoothing=0.1):
        super().__init__()
        assert smoothing < 1.0
        self.smoothing = smoothing
        self.confidence = 1. - smoothing

    def forward(self, x, target):
        logprobs = F.log_softmax(x, dim=-1)
        nll_loss = -logprobs.gather(dim=-1, index=target.unsqueeze(1))
        nll_loss = nll_loss.squeeze(1)
        smooth_loss = -logprobs.mean(dim=-1)
        loss = self.confidence * nll_loss + self.smoothing * smooth_loss
        return loss.mean()


class DistillationLoss(torch.nn.Module):
    """deit losses.py."""

    def __init__(self, base_criterion, teacher_model, distillation_type, alpha, tau):
        super().__init__()
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        assert distillation_type in ['none', 'soft', 'hard']
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs, outputs, labels):
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == 'none':
            return base_loss
        if outputs_kd is None:
            raise ValueError("When knowledge distillation is enabled, the model is "
                             "expected to return a Tuple[Tensor, Tensor] with the output of the "
                             "class_token and the dist_token")
        with torch.no_grad():
            teacher_outputs = self.teacher_model(inputs)
        if self.distillation_type == 'soft':
            T = self.tau
            distillation_loss = F.kl_div(
                F.log_softmax(outputs_kd / T, dim=1),
                F.log_softmax(teacher_outputs / T, dim=1),
                reduction='sum',
                log_target=True
            ) * (T * T) / outputs_kd.numel()
        elif self.distillation_type == 'hard':
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        loss = base_loss * (1 - self.alpha) + distillation_loss * self.alpha
        return loss


# ----------------------------------------------------------------------------------------------
# The optimizer and schedule: timm 0.3.2 optim_factory.py, scheduler/*.py.
# ----------------------------------------------------------------------------------------------

def add_weight_decay(model, weight_decay=1e-5, skip_list=()):
    decay = []
    no_decay = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights
        if len(param.shape) == 1 or name.endswith(".bias") or name in skip_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {'params': no_decay, 'weight_decay': 0.},
        {'params': decay, 'weight_decay': weight_decay}]


def create_optimizer(args, model, filter_bias_and_bn=True):
    """timm 0.3.2 create_optimizer, the 'adamw' branch."""
    opt_lower = args.opt.lower()
    weight_decay = args.weight_decay
    if weight_decay and filter_bias_and_bn:
        skip = {}
        if hasattr(model, 'no_weight_decay'):
            skip = model.no_weight_decay()
        parameters = add_weight_decay(model, weight_decay, skip)
        weight_decay = 0.
    else:
        parameters = model.parameters()
    opt_args = dict(lr=args.lr, weight_decay=weight_decay)
    if hasattr(args, 'opt_eps') and args.opt_eps is not None:
        opt_args['eps'] = args.opt_eps
    if hasattr(args, 'opt_betas') and args.opt_betas is not None:
        opt_args['betas'] = args.opt_betas
    assert opt_lower.split('_')[-1] == 'adamw'
    return torch.optim.AdamW(parameters, **opt_args)


class CosineLRScheduler:
    """timm 0.3.2 scheduler.Scheduler + cosine_lr.CosineLRScheduler (param_group_field 'lr',
    no noise: DeiT's lr_noise is None; t_mul 1)."""

    def __init__(self, optimizer, t_initial, t_mul=1., lr_min=0., decay_rate=1., warmup_t=0,
                 warmup_lr_init=0, warmup_prefix=False, cycle_limit=0, t_in_epochs=True):
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_values = [group["initial_lr"] for group in optimizer.param_groups]
        self.update_groups(self.base_values)
        assert t_initial > 0 and lr_min >= 0 and t_mul == 1
        self.t_initial, self.t_mul, self.lr_min, self.decay_rate = t_initial, t_mul, lr_min, decay_rate
        self.cycle_limit, self.warmup_t, self.warmup_lr_init = cycle_limit, warmup_t, warmup_lr_init
        self.warmup_prefix, self.t_in_epochs = warmup_prefix, t_in_epochs
        if self.warmup_t:
            self.warmup_steps = [(v - warmup_lr_init) / self.warmup_t for v in self.base_values]
            self.update_groups(self.warmup_lr_init)
        else:
            self.warmup_steps = [1 for _ in self.base_values]

    def _get_lr(self, t):
        if t < self.warmup_t:
            lrs = [self.warmup_lr_init + t * s for s in self.warmup_steps]
        else:
            if self.warmup_prefix:
                t = t - self.warmup_t
            i = t // self.t_initial
            t_i = self.t_initial
            t_curr = t - (self.t_initial * i)
            gamma = self.decay_rate ** i
            lr_min = self.lr_min * gamma
            lr_max_values = [v * gamma for v in self.base_values]
            if self.cycle_limit == 0 or (self.cycle_limit > 0 and i < self.cycle_limit):
                lrs = [lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t_curr / t_i))
                       for lr_max in lr_max_values]
            else:
                lrs = [self.lr_min for _ in self.base_values]
        return lrs

    def step(self, epoch, metric=None):
        values = self._get_lr(epoch) if self.t_in_epochs else None
        if values is not None:
            self.update_groups(values)

    def update_groups(self, values):
        if not isinstance(values, (list, tuple)):
            values = [values] * len(self.optimizer.param_groups)
        for param_group, value in zip(self.optimizer.param_groups, values):
            param_group["lr"] = value


def create_scheduler(args, optimizer):
    """timm 0.3.2 create_scheduler, the 'cosine' branch."""
    assert args.sched == 'cosine'
    lr_scheduler = CosineLRScheduler(
        optimizer, t_initial=args.epochs, t_mul=1., lr_min=args.min_lr, decay_rate=args.decay_rate,
        warmup_lr_init=args.warmup_lr, warmup_t=args.warmup_epochs, cycle_limit=1, t_in_epochs=True)
    return lr_scheduler, args.epochs + args.cooldown_epochs


# ----------------------------------------------------------------------------------------------
# main.py's set-up and epoch loop over engine.py's train_one_epoch.
# ----------------------------------------------------------------------------------------------

def reference_train(model, data_loader, args, teacher_model=None):
    """main.py's optimizer, scheduler and criterion, then its epoch loop over
    ``train_one_epoch`` (float32: no autocast; the GradScaler only rescales; no mixup, no
    model EMA - it is only evaluated). ``data_loader``: per epoch, a list of (samples NCHW,
    targets). ``args.distillation_type`` != 'none' needs ``teacher_model`` (main.py loads it
    and calls ``.eval()``). Returns the loss and the lr of every step."""
    if not args.unscale_lr:
        args.lr = args.lr * args.batch_size * 1 / 512.0  # utils.get_world_size() == 1
    optimizer = create_optimizer(args, model)
    lr_scheduler, _ = create_scheduler(args, optimizer)
    assert not (args.mixup > 0 or args.cutmix > 0.)
    criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    if args.distillation_type != 'none':
        teacher_model.eval()
    criterion = DistillationLoss(criterion, teacher_model, args.distillation_type,
                                 args.distillation_alpha, args.distillation_tau)
    losses, lrs = [], []
    for epoch in range(args.epochs):
        # -- train_one_epoch(model, criterion, data_loader_train, optimizer, ...)
        model.train(True)
        for samples, targets in data_loader[epoch]:
            outputs = model(samples)
            loss = criterion(samples, outputs, targets)
            loss_value = loss.item()
            assert math.isfinite(loss_value)
            optimizer.zero_grad()
            # loss_scaler(loss, optimizer, clip_grad=None, ...): scale (1 in float32), backward, step.
            loss.backward()
            if args.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            # model_ema.update(model): evaluation-only copy, left out.
            losses.append(loss_value)
            lrs.append(optimizer.param_groups[0]["lr"])
        lr_scheduler.step(epoch)
    return np.array(losses), np.array(lrs)
