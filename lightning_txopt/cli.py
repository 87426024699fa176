"""The ``txopt`` command: ``stats``, ``fit``, ``demo`` and ``bench``.

The library never prints; this module is the one place that does. A user's mistake (a bad path or value, a missing
column, a typo in a YAML key) is one line on stderr, ``txopt <command>: error: ...``, and exit status 2; arguments are
checked before any heavy work (tokenising, training). ``TXOPT_TRACEBACK=1`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

__all__ = ["main"]

RUNS_DIR = "txopt_runs"  # every output of `txopt` goes below this folder of the working directory (git-ignored)


class _CommandLineError(ValueError):
    """A mistake on the command line, reported as ``<prog>: error: <message>``."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def _did_you_mean(word: str, candidates: Iterable[str], quote: str = "") -> str:
    best = _closest(word, candidates)
    return f" (did you mean {quote}{best}{quote}?)" if best else ""


# ---------------------------------------------------------------------------------------------------------- argparse
class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block): ``main`` prints them."""

    def error(self, message: str) -> NoReturn:
        raise _CommandLineError(self.prog, f"{message} (see `{self.prog} --help`)")


def _number(text: str, kind: type[int] | type[float], ok: Callable[[float], bool], want: str) -> Any:
    """``text`` as ``kind`` if ``ok`` says so, else argparse's error naming what it must be."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return int(_number(text, int, lambda v: v >= 1, "a positive integer"))


def _steps(text: str) -> int:
    return int(_number(text, int, lambda v: v >= 1 or v == -1, "a positive integer (or -1: no limit)"))


def _positive_float(text: str) -> float:
    return float(_number(text, float, lambda v: v > 0, "a positive number"))


def _unrecognized(extra: Sequence[str], parser: argparse.ArgumentParser) -> _CommandLineError:
    options = [o for action in parser._actions for o in action.option_strings]
    bad = next((a for a in extra if a.startswith("-")), extra[0])
    hint = _did_you_mean(bad.split("=", 1)[0], options)
    return _CommandLineError(parser.prog, f"unrecognized argument {bad!r}{hint} (see `{parser.prog} --help`)")


def _writable_file(path: str | None, option: str) -> None:
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {str(Path(path).parent)!r} does not exist; create it first.")


# ---------------------------------------------------------------------------------------------------------- stats
def _stats(args: argparse.Namespace) -> int:
    from lightning_txopt.data.report import padding_report
    from lightning_txopt.data.text import load_records, load_tokenizer
    from lightning_txopt.utils.table import markdown_table

    if args.batch_size is None and args.max_tokens is None:  # the two are mutually exclusive options
        args.batch_size = 32
    if args.max_tokens is not None and args.max_tokens < args.max_length:
        raise ValueError(
            f"--max-tokens {args.max_tokens} < --max-length {args.max_length}: fixed padding makes every text "
            f"{args.max_length} tokens long, which no batch of {args.max_tokens} tokens holds. Raise --max-tokens to "
            f"at least {args.max_length}, or lower --max-length (e.g. --max-length {args.max_tokens})."
        )
    _writable_file(args.plot, "--plot")
    _writable_file(args.json, "--json")
    if args.plot:
        _pyplot()  # fail now, not after tokenising, when matplotlib is missing
    records = load_records(args.data, text_column=args.text_column)  # every text checked, before tokenising
    tokenizer = load_tokenizer(args.tokenizer)
    texts = [r[args.text_column] for r in records]
    ids = tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    lengths = np.array([max(len(x), 1) for x in ids])
    source = args.data or "embedded corpus (fortunes)"
    q = np.percentile(lengths, [50, 90, 99])
    print(f"{source}: {lengths.size:,} texts, {int(lengths.sum()):,} tokens (truncated at {args.max_length})")
    print(
        f"length: min {lengths.min()}, median {q[0]:.0f}, mean {lengths.mean():.1f}, p90 {q[1]:.0f}, "
        f"p99 {q[2]:.0f}, max {lengths.max()}\n"
    )
    rows = padding_report(
        lengths, batch_size=args.batch_size, max_tokens=args.max_tokens, max_length=args.max_length, seed=args.seed
    )
    unit = f"batch {args.batch_size}" if args.batch_size else f"max_tokens {args.max_tokens}"
    print(
        markdown_table(
            [f"strategy ({unit})", "batches", "real tokens", "processed tokens", "efficiency"],
            [
                [r.strategy, r.batches, r.real_tokens, r.processed_tokens, f"{r.efficiency:.1%}"]
                for r in rows  # one format per column
            ],
        )
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"lengths": {"n": int(lengths.size), "median": float(q[0])}, "rows": [r.as_dict() for r in rows]},
                indent=2,
            )
        )
    if args.plot:
        _plot_stats(lengths, rows, args.plot, source)
        print(f"\nchart: {args.plot}")
    return 0


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("Charts need matplotlib: `pip install matplotlib` (or the `demo` extra).") from err
    return plt


