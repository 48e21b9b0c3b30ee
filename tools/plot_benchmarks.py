"""Turns a pytest-benchmark JSON from benches/ into one PNG per op family:
    python tools/plot_benchmarks.py bench-results/lora.json      # -> bench-results/lora.png
Left: forward+backward time relative to the frozen base layer, peftops beside peft, per shape. Right: bytes saved
for backward in copies of x (the frozen layer saves none), or, where measured (CUDA), peak memory relative to
the frozen layer. With several families in one JSON, each gets <stem>-<family>.png."""
import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_json import by_family, config_label, load  # noqa: E402

COLORS = {"peftops": "tab:blue", "peft": "tab:orange", "torch": "tab:green", "frozen": "tab:gray"}


def _panel(ax, labels, impls, value, ylabel, baseline=None):
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        xs = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(labels))]
        vals = [value(labels[j], impl) or 0 for j in range(len(labels))]
        bars = ax.bar(xs, vals, width, label=impl, color=COLORS.get(impl))
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    if baseline:
        ax.axhline(1.0, color=COLORS.get(baseline, "gray"), lw=1, label=f"{baseline} = 1")
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)


def plot_family(family, rows, path, target=None):
    """Time relative to the frozen layer (or, for a family without one, to the peer library) and memory."""
    has_frozen = any(r["impl"] == "frozen" for r in rows)
    baseline = "frozen" if has_frozen else next((r["peer"] for r in rows if r["peer"]), None)
    impls = [i for i in ("peftops", "peft", "torch") if any(r["impl"] == i for r in rows) and i != baseline]
    cell = {(config_label(r), r["impl"]): r for r in rows}
    labels = sorted({config_label(r) for r in rows if r["impl"] in impls})
    get = lambda field: lambda label, impl: (cell.get((label, impl)) or {}).get(field)  # noqa: E731
    if baseline == "frozen":
        time_of = get("vs_frozen")
    elif baseline:
        time_of = lambda label, impl: get("vs_peer")(label, impl) if impl == "peftops" else 1.0  # noqa: E731
    else:
        time_of = lambda label, impl: get("median_s")(label, impl) * 1e3  # noqa: E731
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(max(10, 1.3 * len(labels) + 4), 5))
    _panel(ax_t, labels, impls, time_of,
           f"time / {baseline} (forward+backward)" if baseline else "median ms (forward+backward)", baseline)
    if target and baseline == "frozen":
        ax_t.axhline(target, color="tab:red", lw=1, ls="--", label=f"target {target}x")
    if any(r.get("peak_vs_frozen") for r in rows):
        _panel(ax_m, labels, impls, get("peak_vs_frozen"), "peak memory / frozen", "frozen")
    elif all(r.get("saved_x") is not None for r in rows):
        _panel(ax_m, labels, impls + (["frozen"] if has_frozen else []), get("saved_x"),
               "saved for backward, in copies of x")
    else:
        mib = lambda label, impl: (get("saved_bytes")(label, impl) or 0) / 2**20  # noqa: E731
        _panel(ax_m, labels, impls + ([baseline] if baseline and baseline not in impls else []), mib,
               "saved for backward (MiB)")
    for ax in (ax_t, ax_m):
        ax.legend(fontsize=8)
    fig.suptitle(f"{family}: peftops beside {', '.join(i for i in impls if i != 'peftops') or baseline}"
                 + (", relative to the frozen layer" if baseline == "frozen" else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    ap.add_argument("-o", "--out-dir", help="folder for the PNGs (default: beside the JSON)")
    ap.add_argument("--target", type=float, default=None, help="draw a target time ratio (e.g. 1.08)")
    args = ap.parse_args()
    rows, _ = load(args.json)
    families = by_family(rows)
    if not families:
        sys.exit(f"{args.json}: no benches with extra_info['family'] (was it written by benches/?)")
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.json))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.json))[0]
    for family, fam_rows in families.items():
        name = f"{stem}.png" if len(families) == 1 else f"{stem}-{family}.png"
        print(plot_family(family, fam_rows, os.path.join(out_dir, name), args.target))


if __name__ == "__main__":
    main()
