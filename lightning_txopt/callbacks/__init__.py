"""Model-side techniques as Lightning callbacks, each beside the plain function it applies."""

from lightning_txopt.callbacks.accumulation import (
    AccumulationScheduler,
    causal_lm_items,
    count_label_items,
    count_optimizer_steps,
    estimated_optimizer_steps,
    factor_at,
)
from lightning_txopt.callbacks.freeze_embeddings import (
    FreezeEmbeddings,
    FrozenEmbeddings,
    FrozenMemory,
    find_input_embeddings,
    freeze_embeddings,
    frozen_memory,
    unfreeze_embeddings,
)
from lightning_txopt.callbacks.gradient_checkpointing import (
    CheckpointingPlan,
    GradientCheckpointing,
    check_not_checkpointed_twice,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    selective_checkpointing_available,
)
from lightning_txopt.callbacks.parameter_sharing import (
    ParameterSharing,
    SharingResult,
    check_shared_blocks_unsplit,
    check_sharing_wrap_policy,
    layer_mapping,
    share_layers,
)
from lightning_txopt.callbacks.throughput import TokenThroughputMonitor, batch_token_counts, device_token_counts
from lightning_txopt.callbacks.token_budget import StepProber, TokenBudgetFinder, fit_checkpointing

__all__ = [
    "AccumulationScheduler",
    "CheckpointingPlan",
    "FreezeEmbeddings",
    "FrozenEmbeddings",
    "FrozenMemory",
    "GradientCheckpointing",
    "ParameterSharing",
    "SharingResult",
    "StepProber",
    "TokenBudgetFinder",
    "TokenThroughputMonitor",
    "batch_token_counts",
    "device_token_counts",
    "causal_lm_items",
    "check_not_checkpointed_twice",
    "check_shared_blocks_unsplit",
    "check_sharing_wrap_policy",
    "count_label_items",
    "count_optimizer_steps",
    "disable_gradient_checkpointing",
    "enable_gradient_checkpointing",
    "estimated_optimizer_steps",
    "factor_at",
    "find_input_embeddings",
    "fit_checkpointing",
    "freeze_embeddings",
    "frozen_memory",
    "layer_mapping",
    "selective_checkpointing_available",
    "share_layers",
    "unfreeze_embeddings",
]
