"""What compressing a document costs next to prefilling it.

Per document length and keep ratio, for all layers of a Llama-3-8B-shaped model:
window statistics (`window_statistics`, one launch pair per layer, read in place from a pool
buffer), budget allocation and the plan (`PlanBuilder.add_layer_scores` + `finish`), and
compaction (`CompactionRows.from_kept` + one `copy_layer` per layer). The prefill it is
compared with is one transformers LlamaDecoderLayer (random weights, bf16, SDPA causal
attention) over the document, times the number of layers: a lower bound on a real prefill
(no embedding, no LM head, no KV-cache writes).

    python kernels/bench_compression.py                 # Llama-3-8B shape, GPU
    python kernels/bench_compression.py --smoke         # tiny shapes; CPU under the interpreter
"""

from __future__ import annotations

import argparse

import torch

import benchmarking


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, nargs="+", default=[8192, 32768], help="document lengths in tokens")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.1, 0.2, 0.5], help="keep ratios")
    parser.add_argument("--policy", default="lava", help="a window-scoring policy: lava, snapkv, ada_snapkv, pyramidkv")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=14336, help="MLP width of the prefill layer")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU under TRITON_INTERPRET=1")
    args = parser.parse_args()
    if args.smoke:
        args.documents, args.keep, args.layers = [96], [0.5], 2
        args.heads, args.head_dim, args.intermediate, args.window = [4, 2], 64, 512, 16
    return args


def prefill_layer_ms(args, seq_len: int, device: torch.device) -> float:
    """One Llama decoder layer's forward over the document, in ms."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    num_q_heads, num_kv_heads = args.heads
    config = LlamaConfig(hidden_size=num_q_heads * args.head_dim, intermediate_size=args.intermediate,
                         num_attention_heads=num_q_heads, num_key_value_heads=num_kv_heads,
                         head_dim=args.head_dim, num_hidden_layers=1, max_position_embeddings=seq_len,
                         attn_implementation="sdpa")
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device, torch.bfloat16).eval()
    hidden = torch.randn(1, seq_len, config.hidden_size, device=device, dtype=torch.bfloat16)
    positions = torch.arange(seq_len, device=device)[None]
    rotary = LlamaRotaryEmbedding(config).to(device)
    cos, sin = rotary(hidden, positions)

    @torch.inference_mode()
    def forward():
        layer(hidden, position_ids=positions, position_embeddings=(cos, sin))

    return benchmarking.time_ms(forward, device)


def main() -> None:
    args = parse_args()
    device = benchmarking.choose_device(args.smoke)
    from lava_sglang.kernels import CompactionRows, window_statistics
    from lava_sglang.policy import PlanBuilder, make_policy

    num_q_heads, num_kv_heads = args.heads
    policy = make_policy(args.policy, window=args.window)
    print("# Compression cost vs prefill")
    for line in benchmarking.describe_machine(device):
        print(f"machine: {line}")
    print(f"inputs: policy {policy.name}, window {args.window}; {args.layers} layers, Hq={num_q_heads} "
          f"Hkv={num_kv_heads} d={args.head_dim} bf16, MLP {args.intermediate}; documents {args.documents}; "
          f"keep {args.keep}; random queries per layer, one random pool buffer pair read by every layer, "
          f"document slots a random permutation{'; SMOKE shapes' if args.smoke else ''}")
    print()
    print("| document | keep | prefill ms | statistics ms | allocation ms | compaction ms | compression ms "
          "| % of prefill |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seq_len in args.documents:
        prefill_ms = args.layers * prefill_layer_ms(args, seq_len, device)
        pool_size = seq_len + 64
        k_buffer = torch.randn(pool_size, num_kv_heads, args.head_dim, device=device, dtype=torch.bfloat16)
        v_buffer = torch.randn_like(k_buffer)
        slots = torch.randperm(pool_size, device=device)[:seq_len]
        q_windows = [torch.randn(num_q_heads, args.window, args.head_dim, device=device, dtype=torch.bfloat16)
                     for _ in range(args.layers)]
        statistics = []

        def score_layers():
            statistics[:] = [
                window_statistics(q, k_buffer, v_buffer, slots, gqa_reduce=policy.gqa_reduce,
                                  pool_kernel=policy.pool_kernel, scale_by_value_norm=policy.scale_by_value_norm)
                for q in q_windows
            ]

        statistics_ms = benchmarking.time_ms(score_layers, device)
        for keep in args.keep:
            plans = []

            def allocate():
                builder = PlanBuilder(policy, keep, seq_len=seq_len, num_layers=args.layers,
                                      num_kv_heads=num_kv_heads)
                for layer_statistics in statistics:
                    builder.add_layer_scores(layer_statistics.layer_scores())
                plans[:] = [builder.finish()]

            allocation_ms = benchmarking.time_ms(allocate, device)
            plan = plans[0]
            k_store = torch.empty(plan.kept_rows, 1, args.head_dim, device=device, dtype=torch.bfloat16)
            v_store = torch.empty_like(k_store)
            cells = torch.arange(plan.kept_rows, device=device)

            def compact():
                rows = CompactionRows.from_kept(slots, plan.kept, cells, pool_size=pool_size,
                                                num_cells=plan.kept_rows)
                for layer in range(args.layers):
                    rows.copy_layer(layer, k_buffer, v_buffer, k_store, v_store)

            compaction_ms = benchmarking.time_ms(compact, device)
            total_ms = statistics_ms + allocation_ms + compaction_ms
            print(f"| {seq_len} | {keep:g} | {prefill_ms:.4g} | {statistics_ms:.4g} | {allocation_ms:.4g} | "
                  f"{compaction_ms:.4g} | {total_ms:.4g} | {100 * total_ms / prefill_ms:.1f} |")
    print()
    print("prefill ms: one decoder layer's forward times the number of layers. statistics ms: every layer's "
          "window statistics (the same for every keep ratio). allocation ms: layer and head budgets and the kept "
          "lists from the statistics. compaction ms: index building plus one copy launch per layer.")
    if device.type != "cuda":
        print("CPU smoke run: the numbers only show the script works; they are not GPU measurements.")


if __name__ == "__main__":
    main()
