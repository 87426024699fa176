"""The callbacks and the DataModule under sharded training on the CPU: FSDP2 (``fully_shard``) on two gloo processes.

Lightning's ``FSDPStrategy`` (FSDP1) refuses the CPU (and passes torch's FSDP1 no CPU device); ``ModelParallelStrategy``
with torch's ``fully_shard`` runs on a gloo device mesh. One pair of processes (``_worker``) runs every scenario with
a real ``Trainer(strategy=ModelParallelStrategy(data_parallel_size=2))`` and saves what it saw; the tests compare that
with unsharded references computed here. FSDP1's own paths are in ``tests/gpu/test_fsdp.py``; the setup-time
refusals, which need no process group, are tested here on both strategies with stub trainers, and one behaviour of
torch's FSDP1 itself on one process (torch runs it on the CPU when given ``device_id=torch.device("cpu")``).
"""

from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from transformers.models.bert.modeling_bert import BertEncoder, BertLayer

from lightning_txopt.callbacks import (
    AccumulationScheduler,
    FreezeEmbeddings,
    GradientCheckpointing,
    ParameterSharing,
    TokenThroughputMonitor,
    share_layers,
)
from lightning_txopt.callbacks.parameter_sharing import check_sharing_wrap_policy
from tests.fsdp_helpers import (
    FROZEN,
    assert_update_is_gradient,
    fsdp2_available,
    reference_window_gradient,
    windows,
)
from tests.helpers import GPT2_DICT, ModelModule, make_samples, tiny_bert

# --------------------------------------------------------------------------- setup-time refusals (no process group)


def _stub_trainer(strategy: Any, **kwargs: Any) -> Any:
    defaults = dict(
        max_epochs=3,
        world_size=1,
        strategy=strategy,
        precision_plugin=object(),
        precision="32-true",
        accumulate_grad_batches=1,
        current_epoch=0,
        global_step=0,
    )
    defaults.update(kwargs)
    return SimpleNamespace(**defaults)


def _model_parallel() -> Any:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy()


@pytest.mark.skipif(not fsdp2_available(), reason="needs ModelParallelStrategy and fully_shard")
@pytest.mark.parametrize("strategy", [FSDPStrategy, _model_parallel], ids=["fsdp", "model_parallel"])
def test_unfreeze_is_refused_under_fsdp_on_any_number_of_processes(strategy):
    callback = FreezeEmbeddings(unfreeze_at_epoch=1)
    with pytest.raises(
        ValueError, match=r"unfreeze_at_epoch=1\) supports DDP strategies only, got .*Strategy.*two runs"
    ):
        callback.setup(_stub_trainer(strategy()), ModelModule(tiny_bert()), "fit")
    assert callback.frozen is None
    FreezeEmbeddings().setup(_stub_trainer(strategy()), ModelModule(tiny_bert()), "fit")  # frozen for good: fine


def test_freezing_under_fsdp1_needs_use_orig_params():
    module = ModelModule(tiny_bert())
    with pytest.raises(ValueError, match=r"use_orig_params=False.*Use FSDPStrategy\(use_orig_params=True\)"):
        FreezeEmbeddings().setup(_stub_trainer(FSDPStrategy(use_orig_params=False)), module, "fit")
    FreezeEmbeddings().setup(_stub_trainer(FSDPStrategy()), ModelModule(tiny_bert()), "fit")  # Lightning's default


def test_sharing_refuses_a_wrap_policy_that_splits_shared_blocks():
    module = ModelModule(tiny_bert(4))
    with pytest.raises(ValueError, match=r"gives the shared block BertLayer .*auto_wrap_policy=\{BertEncoder\}"):
        ParameterSharing(2).setup(_stub_trainer(FSDPStrategy(auto_wrap_policy={BertLayer})), module, "fit")
    # a module inside the shared block is split off too
    from transformers.models.bert.modeling_bert import BertAttention

    module = ModelModule(tiny_bert(4))
    with pytest.raises(ValueError, match=r"BertLayer's attention \(BertAttention\)"):
        ParameterSharing(2).setup(_stub_trainer(FSDPStrategy(auto_wrap_policy={BertAttention})), module, "fit")
    # the holder of the block list, or no policy: one unit for all shared blocks
    policies: tuple[set[type[torch.nn.Module]] | None, ...] = ({BertEncoder}, None)
    for policy in policies:
        ParameterSharing(2).setup(
            _stub_trainer(FSDPStrategy(auto_wrap_policy=policy)), ModelModule(tiny_bert(4)), "fit"
        )


