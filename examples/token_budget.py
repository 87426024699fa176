"""A token budget found by probing the GPU: the changes from base.py are max_tokens="auto" (bucketed) and a callback.

python examples/token_budget.py --limit 512 --max-length 128

TokenBudgetFinder measures peak CUDA memory, so it needs a CUDA device. Without one this script says so and runs
it on an estimate instead (SavedTensorsMemory: the activation bytes of the probe steps, against a pretend 64 MiB
device): that shows what the finder does, not a budget for your hardware.
"""

import argparse

import lightning.pytorch as pl
import torch  # <-
from transformers import BertConfig

from lightning_txopt import FortunesDataModule, TokenBudgetFinder, TokenThroughputMonitor, TransformerModule  # <-
from lightning_txopt.data.fortunes import default_tokenizer_path
from lightning_txopt.memory import SavedTensorsMemory  # <-

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--limit", type=int, default=None, help="a seeded random subset of N texts (default: all 14,396)")
parser.add_argument("--max-length", type=int, default=512, help="texts are truncated to this many tokens")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: no limit)")
parser.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of the pretrained MiniLM")
parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed on a GPU")
parser.add_argument("--accelerator", default="auto")
args = parser.parse_args()

pl.seed_everything(0)
datamodule = FortunesDataModule(  # 40 categories; a seeded 10% held out for validation
    limit=args.limit,
    max_length=args.max_length,
    strategy="bucket",  # <- length-grouped batches
    max_tokens="auto",  # <- the finder sets the budget at fit start
)
if args.tiny:
    model = TransformerModule(
        config=BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
        num_labels=datamodule.num_labels,
        learning_rate=1e-4,
    )
else:
    model = TransformerModule(
        str(default_tokenizer_path()),  # the pretrained all-MiniLM-L6-v2
        num_labels=datamodule.num_labels,
    )
memory = None  # <- CUDA's allocator
if args.accelerator == "cpu" or not torch.cuda.is_available():  # <-
    print("No CUDA device: TokenBudgetFinder runs on an estimate (a pretend 64 MiB device).")  # <-
    memory = SavedTensorsMemory(capacity=64 * 2**20)  # <-
finder = TokenBudgetFinder(min_tokens=args.max_length, memory=memory)  # <- the longest sample fits
monitor = TokenThroughputMonitor()  # only measures: real (non-padding) tokens per second of training
trainer = pl.Trainer(
    max_epochs=args.epochs,
    max_steps=args.max_steps,
    precision=args.precision,
    accelerator=args.accelerator,
    devices=1,
    callbacks=[monitor, finder],  # <-
    logger=False,
    enable_checkpointing=False,
)
trainer.fit(model, datamodule=datamodule)

tokens, seconds = monitor.totals["real_tokens"], monitor.train_seconds
print(f"{trainer.global_step} optimizer steps")
print(f"{tokens:,} real tokens in {seconds:.1f} s of training ({tokens / seconds:,.0f} real tokens/s)")
print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})
print(f"TokenBudgetFinder chose max_tokens={finder.budget} in {finder.seconds:.1f} s.")  # <-
