"""Model introspection shared by the callbacks."""

from lightning_txopt.utils.blocks import BlockList, disable_kv_cache, find_block_list, find_block_lists, model_configs

__all__ = ["BlockList", "disable_kv_cache", "find_block_list", "find_block_lists", "model_configs"]
