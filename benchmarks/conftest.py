"""Benchmark plumbing: a table of ratios against the baselines measured in the same run.

Each benchmark names its `group` (one op, shape and dtype) and its `impl`; within a group,
"eager" is the PyTorch one-liner and "copy" an in-place `mul_(1.0)` of the same tensor,
which moves the same bytes and so stands for the attainable bandwidth. Every op here must
read and write its tensor at least once, so the copy's time is the op's 1R+1W limit, and
"of 1R+1W limit" is that time over the op's.
"""

from __future__ import annotations

import re
from collections import defaultdict


def read_memory_kib() -> dict[str, int]:
    with open("/proc/self/status") as f:
        status = f.read()
    return {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM")}


def peak_extra_memory_mib(fn) -> float | None:
    """Peak resident memory that fn adds, measured by resetting the kernel's high-water mark."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = read_memory_kib()["VmRSS"]
    fn()
    return (read_memory_kib()["VmHWM"] - before) / 1024


def ratio_rows(benchmarks) -> list[dict]:
    by_group = defaultdict(dict)
    for bench in benchmarks:
        if "impl" in bench["extra_info"]:  # benchmarks outside the op/impl convention report their own figures
            by_group[bench["group"]][bench["extra_info"]["impl"]] = bench
    rows = []
    for group, impls in sorted(by_group.items()):
        eager = impls.get("eager")
        copy = impls.get("copy")
        for impl, bench in sorted(impls.items()):
            if impl == "copy":
                continue
            median = bench["stats"]["median"]
            rows.append(
                {
                    "group": group,
                    "impl": impl,
                    "median_ms": median * 1e3,
                    "GB/s": bench["extra_info"]["bytes"] / median / 1e9,
                    "speedup_vs_eager": eager["stats"]["median"] / median if eager else None,
                    "fraction_of_1r1w_limit": copy["stats"]["median"] / median if copy else None,
                    "copy_GB/s": copy["extra_info"]["bytes"] / copy["stats"]["median"] / 1e9 if copy else None,
                    "peak_extra_MiB": bench["extra_info"].get("peak_extra_MiB"),
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(value, spec):
        return "-" if value is None else format(value, spec)

    lines = [
        "| op, shape, dtype | impl | median ms | GB/s | vs eager | of 1R+1W limit | peak extra MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['group']} | {r['impl']} | {r['median_ms']:.2f} | {r['GB/s']:.1f} | "
            f"{cell(r['speedup_vs_eager'], '.1f')}x | {cell(r['fraction_of_1r1w_limit'], '.0%')} | "
            f"{cell(r['peak_extra_MiB'], '.2f')} |"
        )
    return "\n".join(lines)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["ratios"] = ratio_rows(output_json["benchmarks"])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows = ratio_rows([bench.as_dict(include_data=False) for bench in session.benchmarks])
    terminalreporter.write_sep("=", "ratios measured in this run")
    terminalreporter.write_line(format_table(rows))
