"""Loading and saving models: policy, reference, reward and value, from normal Hugging Face directories.

- `load_tokenizer(path)`: AutoTokenizer with a pad token guaranteed (EOS as a last resort).
- `load_causal_lm(path, lora=...)`: dropout off (docs/reference.md §PPO: dropout off in all models), optional LoRA via peft.
- `load_reward_model(path)`: AutoModelForSequenceClassification with one label; a causal-LM directory gets a fresh
  scalar head initialised N(0, 1/(d_model+1)) (Stiennon et al.), bias 0.
- `frozen_copy(model)`: a frozen second copy (the reference policy without LoRA; with LoRA the reference is the base
  with adapters off, `wrappers.disabled_adapters`).
- `save_pretrained(model, path, tokenizer, merge_lora)`: a directory other tools load unchanged.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)
from transformers import logging as hf_logging

from tether.wrappers import has_adapters


@dataclass
class LoraSettings:
    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = "all-linear"

    @classmethod
    def from_config(cls, cfg) -> LoraSettings:
        return cls(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    return path


def load_tokenizer(path: str | Path):
    """AutoTokenizer, except that a directory whose tokenizer is a plain `tokenizers` file loads as exactly that.

    transformers 5 maps some model types (qwen2 among them) to their own tokenizer class whatever the directory says,
    which silently re-tokenises a custom BPE/word-level tokenizer; the generic fast class keeps it as trained.
    """
    path = check_model_dir(path)
    config_file = path / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class", "") if config_file.exists() else ""
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") and (path / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _config_without_dropout(path: str | Path, **kwargs):
    """The model config with every dropout probability set to 0 (RL needs deterministic log-probs)."""
    config = AutoConfig.from_pretrained(str(path), **kwargs)
    for key, value in list(config.to_dict().items()):
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


def dtype_for(name: str) -> torch.dtype:
    return {"float32": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}[name]


def load_causal_lm(path: str | Path, lora: LoraSettings | None = None, dtype: str = "float32"):
    """A causal LM for training: dropout off, optional LoRA adapters (only they are trainable then)."""
    path = check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), config=_config_without_dropout(path), dtype=dtype_for(dtype))
    return apply_lora(model, lora)


def apply_lora(model, lora: LoraSettings | None, task_type: str = "CAUSAL_LM"):
    if lora is None or lora.r <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules if lora.target_modules == "all-linear" else lora.target_modules.split(",")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        task_type=task_type)
    return get_peft_model(model, config)


def init_score_head(head: torch.nn.Linear, d_model: int, generator: torch.Generator | None = None) -> None:
    """Reward head init N(0, 1/(d_model+1)), bias 0 (Stiennon et al. 2020; docs/reference.md §Reward model)."""
    with torch.no_grad():
        head.weight.normal_(0.0, (1.0 / (d_model + 1)) ** 0.5, generator=generator)
        if head.bias is not None:
            head.bias.zero_()


def load_reward_model(path: str | Path, lora: LoraSettings | None = None, dtype: str = "float32"):
    """A scalar reward (or value) model. A causal-LM directory gets a new head; a saved RM loads as it is."""
    path = check_model_dir(path)
    config = _config_without_dropout(path, num_labels=1)
    is_rm = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    tok = load_tokenizer(path)
    config.pad_token_id = tok.pad_token_id
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a causal-LM dir has no score head yet: that is expected, not news
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), config=config, dtype=dtype_for(dtype))
    finally:
        hf_logging.set_verbosity(verbosity)
    if not is_rm:
        init_score_head(model.score, config.hidden_size)
    return apply_lora(model, lora, task_type="SEQ_CLS")


def frozen_copy(model):
    """A frozen, eval-mode deep copy (the reference policy when there is no LoRA)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def save_pretrained(model, path: str | Path, tokenizer=None, merge_lora: bool = True) -> Path:
    """Save a normal HF directory (safetensors); LoRA is merged into a copy unless merge_lora=False."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if has_adapters(model) and merge_lora:
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
