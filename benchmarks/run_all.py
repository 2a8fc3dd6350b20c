"""Run every benchmark, print one markdown table and write the results as JSON.

Run: python -m benchmarks.run_all [--device cpu] [--quick] [--out outputs/bench/results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks import (
    bench_continual,
    bench_l2l,
    bench_learner_step,
    bench_maml,
    bench_sampler,
    bench_threads,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "outputs" / "bench" / "results.json"  # outputs/ is git-ignored
THREADED = ("reptile_step", "reptile_predict", "imaml_step", "imaml_predict", "imaml_step_kernels")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict:
    """What the numbers were measured on; only ratios carry over to other machines."""
    info = {
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        # other processes on the machine skew every figure; the ratios less so
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def busy_warning(load: float | None, cpus: int | None) -> str:
    """A line saying whether other processes were already using the CPU when we started."""
    if load is None or not cpus:
        return "load average unknown: keep the machine idle while benchmarking"
    if load < 0.5 * cpus:
        return f"load average {load:.2f} on {cpus} CPUs at the start: machine quiet enough"
    return (
        f"WARNING: load average {load:.2f} on {cpus} CPUs at the start: other processes "
        "compete for the cores, which slows torch's multi-threaded ops far more than the "
        "single-threaded baselines; rerun on an idle machine before drawing conclusions"
    )


def table(records: list[dict]) -> str:
    rows = [
        "| benchmark | config | metarun | baseline | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    rows += [row(r) for r in records]
    return "\n".join(rows)


def row(r: dict) -> str:
    met = "met" if r.get("met_target") else "**missed**"
    if r["benchmark"] == "sampler_84":
        values = (
            f"{r['metarun']:,.0f} episodes/s",
            f"{r['baseline']:,.1f} episodes/s (per-item from an HWC array)",
            f"{r['ratio']:,.0f}x faster",
            "no target (issue 6 asks for the figure)",
        )
    elif r["benchmark"] == "sampler":
        values = (
            f"{r['metarun']:,.0f} episodes/s",
            f"{r['baseline']:,.1f} episodes/s",
            f"{r['ratio']:,.0f}x faster",
            f"{r['x_vs_l2l_reference']:,.0f}x vs l2l ref {r['l2l_reference']:.0f}/s; "
            f">= {r['target_episodes_per_s']:,.0f}/s: {met}",
        )
    elif r["benchmark"].startswith("maml_vs_l2l_"):
        values = bench_l2l.row_values(r)
    elif r["benchmark"].startswith("maml_") and "l2l_reference" in r:
        values = (
            f"{r['metarun']:.2f} it/s ({r['auto_picks']}; loop {r['loop']:.2f}, "
            f"vmap {r['vmap']:.2f}; with PyTorch's second derivatives {r['unfused']:.2f})",
            f"{r['baseline']:.2f} it/s (learn2learn-style)",
            f"{r['ratio']:.2f}x",
            f"{r['x_vs_l2l_reference']:.2f}x the l2l reference {r['l2l_reference']} it/s; "
            f">= {r['target_x']}x: {met}",
        )
    elif r["benchmark"] in THREADED:
        low, high = r["spread"]
        kernels = r["benchmark"].endswith("_kernels")
        values = (
            f"{r['metarun']:,.1f} ms (threads, {r['threads']} workers)",
            f"{r['baseline']:,.1f} ms ("
            + ("threads, PyTorch's second derivatives" if kernels else "loop, same learner")
            + ")",
            f"{r['ratio']:.2f}x faster (blocks {low:.2f}-{high:.2f}x)",
            f"no target; weights/outputs within {r['rel_diff_vs_loop']:.0e} of the other side's",
        )
    elif r["benchmark"] in ("ewc_penalty", "den_step"):
        low, high = r["spread"]
        values = (
            f"{r['metarun']:,.2f} ms/update",
            f"{r['baseline']:,.2f} ms/update (fine-tuning, 312-128)",
            f"{r['ratio']:.2f}x (blocks {low:.2f}-{high:.2f}x)",
            "no target (issue 22 asks for the figure)",
        )
    elif r["benchmark"] == "maml_imaml_memory":
        pairs = ", ".join(
            f"{k}: {a:.0f} vs {b:.0f}"
            for k, a, b in zip(r["inner_steps"], r["maml_mb"], r["imaml_mb"])
        )
        values = (
            f"MB by inner steps, MAML vs iMAML: {pairs}",
            "",
            "",
            f"iMAML flat: {met}",
        )
    else:
        values = (
            f"{r['metarun']:,.1f} ms/step ({r['steps_per_s']:.2f} steps/s)",
            f"{r['baseline']:,.1f} ms/step",
            f"{r['ratio']:.3f} ({r['overhead']:+.1%})",
            f"overhead <= {r['target_overhead']:+.0%}: {met}",
        )
    return "| " + " | ".join((r["benchmark"], r["config"], *values)) + " |"


def main() -> None:
    parser = bench_sampler.add_arguments(
        argparse.ArgumentParser(description=__doc__.splitlines()[0])
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON path ({DEFAULT_OUT})")
    args = parser.parse_args()
    device = torch.device(args.device)
    load_before = machine(device)["load_avg_1m"]
    start = time.perf_counter()
    records = bench_sampler.run(args.device, args.quick, args.omniglot_root)
    records += bench_learner_step.run(args.device, args.quick)
    records += bench_maml.run(args.device, args.quick)
    records += bench_threads.run(args.device, args.quick)
    records += bench_continual.run(args.device, args.quick)
    l2l_records = bench_l2l.run_in_side_env(args.device, args.quick)  # None: no .venv-l2l
    if l2l_records is None:
        print(
            "MAML against the real learn2learn: skipped, no side environment (make bench-env "
            "builds .venv-l2l); the MAML rows compare with bench_maml's written-out loop"
        )
    records += l2l_records or []
    seconds = time.perf_counter() - start

    info = machine(device) | {"load_avg_1m_before": load_before}
    print()
    print(", ".join(f"{k}: {v}" for k, v in info.items()))
    print(
        f"total {seconds:.0f} s{' (--quick: smoke test, not a measurement)' if args.quick else ''}"
    )
    print()
    print(busy_warning(load_before, info["cpu_count"]))
    print(table(records))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "quick": args.quick, "seconds": seconds, "results": records}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
