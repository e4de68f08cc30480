"""When a request stops, and what its output is: max_new_tokens; EOS (nothing after it is
output); stop token sequences (the earliest occurrence of any of them, whatever their order).

A request stops as soon as its *decided prefix* (the answer before its first still-masked
position) fixes the output, even mid-block: EOS or a stop sequence in it, with nothing undecided
that could move the cut.
"""

from __future__ import annotations

from typing import Sequence


def find(seq: list[int], sub: list[int]) -> int:
    """The first index of `sub` in `seq`, or -1."""
    n = len(sub)
    for i in range(len(seq) - n + 1):
        if seq[i : i + n] == sub:
            return i
    return -1


def cut_output(tokens: list[int], config, eos_id: int) -> tuple[list[int], str]:
    """The output: tokens before EOS or the first stop sequence, and why it ended."""
    end, reason = len(tokens), "length"
    if config.stop_at_eos and eos_id in tokens:
        end, reason = tokens.index(eos_id), "stop"
    text = tokens[:end]
    for s in config.stop:  # the earliest occurrence of any of them, whatever their order
        i = find(text, list(s))
        if 0 <= i < end:
            end, reason = i, "stop"
    return tokens[:end], reason


def decided(tokens: Sequence[int], config, eos_id: int, mask_id: int) -> bool:
    """Is the output already fixed by the prefix of `tokens` before the first MASK? It is when
    that prefix holds EOS or a stop sequence and every stop sequence that could start before the
    cut lies inside the prefix (so no undecided token can move the cut)."""
    tokens = list(tokens)
    if mask_id in tokens:  # only a decided prefix can stop the request
        tokens = tokens[: tokens.index(mask_id)]
    out, reason = cut_output(tokens, config, eos_id)
    if reason != "stop":
        return False
    longest = max((len(s) for s in config.stop), default=1)
    return len(out) + longest - 1 <= len(tokens)
