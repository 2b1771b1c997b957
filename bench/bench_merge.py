"""Server merge at ViT-B/16 sizes: the batched closed forms against a per-layer float64 pseudo-inverse loop.

    python bench/bench_merge.py                      # 12 blocks (48 layers), 10 clients, r 1/16/32, alpha 0/0.5
    python bench/bench_merge.py --blocks 2 --ranks 16   # quicker
    python bench/bench_merge.py --device cuda           # both sides on the GPU (inputs moved there untimed)

Both sides get the same inputs (float32, as they arrive on the wire) in the same process; the loop is the
reference implementation's way: dense d_in x d_in Grams (a diagonal one expanded to a matrix), products
summed over clients and torch.linalg.pinv per layer. Printed per (merge, r, alpha): the time of each side and
their ratio, the largest relative difference of the results, the peak memory each side added (resident set,
sampled every 5 ms) and the uplink bytes per client for that round, ours against the reference's dense
Grams. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable

import psutil
import torch

from common.merges import TaskSums, merge_round, project_gram

# ViT-B/16 block: (d_out, d_in) of qkv, attention proj, fc1, fc2
BLOCK = {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)}


def layers(blocks: int) -> dict[str, tuple[int, int]]:
    return {f"blocks.{b}.{n}": s for b in range(blocks) for n, s in BLOCK.items()}


def client_gram(d: int, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """A PSD statistic the shape a client sends: (d,) when alpha == 0, dense (d, d) otherwise, float32."""
    if alpha == 0:
        return torch.rand(d, generator=gen) * 100 + 1
    U = torch.randn(d, 16, generator=gen)
    return alpha * (U @ U.T) + torch.diag(torch.rand(d, generator=gen) * 100 + 1)


def dense(G: torch.Tensor) -> torch.Tensor:
    return torch.diag(G) if G.ndim == 1 else G


def naive_round(factor, shared, trained, grams):
    """The reference's loop: per layer, dense float64 sums and a pseudo-inverse."""
    out = {}
    for name in shared:
        Gs = [dense(g[name]).double() for g in grams]
        if factor == "A":
            num = sum(t[name].double() @ G for t, G in zip(trained, Gs))
            out[name] = num @ torch.linalg.pinv(sum(Gs))
        else:
            A = shared[name].double()
            Ps = [A @ G @ A.T for G in Gs]
            num = sum(t[name].double() @ P for t, P in zip(trained, Ps))
            out[name] = num @ torch.linalg.pinv(sum(Ps))
    return out


def naive_task(S, H):
    return {name: S[name] @ torch.linalg.pinv(dense(H[name])) for name in S}


def measure(fn: Callable[[], dict], device: str) -> tuple[dict, float, float]:
    """(result, seconds, peak memory growth in MB) of one call: accelerator memory on CUDA, else resident set."""
    if device.startswith("cuda"):
        fn()  # untimed: the first call pays CUDA's lazy kernel and solver-library loading
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        return result, time.perf_counter() - started, (torch.cuda.max_memory_allocated() - base) / 2**20
    proc = psutil.Process(os.getpid())
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=sample)
    watcher.start()
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return result, seconds, (peak[0] - base) / 2**20


def max_rel_diff(a: dict, b: dict) -> float:
    return max(((a[n].double() - b[n].double()).abs().max() / b[n].double().abs().max()).item() for n in a)


def uplink(shapes, factor: str, r: int, alpha: float) -> tuple[int, int, int]:
    """(ours, reference, adapter) bytes per client for one round's backbone layers, float32 on the wire.

    "B*" is a B-round with projected statistics (r (r + 1) / 2 numbers per layer), as this project sends.
    """
    ours = ref = adapter = 0
    for d_out, d_in in shapes.values():
        trained = r * d_in if factor == "A" else d_out * r
        stat = r * (r + 1) // 2 if factor == "B*" else d_in if alpha == 0 else d_in * (d_in + 1) // 2
        ours += 4 * (trained + stat)
        ref += 4 * (trained + d_in * d_in)
        adapter += 4 * r * (d_in + d_out)
    return ours, ref, adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--merges", nargs="+", default=["B", "B*", "A", "task"], choices=["B", "B*", "A", "task"],
                        help="B*: a B-round from the projections A G A^T that this project's clients send")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    shapes = layers(args.blocks)
    gen = torch.Generator().manual_seed(0)
    dev = args.device
    where = torch.cuda.get_device_name() if dev.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"{len(shapes)} layers, {args.clients} clients, torch {torch.__version__}, {where}")
    print(f"{'merge':>5} {'r':>3} {'alpha':>5} {'ours s':>8} {'loop s':>8} {'speed-up':>8} {'max rel diff':>12} "
          f"{'ours MB':>8} {'loop MB':>8} {'uplink MB':>9} {'ref MB':>8} {'adapter MB':>10}")
    for alpha in args.alphas:
        grams = [{n: client_gram(d_in, alpha, gen).to(dev) for n, (_, d_in) in shapes.items()}
                 for _ in range(args.clients)]
        for r in args.ranks:
            A = {n: (torch.randn(r, d_in, generator=gen) / d_in**0.5).to(dev) for n, (_, d_in) in shapes.items()}
            for merge in args.merges:
                if merge == "task" and r != args.ranks[0]:
                    continue  # the cross-task merge does not depend on r
                if merge == "task":
                    S = {n: torch.randn(d_out, d_in, generator=gen).double().to(dev)
                         for n, (d_out, d_in) in shapes.items()}
                    H = {n: grams[0][n].double() for n in shapes}
                    ours = lambda: TaskSums(S, H).delta()  # noqa: E731
                    loop = lambda: naive_task(S, H)  # noqa: E731
                    up = (0, 0, 0)
                else:
                    factor = merge[0]
                    shape = (lambda d_out, d_in: (r, d_in)) if factor == "A" else (lambda d_out, d_in: (d_out, r))
                    trained = [{n: torch.randn(shape(*s), generator=gen).to(dev) for n, s in shapes.items()}
                               for _ in range(args.clients)]
                    if merge == "B*":  # client-side work, not timed: each client projects its own Grams
                        sent = [{n: project_gram(A[n].double(), g[n].double()) for n in shapes} for g in grams]
                        ours = lambda: merge_round("B", A, trained, sent, projected=True)  # noqa: E731
                    else:
                        ours = lambda: merge_round(factor, A, trained, grams)  # noqa: E731
                    loop = lambda: naive_round(factor, A, trained, grams)  # noqa: E731
                    up = uplink(shapes, merge, r, alpha)
                fast, t_fast, m_fast = measure(ours, dev)
                slow, t_slow, m_slow = measure(loop, dev)
                print(f"{merge:>5} {r:>3} {alpha:>5} {t_fast:>8.3f} {t_slow:>8.3f} {t_slow / t_fast:>7.1f}x "
                      f"{max_rel_diff(fast, slow):>12.1e} {m_fast:>8.0f} {m_slow:>8.0f} {up[0] / 2**20:>9.2f} "
                      f"{up[1] / 2**20:>8.1f} {up[2] / 2**20:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
