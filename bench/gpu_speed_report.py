"""The verdict and the table of bench/gpu_speed.py: each row's ratio to its shape's peer, the issue's targets (ratio,
absolute tokens/s where the issue names one, MFU) and whether each cloze row meets them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.gpu_speed_shapes import Shape

MFU_TARGET = 0.5
"""Issue 8: MFU >= 50%, counting useful FLOPs only."""


def score(rows: list[dict], shapes: list[Shape]) -> None:
    """Fill each row's ratio to its shape's peer and, for cloze rows, the issue's targets and whether they are met."""
    for shape in shapes:
        mine = [r for r in rows if r["shape"] == shape.name]
        peer = next((r for r in mine if not is_cloze(r)), None)
        peer_tps = (peer or {}).get("tokens_per_s")
        if peer_tps:
            peer["ratio_to_peer"] = 1.0
        for cloze in (r for r in mine if is_cloze(r) and r.get("tokens_per_s")):
            ratio = cloze["tokens_per_s"] / peer_tps if peer_tps else None
            checks = {"ratio": None if ratio is None else ratio >= shape.target_ratio,
                      "mfu": None if cloze.get("mfu") is None else cloze["mfu"] >= MFU_TARGET}
            if shape.target_tokens_per_s:
                checks["tokens_per_s"] = cloze["tokens_per_s"] >= shape.target_tokens_per_s
            cloze.update(ratio_to_peer=ratio, checks=checks,
                         met=None if None in checks.values() else all(checks.values()))


def is_cloze(row: dict) -> bool:
    return row["system"].startswith("cloze")


def target_text(shape: Shape) -> str:
    parts = [f">={shape.target_ratio:g}x"]
    if shape.target_tokens_per_s:
        parts.append(f">={shape.target_tokens_per_s / 1e3:.0f}k")
    return ", ".join(parts + [f"MFU>={MFU_TARGET:.0%}"])


def table(results: dict, shapes: dict[str, Shape]) -> str:
    lines = ["| system | shape | tokens/s | MFU | peak memory | vs peer | target | met |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = list(shapes)
    # grouped by shape, cloze rows first: the run order (bench.gpu_speed.row_order) puts later variants last
    for r in sorted(results["rows"], key=lambda r: (order.index(r["shape"]), not is_cloze(r))):
        s = shapes[r["shape"]]
        if r.get("tokens_per_s") is None:
            why = r.get("error", "?")
            lines.append(f"| {r['system']} | {s.name} | {'' if why.startswith('skipped') else 'failed: '}{why[:80]} "
                         f"| | | | | |")
            continue
        rate = f"{r['tokens_per_s'] / 1e3:,.1f}k" if r["tokens_per_s"] >= 1e3 else f"{r['tokens_per_s']:.1f}"
        mem = "n/a (CPU)" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.1f} GiB"
        ratio = "" if r.get("ratio_to_peer") is None else f"{r['ratio_to_peer']:.2f}x"
        cloze = is_cloze(r)
        met = {True: "yes", False: "no", None: "?"}[r.get("met")] if cloze else ""
        if cloze and r.get("met") is False:
            met += " (" + ", ".join(k for k, v in r["checks"].items() if v is False) + ")"
        lines.append(f"| {r['system']} | {s.name} | {rate} | {100 * r['mfu']:.1f}% | {mem} | "
                     f"{ratio} | {target_text(s) if cloze else ''} | {met} |")
    peak = results["matmul_peak"]
    lines.append(f"\nMFU against {peak['used_tflops']:.3g} TFLOP/s ({peak['source']}; measured {peak['dtype']} "
                 f"{peak['n']}^3: {peak['measured_tflops']:.3g}); {results['machine']['device_name']}, "
                 f"torch {results['machine']['torch']}, transformers {results['machine']['transformers']}")
    return "\n".join(lines)
