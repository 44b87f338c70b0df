"""Greedy generation with HF transformers, with real KV-cache compression.

Compression is question-aware by default, as in SnapKV: the question is part of the
prefill, so its keys and values, and the first answer token, are computed with the whole
context before the documents' cache is compressed. A ``once:`` spec is question-agnostic
(kvpress's setting): the corpus prefix (system turn, header, documents) is prefilled and
compressed once per corpus, and each question extends a copy of that compressed cache
with its own tokens at their logical positions. Compressed corpora are kept for every
``once:`` system asked about the same corpus, and dropped when a question over another
corpus arrives (the comparison runner groups questions by corpus). With ``+recall`` the
corpus's evicted entries are kept in host memory and each question brings back the spans
its queries ask for (``compression/recall.py``, the definition the SGLang plugin serves).

After the prefill of the whole prompt, a compression spec physically shrinks every
layer's cache to the kept tokens (per KV head), and decoding continues from it at the
original positions. The last prefill is kept, so every system asked about the same
prompt (full, snapkv:0.5, streamingllm:0.5, ...) one after the other pays for one prefill,
not one each; the comparison runner orders its work question by question for that, and
drops the prefill (``release``) once the question's last system is served. A full-cache
answer decodes over that prefill in place and crops it back afterwards, so no second
full copy is ever held.

An answer's ``kv_bytes`` are the storage bytes of the cache tensors its decode starts
from; on CUDA it also records the peak memory the process allocated while answering.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from kvrag.compression import CompressionSpec, kept_positions
from kvrag.compression.capabilities import check_queries
from kvrag.compression.kvzip import RepeatTokens
from kvrag.compression.recall import HostStore, recall_indices
from kvrag.compression.select import PAD, kept_counts
from kvrag.compression.sentences import sentence_ends_for
from kvrag.compression.spec import RECALL_WINDOW
from kvrag.data.prompt import Prompt
from kvrag.engines import hf_attention
from kvrag.engines.base import Cost, Generation
from kvrag.engines.chat import EncodedPrompt, TokenizerMethods, stop_ids
from kvrag.engines.checkpoint import KVGeometry
from kvrag.engines.reconstruction import reconstruction_scores

K = TypeVar("K")


@dataclass
class Prefill:
    """One prompt's prefill: its cache, every layer's queries, and the first-token logits."""

    ids: tuple[int, ...]
    cache: DynamicCache
    queries: dict[int, torch.Tensor]
    last_logits: torch.Tensor
    seconds: float


@dataclass(frozen=True)
class CompressedCache:
    cache: DynamicCache
    kept: list[torch.Tensor]  # per layer, [kv_heads, n_kept] original token indices
    seconds: float
    # per layer, bool [kv_heads, width]: the entries each head really holds, where heads
    # keep different counts (heads=ranked) and every layer is padded to one width
    valid: list[torch.Tensor] | None = None
    host: HostStore | None = None  # +recall: the evicted entries, in host memory

    @property
    def slots(self) -> int:
        """Kept entries per KV head, summed over layers (padding not counted)."""
        return sum(int(kept_counts(idx).sum()) // idx.shape[0] for idx in self.kept)


@dataclass(frozen=True)
class _Start:
    """A cache ready for decoding, the logits of the first answer token, and its cost."""

    cache: DynamicCache
    logits: torch.Tensor
    slots: int  # KV entries held over all layers
    in_place: bool  # the cache is the shared prefill's: crop it back after decoding
    head_valid: list[torch.Tensor] | None  # CompressedCache.valid
    prefill_s: float
    compress_s: float
    prefill_tokens: int
    shared_kv_tokens: float
    recall: _Recalled | None = None


@dataclass
class _Recalled:
    """What a ``+recall`` question brought back: per layer, indices into the corpus's
    host store, and the seconds choosing and copying them took."""

    indices: list[torch.Tensor]
    seconds: float
    host: HostStore

    @property
    def tokens(self) -> int:
        return int(self.indices[0].numel())


def copy_cache(cache: DynamicCache) -> DynamicCache:
    out = DynamicCache()
    for layer, entry in enumerate(cache.layers):
        out.update(entry.keys.clone(), entry.values.clone(), layer)
    return out


def cache_bytes(cache: DynamicCache) -> int:
    """Storage bytes of every layer's key and value tensors (views counted whole)."""
    return sum(t.untyped_storage().nbytes() for layer in cache.layers
               for t in (layer.keys, layer.values))


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Cut every layer back to its first ``length`` tokens, freeing the decoded ones (a
    slice would keep their storage alive), one layer at a time."""
    for layer in cache.layers:
        if layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :].clone()
            layer.values = layer.values[..., :length, :].clone()


def gather_cache(cache: DynamicCache, kept: list[torch.Tensor]) -> DynamicCache:
    """A new cache of each layer's ``kept[layer]`` [kv_heads, k] positions (differentiable;
    a ``PAD`` entry holds a copy of position 0, which ``pad_kept``'s mask hides)."""
    out = DynamicCache()
    for layer, idx in enumerate(kept):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values  # [1, h, n, d]
        gather = idx.clamp(min=0)[None, :, :, None].expand(-1, -1, -1, keys.shape[-1])
        out.update(keys.gather(2, gather), values.gather(2, gather), layer)
    return out


