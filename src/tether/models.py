"""Loading and saving models: policy, reference, reward and value, from normal Hugging Face directories.

- `load_tokenizer(path)`: AutoTokenizer with a pad token guaranteed (EOS as a last resort).
- `load_causal_lm(path, lora=...)`: dropout off (REFERENCE.md: "Dropout off in all models"), optional LoRA via peft.
- `load_reward_model(path)`: AutoModelForSequenceClassification with one label; a causal-LM directory gets a fresh
  scalar head initialised N(0, 1/(d_model+1)) (Stiennon et al.), bias 0.
- `frozen_copy(model)` / `disabled_adapters(model)`: the reference policy, as a second copy or (with LoRA) as the
  base weights with adapters switched off, so one copy of the base weights serves both.
- `save_pretrained(model, path, tokenizer, merge_lora)`: a directory other tools load unchanged.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager, nullcontext
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
    """Reward head init N(0, 1/(d_model+1)), bias 0 (Stiennon et al. 2020; REFERENCE.md "Head init")."""
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


def has_adapters(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextmanager
def disabled_adapters(model):
    """Run the LoRA base model with adapters off (the reference policy sharing the policy's base weights)."""
    ctx = model.disable_adapter() if has_adapters(model) else nullcontext()
    with ctx:
        yield model


class AdaptersOff(torch.nn.Module):
    """A module whose forward runs `model` with its LoRA adapters disabled: the shared reference as a model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with disabled_adapters(self.model):
            return self.model(*args, **kwargs)


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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting only real tokens, so left-padded rows start at 0 like unpadded ones."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each row (right or left padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def _hf_model(model):
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if has_adapters(model) else model


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True,
                  padding_free: bool = True, prefix_lengths: torch.Tensor | None = None):
    """(B,) scalar rewards read at the last real token; with `normalize`, the stored gain/bias are applied.

    A reward model's config may carry `reward_gain` and `reward_bias` (set after training so that reference
    responses score mean 0, std 1: REFERENCE.md "Normalization after training"); every consumer goes through here,
    so every consumer sees the same scale. The per-position head output is captured with a hook and gathered at
    `last_token_index`, so padding on either side and a pad id equal to the EOS id are both handled (the model's own
    pooling looks for the rightmost non-pad id, which is wrong when pad == EOS), and DDP/peft wrappers still see a
    normal forward. With `padding_free`, rows are bin-packed when that saves rows (packing.py): same scores; with
    `prefix_lengths` (the real prompt tokens of each row) too, rows with the same prompt share one copy of it.
    """
    from tether import packing

    captured: dict[str, torch.Tensor] = {}
    hf = _hf_model(model)
    hook = hf.score.register_forward_hook(lambda _m, _i, out: captured.update(logits=out))  # (B, T, 1)
    p = packing.plan_for(hf, input_ids, attention_mask, prefix_lengths, padding_free)
    try:
        with packing.attention_for(p, hf):
            model(**packing.forward_inputs(hf, input_ids, attention_mask, p))
    finally:
        hook.remove()
    per_token = captured["logits"] if p is None else packing.unpack(captured["logits"], p)  # (B, T, 1)
    rows = torch.arange(len(input_ids), device=input_ids.device)
    scores = per_token[rows, last_token_index(attention_mask), 0].float()
    if normalize:
        scores = (scores - getattr(hf.config, "reward_bias", 0.0)) * getattr(hf.config, "reward_gain", 1.0)
    return scores


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                 normalize: bool = True, **forward_kwargs) -> torch.Tensor:
    """(B, T) value-head output at every position: the value model of PPO, a reward model read everywhere.

    The trunk (`base_model_prefix`, LoRA layers included) gives hidden states (B, T, d) and the score head maps each
    to a scalar. With `normalize` the stored reward gain/bias are applied as in `reward_scores`, so a value model
    initialised from a reward model starts on the scale of the rewards it has to predict (N+: value from the RM).
    `forward_kwargs` go to the trunk (a flat row's `tether_spans`: packing.py).
    """
    hf = _hf_model(model)
    trunk = getattr(hf, hf.base_model_prefix)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False, **forward_kwargs).last_hidden_state  # (B, T, d)
    values = hf.score(hidden).squeeze(-1).float()  # (B, T)
    if normalize:
        values = (values - getattr(hf.config, "reward_bias", 0.0)) * getattr(hf.config, "reward_gain", 1.0)
    return values