def _plot_stats(lengths: np.ndarray, rows: Sequence[Any], path: str, title: str) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.hist(lengths, bins=60, color="#4c72b0")
    left.set_yscale("log")
    left.set_xlabel("tokens per text")
    left.set_ylabel("texts (log)")
    left.set_title(f"Length distribution: {title}")
    names = [r.strategy for r in rows]
    right.bar(names, [r.processed_tokens for r in rows], color="#dd8452", label="processed (with padding)")
    right.bar(names, [r.real_tokens for r in rows], color="#55a868", label="real")
    for i, r in enumerate(rows):
        right.text(i, r.processed_tokens, f"{r.efficiency:.1%}", ha="center", va="bottom")
    right.set_ylabel("tokens per epoch")
    right.set_title("Processed vs real tokens per strategy")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- fit
_FIT_USAGE = "`txopt fit --help` lists every option"


def _parse_error_message(message: str, keys: Sequence[str]) -> str:
    """One line from a jsonargparse error: the bad key first, and the closest valid key or value."""
    text = str(message)
    unknown = re.search(r"does not accept option '([^']+)'", text) or re.search(r'No action for key "([^"]+)"', text)
    if unknown:
        key = unknown.group(1)
        return (
            f"unknown key {key!r}{_did_you_mean(key, keys, quote=chr(39))} in the config file(s) or the command "
            f"line; {_FIT_USAGE}"
        )
    linked = re.search(r"argument (\S+) --> (\S+):", text)
    if linked:
        source, target = linked.groups()
        return (
            f"{target} is not an option: it is set from {source} (the number of distinct labels in the data); remove "
            f"{target} from the config file(s) and the command line"
        )
    extra = re.search(r"[Uu]nrecognized arguments: (\S+)", text)
    if extra:
        bad = extra.group(1).split("=", 1)[0]
        return f"unrecognized argument {bad!r}{_did_you_mean(bad.lstrip('-'), keys, quote='--')}; {_FIT_USAGE}"
    keyed = re.match(r'\s*Parser key "([^"]+)":\s*(.*)', text, flags=re.S)
    if not keyed:
        return f"{_one_line(text)}; {_FIT_USAGE}"
    key, detail = keyed.group(1), keyed.group(2)
    # a callback's (or any class's) init_args: "Problem with given class_path 'X': Option 'y' is not accepted"
    option = re.search(r"class_path '([^']+)':\s*Option '([^']+)' is not accepted", detail)
    if option:
        cls, name = option.groups()
        return (
            f"unknown key {name!r}{_did_you_mean(name, _init_args(cls), quote=chr(39))} in the init_args of "
            f"{cls} ({key}); {_FIT_USAGE}"
        )
    attr = re.search(r"class_path '([^']+)':\s*module '([^']+)' has no attribute '([^']+)'", detail)
    if attr:
        cls, module, name = attr.groups()
        hint = _did_you_mean(name, _module_names(module))
        return f"{key}: no class {name!r} in {module}{hint}; {_FIT_USAGE}"
    given = re.search(r"Given value: (.*)", detail)
    literal = re.search(r"Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)", detail)
    if literal:
        choices = [c.strip().strip("'\"") for c in literal.group(1).split(",")]
        value = literal.group(2).strip()
        return f"--{key}: {value!r} is not one of {choices}{_did_you_mean(value, choices, quote=chr(39))}"
    subtypes = re.search(r"Subtypes: \[(.*?)\]\n", detail)
    if subtypes and given:
        names = re.findall(r"<class '([^']+)'>|([\w.\[\]]+\])", subtypes.group(1))
        expected = [("null" if a == "NoneType" else a.rsplit(".", 1)[-1]) or b for a, b in names]
        return f"--{key}: expected {' or '.join(expected)}, got {given.group(1).strip()!r}"
    first = next((line.strip() for line in detail.splitlines() if line.strip()), "")
    return f"--{key}: {_one_line(first)}"


