"""Block structure shared by BD3-LM and E2D2: block ids and the attention masks of training.

Masks are boolean, True = may attend, built once per (length, block size, device) and cached, so
a training run builds each shape once. `*_reference` versions spell the rules out with loops and
exist for the tests.

BD3-LM vectorised training (Arriola et al. 2025) feeds cat(x_t, x0) (2L tokens, both halves at
positions 0..L-1) under the OR of three masks:
  (a) block-diagonal inside each half (a noisy block sees its own noisy block),
  (b) noisy block b sees clean blocks < b        (the context it is conditioned on),
  (c) clean block b sees clean blocks <= b       (block-causal clean stream; it makes (b)'s keys).
Clean tokens never see noisy ones. B' = 1 is autoregressive; B' = L is MDLM.

E2D2: the encoder reads x0 block-causally (c); the decoder's noisy block b reads the encoder's
states of blocks < b and its own noisy block (keys laid out as [encoder states ; own states]).

Backends: the dense boolean masks go to SDPA and work everywhere. Where FlexAttention is
available, `bd3_flex_mask` / `block_causal_flex_mask` give the same structure as a sparse
BlockMask; the model dispatches on the mask's type. `use_flex(backend, device)` decides: "auto"
takes Flex on CUDA (compiled kernels that skip empty tiles) and SDPA on CPU (where Flex runs an
unfused reference implementation and is slower).

A block size that does not divide the sequence length is rejected (DLMError) rather than padded:
padding would put tokens of no sequence in the last block and change what is scored.
"""

from __future__ import annotations

import functools

import torch

from dlm.errors import DLMError


def check_block_size(seq_len: int, block_size: int) -> int:
    """Number of blocks; DLMError unless block_size divides seq_len."""
    if block_size < 1 or seq_len % block_size:
        raise DLMError(f"block size {block_size} does not divide the sequence length {seq_len}; "
                       f"choose a --block-size that divides --seq-len (or a --seq-len that is a multiple of it)")
    return seq_len // block_size


def block_ids(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    return torch.arange(seq_len, device=device) // block_size


@functools.lru_cache(maxsize=64)
def bd3_training_mask(seq_len: int, block_size: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """(2L, 2L) mask over cat(x_t, x0) for BD3-LM training."""
    check_block_size(seq_len, block_size)
    b = block_ids(seq_len, block_size, device)
    q, k = b[:, None], b[None, :]
    top = torch.cat([q == k, k < q], dim=1)  # noisy queries: own noisy block | earlier clean blocks
    bottom = torch.cat([torch.zeros_like(q == k), k <= q], dim=1)  # clean queries: clean, block-causal
    return torch.cat([top, bottom], dim=0)


@functools.lru_cache(maxsize=64)
def block_causal_mask(seq_len: int, block_size: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """(L, L): block b sees blocks <= b (E2D2 encoder; the clean half of BD3-LM)."""
    check_block_size(seq_len, block_size)
    b = block_ids(seq_len, block_size, device)
    return b[None, :] <= b[:, None]


@functools.lru_cache(maxsize=64)
def e2d2_decoder_mask(seq_len: int, block_size: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """(L, 2L) over keys [encoder states ; own noisy states]: earlier blocks' encoder states, own block."""
    check_block_size(seq_len, block_size)
    b = block_ids(seq_len, block_size, device)
    q, k = b[:, None], b[None, :]
    return torch.cat([k < q, k == q], dim=1)


def bd3_training_mask_reference(seq_len: int, block_size: int) -> torch.Tensor:
    n = 2 * seq_len
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            qi_noisy, kj_noisy = i < seq_len, j < seq_len
            bq, bk = (i % seq_len) // block_size, (j % seq_len) // block_size
            if qi_noisy and kj_noisy:
                m[i, j] = bq == bk
            elif qi_noisy and not kj_noisy:
                m[i, j] = bk < bq
            elif not qi_noisy and not kj_noisy:
                m[i, j] = bk <= bq
    return m


def e2d2_decoder_mask_reference(seq_len: int, block_size: int) -> torch.Tensor:
    m = torch.zeros(seq_len, 2 * seq_len, dtype=torch.bool)
    for i in range(seq_len):
        for j in range(2 * seq_len):
            bq, bk = i // block_size, (j % seq_len) // block_size
            m[i, j] = bk < bq if j < seq_len else bk == bq
    return m


# ------------------------------------------------------------------ FlexAttention versions
def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


def use_flex(backend: str, device: torch.device) -> bool:
    if backend == "sdpa":
        return False
    if backend == "flex":
        if not flex_available():
            raise DLMError("attention_backend 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
        if torch.device(device).type == "cpu" and torch.is_grad_enabled():
            raise DLMError("FlexAttention has no backward pass on CPU; train with --attention-backend sdpa "
                           "(or auto), flex works on CPU for inference only")
        return True
    return flex_available() and torch.device(device).type == "cuda"


@functools.lru_cache(maxsize=64)
def bd3_flex_mask(seq_len: int, block_size: int, device: torch.device = torch.device("cpu")):
    """bd3_training_mask as a FlexAttention BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask

    check_block_size(seq_len, block_size)
    L = seq_len

    def mask_mod(b, h, q, k):
        q_noisy, k_noisy = q < L, k < L
        bq = torch.where(q_noisy, q, q - L) // block_size
        bk = torch.where(k_noisy, k, k - L) // block_size
        return ((q_noisy & k_noisy & (bq == bk)) | (q_noisy & ~k_noisy & (bk < bq))
                | (~q_noisy & ~k_noisy & (bk <= bq)))

    return create_block_mask(mask_mod, None, None, 2 * L, 2 * L, device=str(device))


@functools.lru_cache(maxsize=64)
def block_causal_flex_mask(seq_len: int, block_size: int, device: torch.device = torch.device("cpu")):
    from torch.nn.attention.flex_attention import create_block_mask

    check_block_size(seq_len, block_size)

    def mask_mod(b, h, q, k):
        return k // block_size <= q // block_size

    return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=str(device))


def dense_as_flex_mask(mask: torch.Tensor, q_len: int):
    """A dense boolean mask, (Lq, Lk) or (B, 1, Lq | 1, Lk) (a key-padding mask broadcast over the
    queries), as a FlexAttention BlockMask of the same pattern for `q_len` queries: the
    decoder's cached steps on CUDA, where Flex skips the tiles in which no query may attend (the
    padding of the shorter caches in a batch). Every query row must allow some key (Flex gives
    zeros for an empty row, SDPA NaN; the decoder's masks always let a query see itself)."""
    from torch.nn.attention.flex_attention import create_block_mask

    m = mask if mask.dim() == 4 else mask[None, None]
    B, Lk = m.shape[0], m.shape[-1]
    rows = m[:, 0]  # (B, Lq | 1, Lk): the decoder's masks are the same for every head
    one_row, one_batch = rows.shape[1] == 1, B == 1  # broadcast dimensions: index 0 there

    def mask_mod(b, h, q, k):
        return rows[0 if one_batch else b, 0 if one_row else q, k]
    return create_block_mask(mask_mod, None if B == 1 else B, None, q_len, Lk, device=str(m.device))
