"""Overlapping windows over token sequences longer than the model: where they start, and which
window each token is read from.

A sequence `<s> t1 ... tn </s>` becomes windows `<s> t[a:b] </s>` of at most `window` tokens; each
window repeats the last `stride` tokens of the one before (transformers' `stride`, the QA pipeline's
`doc_stride`). A token is read from the window where it is most central: the one where its distance
to the nearer window edge is largest (the earlier window on a tie), as BERT's SQuAD code picks a
token's "max context" window. A sequence that fits in one window is that one window, unchanged.
"""
from __future__ import annotations

from .errors import RobertaError


def spans(length: int, room: int, stride: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most `room` tokens covering `length` tokens, consecutive ranges
    sharing `stride` tokens; one range when the tokens fit."""
    if room < 1:
        raise RobertaError(f"a window needs room for at least one token besides <s> and </s>, got {room}")
    if length <= room:
        return [(0, length)]
    if not 0 <= stride < room:
        raise RobertaError(f"stride {stride} must be at least 0 and below the window's {room} text tokens")
    ranges, start = [], 0
    while True:
        stop = min(start + room, length)
        ranges.append((start, stop))
        if stop == length:
            return ranges
        start += room - stride


def most_central(ranges: list[tuple[int, int]], position: int) -> int:
    """Index of the range in which `position` has the most context on its nearer side."""
    best, best_room = 0, -1
    for index, (start, stop) in enumerate(ranges):
        if start <= position < stop:
            room = min(position - start, stop - 1 - position)
            if room > best_room:
                best, best_room = index, room
    return best


def owned(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, stop) of the positions each range is most central for (`most_central` of every
    position, found in one sweep: a position lies in a few neighbouring ranges only). The owners
    rise with the position, so each range owns one run (empty for a range that owns nothing)."""
    runs, first = [], 0
    length = ranges[-1][1]
    candidates = 0  # the first range that still holds the position
    for index in range(len(ranges)):
        stop = first
        while stop < length:
            while ranges[candidates][1] <= stop:
                candidates += 1
            best, best_room = candidates, -1
            for other in range(candidates, len(ranges)):
                start, end = ranges[other]
                if start > stop:
                    break
                room = min(stop - start, end - 1 - stop)
                if room > best_room:
                    best, best_room = other, room
            if best != index:
                break
            stop += 1
        runs.append((first, stop))
        first = stop
    return runs


def split(ids: list[int], window: int, stride: int) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Windows of `ids` (`<s> ... </s>`, the first and last token repeated in each window) and the
    ranges of the inner tokens each window holds."""
    if len(ids) < 2:
        raise RobertaError("a sequence to split into windows needs its <s> and </s>")
    inner = ids[1:-1]
    ranges = spans(len(inner), window - 2, stride)
    return [[ids[0], *inner[a:b], ids[-1]] for a, b in ranges], ranges


def check(window: int | None, stride: int | None, limit: int) -> tuple[int, int] | None:
    """(window, stride) from what the caller gave: None for no windows; `window` defaults to the
    model's `limit`, `stride` to half a window."""
    if window is None and stride is None:
        return None
    window = limit if window is None else window
    if not 3 <= window <= limit:
        raise RobertaError(f"window must be between 3 and the model's {limit} tokens, got {window}")
    stride = (window - 2) // 2 if stride is None else stride
    if not 0 <= stride < window - 2:
        raise RobertaError(f"stride must be at least 0 and below window - 2 = {window - 2}, got {stride}")
    return window, stride