def _init_args(class_path: str) -> list[str]:
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def _module_names(module: str) -> list[str]:
    import importlib

    try:
        return [n for n in dir(importlib.import_module(module)) if not n.startswith("_")]
    except ImportError:
        return []


def _yaml_problem(args: Sequence[str]) -> str | None:
    """Which ``--config`` file is not valid YAML, and where (jsonargparse does not name the file)."""
    import yaml

    paths = [b for a, b in itertools.pairwise(args) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in paths:
        try:
            yaml.safe_load(Path(path).read_text())
        except OSError:
            continue
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or type(err).__name__
            return f"--config {path}: not valid YAML ({problem}{where}); fix the file."
    return None


def _check_fit_config(config: Any) -> None:
    """Conflicts the command line makes easy (one value from the YAML, one from a flag), before any class is built."""
    data = config.get("data") or {}
    batch_size, max_tokens = data.get("batch_size"), data.get("max_tokens")
    if batch_size is not None and max_tokens is not None:
        raise ValueError(
            f"data.batch_size={batch_size} and data.max_tokens={max_tokens} are both set (one may come from a --config "
            "file); they are exclusive: keep one, e.g. add `--data.max_tokens null` to batch by sample count, or "
            "`--data.batch_size null` to batch by tokens."
        )
    path = data.get("data")
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(
            f"--data.data {path}: no such file or folder (relative paths start at {str(Path.cwd())!r}); give a .jsonl, "
            ".csv or .tsv file (optionally .gz) or a saved Hugging Face dataset folder."
        )


def _fit(argv: list[str]) -> int:
    import warnings
    from argparse import ArgumentError

    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from lightning_txopt.data.text import TextDataModule
    from lightning_txopt.module import TransformerModule

    if not argv:
        raise ValueError(f"give a configuration, e.g. `txopt fit --config examples/fit.yaml`; {_FIT_USAGE}.")

    class FitCLI(LightningCLI):
        """LightningCLI with only ``fit``, whose parse errors become one line naming the bad key."""

        fit_parser: LightningArgumentParser | None = None

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {"fit": LightningCLI.subcommands()["fit"]}

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            self.fit_parser = parser  # called once, with the `fit` parser: its keys are the valid ones
            # the model's classes come from the data; the link also builds the DataModule first, so that its checks
            # (files, columns, records, tokenizer) run before a model is loaded
            parser.link_arguments("data.num_labels", "model.num_labels", apply_on="instantiate")

        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            try:
                with warnings.catch_warnings():  # we pass `args` on purpose (sys.argv holds `txopt fit ...`)
                    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
                    super().parse_arguments(parser, args)
            except ArgumentError as err:
                problem = _yaml_problem(args) if "Problems parsing config" in str(err) else None
                if problem:
                    raise ValueError(problem) from None
                keys: list[str] = []
                if self.fit_parser is not None:
                    try:
                        keys = [k for k, _ in self.fit_parser.get_defaults().items(branches=False)]
                    except Exception:  # suggestions are a nicety; never hide the parse error behind another one
                        keys = []
                raise ValueError(_parse_error_message(str(err), keys)) from None

        def before_instantiate_classes(self) -> None:
            _check_fit_config(self.config["fit"])

    # "Seed set to 0" would be a second line before an error; the seed is in config.yaml
    seed_logger = logging.getLogger("lightning.fabric.utilities.seed")
    drop_seed_message = _DropMessages("Seed set to")
    seed_logger.addFilter(drop_seed_message)
    try:
        FitCLI(
            TransformerModule,
            TextDataModule,
            args=["fit", *argv],
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"default_root_dir": f"{RUNS_DIR}/fit"},  # config.yaml, logs and checkpoints go here
            parser_kwargs={"prog": "txopt", "exit_on_error": False, "fit": {"exit_on_error": False}},
        )
    finally:
        seed_logger.removeFilter(drop_seed_message)
    return 0


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# ---------------------------------------------------------------------------------------------------------- demo
def _model_source(tiny: bool) -> tuple[str | None, Any, str]:
    """``(model path, config, name)``: the demo extra's pretrained MiniLM, or with ``--tiny`` a tiny random BERT."""
    if tiny:
        from transformers import BertConfig

        config = BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=512,
        )
        return None, config, "a tiny random BERT"
    from lightning_txopt.data.text import default_tokenizer_path

    return str(default_tokenizer_path()), None, "all-MiniLM-L6-v2"


