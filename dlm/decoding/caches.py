"""Cache backends: what a decoding step feeds the network and what it keeps between steps.

Each backend says which forward pass a request needs this step (`key`; requests with equal keys
share one batched call) and keeps its typed per-request state (dlm/decoding/state.py):

* `none`: the whole canvas every step (the vanilla decoder every fast configuration is measured
  against); block-causal models: the canvas through their block mask, logits from the current
  block on.
* `prefix` / `dual` (Fast-dLLM, bidirectional models; approximate): one full forward at the
  start of every block keeps the K/V of the whole canvas; later steps feed the block and
  everything after it (prefix) or the block only (dual) and reuse the rest.
* `exact`, block-causal (BD3-LM): the clean finished blocks' K/V in every layer, kept in one slab
  for all requests, updated inside the step's own call; each step feeds the current block only.
  That is the model's own factorisation: the tokens equal the uncached decoder's.
* `exact`, encoder-decoder (E2D2): the encoder runs once per finished block; each step runs the
  light decoder over the current block only.
"""

from __future__ import annotations

from typing import Optional

import torch

from dlm.decoding.state import ApproxCacheState, BlockExactState, EncoderExactState, NoCacheState
from dlm.layers import Packing
from dlm.runtime import to_device


class CacheBackend:
    name = ""

    def new_state(self):
        return NoCacheState()

    def key(self, r) -> tuple:
        raise NotImplementedError

    def release(self, r) -> None:
        """Free what the request holds (it finished or was cancelled)."""


class NoCache(CacheBackend):
    name = "none"

    def key(self, r):
        return ("full",)


class BlockNoCache(CacheBackend):
    name = "none"

    def key(self, r):
        return ("blockfull", r.total)


class PrefixCache(CacheBackend):
    name = "prefix"

    def new_state(self):
        return ApproxCacheState()

    def key(self, r):
        return ("full",) if r.s_in_block == 0 else ("view", r.total - r.block[0])


class DualCache(PrefixCache):
    name = "dual"

    def key(self, r):
        return ("full",) if r.s_in_block == 0 else ("view", r.block[1] - r.block[0])


class BlockExactCache(CacheBackend):
    name = "exact"

    def __init__(self, num_layers: int):
        self.slab = KVSlab(num_layers)

    def new_state(self):
        return BlockExactState()

    def key(self, r):
        return ("exact",)

    def release(self, r):
        if r.cache.slot is not None:
            self.slab.release(r.cache.slot)
            r.cache.slot = None


class EncoderExactCache(CacheBackend):
    name = "exact"

    def new_state(self):
        return EncoderExactState()

    def key(self, r):
        return ("exact_encoder",)


def backends_for(decoder) -> dict[str, CacheBackend]:
    """One backend object per cache kind the decoder's model family allows."""
    fam, cfg = decoder.family, decoder.cfg
    out: dict[str, CacheBackend] = {}
    for name in fam.caches:
        if name == "none":
            out[name] = BlockNoCache() if fam.block_causal else NoCache()
        elif name == "prefix":
            out[name] = PrefixCache()
        elif name == "dual":
            out[name] = DualCache()
        elif name == "exact":
            out[name] = EncoderExactCache() if fam.encoder_decoder else BlockExactCache(cfg.num_hidden_layers)
    return out


# ------------------------------------------------------------------ the forward passes
def forward(decoder, key: tuple, group: list) -> None:
    """Set r.logits (the rows of the canvas columns [block start, ...)) for every request of
    one group. Only the rows of columns that are masked at the call are read (the commit, early
    commit and policies look at masked columns only); the exact cache and the views compute
    those alone and leave zeros elsewhere."""
    FORWARDS[key[0]](decoder, group, *key[1:])


