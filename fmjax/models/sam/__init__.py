"""Segment Anything (SAM): ``SAM`` = ``SamImageEncoder`` + ``SamPromptEncoder`` +
``SamMaskDecoder``; presets ``vit_b`` / ``vit_l`` / ``vit_h`` (``sam_kwargs``). Converted from
transformers' ``SamModel`` by ``fmjax.interop.hf_sam``."""
from fmjax.models.sam.common import (SamAttention, get_rel_pos, decomposed_rel_pos, window_partition,
                                     window_unpartition)
from fmjax.models.sam.image_encoder import SamImageEncoder
from fmjax.models.sam.mask_decoder import SamMaskDecoder, TwoWayTransformer
from fmjax.models.sam.model import SAM, VARIANTS, sam_kwargs
from fmjax.models.sam.prompt_encoder import SamPositionalEmbedding, SamPromptEncoder

__all__ = ["SAM", "VARIANTS", "sam_kwargs", "SamImageEncoder", "SamPromptEncoder", "SamMaskDecoder",
           "TwoWayTransformer", "SamAttention", "SamPositionalEmbedding", "get_rel_pos",
           "decomposed_rel_pos", "window_partition", "window_unpartition"]
