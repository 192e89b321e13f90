"""WindowCapture: which queries observe a prefix, across chunked prefill and for shared prefixes."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lava_sglang.sglang_plugin.compressor import WindowCapture

WINDOW, HEADS, DIM, LAYERS = 4, 2, 3, 2


def positions(start: int, stop: int) -> torch.Tensor:
    """Queries [tokens, Hq, d] whose every value is the token's position, so a window says where it came from."""
    return torch.arange(start, stop, dtype=torch.float32).view(-1, 1, 1).expand(-1, HEADS, DIM).clone()


def captured_positions(windows) -> list[list[int]]:
    return [window[0, :, 0].long().tolist() for window in windows]


class Request(SimpleNamespace):
    """A request as the capture sees it (SGLang's `Req` can be referenced weakly)."""

    __slots__ = ("__weakref__",)


def record(capture: WindowCapture, req: int, start: int, stop: int) -> None:
    for layer in range(LAYERS):
        capture.record(layer, req, start, positions(start, stop))


def test_tail_window_spans_chunks_shorter_than_the_window():
    capture = WindowCapture(WINDOW, min_prefix=8)
    record(capture, req=0, start=0, stop=10)
    record(capture, req=0, start=10, stop=12)  # a 2-token last chunk
    assert captured_positions(capture.window_queries(0, 12, LAYERS)) == [[8, 9, 10, 11]] * LAYERS
    assert capture.window_queries(0, 11, LAYERS) is None  # no window ends there


def test_a_chunked_prompt_records_its_first_chunk_though_it_ends_below_min_prefix():
    # --chunked-prefill-size 6 and a 9-token commit at min_prefix 8: the first chunk ends at
    # 6 < 8, the last has 3 rows, fewer than the window; together they give the window.
    capture = WindowCapture(WINDOW, min_prefix=8)
    req = Request(rid="commit", kv=SimpleNamespace(req_pool_idx=0), origin_input_ids=list(range(9)))
    capture.observe(req, True)
    for start, stop in ((0, 6), (6, 9)):
        rows = capture.rows_to_record("commit", start, stop - start)
        assert rows == stop - start
        record(capture, req=0, start=start, stop=start + rows)
    assert captured_positions(capture.window_queries(0, 9, LAYERS)) == [[5, 6, 7, 8]] * LAYERS


def test_head_window_observes_a_recomputed_shared_prefix():
    capture = WindowCapture(WINDOW, min_prefix=8)
    record(capture, req=3, start=20, stop=30)  # the match was cut at 20: positions 20..23 end the shared prefix
    assert captured_positions(capture.window_queries(3, 24, LAYERS)) == [[20, 21, 22, 23]] * LAYERS
    assert captured_positions(capture.window_queries(3, 30, LAYERS)) == [[26, 27, 28, 29]] * LAYERS
    record(capture, req=3, start=30, stop=40)  # a later chunk does not replace the head
    assert captured_positions(capture.window_queries(3, 24, LAYERS)) == [[20, 21, 22, 23]] * LAYERS


def test_head_window_spans_a_first_chunk_shorter_than_the_window():
    # SGLang gives a request a first chunk of whatever room the batch has left: 3 of the 4
    # recomputed tokens, then the rest with the next chunk.
    capture = WindowCapture(WINDOW, min_prefix=8)
    record(capture, req=3, start=20, stop=23)
    assert capture.window_queries(3, 24, LAYERS) is None  # not yet computed
    record(capture, req=3, start=23, stop=30)
    assert captured_positions(capture.window_queries(3, 24, LAYERS)) == [[20, 21, 22, 23]] * LAYERS
    assert captured_positions(capture.window_queries(3, 30, LAYERS)) == [[26, 27, 28, 29]] * LAYERS
    record(capture, req=4, start=20, stop=21)  # one token a chunk
    for start in range(21, 24):
        record(capture, req=4, start=start, stop=start + 1)
    assert captured_positions(capture.window_queries(4, 24, LAYERS)) == [[20, 21, 22, 23]] * LAYERS


def test_a_layer_without_capture_or_a_short_window_gives_none():
    capture = WindowCapture(WINDOW, min_prefix=8)
    capture.record(0, 1, 0, positions(0, 10))  # layer 1 never recorded
    assert capture.window_queries(1, 10, LAYERS) is None
    record(capture, req=2, start=20, stop=22)  # the request computed only 2 tokens
    assert capture.window_queries(2, 22, LAYERS) is None


