"""Length-aware batching: lengths, planning, sampler, collators, samples as columns, DataModule, padding report."""

from lightning_txopt.data.collator import PaddingCollator, pad_sequences, padded_widths
from lightning_txopt.data.corpus import load_fortunes
from lightning_txopt.data.datamodule import BucketDataModule
from lightning_txopt.data.flat import FlatSamples, SampleBatch
from lightning_txopt.data.fortunes import FortunesDataModule
from lightning_txopt.data.lengths import compute_lengths
from lightning_txopt.data.packing import PackingCollator
from lightning_txopt.data.planning import EpochPlan, plan_epoch
from lightning_txopt.data.report import PaddingRow, padding_report
from lightning_txopt.data.sampler import BucketBatchSampler
from lightning_txopt.data.text import TextDataModule, read_records

__all__ = [
    "BucketBatchSampler",
    "BucketDataModule",
    "EpochPlan",
    "FlatSamples",
    "FortunesDataModule",
    "PackingCollator",
    "PaddingCollator",
    "PaddingRow",
    "SampleBatch",
    "TextDataModule",
    "compute_lengths",
    "load_fortunes",
    "pad_sequences",
    "padded_widths",
    "padding_report",
    "plan_epoch",
    "read_records",
]
