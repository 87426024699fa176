"""Gradient checkpointing: the only change from base.py is the callback.

python examples/gradient_checkpointing.py --limit 512 --max-length 128
"""

from _common import parse_args, run

from lightning_txopt import FortunesDataModule
from lightning_txopt.callbacks import GradientCheckpointing

args = parse_args(__doc__)
datamodule = FortunesDataModule(
    limit=args.limit,
    max_length=args.max_length,
    strategy="fixed",
    batch_size=args.batch_size,
)
run(args, datamodule, datamodule.num_labels, callbacks=[GradientCheckpointing()])  # <- recompute activations
