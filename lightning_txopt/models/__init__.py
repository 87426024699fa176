"""Model-side code for Hugging Face models: the varlen attention backend and packed batches."""

from lightning_txopt.models.attention import VARLEN_ATTENTION, use_varlen_attention, varlen_kernel_available
from lightning_txopt.models.packing import (
    PackingSupport,
    check_packing_support,
    packed_classification_logits,
    packed_model_inputs,
    position_offset,
)

__all__ = [
    "VARLEN_ATTENTION",
    "PackingSupport",
    "check_packing_support",
    "packed_classification_logits",
    "packed_model_inputs",
    "position_offset",
    "use_varlen_attention",
    "varlen_kernel_available",
]
