"""Shared fixtures: a tiny random-init Llama with the real SmolLM2 tokenizer (so the chat
template and data path are the real ones), and one local Ray for the whole session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def smollm2_dir():
    from trainables.model import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer Llama (hidden 32) with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def local_ray():
    import ray

    from search.cluster.connect import connect

    connect(None, num_cpus=2)
    yield ray
    ray.shutdown()
