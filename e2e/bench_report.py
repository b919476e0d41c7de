#!/usr/bin/env python3
"""Turns BENCH lines into target/bench/results.json and a table."""
import json
import os
import sys


def machine() -> dict:
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu_model": model}


def main(raw_path: str, out_path: str) -> int:
    results = []
    m = machine()
    for line in open(raw_path):
        if not line.startswith("BENCH "):
            continue
        fig = json.loads(line[len("BENCH "):])
        baseline = fig.get("baseline")
        value = fig["value"]
        results.append({
            "name": fig["name"],
            "value": value,
            "unit": fig["unit"],
            "baseline": baseline,
            "ratio": (value / baseline) if baseline else None,
            "machine": m,
        })
    if not results:
        print("no benchmark printed a BENCH line", file=sys.stderr)
        return 1
    with open(out_path, "w") as f:
        json.dump(results, f, indent=2)
    width = max(len(r["name"]) for r in results)
    print(f"\n{'benchmark':<{width}}  {'value':>14}  {'unit':<10}  {'baseline':>14}  {'ratio':>8}")
    for r in results:
        base = f"{r['baseline']:.4g}" if r["baseline"] is not None else "-"
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        print(f"{r['name']:<{width}}  {r['value']:>14.4g}  {r['unit']:<10}  {base:>14}  {ratio:>8}")
    print(f"\n{len(results)} figures on {m['cores']} cores ({m['cpu_model']}) -> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
