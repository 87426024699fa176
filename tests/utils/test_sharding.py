"""``lightning_txopt.utils.sharding``: what the callbacks read about FSDP strategies and sharded models.

The parts that need a process group (FSDP2 units, ``GradientSync`` on a sharded model) run in the two-process CPU
twin (``tests/callbacks/test_fsdp_cpu.py``) and, for FSDP1, on a GPU (``tests/gpu/test_fsdp.py``).
"""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from torch import nn

from lightning_txopt.utils.sharding import (
    GradientSync,
    checkpoint_wrapper_type,
    clean_name,
    gradient_free_in_units,
    is_sharded_unit,
    local_numel,
    policy_wraps,
    sharded_units,
    sharding_kind,
    strategy_description,
)


def test_sharding_kind_and_description():
    assert sharding_kind(FSDPStrategy()) == "fsdp"
    assert sharding_kind(DDPStrategy()) is None
    assert sharding_kind(SingleDeviceStrategy(device=torch.device("cpu"))) is None
    assert sharding_kind(object()) is None
    described = strategy_description(FSDPStrategy(auto_wrap_policy={nn.Linear}, use_orig_params=False))
    assert described == "FSDPStrategy(auto_wrap_policy={Linear}, use_orig_params=False)"
    assert strategy_description(DDPStrategy()) == "DDPStrategy"


def test_model_parallel_strategy_is_fsdp2():
    model_parallel = pytest.importorskip("lightning.pytorch.strategies").ModelParallelStrategy
    assert sharding_kind(model_parallel()) == "model_parallel"


def test_clean_name_drops_wrapper_segments_only():
    name = "model._orig_mod.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.linear.weight"
    assert clean_name(name) == "model.layers.0.linear.weight"
    assert clean_name("fsdp_wrapped_module_like.weight") == "fsdp_wrapped_module_like.weight"


def test_checkpoint_wrapper_type_is_the_class_of_torchs_checkpoint_wrapper():
    # The one private torch import of the library: this fails loudly if torch moves or renames it.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    cls = checkpoint_wrapper_type()
    assert cls is not None and cls.__name__ == "CheckpointWrapper"
    assert isinstance(checkpoint_wrapper(nn.Linear(2, 2)), cls)
    assert not isinstance(nn.Linear(2, 2), cls)


def test_policy_wraps_asks_every_public_policy_form():
    from torch.distributed.fsdp.wrap import (
        CustomPolicy,
        ModuleWrapPolicy,
        lambda_auto_wrap_policy,
        size_based_auto_wrap_policy,
    )

    linear, relu = nn.Linear(4, 4), nn.ReLU()
    assert policy_wraps(None, linear) is False
    assert policy_wraps({nn.Linear}, linear) is True and policy_wraps({nn.Linear}, relu) is False
    assert policy_wraps(ModuleWrapPolicy({nn.Linear}), linear) is True
    assert policy_wraps(ModuleWrapPolicy({nn.Linear}), relu) is False
    assert policy_wraps(functools.partial(size_based_auto_wrap_policy, min_num_params=10), linear) is True  # 20
    assert policy_wraps(functools.partial(size_based_auto_wrap_policy, min_num_params=100), linear) is False
    by_name = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, nn.ReLU))
    assert policy_wraps(by_name, relu) is True and policy_wraps(by_name, linear) is False
    assert policy_wraps(CustomPolicy(lambda m: True), linear) is None  # no public way to ask it
    assert policy_wraps(42, linear) is None


def test_plain_models_have_no_units_and_no_switch():
    embedding = nn.Embedding(10, 4)
    model = nn.Sequential(embedding, nn.Linear(4, 2))
    assert not is_sharded_unit(model) and sharded_units(model) == []
    embedding.weight.requires_grad_(False)
    assert gradient_free_in_units(model) == {id(embedding.weight)}  # no FSDP1 unit: every frozen tensor saves
    assert local_numel(embedding.weight) == 40
    sync = GradientSync(model)
    assert not sync.available and not sync.off
    sync.disable()  # nothing to switch: a no-op
    assert not sync.off
    assert not GradientSync(None).available
