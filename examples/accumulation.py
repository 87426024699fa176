"""Exact, scheduled gradient accumulation: the only change from base.py is the callback.

python examples/accumulation.py --limit 512 --max-length 128
"""

from _common import parse_args, run

from lightning_txopt import FortunesDataModule
from lightning_txopt.callbacks import AccumulationScheduler

args = parse_args(__doc__)
datamodule = FortunesDataModule(
    limit=args.limit,
    max_length=args.max_length,
    strategy="fixed",
    batch_size=args.batch_size,
)
accumulate = AccumulationScheduler({0: 1, 1: 4})  # <- 1 micro-batch per step in epoch 0, then 4, exact mean
run(args, datamodule, datamodule.num_labels, callbacks=[accumulate])