def _device(accelerator: str) -> str:
    import torch

    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ValueError(
            f"--accelerator {accelerator}: no CUDA GPU is available here; use --accelerator cpu (or auto)."
        )
    return "cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu"


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


# What the demo does on each device when no option says otherwise. CPU: a small, clearly learnable task that runs in
# about a minute on 2 cores (the 4 largest categories; a learning rate for 17 steps). GPU: the whole corpus, 40
# classes, the Hugging Face Trainer recipe's learning rate (docs/results/time_to_accuracy_h200.md: 0.535 after 2 epochs
# of batch 32).
_DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"classes": 4, "limit": 700, "max_length": 128, "epochs": 1, "lr": 3e-4, "val_fraction": 0.25},
    "cuda": {"classes": 40, "limit": None, "max_length": 512, "epochs": 2, "lr": 5e-5, "val_fraction": 0.1},
}
_DEMO_BATCH = 32


def _demo_settings(args: argparse.Namespace, device: str) -> dict[str, Any]:
    defaults = _DEMO_DEFAULTS[device]
    chosen = {
        "classes": args.classes,
        "limit": args.limit,
        "max_length": args.max_length,
        "epochs": args.epochs,
        "lr": args.lr,
    }
    settings = {k: (defaults[k] if chosen.get(k) is None else chosen[k]) for k in defaults}
    if args.max_tokens is not None and args.max_tokens < settings["max_length"]:
        raise ValueError(
            f"--max-tokens {args.max_tokens} < max_length {settings['max_length']}: a text of max_length tokens would "
            f"not fit a batch. Raise --max-tokens to at least {settings['max_length']} or lower --max-length."
        )
    if not 2 <= settings["classes"] <= 40:
        raise ValueError(f"--classes must be between 2 and 40 (the corpus has 40 categories), got {args.classes}.")
    return settings


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value != value else format(value, spec)  # NaN: not measured


