"""Partial attention states: SGLang's merge_state and the project's torch merge agree,
merging equals attention over the concatenated keys, the causal mask, and the CPU
flash-attention wrappers."""

import math

import pytest
import torch

from lava_sglang.kernels import attention_states
from lava_sglang.kernels.attention_states import (attention_with_lse, causal_visibility, flash_attention_with_lse,
                                                  flash_extend_attention_with_lse, merge_attention_states,
                                                  rows_attention_with_lse)
from kernel_support import bf16_rounding


def _states(num_tokens, num_heads, head_dim, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    outs = [torch.randn(num_tokens, num_heads, head_dim, generator=generator).to(device, dtype) for _ in range(2)]
    lses = [(3 * torch.randn(num_tokens, num_heads, generator=generator)).to(device) for _ in range(2)]
    lses[0][0, 0] = float("-inf")  # an empty compressed prefix for one (token, head)
    return outs[0], lses[0], outs[1], lses[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sglang_merge_state_agrees_with_the_torch_merge(device, dtype):
    # On CUDA SGLang's merge_state runs sgl_kernel; on the CPU its Triton fallback
    # (merge_state_triton) runs under the interpreter.
    merge_state = pytest.importorskip("sglang.srt.layers.attention.merge_state",
                                      reason="SGLang is not installed").merge_state
    states = _states(5, 6, 64, dtype, device)
    sglang_out, sglang_lse = merge_state(*states)
    torch_out, torch_lse = merge_attention_states(*states)
    assert sglang_out.dtype == dtype and sglang_lse.dtype == torch.float32
    # bf16: SGLang's merged output is rounded to bf16 once.
    atol = 1e-6 if dtype == torch.float32 else bf16_rounding(device) * float(torch_out.abs().max())
    torch.testing.assert_close(sglang_out.float(), torch_out, rtol=0, atol=atol)
    torch.testing.assert_close(sglang_lse, torch_lse, rtol=1e-6, atol=1e-6)
    # One side empty: the merge is the other side.
    assert torch.equal(torch_out[0, 0], states[2][0, 0].float()) and torch_lse[0, 0] == states[3][0, 0]


@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(4, 4), (6, 2), (8, 2), (8, 1)])
def test_merging_equals_attention_over_the_concatenation(num_q_heads, num_kv_heads):
    # Keys split at an arbitrary point into two disjoint sets; the per-set attentions merged
    # by LSE equal attention over all keys (torch merge; the SGLang merge is compared with it
    # above).
    generator = torch.Generator().manual_seed(1)
    group, num_tokens, num_keys, head_dim = num_q_heads // num_kv_heads, 3, 23, 64
    query = torch.randn(1, num_kv_heads, group, num_tokens, head_dim, generator=generator)
    keys = torch.randn(1, num_kv_heads, num_keys, head_dim, generator=generator)
    values = torch.randn(1, num_kv_heads, num_keys, head_dim, generator=generator)
    scale = 1 / math.sqrt(head_dim)
    everything = torch.ones(1, dtype=torch.bool)

    def token_major(state):
        """[1, Hkv, G, T, ...] -> [T, Hq, ...], the layout of SGLang's attention outputs."""
        return state.reshape(num_q_heads, num_tokens, *state.shape[4:]).transpose(0, 1).contiguous()

    expected_out, expected_lse = attention_with_lse(query, keys, values, everything, scale)
    for split in (0, 1, 9, num_keys):
        first_out, first_lse = attention_with_lse(query, keys[:, :, :split], values[:, :, :split], everything, scale)
        second_out, second_lse = attention_with_lse(query, keys[:, :, split:], values[:, :, split:], everything, scale)
        out, lse = merge_attention_states(token_major(first_out), token_major(first_lse),
                                          token_major(second_out), token_major(second_lse))
        torch.testing.assert_close(out, token_major(expected_out), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, token_major(expected_lse), rtol=1e-6, atol=1e-6)


def test_torch_merge_of_two_empty_states_is_empty():
    out, lse = merge_attention_states(torch.ones(2, 3, 4), torch.full((2, 3), float("-inf")),
                                      torch.ones(2, 3, 4), torch.full((2, 3), float("-inf")))
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())


def test_the_cpu_flash_kernel_gives_attention_with_lse_or_declines():
    # One sequence, GQA (2 KV heads, 3 queries each), the last 5 of 12 positions attending
    # causally: the server's own-token attention and the repetition's normaliser.
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 3, 5, 16, generator=generator)
    keys, values = torch.randn(2, 12, 16, generator=generator), torch.randn(2, 12, 16, generator=generator)
    visible = torch.arange(12)[None, :] <= (7 + torch.arange(5))[:, None]
    out, lse = flash_attention_with_lse(query, keys, values, visible, 0.25)
    expected_out, expected_lse = attention_with_lse(query[None], keys[None], values[None], visible, 0.25)
    torch.testing.assert_close(out, expected_out[0])
    torch.testing.assert_close(lse, expected_lse[0])
    assert flash_attention_with_lse(query.double(), keys.double(), values.double(), visible, 0.25) is None


