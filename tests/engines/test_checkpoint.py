import torch
from transformers import LlamaConfig

from kvrag.bench.gpu_check import LLAMA31_8B
from kvrag.engines.checkpoint import CheckpointSide, KVGeometry


def test_llama31_8b_holds_128_kib_of_bfloat16_kv_per_token():
    kv = KVGeometry.of(LlamaConfig(**LLAMA31_8B))
    assert kv == KVGeometry(layers=32, kv_heads=8, head_dim=128)
    assert kv.bytes_per_token(torch.bfloat16) == 128 * 1024
    assert kv.bytes_per_token_layer(torch.float32) == 2 * 8 * 128 * 4


def test_head_dim_and_kv_heads_default_as_in_transformers():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    config.head_dim, config.num_key_value_heads = None, None
    assert KVGeometry.of(config) == KVGeometry(layers=2, kv_heads=4, head_dim=16)


def test_checkpoint_side_reads_tokenizer_stops_and_geometry(tiny_model_dir, smollm2_tokenizer):
    side = CheckpointSide.load(tiny_model_dir)
    assert side.kv == KVGeometry(layers=2, kv_heads=2, head_dim=16)
    assert smollm2_tokenizer.eos_token_id in side.stop_ids
    assert len(side.tokenizer) == len(smollm2_tokenizer)