def _demo(args: argparse.Namespace) -> int:
    from lightning_txopt.callbacks import FreezeEmbeddings
    from lightning_txopt.data.corpus import load_fortunes
    from lightning_txopt.data.text import TextDataModule
    from lightning_txopt.demo import largest_categories, measure_in_subprocess
    from lightning_txopt.precision import resolve_precision
    from lightning_txopt.utils.table import markdown_table

    device = _device(args.accelerator)
    s = _demo_settings(args, device)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    plot, no_chart = args.plot, ""
    if plot:
        try:
            _pyplot()
        except ImportError as err:
            plot, no_chart = False, str(err)
    model, config, model_name = _model_source(args.tiny)
    data: str | None = None
    if s["classes"] < 40:  # a subset of the corpus, written where the user can read it
        data = str(out / "demo_data.jsonl")
        subset = largest_categories([dict(r) for r in load_fortunes()], s["classes"])
        Path(data).write_text("".join(json.dumps(r) + "\n" for r in subset))
    precision = resolve_precision("auto", accelerator=device)
    common: dict[str, Any] = dict(limit=s["limit"], max_length=s["max_length"], seed=args.seed)
    common["val_fraction"] = s["val_fraction"]
    # both DataModules first: every argument and record is checked before the baseline trains
    baseline_dm = TextDataModule(data, args.tokenizer, strategy="fixed", batch_size=_DEMO_BATCH, **common)
    budget = dict(max_tokens=args.max_tokens) if args.max_tokens else dict(batch_size=_DEMO_BATCH)
    optimised_dm = TextDataModule(
        data,
        args.tokenizer,
        strategy="bucket",
        pad_to_multiple_of=8 if precision != "32-true" else None,
        **budget,
        **common,
    )
    n = len(baseline_dm.records) if s["limit"] is None else min(s["limit"], len(baseline_dm.records))
    n_val = round(s["val_fraction"] * n)
    name = _device_name(device)
    what = "the embedded corpus" if data is None else f"the embedded corpus's {s['classes']} largest categories"
    print(
        f"txopt demo on {name}: {model_name} fine-tuned twice on {n:,} texts of {what} ({n - n_val:,} train, "
        f"{n_val:,} validation), max_length {s['max_length']}, {s['epochs']} epoch(s), learning rate {s['lr']:g}\n"
    )
    kwargs: dict[str, Any] = dict(
        model=model,
        config=config,
        accelerator=device,
        max_epochs=s["epochs"],
        max_steps=args.max_steps,
        learning_rate=s["lr"],
        seed=args.seed,
        enable_progress_bar=not args.quiet,
    )
    baseline_name = f"baseline: fixed padding to {s['max_length']}, fp32, no callbacks"
    optimised_name = (
        f"optimised: bucketed by length{f' (max_tokens={args.max_tokens})' if args.max_tokens else ''}, "
        f"{'fp32' if precision == '32-true' else precision}, frozen embeddings"
    )
    # each run in a process of its own: its peak memory is its own, and neither warms caches for the other
    baseline = measure_in_subprocess(baseline_name, datamodule=baseline_dm, precision="32-true", **kwargs)
    optimised = measure_in_subprocess(
        optimised_name, datamodule=optimised_dm, callbacks=[FreezeEmbeddings()], precision=precision, **kwargs
    )
    results = [baseline, optimised]
    memory = "CUDA peak MiB" if device == "cuda" else "peak RSS MiB"
    header = ["run", "optimizer steps", "real tokens/s", "padding efficiency", memory, "train s", "wall s", "val acc"]
    rows = [
        [
            r.name,
            f"{r.optimizer_steps:,}",
            f"{r.real_tokens_per_sec:,.0f}",
            f"{r.padding_efficiency:.1%}",
            _fmt(r.peak_memory_mib, ",.0f"),
            f"{r.train_seconds:.1f}",
            f"{r.wall_seconds:.1f}",
            _fmt(r.val_accuracy, ".3f"),
        ]
        for r in results
    ]
    majority = baseline.val_majority_accuracy  # both runs validate on the same texts
    print("\n" + markdown_table(header, rows) + "\n")
    notes = _demo_notes(baseline, optimised, s, majority, n_val, device, args.max_tokens)
    print("\n".join(notes))
    report = {
        "device": name,
        "model": model_name,
        "settings": {**s, "texts": n, "val_texts": n_val, "batch_size": _DEMO_BATCH, "max_tokens": args.max_tokens},
        "majority_class_accuracy": majority,
        "runs": [r.as_dict() for r in results],
    }
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    if plot:
        title = f"txopt demo on {name}: {model_name}, {n - n_val:,} train texts, {s['classes']} classes"
        steps = baseline.optimizer_steps, optimised.optimizer_steps
        same = (
            f"same texts, {steps[0]} optimizer steps each"
            if steps[0] == steps[1]
            else f"{steps[0]} vs {steps[1]} steps"
        )
        subtitle = f"{baseline_name}\n{optimised_name}\n({same})"
        _plot_demo(results, str(out / "demo.png"), title, subtitle, majority)
        print(f"\nresults: {out / 'demo.json'}, chart: {out / 'demo.png'}")
    else:
        print(f"\nresults: {out / 'demo.json'}" + ("" if args.plot is False else f" (no chart: {no_chart})"))
    return 0


