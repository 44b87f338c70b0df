"""The SGLang plugin: kvrag's attention backend, per-request KV compression in SGLang's pool,
compress-once and the kvrag-cost eviction policy. SGLang loads it in each of its processes
through ``register.py``; the rest of kvrag reads its ``config`` (the benchmarks also its
stats, compress-once and eviction modules)."""
