"""Shared test helpers: tiny random HF models (fixed init) and the real SmolLM2-135M."""

from __future__ import annotations

import functools

import torch

ARCHS = ("llama", "qwen2", "mistral", "gemma3")


def tiny_config(arch: str, vocab: int = 256, layers: int = 2, seed_tag: int = 0):
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    if arch == "mistral":
        from transformers import MistralConfig

        return MistralConfig(**common, sliding_window=None)
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(**common, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
    raise ValueError(arch)


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str = "llama", seed: int = 0, vocab: int = 256, layers: int = 2):
    """A tiny random causal LM in fp32, eval mode, deterministic for (arch, seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1000 * ARCHS.index(arch) + seed if arch in ARCHS else seed)
    cfg = tiny_config(arch, vocab=vocab, layers=layers)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return model


@functools.lru_cache(maxsize=None)
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct in fp32 (packaged offline)."""
    from specdec import load_model

    return load_model("smollm2-135m", dtype=torch.float32)


def hf_greedy(model, ids, max_new_tokens, eos_token_id=None):
    """Reference: transformers' own greedy generate."""
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=0,
        top_k=None,
        top_p=None,
        temperature=None,
    )


def eos_stops_one_row(model, prompt, max_new_tokens: int, at: int = 12):
    """``(eos, reference)`` for a batch of 2 in which row 0 stops early on an EOS: the token row 0 emits at
    step ``at`` becomes the EOS; the reference is specdec's eager AR output with that EOS."""
    import specdec

    ref = specdec.generate(model, prompt, max_new_tokens=max_new_tokens, cuda_graphs=False)
    eos = ref.new_tokens[0][at]
    ref = specdec.generate(model, prompt, max_new_tokens=max_new_tokens, eos_token_id=eos, cuda_graphs=False)
    assert len(ref.new_tokens[0]) != len(ref.new_tokens[1]), "the rows should stop at different steps"
    return eos, ref