def test_sharing_asks_callable_policies_and_refuses_opaque_ones():
    import functools

    from torch.distributed.fsdp.wrap import CustomPolicy, size_based_auto_wrap_policy

    model = tiny_bert(4)
    result = share_layers(model, num_unique_layers=2)
    big = functools.partial(size_based_auto_wrap_policy, min_num_params=10**9)
    check_sharing_wrap_policy(model, result, big)  # wraps nothing this small
    small = functools.partial(size_based_auto_wrap_policy, min_num_params=1)
    with pytest.raises(ValueError, match=r"an FSDP unit of its own"):
        check_sharing_wrap_policy(model, result, small)
    with pytest.raises(ValueError, match=r"cannot tell whether the auto_wrap_policy .*set of module classes"):
        check_sharing_wrap_policy(model, result, CustomPolicy(lambda m: isinstance(m, BertLayer)))


def test_checkpointing_twice_is_refused_as_lightnings_policy_would_apply_it():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    module = ModelModule(tiny_bert(2))
    callback = GradientCheckpointing()
    stub = _stub_trainer(FSDPStrategy(activation_checkpointing_policy={BertLayer}))
    callback.setup(stub, module, "fit")
    callback.on_fit_start(stub, module)  # only ours so far: fine
    # what FSDPStrategy(activation_checkpointing_policy={BertLayer}) does once it has wrapped the model
    apply_activation_checkpointing(
        module, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: isinstance(m, BertLayer)
    )
    with pytest.raises(
        ValueError,
        match=r"FSDPStrategy wrapped model\.bert\.encoder\.layer\.0 and 1 more in torch's checkpoint_wrapper.*"
        r"recomputed twice.*drop activation_checkpointing_policy",
    ):
        callback.on_fit_start(stub, module)


def test_reduce_every_micro_batch_is_for_fsdp_only():
    with pytest.raises(ValueError, match=r"`reduce_every_micro_batch` must be True or False"):
        AccumulationScheduler({0: 2}, reduce_every_micro_batch=1)  # type: ignore[arg-type]
    module = ModelModule(tiny_bert())
    stub = _stub_trainer(DDPStrategy())
    with pytest.raises(ValueError, match=r"reduce_every_micro_batch=True\) applies to FSDPStrategy.*DDPStrategy"):
        AccumulationScheduler({0: 2}, reduce_every_micro_batch=True).setup(stub, module, "fit")
    stub = _stub_trainer(FSDPStrategy())
    AccumulationScheduler({0: 2}, reduce_every_micro_batch=True).setup(stub, module, "fit")
    assert stub.accumulate_grad_batches == 2


def test_reduce_every_micro_batch_keeps_lightning_from_skipping_fsdp1_reductions():
    """Lightning's loop enters ``strategy.model.no_sync()`` on the micro-batches that do not step when the model
    passes its ``DistributedDataParallel`` check, a Protocol whose only member is ``no_sync``: FSDP1's wrapper passes
    it (on one GPU: no reduction inside windows without the callback). ``reduce_every_micro_batch=True`` makes the
    strategy's ``block_backward_sync`` a no-op for the fit, and teardown restores it."""
    from contextlib import contextmanager

    from lightning.pytorch.loops.utilities import _block_parallel_sync_behavior
    from lightning.pytorch.utilities.types import DistributedDataParallel
    from torch.distributed.fsdp import FullyShardedDataParallel

    assert issubclass(FullyShardedDataParallel, DistributedDataParallel)  # Lightning takes FSDP1 for DDP

    class Wrapped(torch.nn.Module):  # stands for FSDP1's root unit (FSDP1 itself needs an accelerator)
        def __init__(self) -> None:
            super().__init__()
            self.entered = 0

        @contextmanager
        def no_sync(self) -> Any:
            self.entered += 1
            yield

    def micro_batch_without_step(strategy: Any) -> None:
        with _block_parallel_sync_behavior(strategy, block=True):  # what Lightning's loop runs around it
            pass

    module = ModelModule(tiny_bert())
    for reduce_every in (False, True):
        strategy, wrapped = FSDPStrategy(), Wrapped()
        strategy.model = wrapped
        stub = _stub_trainer(strategy)
        callback = AccumulationScheduler({0: 2}, reduce_every_micro_batch=reduce_every)
        callback.setup(stub, module, "fit")
        callback.on_fit_start(stub, module)
        micro_batch_without_step(strategy)
        assert wrapped.entered == (0 if reduce_every else 1)
        callback.teardown(stub, module, "fit")
        assert "block_backward_sync" not in vars(strategy)
        micro_batch_without_step(strategy)  # Lightning's behaviour again
        assert wrapped.entered == (1 if reduce_every else 2)


