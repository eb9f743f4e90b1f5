"""Loading and saving models: policy, reference, reward and value, from normal Hugging Face directories or Hub IDs.

- `load_tokenizer(name)`: AutoTokenizer with a pad token guaranteed (EOS as a last resort).
- `load_causal_lm(name, lora=...)`: dropout off (docs/reference.md §PPO: dropout off in all models), optional LoRA via peft.
- `load_reward_model(name)`: AutoModelForSequenceClassification with one label; a causal-LM directory gets a fresh
  scalar head initialised N(0, 1/(d_model+1)) (Stiennon et al.), bias 0.
- `frozen_copy(model)`: a frozen second copy (the reference policy without LoRA; with LoRA the reference is the base
  with adapters off, `wrappers.disabled_adapters`).
- `save_pretrained(model, path, tokenizer, merge_lora)`: a directory other tools load unchanged.
- `portable_reward_model(model, tokenizer)`: before a reward model is saved, its normalisation moved into the weights
  and a pad token chosen so that transformers' own forward gives tether's score (see its docstring).

A model `name` (the `model=`, `ref_model=`, `value_model=` keys, `rm:NAME` in a reward spec) is, in this order:
- a local directory: a normal HF model directory (config.json), or an unmerged LoRA adapter directory
  (adapter_config.json naming `base_model_name_or_path`, no config.json): the base is loaded (a directory or a Hub
  ID itself, at the adapter's `revision`) and the adapter applied; with lora_r > 0 those adapters are the ones trained
  further, otherwise they are merged and the merged model is fine-tuned in full;
- a Hugging Face Hub ID `org/name`, or `org/name@REVISION` (a branch, tag or commit hash: config values are single
  strings, and a repo ID never holds an `@`), resolved with huggingface_hub.snapshot_download into its cache
  (HF_HUB_CACHE): downloaded when online (config, tokenizer and weight files only), looked up in the cache alone when
  HF_HUB_OFFLINE=1. A local path of the same spelling wins, as in transformers.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants, list_repo_files, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)
from transformers import logging as hf_logging

from tether.wrappers import has_adapters, hf_model


@dataclass
class LoraSettings:
    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = "all-linear"

    @classmethod
    def from_config(cls, cfg) -> LoraSettings:
        return cls(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)


# --- naming a model: a directory, an adapter directory or a Hub ID ---------------------------------------------------
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]  # config, tokenizer, weights
HUB_FALLBACK = ["*.bin"]  # weights of a repo without safetensors


def split_revision(name: str) -> tuple[str, str | None]:
    """"org/name@rev" -> ("org/name", "rev"); "org/name" -> ("org/name", None)."""
    repo_id, at, revision = name.partition("@")
    return (repo_id, revision or None) if at else (name, None)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def is_hub_id(name: str | Path) -> bool:
    """Whether `name` is spelled as a Hub ID, `org/name` or `name`, with an optional `@revision`."""
    try:
        validate_repo_id(split_revision(str(name))[0])
    except HFValidationError:
        return False
    return True


def resolve_model(name: str | Path) -> Path:
    """The local directory behind a model name: the directory itself, else the Hub ID's snapshot in the HF cache."""
    if Path(name).is_dir():
        return Path(name)
    if not is_hub_id(name):
        raise FileNotFoundError(f"{name}: no such model directory (and not a Hugging Face Hub ID)")
    repo_id, revision = split_revision(str(name))
    offline = hub_offline()
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=hub_patterns(repo_id, revision, offline),
                                      local_files_only=offline))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        where = ("in the Hugging Face cache (offline)" if offline else
                 f"on the Hugging Face Hub ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})")
        raise FileNotFoundError(f"{name}: not a local model directory and not found {where}") from None


def hub_patterns(repo_id: str, revision: str | None, offline: bool) -> list[str]:
    """The files to fetch: config, tokenizer and safetensors weights, and .bin weights only for a repo without
    safetensors (or when the Hub cannot be asked: the cache then holds whichever it holds)."""
    if not offline:
        try:
            if any(f.endswith(".safetensors") for f in list_repo_files(repo_id, revision=revision)):
                return HUB_FILES
        except Exception:  # no listing (no network, a gated repo): snapshot_download reports what matters
            pass
    return HUB_FILES + HUB_FALLBACK


