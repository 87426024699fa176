"""Model introspection shared by the callbacks."""

from lightning_txopt.utils.blocks import BlockList, disable_kv_cache, find_block_list, find_block_lists, model_configs
from lightning_txopt.utils.sharding import GradientSync, sharding_kind

__all__ = [
    "BlockList",
    "GradientSync",
    "disable_kv_cache",
    "find_block_list",
    "find_block_lists",
    "model_configs",
    "sharding_kind",
]
