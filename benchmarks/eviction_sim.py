"""Radix-cache eviction on a long-context QA trace: lru, lfu, slru and kvrag-cost.

Six corpora of 2-4k tokens behind a shared 32-token header; 300 one-off questions of
20-60 tokens (plus a 16-token cached answer) pick their corpus from a Zipf(1) law, so
corpora interleave with a skew; the cache holds 2.5 corpora (7,500 tokens). Every policy
replays the same three seeded traces on SGLang's UnifiedRadixCache (Python TreeCore),
once with stationary popularity and once with the ranking redrawn in three phases.
Reported: prompt tokens prefilled again (not matched in the cache) and the hit rate.
The trace and replay logic live in kvrag.engine_plugin.eviction_sim.

Run: python benchmarks/eviction_sim.py   (about 20 s on two cores, most of it importing SGLang)
"""

from kvrag.engine_plugin.eviction_sim import main

if __name__ == "__main__":
    main()
