"""Time `PoolPrefixAttention`'s launch options on this GPU: which to make the default.

Three sweeps, each over the same decode shapes (documents x batches x keep ratios, prepared
as in `bench_prefix_attention.py`, replayed from CUDA graphs):
1. the kernel's key-block size, warps and pipeline stages, at the default split target;
2. the split target (waves of the device's SMs, which sets the chunks per (request, KV
   head) through `PoolPrefixAttention.splits`), with the first sweep's best options;
3. the most chunks per (request, KV head), `max_splits` (what bounds the split count of a
   small batch), with the first sweep's best options and the default target.
Printed: each configuration's replay time per shape, its geometric mean over the shapes
relative to the current defaults' (lower is faster), and the full-prefix baseline's
replay (torch's SDPA or FlashInfer, as in the benchmark) for scale. A configuration that
fails to compile or launch here (too much shared memory, say) is reported in its row and
skipped.

    python kernels/tune_pool_attention.py             # GPU
    python kernels/tune_pool_attention.py --smoke     # tiny shapes, CPU interpreter: the script runs
"""

from __future__ import annotations

import argparse
import itertools
import math

import benchmarking
from bench_prefix_attention import decode_inputs, full_prefix_baseline, head_lengths, pool_inputs, replayed_ms


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, nargs="+", default=[8192, 32768], help="prefix lengths in tokens")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.2, 1.0], help="keep ratios")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes")
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-keys", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--num-warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--num-stages", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--waves", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                        help="split targets to try, in waves of the device's SMs")
    parser.add_argument("--max-splits", type=int, nargs="+", default=[8, 16, 32, 64],
                        help="most chunks per (request, KV head) to try")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU under TRITON_INTERPRET=1")
    args = parser.parse_args()
    if args.smoke:
        args.documents, args.keep, args.batch, args.heads, args.head_dim = [80], [0.5], [2], [4, 2], 64
        args.block_keys, args.num_warps, args.num_stages, args.waves = [16, 32], [4], [1], [1, 2]
        args.max_splits = [1, 2]
    for name in ("documents", "batch", "waves", "max_splits"):
        if any(value < 1 for value in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} takes positive ints")
    num_q_heads, num_kv_heads = args.heads
    if args.head_dim < 1 or num_kv_heads < 1 or num_q_heads < 1 or num_q_heads % num_kv_heads:
        parser.error("--heads takes HQ a multiple of HKV, both positive, and --head-dim a positive int")
    if any(not 0 < keep <= 1 for keep in args.keep):
        parser.error("--keep takes ratios in (0, 1]")
    return args


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(value) for value in values) / len(values))


