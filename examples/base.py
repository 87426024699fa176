"""Baseline: fine-tune on the embedded corpus with fixed padding to max_length (what most tutorials do).

python examples/base.py --limit 512 --max-length 128
"""

from _common import parse_args, run

from lightning_txopt import FortunesDataModule

args = parse_args(__doc__)
datamodule = FortunesDataModule(
    limit=args.limit,
    max_length=args.max_length,
    strategy="fixed",
    batch_size=args.batch_size,
)
run(args, datamodule, datamodule.num_labels)