def _demo_notes(
    baseline: Any, optimised: Any, s: dict[str, Any], majority: float, n_val: int, device: str, max_tokens: int | None
) -> list[str]:
    notes = []
    if baseline.optimizer_steps == optimised.optimizer_steps:
        notes.append(
            f"Same work in both runs: the same texts, {s['epochs']} epoch(s), {baseline.optimizer_steps} optimizer "
            f"steps of {_DEMO_BATCH} texts, learning rate {s['lr']:g}; only how the batches are built and run differs."
        )
    elif max_tokens:
        notes.append(
            f"The runs take {baseline.optimizer_steps} and {optimised.optimizer_steps} optimizer steps: --max-tokens "
            f"{max_tokens} fills each optimised batch with up to {max_tokens} padded tokens instead of {_DEMO_BATCH} "
            "texts, so it takes fewer, larger steps; the accuracies are not a same-step comparison."
        )
    else:  # --max-steps cut one run short of the epoch
        notes.append(
            f"The runs take {baseline.optimizer_steps} and {optimised.optimizer_steps} optimizer steps (--max-steps)."
        )
    notes.append(
        f"val acc: {n_val:,} validation texts of {s['classes']} classes; always answering the largest class scores "
        f"{majority:.3f}."
    )
    ratio = optimised.real_tokens_per_sec / baseline.real_tokens_per_sec if baseline.real_tokens_per_sec else 0.0
    train = baseline.train_seconds / optimised.train_seconds if optimised.train_seconds else 0.0
    wall = baseline.wall_seconds / optimised.wall_seconds if optimised.wall_seconds else 0.0
    notes.append(
        f"optimised vs baseline: {ratio:.2f}x the real tokens/s, {train:.2f}x shorter training, {wall:.2f}x shorter "
        "wall time (set-up and validation included)."
    )
    if device == "cuda":
        notes.append("CUDA peak MiB: torch.cuda.max_memory_allocated() during each run (reset before it).")
    else:
        notes.append(
            "peak RSS MiB: the peak resident memory of each run's own process (Python and the libraries included); "
            "n/a where /proc/self/clear_refs is missing."
        )
    notes.append("Gradient checkpointing is off: the model's activations fit; it pays only when memory is the limit.")
    return notes


def _plot_demo(results: Sequence[Any], path: str, title: str, subtitle: str, majority: float) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(14, 4.2))
    names = ["baseline", "optimised"]
    panels: list[tuple[str, list[float], str]] = [
        ("real tokens / s", [r.real_tokens_per_sec for r in results], ",.0f"),
        ("padding efficiency", [r.padding_efficiency for r in results], ".1%"),
        ("training time (s)", [r.train_seconds for r in results], ".1f"),
        ("validation accuracy", [r.val_accuracy for r in results], ".3f"),
    ]
    for ax, (panel, values, spec) in zip(axes, panels, strict=True):
        ax.bar(names, values, color=["#8c8c8c", "#4c72b0"])
        ax.set_title(panel)
        top = max((v for v in values if v == v), default=0.0)
        ax.set_ylim(
            0, (max(top, majority if panel.startswith("validation") and majority == majority else 0) or 1) * 1.18
        )
        for i, v in enumerate(values):
            ax.text(i, v, _fmt(v, spec), ha="center", va="bottom")
    if majority == majority:
        axes[3].axhline(majority, color="#c44e52", linestyle="--", linewidth=1, label=f"largest class: {majority:.3f}")
        axes[3].legend(loc="lower center", fontsize=8, framealpha=1.0)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- bench
