"""A writer of a compressed prefix's rows for the tests that build stores by hand (the
server writes through `store.write_kept`, which copies from the pool): importable from any
test, tests/ is on sys.path."""

import torch

from lava_sglang.store import CellLayout


def write_layer(layout: CellLayout, layer: int, k_buffers, v_buffers, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Store `layer`'s kept rows: keys, values [rows of the layer, head_dim] in (head, position)
    order, from any device (copied to the buffers'); `store.read_layer` reads them back."""
    start, stop = layout.layer_rows(layer)
    if keys.shape[0] != stop - start or values.shape[0] != stop - start:
        raise ValueError(f"layer {layer} keeps {stop - start} rows, got {keys.shape[0]} keys, {values.shape[0]} values")
    done = 0
    for buffer, cells in layout.layer_cells(layer):
        count = cells.numel()
        for buffers, rows in ((k_buffers, keys), (v_buffers, values)):
            target = buffers[buffer].view(-1, buffers[buffer].shape[-1])
            target[cells.to(target.device)] = rows[done:done + count].to(target.device, target.dtype)
        done += count
