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
- the tail, positions [H(p), p], at most 127 keys per row in a fixed
  128-slot window, in position order: committed slots, then the row's
  own chain of new rows (its predecessors in a linear draft, its ancestors in
  a token tree), whatever cache slots those occupy; unused slots are masked.
  In a linear continuation the window is cache slots [H(p), H(p) + 128) as
  they are (the slots past p hold finite values that the mask weighs by
  exactly zero), so the rows of one head length share one slice.

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
    """Where the rows of one request in a forward sit and which keys each sees; built once, used by every layer.

    `start`: cache slots [0, start) hold committed tokens; row r is written to slot start + r.
    `positions` [n]: each row's position; `tail_visible` [n, TAIL_KEYS]: the keys of its tail window it sees.
    `heads`: (H, a, b) for each run of consecutive rows a..b-1 with the same non-zero head length H (one run per
    head length in a linear continuation; a token tree may split one). `windows`: (H, rows) for each run of rows
    with the same head length H (zero included). A linear continuation's tail windows are cache slices; a token
    tree's are gathered: `tail_slots` [n * TAIL_KEYS], the cache slot of tail key t of row r at index
    r * TAIL_KEYS + t (slot 0 where masked)."""

    start: int
    positions: torch.Tensor
    tail_visible: torch.Tensor
    heads: list[tuple[int, int, int]]
    windows: list[tuple[int, int]]
    tail_slots: torch.Tensor | None

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
        runs, first = [], 0  # (H, a, b): consecutive rows with one head length
        lengths = heads_of.tolist()
        for r in range(1, n + 1):
            if r == n or lengths[r] != lengths[first]:
                runs.append((lengths[first], first, r))
                first = r
        slots = None
        if chain is not None:
            new = window >= start  # keys of new rows: at the slot of the row on this row's path
            along = (window - start).clamp(min=0, max=chain.shape[1] - 1)
            slots = torch.where(visible, torch.where(new, start + chain.gather(1, along), window), 0)
            slots = slots.reshape(-1).to(device)
        return cls(start, positions.to(device), visible.to(device), [run for run in runs if run[0] > 0],
                   [(length, b - a) for length, a, b in runs], slots)


@dataclass
class Rows:
    """The rows of every request in one forward, requests one after the other: what each layer's attention
    needs, gathered once per forward. `layouts`: each request's; `hidden` [1, n, 1, TAIL_KEYS]: the tail keys
    a row does not see; `heads`: (request, H, a, b) with rows a..b-1 of the whole forward; `tails`: (request, H,
    a, b, r), rows a..b-1 (rows r.. of the request) whose tail windows start at H."""

    layouts: list[RowLayout]
    hidden: torch.Tensor
    heads: list[tuple[int, int, int, int]]
    tails: list[tuple[int, int, int, int, int]]

    @classmethod
    def of(cls, layouts: list[RowLayout]) -> Rows:
        visible = layouts[0].tail_visible if len(layouts) == 1 else torch.cat([lay.tail_visible for lay in layouts])
        heads, tails, first = [], [], 0
        for request, layout in enumerate(layouts):
            heads.extend((request, length, first + a, first + b) for length, a, b in layout.heads)
            r = 0
            for length, count in layout.windows:
                tails.append((request, length, first + r, first + r + count, r))
                r += count
            first += r
        return cls(layouts, ~visible[None, :, None, :], heads, tails)


def attend(q: torch.Tensor, caches: list[torch.Tensor], rows: Rows, quantum: int) -> torch.Tensor:
    """q [n, heads, head_dim] float32 (already scaled by 1/sqrt(head_dim)): the rows of several requests one after
    the other; `caches`: each request's layer cache [2 (keys, values), kv_heads, capacity, head_dim] float32 with
    its rows of this forward written -> [n, heads * head_dim].

    Rows sharing a tail window (a linear continuation's run of one head length) multiply it where it lies in
    the cache: one GEMM over all their query rows, as the head runs do, with no copy of the window per row (the
    copies cost more than the GEMMs once a request has several rows: drafts, prompt chunks). A token tree's
    rows gather their own windows (keys of their path in position order) for batched GEMMs, one row each. Softmax
    pieces run once over every row of the forward. A cache holds at least TAIL_KEYS - MAX_ROWS slots past its rows
    (see `KVCache.reserve`)."""
    n, heads, head_dim = q.shape
    kv_heads = caches[0].shape[1]
    group = heads // kv_heads
    padded = -(-group // quantum) * quantum
    qg = q.view(n, kv_heads, group, head_dim).transpose(0, 1)  # [kv, n, group, hd]
    # contiguous, once: every run's query rows are then a view (a strided one would be copied by each GEMM call)
    qg = torch.cat([qg, qg.new_zeros(kv_heads, n, padded - group, head_dim)], 2) if padded != group \
        else qg.contiguous()

    def shared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [kv, rows, padded, x] @ [kv, x, y], rows fold
        return torch.bmm(a.reshape(kv_heads, -1, a.shape[-1]), b).view(kv_heads, -1, padded, b.shape[-1])

    kv = [cache.unbind(0) for cache in caches]  # each request's (keys, values), read in place by its runs
    scores, windows = [], []  # per tail run: its rows' window scores, and values ([kv, T, hd], or [kv, rows, T, hd])
    for request, length, a, b, r in rows.tails:
        layout = rows.layouts[request]
        if layout.tail_slots is None:
            keys, values = kv[request]
            scores.append(shared(qg[:, a:b], keys[:, length : length + TAIL_KEYS].transpose(1, 2)))
            windows.append(values[:, length : length + TAIL_KEYS])
            continue
        slots = layout.tail_slots[r * TAIL_KEYS : (r + b - a) * TAIL_KEYS]
        keys, values = caches[request].index_select(2, slots).view(2, kv_heads, b - a, TAIL_KEYS, head_dim)
        scores.append(qg[:, a:b] @ keys.transpose(2, 3))
        windows.append(values)
    tail_s = (torch.cat(scores, 1) if len(scores) > 1 else scores[0]).masked_fill_(rows.hidden, float("-inf"))
    top = tail_s.amax(-1, keepdim=True)  # [kv, n, padded, 1]
    head_parts = []  # (a, b, E V, sum of E) of each head run, its rows' top taken over head and tail
    for request, length, a, b in rows.heads:
        keys, values = kv[request]
        s = shared(qg[:, a:b], keys[:, :length].transpose(1, 2))
        run_top = top[:, a:b]
        torch.maximum(run_top, s.amax(-1, keepdim=True), out=run_top)
        e = torch.exp(s - run_top)
        head_parts.append((a, b, shared(e, values[:, :length]), e.sum(-1, keepdim=True)))
    tail_e = torch.exp(tail_s - top)
    pieces = [shared(tail_e[:, a:b], values) if values.dim() == 3 else tail_e[:, a:b] @ values
              for (_, _, a, b, _), values in zip(rows.tails, windows)]
    numerator = torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0]
    denominator = tail_e.sum(-1, keepdim=True)
    for a, b, values, total in head_parts:  # head + tail (one addition: its order does not matter)
        numerator[:, a:b] += values
        denominator[:, a:b] += total
    out = (numerator / denominator)[:, :, :group]  # [kv, n, group, hd]
    return out.transpose(0, 1).reshape(n, heads * head_dim)
