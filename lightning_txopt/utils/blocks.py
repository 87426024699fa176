"""Find a transformer's repeated block lists (the layers that checkpointing and sharing work on)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from torch import nn

__all__ = ["BlockList", "disable_kv_cache", "find_block_list", "find_block_lists", "model_configs"]

Container = nn.ModuleList | nn.Sequential | nn.ModuleDict


@dataclasses.dataclass(frozen=True)
class BlockList:
    """A container of repeated blocks inside a model.

    Attributes:
        name: Qualified name of the container (e.g. ``"bert.encoder.layer"``).
        container: The ``nn.ModuleList``/``nn.Sequential``/``nn.ModuleDict`` itself (a ``ModuleDict``'s blocks are
            taken in insertion order).

    Example:
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
        >>> found = find_block_list(nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False))
        >>> found.name, len(found), type(found.blocks[0]).__name__
        ('layers', 3, 'TransformerEncoderLayer')
    """

    name: str
    container: Container

    @property
    def blocks(self) -> list[nn.Module]:
        """The blocks, in order."""
        return list(self.container.values()) if isinstance(self.container, nn.ModuleDict) else list(self.container)

    def __len__(self) -> int:
        return len(self.container)

    def __getitem__(self, index: int) -> nn.Module:
        """The block at position ``index``."""
        return self.blocks[index]

    def replace(self, index: int, block: nn.Module) -> None:
        """Put ``block`` at position ``index`` (a ``ModuleDict`` keeps the key and its place in the order)."""
        if isinstance(self.container, nn.ModuleDict):
            self.container[list(self.container.keys())[index]] = block
        else:
            self.container[index] = block


def _class_matches(module: nn.Module, names: Sequence[str]) -> bool:
    cls = type(module)
    return cls.__name__ in names or f"{cls.__module__}.{cls.__qualname__}" in names


def _children(container: Container) -> list[nn.Module]:
    return list(container.values()) if isinstance(container, nn.ModuleDict) else list(container)


def _is_candidate(module: nn.Module, block_classes: Sequence[str] | None) -> bool:
    if not isinstance(module, Container) or len(module) < 2:
        return False
    children = _children(module)
    if block_classes is not None:
        return all(_class_matches(c, block_classes) for c in children)
    first = type(children[0])
    if not all(type(c) is first for c in children) or not any(True for _ in children[0].parameters()):
        return False
    # a stack of plain layers is not a transformer block list
    return not isinstance(children[0], nn.Linear | nn.Embedding | nn.LayerNorm | nn.Dropout)


def _not_found(model: nn.Module, block_classes: Sequence[str] | None) -> ValueError:
    what = f"of classes {list(block_classes)}" if block_classes else "of one class"
    return ValueError(
        f"No repeated block list found in {type(model).__name__}: expected an nn.ModuleList, nn.Sequential or "
        f"nn.ModuleDict of two or more blocks {what}. Pass `block_classes=[...]` with the class name of your "
        "transformer block."
    )


def find_block_lists(model: nn.Module, block_classes: Sequence[str] | None = None) -> list[BlockList]:
    """Find every repeated block list of ``model``: each stack of an encoder-decoder, the one stack of the others.

    A block list is an ``nn.ModuleList``, ``nn.Sequential`` or ``nn.ModuleDict`` of two or more blocks of one class
    (or, with ``block_classes``, of those classes) that hold parameters; a candidate nested inside another candidate
    (a list inside a block) is not a block list of its own.

    Args:
        model: Any model.
        block_classes: Class names (``"BertLayer"`` or fully qualified) that mark the blocks; overrides detection.

    Returns:
        The block lists in model order (T5: the encoder's, then the decoder's).

    Raises:
        ValueError: If there is none.

    Example:
        >>> model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=2, num_decoder_layers=3,
        ...                        dim_feedforward=16, batch_first=True)
        >>> [(found.name, len(found)) for found in find_block_lists(model)]
        [('encoder.layers', 2), ('decoder.layers', 3)]
    """
    found: list[BlockList] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer.name}.") for outer in found):
            continue
        if _is_candidate(module, block_classes):
            assert isinstance(module, Container)
            found.append(BlockList(name=name, container=module))
    if not found:
        raise _not_found(model, block_classes)
    return found


def find_block_list(model: nn.Module, block_classes: Sequence[str] | None = None) -> BlockList:
    """Find the largest of :func:`find_block_lists`: the one with the most parameters (ties: the most blocks).

    Args:
        model: Any model.
        block_classes: Class names (``"BertLayer"`` or fully qualified) that mark the blocks; overrides detection.

    Returns:
        The largest block list.

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
    lists = find_block_lists(model, block_classes)
    return max(lists, key=lambda b: (sum(p.numel() for p in b.container.parameters()), len(b)))


def model_configs(model: nn.Module) -> Iterator[object]:
    """Every distinct configuration object of ``model``: each submodule's ``config`` and their sub-configs.

    Hugging Face encoder-decoders give each stack its own copy of the configuration (T5's decoder), and multimodal
    models nest text configs; a setting changed on the top config only does not reach them.

    Example:
        >>> from transformers import T5Config, T5ForConditionalGeneration
        >>> t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1,
        ...                                          num_heads=2))
        >>> len(list(model_configs(t5)))  # the model's, the encoder stack's and the decoder stack's
        3
    """
    seen: set[int] = set()
    pending = [getattr(m, "config", None) for m in model.modules()]
    while pending:
        config = pending.pop(0)
        if config is None or id(config) in seen or not hasattr(config, "to_dict"):
            continue
        seen.add(id(config))
        yield config
        for key in getattr(config, "sub_configs", {}) or {}:
            pending.append(getattr(config, key, None))


def disable_kv_cache(model: nn.Module) -> None:
    """Set ``use_cache=False`` on every configuration of ``model`` (see :func:`model_configs`).

    A KV cache is useless in training, and under recomputation (checkpointing) or shared blocks it is wrong: a
    recomputed block would append to the cache a second time.

    Example:
        >>> from transformers import T5Config, T5ForConditionalGeneration
        >>> model = T5ForConditionalGeneration(T5Config(vocab_size=8, d_model=4, d_kv=2, d_ff=4, num_layers=1,
        ...                                             num_heads=1))
        >>> disable_kv_cache(model)
        >>> model.config.use_cache, model.decoder.config.use_cache
        (False, False)
    """
    for config in model_configs(model):
        if getattr(config, "use_cache", False):
            config.use_cache = False  # type: ignore[attr-defined]
