"""Peak memory of one iMAML meta-step against the number of inner steps: implicit vs unrolled.

The iMAML paper's Figure 2 (Rajeswaran et al., NeurIPS 2019): the implicit
meta-gradient keeps one inner gradient in memory whatever the number of inner
steps K, while MAML's reverse mode through the K steps stores every step.

Each (mode, K) point runs in a fresh Python process on the Omniglot network
(conv4, 64 channels, batch norm; 5-way 1-shot, 5 queries per class; random
28x28 binary images, which cost the same as real ones). On CPU the peak is the
process's maximum resident set size (``ru_maxrss``), reported with the resident
size just before the meta-step; on CUDA, ``torch.cuda.max_memory_allocated``.

    python benchmarks/memory.py                       # K = 5, 25, 100; writes JSON lines and a PNG
    python benchmarks/memory.py --device cuda --steps 5 25 50 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _rss import status_mib


def measure(mode: str, steps: int, meta_batch: int, device: str) -> dict:
    """One meta-step in this process; returns its peak memory and time."""
    import resource

    import torch

    from bilevel.problems.imaml import IMAMLProblem, conv4_forward, conv4_init, meta_gradient
    from bilevel.problems.imaml.problem import cross_entropy
    from bilevel.problems.imaml.tasks import Task

    g = torch.Generator().manual_seed(0)
    ways, queries = 5, 5

    def images(n: int) -> torch.Tensor:
        return (torch.rand(meta_batch, n, 1, 28, 28, generator=g) > 0.8).float().to(device)

    labels = torch.arange(ways).expand(meta_batch, -1).to(device)
    tasks = Task(images(ways), labels, images(ways * queries), labels.repeat_interleave(queries, dim=1))
    theta = {k: v.to(device) for k, v in conv4_init(ways, generator=g).items()}
    problem = IMAMLProblem(conv4_forward, cross_entropy, lam=2.0 if mode == "implicit" else 0.0,
                           inner_lr=0.1, inner_steps=steps)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = status_mib("VmRSS")
    start = time.perf_counter()
    grad = meta_gradient(problem, theta, tasks, mode=mode).grad
    float(sum(v.sum() for v in grad.values()))  # wait for the result
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"mode": mode, "inner_steps": steps, "meta_batch": meta_batch, "device": device,
            "peak_mib": round(peak, 1), "before_mib": round(before, 1), "meta_step_mib": round(peak - before, 1),
            "seconds": round(seconds, 3), "threads": torch.get_num_threads(), "torch": torch.__version__}


def plot(records: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for mode in dict.fromkeys(r["mode"] for r in records):
        rows = [r for r in records if r["mode"] == mode]
        ax.plot([r["inner_steps"] for r in rows], [r["peak_mib"] for r in rows], marker="o",
                label={"implicit": "iMAML (implicit)", "unrolled": "MAML (unrolled)"}.get(mode, mode))
    device = records[0]["device"]
    ax.set(xlabel="inner gradient steps K",
           ylabel="peak GPU memory allocated (MiB)" if device.startswith("cuda") else "peak RSS (MiB)",
           title=f"one meta-step, conv4 Omniglot, meta-batch {records[0]['meta_batch']} ({device})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 25, 100])
    parser.add_argument("--modes", nargs="+", default=["implicit", "unrolled"],
                        choices=["implicit", "unrolled", "first_order"])
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/memory", help="prefix of the .jsonl and .png outputs")
    parser.add_argument("--point", nargs=2, metavar=("MODE", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:  # a single measurement, in the fresh process the driver started
        print(json.dumps(measure(args.point[0], int(args.point[1]), args.meta_batch, args.device)))
        return 0

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for mode in args.modes:
        for steps in args.steps:
            cmd = [sys.executable, __file__, "--point", mode, str(steps), "--meta-batch", str(args.meta_batch),
                   "--device", args.device]
            done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if done.returncode:
                sys.stderr.write(done.stderr)
                return done.returncode
            records.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = records[-1]
            print(f"{mode:>11} K={steps:<4} peak {r['peak_mib']:8.1f} MiB  (meta-step {r['meta_step_mib']:7.1f} MiB)"
                  f"  {r['seconds']:.2f} s", flush=True)
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot(records, out.with_suffix(".png"))
    for mode in args.modes:
        rows = [r for r in records if r["mode"] == mode]
        print(f"{mode}: peak at K={rows[-1]['inner_steps']} / K={rows[0]['inner_steps']} = "
              f"{rows[-1]['peak_mib'] / rows[0]['peak_mib']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
