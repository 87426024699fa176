"""Padding-free packing: the changes from base.py are the DataModule's batching and, with --compile, the model's.

python examples/packing.py --limit 512 --max-length 128 --max-tokens 4096
python examples/packing.py --limit 512 --max-length 128 --max-tokens 4096 --compile
python examples/packing.py --max-tokens 16384 --compile --compile-mode reduce-overhead --precision bf16-mixed  # GPU

Samples are concatenated into rows of max_length tokens, max_tokens // max_length rows per batch; the batch carries
the samples' boundaries and no mask. TransformerModule runs packed rows on FlashAttention's variable-length kernel on
a CUDA GPU in bf16/fp16 (add --precision bf16-mixed there), and on an exact block-masked SDPA elsewhere. With
--compile every batch has the same shapes (static_shapes=True), so torch.compile compiles the model once;
--compile-mode reduce-overhead then replays the compiled graphs as CUDA graphs (on a GPU: docs/packing.md says when
that is faster).
"""

import argparse

import lightning.pytorch as pl
from transformers import BertConfig

from lightning_txopt import FortunesDataModule, TokenThroughputMonitor, TransformerModule
from lightning_txopt.data.fortunes import default_tokenizer_path

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--limit", type=int, default=None, help="a seeded random subset of N texts (default: all 14,396)")
parser.add_argument("--max-length", type=int, default=512, help="texts are truncated to this many tokens")
parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch")  # <-
parser.add_argument("--compile", action="store_true", help="static shapes + torch.compile")  # <-
parser.add_argument("--compile-mode", default=None, help="with --compile: e.g. reduce-overhead (CUDA graphs)")  # <-
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
    strategy="packed",  # <- samples back to back in rows of max_length tokens, no padding between them
    max_tokens=args.max_tokens,  # <- tokens per batch: max_tokens // max_length rows
    static_shapes=args.compile,  # <- every batch exactly the same shapes: compiled once
)
if args.tiny:
    model = TransformerModule(
        config=BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
        num_labels=datamodule.num_labels,
        learning_rate=1e-4,
        compile=args.compile,  # <-
        compile_mode=args.compile_mode,  # <- None: torch's default; "reduce-overhead": CUDA graphs
    )
else:
    model = TransformerModule(
        str(default_tokenizer_path()),  # the pretrained all-MiniLM-L6-v2
        num_labels=datamodule.num_labels,
        compile=args.compile,  # <-
        compile_mode=args.compile_mode,  # <- None: torch's default; "reduce-overhead": CUDA graphs
    )
monitor = TokenThroughputMonitor()  # only measures: real (non-padding) tokens per second of training
trainer = pl.Trainer(
    max_epochs=args.epochs,
    max_steps=args.max_steps,
    precision=args.precision,
    accelerator=args.accelerator,
    devices=1,
    callbacks=[monitor],
    logger=False,
    enable_checkpointing=False,
)
trainer.fit(model, datamodule=datamodule)

tokens, seconds = monitor.totals["real_tokens"], monitor.train_seconds
print(f"{trainer.global_step} optimizer steps")
print(f"{tokens:,} real tokens in {seconds:.1f} s of training ({tokens / seconds:,.0f} real tokens/s)")
print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})