def test_fsdp1_stops_listing_frozen_embedding_units_and_parameter_at_reads_them():
    """torch's FSDP1 on one gloo process (the CPU as ``device_id``), embeddings frozen in units of
    their own (``auto_wrap_policy`` with ``nn.Embedding``): FreezeEmbeddings' forward hook makes their outputs require
    grad, so FSDP1's pre-backward unshard sets their parameters as plain tensors, and no post-backward hook (the units
    get no gradient) sets them back: ``named_parameters()`` stops listing them after the first backward (the GPU
    memory test looked them up by name). ``parameter_at`` reads them through the wrappers, unchanged."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from lightning_txopt.callbacks import freeze_embeddings
    from lightning_txopt.utils.sharding import clean_name
    from tests.fsdp_helpers import full_parameters, parameter_at

    if dist.is_initialized():
        pytest.skip("a process group exists in this process already")
    model = tiny_bert()
    freeze_embeddings(model)
    frozen = [n.removeprefix("model.") for n in FROZEN]
    tables = {n: p.detach().clone() for n, p in model.named_parameters() if n in frozen}
    assert len(tables) == 3
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        try:
            root = FullyShardedDataParallel(
                model,
                auto_wrap_policy=ModuleWrapPolicy({nn.Embedding, BertLayer}),
                use_orig_params=True,
                device_id=torch.device("cpu"),
            )
        except (RuntimeError, ValueError) as err:  # a torch whose FSDP1 refuses the CPU
            pytest.skip(f"torch's FSDP1 refuses the CPU here: {err}")
        assert set(frozen) <= {clean_name(n) for n, _ in model.named_parameters()}
        root(input_ids=torch.randint(1, 60, (2, 5))).logits.sum().backward()
        assert not set(frozen) & {clean_name(n) for n, _ in model.named_parameters()}
        assert all(parameter_at(model, n).grad is None for n in frozen)
        for name, value in full_parameters(model, frozen).items():
            torch.testing.assert_close(value, tables[name], rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- two gloo processes, FSDP2


def _trainer(world: int, **kwargs: Any) -> Any:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from tests.helpers import cpu_trainer

    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, timeout=timedelta(seconds=60))
    return cpu_trainer(devices=world, strategy=strategy, **kwargs)


def _dm(**kwargs: Any) -> Any:
    from lightning_txopt.data import BucketDataModule

    samples = make_samples(48, seed=21)
    for s in samples[::3]:
        s["labels"] = -100  # ignored items: item counts differ from sample counts
    defaults: dict[str, Any] = dict(pad_token_id=0, max_tokens=96, seed=4)
    defaults.update(kwargs)
    return BucketDataModule(samples, **defaults)


def _accumulate(world: int, tmp: Path) -> dict[str, Any]:
    """Frozen embeddings + checkpointed blocks + token-normalised accumulation, each block its own FSDP2 unit."""
    from tests.fsdp_helpers import ShardedSumModule, counting_reductions

    module = ShardedSumModule("sum")
    freeze, monitor = FreezeEmbeddings(), TokenThroughputMonitor(log_every_n_steps=1)
    checkpointing = GradientCheckpointing()
    callbacks = [freeze, checkpointing, AccumulationScheduler({0: 3}, normalize="tokens"), monitor]
    with counting_reductions(module):
        _trainer(world, max_steps=3, callbacks=callbacks).fit(module, datamodule=_dm())
    optimizer = module.trainer.optimizers[0]
    params = dict(module.named_parameters())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return {
        "micro": module.micro_batches,
        "snapshots": module.snapshots,
        "comms": module.comms,
        "grad_present": module.grad_present_after_backward,
        "frozen_grads": [params[n].grad is not None for n in FROZEN],
        "frozen_in_optimizer": [id(params[n]) in in_optimizer for n in FROZEN],
        "frozen_state": [len(optimizer.state.get(params[n], {})) for n in FROZEN],
        "frozen_type": type(params[FROZEN[0]]).__name__,
        "memory": freeze.memory,
        "plan": checkpointing.plan.checkpointed if checkpointing.plan else None,
        "real_tokens": monitor.totals["real_tokens"],
    }


def _every_micro_batch(world: int, tmp: Path) -> dict[str, Any]:
    from tests.fsdp_helpers import ShardedSumModule, counting_reductions

    module = ShardedSumModule("sum", record=False)
    callback = AccumulationScheduler({0: 3}, normalize="tokens", reduce_every_micro_batch=True)
    with counting_reductions(module):
        _trainer(world, max_steps=1, callbacks=[callback]).fit(module, datamodule=_dm())
    return {"comms": module.comms, "grad_present": module.grad_present_after_backward}


def _shared_in_one_unit(world: int, tmp: Path) -> dict[str, Any]:
    from tests.fsdp_helpers import ShardedSumModule

    module = ShardedSumModule("mean", num_layers=4, shard_blocks=False)  # the whole model is one unit
    _trainer(world, max_steps=2, callbacks=[ParameterSharing(2)]).fit(module, datamodule=_dm())
    blocks = module.model.bert.encoder.layer
    return {"micro": module.micro_batches, "snapshots": module.snapshots, "same": blocks[0] is blocks[2]}


def _expect_error(fn: Any) -> dict[str, Any]:
    try:
        fn()
    except ValueError as err:
        return {"error": str(err)}
    return {"error": None}


def _shared_split(world: int, tmp: Path) -> dict[str, Any]:
    from tests.fsdp_helpers import ShardedSumModule

    module = ShardedSumModule("mean", num_layers=4, record=False)  # fully_shard on each (shared) block
    return _expect_error(
        lambda: _trainer(world, max_steps=1, callbacks=[ParameterSharing(2)]).fit(module, datamodule=_dm())
    )


def _checkpointed_twice(world: int, tmp: Path) -> dict[str, Any]:
    from tests.fsdp_helpers import ShardedSumModule

    module = ShardedSumModule("mean", checkpoint_blocks=True, record=False)
    return _expect_error(
        lambda: _trainer(world, max_steps=1, callbacks=[GradientCheckpointing()]).fit(module, datamodule=_dm())
    )


class _Seen:
    """Records the input ids of every training batch and the full parameters at the end (a collective)."""

    def __init__(self) -> None:
        from lightning.pytorch.callbacks import Callback

        outer = self

        class Recorder(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                outer.batches.append(batch["input_ids"].detach().cpu().clone())

            def on_train_end(self, trainer, pl_module):
                from tests.fsdp_helpers import full_parameters

                outer.params = full_parameters(pl_module)

        self.batches: list[torch.Tensor] = []
        self.params: dict[str, torch.Tensor] = {}
        self.callback = Recorder()


def _resume(world: int, tmp: Path) -> dict[str, Any]:
    """A run of 6 steps that checkpoints at step 3 (mid-epoch), sharded or as one file, vs 3 more steps from it."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_txopt.data import BucketDataModule
    from tests.fsdp_helpers import FSDP2Transformer
    from tests.helpers import cpu_trainer

    def lm_dm() -> BucketDataModule:
        samples = [{"input_ids": s["input_ids"], "labels": s["input_ids"]} for s in make_samples(64, seed=5)]
        return BucketDataModule(samples, pad_token_id=0, max_tokens=128, seed=1)

    def module() -> FSDP2Transformer:
        torch.manual_seed(0)
        return FSDP2Transformer(config=GPT2_DICT, task="causal-lm", learning_rate=1e-2, warmup=0.0)

    def trainer(distributed: bool, **kwargs: Any) -> Any:
        strategy = ModelParallelStrategy(
            data_parallel_size=world,
            tensor_parallel_size=1,
            save_distributed_checkpoint=distributed,
            timeout=timedelta(seconds=60),
        )
        return cpu_trainer(devices=world, strategy=strategy, max_steps=6, **kwargs)

    out: dict[str, Any] = {}
    for kind, distributed in (("sharded", True), ("full_file", False)):
        full, resumed = _Seen(), _Seen()
        save = ModelCheckpoint(dirpath=tmp / kind, every_n_train_steps=3, save_top_k=-1, filename="{step}")
        first = trainer(distributed, callbacks=[full.callback, save], enable_checkpointing=True)
        reference = module()
        first.fit(reference, datamodule=lm_dm())
        path = str(tmp / kind / "step=3.ckpt")
        trainer(distributed, callbacks=[resumed.callback]).fit(module(), datamodule=lm_dm(), ckpt_path=path)
        out[kind] = {
            "full": full.batches,
            "full_params": full.params,
            "resumed": resumed.batches,
            "resumed_params": resumed.params,
            "per_epoch": first.num_training_batches,
            "is_dir": os.path.isdir(path),
        }
        out["chunked"] = reference._chunked  # FSDP2's DTensor head: the full-logits fallback
        out["fused"] = first.optimizers[0].defaults.get("fused")
    return out


