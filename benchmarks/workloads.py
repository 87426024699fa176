"""What the GPU benchmarks train and predict on: samples, model configs, and the FLOP count behind MFU.

Samples carry random token ids with real or seeded lengths (throughput depends on the lengths only):

* ``"corpus"``: the embedded corpus's BERT-uncased lengths (``tests/data/fortune_lengths.npy``, 14,396 texts,
  median 27, mean 43.7, max 512) and its real labels (40 classes);
* ``"lognormal"``: a second, differently shaped distribution: 14,396 lengths
  ``clip(rint(23 * exp(1.0 * z)), 2, 512)`` with ``z ~ N(0, 1)`` drawn by ``numpy.random.default_rng(0)``
  (median 23, mean 37.7, 99th percentile 232, 10 lengths clipped at 512), labels drawn from 40 classes by
  ``default_rng(1)``.

Models (random init, from configs): a BERT-base-shape classifier (12 x 768, 110M parameters) and a Llama-shape
causal LM (16 x 1024, 16 heads, SwiGLU 2816, vocab 32,000, untied head: 271M parameters, 238M outside the embedding
table). ``quick=True`` gives tiny versions of both for CPU smoke runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
from _common import RECORDED_LENGTHS
from transformers import BertConfig, LlamaConfig

from lightning_txopt import load_fortunes

__all__ = [
    "DATA",
    "FLOPS_FORMULA",
    "LOGNORMAL",
    "MODELS",
    "Workload",
    "bert_config",
    "build_workload",
    "corpus_samples",
    "llama_config",
    "lognormal_lengths",
    "model_flops",
    "peak_tflops",
]

Data = Literal["corpus", "lognormal"]
Model = Literal["bert", "llama"]
DATA: tuple[str, ...] = ("corpus", "lognormal")
MODELS: tuple[str, ...] = ("bert", "llama")
NUM_LABELS = 40
QUICK_SAMPLES = 512
# the second length distribution (see the module docstring); changing any of these changes every figure it gave
LOGNORMAL = {"n": 14_396, "median": 23.0, "sigma": 1.0, "max_length": 512, "seed": 0, "label_seed": 1}

FLOPS_FORMULA = (
    "model FLOPs = 6 * N * T + 12 * L * d * sum(l_i^2): N = parameters outside the embedding tables "
    "(num_parameters(exclude_embeddings=True): an untied LM head counts), T = real (non-pad) tokens, L = layers, "
    "d = hidden size, l_i = each sample's length (attention within a sample only, causal or not: padding and "
    "packing add no model FLOPs); MFU = model FLOPs / s / the GPU's peak dense bf16 FLOP/s"
)
# dense bf16 tensor-core peak, TFLOP/s (vendor datasheets, without sparsity)
_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def corpus_samples(limit: int | None) -> list[dict[str, Any]]:
    """The embedded corpus: real lengths and labels, random ids (``[CLS] ... [SEP]``); ``limit``: a seeded subset."""
    lengths = np.load(RECORDED_LENGTHS)
    records = load_fortunes()
    labels = sorted({r["label"] for r in records})
    label_id = {name: i for i, name in enumerate(labels)}
    rng = np.random.default_rng(0)
    samples = []
    for n, r in zip(lengths.tolist(), records, strict=True):
        ids = rng.integers(1000, 30000, n)
        ids[0], ids[-1] = 101, 102  # [CLS] ... [SEP]
        samples.append({"input_ids": ids.astype(np.int64), "labels": label_id[r["label"]]})
    if limit:
        samples = [samples[i] for i in rng.permutation(len(samples))[:limit]]
    return samples


def lognormal_lengths(
    n: int, *, median: float = 23.0, sigma: float = 1.0, max_length: int = 512, seed: int = 0
) -> np.ndarray:
    """``n`` lengths ``clip(rint(median * exp(sigma * z)), 2, max_length)``, ``z ~ N(0, 1)`` from ``default_rng(seed)``.

    Example:
        >>> x = lognormal_lengths(14_396)
        >>> int(np.median(x)), int(x.max()), int(x.min())
        (23, 512, 2)
    """
    z = np.random.default_rng(seed).standard_normal(n)
    return np.clip(np.rint(median * np.exp(sigma * z)), 2, max_length).astype(np.int64)


def _lognormal_samples(limit: int | None) -> list[dict[str, Any]]:
    spec = LOGNORMAL
    lengths = lognormal_lengths(
        int(spec["n"]),
        median=float(spec["median"]),
        sigma=float(spec["sigma"]),
        max_length=int(spec["max_length"]),
        seed=int(spec["seed"]),
    )
    rng = np.random.default_rng(int(spec["label_seed"]))
    labels = rng.integers(0, NUM_LABELS, lengths.size)
    samples = []
    for n, label in zip(lengths.tolist(), labels.tolist(), strict=True):
        ids = rng.integers(1000, 30000, n)
        ids[0], ids[-1] = 101, 102
        samples.append({"input_ids": ids.astype(np.int64), "labels": int(label)})
    if limit:
        samples = [samples[i] for i in rng.permutation(len(samples))[:limit]]
    return samples


def bert_config(quick: bool) -> BertConfig:
    """BERT-base (12 x 768, 110M parameters) with a 40-class head; ``quick``: 2 x 64."""
    if quick:
        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    else:
        config = BertConfig()
    config.num_labels = NUM_LABELS
    return config


def llama_config(quick: bool) -> LlamaConfig:
    """A Llama-shape decoder, 271M parameters (16 x 1024, vocab 32,000, untied head); ``quick``: 2 x 64, vocab 1000."""
    if quick:
        return LlamaConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
    return LlamaConfig(
        vocab_size=32_000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


@dataclasses.dataclass(frozen=True)
class Workload:
    """Samples and the model config they train: what a row needs besides its batching and module options."""

    model: str
    data: str
    samples: list[dict[str, Any]]
    config: Any
    task: Literal["sequence-classification", "causal-lm"]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(s["input_ids"]) for s in self.samples])

    def module_kwargs(self) -> dict[str, Any]:
        """``TransformerModule`` arguments of this workload (besides options such as attention or compile)."""
        if self.task == "causal-lm":
            return {"config": self.config, "task": "causal-lm"}
        return {"config": self.config, "num_labels": NUM_LABELS}


def build_workload(model: str, data: str, quick: bool) -> Workload:
    """The samples of ``data`` for ``model``: the classifier keeps the labels; the decoder gets ids in its vocabulary
    and per-token labels (the ids: causal LM)."""
    if data not in DATA or model not in MODELS:
        raise ValueError(f"Unknown workload {model!r} on {data!r}: models {MODELS}, data {DATA}.")
    limit = QUICK_SAMPLES if quick else None
    samples = corpus_samples(limit) if data == "corpus" else _lognormal_samples(limit)
    if model == "bert":
        return Workload("bert", data, samples, bert_config(quick), "sequence-classification")
    config = llama_config(quick)
    rng = np.random.default_rng(2)
    causal = []
    for s in samples:
        ids = rng.integers(1, config.vocab_size, len(s["input_ids"])).astype(np.int64)
        causal.append({"input_ids": ids, "labels": ids})
    return Workload("llama", data, causal, config, "causal-lm")


def model_flops(non_embedding_params: int, layers: int, hidden: int, tokens: int, squared_lengths: int) -> float:
    """Training FLOPs (forward and backward) of samples with ``tokens`` real tokens in all and ``squared_lengths`` the
    sum of their lengths squared, as :data:`FLOPS_FORMULA` says.

    Per sample of ``l`` tokens this is ``l * TransformerModule.flops_per_token(seq_len=l)``.

    Example:
        >>> lengths = [3, 4]
        >>> model_flops(1000, 2, 8, sum(lengths), sum(n * n for n in lengths))  # 6*1000*7 + 12*2*8*25
        46800.0
    """
    return float(6.0 * non_embedding_params * tokens + 12.0 * layers * hidden * squared_lengths)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named ``device_name`` (``None``: unknown, no MFU reported).

    Example:
        >>> peak_tflops("NVIDIA H200"), peak_tflops("CPU")
        (989.4, None)
    """
    return next((tf for key, tf in _PEAK_TFLOPS.items() if key in device_name), None)
