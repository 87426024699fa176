"""A token budget found by probing the GPU: the changes from base.py are max_tokens="auto" and the callback.

python examples/token_budget.py --limit 512 --max-length 128

TokenBudgetFinder measures peak CUDA memory, so it needs a CUDA device. Without one this script says so and runs
it on an estimate instead (SavedTensorsMemory: the activation bytes of the probe steps, against a pretend 64 MiB
device): that shows what the finder does, not a budget for your hardware.
"""

import torch
from _common import parse_args, run

from lightning_txopt import FortunesDataModule, TokenBudgetFinder
from lightning_txopt.memory import SavedTensorsMemory

args = parse_args(__doc__)
datamodule = FortunesDataModule(
    limit=args.limit,
    max_length=args.max_length,
    strategy="bucket",
    max_tokens="auto",  # <- the finder sets the budget at fit start
)
memory = None
if args.accelerator == "cpu" or not torch.cuda.is_available():
    print("No CUDA device: TokenBudgetFinder needs one to measure memory. Using an estimate (a pretend 64 MiB device).")
    memory = SavedTensorsMemory(capacity=64 * 2**20)
finder = TokenBudgetFinder(min_tokens=args.max_length, memory=memory)  # <- the longest sample fits
run(args, datamodule, datamodule.num_labels, callbacks=[finder])
print(f"TokenBudgetFinder chose max_tokens={finder.budget} in {finder.seconds:.1f} s.")
