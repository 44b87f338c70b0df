"""KV-cache compression methods as pure tensor code: score tokens, select what to keep.

Both engines (HF and the SGLang plugin) and compression-aware training hand every method
the same inputs, so they keep the same tokens for the same prompt and spec; where each of
them can run a spec is ``capabilities.check``.
"""

from kvrag.compression import (  # noqa: F401  (each module registers its method)
    h2o,
    knorm,
    kvzip,
    pyramidkv,
    random_press,
    retrieval,
    snapkv,
    streamingllm,
    tova,
)
from kvrag.compression.base import METHODS, HeadShard, Method, ScoringInput
from kvrag.compression.select import kept_positions, layer_budgets, select_kept
from kvrag.compression.spec import (
    CompressionSpec,
    SpecError,
    parse_spec,
    queries_needed,
    split_specs,
)

__all__ = ["METHODS", "CompressionSpec", "HeadShard", "Method", "ScoringInput", "SpecError",
           "kept_positions", "layer_budgets", "parse_spec", "queries_needed", "select_kept",
           "split_specs"]
