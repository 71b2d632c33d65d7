"""Targets for the ``model`` config nodes (``conf/model/*.yaml``) and the draft-model node.

Each function's signature is the schema of its YAML node: unknown keys are errors.
No Hydra or W&B here.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

__all__ = ["LoadedModel", "load_target", "load_draft", "tiny_random", "byte_tokenizer"]


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: object


def load_target(
    name_or_path: str,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | None = None,
    cache_dir: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a target (model, tokenizer) with :func:`specdec.load_model`.

    Args:
        name_or_path: packaged short name (``smollm2-135m``, ``gemma3-270m``, ``qwen2.5-coder-0.5b``),
            a local HF folder or a hub id.
        dtype: torch dtype name of the weights (``float32``, ``bfloat16``, ``float16``).
        device: where the model goes (ignored when ``device_map`` is set).
        device_map: accelerate placement for large targets, e.g. ``auto`` (spreads over GPUs / CPU).
        cache_dir: where packaged models are converted once (default ``~/.cache/specdec/models``).
        revision, trust_remote_code: passed to ``from_pretrained`` when set.
    """
    from specdec import load_model

    kwargs = {}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if revision is not None:
        kwargs["revision"] = revision
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    model, tok = load_model(name_or_path, dtype=dtype, device=device, cache_dir=cache_dir, **kwargs)
    return LoadedModel(model, tok)


def load_draft(name_or_path: str, dtype: str = "float32", device: str = "cpu", cache_dir: str | None = None):
    """The draft model alone (for ``drafters.DraftModel(model=...)``); same loading as the target."""
    return load_target(name_or_path, dtype=dtype, device=device, cache_dir=cache_dir).model


# A prompt-format template for the byte tokenizer (role markers are plain text).
_BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character map, as a list indexed by byte value."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


@functools.lru_cache(maxsize=None)
def byte_tokenizer():
    """A fully offline byte-level tokenizer: ids 0-255 are bytes, then ``<pad>``, ``<s>``, ``</s>``.

    No hub, no files: it pairs with :func:`tiny_random` so that tests and smoke runs need nothing
    downloaded. It has a chat template, so multi-turn prompts go through the same code path as
    real models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = _BYTE_CHAT_TEMPLATE
    return tok


def tiny_random(
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    device: str = "cpu",
) -> LoadedModel:
    """A tiny random-weight causal LM with the offline :func:`byte_tokenizer` (vocab 259).

    For smoke tests and CI: everything is built from a config, nothing is downloaded. Acceptance
    numbers from a random model mean nothing; the plumbing is what it exercises.
    """
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        from transformers import LlamaConfig as Cfg
    elif arch == "qwen2":
        from transformers import Qwen2Config as Cfg
    elif arch == "mistral":
        from transformers import MistralConfig as Cfg
    else:
        raise ValueError(f"tiny_random arch must be one of llama, qwen2, mistral; got {arch!r}")
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(Cfg(**common), dtype=torch.float32).eval()
        with torch.no_grad():  # random logits are near-uniform; sharpen so greedy choices are separated
            model.get_output_embeddings().weight.mul_(4.0)
    return LoadedModel(model.to(device), tok)