@pytest.mark.parametrize("flash", [True, False], ids=["flash", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_attention_is_every_row_over_every_key(flash, dtype, monkeypatch):
    # A KV head's kept rows read by its group's queries (the torch prefix path): the CPU flash
    # kernel, or the dense fallback where that op is missing; fp32 out and LSE either way.
    if not flash:
        monkeypatch.setattr(attention_states, "_cpu_flash_attention", lambda *tensors: None)
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(6, 16, generator=generator, dtype=dtype)
    keys, values = (torch.randn(9, 16, generator=generator, dtype=dtype) for _ in range(2))
    out, lse = rows_attention_with_lse(query, keys, values, 0.25)
    logits = query.double() @ keys.double().T * 0.25
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(lse, logits.logsumexp(-1).float())
    torch.testing.assert_close(out, (logits.softmax(-1) @ values.double()).float())


def test_causal_visibility_places_the_queries_at_the_end_of_the_keys():
    assert causal_visibility(2, 4, torch.device("cpu")).tolist() == [[True, True, True, False], [True] * 4]
    assert causal_visibility(3, 3, torch.device("cpu")).tolist() == [[True, False, False], [True, True, False],
                                                                     [True, True, True]]


@pytest.mark.parametrize(("num_rows", "num_keys"), [(5, 12), (5, 5), (1, 9), (7, 8)])
def test_the_flash_extend_attends_causally_after_the_cached_keys(num_rows, num_keys):
    # The last num_rows positions of a sequence over all its keys: every cached key seen by
    # every query, the new keys causally (num_keys == num_rows: nothing cached).
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(2, 3, num_rows, 16, generator=generator)
    keys, values = (torch.randn(2, num_keys, 16, generator=generator) for _ in range(2))
    visible = torch.arange(num_keys)[None, :] <= (num_keys - num_rows + torch.arange(num_rows))[:, None]
    out, lse = flash_extend_attention_with_lse(query, keys, values, 0.25)
    expected_out, expected_lse = attention_with_lse(query[None], keys[None], values[None], visible, 0.25)
    torch.testing.assert_close(out, expected_out[0])
    torch.testing.assert_close(lse, expected_lse[0])
    assert flash_extend_attention_with_lse(query.double(), keys.double(), values.double(), 0.25) is None
    with pytest.raises(ValueError, match="S >= T"):
        flash_extend_attention_with_lse(query, keys[:, :num_rows - 1], values[:, :num_rows - 1], 0.25)


def test_the_flash_helpers_give_an_empty_state_for_an_empty_side():
    # PyTorch's CPU flash kernel dies with SIGFPE on an empty side: the helpers never call it
    # with one and answer as attention_with_lse does (no key: out 0, lse -inf; no query: nothing).
    generator = torch.Generator().manual_seed(6)
    query = torch.randn(2, 3, 4, 16, generator=generator)
    keys, values = torch.randn(2, 5, 16, generator=generator), torch.randn(2, 5, 8, generator=generator)
    out, lse = flash_attention_with_lse(query, keys[:, :0], values[:, :0], torch.zeros(4, 0, dtype=torch.bool), 0.25)
    assert out.shape == (2, 3, 4, 8) and bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    out, lse = flash_attention_with_lse(query[:, :, :0], keys, values, torch.zeros(0, 5, dtype=torch.bool), 0.25)
    assert out.shape == (2, 3, 0, 8) and lse.shape == (2, 3, 0)
    out, lse = rows_attention_with_lse(query[0, 0], keys[0, :0], values[0, :0], 0.25)
    assert out.shape == (4, 8) and bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    out, lse = flash_extend_attention_with_lse(query[:, :, :0], keys, values, 0.25)
    assert out.shape == (2, 3, 0, 8) and lse.shape == (2, 3, 0)


def test_a_row_that_sees_no_key_weighs_nothing_in_a_merge():
    # The flash kernel gives such a row lse 0 (a full weight against a real state); the helper
    # gives what attention_with_lse gives, -inf and out 0.
    generator = torch.Generator().manual_seed(7)
    query = torch.randn(2, 3, 3, 16, generator=generator)
    keys, values = torch.randn(2, 6, 16, generator=generator), torch.randn(2, 6, 16, generator=generator)
    visible = torch.tensor([[True] * 6, [False] * 6, [True, False, True, False, True, False]])
    out, lse = flash_attention_with_lse(query, keys, values, visible, 0.25)
    expected_out, expected_lse = attention_with_lse(query[None], keys[None], values[None], visible, 0.25)
    torch.testing.assert_close(out, expected_out[0])
    torch.testing.assert_close(lse, expected_lse[0])