def full_forward(decoder, group: list) -> None:
    """Whole canvases, left-padded to the longest; prefix / dual caches keep their K/V."""
    from dlm.model import KVCache

    cfg, dev = decoder.cfg, decoder.device
    L = max(r.total for r in group)
    canvas = torch.full((len(group), L), cfg.pad_token_id, dtype=torch.long, device=dev)
    positions = torch.full((len(group), L), -1, dtype=torch.long, device=dev)
    for i, r in enumerate(group):
        canvas[i, L - r.total :] = r.canvas
        positions[i, L - r.total :] = torch.arange(r.total, device=dev)
    padded = any(r.total != L for r in group)  # known on the host: no device check
    key_ok = (positions >= 0)[:, None, None, :] if padded else None  # every row has real keys
    refresh = any(isinstance(r.cache, ApproxCacheState) for r in group)
    kv = KVCache(cfg.num_hidden_layers) if refresh else None
    # the LM head only where logits are read: from each request's current block on
    out = to_device([i * L + j for i, r in enumerate(group) for j in range(L - r.total + r.block[0], L)], dev)
    flat = decoder.model(canvas, attn_mask=decoder.attention_mask(key_ok, L), position_ids=positions.clamp(min=0),
                         cache=kv, sigma=decoder.sigma(group), output_positions=out).logits
    parts = flat.split([r.total - r.block[0] for r in group])
    for i, r in enumerate(group):
        pad = L - r.total
        r.logits = parts[i]
        if isinstance(r.cache, ApproxCacheState):
            own = KVCache(cfg.num_hidden_layers)
            own.k = [k[i : i + 1, :, pad:] for k in kv.k]
            own.v = [v[i : i + 1, :, pad:] for v in kv.v]
            r.cache = ApproxCacheState(kv=own)


def view_forward(decoder, group: list, width: int) -> None:
    """Approximate caches: feed columns [lo, lo + width) only; every other column's K/V comes
    from the block's refresh (computed when the fed tokens had other values). A family whose
    logits come one position late (Dream) feeds one column more on the left: the block's first
    logits are the output of the column before it."""
    from dlm.model import KVCache

    cfg, dev = decoder.cfg, decoder.device
    lead = cfg.logit_shift
    width += lead
    views = []
    for r in group:
        lo = r.block[0] - lead
        key = (lo, width)
        st = r.cache
        if st.view_key != key:  # gather the kept K/V once per block
            st.view = ([torch.cat([k[:, :, :lo], k[:, :, lo + width :]], dim=2) for k in st.kv.k],
                       [torch.cat([v[:, :, :lo], v[:, :, lo + width :]], dim=2) for v in st.kv.v])
            st.view_key = key
        views.append(st.view)
    lk = [v[0][0].shape[2] for v in views]
    M = max(lk)
    batch = KVCache(cfg.num_hidden_layers)
    batch.commit = False
    batch.k = [left_pad_cat([v[0][layer] for v in views], M) for layer in range(cfg.num_hidden_layers)]
    batch.v = [left_pad_cat([v[1][layer] for v in views], M) for layer in range(cfg.num_hidden_layers)]
    key_ok = None
    if any(n != M for n in lk):  # known on the host: no device check
        key_ok = torch.arange(M + width, device=dev)[None] >= (M - to_device(lk, dev))[:, None]
        key_ok = key_ok[:, None, None, :]
    los = [r.block[0] - lead for r in group]
    ids = torch.stack([r.canvas[lo : lo + width] for r, lo in zip(group, los)])
    pos = torch.stack([torch.arange(lo, lo + width, device=dev) for lo in los])
    # the LM head only at the view's masked columns (host copy); fed column k's own output is
    # the logits of canvas column block start + k
    W = width - lead
    cols = [r.masked_columns(r.block[0], W, cfg.mask_token_id) for r in group]
    meta = to_device([[i * width + k for i, cl in enumerate(cols) for k in cl],
                      [i * W + k for i, cl in enumerate(cols) for k in cl]], dev)
    logits = decoder.model(ids, attn_mask=decoder.attention_mask(key_ok, width), position_ids=pos, cache=batch,
                           sigma=decoder.sigma(group),
                           output_positions=meta[0], logit_shift=False).logits
    logits = _spread(logits, meta[1], len(group) * W).view(len(group), W, -1)
    for i, r in enumerate(group):
        r.logits = logits[i]


