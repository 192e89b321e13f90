"""What compressing a document costs next to prefilling it.

Per document length and keep ratio, for all layers of a Llama-3-8B-shaped model, the calls
the server makes when it compresses a prefix observed by its tail window: the plan
(`compressor.plan_prefix`: `window_statistics` per layer, read in place from a pool buffer,
the policy's scores, then the allocation), of which the allocation alone (`PlanBuilder`
from the same scores), and compaction (`store.write_kept`: one `copy_rows` launch per layer
and buffer piece into cells of slots the document does not use). The prefill it is
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
    parser.add_argument("--policy", default="lava", help="a window-scoring policy or spec: lava, "
                        "lava:layer_budget=entropy, snapkv, ada_snapkv, pyramidkv")
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
    from lava_sglang.kernels import window_statistics
    from lava_sglang.policy import PlanBuilder, make_policy
    from lava_sglang.sglang_plugin.compressor import plan_prefix
    from lava_sglang.store import CellLayout, slots_needed, write_kept

    num_q_heads, num_kv_heads = args.heads
    policy = make_policy(args.policy, window=args.window)
    print("# Compression cost vs prefill")
    for line in benchmarking.describe_machine(device):
        print(f"machine: {line}")
    print(f"inputs: policy {args.policy}, window {args.window}; {args.layers} layers, Hq={num_q_heads} "
          f"Hkv={num_kv_heads} d={args.head_dim} bf16, MLP {args.intermediate}; documents {args.documents}; "
          f"keep {args.keep}; random queries per layer, one random pool buffer pair read by every layer, "
          f"document slots a random permutation{'; SMOKE shapes' if args.smoke else ''}")
    print()
    print("| document | keep | prefill ms | plan ms | of which allocation ms | compaction ms | compression ms "
          "| % of prefill |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seq_len in args.documents:
        prefill_ms = args.layers * prefill_layer_ms(args, seq_len, device)
        store_slots = slots_needed(args.layers * num_kv_heads * seq_len, args.layers, num_kv_heads)
        pool_size = seq_len + store_slots
        k_buffer = torch.randn(pool_size, num_kv_heads, args.head_dim, device=device, dtype=torch.bfloat16)
        v_buffer = torch.randn_like(k_buffer)
        k_buffers, v_buffers = [k_buffer] * args.layers, [v_buffer] * args.layers
        permutation = torch.randperm(pool_size, device=device)
        slots, free_slots = permutation[:seq_len], permutation[seq_len:].cpu()
        q_windows = [torch.randn(num_q_heads, args.window, args.head_dim, device=device, dtype=torch.bfloat16)
                     for _ in range(args.layers)]
        values = v_buffer[slots].transpose(0, 1).float()
        layer_scores = [
            policy.scores_from_mass(window_statistics(q, k_buffer, v_buffer, slots, gqa_reduce=policy.gqa_reduce).mass,
                                    values)
            for q in q_windows
        ]
        for keep in args.keep:
            kept = []

            def plan():
                kept[:] = plan_prefix(policy, keep, q_windows, k_buffers, v_buffers, slots, keep_len=seq_len,
                                      use_kernel=True)

            def allocate():
                builder = PlanBuilder(policy, keep, seq_len=seq_len, num_layers=args.layers,
                                      num_kv_heads=num_kv_heads)
                for scores in layer_scores:
                    builder.add_layer_scores(scores)
                builder.finish()

            plan_ms = benchmarking.time_ms(plan, device)
            allocation_ms = benchmarking.time_ms(allocate, device)
            kept_lengths = torch.tensor([[len(positions) for positions in heads] for heads in kept])
            layout = CellLayout(free_slots[:slots_needed(int(kept_lengths.sum()), *kept_lengths.shape)],
                                kept_lengths)
            compaction_ms = benchmarking.time_ms(
                lambda: write_kept(layout, kept, k_buffers, v_buffers, slots, use_kernel=True), device)
            total_ms = plan_ms + compaction_ms
            print(f"| {seq_len} | {keep:g} | {prefill_ms:.4g} | {plan_ms:.4g} | {allocation_ms:.4g} | "
                  f"{compaction_ms:.4g} | {total_ms:.4g} | {100 * total_ms / prefill_ms:.1f} |")
    print()
    print("prefill ms: one decoder layer's forward times the number of layers. plan ms: every layer's window "
          "statistics and scores, the layer and head budgets and the kept lists (plan_prefix). allocation ms: the "
          "budgets and kept lists alone, from the same scores. compaction ms: the kept rows copied into the store's "
          "cells (write_kept).")
    if device.type != "cuda":
        print("CPU smoke run: the numbers only show the script works; they are not GPU measurements.")


if __name__ == "__main__":
    main()
