"""The three model-side callbacks together: one process (bf16 autocast on CPU) and 2 DDP processes (gloo).

Each run is compared with the three techniques written out by hand in a plain PyTorch loop over the batches the run
trained on: the repeated blocks shared by assigning the same module object to their positions, the embeddings left
out of AdamW for epoch 0 and added to it as a group of their own at epoch 1, no checkpointing (it must not change the
result), and under DDP each step's gradient the mean of the ranks' gradients. One process trains with AdamW; DDP with
SGD: attention's key bias has a zero gradient made of rounding noise, which differs between the workers and this
process (their thread counts differ), and AdamW would normalise that noise to full-size steps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_txopt.callbacks import FreezeEmbeddings, GradientCheckpointing, ParameterSharing
from lightning_txopt.data import BucketDataModule
from tests.helpers import ModelModule, PlainTransformer, cpu_trainer, loss_of, make_samples, prefixed, tiny_bert

N_SAMPLES = 64
EPOCHS = 2  # embeddings frozen in epoch 0, trained in epoch 1
ADAMW_LR, SGD_LR = 1e-2, 0.1
# by hand: the input embeddings of each model (FreezeEmbeddings finds them itself)
EMBEDDINGS: dict[Callable[[], nn.Module], tuple[str, ...]] = {
    tiny_bert: (
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
    ),
    PlainTransformer: ("tok.weight", "pos.weight"),
}


def _callbacks() -> list[Any]:
    return [
        ParameterSharing(2, strategy="cycle_rev"),  # 4 blocks: positions (0, 1, 2, 3) run blocks (0, 1, 1, 0)
        FreezeEmbeddings(unfreeze_at_epoch=1),
        GradientCheckpointing(every_n_layers=1),
    ]


def _dm() -> BucketDataModule:
    return BucketDataModule(make_samples(N_SAMPLES, seed=11), pad_token_id=0, max_tokens=128, seed=5)


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = model.get_submodule("bert.encoder.layer" if hasattr(model, "bert") else "layers")
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 4
    return blocks


class _Recording(ModelModule):
    """Records every batch it trains on with its epoch; with ``record_dir``, saves them per rank at fit end."""

    def __init__(self, model: nn.Module, optimizer: str, record_dir: str | None = None) -> None:
        super().__init__(
            model, optimizer=optimizer, lr=ADAMW_LR if optimizer == "adamw" else SGD_LR, record_dir=record_dir
        )
        self.batches: list[tuple[int, dict[str, torch.Tensor]]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batches.append((self.current_epoch, {k: v.detach().cpu().clone() for k, v in batch.items()}))
        return super().training_step(batch, batch_idx)

    def on_fit_end(self) -> None:
        super().on_fit_end()
        if self.record_dir is not None:
            torch.save(self.batches, Path(self.record_dir) / f"batches_rank{self.global_rank}.pt")


def _reference(
    factory: Callable[[], nn.Module],
    per_rank: list[list[tuple[int, dict[str, torch.Tensor]]]],
    optimizer_name: str,
    bf16: bool = False,
) -> dict[str, torch.Tensor]:
    """The final weights of the techniques by hand (module docstring) on the recorded batches of each rank."""
    model = factory()
    blocks = _blocks(model)
    blocks[2], blocks[3] = blocks[1], blocks[0]  # cycle_rev, each group keeping its first position's weights
    embeddings = [model.get_parameter(name) for name in EMBEDDINGS[factory]]
    for p in embeddings:
        p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = (
        torch.optim.AdamW(trainable, lr=ADAMW_LR, weight_decay=0.01)  # as ModelModule's
        if optimizer_name == "adamw"
        else torch.optim.SGD(trainable, lr=SGD_LR)
    )
    for step in zip(*per_rank, strict=True):  # one optimizer step per batch, the same step on every rank
        epoch = step[0][0]
        assert all(e == epoch for e, _ in step)
        if epoch == 1 and not embeddings[0].requires_grad:
            for p in embeddings:
                p.requires_grad_(True)
            optimizer.add_param_group({"params": embeddings})  # the optimizer's defaults: the same settings
        optimizer.zero_grad(set_to_none=True)
        for _, batch in step:
            # as Lightning's bf16-mixed: no cast cache (with one, a shared block's weight is cast once per forward
            # and the gradients of its uses are summed in bf16, not in fp32)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
                loss = loss_of(model, {k: v for k, v in batch.items() if k != "idx"})
            (loss / len(step)).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _epoch_ids(per_rank: list[list[tuple[int, dict[str, torch.Tensor]]]], epoch: int) -> list[int]:
    return sorted(i for batches in per_rank for e, b in batches if e == epoch for i in b["idx"].tolist())


def _assert_equal_states(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], **tolerance: Any) -> None:
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, msg=prefixed(k), **tolerance)


@pytest.mark.ddp
@pytest.mark.parametrize("factory", [tiny_bert, PlainTransformer])
def test_ddp_two_processes_all_three(tmp_path, factory):
    module = _Recording(factory(), "sgd", record_dir=str(tmp_path))
    trainer = cpu_trainer(max_epochs=EPOCHS, devices=2, strategy="ddp_spawn", callbacks=_callbacks())
    trainer.fit(module, datamodule=_dm())
    params = [torch.load(tmp_path / f"params_rank{r}.pt") for r in range(2)]
    per_rank = [torch.load(tmp_path / f"batches_rank{r}.pt") for r in range(2)]
    for k in params[0]:  # the ranks stayed in sync, the unfrozen embeddings included
        torch.testing.assert_close(params[0][k], params[1][k], rtol=0, atol=0, msg=k)
    assert len(per_rank[0]) == len(per_rank[1])  # one step per batch on each rank
    for epoch in range(EPOCHS):  # every sample once per epoch over the ranks (none repeated to even them, here)
        assert _epoch_ids(per_rank, epoch) == list(range(N_SAMPLES))
    _assert_equal_states(params[0], _reference(factory, per_rank, "sgd"), rtol=1e-5, atol=1e-6)


class _StateAfterEpoch0(pl.Callback):
    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, ModelModule)
        if trainer.current_epoch == 0:
            self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


@pytest.mark.parametrize("factory", [tiny_bert, PlainTransformer])
def test_bf16_mixed_on_cpu_all_three(factory):
    module = _Recording(factory(), "adamw")
    initial = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    after_epoch0 = _StateAfterEpoch0()
    trainer = cpu_trainer(max_epochs=EPOCHS, precision="bf16-mixed", callbacks=[*_callbacks(), after_epoch0])
    trainer.fit(module, datamodule=_dm())
    for epoch in range(EPOCHS):  # every sample once per epoch, one optimizer step per batch
        assert _epoch_ids([module.batches], epoch) == list(range(N_SAMPLES))
    assert trainer.global_step == len(module.batches) == EPOCHS * trainer.num_training_batches
    blocks = _blocks(module.model)
    assert blocks[0] is blocks[3] and blocks[1] is blocks[2] and blocks[0] is not blocks[1]
    for name in EMBEDDINGS[factory]:  # frozen through epoch 0, trained in epoch 1
        torch.testing.assert_close(after_epoch0.state[name], initial[name], rtol=0, atol=0, msg=name)
        assert not torch.equal(module.model.state_dict()[name], initial[name]), name
    expected = _reference(factory, [module.batches], "adamw", bf16=True)
    _assert_equal_states(module.model.state_dict(), expected, rtol=1e-5, atol=1e-6)