def main() -> None:
    args = parse_args()
    device = benchmarking.choose_device(args.smoke)
    from lava_sglang.kernels import launch  # after choose_device: importing triton reads its interpreter flag
    from lava_sglang.kernels.pool_prefix_attention import PoolPrefixAttention, check_launch_options

    try:
        for block_keys, num_warps, num_stages in itertools.product(args.block_keys, args.num_warps, args.num_stages):
            check_launch_options(block_keys=block_keys, num_warps=num_warps, num_stages=num_stages)
    except ValueError as error:
        raise SystemExit(f"--block-keys, --num-warps, --num-stages: {error}") from None
    num_q_heads, num_kv_heads = args.heads
    sms = launch.multiprocessors(device)
    print("# PoolPrefixAttention launch options")
    for line in benchmarking.describe_machine(device):
        print(f"machine: {line}")
    print(f"inputs: Hq={num_q_heads} Hkv={num_kv_heads} d={args.head_dim} bf16, one layer, one decode token per "
          f"request; documents {args.documents}; batch {args.batch}; keep {args.keep}; block keys "
          f"{args.block_keys}; warps {args.num_warps}; stages {args.num_stages}; waves {args.waves} of {sms} SMs; "
          f"max splits {args.max_splits}"
          f"{'; SMOKE shapes' if args.smoke else ''}")

    shapes = list(itertools.product(args.documents, args.batch, args.keep))
    prepared = []
    for document, batch, keep in shapes:
        lengths = head_lengths(document, keep, batch, num_kv_heads)
        q, _, _, qo_indptr, _, _ = decode_inputs(lengths, batch, num_q_heads, args.head_dim, device)
        k_buffer, v_buffer, tables, table_rows = pool_inputs(lengths, batch, num_kv_heads, args.head_dim, device)
        baseline, baseline_name = full_prefix_baseline(document, batch, num_q_heads, num_kv_heads, args.head_dim,
                                                       device)
        full_ms = replayed_ms(baseline, device) or benchmarking.time_ms(baseline, device)
        prepared.append((q, qo_indptr, k_buffer, v_buffer, tables, table_rows, full_ms))

    def time_config(options: dict) -> list[float]:
        times = []
        for q, qo_indptr, k_buffer, v_buffer, tables, table_rows, _ in prepared:
            pool = PoolPrefixAttention([k_buffer], [v_buffer], num_q_heads=num_q_heads, **options)
            pool.plan(qo_indptr, table_rows, tables.tables, num_tokens=q.shape[0], max_q_len=1)

            def step():
                pool.run(q, layer=0)

            times.append(replayed_ms(step, device) or benchmarking.time_ms(step, device))
        return times

    def sweep_row(cells: list, options: dict) -> float | None:
        """Time one configuration over every shape and print its row: its time per shape and
        the geometric mean relative to the defaults' (returned; None where it fails to run)."""
        from triton.errors import TritonError  # imported once the interpreter is chosen (benchmarking)

        try:
            times = time_config(options)
        except TritonError as error:  # too much shared memory, say: report it and go on with the sweep
            print("| " + " | ".join(map(str, cells)) + f" | failed: {type(error).__name__}: {error} |")
            return None
        relative = geometric_mean([time / base for time, base in zip(times, default_times)])
        print("| " + " | ".join(map(str, cells)) + " | " + " | ".join(f"{t:.4g}" for t in times)
              + f" | {relative:.3f} |")
        return relative

    header = " | ".join(f"{document}/{batch}/{keep:g}" for document, batch, keep in shapes)
    defaults = PoolPrefixAttention([prepared[0][2]], [prepared[0][3]], num_q_heads=num_q_heads)
    default_options = dict(block_keys=defaults.block_keys, num_warps=defaults.num_warps,
                           num_stages=defaults.num_stages)
    default_times = time_config({})
    print()
    print(f"full-prefix baseline ({baseline_name}), ms per shape (document/batch/keep): "
          + ", ".join(f"{full_ms:.4g}" for *_, full_ms in prepared))
    print(f"defaults {default_options}, split target {defaults.target_programs} programs, max splits "
          f"{defaults.max_splits}, ms per shape: " + ", ".join(f"{time:.4g}" for time in default_times))

    def section(title: str, columns: list[str]) -> None:
        print()
        print(f"## {title}")
        print()
        print("| " + " | ".join(columns) + f" | {header} | x defaults |")
        print("|" + "---:|" * (len(columns) + len(shapes) + 1))

    section(f"1. Key block, warps, stages (split target {defaults.target_programs} programs, the default)",
            ["block keys", "warps", "stages"])
    results = []
    for block_keys, num_warps, num_stages in itertools.product(args.block_keys, args.num_warps, args.num_stages):
        options = dict(block_keys=block_keys, num_warps=num_warps, num_stages=num_stages)
        relative = sweep_row([block_keys, num_warps, num_stages], options)
        if relative is not None:
            results.append((relative, options))
    best_relative, best = min(results, key=lambda result: result[0], default=(1.0, default_options))
    print()
    print(f"best: {best} at {best_relative:.3f}x the defaults' time {default_options} (geometric mean over the "
          "shapes)")

    section(f"2. Split target, with {best}", ["waves", "programs"])
    for waves in args.waves:
        sweep_row([waves, waves * sms], {**best, "target_programs": waves * sms})
    section(f"3. Most chunks per (request, KV head), with {best} and the default split target", ["max splits"])
    for max_splits in args.max_splits:
        sweep_row([max_splits], {**best, "max_splits": max_splits})
    print()
    print("Times: CUDA-graph replays of one decode step's prefix attention (kernel and split merge), in ms. "
          "x defaults: geometric mean over the shapes of the time over the current defaults' time.")
    if device.type != "cuda":
        print("CPU smoke run: the numbers only show the script works; they are not GPU measurements.")


if __name__ == "__main__":
    main()