SCENARIOS = {
    "accumulate": _accumulate,
    "every_micro_batch": _every_micro_batch,
    "shared_in_one_unit": _shared_in_one_unit,
    "shared_split": _shared_split,
    "checkpointed_twice": _checkpointed_twice,
    "resume": _resume,
}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    results: dict[str, Any] = {}
    tmp = Path(out_dir)
    for name, scenario in SCENARIOS.items():
        try:
            results[name] = scenario(world, tmp)
        except Exception:
            results[name] = {"crash": traceback.format_exc()}
            break  # the other rank may be waiting in a collective: stop here
    torch.save(results, tmp / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not fsdp2_available():
        pytest.skip("needs ModelParallelStrategy and torch's fully_shard")
    import torch.multiprocessing as mp
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    out = tmp_path_factory.mktemp("fsdp2")
    context = mp.start_processes(
        _worker, args=(2, find_free_network_port(), str(out)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the FSDP2 processes did not finish within 240 s")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank in ranks:
        for name, result in rank.items():
            assert "crash" not in result, f"scenario {name!r} crashed:\n{result['crash']}"
        assert set(rank) == set(SCENARIOS)
    return ranks


def _merged_windows(ranks: list[dict[str, Any]], name: str) -> list[tuple[dict, dict, list[dict]]]:
    """(parameters before, after, both ranks' micro-batches) of each step; ranks hold the same full parameters."""
    per_rank = [windows(r[name]["snapshots"]) for r in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) >= 2
    out = []
    for (s0, e0, before, after), (s1, e1, _, after1) in zip(*per_rank, strict=True):
        for k in after:
            torch.testing.assert_close(after[k], after1[k], rtol=0, atol=0)
        out.append((before, after, ranks[0][name]["micro"][s0:e0] + ranks[1][name]["micro"][s1:e1]))
    return out


@pytest.mark.ddp
def test_accumulated_update_is_the_exact_global_window_gradient_with_frozen_checkpointed_blocks(runs):
    result = runs[0]["accumulate"]
    assert result["plan"] == (0, 1)  # both blocks checkpointed, then each fully_shard-ed
    steps = _merged_windows(runs, "accumulate")
    # 4 micro-batches per rank and epoch: windows of 3, 1 (cut by the epoch end) and 3, on each of 2 ranks
    assert [len(micro) for _, _, micro in steps] == [6, 2, 6]
    for before, after, micro in steps:
        reference = reference_window_gradient(before, micro, reduction="sum", frozen=FROZEN)
        assert not set(FROZEN) & set(reference)
        assert_update_is_gradient(before, after, reference)  # SGD lr=1: the update is minus the gradient
        for name in FROZEN:
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)


@pytest.mark.ddp
def test_frozen_embeddings_get_no_gradient_no_optimizer_state_and_their_memory_is_reported(runs):
    for rank in runs:
        result = rank["accumulate"]
        assert result["frozen_type"] == "DTensor"  # sharded by fully_shard, frozen still
        assert result["frozen_grads"] == [False, False, False]
        assert result["frozen_in_optimizer"] == [False, False, False]
        assert result["frozen_state"] == [0, 0, 0]
        memory = result["memory"]
        # tiny BERT: 64 x 16 token, 64 x 16 position, 2 x 16 type tables; dim 0 sharded over 2 ranks (fp32)
        assert memory.local_parameters == (64 + 64 + 2) * 16 // 2
        assert memory.gradient_bytes == memory.local_parameters * 4  # FSDP2: per-parameter gradients
        assert memory.optimizer_bytes == memory.local_parameters * 8


@pytest.mark.ddp
def test_no_reduce_scatter_on_intermediate_micro_batches(runs):
    for rank in runs:
        comms = rank["accumulate"]["comms"]
        assert [stepped for _, _, stepped in comms] == [False, False, True, True, False, False, True]
        stepping = [count for _, count, stepped in comms if stepped]
        intermediate = [count for _, count, stepped in comms if not stepped]
        assert all(c > 0 for c in stepping), comms
        assert intermediate == [0] * 4, comms
        # FSDP2 leaves the sharded gradient unset until the reduction: none after an intermediate backward
        assert rank["accumulate"]["grad_present"] == [False, False, True, True, False, False, True]
        # reduce_every_micro_batch=True: one reduction per micro-batch, as Lightning alone would do
        every = rank["every_micro_batch"]
        assert all(count > 0 for _, count, _ in every["comms"]) and len(every["comms"]) == 3
        assert every["grad_present"] == [True, True, True]


@pytest.mark.ddp
def test_throughput_counts_the_real_tokens_of_both_ranks(runs):
    micro = runs[0]["accumulate"]["micro"] + runs[1]["accumulate"]["micro"]
    expected = sum(int(b["attention_mask"].sum()) for b in micro)
    assert runs[0]["accumulate"]["real_tokens"] == runs[1]["accumulate"]["real_tokens"] == expected


@pytest.mark.ddp
def test_shared_blocks_in_one_fsdp2_unit_train_exactly(runs):
    assert runs[0]["shared_in_one_unit"]["same"]
    for before, after, micro in _merged_windows(runs, "shared_in_one_unit"):
        reference = reference_window_gradient(before, micro, reduction="mean", share=2, num_layers=4)
        assert_update_is_gradient(before, after, reference)


@pytest.mark.ddp
def test_shared_blocks_sharded_separately_are_refused(runs):
    for rank in runs:
        error = rank["shared_split"]["error"]
        assert error is not None and "ParameterSharing under ModelParallelStrategy" in error
        assert "holds an FSDP unit (the block itself)" in error and "fully_shard the module that holds" in error


@pytest.mark.ddp
def test_checkpointing_twice_is_refused(runs):
    for rank in runs:
        error = rank["checkpointed_twice"]["error"]
        assert error is not None and "recomputed twice" in error and "checkpoint_wrapper" in error


@pytest.mark.ddp
@pytest.mark.parametrize("kind", ["sharded", "full_file"])
def test_resume_from_a_checkpoint_is_exact(runs, kind):
    for rank in runs:
        result = rank["resume"][kind]
        assert result["is_dir"] == (kind == "sharded")
        assert 3 < result["per_epoch"] < 6  # the checkpoint at step 3 is mid-epoch; the resumed run crosses an epoch
        assert len(result["full"]) == 6 and len(result["resumed"]) == 3
        for a, b in zip(result["full"][3:], result["resumed"], strict=True):
            assert torch.equal(a, b)
        for name, value in result["full_params"].items():
            torch.testing.assert_close(result["resumed_params"][name], value, rtol=1e-6, atol=1e-7, msg=name)
    first, second = (rank["resume"][kind] for rank in runs)
    assert first["per_epoch"] == second["per_epoch"]  # equal batch counts on both ranks
    assert not torch.equal(first["full"][0], second["full"][0])  # each rank its own batches


@pytest.mark.ddp
def test_transformer_module_falls_back_to_full_logits_on_dtensor_heads(runs):
    assert runs[0]["resume"]["chunked"] is False  # lm_head_of refuses DTensor parameters: full logits, same loss
    assert runs[0]["resume"]["fused"] is None  # CPU: no fused AdamW
