"""The fewest prompt tokens any eviction policy can recompute on a trace (Belady's MIN).

The cache model is the replay's: a request needs its whole prompt + answer in the cache
while it runs, tokens it finds there (a prefix of its prompt) are not recomputed, and the
cache holds at most ``capacity`` tokens between requests.

Tokens, not nodes, are the unit: a token is a position in the prefix tree of the whole
trace (the token and everything before it), and costs one recomputation when a request
needs it and it is not cached. With unit sizes and unit costs, evicting the token whose
next use is furthest in the future is optimal (Belady's MIN; its exchange argument holds
when a request needs a set of tokens at once, by never evicting the current request's
own). The set MIN keeps is prefix-closed: a token is used only by requests that use all
its ancestors, so its next use is never sooner than theirs, and ties go to the deeper
token first. Every cached token is then a matched one, so the result is exact for a
cache that may evict any suffix of a node, and a lower bound for SGLang, whose tree
evicts whole leaf nodes.

Tokens that every later request uses together (an edge of the trace's prefix tree)
always share their next use, so they are handled as one segment and evicted in part.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

Request = tuple[list[int], list[int]]  # (prompt, answer) token ids
NEVER = float("inf")


@dataclass
class _Segment:
    size: int
    depth: int  # tokens above it
    uses: list[int] = field(default_factory=list)  # request indices, ascending
    held: int = 0  # cached tokens: always the segment's first ``held``


def _segments(trace: Sequence[Request]) -> tuple[list[_Segment], list[list[tuple[int, int]]]]:
    """The trace's segments, and per request its path as (segment, offset in the request)."""
    node_of: dict[tuple[int, int], int] = {}  # (parent token node, token id) -> token node
    paths = []
    for prompt, answer in trace:
        parent, path = -1, []
        for token in prompt + answer:
            parent = node_of.setdefault((parent, token), len(node_of))
            path.append(parent)
        paths.append(path)
    users = [0] * len(node_of)
    for path in paths:
        for node in path:
            users[node] += 1
    # A token starts a new segment where the number of requests through it changes: a
    # child is used by a subset of its parent's requests, so equal counts mean equal sets.
    start_of: dict[int, int] = {}  # first token node of a segment -> segment index
    segments: list[_Segment] = []
    routes = []
    for i, path in enumerate(paths):
        route: list[tuple[int, int]] = []
        for offset, node in enumerate(path):
            if offset and users[node] == users[path[offset - 1]]:
                continue
            if node not in start_of:
                end = offset + 1
                while end < len(path) and users[path[end]] == users[node]:
                    end += 1
                start_of[node] = len(segments)
                segments.append(_Segment(size=end - offset, depth=offset))
            segment = start_of[node]
            segments[segment].uses.append(i)
            route.append((segment, offset))
        routes.append(route)
    return segments, routes


def optimal_matched(trace: Sequence[Request], capacity: int) -> int:
    """Prompt tokens found in the cache over ``trace`` under Belady's MIN (the most possible)."""
    segments, routes = _segments(trace)
    next_use = [0] * len(segments)  # index into a segment's ``uses`` of its next use
    held_total = 0
    heap: list[tuple[float, int, int]] = []  # (-next use, -depth, segment), lazily updated
    matched = 0
    for (prompt, answer), route in zip(trace, routes, strict=True):
        needed = len(prompt) + len(answer)
        if needed > capacity:
            raise ValueError(f"a {needed}-token request does not fit a {capacity}-token "
                             f"cache; give the cache more tokens")
        for segment, offset in route:
            if offset >= len(prompt):
                break
            seg = segments[segment]
            # Cached tokens are a prefix of the path, so the first gap ends the match.
            found = min(seg.held, len(prompt) - offset)
            matched += found
            if found < min(seg.size, len(prompt) - offset):
                break
        for segment, _ in route:
            seg = segments[segment]
            held_total += seg.size - seg.held
            seg.held = seg.size
            next_use[segment] += 1
            upcoming = seg.uses[next_use[segment]] if next_use[segment] < len(seg.uses) \
                else NEVER
            heapq.heappush(heap, (-upcoming, -seg.depth, segment))
        in_request = {segment for segment, _ in route}
        deferred = []
        while held_total > capacity:
            neg_next, neg_depth, segment = heapq.heappop(heap)
            seg = segments[segment]
            upcoming = seg.uses[next_use[segment]] if next_use[segment] < len(seg.uses) \
                else NEVER
            if seg.held == 0 or -neg_next != upcoming:
                continue  # stale entry
            if segment in in_request:
                deferred.append((neg_next, neg_depth, segment))
                continue
            freed = min(seg.held, held_total - capacity)
            seg.held -= freed
            held_total -= freed
            if seg.held:
                heapq.heappush(heap, (neg_next, neg_depth, segment))
        for entry in deferred:
            heapq.heappush(heap, entry)
    return matched
