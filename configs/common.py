"""Defaults shared by every method's config (the contract keys of docs/design.md)."""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 128            # global, over all processes
    c.grad_accum_steps = 1        # micro-batches per step; CLIP/DINO keep the full-batch loss (fmjax/train/step.py)
    c.log_every = 50
    c.eval_every = 500
    c.eval_at_start = True
    c.checkpoint_every = 500
    c.keep_checkpoints = 3        # keep the last N ...
    c.keep_period = 0             # ... plus every M-th step (0: none)
    c.nonfinite = "stop"          # a NaN/inf loss or gradient: 'stop' (nothing non-finite is saved) | 'skip_step'
    c.mesh = dict(data=-1, fsdp=1, tensor=1,   # sizes inside one slice (ICI)
                  dcn_data=1, dcn_fsdp=1)      # multi-slice: slices spanned by data / fsdp (DCN)
    c.sharding = "fsdp"           # logical-axis rules preset: dp | fsdp | fsdp_tensor
    c.dtype = "float32"           # compute dtype; params stay float32
    # Observability (fmjax/train/observe.py): trace steps start+1..start+num to DIR/profile;
    # the peak TFLOP/s per chip that MFU is logged against (0: datasheet table, else measured);
    # the persistent XLA compilation cache of launch/train.py ('' = off).
    c.profile = (0, 0)
    c.peak_tflops = 0.0
    c.compile_cache_dir = "~/.cache/fmjax/jax_cache"
    # A recipe's own XLA flags ("--xla_NAME=VALUE ..."), added to XLA_FLAGS by launch/train.py and
    # launch/benchmark.py before the backend starts (fmjax.train.observe.apply_xla_flags).
    c.xla_flags = ""
    c.writers = ("jsonl", "tensorboard")  # + 'wandb' (pip install wandb; WANDB_MODE=offline works offline)
    c.wandb_project = "fmjax"
    c.model = ml_collections.ConfigDict()
    c.objective = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict(dict(
        name="fmjax_shapes/64", data_dir=ml_collections.config_dict.placeholder(str), train_split="train", image_size=64,
        normalization="imagenet", worker_count=0, pp_train="", pp_eval="",
        read_threads=4,        # grain threads reading + transforming examples in each process (each builds a batch; max(2, n) batches ahead)
        skip_bad_examples=0,   # up to N unreadable examples skipped with a warning (0: stop at the first)
        classes="",            # train on these classes only, ids or names: 'heart' or '0,3' (fmjax/data/class_subset.py)
        exclude_classes="",    # train without these classes (e.g. held out of a base run, adapted to later)
        repeat_classes="",     # 'heart:7': each training example of that class 7 times per pass (class_subset.py)
        order="per_process"))  # 'global': one shuffled stream, resumable on any process count (fmjax/data/elastic.py)
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, blr=0.0, lr_scaling="none", b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.05, warmup_steps=100, min_lr=0.0, decay="cosine", clip_norm=0.0,
        clip_mode="global", clip_fuse_qkv=False, adam_count="global",
        # Reference behaviours (see docs/design.md, "reference options"); these defaults are fmjax's.
        no_decay=None,                 # None: fmjax's NO_DECAY_PATTERNS; () decays every >= 2-D non-bias param
        wd_groups="",                  # a reference's exclusions by name (optimizer.NO_DECAY_PRESETS: mae, dino, deit, open_clip, big_vision, ...); '' = no_decay
        decay_all=False,               # True: every param decays, biases / norms too (one torch param group)
        clip_eps=0.0,                  # > 0: global clip factor max_norm / (norm + eps) (torch's clip_grad_norm_: 1e-6)
        warmup_mode="linear", warmup_init=0.0, decay_from="warmup_end",
        schedule_steps_per_epoch=0, schedule_epoch_lag=0,
        # Parameter groups (fmjax/train/param_groups.py); regexes match the whole '/'-joined param
        # path (re.fullmatch, as big_vision), e.g. 'backbone/.*'. Empty / None: no groups.
        frozen=(),                     # e.g. ('backbone/.*',): zero update, no optimizer state, bit-identical
        lr_mult=(),                    # e.g. (('head/.*', 10.0),): first matching pattern wins, default 1
        wd_mult=(),                    # same for weight decay; only scales params the decay groups decay
        # Layer-wise lr decay (BEiT / MAE): lr * decay**(num_layers + 1 - layer_id); decay=1.0 is off,
        # num_layers None counts the ViT's blocks. E.g. --config.optimizer.llrd.decay=0.75
        llrd=ml_collections.ConfigDict(dict(decay=1.0, num_layers=ml_collections.config_dict.placeholder(int)))))
    c.evals = ml_collections.ConfigDict()
    # Initialise params from a pretrained checkpoint on a fresh start (fmjax/train/model_init.py):
    # workdir=DIR [step=N] (an fmjax workdir), or torch=FILE (.safetensors/.bin) with format=
    # hf_vit|hf_vit_mae|hf_dinov2|hf_clip|open_clip|diffusers_unet [hf_config=config.json];
    # mapping {ckpt subtree: param subtree} (default {'params': ''}; CLI 'params/backbone:backbone');
    # dont_load: regexes (fullmatch on 'a/b/kernel' paths) that keep their fresh init, e.g. ('head/.*',).
    c.model_init = ml_collections.ConfigDict(dict(
        workdir=ml_collections.config_dict.placeholder(str), step=ml_collections.config_dict.placeholder(int),
        torch=ml_collections.config_dict.placeholder(str), format=ml_collections.config_dict.placeholder(str),
        hf_config=ml_collections.config_dict.placeholder(str), mapping=ml_collections.config_dict.placeholder(object),
        dont_load=()))
    # An adapter applied from outside the model (fmjax/adapt): name='lora' trains rank-`rank`
    # LoRA pairs (alpha unset: 2 x rank), name='houlsby' bottleneck adapters (`kind` serial |
    # parallel, `scale` for parallel), name='prefix' `length` learned key/value prefixes,
    # name='prompt' `length` VPT-shallow prompt tokens (ViT register tokens; deep=True: VPT-deep,
    # `length` prompts per encoder block; text_length: CoOp's context vectors in CLIP's text tower), on
    # the layers whose path matches `targets` (re.search; '' = the adapter's default: lora
    # 'attn/(query|value)$', houlsby 'attn/out$|mlp/fc2$', prefix 'attn$'), plus the params matching a `train` regex (fullmatch, e.g.
    # ('head/.*',)); every other param is frozen. name='': no adapter. checkpoint='adapter':
    # checkpoints hold the trained arrays only (the base is read again from model_init and
    # checked against a stored digest); 'full': every array.
    c.adapter = ml_collections.ConfigDict(dict(
        name="", rank=8, alpha=ml_collections.config_dict.placeholder(float), bottleneck=64,
        kind="serial", scale=1.0, length=10, deep=False, text_length=0, targets="", train=(), dropout=0.0,
        checkpoint="adapter"))
    return c