def test_only_observed_requests_long_enough_are_wanted_and_drop_forgets_one():
    capture = WindowCapture(WINDOW, min_prefix=8)
    req = Request(rid="commit", kv=SimpleNamespace(req_pool_idx=0), origin_input_ids=list(range(12)))
    assert not capture.rows_to_record("commit", 0, 10)
    capture.observe(req, True)
    assert capture.rows_to_record("commit", 0, 10) == 10 and not capture.rows_to_record("other", 0, 10)
    short = Request(rid="short", kv=SimpleNamespace(req_pool_idx=1), origin_input_ids=list(range(7)))
    capture.observe(short, True)  # a prompt below min_prefix is never compressed
    assert not capture.rows_to_record("short", 0, 7)
    # Up to the prompt's end: a decode step in an extend batch (--enable-mixed-chunk), or a
    # retracted request's output prefilled again, would move the window past it.
    assert capture.rows_to_record("commit", 8, 6) == 4 and capture.rows_to_record("commit", 12, 1) == 0
    record(capture, req=0, start=0, stop=10)
    capture.drop(req)
    assert capture.window_queries(0, 10, LAYERS) is None and not capture.rows_to_record("commit", 0, 10)
    capture.observe(req, True)
    capture.observe(req, False)  # matched again, and this time not read
    assert not capture.rows_to_record("commit", 0, 10)
    capture.observe(req, True)
    del req  # dropped before its release (aborted while queued): nothing stays
    assert not capture.rows_to_record("commit", 0, 10)


def test_a_branch_window_can_be_shorter_than_the_window():
    capture = WindowCapture(WINDOW, min_prefix=8)
    record(capture, req=2, start=20, stop=22)  # a branch with 2 own tokens after a 20-token prefix
    assert captured_positions(capture.window_queries(2, 22, LAYERS, rows=2)) == [[20, 21]] * LAYERS
    assert capture.window_queries(2, 22, LAYERS, rows=3) is None


def test_branch_windows_keep_what_the_branches_attend_to():
    """plan_prefix with a branch window that looks at one token only: that token is kept in
    every (layer, KV head), where the tail window alone keeps it nowhere."""
    from lava_sglang.policy import ObservationWindow, make_policy
    from lava_sglang.sglang_plugin.compressor import plan_prefix

    generator = torch.Generator().manual_seed(0)
    num_layers, num_kv_heads, group, dim, seq_len = 2, 2, 2, 8, 64
    keys = [torch.randn(seq_len, num_kv_heads, dim, generator=generator) for _ in range(num_layers)]
    values = [torch.randn(seq_len, num_kv_heads, dim, generator=generator) for _ in range(num_layers)]
    tail = [torch.randn(num_kv_heads * group, 8, dim, generator=generator) for _ in range(num_layers)]
    policy = make_policy("lava", window=8, pool_kernel=1)
    slots = torch.arange(seq_len)
    tail_only = plan_prefix(policy, 16, tail, keys, values, slots, keep_len=seq_len - 1)
    kept_by_tail = {int(position) for heads in tail_only for positions in heads for position in positions}
    target = next(j for j in range(seq_len - 8) if j not in kept_by_tail)
    # The branch's queries are the target's key, scaled: nearly all its attention goes there.
    branch = [[ObservationWindow(
        (20 * keys[layer][target]).repeat_interleave(group, dim=0)[:, None, :],
        own_keys=torch.randn(num_kv_heads, 3, dim, generator=generator))] for layer in range(num_layers)]
    with_branch = plan_prefix(policy, 16, tail, keys, values, slots, keep_len=seq_len - 1, branch_windows=branch)
    assert all(target in positions.tolist() for heads in with_branch for positions in heads)


def test_kvzip_plan_from_repetition_scores_is_one_global_threshold():
    """plan_prefix with repetition scores and kvzip: the kept selectable tokens are the best
    scores of all layers and KV heads together (plus the 4 sinks), the rest is the window."""
    from lava_sglang.policy import make_policy
    from lava_sglang.sglang_plugin.compressor import plan_prefix

    generator = torch.Generator().manual_seed(1)
    num_layers, num_kv_heads, group, dim, seq_len, window = 2, 2, 2, 8, 40, 8
    keys = [torch.randn(seq_len, num_kv_heads, dim, generator=generator) for _ in range(num_layers)]
    values = [torch.randn(seq_len, num_kv_heads, dim, generator=generator) for _ in range(num_layers)]
    repeat = [torch.rand(num_kv_heads * group, seq_len - window, generator=generator) for _ in range(num_layers)]
    repeat[1] = repeat[1] * 0.1  # layer 1's repetition attention is weak: layer 0 wins the budget
    tail = [torch.randn(num_kv_heads * group, window, dim, generator=generator) for _ in range(num_layers)]
    kept = plan_prefix(make_policy("kvzip", window=window), 16, tail, keys, values, torch.arange(seq_len),
                       keep_len=seq_len, repeat_attention=repeat)
    scores = torch.stack([layer.view(num_kv_heads, group, -1).amax(1) for layer in repeat])  # [L, Hkv, m]
    scores[:, :, :4] = torch.inf
    threshold = torch.sort(scores.flatten(), descending=True).values[(16 - window) * num_layers * num_kv_heads - 1]
    for layer in range(num_layers):
        for head in range(num_kv_heads):
            expected = torch.nonzero(scores[layer, head] >= threshold).flatten().tolist()
            assert kept[layer][head].tolist() == expected + list(range(seq_len - window, seq_len))
    assert sum(len(rows) for rows in kept[0]) > sum(len(rows) for rows in kept[1])
