"""Reads pytest-benchmark JSON written by benches/ into rows with ratios (shared by plot_benchmarks.py and
bench_table.py). Rows are matched by the extra_info the benches record (benches/benchutil.py), not by names;
benches without extra_info["family"] are left out.

Within a family, one shape is every extra_info field but the ones below; its baseline is impl "frozen" (the
frozen base layer, where a family has one) and its peer is the other library ("peft", else "torch")."""
import json
from collections import defaultdict

NOT_SHAPE = ("impl", "dropout", "saved_bytes", "peak_bytes")
PEERS = ("peft", "torch")
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def _key(info):
    return tuple(sorted((k, str(v)) for k, v in info.items() if k not in NOT_SHAPE))


def load(path):
    """(rows, machine_info). Each row: extra_info plus name, median_s, key, and the ratios vs_frozen, vs_peer
    (peftops only), peak_vs_frozen, saved_x (saved bytes in copies of x, where tokens and in_features are known)."""
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info") or {}
        if "family" not in info or "impl" not in info:
            continue
        rows.append(dict(info, name=b["name"], median_s=b["stats"]["median"], key=_key(info)))
    frozen = {r["key"]: r for r in rows if r["impl"] == "frozen"}
    peers = {}
    for r in rows:
        if r["impl"] in PEERS:
            peers.setdefault((r["key"], r.get("dropout")), r)
    for r in rows:
        base, peer = frozen.get(r["key"]), peers.get((r["key"], r.get("dropout")))
        r["vs_frozen"] = r["median_s"] / base["median_s"] if base else None
        r["peer"] = peer["impl"] if peer and r["impl"] == "peftops" else None
        r["vs_peer"] = r["median_s"] / peer["median_s"] if r["peer"] else None
        r["peak_vs_frozen"] = (r["peak_bytes"] / base["peak_bytes"]
                               if base and r.get("peak_bytes") and base.get("peak_bytes") else None)
        size = ELEMENT_BYTES.get(r.get("dtype"))
        r["saved_x"] = (r["saved_bytes"] / (r["tokens"] * r["in_features"] * size)
                        if size and r.get("tokens") and r.get("in_features") else None)
    return rows, data.get("machine_info", {})


def by_family(rows):
    out = defaultdict(list)
    for r in rows:
        out[r["family"]].append(r)
    return dict(out)


def config_label(r):
    """One shape/dtype/dropout as a short label, e.g. 'cpu fp32 t2048 2048x2048 p0.1'."""
    parts = [r.get("device", "?"), DTYPES.get(r.get("dtype"), r.get("dtype", "?"))]
    if "tokens" in r:
        parts.append(f"t{r['tokens']}")
    if "in_features" in r and "out_features" in r:
        parts.append(f"{r['in_features']}x{r['out_features']}")
    skip = {"family", "device", "dtype", "tokens", "in_features", "out_features", "r", "name", "median_s", "key",
            "vs_frozen", "vs_peer", "peer", "peak_vs_frozen", "saved_x", *NOT_SHAPE}
    parts += [f"{k}={v}" for k, v in r.items() if k not in skip and not isinstance(v, (dict, list))]
    if r.get("dropout") is not None:
        parts.append(f"p{r['dropout']}")
    return " ".join(parts)