def imagenet_data(c, image_size: int = 224, scale=(0.2, 1.0)):
    """ImageNet-1k from TFDS (prepare it first: see README, 'Real datasets')."""
    c.data.name = "imagenet2012"
    c.data.image_size = image_size
    c.data.worker_count = 16
    c.data.pp_train = (f"random_resized_crop({image_size}, scale={tuple(scale)})|flip_lr|"
                       f"normalize('imagenet')|keep('image', 'label')")
    c.data.pp_eval = (f"resize({int(image_size * 256 / 224)})|center_crop({image_size})|"
                      f"normalize('imagenet')|keep('image', 'label')")


def ssl_imagenet_run(c, steps_per_epoch: int, keep_epochs: int = 50, images=None):
    """What the self-supervised ImageNet presets share besides their recipe: bfloat16, a log
    line every 100 steps, a checkpoint every 2000 (one kept every ``keep_epochs`` epochs), and
    every 10 epochs a kNN (k 20, T 0.07, validation against train) and the training views as
    pictures (``images``: that eval's split / pp / sizes)."""
    c.dtype = "bfloat16"
    c.log_every = 100
    c.eval_every = 10 * steps_per_epoch
    c.checkpoint_every = 2000
    c.keep_period = keep_epochs * steps_per_epoch
    c.evals = dict(
        knn=dict(type="knn", split="validation", train_split="train", k=20, temperature=0.07,
                 every=c.eval_every),
        images=dict(type="images", every=c.eval_every, **(images or {})),
    )
