"""The library under Lightning's sharded strategies on one CUDA GPU: ``FSDPStrategy`` (FSDP1) and, where Lightning has
it, ``ModelParallelStrategy`` with torch's ``fully_shard`` (FSDP2). Skipped without CUDA.

One process shards nothing, but every code path runs: FSDP1's wrapping, flat parameters and their views (FSDP1 runs
``NO_SHARD`` on one process: the views keep their shapes), FSDP2's ``DTensor`` parameters, sharded and full
checkpoints, gradient reduction through ``torch.distributed``. Each test is small and independent; references are
unsharded runs of the same model on the same batches. All tests share one world-1 process group (Lightning creates
it in the first test); the module fixture destroys it and restores the environment variables Lightning set, so the
other GPU test files run as before. Two processes: ``tests/callbacks/test_fsdp_cpu.py`` (FSDP2 on gloo); several GPUs
belong to the multi-GPU tests.

Set ``TXOPT_RESULTS_DIR`` to a folder to get the measured memory figures as ``fsdp_memory.json`` there
(``docs/fsdp.md``, "Measured").
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from transformers.models.bert.modeling_bert import BertEncoder, BertLayer
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from lightning_txopt.callbacks import (
    AccumulationScheduler,
    FreezeEmbeddings,
    GradientCheckpointing,
    ParameterSharing,
    TokenThroughputMonitor,
)
from lightning_txopt.data import BucketDataModule
from lightning_txopt.module import TransformerModule
from tests.fsdp_helpers import (
    FROZEN,
    FSDP2Transformer,
    ShardedSumModule,
    assert_update_is_gradient,
    counting_reductions,
    fsdp2_available,
    full_parameters,
    parameter_at,
    reference_window_gradient,
    windows,
)
from tests.helpers import BERT_DICT, GPT2_DICT, cpu_trainer, make_samples, restoring_process_group

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_fsdp2 = pytest.mark.skipif(not fsdp2_available(), reason="needs ModelParallelStrategy and torch's fully_shard")

REL = 1e-4  # fp32 on the GPU against fp32 on the CPU


@pytest.fixture(scope="module", autouse=True)
def _one_process_group():
    with restoring_process_group():
        yield


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()
    torch.cuda.empty_cache()


def fsdp(policy: Any = frozenset({BertLayer}), **kwargs: Any) -> FSDPStrategy:
    return FSDPStrategy(auto_wrap_policy=set(policy) if policy is not None else None, **kwargs)


def fsdp2() -> Any:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)


def gpu_trainer(strategy: Any, **kwargs: Any) -> Any:
    defaults: dict[str, Any] = dict(precision="32-true")
    defaults.update(kwargs)
    return cpu_trainer(accelerator="cuda", devices=1, strategy=strategy, **defaults)


def _dm(**kwargs: Any) -> BucketDataModule:
    samples = make_samples(48, seed=21)
    for s in samples[::3]:
        s["labels"] = -100  # ignored items: counts differ from sample counts
    defaults: dict[str, Any] = dict(pad_token_id=0, max_tokens=96, seed=4)
    defaults.update(kwargs)
    return BucketDataModule(samples, **defaults)


def _lm_samples(n: int = 64) -> list[dict]:
    return [{"input_ids": s["input_ids"], "labels": s["input_ids"]} for s in make_samples(n, seed=5)]


def _check_steps(module: ShardedSumModule, **reference: Any) -> int:
    steps = windows(module.snapshots)
    assert steps, "no optimizer step"
    for start, end, before, after in steps:
        gradient = reference_window_gradient(before, module.micro_batches[start:end], **reference)
        assert_update_is_gradient(before, after, gradient, rel=REL)
    return len(steps)


# --------------------------------------------------------------------------- FSDP1: gradients and checkpointing


@pytest.mark.parametrize("checkpointing", ["none", "ours_native", "ours_wrapper", "lightning_policy"])
def test_fsdp1_update_is_the_unsharded_gradient(checkpointing):
    """Wrapped blocks (auto_wrap_policy={BertLayer}), with each way of checkpointing them, train exactly."""
    callbacks = []
    kwargs: dict[str, Any] = {}
    if checkpointing == "ours_native":
        callbacks.append(GradientCheckpointing())
    elif checkpointing == "ours_wrapper":
        callbacks.append(GradientCheckpointing(prefer_native=False))
    elif checkpointing == "lightning_policy":
        kwargs["activation_checkpointing_policy"] = {BertLayer}
    module = ShardedSumModule("mean")
    gpu_trainer(fsdp(**kwargs), max_steps=2, callbacks=callbacks).fit(module, datamodule=_dm())
    assert _check_steps(module, reduction="mean") == 2
    if callbacks:
        assert callbacks[0].plan is not None and callbacks[0].plan.checkpointed == (0, 1)


def test_fsdp1_checkpointing_twice_is_refused():
    strategy = fsdp(activation_checkpointing_policy={BertLayer})
    trainer = gpu_trainer(strategy, max_steps=1, callbacks=[GradientCheckpointing()])
    with pytest.raises(ValueError, match=r"FSDPStrategy wrapped .* checkpoint_wrapper.*recomputed twice"):
        trainer.fit(ShardedSumModule("mean", record=False), datamodule=_dm())


# --------------------------------------------------------------------------- FSDP1: accumulation


def test_fsdp1_accumulated_update_is_the_exact_window_gradient_without_reductions_inside_windows():
    module = ShardedSumModule("sum")
    callback = AccumulationScheduler({0: 3}, normalize="tokens")
    with counting_reductions(module):
        gpu_trainer(fsdp(), max_steps=3, callbacks=[callback]).fit(module, datamodule=_dm())
    assert _check_steps(module, reduction="sum") == 3
    stepping = [count for _, count, stepped in module.comms if stepped]
    intermediate = [count for _, count, stepped in module.comms if not stepped]
    assert len(stepping) == 3 and all(c > 0 for c in stepping), module.comms  # FSDP1 reduces each flat gradient
    assert len(intermediate) >= 4 and intermediate == [0] * len(intermediate), module.comms
    # the control: reduce_every_micro_batch=True reduces every micro-batch (Lightning's own no_sync() kept off)
    every = ShardedSumModule("sum", record=False)
    callback = AccumulationScheduler({0: 3}, normalize="tokens", reduce_every_micro_batch=True)
    with counting_reductions(every):
        gpu_trainer(fsdp(), max_steps=1, callbacks=[callback]).fit(every, datamodule=_dm())
    assert len(every.comms) == 3 and all(count > 0 for _, count, _ in every.comms), every.comms
    # Lightning alone skips FSDP1's reduction inside windows too: its loop enters strategy.model.no_sync() where
    # the model passes its DistributedDataParallel check, a Protocol that FullyShardedDataParallel passes
    alone = ShardedSumModule("sum", record=False)
    with counting_reductions(alone):
        gpu_trainer(fsdp(), max_steps=1, accumulate_grad_batches=3).fit(alone, datamodule=_dm())
    assert [(count > 0, stepped) for _, count, stepped in alone.comms] == [(False, False)] * 2 + [(True, True)]


# --------------------------------------------------------------------------- FSDP1: parameter sharing


def test_fsdp1_shared_blocks_in_one_unit_train_exactly_and_split_ones_are_refused():
    module = ShardedSumModule("mean", num_layers=4)
    trainer = gpu_trainer(fsdp({BertLayer}), max_steps=1, callbacks=[ParameterSharing(2)])
    with pytest.raises(ValueError, match=r"shared block BertLayer .*auto_wrap_policy=\{BertEncoder\}"):
        trainer.fit(module, datamodule=_dm())
    module = ShardedSumModule("mean", num_layers=4)
    gpu_trainer(fsdp({BertEncoder}), max_steps=2, callbacks=[ParameterSharing(2)]).fit(module, datamodule=_dm())
    assert _check_steps(module, reduction="mean", share=2, num_layers=4) == 2


# --------------------------------------------------------------------------- frozen embeddings and their memory

BIG_VOCAB = {**BERT_DICT, "vocab_size": 32768, "hidden_size": 64, "intermediate_size": 128}


class _Memory(Callback):
    """``torch.cuda.memory_allocated`` growth from the start of training to the second step (gradients + optimizer
    state; activations are freed by then), and the frozen embeddings before and after training."""

    def __init__(self) -> None:
        self.start = 0
        self.growth = 0
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.start = torch.cuda.memory_allocated()
        self.before = full_parameters(pl_module, FROZEN)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 1:
            torch.cuda.synchronize()
            self.growth = torch.cuda.memory_allocated() - self.start

    def on_train_end(self, trainer, pl_module):
        self.after = full_parameters(pl_module, FROZEN)


def _memory_run(strategy: Any, frozen: bool) -> tuple[_Memory, FreezeEmbeddings | None, Any]:
    torch.manual_seed(0)
    cls = FSDP2Transformer if not isinstance(strategy, FSDPStrategy) else TransformerModule
    module = cls(config=BIG_VOCAB, num_labels=3)
    memory = _Memory()
    freeze = FreezeEmbeddings() if frozen else None
    callbacks: list[Callback] = [memory] + ([freeze] if freeze else [])
    data = BucketDataModule(make_samples(64, seed=2), pad_token_id=0, max_tokens=256)
    trainer = gpu_trainer(strategy, max_steps=3, callbacks=callbacks)
    trainer.fit(module, datamodule=data)
    optimizer = trainer.optimizers[0]
    # by attribute, not named_parameters(): FSDP1 no longer lists the parameters of a unit that is all frozen
    frozen_params = [parameter_at(module, n) for n in FROZEN]
    if frozen:
        assert all(p.grad is None for p in frozen_params)  # no gradient
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert not any(id(p) in in_optimizer or optimizer.state.get(p) for p in frozen_params)  # no state
        assert all(id(p) in in_optimizer for p in optimizer.state)
        for name in FROZEN:  # no change
            torch.testing.assert_close(memory.after[name], memory.before[name], rtol=0, atol=0)
    assert optimizer.defaults.get("fused") is True  # TransformerModule's fused AdamW, on DTensors too
    return memory, freeze, trainer


def _optimized_numel(trainer: Any) -> int:
    return sum(p.numel() for g in trainer.optimizers[0].param_groups for p in g["params"])  # one process: all local


def _record(name: str, figures: dict[str, Any]) -> None:
    folder = os.environ.get("TXOPT_RESULTS_DIR")
    if not folder:
        return
    path = Path(folder) / "fsdp_memory.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = figures
    path.write_text(json.dumps(data, indent=2))


_MEMORY_CASES = {
    "fsdp1_blocks": lambda: fsdp({BertLayer}),  # embeddings share the root unit with the head: flat gradient
    "fsdp1_own_units": lambda: fsdp({BertLayer, nn.Embedding}),  # each table a frozen unit: no gradient
    "fsdp2": fsdp2,
}


@pytest.mark.parametrize("case", list(_MEMORY_CASES))
def test_frozen_embeddings_save_the_memory_they_report(case):
    if case == "fsdp2" and not fsdp2_available():
        pytest.skip("needs ModelParallelStrategy and torch's fully_shard")
    trained, _, trained_trainer = _memory_run(_MEMORY_CASES[case](), frozen=False)
    frozen_memory, freeze, frozen_trainer = _memory_run(_MEMORY_CASES[case](), frozen=True)
    assert freeze is not None and freeze.memory is not None
    report = freeze.memory
    numel = 32768 * 64 + 64 * 64 + 2 * 64  # token, position and type tables (fp32, one process: all local)
    # the optimizer holds everything but the tables (FSDP1 may expose them as tensors the optimizer would not hold)
    assert _optimized_numel(trained_trainer) - _optimized_numel(frozen_trainer) == numel
    assert report.local_parameters == numel and report.optimizer_bytes == 8 * numel
    expected_gradient = 0 if case == "fsdp1_blocks" else 4 * numel  # PyTorch #104967
    assert report.gradient_bytes == expected_gradient
    measured = trained.growth - frozen_memory.growth
    _record(case, {"measured_bytes_saved": measured, "reported": report.__dict__, "total": report.total_bytes})
    assert abs(measured - report.total_bytes) <= 2**20 + 0.02 * report.total_bytes, (measured, report)


def test_fsdp1_unfreezing_and_flat_frozen_units_are_refused():
    module = TransformerModule(config=BERT_DICT, num_labels=3)
    trainer = gpu_trainer(fsdp(), max_epochs=2, callbacks=[FreezeEmbeddings(unfreeze_at_epoch=1)])
    with pytest.raises(ValueError, match=r"unfreeze_at_epoch=1\) supports DDP strategies only, got FSDPStrategy"):
        trainer.fit(module, datamodule=_dm())
    module = TransformerModule(config=BERT_DICT, num_labels=3)
    trainer = gpu_trainer(fsdp(use_orig_params=False), max_steps=1, callbacks=[FreezeEmbeddings()])
    with pytest.raises(ValueError, match=r"use_orig_params=False"):
        trainer.fit(module, datamodule=_dm())


# --------------------------------------------------------------------------- BucketDataModule: exact resume


class _Seen(Callback):
    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []
        self.params: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["input_ids"].detach().cpu().clone())

    def on_train_end(self, trainer, pl_module):
        self.params = full_parameters(pl_module)


def _resume(tmp_path: Path, strategy: Any, module: Any, data: Any) -> None:
    """6 steps checkpointing at step 3 (mid-epoch) vs 3 more steps from that checkpoint: same batches, same weights."""
    full, resumed = _Seen(), _Seen()
    save = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    first = gpu_trainer(strategy(), max_steps=6, callbacks=[full, save], enable_checkpointing=True)
    first.fit(module(), datamodule=data())
    assert 3 % first.num_training_batches != 0, "the checkpoint at step 3 must fall inside an epoch"
    path = tmp_path / "step=3.ckpt"
    gpu_trainer(strategy(), max_steps=6, callbacks=[resumed]).fit(module(), datamodule=data(), ckpt_path=str(path))
    assert len(resumed.batches) == 3
    for a, b in zip(full.batches[3:], resumed.batches, strict=True):
        assert torch.equal(a, b)
    for name, value in full.params.items():
        torch.testing.assert_close(resumed.params[name], value, rtol=1e-5, atol=1e-6, msg=name)


def _classifier() -> TransformerModule:
    torch.manual_seed(0)
    return TransformerModule(config=BERT_DICT, num_labels=3, learning_rate=1e-3, warmup=0.0)


def _causal_lm() -> TransformerModule:
    torch.manual_seed(0)
    return TransformerModule(config=GPT2_DICT, task="causal-lm", learning_rate=1e-3, warmup=0.0)


@pytest.mark.parametrize(
    "state_dict_type, data",
    [("sharded", "bucket"), ("sharded", "tokens"), ("sharded", "packed"), ("full", "tokens")],
)
def test_fsdp1_datamodule_resumes_exactly(tmp_path, state_dict_type, data):
    def make_data() -> BucketDataModule:
        if data == "bucket":
            return BucketDataModule(make_samples(60, seed=3), pad_token_id=0, batch_size=8)
        if data == "tokens":
            return BucketDataModule(make_samples(60, seed=3), pad_token_id=0, max_tokens=128)
        return BucketDataModule(
            _lm_samples(), pad_token_id=0, max_tokens=128, strategy="packed", max_length=64, causal=True
        )

    module, policy = (_causal_lm, {GPT2Block}) if data == "packed" else (_classifier, {BertLayer})
    _resume(tmp_path, lambda: fsdp(policy, state_dict_type=state_dict_type), module, make_data)
    if state_dict_type == "sharded":
        assert (tmp_path / "step=3.ckpt").is_dir()  # a folder of shards and meta.pt
    else:
        assert (tmp_path / "step=3.ckpt").is_file()


# --------------------------------------------------------------------------- TransformerModule and throughput


class _FirstLoss(Callback):
    def __init__(self) -> None:
        self.batch: dict[str, torch.Tensor] | None = None
        self.loss: float | None = None
        self.real_tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.real_tokens += int(batch["attention_mask"].sum())
        if self.batch is None:
            self.batch = {k: v.detach().cpu().clone() for k, v in batch.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.loss is None:
            self.loss = float(outputs["loss"])


@pytest.mark.parametrize("strategy", ["fsdp1", "fsdp2"])
def test_transformer_module_fused_adamw_chunked_loss_and_throughput(strategy):
    """Fused AdamW; the chunked loss under FSDP1 (the head is a plain Linear inside the root unit), full logits under
    FSDP2 (DTensor head); the first loss equals the unsharded model's; the monitor counts every real token."""
    if strategy == "fsdp2" and not fsdp2_available():
        pytest.skip("needs ModelParallelStrategy and torch's fully_shard")
    torch.manual_seed(0)
    module = (TransformerModule if strategy == "fsdp1" else FSDP2Transformer)(config=GPT2_DICT, task="causal-lm")
    reference = TransformerModule(config=GPT2_DICT, task="causal-lm", loss_chunk_size=None)
    reference.load_state_dict(module.state_dict())
    first, monitor = _FirstLoss(), TokenThroughputMonitor(log_every_n_steps=2)
    data = BucketDataModule(_lm_samples(), pad_token_id=0, max_tokens=256)
    trainer = gpu_trainer(
        fsdp({GPT2Block}) if strategy == "fsdp1" else fsdp2(), max_steps=4, callbacks=[first, monitor]
    )
    trainer.fit(module, datamodule=data)
    assert trainer.optimizers[0].defaults.get("fused") is True
    assert module._chunked is (strategy == "fsdp1")
    assert first.batch is not None and first.loss is not None
    with torch.no_grad():
        expected, _, _ = reference.loss_and_items(first.batch, "mean")
    assert abs(first.loss - float(expected)) <= 1e-4 * abs(float(expected))
    assert monitor.totals["real_tokens"] == first.real_tokens
    assert monitor.last["throughput/real_tokens_per_sec"] > 0
    assert module.flops_per_token() == reference.flops_per_token()  # parameters counted in full (one process)


