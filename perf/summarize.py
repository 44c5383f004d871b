#!/usr/bin/env python3
"""perf/summarize.py RESULTS.tsv — summary of a perf/run.sh run (stdlib only).

Reads the tab-separated results written by run.sh (one line per measured run; the system
named "nginx" is the reference) and prints:
  1. every run (a Markdown table, ready for perf/RESULTS.md);
  2. per system: median req/s, p50, p99, CPU per request;
  3. per non-reference system, the ratios system/nginx for req/s, CPU/request and p99,
     both as the ratio of the medians and as the median of the per-round ratios
     (each run against the nginx run of the same round). req/s > 1 is better;
     CPU/request and p99 < 1 are better.
"other load" is the machine's CPU (user+nice+system+steal, not irq/softirq) used during a run
by anything but the proxy, the backend worker and wrk, in % of one core: the machine is
shared, and a high figure marks a run whose absolute numbers are depressed.
"""
import csv
import statistics
import sys

REF = "nginx"
FWD = "nginx-fwd"  # run.sh --fwd: nginx adding ringgate's forwarding headers too
OTHER_LOAD_WARN = 25  # % of one core used by other processes during a run


def ratio_cells(rows, med, s, ref):
    """The reference's name, then "ratio of medians / median of per-round ratios" of system
    `s` against it for req/s, CPU per request and p99."""
    ref_by_round = {r["round"]: r for r in rows if r["system"] == ref}
    cells = [ref]
    for k in ("rps", "cpu_us_per_req", "p99_ms"):
        of_medians = med[s][k] / med[ref][k] if med[ref][k] else float("nan")
        per_round = [r[k] / ref_by_round[r["round"]][k] for r in rows
                     if r["system"] == s and r["round"] in ref_by_round
                     and ref_by_round[r["round"]][k]]
        pr = statistics.median(per_round) if per_round else float("nan")
        cells.append(f"{of_medians:.2f} / {pr:.2f}")
    return cells


def main(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        sys.exit("no results")
    for r in rows:
        for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "backend_cpu_us_per_req",
                  "wrk_cpu_us_per_req", "other_load_pct"):
            r[k] = float(r.get(k) or "nan")
        for k in ("round", "requests", "socket_errors", "non2xx"):
            r[k] = int(r[k])

    systems = list(dict.fromkeys(r["system"] for r in rows))
    drivers = {r["system"]: r["driver"] for r in rows}
    width = max(len(s) for s in systems)

    print("### Runs\n")
    print("| round | system | req/s | p50 ms | p99 ms | CPU µs/req | backend µs/req | wrk µs/req "
          "| other load | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        err = r["socket_errors"] + r["non2xx"]
        print(f"| {r['round']} | {r['system']} | {r['rps']:.0f} | {r['p50_ms']:.3f} | "
              f"{r['p99_ms']:.3f} | {r['cpu_us_per_req']:.2f} | {r['backend_cpu_us_per_req']:.2f} | "
              f"{r['wrk_cpu_us_per_req']:.2f} | {r['other_load_pct']:.0f}% | {err} |")

    med = {}
    print("\n### Medians\n")
    print("| system | io driver | runs | req/s | p50 ms | p99 ms | CPU µs/req |")
    print("|---|---|---|---|---|---|---|")
    for s in systems:
        rs = [r for r in rows if r["system"] == s]
        m = {k: statistics.median(r[k] for r in rs)
             for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")}
        med[s] = m
        print(f"| {s} | {drivers[s]} | {len(rs)} | {m['rps']:.0f} | {m['p50_ms']:.3f} | "
              f"{m['p99_ms']:.3f} | {m['cpu_us_per_req']:.2f} |")

    if REF not in med:
        return
    print(f"\n### Ratios vs {REF} (ratio of medians / median of per-round ratios)\n")
    print("A system ringgate/CASE/io is compared with nginx-CASE when that runs (e.g. nginx-cache, "
          "nginx proxy_cache hits), else with nginx; with run.sh --fwd, also with nginx-fwd (nginx "
          "adding the forwarding and request-id headers ringgate adds).\n")
    print("| system | reference | req/s | CPU/req | p99 |")
    print("|---|---|---|---|---|")
    for s in systems:
        if s == REF or (s.startswith(REF + "-") and "/" not in s):
            continue
        parts = s.split("/")
        ref = f"{REF}-{parts[1]}" if len(parts) > 1 and f"{REF}-{parts[1]}" in med else REF
        cells = ratio_cells(rows, med, s, ref)
        print(f"| {s:<{width}} | " + " | ".join(cells) + " |")
        if FWD in med and ref == REF:
            print(f"| {s:<{width}} | " + " | ".join(ratio_cells(rows, med, s, FWD)) + " |")

    noisy = [r for r in rows if r["other_load_pct"] > OTHER_LOAD_WARN]
    if noisy:
        print(f"\nWARNING: {len(noisy)} run(s) shared the machine with other work "
              f"(> {OTHER_LOAD_WARN}% of a core outside proxy, backend and wrk): "
              + ", ".join(f"round {r['round']} {r['system']} {r['other_load_pct']:.0f}%" for r in noisy)
              + ". Absolute figures are depressed; ratios within a round are still usable.")

    bad = [r for r in rows if r["socket_errors"] or r["non2xx"]]
    if bad:
        print("\nWARNING: runs with socket errors or non-2xx responses:")
        for r in bad:
            print(f"  round {r['round']} {r['system']}: {r['socket_errors']} socket errors, "
                  f"{r['non2xx']} non-2xx")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