def _bench(args: argparse.Namespace) -> int:
    from lightning_txopt.callbacks import FreezeEmbeddings, GradientCheckpointing
    from lightning_txopt.data.text import TextDataModule
    from lightning_txopt.demo import measure_run
    from lightning_txopt.precision import resolve_precision
    from lightning_txopt.utils.table import markdown_table

    device = _device(args.accelerator)
    gpu = device == "cuda"
    limit = args.limit if args.limit is not None else (4096 if gpu else 256)
    max_length = args.max_length or (512 if gpu else 128)
    max_tokens = args.max_tokens or (16384 if gpu else 4096)
    if max_tokens < max_length:
        raise ValueError(
            f"--max-tokens {max_tokens} < max_length {max_length}: a text of max_length tokens would not fit a batch. "
            f"Raise --max-tokens to at least {max_length} or lower --max-length."
        )
    out = Path(args.output)
    model, config, model_name = _model_source(args.tiny)
    precision = resolve_precision("auto", accelerator=device)
    combos: list[tuple[str, dict[str, Any], str, list[Any]]] = [
        ("fixed, fp32", dict(strategy="fixed", batch_size=32), "32-true", []),
        ("dynamic, fp32", dict(strategy="dynamic", batch_size=32), "32-true", []),
        ("bucket batch 32, fp32", dict(strategy="bucket", batch_size=32), "32-true", []),
        (f"bucket max_tokens {max_tokens}, fp32", dict(strategy="bucket", max_tokens=max_tokens), "32-true", []),
        (f"bucket max_tokens {max_tokens}, {precision}", dict(strategy="bucket", max_tokens=max_tokens), precision, []),
        ("+ frozen embeddings", dict(strategy="bucket", max_tokens=max_tokens), precision, ["freeze"]),
        ("+ gradient checkpointing", dict(strategy="bucket", max_tokens=max_tokens), precision, ["freeze", "ckpt"]),
    ]
    # every DataModule first: a bad argument or record fails before the first run
    dms = [
        TextDataModule(None, args.tokenizer, limit=limit, max_length=max_length, seed=args.seed, **kw)
        for _, kw, _, _ in combos
    ]
    results = []
    for (name, _, prec, extras), dm in zip(combos, dms, strict=True):
        callbacks: list[Any] = []
        if "freeze" in extras:
            callbacks.append(FreezeEmbeddings())
        if "ckpt" in extras:
            callbacks.append(GradientCheckpointing())
        results.append(
            measure_run(
                name,
                datamodule=dm,
                model=model,
                config=config,
                callbacks=callbacks,
                precision=prec,
                accelerator=device,
                max_epochs=1,
                max_steps=args.max_steps,
                enable_progress_bar=False,
                validate=False,
            )
        )
    base = results[0].real_tokens_per_sec or 1.0
    memory = "CUDA peak MiB" if gpu else "peak RSS MiB"
    rows = [
        [
            r.name,
            f"{r.real_tokens_per_sec:,.0f}",
            f"{r.real_tokens_per_sec / base:.2f}",
            f"{r.padding_efficiency:.1%}",
            _fmt(r.peak_memory_mib, ",.0f"),
            f"{r.optimizer_steps:,}",
        ]
        for r in results
    ]
    table = markdown_table(["combination", "real tokens/s", "x first row", "padding efficiency", memory, "steps"], rows)
    name = _device_name(device)
    print(f"txopt bench on {name}: {model_name}, {limit} texts, max_length {max_length}\n\n{table}")
    if not gpu:
        print(
            "\npeak RSS MiB: the process's peak resident memory during each run (reset before it); memory the process "
            "kept from earlier runs counts too."
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(f"txopt bench on {name}: {model_name}\n\n{table}\n")
    (out / "bench.json").write_text(json.dumps([r.as_dict() for r in results], indent=2))
    print(f"\nresults: {out / 'bench.md'}, {out / 'bench.json'}")
    return 0


# ---------------------------------------------------------------------------------------------------------- main
def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = _Parser(prog="txopt", description="Faster transformer training in PyTorch Lightning.")
    sub = parser.add_subparsers(dest="command", required=True)
    subs: dict[str, argparse.ArgumentParser] = {}

    stats = subs["stats"] = sub.add_parser("stats", help="length distribution and padding of every batching strategy")
    stats.add_argument("--data", help=".jsonl/.csv/.tsv file or saved HF dataset folder (default: embedded corpus)")
    stats.add_argument("--tokenizer", help="local tokenizer/model folder (default: the demo model's)")
    stats.add_argument("--text-column", default="text")
    group = stats.add_mutually_exclusive_group()
    group.add_argument("--batch-size", type=_positive_int, help="texts per batch (default 32)")
    group.add_argument("--max-tokens", type=_positive_int, help="padded tokens per batch (at least --max-length)")
    stats.add_argument("--max-length", type=_positive_int, default=512, help="texts are truncated at this length")
    stats.add_argument("--seed", type=int, default=0)
    stats.add_argument("--plot", help="write a PNG chart here")
    stats.add_argument("--json", help="write the table as JSON here")

    subs["fit"] = sub.add_parser(
        "fit", help="train from a YAML config (LightningCLI); `txopt fit --help` lists every option", add_help=False
    )

    for name, helptext in (
        ("demo", "baseline vs optimised fine-tuning of MiniLM on the embedded corpus"),
        ("bench", "throughput/memory of strategy combinations on this device"),
    ):
        p = subs[name] = sub.add_parser(name, help=helptext)
        p.add_argument("--limit", type=_positive_int, help="texts to use (default: all on a GPU, a few hundred on CPU)")
        p.add_argument("--max-length", type=_positive_int, help="texts are truncated at this length")
        p.add_argument("--max-tokens", type=_positive_int, help="padded tokens per batch (token budget)")
        p.add_argument("--max-steps", type=_steps, default=-1, help="stop each run after this many optimizer steps")
        p.add_argument("--tokenizer", help="local tokenizer folder (default: the demo model's)")
        p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "gpu"])
        p.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of MiniLM (smoke runs)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--output", default=f"{RUNS_DIR}/{name}", help=f"folder for the results (default: {RUNS_DIR}/{name})"
        )
        if name == "demo":
            p.add_argument("--epochs", type=_positive_int, help="epochs of each run (default: 1 on CPU, 2 on a GPU)")
            p.add_argument(
                "--classes", type=_positive_int, help="use the N largest of the 40 categories (default: 4 on CPU, 40)"
            )
            p.add_argument(
                "--lr", type=_positive_float, help="learning rate of both runs (default: 3e-4 CPU, 5e-5 GPU)"
            )
            p.add_argument("--no-plot", dest="plot", action="store_false", help="no chart")
            p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser, subs


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, ImportError, TypeError)
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
    except ImportError:  # pragma: no cover
        return errors
    return (*errors, MisconfigurationException)


_HANDLERS = {"stats": _stats, "demo": _demo, "bench": _bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``txopt`` console script; returns the exit status (2: a user error, printed in one line).

    Example:
        >>> main(["stats", "--batch-size", "0"])  # stderr: txopt stats: error: argument --batch-size: must be ...
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    prog = f"txopt {argv[0]}" if argv and argv[0] in ("stats", "fit", "demo", "bench") else "txopt"
    try:
        if argv[:1] == ["fit"]:
            return _fit(argv[1:])
        parser, subs = _parser()
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise _unrecognized(extra, subs[args.command])
        return _HANDLERS[args.command](args)
    except _CommandLineError as err:
        print(f"{err.prog}: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except _user_errors() as err:
        if os.environ.get("TXOPT_TRACEBACK"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        if type(err).__name__ == "MisconfigurationException":  # Lightning's: a Trainer setting
            message += " (a Trainer setting: check " + (
                "the trainer.* options)" if prog == "txopt fit" else "--accelerator)"
            )
        print(f"{prog}: error: {_one_line(message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
