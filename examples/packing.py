"""Padding-free packing: the only change from base.py is the DataModule's strategy.

python examples/packing.py --limit 512 --max-length 128 --max-tokens 4096
"""

from _common import parse_args, run

from lightning_txopt import FortunesDataModule

args = parse_args(__doc__)
datamodule = FortunesDataModule(
    limit=args.limit,
    max_length=args.max_length,  # <- the row length: samples are concatenated into rows of this many tokens
    strategy="packed",  # <- no padding between samples; position ids restart, block-diagonal attention masks
    max_tokens=args.max_tokens or 4096,  # <- tokens per batch: max_tokens // max_length rows
)
run(args, datamodule, datamodule.num_labels)
