"""Cross-layer parameter sharing: the only change from base.py is the callback.

python examples/parameter_sharing.py --limit 512 --max-length 128
"""

from _common import parse_args, run

from lightning_txopt import FortunesDataModule
from lightning_txopt.callbacks import ParameterSharing

args = parse_args(__doc__)
datamodule = FortunesDataModule(
    limit=args.limit,
    max_length=args.max_length,
    strategy="fixed",
    batch_size=args.batch_size,
)
# <- the MiniLM's 6 layers share 2 unique blocks (1,2,1,2,1,2); --tiny's 2 layers share 1
sharing = ParameterSharing(1 if args.tiny else 2, strategy="all" if args.tiny else "cycle")
run(args, datamodule, datamodule.num_labels, callbacks=[sharing])
