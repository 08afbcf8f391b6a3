#!/usr/bin/env python3
"""Prints criterion results of one bench group side by side, as ratios.

Usage: python3 scripts/bench-ratios.py GROUP
Reads target/criterion/GROUP/*/*/new/estimates.json written by `cargo bench`.
For GROUP `verify`: verify / the bare hmac crate, verify / raw SHA-1 and naive / verify, per body size.
For other groups every function is shown against the group's first baseline.
"""
import json
import pathlib
import sys

BASELINES = {"verify": ("sha1", "naive"), "parse": ("value", None), "gate": (None, None)}


def load(group):
    root = pathlib.Path("target/criterion") / group
    times = {}
    for est in root.glob("*/*/new/estimates.json"):
        function, param = est.parts[-4], est.parts[-3]
        times.setdefault(param, {})[function] = json.loads(est.read_text())["median"]["point_estimate"]
    return times


def fmt_ns(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.2f} {unit}"
    return f"{ns:.1f} ns"


def sort_key(param):
    return (0, int(param)) if param.isdigit() else (1, param)


def main():
    group = sys.argv[1] if len(sys.argv) > 1 else "verify"
    times = load(group)
    if not times:
        sys.exit(f"no criterion results under target/criterion/{group}: run `cargo bench --bench {group}` first")
    if group == "verify":
        print(f"{'body':>9} {'verify':>11} {'bare hmac':>11} {'lookup':>9} {'parse':>9} {'naive':>11} "
              f"{'verify/bare':>12} {'verify/sha1':>12} {'naive/verify':>13}")
        for param in sorted(times, key=sort_key):
            t = times[param]
            v, b, s, n = t.get("verify"), t.get("bare"), t.get("sha1"), t.get("naive")
            if None in (v, b, s, n):
                continue
            lookup, parse = t.get("lookup", 0), t.get("parse", 0)
            print(f"{param:>9} {fmt_ns(v):>11} {fmt_ns(b):>11} {fmt_ns(lookup):>9} {fmt_ns(parse):>9} "
                  f"{fmt_ns(n):>11} {v / b:>11.2f}x {v / s:>11.2f}x {n / v:>12.2f}x")
        return
    for param in sorted(times, key=sort_key):
        t = times[param]
        cells = "  ".join(f"{name}={fmt_ns(ns)}" for name, ns in sorted(t.items()))
        base = BASELINES.get(group, (None, None))[0]
        extra = ""
        if base and base in t:
            extra = "  " + "  ".join(
                f"{base}/{name}={t[base] / ns:.2f}x" for name, ns in sorted(t.items()) if name != base
            )
        print(f"{param:>12}  {cells}{extra}")


if __name__ == "__main__":
    main()