def check_model_dir(name: str | Path) -> Path:
    """The local model or adapter directory behind `name` (resolve_model), which must hold config.json or
    adapter_config.json."""
    path = resolve_model(name)
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{name}: not a Hugging Face model directory (no config.json or adapter_config.json)")
    return path


def adapter_base(path: Path) -> Path | None:
    """The base model directory of an unmerged LoRA adapter directory (adapter_config.json, no config.json), else
    None. The base is named by the adapter's `base_model_name_or_path` (a directory or a Hub ID, at its `revision`)."""
    if (path / "config.json").exists() or not (path / "adapter_config.json").exists():
        return None
    config = json.loads((path / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise FileNotFoundError(f"{path}: adapter_config.json names no base_model_name_or_path")
    if config.get("revision") and "@" not in base and not Path(base).is_dir():
        base = f"{base}@{config['revision']}"
    found = check_model_dir(base)
    if not (found / "config.json").exists():
        raise FileNotFoundError(f"{path}: its base {base} is an adapter too; merge that one first")
    return found


def with_adapter(model, adapter_dir: Path, lora: LoraSettings | None):
    """`model` with the LoRA adapter of `adapter_dir`: kept as the adapters to train when lora.r > 0 (their own
    rank and targets; lora.dropout as in apply_lora), merged into the weights otherwise."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(adapter_dir))
    trainable = lora is not None and lora.r > 0
    if hasattr(config, "lora_dropout"):
        config.lora_dropout = lora.dropout if trainable else 0.0
    model = PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=trainable)
    return model if trainable else model.merge_and_unload()


def load_tokenizer(name: str | Path):
    """AutoTokenizer, except that a directory whose tokenizer is a plain `tokenizers` file loads as exactly that.

    transformers 5 maps some model types (qwen2 among them) to their own tokenizer class whatever the directory says,
    which silently re-tokenises a custom BPE/word-level tokenizer; the generic fast class keeps it as trained.
    An adapter directory without tokenizer files uses its base model's tokenizer.
    """
    path = check_model_dir(name)
    base = adapter_base(path)
    if base is not None and not (path / "tokenizer_config.json").exists():
        path = base
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


def load_causal_lm(name: str | Path, lora: LoraSettings | None = None, dtype: str = "float32"):
    """A causal LM for training: dropout off, optional LoRA adapters (only they are trainable then). An adapter
    directory loads its base with the adapter applied (trained further with lora.r > 0, merged otherwise)."""
    path = check_model_dir(name)
    base = adapter_base(path)
    source = base or path
    model = AutoModelForCausalLM.from_pretrained(str(source), config=_config_without_dropout(source),
                                                 dtype=dtype_for(dtype))
    return apply_lora(model, lora) if base is None else with_adapter(model, path, lora)


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


def load_reward_model(name: str | Path, lora: LoraSettings | None = None, dtype: str = "float32"):
    """A scalar reward (or value) model. A causal-LM directory gets a new head; a saved RM loads as it is; an adapter
    directory (a LoRA reward model saved with merge_lora=false) loads its base with the adapter and its head."""
    path = check_model_dir(name)
    base = adapter_base(path)
    source = base or path
    config = _config_without_dropout(source, num_labels=1)
    is_rm = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    tok = load_tokenizer(path)
    grown = tok.pad_token_id >= config.vocab_size  # an adapter whose RM was given a pad token (portable_reward_model)
    config.pad_token_id = None if grown else tok.pad_token_id
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a causal-LM dir has no score head yet: that is expected, not news
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(source), config=config, dtype=dtype_for(dtype))
    finally:
        hf_logging.set_verbosity(verbosity)
    if not is_rm:
        init_score_head(model.score, config.hidden_size)
    if grown:  # the adapter holds the grown embedding (peft saves a resized one)
        model.resize_token_embeddings(tok.pad_token_id + 1, mean_resizing=False)
    model.config.pad_token_id = tok.pad_token_id
    if base is not None:
        return with_adapter(model, path, lora)
    return apply_lora(model, lora, task_type="SEQ_CLS")


PAD_TOKEN = "<|pad|>"  # the pad token given to a reward model whose tokenizer pads with an end token


def score_head(model) -> torch.nn.Linear:
    """The score head that runs: under peft (task SEQ_CLS) the trained copy that modules_to_save keeps."""
    head = hf_model(model).score
    copies = getattr(head, "modules_to_save", None)
    return copies[head.active_adapters[0]] if copies is not None else head


def portable_reward_model(model, tokenizer):
    """Make a trained reward model score, under transformers' own forward, as tether scores it; returns the
    tokenizer to save with it (a copy). Called once, just before saving (recipes.reward).

    Normalisation. tether's score is (raw − reward_bias)·reward_gain (forward.normalized). The gain goes into the head:
    W' = gain·W. A head with a bias takes the bias too: b' = gain·(b − reward_bias). transformers' decoder heads have
    none (Llama, Qwen2, Mistral, ... share GenericForSequenceClassification's nn.Linear(d, 1, bias=False), after a
    bias-free RMSNorm; GPT-2, GPT-NeoX, OPT, Falcon too), and a `score.bias` in the checkpoint would be dropped on
    load as unexpected, so no weight can carry a constant: there reward_bias stays in the config, in the new units
    (gain·bias), and HF's forward gives tether's score + reward_bias (the same order and differences; a constant
    apart). After the fold the config says what is left for forward.normalized (reward_gain 1.0, reward_bias 0.0 or
    gain·bias: every consumer of reward_scores/token_values still sees the same scale) and keeps the normalisation
    found, on the head as trained, as record: reward_raw_gain, reward_raw_bias, reward_normalization_in_weights.

    Pooling. transformers' ForSequenceClassification reads the rightmost token whose id is not config.pad_token_id
    (modeling_layers.GenericForSequenceClassification.forward). tether scores prompt + completion + EOS and reads
    the EOS; a tokenizer that pads with its EOS (a Llama tokenizer has no pad token) makes that rule skip every EOS
    and read the token before. So the saved tokenizer pads with a token that ends no text: its own pad token when
    that is not an end id, else a new special token PAD_TOKEN (the embedding grows by a row only when the vocabulary
    has no spare one; the row's values never matter: right-padded pads follow every real token and are masked), and
    config.pad_token_id names it; padding is on the right, where HF's default positions 0..L-1 are tether's.
    The unknown token would serve too, but a word-level tokenizer produces it inside texts (a cut completion can end
    with it); an id the model never had (-1, vocab size) breaks the embedding lookup of any padded batch.
    """
    hf = hf_model(model)
    gain, bias = float(getattr(hf.config, "reward_gain", 1.0)), float(getattr(hf.config, "reward_bias", 0.0))
    head = score_head(model)
    with torch.no_grad():
        head.weight.mul_(gain)
        if head.bias is not None:
            head.bias.sub_(bias).mul_(gain)
    hf.config.reward_raw_gain, hf.config.reward_raw_bias = gain, bias
    hf.config.reward_gain, hf.config.reward_bias = 1.0, 0.0 if head.bias is not None else gain * bias
    hf.config.reward_normalization_in_weights = "gain and bias" if head.bias is not None else "gain"

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "right"
    end_ids = {tokenizer.eos_token_id, *_as_list(hf.config.eos_token_id)}
    if tok.pad_token_id is None or tok.pad_token_id in end_ids:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
        if tok.pad_token_id >= hf.get_input_embeddings().num_embeddings:
            hf.resize_token_embeddings(tok.pad_token_id + 1, mean_resizing=False)
    hf.config.pad_token_id = tok.pad_token_id
    return tok


def _as_list(ids) -> list:
    return [] if ids is None else list(ids) if isinstance(ids, (list, tuple)) else [ids]


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
