"""Row-invariant attention: a row's output depends only on its query and the keys it sees, bitwise.

Why not `scaled_dot_product_attention`: its result for a query row changes with
the number of rows in the call and with where a row's keys sit in the cache
(measured: a row computed alone and in a 2-row call differ), so a verification
of n drafted tokens, a token tree and a one-token step would give the target
different logits for the same position. Lossless decoding would then hold only
up to near-ties of the argmax.

How: every row at position p splits its keys at a boundary that depends on p
alone, never on the forward it is computed in:

- the head, positions [0, H(p)) with H(p) = 64 * floor(max(0, p - 63) / 64):
  committed keys, read in place from the cache (any forward containing row p
  starts at p - 63 or later, since a forward has at most MAX_ROWS rows, so
  H(p) never reaches an uncommitted slot);
- the tail, positions [H(p), p], at most 127 keys gathered per row into a
  fixed 128-slot window, in position order: committed slots, then the row's
  own chain of new rows (its predecessors in a linear draft, its ancestors in
  a token tree), whatever cache slots those occupy; unused slots are masked.

Scores are float32 GEMMs over fixed or position-determined shapes: the head
Q K^T and E V over exactly H(p) keys, the tail ones over exactly 128, with the
query rows of one GEMM padded to a multiple of the machine's measured
`quantum` (GEMM libraries pick other code paths for a few rows; see
`services.engine.kernels`). Softmax is spelt out with row-wise operations whose
result does not depend on the other rows (max, exp, a sum over a
position-determined length, one division), combined head first, then tail.
Rows whose head is empty (p < 127) skip the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.kernels import MAX_ROWS, TAIL_KEYS


def head_length(position: torch.Tensor) -> torch.Tensor:
    return torch.div((position - (MAX_ROWS - 1)).clamp(min=0), MAX_ROWS, rounding_mode="floor") * MAX_ROWS


@dataclass
class RowLayout:
    """Where the rows of one forward sit and which keys each sees; built once, used by every layer.

    `start`: cache slots [0, start) hold committed tokens; row r is written to slot start + r.
    `positions` [n]: each row's position. `tail_slots` [n * TAIL_KEYS]: the cache slot of tail key t of
    row r at index r * TAIL_KEYS + t (slot 0 where masked); `tail_visible` [n, TAIL_KEYS]. `heads`: (H, rows)
    for each distinct non-zero head length H, `rows` the indices of the rows with that head."""

    start: int
    positions: torch.Tensor
    tail_slots: torch.Tensor
    tail_visible: torch.Tensor
    heads: list[tuple[int, torch.Tensor]]

    @classmethod
    def build(cls, start: int, parents: list[int] | None, n: int, device: torch.device) -> RowLayout:
        """`parents[r]`: the row that row r continues (-1: the committed sequence); None: a linear
        continuation (row r continues row r - 1)."""
        if n > MAX_ROWS:
            raise ValueError(f"a forward computes at most {MAX_ROWS} rows, got {n}")
        if parents is None:
            depth = torch.arange(n)
            chain = None
        else:
            depth_list: list[int] = []
            for r, parent in enumerate(parents):
                if not -1 <= parent < r:
                    raise ValueError("parents must come before their children")
                depth_list.append(0 if parent < 0 else depth_list[parent] + 1)
            depth = torch.tensor(depth_list, dtype=torch.long)
            # chain[r, d]: the row at depth d on row r's path (row r itself at its own depth)
            chain = torch.zeros(n, max(depth_list, default=0) + 1, dtype=torch.long)
            for r, parent in enumerate(parents):
                if parent >= 0:
                    chain[r] = chain[parent]
                chain[r, depth_list[r]] = r
        positions = start + depth
        heads_of = head_length(positions)
        window = heads_of[:, None] + torch.arange(TAIL_KEYS)  # [n, TAIL_KEYS] positions
        visible = window <= positions[:, None]
        slots = window.clone()
        if chain is not None:
            new = window >= start  # keys of new rows: at the slot of the row on this row's path
            along = (window - start).clamp(min=0, max=chain.shape[1] - 1)
            slots = torch.where(new, start + chain.gather(1, along), window)
        slots = torch.where(visible, slots, 0)
        heads = [(int(h), (heads_of == h).nonzero()[:, 0].to(device)) for h in heads_of.unique().tolist() if h > 0]
        return cls(start, positions.to(device), slots.reshape(-1).to(device), visible.to(device), heads)


def attend(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, RowLayout]], quantum: int) -> torch.Tensor:
    """q [n, heads, head_dim] float32 (already scaled by 1/sqrt(head_dim)): the rows of several requests one after
    the other; `parts`: each request's (keys, values, layout), keys/values [kv_heads, capacity, head_dim] float32,
    its layer cache with its rows of this forward written -> [n, heads * head_dim].

    The tails of all rows go through one batched GEMM (each row's own 128 keys; at most MAX_ROWS rows per
    call, the batch sizes the kernels were checked for); heads through one GEMM per request and head length."""
    n, heads, head_dim = q.shape
    kv_heads = parts[0][0].shape[0]
    group = heads // kv_heads
    padded = -(-group // quantum) * quantum
    qg = q.view(n, kv_heads, group, head_dim).transpose(0, 1)  # [kv, n, group, hd]
    if padded != group:
        qg = torch.cat([qg, qg.new_zeros(kv_heads, n, padded - group, head_dim)], 2)

    def gathered(index: int) -> torch.Tensor:  # every row's tail keys (0) or values (1): [kv, n, TAIL_KEYS, hd]
        tails = [part[index].index_select(1, layout.tail_slots).view(kv_heads, -1, TAIL_KEYS, head_dim)
                 for *part, layout in parts]
        return tails[0] if len(tails) == 1 else torch.cat(tails, 1)

    def batched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # a @ b, MAX_ROWS rows per call
        if n <= MAX_ROWS:
            return a @ b
        return torch.cat([a[:, i : i + MAX_ROWS] @ b[:, i : i + MAX_ROWS] for i in range(0, n, MAX_ROWS)], 1)

    visible = parts[0][2].tail_visible if len(parts) == 1 else torch.cat([layout.tail_visible for *_, layout in parts])
    tail_s = batched(qg, gathered(0).transpose(2, 3)).masked_fill_(~visible[None, :, None, :], float("-inf"))
    top = tail_s.amax(-1, keepdim=True)  # [kv, n, padded, 1]
    heads_of, first = [], 0  # (keys, values, head length, the rows (of all n) with that head, their scores)
    for keys, values, layout in parts:
        for length, rows in layout.heads:
            rows = rows + first
            s = qg[:, rows].reshape(kv_heads, -1, head_dim) @ keys[:, :length].transpose(1, 2)
            s = s.view(kv_heads, len(rows), padded, length)
            top[:, rows] = torch.maximum(top[:, rows], s.amax(-1, keepdim=True))
            heads_of.append((values, length, rows, s))
        first += len(layout.positions)
    tail_e = torch.exp(tail_s - top)
    numerator = torch.zeros(kv_heads, n, padded, head_dim, dtype=q.dtype, device=q.device)
    denominator = torch.zeros(kv_heads, n, padded, 1, dtype=q.dtype, device=q.device)
    for values, length, rows, s in heads_of:
        e = torch.exp(s - top[:, rows])
        numerator[:, rows] = (e.reshape(kv_heads, -1, length) @ values[:, :length]).view(kv_heads, len(rows),
                                                                                          padded, head_dim)
        denominator[:, rows] = e.sum(-1, keepdim=True)
    numerator = numerator + batched(tail_e, gathered(1))
    denominator = denominator + tail_e.sum(-1, keepdim=True)
    out = (numerator / denominator)[:, :, :group]  # [kv, n, group, hd]
    return out.transpose(0, 1).reshape(n, heads * head_dim)
