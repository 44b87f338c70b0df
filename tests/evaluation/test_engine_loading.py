from pathlib import Path

import pytest
import torch

from kvrag.engines.device import Placement
from kvrag.engines.sglang_options import SGLangOptions
from kvrag.evaluation.engine_loading import EngineChoiceError, default_concurrency, load_engine

CPU = Placement(torch.device("cpu"), torch.float32)


def test_default_concurrency_batches_only_where_it_pays():
    gpu = Placement(torch.device("cuda", 0), torch.bfloat16)
    assert [default_concurrency(e, CPU) for e in ("hf", "sglang", "sglang-url")] == [1, 1, 16]
    assert default_concurrency("sglang", gpu) == 16 and default_concurrency("hf", gpu) == 1


@pytest.mark.parametrize("engine", ["sglang", "sglang-url"])
def test_an_adapter_is_refused_off_the_hf_engine(engine, tmp_path):
    with pytest.raises(EngineChoiceError, match="--adapter runs on the hf engine"):
        load_engine(engine, tmp_path, [], Path("adapter"), CPU, SGLangOptions(),
                    "http://127.0.0.1:9", None)


def test_an_unknown_engine_names_the_known_ones(tmp_path):
    with pytest.raises(EngineChoiceError,
                       match="unknown engine 'vllm'; available: hf, sglang, sglang-url"):
        load_engine("vllm", tmp_path, [], None, CPU, SGLangOptions(), None, None)
