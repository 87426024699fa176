"""Length-grouped batches under a token budget: the only change from base.py is the DataModule's strategy.

python examples/bucketing.py --limit 512 --max-length 128 --max-tokens 4096
python examples/bucketing.py --limit 512 --max-length 128 --max-tokens 4096 --ladder 16 32 64 128   # bounded shapes
"""

from _common import parse_args, run

from lightning_txopt import FortunesDataModule

args = parse_args(__doc__, ladder=True)
datamodule = FortunesDataModule(
    limit=args.limit,
    max_length=args.max_length,
    strategy="bucket",  # <- group similar lengths, pad each batch to its longest sample
    batch_size=None if args.max_tokens else args.batch_size,
    max_tokens=args.max_tokens,  # <- or fill a budget of padded tokens per batch
    pad_to_lengths=args.ladder,  # <- optional: pad to a few fixed widths (torch.compile, cuDNN attention plans)
)
run(args, datamodule, datamodule.num_labels)