def pad_kept(kept: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Ranked kept sets (rows ending in ``PAD``) padded to one width for every layer, since
    transformers builds one attention mask for all layers, and which entries are real;
    kept sets without padding are returned as they are, with None."""
    if not any(bool((idx == PAD).any()) for idx in kept):
        return kept, None
    width = max(idx.shape[1] for idx in kept)
    padded = [torch.nn.functional.pad(idx, (0, width - idx.shape[1]), value=PAD)
              for idx in kept]
    return padded, [idx != PAD for idx in padded]


class HFEngine(TokenizerMethods):
    name = "hf"

    def __init__(
        self, model_path: str | Path, dtype: torch.dtype = torch.float32,
        capture_queries: int | None = 64, adapter: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        """``capture_queries``: how many of the prompt's last queries each prefill keeps for
        the scoring methods (64 serves snapkv, pyramidkv and tova; None keeps all, for h2o).
        ``adapter``: a PEFT LoRA directory, merged into the weights for decoding speed.
        ``device``, ``dtype``: where the weights, the cache and every input live.
        """
        model_path = Path(model_path)
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, attn_implementation=hf_attention.NAME
        ).to(torch.device(device))
        name = model_path.name
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
            name = f"{name}+{Path(adapter).name}"
        self._setup(model, AutoTokenizer.from_pretrained(model_path), name, capture_queries,
                    model_path)

    @classmethod
    def of_model(cls, model, name: str, tokenizer=None,
                 capture_queries: int | None = 64) -> HFEngine:
        """An engine over a model already built where it runs (with
        ``attn_implementation="kvrag"``): a random-weight one for benchmarks, say. Without
        a tokenizer it answers token ids only (``generate_ids``)."""
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, name, capture_queries)
        return engine

    def _setup(self, model, tokenizer, name: str, capture_queries: int | None,
               model_path: Path | None = None) -> None:
        self.model = model.eval()
        self.device = model.device
        self.dtype = model.dtype
        self.model_path = model_path
        self.model_name = name
        self.tokenizer = tokenizer
        self.stop_ids = (stop_ids(tokenizer, model.generation_config.eos_token_id)
                         if tokenizer is not None else set())
        kv = KVGeometry.of(model.config)
        self.n_layers = kv.layers
        self.kv_bytes_per_token_layer = kv.bytes_per_token_layer(self.dtype)
        self.capture_queries = capture_queries
        self._last: Prefill | None = None
        self.retried_alone = 0
        # (corpus prefix ids, spec name) -> its compressed cache, for once: specs
        self._once: dict[tuple[tuple[int, ...], str], CompressedCache] = {}

    def release(self) -> None:
        """Drop the kept prefill: the systems asking about its prompt are done."""
        self._last = None

    def close(self) -> None:
        self._last = None
        self._once.clear()

    def generate_many(
        self, jobs: Iterable[tuple[K, Prompt, CompressionSpec | None]], max_new_tokens: int,
        concurrency: int = 1,
    ) -> Iterator[tuple[K, Generation]]:
        """One answer at a time, whatever ``concurrency``: HF transformers does not batch
        requests here."""
        for key, prompt, compression in jobs:
            yield key, self.generate(prompt, max_new_tokens, compression)

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> Prefill:
        """Prefill ``ids``, or reuse the last prefill if it was of the same ids."""
        key = tuple(ids)
        if self._last is not None and self._last.ids == key:
            return self._last
        self._last = None  # free the previous prompt's cache before building the next
        self._last = self._prefill(ids)
        return self._last

    def _prefill(self, ids: list[int]) -> Prefill:
        hooks = hf_attention.AttentionHooks(captured={}, capture_last=self.capture_queries)
        t0 = time.perf_counter()
        with hf_attention.attention_hooks(hooks):
            out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True,
                             logits_to_keep=1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        assert hooks.captured is not None
        return Prefill(tuple(ids), out.past_key_values, hooks.captured, out.logits[0, -1],
                       seconds)

    def compress(
        self, pre: Prefill, span: tuple[int, int], spec: CompressionSpec | None
    ) -> CompressedCache:
        """A new cache holding, per layer and KV head, only the tokens ``spec`` keeps.

        Without a spec (or for dynamic methods) the cache is copied whole. Heads keeping
        different counts (``heads=ranked``) are padded to one width and masked.
        """
        t0 = time.perf_counter()
        n = len(pre.ids)
        method = spec.build() if spec is not None else None
        if method is None or method.dynamic:
            kv_heads = pre.cache.layers[0].keys.shape[1]
            kept = [torch.arange(n, device=self.device).expand(kv_heads, -1)] * self.n_layers
        else:
            assert spec is not None
            check_queries(spec, pre.queries[0].shape[1], n, "the engine",
                          "create HFEngine(capture_queries=None)")
            rebuilt = (reconstruction_scores(self.model, pre.cache, pre.ids, span, method,
                                             RepeatTokens.of(self.tokenizer))
                       if method.reconstruction else None)
            kept = kept_positions(
                spec, [pre.cache.layers[layer].keys[0] for layer in range(self.n_layers)],
                [pre.queries[layer] for layer in range(self.n_layers)], span,
                reconstruction=rebuilt,
                sentence_ends=sentence_ends_for(spec, pre.ids, self.tokenizer))
        padded, valid = pad_kept(kept)
        cache = gather_cache(pre.cache, padded)
        host = None
        if spec is not None and spec.recall is not None:
            host = HostStore.of([layer.keys[0] for layer in pre.cache.layers],
                                [layer.values[0] for layer in pre.cache.layers], kept, n)
        return CompressedCache(cache, kept, time.perf_counter() - t0, valid, host)

    def generate(
        self, prompt: Prompt, max_new_tokens: int, compression: CompressionSpec | None = None,
        ignore_eos: bool = False,
    ) -> Generation:
        """Greedy answer; ``ignore_eos`` decodes all ``max_new_tokens`` (for benchmarks)."""
        enc = self.encode(prompt)
        asked = compression
        if compression is not None and compression.keeps_all(enc.context_end
                                                             - enc.context_start):
            compression = None  # nothing to evict: the full cache answers, as on SGLang
        new, cost = self.generate_ids(enc, max_new_tokens, compression, ignore_eos)
        cost = replace(cost, served_uncompressed=asked is not None and compression is None)
        return Generation(self.tokenizer.decode(new, skip_special_tokens=True), cost,
                          truncated=len(new) == max_new_tokens)

    @torch.inference_mode()
    def generate_ids(
        self, enc: EncodedPrompt, max_new_tokens: int,
        compression: CompressionSpec | None = None, ignore_eos: bool = False,
    ) -> tuple[list[int], Cost]:
        """The greedy tokens and their cost, with ``compression`` applied as given (also
        where it keeps every document token: the compressed path then copies the cache)."""
        n_doc = enc.context_end - enc.context_start
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        once = compression is not None and compression.once
        start = self._start_once(enc, compression) if once else self._start(enc, compression)
        cache = start.cache
        held = cache_bytes(cache)
        hooks = hf_attention.AttentionHooks(head_valid=start.head_valid)
        kv_tokens = start.slots / self.n_layers
        attended = kv_tokens
        if compression is not None and compression.build().dynamic:
            hooks.retrieval = (enc.span, compression.kept(n_doc))
            attended = kv_tokens - n_doc + compression.kept(n_doc)
        t1 = time.perf_counter()
        try:
            new = self._decode(cache, start.logits, len(enc.input_ids), max_new_tokens,
                               set() if ignore_eos else self.stop_ids, hooks)
        finally:
            if start.in_place:
                crop_cache(cache, len(enc.input_ids))
        if cuda:
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        cost = Cost(
            prompt_tokens=len(enc.input_ids), kv_tokens=kv_tokens, kv_bytes=held,
            prefill_s=start.prefill_s, compress_s=start.compress_s, decode_s=t2 - t1,
            new_tokens=len(new), attended_tokens=attended, doc_tokens=n_doc,
            prefill_tokens=start.prefill_tokens, shared_kv_tokens=start.shared_kv_tokens,
            layer_mean_kv_tokens=kv_tokens,
            peak_bytes=int(torch.cuda.max_memory_allocated(self.device)) if cuda else None,
            **({} if start.recall is None else {
                "recalled_tokens": float(start.recall.tokens),
                "recall_s": start.recall.seconds, "host_kv_bytes": start.recall.host.nbytes}),
        )
        return new, cost

    def _decode(self, cache: DynamicCache, logits: torch.Tensor, position: int,
                max_new_tokens: int, stop_ids: set[int],
                hooks: hf_attention.AttentionHooks) -> list[int]:
        new: list[int] = []
        next_id = int(logits.argmax())
        with hf_attention.attention_hooks(hooks):
            while next_id not in stop_ids and len(new) < max_new_tokens:
                new.append(next_id)
                if len(new) == max_new_tokens:
                    break
                out = self.model(input_ids=torch.tensor([[next_id]], device=self.device),
                                 position_ids=torch.tensor([[position]], device=self.device),
                                 past_key_values=cache, use_cache=True)
                position += 1
                next_id = int(out.logits[0, -1].argmax())
        return new

    def _start(self, enc: EncodedPrompt, spec: CompressionSpec | None) -> _Start:
        """The whole prompt prefilled (or the last prefill reused), then compressed; a
        full cache (or a dynamic method's, which keeps it whole) is the prefill's own."""
        pre = self.prefill(enc.input_ids)
        n = len(enc.input_ids)
        if spec is None or spec.build().dynamic:
            return _Start(pre.cache, pre.last_logits, n * self.n_layers, True, None,
                          pre.seconds, 0.0, n, float(enc.context_end))
        compressed = self.compress(pre, enc.span, spec)
        return _Start(compressed.cache, pre.last_logits, compressed.slots, False,
                      compressed.valid, pre.seconds, compressed.seconds, n, 0.0)

    def _start_once(self, enc: EncodedPrompt, spec: CompressionSpec) -> _Start:
        """The corpus prefix's compressed cache (built on first use), extended with a copy
        of this question's own tokens at their logical positions."""
        end = enc.context_end
        ids = enc.input_ids
        key = (tuple(ids[:end]), spec.name)
        corpus = self._once.get(key)
        built = corpus is None
        prefill_s = compress_s = 0.0
        if corpus is None:
            if any(k[0] != key[0] for k in self._once):
                self._once.clear()  # a new corpus: the previous one's questions are done
            pre = self._prefill(ids[:end])
            corpus = self._once[key] = self.compress(pre, enc.span, spec)
            prefill_s, compress_s = pre.seconds, corpus.seconds
            del pre
        question = ids[end:]
        t0 = time.perf_counter()
        cache, logits, captured = self._extend(copy_cache(corpus.cache), question, end,
                                               corpus.valid, spec.recall is not None)
        prefill_s += time.perf_counter() - t0
        kept = corpus.slots
        recalled = None
        if spec.recall is not None:
            reprefill = spec.recall.reprefill
            recalled, cache = self._recall(enc, spec, corpus, cache, captured, reprefill)
            if reprefill:
                t1 = time.perf_counter()
                cache, logits, _ = self._extend(cache, question, end, None, False)
                prefill_s += time.perf_counter() - t1
        slots = kept + (len(question) + (recalled.tokens if recalled else 0)) * self.n_layers
        prefilled = len(question) * (2 if recalled is not None and spec.recall.reprefill else 1)
        return _Start(cache, logits, slots, False, corpus.valid, prefill_s, compress_s,
                      prefilled + (end if built else 0), kept / self.n_layers, recalled)

    def _extend(self, cache: DynamicCache, tokens: list[int], position: int,
                head_valid: list[torch.Tensor] | None, capture: bool,
                ) -> tuple[DynamicCache, torch.Tensor, dict[int, torch.Tensor] | None]:
        """``tokens`` run over ``cache`` at logical positions from ``position``: the cache,
        the last token's logits, and (``capture``) every layer's last queries."""
        # one forward when every layer holds as many tokens (the mask is built for layer 0's
        # length); token by token under per-layer budgets (PyramidKV)
        even = len({layer.keys.shape[2] for layer in cache.layers}) == 1
        steps = [tokens] if even else [[t] for t in tokens]
        hooks = hf_attention.AttentionHooks(head_valid=head_valid,
                                            captured={} if capture else None,
                                            capture_last=RECALL_WINDOW)
        with hf_attention.attention_hooks(hooks):
            for step in steps:
                out = self.model(input_ids=torch.tensor([step], device=self.device),
                                 position_ids=torch.arange(position, position + len(step),
                                                           device=self.device)[None],
                                 past_key_values=cache, use_cache=True, logits_to_keep=1)
                position += len(step)
        return cache, out.logits[0, -1], hooks.captured

    def _recall(self, enc: EncodedPrompt, spec: CompressionSpec, corpus: CompressedCache,
                cache: DynamicCache, captured: dict[int, torch.Tensor], reprefill: bool,
                ) -> tuple[_Recalled, DynamicCache]:
        """Which evicted corpus entries the question's queries bring back, and a new cache
        holding them after the kept corpus (``reprefill``: the question runs again over
        it) or after the question's first prefill (attention does not depend on the
        order of the entries; their keys carry their positions)."""
        assert corpus.host is not None
        t0 = time.perf_counter()
        k = corpus.cache.layers[0].keys.shape[2]
        indices = recall_indices(
            spec, [captured[layer] for layer in range(self.n_layers)],
            [layer.keys[0, :, :k] for layer in cache.layers],
            [layer.keys[0, :, k:] for layer in cache.layers], corpus.host, enc.span)
        out = DynamicCache()
        base = corpus.cache if reprefill else cache
        for layer, idx in enumerate(indices):
            keys, values = corpus.host.fetch(layer, idx, self.device, self.dtype)
            out.update(torch.cat([base.layers[layer].keys, keys.transpose(0, 1)[None]], 2),
                       torch.cat([base.layers[layer].values, values.transpose(0, 1)[None]], 2),
                       layer)
        return _Recalled(indices, time.perf_counter() - t0, corpus.host), out
