"""Tiny configs of every model family the library claims, for the support matrix and per-technique tests.

Each family is a :class:`Family`: its ``model_type`` and config keywords (as a ``TransformerModule(config=...)`` dict),
whether it is causal, which heads it has, and what makes it interesting (sliding windows, local attention, position
offsets, relative attention bias). Windows are short (8 tokens) so that the test samples (up to 40 tokens) are longer
than any attention window: a mask that ignores the window shows up as a wrong result.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

VOCAB = 64
WINDOW = 8  # sliding / local attention window of the zoo's windowed models, shorter than the test samples


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config: dict[str, Any]
    causal: bool
    classification: bool = True
    causal_lm: bool = False
    encoder_decoder: bool = False
    note: str = ""

    def config_dict(self, **overrides: Any) -> dict[str, Any]:
        return {**self.config, **overrides}

    def build(self, task: str = "sequence-classification", *, attn: str = "sdpa", num_labels: int = 3) -> Any:
        """A freshly initialised Hugging Face model of this family (seeded; dropout off)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        torch.manual_seed(0)
        cfg = dict(self.config)
        model_type = cfg.pop("model_type")
        config = AutoConfig.for_model(model_type, **cfg)
        if task == "sequence-classification":
            config.num_labels = num_labels
            return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn).train()
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn).train()


_NO_DROPOUT_BERT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
_SMALL = {"vocab_size": VOCAB, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "bert",
            {"model_type": "bert", **_SMALL, "num_hidden_layers": 2, "max_position_embeddings": 64, **_NO_DROPOUT_BERT},
            causal=False,
        ),
        Family(
            "roberta",
            {
                "model_type": "roberta",
                **_SMALL,
                "num_hidden_layers": 2,
                "max_position_embeddings": 66,
                "pad_token_id": 1,
                **_NO_DROPOUT_BERT,
            },
            causal=False,
            note="positions offset by padding_idx + 1",
        ),
        Family(
            "distilbert",
            {
                "model_type": "distilbert",
                "vocab_size": VOCAB,
                "dim": 16,
                "n_layers": 2,
                "n_heads": 2,
                "hidden_dim": 32,
                "max_position_embeddings": 64,
                "dropout": 0.0,
                "attention_dropout": 0.0,
                "seq_classif_dropout": 0.0,
            },
            causal=False,
            note="pre_classifier head",
        ),
        Family(
            "electra",
            {
                "model_type": "electra",
                **_SMALL,
                "embedding_size": 8,
                "num_hidden_layers": 2,
                "max_position_embeddings": 64,
                **_NO_DROPOUT_BERT,
            },
            causal=False,
        ),
        Family(
            "modernbert",
            {
                "model_type": "modernbert",
                **_SMALL,
                "num_hidden_layers": 3,
                "max_position_embeddings": 64,
                "global_attn_every_n_layers": 3,
                "local_attention": 2 * WINDOW,
                "attention_dropout": 0.0,
                "mlp_dropout": 0.0,
                "embedding_dropout": 0.0,
                "classifier_dropout": 0.0,
                "pad_token_id": 0,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "sep_token_id": 2,
                "cls_token_id": 1,
            },
            causal=False,
            note=f"local attention (window +-{WINDOW}) in 2 of 3 layers",
        ),
        Family(
            "gpt2",
            {
                "model_type": "gpt2",
                "vocab_size": VOCAB,
                "n_positions": 64,
                "n_embd": 16,
                "n_layer": 2,
                "n_head": 2,
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
                "pad_token_id": 0,
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
            causal=True,
            causal_lm=True,
        ),
        Family(
            "llama",
            {
                "model_type": "llama",
                **_SMALL,
                "num_hidden_layers": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 64,
                "pad_token_id": 0,
            },
            causal=True,
            causal_lm=True,
            note="grouped-query attention",
        ),
        Family(
            "qwen2",
            {
                "model_type": "qwen2",
                **_SMALL,
                "num_hidden_layers": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 64,
                "use_sliding_window": True,
                "sliding_window": WINDOW,
                "max_window_layers": 1,
                "pad_token_id": 0,
            },
            causal=True,
            causal_lm=True,
            note=f"sliding window {WINDOW} in layer 1 (layer 0 full)",
        ),
        Family(
            "mistral",
            {
                "model_type": "mistral",
                **_SMALL,
                "num_hidden_layers": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 64,
                "sliding_window": WINDOW,
                "pad_token_id": 0,
            },
            causal=True,
            causal_lm=True,
            note=f"sliding window {WINDOW} in every layer",
        ),
        Family(
            "gpt_neox",
            {
                "model_type": "gpt_neox",
                **_SMALL,
                "num_hidden_layers": 2,
                "max_position_embeddings": 64,
                "hidden_dropout": 0.0,
                "attention_dropout": 0.0,
                "pad_token_id": 0,
            },
            causal=True,
            causal_lm=True,
        ),
        Family(
            "t5",
            {
                "model_type": "t5",
                "vocab_size": VOCAB,
                "d_model": 16,
                "d_kv": 8,
                "d_ff": 32,
                "num_layers": 2,
                "num_decoder_layers": 2,
                "num_heads": 2,
                "dropout_rate": 0.0,
                "pad_token_id": 0,
                "eos_token_id": 2,
                "decoder_start_token_id": 0,
            },
            causal=False,
            encoder_decoder=True,
            note="encoder-decoder, relative attention bias; classification pools the end-of-sequence token (id 2)",
        ),
    )
}

ENCODERS = [n for n, f in FAMILIES.items() if not f.causal and not f.encoder_decoder]
DECODERS = [n for n, f in FAMILIES.items() if f.causal]
