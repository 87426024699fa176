"""The benchmark scripts on CPU (their ``--quick``/``--tiny`` modes), so that they cannot rot between GPU sessions.

Each smoke run is checked against references computed here, independently of the script: the batches a tiny run
times come from ``plan_epoch`` (so its real tokens, samples and padding efficiency are known), parameter and
optimizer-state sizes from a model built here, and every ratio printed from the JSON figures. The figures
themselves are GPU results in ``docs/results/``; nothing here times anything. The pure parts of the scripts (row
selection, the ABBA schedule, the report of old JSON files, the FLOP count) are tested in-process.
"""

from __future__ import annotations

import doctest
import importlib
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_txopt.data.planning import plan_epoch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = ROOT / "docs" / "results"
QUICK_BUDGET = 2048  # gpu_compare --quick: max_tokens, and issue #15's 16,384 divided by 8
QUICK_WARMUP, QUICK_STEPS = 1, 3  # gpu_compare --quick


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, *args], cwd=BENCH, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Imports a benchmark module (they import each other as top-level modules, as the scripts run)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module


def _cells(stdout: str, title: str) -> list[str]:
    """The cells of the markdown table line of row ``title``."""
    line = next(x for x in stdout.splitlines() if x.startswith(f"| {title} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def _window(lengths: np.ndarray, start: int, stop: int, **plan: Any) -> list[np.ndarray]:
    """Batches ``start .. stop - 1`` of consecutive epochs of a plan (rank 0), as a training loop meets them."""
    batches: list[np.ndarray] = []
    epoch = 0
    while len(batches) < stop:
        batches += plan_epoch(lengths, seed=0, epoch=epoch, **plan).rank_batches(0)
        epoch += 1
    return batches[start:stop]


def _counts(lengths: np.ndarray, batches: list[np.ndarray]) -> tuple[int, int, int, int]:
    """(real tokens, samples, padded tokens, sum of squared lengths) of ``batches`` padded to their longest."""
    real = sum(int(lengths[b].sum()) for b in batches)
    samples = sum(len(b) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    squares = sum(int((lengths[b] ** 2).sum()) for b in batches)
    return real, samples, padded, squares


# ---------------------------------------------------------------------------------------------------- gpu_compare
def test_gpu_compare_quick_counts_ratios_and_report(tmp_path: Path, bench: Any) -> None:
    out = tmp_path / "gc.json"
    stdout = _ok(
        _run(
            "gpu_compare.py",
            *(
                "--quick",
                "--repeats",
                "2",
                "--repeat-all",
                "--only",
                "plain,lightning,accumulation",
                "--json",
                str(out),
            ),
        )
    )
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["plain", "lightning", "accumulation"]  # table order, whatever order --only gave
    # the window is batches 1..3 of the plan of the 512 texts of --quick: the same batches for all three rows (the
    # accumulation row steps every second batch, and still times --steps batches)
    lengths = bench("workloads").build_workload("bert", "corpus", True).lengths
    real, samples, padded, _ = _counts(
        lengths, _window(lengths, QUICK_WARMUP, QUICK_WARMUP + QUICK_STEPS, max_tokens=QUICK_BUDGET)
    )
    for row in rows.values():
        assert row["real_tokens"] == real
        assert row["samples_per_s"] * row["seconds"] == pytest.approx(samples, rel=1e-9)
        assert row["padding_efficiency"] == pytest.approx(real / padded, rel=1e-12)
        runs = row["runs_real_tokens_per_s"]
        assert len(runs) == 2 and row["real_tokens_per_s"] == min(runs)  # the lower median of two runs
    pair = result["lightning_over_plain_loop"]
    expected = [
        a / b
        for a, b in zip(
            rows["lightning"]["runs_real_tokens_per_s"], rows["plain"]["runs_real_tokens_per_s"], strict=True
        )
    ]
    assert pair["pairs"] == pytest.approx(expected, rel=1e-12)
    assert pair["median"] == pytest.approx(statistics.median(expected), rel=1e-12)
    assert "every row: median of 2 runs in ABBA order" in result["header"]
    # the printed ratios are the JSON's: x plain loop (the plain row is the reference), and the pair line
    assert "x plain loop" in stdout and "x HF length-grouped" not in stdout
    base = rows["plain"]["real_tokens_per_s"]
    for row in rows.values():
        cells = _cells(stdout, row["row"])
        assert _number(cells[1]) == pytest.approx(row["real_tokens_per_s"], abs=0.5)
        assert _number(cells[2]) == pytest.approx(row["real_tokens_per_s"] / base, abs=5e-4)
    printed = re.search(r"Lightning / plain loop, run by run: (.*); median (.*)", stdout)
    assert printed is not None
    assert [float(x) for x in printed.group(1).split(", ")] == pytest.approx(expected, abs=5e-4)
    # the saved JSON renders the same report
    report = _ok(_run("gpu_compare.py", "--report-from", str(out)))
    assert report.strip() in stdout


@pytest.mark.parametrize(
    ("name", "doc"),
    [
        ("gpu_pair_h200_300x6_b", "gpu_compare_h200"),
        ("gpu_callbacks_h200", "gpu_callbacks_h200"),
        ("gpu_callbacks_h200_100x4", "gpu_callbacks_h200"),
    ],
)
def test_gpu_compare_renders_recorded_json_as_its_report(bench: Any, name: str, doc: str) -> None:
    # JSON from before rows had names: the recorded report's lines come back verbatim
    text = (RESULTS / f"{doc}.md").read_text()
    report = bench("gpu_report").report(json.loads((RESULTS / f"{name}.json").read_text()))
    lines = [line for line in report.splitlines() if line.strip()]
    assert len(lines) >= 8 and all(line in text for line in lines)


def test_gpu_compare_renders_every_recorded_json(bench: Any) -> None:
    for path in sorted(RESULTS.glob("gpu_*.json")):
        result = json.loads(path.read_text())
        report = bench("gpu_report").report(result)
        for row in result["rows"]:
            assert f"| {row['row']} | {row['real_tokens_per_s']:,.0f} |" in report, path.name


def _main_error(bench: Any, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        bench("gpu_compare").main(list(argv))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "done:" not in captured.out  # nothing ran
    return captured.err


@pytest.mark.slow
def test_gpu_compare_rejects_bad_arguments_before_running(bench: Any, capsys: pytest.CaptureFixture[str]) -> None:
    bad_window = _main_error(bench, capsys, "--quick", "--steps", "2", "--only", "accumulation")
    assert "row 'accumulation'" in bad_window and "multiple of accumulate=2" in bad_window
    nothing = _main_error(bench, capsys, "--quick", "--only", "no such row")
    assert "matches no row" in nothing and "--list" in nothing
    # a title prefix, as --only took before rows had names: refused, with the names it meant
    old = _main_error(bench, capsys, "--quick", "--only", "lightning_txopt: + Freeze")
    assert "e.g. --only freeze,freeze_checkpointing." in old


def test_gpu_compare_list(bench: Any, capsys: pytest.CaptureFixture[str]) -> None:
    bench("gpu_compare").main(["--list"])
    stdout = capsys.readouterr().out
    rows = bench("gpu_rows").define_rows(bench("gpu_rows").Settings())
    for row in rows:
        assert f"| {row.name} | {row.title} |" in stdout
    assert (
        "| issue15 |" in stdout and "| pair | the plain loop and the main Lightning row | plain, lightning |" in stdout
    )


ISSUE15 = [
    "bucket_eager.lognormal.16k",
    "bucket_auto.corpus.16k",
    "llama_bucket.corpus.16k",
    "packed_varlen.corpus.16k",
    "llama_packed_varlen.corpus.16k",
    "packed_static_compile.lognormal.16k",
    "bucket_compile_ladder.corpus.16k",
]


@pytest.mark.slow
def test_gpu_compare_issue15_rows_run_or_name_the_missing_api(tmp_path: Path, bench: Any) -> None:
    """Today the packed-varlen and compile rows are skipped, naming what they need; once issue #15's API exists the
    same test runs them and checks their counts and FLOPs."""
    rows_mod, workloads = bench("gpu_rows"), bench("workloads")
    settings = rows_mod.Settings(
        steps=QUICK_STEPS, warmup=QUICK_WARMUP, max_tokens=QUICK_BUDGET, compile_warmup=2, quick=True
    )
    defined = {r.name: r for r in rows_mod.define_rows(settings)}
    probe = bench("api_check").ApiProbe()
    missing = {name: probe.missing(defined[name].requires) for name in ISSUE15}
    assert not missing["bucket_eager.lognormal.16k"] and not missing["llama_bucket.corpus.16k"]
    out = tmp_path / "i15.json"
    proc = _run("gpu_compare.py", "--quick", "--only", ",".join(ISSUE15), "--json", str(out))
    stdout = _ok(proc)
    result = json.loads(out.read_text())
    ran = {r["name"]: r for r in result["rows"]}
    assert set(ran) == {n for n in ISSUE15 if not missing[n]}
    for name, absent in missing.items():
        if absent:
            assert all(piece in result["skipped"][name] for piece in absent)
            assert f"skipped {name}: needs" in proc.stderr and f"skipped {name}: needs" in stdout
    for name, row in ran.items():
        spec = defined[name]
        workload = workloads.build_workload(spec.model, spec.data, True)
        lengths = workload.lengths
        # model FLOPs: 6 N T + 12 L d sum(l^2), N counted here on a model built from the same config
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForCausalLM if workload.task == "causal-lm" else AutoModelForSequenceClassification
        model = auto.from_config(workload.config)
        n = model.num_parameters(exclude_embeddings=True)
        assert row["non_embedding_params"] == n
        config = workload.config
        flops = (
            6 * n * row["real_tokens"] + 12 * config.num_hidden_layers * config.hidden_size * row["sum_squared_lengths"]
        )
        assert row["model_flops"] == pytest.approx(flops, rel=1e-12)
        assert row["model_tflops_per_s"] == pytest.approx(flops / row["seconds"] / 1e12, rel=1e-9)
        assert row["mfu"] is None  # no known peak on a CPU
        if spec.options.get("static_shapes"):
            continue  # its batches are the library's static plan
        warm = spec.warmup_steps(settings)
        plan = {"max_tokens": spec.options["max_tokens"]}
        if spec.options.get("strategy") == "packed":
            plan["pack_length"] = spec.options["max_length"]
        planned = lengths  # a ladder plans on the widths its rungs pad to: the smallest rung that holds a sample
        if "pad_to_lengths" in spec.options:
            ladder = np.array(spec.options["pad_to_lengths"])
            planned = ladder[np.searchsorted(ladder, lengths)]
        real, _, padded, squares = _counts(lengths, _window(planned, warm, warm + QUICK_STEPS, **plan))
        assert (row["real_tokens"], row["sum_squared_lengths"]) == (real, squares)
        if "pack_length" not in plan and "pad_to_lengths" not in spec.options:
            assert row["padding_efficiency"] == pytest.approx(real / padded, rel=1e-12)
    assert "model FLOPs = 6 * N * T + 12 * L * d * sum(l_i^2)" in stdout


# ---------------------------------------------------------------------------------------------------- gpu_rows & co.
def test_rows_are_named_once_and_chosen_by_name_or_group(bench: Any) -> None:
    rows_mod = bench("gpu_rows")
    rows = rows_mod.define_rows(rows_mod.Settings())
    names = [r.name for r in rows]
    assert len(names) == len(set(names)) and len({r.title for r in rows}) == len(rows)
    select = rows_mod.select
    assert [r.name for r in select(rows, ["lightning", "plain"])] == ["plain", "lightning"]  # table order
    assert [r.name for r in select(rows, ["pair"])] == ["plain", "lightning"]
    assert all(r.default for r in select(rows, []))
    assert {r.name for r in select(rows, [], include=("compile",))} - {r.name for r in select(rows, [])} == {
        "ladder_eager",
        "compile",
        "compile_ladder",
    }
    issue15 = select(rows, ["issue15"])
    assert len(issue15) == 30 and all(r.flops and not r.default for r in issue15)
    auto = [r for r in issue15 if r.name.startswith("bucket_auto.")]  # bucketed batches on the default attention
    assert len(auto) == 4 and all(r.options["attn_implementation"] == "auto" for r in auto)
    assert {r.options["max_tokens"] for r in issue15} == {16_384, 65_536}
    assert {r.name for r in select(rows, ["decoder"])} == {
        "llama_bucket.corpus.16k",
        "llama_packed_varlen.corpus.16k",
        "llama_packed_static_compile.corpus.16k",
        "llama_bucket.corpus.64k",
        "llama_packed_varlen.corpus.64k",
        "llama_packed_static_compile.corpus.64k",
    }
    with pytest.raises(ValueError, match=r"--only 'plain PyTorch loop: our' matches no row\. .* e\.g\. --only plain\."):
        select(rows, ["plain PyTorch loop: our"])


def test_settings_apply_quick_without_touching_the_arguments(bench: Any) -> None:
    import argparse

    args = argparse.Namespace(steps=40, warmup=8, max_tokens=16384, compile_warmup=50, quick=True, match_gib=None)
    settings = bench("gpu_rows").Settings.from_args(args)
    assert (settings.steps, settings.warmup, settings.max_tokens, settings.compile_warmup) == (3, 1, 2048, 2)
    assert vars(args) == dict(steps=40, warmup=8, max_tokens=16384, compile_warmup=50, quick=True, match_gib=None)
    assert settings.budget(65_536) == 8192


def test_schedule_is_abba_and_the_median_is_the_lower_run(bench: Any) -> None:
    runner = bench("gpu_runner")
    assert runner.schedule(["a", "plain", "lightning"], 2, False) == ["plain", "lightning", "lightning", "plain", "a"]
    assert runner.schedule(["a", "b"], 3, True) == ["a", "b", "b", "a", "a", "b"]
    runs = {"b": [{"real_tokens_per_s": x} for x in (3.0, 1.0, 2.0, 4.0)], "a": [{"real_tokens_per_s": 5.0}]}
    rows = runner.summarize(runs, ["a", "b", "c"])
    assert [r["real_tokens_per_s"] for r in rows] == [5.0, 2.0]
    assert rows[1]["runs_real_tokens_per_s"] == [3.0, 1.0, 2.0, 4.0] and "runs_real_tokens_per_s" not in rows[0]


def test_report_finds_reference_rows_by_name_and_in_old_files(bench: Any) -> None:
    find_row = bench("gpu_report").find_row
    old = json.loads((RESULTS / "gpu_compare_h200.json").read_text())["rows"]
    assert find_row(old, "hf_grouped")["row"] == "HF Trainer: group_by_length, bf16, multiple of 8, batch 32"
    assert find_row(old, "plain")["row"].startswith("plain PyTorch loop: our token-budget batches")
    new = [{"name": "x", "row": "plain PyTorch loop: our token-budget batches (2048)"}, {"name": "plain", "row": "p"}]
    assert find_row(new, "plain") is new[1]  # by name only, once rows have names


def test_model_flops_match_the_library_per_token_count(bench: Any) -> None:
    from lightning_txopt.module import TransformerModule

    workloads = bench("workloads")
    module = TransformerModule(config=workloads.bert_config(True), num_labels=40)
    config = module.model.config
    params = module.model.num_parameters(exclude_embeddings=True)
    lengths = [7, 100, 3]
    ours = workloads.model_flops(
        params, config.num_hidden_layers, config.hidden_size, sum(lengths), sum(n * n for n in lengths)
    )
    assert ours == pytest.approx(sum(n * module.flops_per_token(seq_len=n) for n in lengths), rel=1e-12)


def test_lognormal_lengths_are_seeded_and_shaped_as_documented(bench: Any) -> None:
    lengths = bench("workloads").lognormal_lengths
    x = lengths(14_396)
    assert np.array_equal(x, lengths(14_396)) and not np.array_equal(x, lengths(14_396, seed=1))
    assert (np.median(x), x.min(), x.max(), int((x == 512).sum())) == (23, 2, 512, 10)


@pytest.mark.parametrize("module", ["workloads", "gpu_runner", "attention_kernels"])
def test_benchmark_doctests(bench: Any, module: str) -> None:
    failed, attempted = doctest.testmod(bench(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0 and failed == 0


# ---------------------------------------------------------------------------------------------------- predict
def test_predict_compare_quick(tmp_path: Path, bench: Any) -> None:
    probe = bench("api_check").ApiProbe()
    predict = bench("predict_compare")
    spec = {r.name: r for r in predict.ROWS}
    missing = probe.missing(spec["lightning_bucketed"].requires)
    out = tmp_path / "p.json"
    proc = _run(
        "predict_compare.py", "--quick", "--only", "recipe,plain_bucketed,lightning_bucketed", "--json", str(out)
    )
    stdout = _ok(proc)
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    lengths = bench("workloads").build_workload("bert", "corpus", True).lengths
    total = int(lengths.sum())
    # the recipe: 16 batches of 32 in dataset order, each padded to its longest
    chunks = [np.arange(i, min(i + 32, lengths.size)) for i in range(0, lengths.size, 32)]
    budget = plan_epoch(lengths, max_tokens=4096, shuffle=False)
    references = {
        "recipe": (len(chunks), _counts(lengths, chunks)[2]),
        "plain_bucketed": (budget.num_batches, _counts(lengths, budget.rank_batches(0))[2]),
    }
    for name, (batches, padded) in references.items():
        row = rows[name]
        assert (row["real_tokens"], row["batches"]) == (total, batches)
        assert row["padding_efficiency"] == pytest.approx(total / padded, rel=1e-12)
        assert row["max_abs_logit_diff_vs_recipe"] < 1e-4  # fp32 on CPU: padding changes no logit
        assert row["real_tokens_per_s"] == pytest.approx(total / row["seconds"], rel=1e-12)
    ratio = _number(_cells(stdout, rows["plain_bucketed"]["row"])[2])
    assert ratio == pytest.approx(
        rows["plain_bucketed"]["real_tokens_per_s"] / rows["recipe"]["real_tokens_per_s"], abs=5e-4
    )
    if missing:
        assert "lightning_bucketed" not in rows
        assert all(piece in result["skipped"]["lightning_bucketed"] for piece in missing)
        alone = _run("predict_compare.py", "--quick", "--only", "lightning_bucketed")
        assert alone.returncode == 2 and "none of the selected rows can run here" in alone.stderr
        assert "BucketDataModule(predict_dataset=...)" in alone.stderr and "Traceback" not in alone.stderr
    else:
        assert rows["lightning_bucketed"]["real_tokens"] == total
    assert _ok(_run("predict_compare.py", "--report-from", str(out))).strip() in stdout


# ---------------------------------------------------------------------------------------------------- others
@pytest.mark.slow
def test_model_techniques_tiny(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, BertConfig

    out = tmp_path / "mt.json"
    _ok(_run("model_techniques.py", "--tiny", "--steps", "1", "--warmup", "1", "--json", str(out)))
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    config = BertConfig(hidden_size=64, num_hidden_layers=8, num_attention_heads=4, intermediate_size=256)
    config.num_labels = 40
    model = AutoModelForSequenceClassification.from_config(config)
    total = model.num_parameters()
    embeddings = model.bert.embeddings
    frozen = sum(
        m.weight.numel()
        for m in (embeddings.word_embeddings, embeddings.position_embeddings, embeddings.token_type_embeddings)
    )
    layer = sum(p.numel() for p in model.bert.encoder.layer[0].parameters())
    tensors = len(list(model.parameters()))
    expected = {  # (parameters, trainable) of each variant
        "plain": (total, total),
        "checkpointing full (HF mechanism)": (total, total),
        "freeze embeddings": (total, total - frozen),
        "share layers: 4 unique, cycle_rev": (total - 4 * layer, total - 4 * layer),
        "all three (share 4, freeze, full ckpt)": (total - 4 * layer, total - 4 * layer - frozen),
    }
    for name, (params, trainable) in expected.items():
        assert (rows[name]["params"], rows[name]["trainable"]) == (params, trainable), name
    # AdamW state: two fp32 moments per trainable parameter and a 4-byte step per parameter tensor
    state = rows["plain"]["optimizer_state_mib"] * 2**20
    assert state == pytest.approx(8 * total + 4 * tensors, abs=1e-6)
    for row in rows.values():  # every step is batch 8 x 128 tokens
        assert row["tokens_per_s"] * row["step_ms"] / 1000 == pytest.approx(8 * 128, rel=1e-9)


@pytest.mark.ddp
def test_multi_gpu_quick_on_two_cpu_ranks(tmp_path: Path, bench: Any) -> None:
    out = tmp_path / "mg.json"
    stdout = _ok(_run("multi_gpu.py", "--quick", "--devices", "2", "--steps", "2", "--warmup", "1", "--json", str(out)))
    result = json.loads(out.read_text())
    single, multi = result["single"], result["multi"]
    efficiency = multi["real_tokens_per_s"] / (2 * single["real_tokens_per_s"])
    assert result["scaling_efficiency"] == pytest.approx(efficiency, rel=1e-12)
    assert f"scaling efficiency at 2 devices: {efficiency:.3f}" in stdout
    lengths = bench("workloads").build_workload("bert", "corpus", True).lengths
    one, two = (plan_epoch(lengths, max_tokens=QUICK_BUDGET, seed=0, num_replicas=n) for n in (1, 2))
    assert single["batches_per_rank"] == [one.num_steps] and multi["batches_per_rank"] == [two.num_steps] * 2
    # the timed window: batches 1..2 of each rank's plan
    for run, plan, ranks in ((single, one, 1), (multi, two, 2)):
        counts = [_counts(lengths, plan.rank_batches(r)[1:3]) for r in range(ranks)]
        real, padded = sum(c[0] for c in counts), sum(c[2] for c in counts)
        assert run["padding_efficiency"] == pytest.approx(real / padded, rel=1e-12)


@pytest.mark.slow
def test_padding_efficiency_against_the_corpus_readme() -> None:
    stdout = _ok(_run("padding_efficiency.py"))
    assert "Corpus: 14,396 samples" in stdout  # the embedded corpus, whole
    # fixed padding to 512: ceil(14,396 / 32) = 450 batches, 14,396 x 512 = 7,370,752 processed tokens
    assert "| fixed, batch 32 | 450 | 7,370,752 | 0.085 |" in stdout


def test_plan_speed_small(bench: Any) -> None:
    n = 20_000
    stdout = _ok(_run("plan_speed.py", "--n", str(n), "--pack-n", str(n), "--repeats", "1"))
    pool = bench("_common").corpus_lengths()
    lengths = np.random.default_rng(0).choice(pool, n).astype(np.int64)
    packed_lengths = np.random.default_rng(1).choice(pool, n).astype(np.int64)
    by_32 = math.ceil(n / 32)
    expected = {
        "transformers get_length_grouped_indices, batch 32 (planning only)": by_32,
        "transformers LengthGroupedSampler + BatchSampler, batch 32, one epoch": by_32,
        "lightning_txopt plan_epoch, batch 32 (planning only)": by_32,
        "lightning_txopt BucketBatchSampler, batch 32: construct + one epoch": by_32,
        "lightning_txopt BucketBatchSampler, max_tokens 16384: construct + one epoch": plan_epoch(
            lengths, max_tokens=16384
        ).num_batches,
    }
    for path, batches in expected.items():
        assert _number(_cells(stdout, path)[2]) == batches, path
    packed = plan_epoch(packed_lengths, max_tokens=16384, pack_length=512, seed=0, epoch=1)
    assert _number(_cells(stdout, "plan_epoch, pack_length 512, max_tokens 16384")[3]) == packed.num_batches
    bucket = _cells(stdout, "plan_epoch, max_tokens 16384 (bucket planner)")
    assert _number(bucket[3]) == plan_epoch(packed_lengths, max_tokens=16384, seed=0, epoch=1).num_batches
    assert re.search(r"packing 20,000 lengths: [\d.]+x the bucket planner \(target <= 5x: (not )?met\)", stdout)
    assert re.search(r"BucketBatchSampler end to end \(batch 32\): [\d.]+x .* \(target >= 5x: (not )?met\)", stdout)


@pytest.mark.slow
def test_token_budget_quick_and_report(tmp_path: Path) -> None:
    out = tmp_path / "tb.json"
    stdout = _ok(
        _run("token_budget.py", "--quick", "--only", "bert-bucket", "--verify-epochs", "1", "--json", str(out))
    )
    row = json.loads(out.read_text())["rows"][0]
    found, hand = row["finder"], row["by_hand"]
    assert row["verify"]["ok"] and found["max_tokens"] % found["multiple"] == 0
    assert hand["max_tokens"] >= found["max_tokens"]  # the finder keeps a margin; a full run at its budget fits
    assert hand["first_failing"] > hand["max_tokens"]  # bracketed: a larger budget ran out of memory
    assert f"| bert-bucket | {found['max_tokens']} |" in stdout
    assert f"| bert-bucket | {found['max_tokens']} |" in _ok(_run("token_budget.py", "--report-from", str(out)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_token_budget_refuses_the_cpu_without_quick() -> None:
    proc = _run("token_budget.py", "--no-reference", timeout=120)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr


@pytest.mark.slow
def test_packing_step_quick_reports_three_cases(tmp_path):
    out = tmp_path / "step.json"
    subprocess.run(
        [sys.executable, str(BENCH / "packing_step.py"), "--quick", "--json", str(out)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["bucket sdpa eager", "packed varlen eager", "packed static compile"]
    assert rows[0]["x_bucket"] == 1.0
    for r in rows:
        assert len(r["runs"]) == 4 and abs(r["median"] - float(np.median(r["runs"]))) <= 1


def test_chunked_loss_model_quick(tmp_path: Path) -> None:
    out = tmp_path / "clm.json"
    stdout = _ok(_run("chunked_loss_model.py", "--quick", "--json", str(out)))
    runs = json.loads(out.read_text())["runs"]
    assert [r["setting"] for r in runs] == ["unchunked", "chunked", "chunked", "unchunked"]  # ABBA
    assert [r["loss_chunk_size"] for r in runs[:2]] == [None, 4096]
    losses = [r["first_loss"] for r in runs]
    assert max(losses) - min(losses) <= 1e-4 * abs(losses[0])  # same seed and batches, fp32: the same loss
    assert "| chunked | 4,096 |" in stdout and "chunked / unchunked: speed" in stdout


def test_attention_fallback_quick(tmp_path: Path) -> None:
    out = tmp_path / "af.json"
    stdout = _ok(_run("attention_fallback.py", "--quick", "--json", str(out)))
    rows = json.loads(out.read_text())["rows"]
    assert {(r["causal"], r["variant"]) for r in rows} == {
        (c, v) for c in (False, True) for v in ("block mask (the fallback)", "flex attention, eager")
    }
    for r in rows:  # the same attention, two implementations (fp32)
        assert r["max_abs_diff"] < 1e-4, r
        if r["variant"].startswith("block"):  # the fallback trains (flex: refused on a CPU by torch 2.13)
            assert float(r["train_ms"]) > 0, r
    assert "| bidirectional | block mask (the fallback) |" in stdout


# ---------------------------------------------------------------------------------------------- attention kernels
def test_attention_kernels_packs_until_the_next_sample_does_not_fit(bench: Any) -> None:
    kernels = bench("attention_kernels")
    lengths = np.minimum(kernels.distribution("corpus")[:50], 64)
    batches = kernels.packed_lengths(lengths, 256, 40)  # about 5 shuffles of the 50 lengths
    for batch, following in itertools.pairwise(batches):
        assert batch.sum() <= 256 < batch.sum() + following[0]  # the next sample opens the next batch
    stream = np.concatenate(batches)
    assert stream.size >= 4 * lengths.size
    for start in range(0, stream.size - lengths.size + 1, lengths.size):  # each shuffle: every sample once
        assert np.array_equal(np.sort(stream[start : start + lengths.size]), np.sort(lengths))
    small = kernels.packed_lengths(np.array([3, 4, 5]), 8, 30)  # reshuffled many times
    assert np.array_equal(np.sort(np.concatenate(small)[:27].reshape(9, 3), axis=1), np.tile([3, 4, 5], (9, 1)))
    assert [s.tolist() for s in small] == [s.tolist() for s in kernels.packed_lengths(np.array([3, 4, 5]), 8, 30)]
    with pytest.raises(ValueError, match="cannot fit"):
        kernels.packed_lengths(np.array([3, 600]), 512, 1)


def test_attention_kernels_quick(tmp_path: Path) -> None:
    out = tmp_path / "ak.json"
    stdout = _ok(_run("attention_kernels.py", "--quick", "--json", str(out), timeout=300))
    result = json.loads(out.read_text())
    tables = result["tables"]
    assert [(t["shape"], t["data"]) for t in tables] == [
        (s, d) for s in ("bert", "llama") for d in ("corpus", "lognormal")
    ]
    assert result["failures"] == []
    for t in tables:
        assert (t["tokens"], t["dtype"], t["causal"], t["heads"]) == (
            256,
            "float32",
            t["shape"] == "llama",
            {"bert": 12, "llama": 16}[t["shape"]],
        )
        assert t["reference"].startswith("dense SDPA") and t["batches"] == 2
        assert max(t["padding_per_batch"]) < 64 and t["longest_segment"] <= 64  # lengths clipped to 64
        cases = {c["case"]: c for c in t["cases"]}
        assert list(cases) == ["varlen", "varlen_tight", "flex", "flex_with_mask", "flex_k64"]
        for c in cases.values():
            assert c["skipped"] is None, c  # every case runs on a CPU in fp32: the forward at least
            assert c["rel_diff"]["out"] < 1e-4, c
            if c["backward"] is None:  # trains: its gradients match the reference's, and it was timed
                assert all(c["rel_diff"][g] < 1e-4 for g in ("dq", "dk", "dv")), c
                assert len(c["windows_ms"]) == 2 and c["ms"] > 0
            else:  # flex attention refuses backward on a CPU (torch 2.11-2.13): output only, not timed
                assert c["case"].startswith("flex") and "backward" in c["backward"], c
                assert c["diff"]["dq"] is None and c["windows_ms"] == []
        assert cases["varlen"]["backward"] is None and cases["varlen"]["x_varlen"] == 1.0
    assert stdout.count("| varlen |") == 4 and "| flex_with_mask |" in stdout


def test_attention_kernels_fails_loudly_above_the_tolerance(tmp_path: Path) -> None:
    out = tmp_path / "ak.json"
    args = ("--quick", "--shape", "bert", "--data", "corpus", "--tolerance", "1e-12", "--json", str(out))
    proc = _run("attention_kernels.py", *args, timeout=300)
    assert proc.returncode == 1 and "differences above --tolerance 1e-12" in proc.stderr, proc.stderr[-2000:]
    failures = json.loads(out.read_text())["failures"]  # the report was written first
    assert failures and all(" flex" in f and ": out differs by " in f for f in failures), failures


@pytest.mark.parametrize("causal", [False, True])
def test_attention_kernels_builds_the_document_block_mask_from_the_boundaries(bench: Any, causal: bool) -> None:
    kernels = bench("attention_kernels")
    from torch.nn.attention.flex_attention import create_block_mask

    tokens = 2048
    lengths = np.minimum(kernels.distribution("lognormal"), 512)
    for seed in range(6):  # short and long samples, samples across block edges, a padding segment or none
        samples = kernels.packed_lengths(lengths, tokens, 2, seed=seed)[seed % 2]
        batch = kernels.Batch.build(samples, tokens, causal, torch.device("cpu"))
        ref = create_block_mask(batch.mask_mod, None, None, tokens, tokens, device="cpu", BLOCK_SIZE=128)
        got = kernels.document_block_mask(batch.cu, tokens, 128, causal, batch.mask_mod)
        assert torch.equal(got.to_dense(), ref.to_dense())  # the same blocks are read
        for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name  # and the same ones skip the mask
    one = kernels.Batch.build(np.array([300, 200]), 512, causal, torch.device("cpu"))  # by hand: blocks of 128
    mask = kernels.document_block_mask(one.cu, 512, 128, causal, one.mask_mod)
    # sample 1 fills blocks 0-1 and part of 2; sample 2 the rest of 2 and part of 3; padding the end of 3
    expected_full = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    if causal:
        expected_full = [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    full = torch.zeros(4, 4, dtype=torch.int64)
    for i in range(4):
        for j in mask.full_kv_indices[0, 0, i, : int(mask.full_kv_num_blocks[0, 0, i])].tolist():
            full[i, j] = 1
    assert full.tolist() == expected_full


def test_attention_kernels_quick_runs_the_optional_cases(tmp_path: Path) -> None:
    out = tmp_path / "ak.json"
    cases = ("varlen", "flex_direct", "flex_direct_k64", "njt_flash", "njt_cudnn")
    args = ("--quick", "--data", "corpus", "--cases", *cases, "--json", str(out))
    _ok(_run("attention_kernels.py", *args, timeout=300))
    tables = {t["shape"]: {c["case"]: c for c in t["cases"]} for t in json.loads(out.read_text())["tables"]}
    for shape, found in tables.items():
        for name in ("flex_direct", "flex_direct_k64"):  # the mask from the boundaries gives the reference output
            assert found[name]["skipped"] is None and found[name]["rel_diff"]["out"] < 1e-4, found[name]
        for name in ("njt_flash", "njt_cudnn"):  # no such kernel on a CPU, and no causal nested SDPA: reported
            reason = found[name]["skipped"]
            assert reason and ("is_causal" in reason if shape == "llama" else "backend" in reason), reason


# ---------------------------------------------------------------------------------------------------- step syncs
def test_step_syncs_quick() -> None:
    stdout = _ok(_run("step_syncs.py", "--quick", "--profiled", "3", timeout=300))
    assert "packed static shapes, 2048 tokens per batch, compile=False" in stdout
    assert "profiled 3 steps:" in stdout and "Optimizer.step" in stdout  # the whole step runs in the profiled window
    assert "host syncs" not in stdout  # the sync check needs CUDA


def test_step_syncs_counts_each_launch_copy_and_sync_per_step(bench: Any) -> None:
    syncs = bench("step_syncs")

    class Event:
        def __init__(self, key: str, cpu_us: float, count: int) -> None:
            self.key, self.cpu_time_total, self.count = key, cpu_us, count

    events = [
        Event("Optimizer.step#AdamW.step", 40_000, 2),
        Event("cuLaunchKernel", 1_000, 900),
        Event("cudaLaunchKernel", 500, 300),
        Event("Memcpy HtoD (Pinned -> Device)", 0, 16),
        Event("cudaStreamSynchronize", 200, 2),
    ]
    summary = syncs.summarize(events, 2, 0.08)
    assert summary["wall_ms_per_step"] == pytest.approx(40.0)
    assert summary["kernel_launches_per_step"] == 600
    assert summary["top_host_ops"][0] == {"name": "Optimizer.step#AdamW.step", "host_ms": 20.0, "calls": 1.0}
    assert [e["name"] for e in summary["copies"]] == ["Memcpy HtoD (Pinned -> Device)"]
    assert [(e["name"], e["calls"]) for e in summary["synchronize_calls"]] == [("cudaStreamSynchronize", 1.0)]


def test_attention_kernels_can_make_dynamo_fail_at_its_recompile_limit(bench: Any) -> None:
    kernels = bench("attention_kernels")
    config = torch._dynamo.config
    assert hasattr(config, "fail_on_recompile_limit_hit")  # fails loudly if torch renames or drops the switch
    before = bool(config.fail_on_recompile_limit_hit)
    try:
        assert kernels.fail_on_recompile_limit()
        assert config.fail_on_recompile_limit_hit is True
    finally:
        config.fail_on_recompile_limit_hit = before


def test_collate_speed_compares_both_paths_batch_for_batch() -> None:
    stdout = _ok(_run("collate_speed.py", "--quick", "--tokens", "2048", "--repeats", "1", "--data", "corpus"))
    assert "both paths gave the same batches" in stdout
    cells = _cells(stdout, "corpus, packed, static shapes, max_tokens 2048")
    assert int(cells[1]) > 0 and float(cells[4]) > 0


def test_host_overhead_times_the_three_rows() -> None:
    stdout = _ok(_run("host_overhead.py", "--steps", "110", "--repeats", "1"))
    cells = _cells(stdout, "1")
    assert len(cells) == 5 and all(float(c.replace(",", "")) > 0 for c in cells[1:4])


def test_mask_sync_quick_gives_the_same_logits_with_the_key_mask(tmp_path: Path) -> None:
    out = tmp_path / "mask.json"
    stdout = _ok(_run("mask_sync.py", "--quick", "--json", str(out)))
    result = json.loads(out.read_text())
    assert result["fp32_max_difference"] == 0.0  # the 4-D key mask attends exactly as the 2-D mask
    assert [r["name"] for r in result["rows"]] == ["2d", "4d", "2d+spin1.5", "4d+spin1.5"]
    assert all(len(r["runs"]) == 2 for r in result["rows"]) and "| 4d |" in stdout