def block_full_forward(decoder, group: list, total: int) -> None:
    """Block-causal models without a cache: the canvas through the block mask."""
    canvas = torch.stack([r.canvas for r in group])
    # the LM head only from the current block on
    out = to_device([i * total + j for i, r in enumerate(group) for j in range(r.block[0], total)], decoder.device)
    flat = decoder.objective.masked_logits(decoder.model, canvas, canvas, None, out)
    for r, part in zip(group, flat.split([r.total - r.block[0] for r in group])):
        r.logits = part


def block_exact_forward(decoder, group: list) -> None:
    """BD3-LM step with the clean-block update folded in (one network call per step, whichever
    requests just finished a block). Per request: `done` tokens cached, c = b0 - done clean
    tokens to add, then the noisy block [b0, b0 + bs). Queries are [clean (left-padded to C) ;
    noisy block]; keys [cache (the slab's rows, valid up to each request's `done`) ; clean ;
    noisy]. Clean queries see the cache and the clean part block-causally (exactly as when the
    blocks are encoded on their own), noisy queries see everything valid; pad queries see
    themselves only. The clean part's K/V is written to each request's slab slot, the noisy
    block's is dropped."""
    from dlm.model import KVCache

    cfg, dev, bs = decoder.cfg, decoder.device, decoder.cfg.block_size
    slab = decoder.backends["exact"].slab
    R = len(group)
    b0s = [(r.block[0] // bs) * bs for r in group]
    dones = [r.cache.clean_len for r in group]
    cs = [b - d for b, d in zip(b0s, dones)]
    slots = [r.cache.slot if r.cache.slot is not None else 0 for r in group]
    M, C = max(dones), max(cs)
    static = decoder.static_shapes
    if static:  # bucketed shapes (a few graphs to capture): pad rows, cache and clean lengths
        Rb, M, C = bucket(R), bucket(M, 64), bucket(C, bs)
        slab.reserve(M)
        pad = Rb - R
        b0s_, dones_, cs_, slots_ = b0s + [0] * pad, dones + [0] * pad, cs + [0] * pad, slots + [0] * pad
    else:
        Rb, b0s_, dones_, cs_, slots_ = R, b0s, dones, cs, slots
    Lq = C + bs
    rows = [r.canvas[d : b + bs] for r, b, d in zip(group, b0s, dones)] + [group[0].canvas[:0]] * (Rb - R)
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=cfg.mask_token_id, padding_side="left")
    if ids.shape[1] < Lq:
        ids = torch.nn.functional.pad(ids, (Lq - ids.shape[1], 0), value=cfg.mask_token_id)
    # the per-request numbers go to the device in one copy (no host sync in the step)
    meta = to_device([cs_, b0s_, dones_, slots_, [1] * R + [0] * (Rb - R)], dev)
    col = torch.arange(Lq, device=dev)[None]
    valid_q = (col >= (C - meta[0])[:, None]) & meta[4][:, None].bool()  # left padding; pad rows
    pos = (meta[1][:, None] + bs - Lq + col).masked_fill(~valid_q, 0)
    q_blk = (pos // bs).masked_fill(~valid_q, -1)  # block index of each query (-1: pad)
    # keys: cache part (all valid entries precede every query), then the queries themselves;
    # slab rows hold a request's prefix at [0, done)
    cache_ok = torch.arange(M, device=dev)[None] < meta[2][:, None]
    qk = (q_blk[:, None, :] <= q_blk[:, :, None]) & valid_q[:, None, :] & valid_q[:, :, None]
    qk |= torch.eye(Lq, dtype=torch.bool, device=dev)[None]  # pad queries see themselves
    mask = torch.cat([cache_ok[:, None, :].expand(Rb, Lq, M) & valid_q[:, :, None], qk], dim=-1)[:, None]
    batch = KVCache(cfg.num_hidden_layers)
    if M and static:  # the cached prefixes; the call appends its K/V (no input written in place)
        batch.k, batch.v = slab.gather(meta[3], M)
    elif M:  # the cached prefixes, gathered into tensors with room for this call's K/V
        batch = KVCache.preallocated(*slab.gather(meta[3], M, room=Lq), M)
    # rows of different lengths (a request that just finished a block, or a new one with its
    # prompt, among requests that only step): padding stays out of the per-token layers
    # (static shapes: padding computed, every row of the same length)
    starts = [C - c for c in cs_]
    packed = not static and any(starts)
    pack = Packing.left_padded(R, Lq, starts, dev) if packed else None
    # the LM head on the noisy blocks only; a family whose logits come one position late
    # (Fast-dLLM v2) reads each from the column before: the block's columns but its last, and
    # the last clean column before it where c > 0 (static: in every row where C > 0)
    lead = cfg.logit_shift
    cols = [([C - 1] if lead and (c or (static and C)) else []) + list(range(C, Lq - lead)) for c in cs_]
    sparse = not lead and not static  # the LM head only at the blocks' masked columns (host copy)
    if sparse:
        cols = [[C + j for j in r.masked_columns(b, bs, cfg.mask_token_id)] for r, b in zip(group, b0s)]
    offset, out = 0, []
    for i, (st, cl) in enumerate(zip(starts, cols)):
        base = offset - st if packed else i * Lq
        out += [base + j for j in cl]
        offset += Lq - st
    graph = getattr(decoder.model, "graph_forward", None) if static else None
    logits = (graph or decoder.model)(ids, position_ids=pos, attn_mask=decoder.attention_mask(mask, Lq), cache=batch,
                                      output_positions=to_device(out, dev), query_valid=pack, logit_shift=False).logits
    if graph is not None:  # a CUDA graph's outputs are overwritten by its next replay; requests keep theirs
        logits = logits.clone()
    counts = [len(cl) for cl in cols]
    logits = logits[: sum(counts[:R])]  # static: the pad rows' logits dropped
    if sparse:  # the block's rows
        logits = _spread(logits, to_device([i * bs + j - C for i, cl in enumerate(cols) for j in cl], dev), R * bs)
    if lead:
        logits = _with_carry(group, logits, counts[:R], [c > 0 for c in cs], bs)
    logits = logits.view(R, bs, -1)
    for i, (r, b, d, c) in enumerate(zip(group, b0s, dones, cs)):
        if c:
            if r.cache.slot is None:
                r.cache.slot = slab.acquire()
            slab.write(r.cache.slot, d, [k[i : i + 1, :, M + C - c : M + C] for k in batch.k],
                       [v[i : i + 1, :, M + C - c : M + C] for v in batch.v])
            r.cache.clean_len = b
        lo, hi = r.block
        r.logits = logits[i, lo - b : hi - b]


def _spread(logits: torch.Tensor, at: torch.Tensor, rows: int) -> torch.Tensor:
    """Logits computed at some rows only (the masked columns) -> `rows` rows, zeros at the
    others (never read: see `forward`)."""
    return logits.new_zeros(rows, logits.shape[-1]).index_copy_(0, at, logits)


def bucket(n: int, unit: int = 1) -> int:
    """The static-shape bucket of a length: 0, else `unit` times the next power of two."""
    if n <= 0:
        return 0
    k = -(-n // unit)
    return unit * (1 << (k - 1).bit_length())


def _with_carry(group, flat, rows, clean, bs):
    """Late logits (lead 1) on the exact cache: per request, the block's first row comes from the
    last clean column before it, computed in the call that made it clean (kept as the carry,
    exact: a clean column sees clean columns only); the other rows from the block's own
    columns. `rows`: how many rows of `flat` each request has (its block's columns but the last,
    after the column before the block where `clean`, a padded column in static shapes).
    Returns (R * bs, V) in block order."""
    parts = list(flat.split(rows))
    res = []
    for r, part, has_clean in zip(group, parts, clean):
        own = part[part.shape[0] - (bs - 1) :]  # the block's columns but its last
        if has_clean:  # this call holds the last clean column: keep its row
            r.cache.carry = part[0]
            res.append(part)
        else:
            first = r.cache.carry if r.cache.carry is not None else own[0]
            res.append(torch.cat([first[None], own], dim=0))
    return torch.cat(res, dim=0)


def encoder_exact_forward(decoder, group: list) -> None:
    """E2D2: newly finished clean blocks through the encoder (their states appended to each
    request's memory), then the light decoder over every current block, reading the memory."""
    _encode_clean(decoder, group)
    cfg, dev, bs = decoder.cfg, decoder.device, decoder.cfg.block_size
    b0s = [(r.block[0] // bs) * bs for r in group]
    M = max(b0s)
    ids = torch.stack([r.canvas[b : b + bs] for r, b in zip(group, b0s)])
    pos = torch.stack([torch.arange(b, b + bs, device=dev) for b in b0s])
    key_ok = torch.zeros(len(group), M, dtype=torch.bool, device=dev)
    for i, b in enumerate(b0s):
        key_ok[i, M - b :] = True
    mem = torch.zeros(len(group), M, cfg.hidden_size, device=dev, dtype=decoder.model.dtype)
    mem_pos = torch.zeros(len(group), M, dtype=torch.long, device=dev)
    for i, (r, b) in enumerate(zip(group, b0s)):
        if b:
            mem[i, M - b :] = r.cache.memory[0]
            mem_pos[i, M - b :] = torch.arange(b, device=dev)
    attn = None
    if any(b != M for b in b0s):  # known on the host: no device check
        attn = torch.cat([key_ok[:, None, None, :].expand(-1, 1, bs, -1),
                          torch.ones(len(group), 1, bs, bs, dtype=torch.bool, device=dev)], dim=-1)
    logits = decoder.model.decode(ids, mem, mem_pos, attn_mask=decoder.attention_mask(attn, bs), position_ids=pos).logits
    for i, (r, b) in enumerate(zip(group, b0s)):
        lo, hi = r.block
        r.logits = logits[i, lo - b : hi - b]


def _encode_clean(decoder, group: list) -> None:
    """E2D2: encode each request's newly finished clean blocks [done, b0) (block-causal among
    themselves, attending to everything before), batched across the requests that append the
    same number of tokens, their stored encoder K/V left-padded under a key mask; the new
    entries and output states are then appended to each request's own."""
    from dlm.model import KVCache

    cfg, dev, bs = decoder.cfg, decoder.device, decoder.cfg.block_size
    by_n: dict[int, list] = {}
    for r in group:
        b0 = (r.block[0] // bs) * bs
        done = r.cache.clean_len
        if done < b0:
            by_n.setdefault(b0 - done, []).append((r, done, b0))
    for n, items in by_n.items():
        R, M = len(items), max(done for _, done, _ in items)
        blk = torch.arange(n, device=dev) // bs  # done is a block boundary: blocks align
        own = (blk[None, :] <= blk[:, None]).expand(R, 1, n, n)
        key_ok = torch.zeros(R, 1, n, M, dtype=torch.bool, device=dev)
        for i, (_, done, _) in enumerate(items):
            key_ok[i, :, :, M - done :] = True
        mask = torch.cat([key_ok, own], dim=-1)
        ids = torch.stack([r.canvas[done:b0] for r, done, b0 in items])
        pos = torch.stack([torch.arange(done, b0, device=dev) for _, done, b0 in items])
        batch = KVCache(cfg.num_hidden_layers)
        if M:
            stored = [r.cache.kv if done else None for r, done, _ in items]
            for layer in range(cfg.num_hidden_layers):
                batch.k[layer] = left_pad_cat([c.k[layer] if c else None for c in stored], M, like=ids)
                batch.v[layer] = left_pad_cat([c.v[layer] if c else None for c in stored], M, like=ids)
        states = decoder.model.encode(ids, attn_mask=decoder.attention_mask(mask, n), position_ids=pos, cache=batch)
        for i, (r, done, b0) in enumerate(items):
            st = r.cache
            if st.kv is None:
                st.kv = KVCache(cfg.num_hidden_layers)
            for layer in range(cfg.num_hidden_layers):
                k, v = batch.k[layer][i : i + 1, :, M:], batch.v[layer][i : i + 1, :, M:]
                st.kv.k[layer] = k if st.kv.k[layer] is None else torch.cat([st.kv.k[layer], k], dim=2)
                st.kv.v[layer] = v if st.kv.v[layer] is None else torch.cat([st.kv.v[layer], v], dim=2)
            st.memory = states[i : i + 1] if done == 0 else torch.cat([st.memory, states[i : i + 1]], dim=1)
            st.clean_len = b0


FORWARDS = {"full": full_forward, "view": view_forward, "blockfull": block_full_forward,
            "exact": block_exact_forward, "exact_encoder": encoder_exact_forward}


# ------------------------------------------------------------------ storage
class KVSlab:
    """Clean-prefix K/V of many requests in one (slots, heads, T, head_dim) tensor per layer: a
    request's cached prefix sits at [0, done) of its slot, so a batched step gathers its rows with
    one index_select per layer (instead of copying each request's cache into a padded batch), and
    a finished block is written in place. Slots are reused; capacity grows on demand (slots
    doubling, T to the longest canvas seen, rounded up to 64)."""

    def __init__(self, num_layers: int):
        self.L = num_layers
        self.k: Optional[list[torch.Tensor]] = None
        self.v: Optional[list[torch.Tensor]] = None
        self.free: list[int] = []
        self.used = 0

    def acquire(self) -> int:
        if self.free:
            return self.free.pop()
        self.used += 1
        return self.used - 1

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def _grow(self, like: torch.Tensor, slots: int, length: int) -> None:
        S = 0 if self.k is None else self.k[0].shape[0]
        T = 0 if self.k is None else self.k[0].shape[2]
        if slots <= S and length <= T:
            return
        S2, T2 = max(S, slots, 2 * S if slots > S else 0), max(T, -(-length // 64) * 64)
        H, D = like.shape[1], like.shape[3]

        def grown(old):
            new = like.new_zeros(S2, H, T2, D)
            if old is not None:
                new[:S, :, :T] = old
            return new

        self.k = [grown(None if self.k is None else self.k[i]) for i in range(self.L)]
        self.v = [grown(None if self.v is None else self.v[i]) for i in range(self.L)]

    def write(self, slot: int, start: int, ks: list, vs: list) -> None:
        """Store per-layer (1, H, n, D) keys / values at [start, start + n) of `slot`."""
        n = ks[0].shape[2]
        self._grow(ks[0], slot + 1, start + n)
        for layer in range(self.L):
            self.k[layer][slot, :, start : start + n] = ks[layer][0]
            self.v[layer][slot, :, start : start + n] = vs[layer][0]

    def reserve(self, length: int) -> None:
        """Room for `length` entries per slot (a static-shape step reads a bucketed length)."""
        if self.k is not None:
            self._grow(self.k[0], self.k[0].shape[0], length)

    def gather(self, idx: torch.Tensor, length: int, room: int = 0) -> tuple[list, list]:
        """Per layer, the first `length` entries of the slots `idx` (a long tensor on the slab's
        device) as (R, H, length + room, D); the last `room` entries are uninitialised."""
        out = ([], [])
        for src, dst in ((self.k, out[0]), (self.v, out[1])):
            for t in src:
                buf = t.new_empty(idx.numel(), t.shape[1], length + room, t.shape[3])
                torch.index_select(t[:, :, :length], 0, idx, out=buf[:, :, :length])
                dst.append(buf)
        return out


def left_pad_cat(parts: list, length: int, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Stack (1, H, n_i, D) tensors (None = empty) into (B, H, length, D), zero-padded on the left."""
    ref = next(p for p in parts if p is not None)
    out = ref.new_zeros(len(parts), ref.shape[1], length, ref.shape[3])
    for i, p in enumerate(parts):
        if p is not None and p.shape[2]:
            out[i, :, length - p.shape[2] :] = p[0]
    return out