# --------------------------------------------------------------------------- FSDP2 on one GPU


@needs_fsdp2
def test_fsdp2_accumulation_and_frozen_embeddings_are_exact():
    module = ShardedSumModule("sum")
    callbacks = [FreezeEmbeddings(), GradientCheckpointing(), AccumulationScheduler({0: 3}, normalize="tokens")]
    with counting_reductions(module):
        gpu_trainer(fsdp2(), max_steps=2, callbacks=callbacks).fit(module, datamodule=_dm())
    assert _check_steps(module, reduction="sum", frozen=FROZEN) == 2
    # FSDP2 on one process skips the collective itself; the sharded gradient appears only at the window's end
    assert module.grad_present_after_backward[:3] == [False, False, True]


@needs_fsdp2
def test_fsdp2_datamodule_resumes_exactly_from_a_sharded_checkpoint(tmp_path):
    def causal_lm() -> FSDP2Transformer:
        torch.manual_seed(0)
        return FSDP2Transformer(config=GPT2_DICT, task="causal-lm", learning_rate=1e-3, warmup=0.0)

    _resume(tmp_path, fsdp2, causal_lm, lambda: BucketDataModule(_lm_samples(), pad_token_id=0, max_tokens=128))
    assert (tmp_path / "step=3.ckpt").is_dir()
