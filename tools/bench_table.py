"""Prints a Markdown table of a pytest-benchmark JSON from benches/ (for BENCHMARKS.md):
    python tools/bench_table.py bench-results/lora.json
Medians, ratios to the frozen base layer and to the peer library (peft, or plain torch where a family has no peft
counterpart), and saved-for-backward bytes (also in copies of x)."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_json import by_family, config_label, load  # noqa: E402

ORDER = {"frozen": 0, "peftops": 1, "peft": 2, "torch": 2}


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows):
    has_peak = any(r.get("peak_bytes") is not None for r in rows)
    peer = next((r["peer"] for r in rows if r["peer"]), "peft")
    head = ["config", "impl", "median ms", "vs frozen", f"vs {peer}", "saved MiB", "saved / x"]
    head += ["peak MiB", "peak vs frozen"] if has_peak else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = sorted(rows, key=lambda r: (r["key"], r.get("dropout") or 0.0, ORDER.get(r["impl"], 9), r["impl"]))
    for r in rows:
        cells = [config_label(r), r["impl"], fmt(r["median_s"] * 1e3, ".1f"), fmt(r["vs_frozen"], ".3f"),
                 fmt(r["vs_peer"], ".3f"), fmt(r["saved_bytes"] / 2**20, ".1f"), fmt(r["saved_x"], ".2f")]
        if has_peak:
            cells += [fmt(r.get("peak_bytes") and r["peak_bytes"] / 2**20, ".1f"), fmt(r["peak_vs_frozen"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    args = ap.parse_args()
    rows, machine = load(args.json)
    if machine:
        print(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} "
              f"cores, Python {machine.get('python_version', '?')}\n")
    for family, fam_rows in by_family(rows).items():
        print(f"### {family}\n\n{table(fam_rows)}\n")


if __name__ == "__main__":
    main()
