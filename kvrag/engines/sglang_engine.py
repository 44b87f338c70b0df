"""Greedy generation through the real SGLang engine with the kvrag plugin.

One ``sglang.Engine`` (``--attention-backend kvrag``) serves the whole run; each request
carries its own compression spec and the documents' token span in ``custom_params``, so
every system of a comparison goes through one engine start. Prompts are encoded here
with the same chat template and span logic as the HF engine, and sent as token ids.

Timing comes from streaming: prefill is the time to the first token, decode the rest.
The KV slots and bytes an answer held come from the plugin's report with each response
(``served.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from kvrag.compression import CompressionSpec
from kvrag.data.prompt import Prompt
from kvrag.engine_plugin import config as plugin_config
from kvrag.engines.admission import PrefixAdmission
from kvrag.engines.base import Generation
from kvrag.engines.chat import TokenizerMethods
from kvrag.engines.checkpoint import CheckpointSide
from kvrag.engines.served import Timing, UncompressedError, request_spec, served_cost
from kvrag.extras import require

K = TypeVar("K")


class SGLangEngine(TokenizerMethods):
    name = "sglang"

    def __init__(self, model_path: str | Path, capture_all: bool = False,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 **engine_args) -> None:
        """``capture_all``: keep every prompt query at prefill (h2o needs them).
        ``device`` (``cuda:N`` becomes SGLang's ``base_gpu_id``) and ``dtype`` are the
        model's; the KV cache has the model's dtype. ``engine_args`` go to
        ``sglang.Engine`` over kvrag's defaults (on a CPU a 16,384-token pool in 30% of
        memory; on a GPU SGLang's own sizing)."""
        require("sglang", "the SGLang engine")
        import sglang

        self.model_path = Path(model_path)
        self.model_name = self.model_path.name
        side = CheckpointSide.load(self.model_path)
        self.tokenizer, self.stop_ids = side.tokenizer, side.stop_ids
        self.n_layers = side.kv.layers
        self.kv_bytes_per_token = side.kv.bytes_per_token(dtype)
        self.retried_alone = 0
        env = {plugin_config.ENV_COMPRESSION: "none",
               plugin_config.ENV_CAPTURE: "all" if capture_all else ""}
        where = torch.device(device)
        cuda = where.type == "cuda"
        placement = ({"base_gpu_id": where.index or 0} if cuda
                     else {"max_total_tokens": 16384, "mem_fraction_static": 0.3})
        args = dict(
            model_path=str(self.model_path), attention_backend="kvrag",
            device=where.type, dtype=str(dtype).removeprefix("torch."), disable_cuda_graph=True,
            disable_overlap_schedule=True, skip_tokenizer_init=True, random_seed=0,
            **placement,
        ) | engine_args
        with plugin_config.engine_environ(env):
            self.engine = sglang.Engine(**args)

    def generate(
        self, prompt: Prompt, max_new_tokens: int, compression: CompressionSpec | None = None,
        ignore_eos: bool = False,
    ) -> Generation:
        return self.engine.loop.run_until_complete(
            self._agenerate(prompt, max_new_tokens, compression, ignore_eos))

    def release(self) -> None:
        """Nothing to drop: the server's radix cache keeps prefixes for whoever asks."""

    def generate_many(
        self, jobs: Iterable[tuple[K, Prompt, CompressionSpec | None]], max_new_tokens: int,
        concurrency: int,
    ) -> Iterator[tuple[K, Generation]]:
        """Keep up to ``concurrency`` requests in flight and yield each (key, answer) as it
        lands, in completion order. ``jobs`` is read lazily, a prompt's jobs at a time.

        Jobs with one prompt share its prefill through the radix cache: the others wait
        for the first uncompressed one's first token (``admission.PrefixAdmission``).
        Seconds are per request under that load: time to first token includes queueing.
        A compressed request the plugin could not compact while the KV pool was full is
        asked again alone once the others are done (counted in ``retried_alone``).
        """
        loop = self.engine.loop
        admission = PrefixAdmission(jobs)
        in_flight: dict[asyncio.Task, tuple[K, Prompt, CompressionSpec | None]] = {}
        again: list[tuple[K, Prompt, CompressionSpec | None]] = []

        def top_up() -> None:
            while len(in_flight) < concurrency and (job := admission.next()) is not None:
                def on_first(job=job) -> None:
                    admission.prefilled(job)
                    top_up()

                task = loop.create_task(self._agenerate(job[1], max_new_tokens, job[2],
                                                        on_first=on_first))
                in_flight[task] = job

        top_up()
        try:
            while in_flight:
                done, _ = loop.run_until_complete(
                    asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED))
                for task in done:
                    job = in_flight.pop(task)
                    admission.done(job)  # a failed leader lets its followers go too
                    if isinstance(task.exception(), UncompressedError):
                        again.append(job)
                        continue
                    yield job[0], task.result()
                top_up()
            for key, prompt, compression in again:
                self.retried_alone += 1
                yield key, self.generate(prompt, max_new_tokens, compression)
        finally:
            for task in in_flight:  # an error or a consumer that stopped early
                task.cancel()
            if in_flight:
                loop.run_until_complete(asyncio.gather(*in_flight, return_exceptions=True))

    async def _agenerate(self, prompt: Prompt, max_new_tokens: int,
                         compression: CompressionSpec | None, ignore_eos: bool = False,
                         on_first: Callable[[], None] = lambda: None) -> Generation:
        enc = self.encode(prompt)
        sent = request_spec(enc, compression)
        custom = {plugin_config.PARAM_SPEC: sent.name if sent else "none",
                  plugin_config.PARAM_SPAN: list(enc.span)}
        params = {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                  "ignore_eos": ignore_eos, "custom_params": custom,
                  "stop_token_ids": [] if ignore_eos else sorted(self.stop_ids)}
        t0 = time.perf_counter()
        first = None
        last: dict = {}
        stream = await self.engine.async_generate(input_ids=enc.input_ids,
                                                  sampling_params=params, stream=True)
        async for chunk in stream:
            if first is None:
                first = time.perf_counter()
                on_first()
            last = chunk
        t1 = time.perf_counter()
        meta = last["meta_info"]
        finish = meta.get("finish_reason") or {}
        if finish.get("type") == "abort":
            raise RuntimeError(f"SGLang aborted the request: {finish.get('message')}")
        ids = [i for i in last.get("output_ids", []) if i not in self.stop_ids]
        timing = Timing(prefill_s=(first or t1) - t0, decode_s=t1 - (first or t1))
        cost = served_cost(enc, compression, meta, timing, len(ids), self.kv_bytes_per_token)
        return Generation(self.tokenizer.decode(ids, skip_special_tokens=True), cost,
                          truncated=finish.get("type") == "length")

    def close(self) -> None:
        self.engine.shutdown()
