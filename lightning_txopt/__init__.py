"""lightning_txopt: make transformer training in PyTorch Lightning several times faster.

Length-aware batching in a DataModule you subclass, and model-side techniques as callbacks.
"""

from lightning_txopt.data import (
    BucketBatchSampler,
    BucketDataModule,
    EpochPlan,
    FortunesDataModule,
    PaddingCollator,
    PaddingRow,
    compute_lengths,
    load_fortunes,
    pad_sequences,
    padding_report,
    plan_epoch,
)

__version__ = "0.1.0"

__all__ = [
    "BucketBatchSampler",
    "BucketDataModule",
    "EpochPlan",
    "FortunesDataModule",
    "PaddingCollator",
    "PaddingRow",
    "__version__",
    "compute_lengths",
    "load_fortunes",
    "pad_sequences",
    "padding_report",
    "plan_epoch",
]
