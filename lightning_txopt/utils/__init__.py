"""Model introspection shared by the callbacks."""

from lightning_txopt.utils.blocks import BlockList, find_block_list

__all__ = ["BlockList", "find_block_list"]
