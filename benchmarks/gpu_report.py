"""The report of ``gpu_compare.py``: the markdown table and summary lines of a result, and its chart. Works on a saved
``--json`` file too (``--report-from``, ``--chart-from``), also on files written before rows had names."""

from __future__ import annotations

from typing import Any

from _common import markdown_table

__all__ = ["chart", "find_row", "report"]

# JSON written before rows had names (up to commit 1dc1562) names no row: its reference rows are recognised by the
# start of their titles, as the report did then. Newer files carry each row's "name".
_LEGACY_TITLES = {
    "hf_grouped": "HF Trainer: group_by_length, bf16",
    "plain": "plain PyTorch loop: our token-budget batches",
}


def find_row(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The row called ``name`` in a result (by its ``"name"``, or for old files by its title)."""
    for r in rows:
        if "name" in r:
            if r["name"] == name:
                return r
        elif name in _LEGACY_TITLES and r["row"].startswith(_LEGACY_TITLES[name]):
            return r
    return None


def report(result: dict[str, Any]) -> str:
    """The markdown table and summary lines of a result (also from a saved ``--json`` file: ``--report-from``)."""
    rows = result["rows"]
    grouped, plain = find_row(rows, "hf_grouped"), find_row(rows, "plain")
    ref = grouped or rows[0]
    loop = plain or rows[0]
    # without those rows (--only), ratios are to the first row, and the headers say so
    loop_name = "plain loop" if plain else "first row"
    ref_name = "HF length-grouped" if grouped else loop_name if ref is loop else "first row"
    both = loop is not ref  # one ratio column where both fall back to the first row
    table = [
        [
            r["row"],
            r["real_tokens_per_s"],
            r["real_tokens_per_s"] / ref["real_tokens_per_s"],
            *([r["real_tokens_per_s"] / loop["real_tokens_per_s"]] if both else []),
            r["samples_per_s"],
            r["padding_efficiency"],
            r["peak_memory_gib"],
            r["peak_memory_gib"] / ref["peak_memory_gib"],
        ]
        for r in rows
    ]
    lines = [
        f"{result['header']}\n",
        markdown_table(
            [
                "row",
                "real tokens/s",
                f"x {ref_name}",
                *([f"x {loop_name}"] if both else []),
                "samples/s",
                "padding efficiency",
                "peak GiB",
                f"peak x {ref_name}",
            ],
            table,
        ),
        "",
    ]
    pair = result.get("lightning_over_plain_loop")
    if pair:
        runs = ", ".join(f"{x:.3f}" for x in pair["pairs"])
        lines.append(f"Lightning / plain loop, run by run: {runs}; median {pair['median']:.3f}")
    for r in rows:
        if "calibration" in r and isinstance(r["calibration"], dict):
            probes = "; ".join(f"{t} tokens: {g:.3f} GiB" for t, g in r["calibration"]["probes_max_tokens_gib"])
            lines.append(
                f"{r['row']}: sized to {r['calibration']['target_gib']:.3f} GiB by probes ({probes}); "
                f"measured peak {r['peak_memory_gib']:.3f} GiB"
            )
        if "graphs" in r:
            lines.append(
                f"{r['row']}: {r['graphs']} compiled graphs, {r['warmup_seconds']:.0f} s for the first "
                f"{r['warmup_steps']} steps (compilation included)"
            )
    for r in rows:
        if "runs_real_tokens_per_s" in r:
            runs = ", ".join(f"{x:,.0f}" for x in r["runs_real_tokens_per_s"])
            lines.append(f"{r['row']}: real tokens/s of each run: {runs}")
    lines += _flops_lines(result)
    for message in result.get("skipped", {}).values():
        lines.append(message)
    lines.append(f"\n{result['environment']}")
    return "\n".join(lines)


def _flops_lines(result: dict[str, Any]) -> list[str]:
    rows = [r for r in result["rows"] if "model_flops" in r]
    if not rows:
        return []
    table = [
        [
            r["row"],
            r["non_embedding_params"] / 1e6,
            r["model_tflops_per_s"],
            "n/a (unknown peak)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
        ]
        for r in rows
    ]
    peaks = sorted({r["peak_tflops"] for r in rows if r["peak_tflops"]})
    peak = f"; peak {', '.join(f'{p:g}' for p in peaks)} TFLOP/s (dense bf16)" if peaks else ""
    return [
        "",
        markdown_table(["row", "non-embedding params, M", "model TFLOP/s", "MFU"], table),
        "",
        f"{result.get('flops_formula', '')}{peak}",
    ]


def chart(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["row"].replace("lightning_txopt: ", "txopt: ").replace("HF Trainer: ", "HF: ") for r in rows]
    colors = [
        "#8c8c8c" if r["row"].startswith("HF") else "#dd8452" if r["row"].startswith("plain") else "#4c72b0"
        for r in rows
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.45 * len(rows) + 1.5), sharey=True)
    y = range(len(rows))
    left.barh(y, [r["real_tokens_per_s"] for r in rows], color=colors)
    left.set_xscale("log")
    left.set_xlabel("real (non-pad) tokens / s, log scale")
    right.barh(y, [r["peak_memory_gib"] for r in rows], color=colors)
    right.set_xlabel("peak memory, GiB")
    left.set_yticks(list(y), names, fontsize=8)
    left.invert_yaxis()
    for i, r in enumerate(rows):
        left.text(r["real_tokens_per_s"], i, f" {r['real_tokens_per_s'] / 1000:,.0f}k", va="center", fontsize=8)
    fig.suptitle(result["header"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
