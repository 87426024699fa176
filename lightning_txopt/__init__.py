"""lightning_txopt: make transformer training in PyTorch Lightning several times faster.

Length-aware batching in a DataModule you subclass, and model-side techniques as callbacks.
"""

from lightning_txopt.callbacks import (
    AccumulationScheduler,
    FreezeEmbeddings,
    GradientCheckpointing,
    ParameterSharing,
    TokenBudgetFinder,
    TokenThroughputMonitor,
    enable_gradient_checkpointing,
    estimated_optimizer_steps,
    freeze_embeddings,
    share_layers,
)
from lightning_txopt.data import (
    BucketBatchSampler,
    BucketDataModule,
    EpochPlan,
    FlatSamples,
    FortunesDataModule,
    PackingCollator,
    PaddingCollator,
    PaddingRow,
    SampleBatch,
    compute_lengths,
    load_fortunes,
    pad_sequences,
    padding_report,
    plan_epoch,
)
from lightning_txopt.data.text import TextDataModule
from lightning_txopt.models import VARLEN_ATTENTION, check_packing_support, use_varlen_attention
from lightning_txopt.module import TransformerModule
from lightning_txopt.precision import resolve_precision
from lightning_txopt.predict import OrderedPredictionWriter, restore_order

__version__ = "0.2.0"

__all__ = [
    "VARLEN_ATTENTION",
    "AccumulationScheduler",
    "BucketBatchSampler",
    "BucketDataModule",
    "EpochPlan",
    "FlatSamples",
    "FortunesDataModule",
    "FreezeEmbeddings",
    "GradientCheckpointing",
    "PackingCollator",
    "PaddingCollator",
    "PaddingRow",
    "OrderedPredictionWriter",
    "ParameterSharing",
    "SampleBatch",
    "TextDataModule",
    "TokenBudgetFinder",
    "TokenThroughputMonitor",
    "TransformerModule",
    "__version__",
    "check_packing_support",
    "compute_lengths",
    "enable_gradient_checkpointing",
    "estimated_optimizer_steps",
    "freeze_embeddings",
    "load_fortunes",
    "pad_sequences",
    "padding_report",
    "plan_epoch",
    "resolve_precision",
    "restore_order",
    "share_layers",
    "use_varlen_attention",
]
