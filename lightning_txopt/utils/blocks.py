"""Find a transformer's repeated block list (the layers that checkpointing and sharing work on)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

__all__ = ["BlockList", "find_block_list"]


@dataclasses.dataclass(frozen=True)
class BlockList:
    """A container of repeated blocks inside a model.

    Attributes:
        name: Qualified name of the container (e.g. ``"bert.encoder.layer"``).
        container: The ``nn.ModuleList``/``nn.Sequential`` itself.
    """

    name: str
    container: nn.ModuleList | nn.Sequential

    @property
    def blocks(self) -> list[nn.Module]:
        """The blocks, in order."""
        return list(self.container)

    def __len__(self) -> int:
        return len(self.container)


def _class_matches(module: nn.Module, names: Sequence[str]) -> bool:
    cls = type(module)
    return cls.__name__ in names or f"{cls.__module__}.{cls.__qualname__}" in names


def find_block_list(model: nn.Module, block_classes: Sequence[str] | None = None) -> BlockList:
    """Find the largest ``nn.ModuleList``/``nn.Sequential`` whose children are all of one class.

    Args:
        model: Any model.
        block_classes: Class names (``"BertLayer"`` or fully qualified) that mark the blocks; overrides detection.

    Returns:
        The block list with the most parameters among the candidates (ties: the most blocks).

    Raises:
        ValueError: If no container of at least two same-class blocks (or of ``block_classes``) exists.

    Example:
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
        >>> encoder = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
        >>> model = nn.Sequential(nn.Embedding(10, 8), encoder)
        >>> found = find_block_list(model)
        >>> found.name, len(found)
        ('1.layers', 3)
    """
    best: tuple[int, int, str, nn.Module] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList | nn.Sequential) or len(module) < 2:
            continue
        children = list(module)
        if block_classes is not None:
            if not all(_class_matches(c, block_classes) for c in children):
                continue
        else:
            first = type(children[0])
            if not all(type(c) is first for c in children) or not any(True for _ in children[0].parameters()):
                continue
            if isinstance(children[0], nn.Linear | nn.Embedding | nn.LayerNorm | nn.Dropout):
                continue  # a stack of plain layers is not a transformer block list
        size = sum(p.numel() for p in module.parameters())
        key = (size, len(children))
        if best is None or key > best[:2]:
            best = (size, len(children), name, module)
    if best is None:
        what = f"of classes {list(block_classes)}" if block_classes else "of one class"
        raise ValueError(
            f"No repeated block list found in {type(model).__name__}: expected an nn.ModuleList or nn.Sequential of "
            f"two or more blocks {what}. Pass `block_classes=[...]` with the class name of your transformer block."
        )
    container = best[3]
    assert isinstance(container, nn.ModuleList | nn.Sequential)
    return BlockList(name=best[2], container=container)
