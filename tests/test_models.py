"""Model loading helpers: tokenizers kept as trained, reward read at the last real token, LoRA reference = base."""

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from tether.forward import reward_scores
from tether.models import (
    LoraSettings,
    apply_lora,
    init_score_head,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
)
from tether.packing import last_token_index, position_ids_from_mask
from tether.testing import save_tiny, tiny_tokenizer
from tether.wrappers import disabled_adapters


def test_custom_tokenizer_in_qwen2_dir_is_kept(tmp_path):
    tok = tiny_tokenizer(chat_template=True)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded("the film was good .").input_ids == tok("the film was good .").input_ids
    assert loaded.pad_token_id == 0 and loaded.eos_token_id == 1


def test_positions_and_last_index():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2, 2], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert last_token_index(mask).tolist() == [2, 3, 0]


def test_reward_is_the_same_with_left_right_or_no_padding(tmp_path):
    save_tiny(tmp_path)
    rm = load_reward_model(tmp_path).eval()
    ids = torch.tensor([[6, 11, 21, 1, 0, 0], [0, 0, 6, 11, 21, 1]])
    mask = (ids != 0).long()
    with torch.no_grad():
        both = reward_scores(rm, ids, mask)
        alone = reward_scores(rm, ids[:1, :4], mask[:1, :4])
    assert torch.allclose(both[0], both[1], atol=1e-5) and torch.allclose(both[:1], alone, atol=1e-5)
    rm.config.reward_bias, rm.config.reward_gain = 0.5, 2.0  # normalised = (raw - bias) * gain
    with torch.no_grad():
        assert torch.allclose(reward_scores(rm, ids, mask), (both - 0.5) * 2.0, atol=1e-5)
        assert torch.allclose(reward_scores(rm, ids, mask, normalize=False), both, atol=1e-5)


def test_score_head_init_std():
    head = torch.nn.Linear(255, 1)
    init_score_head(head, 255, generator=torch.Generator().manual_seed(0))
    assert abs(head.weight.std().item() - (1 / 256) ** 0.5) < 0.01 and head.bias.abs().sum() == 0


def test_dropout_is_off_and_lora_reference_is_the_base(tmp_path):
    save_tiny(tmp_path)
    base = load_causal_lm(tmp_path)
    assert base.config.attention_dropout == 0.0
    policy = apply_lora(load_causal_lm(tmp_path), LoraSettings(r=4))
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.1)  # move the adapters so the policy differs from the base
    ids = torch.tensor([[6, 11, 21, 28]])
    with torch.no_grad():
        with disabled_adapters(policy):
            ref = policy(input_ids=ids).logits
        moved = policy(input_ids=ids).logits
        expected = base(input_ids=ids).logits
    assert torch.allclose(ref, expected, atol=1e-5) and not torch.allclose(moved, expected, atol=1e-3)


# --- portable reward models ---------------------------------------------------------------------------------------------
def normalised_rm(path, gain=2.5, bias=0.3):
    save_tiny(path)
    rm = load_reward_model(path).eval()
    rm.config.reward_gain, rm.config.reward_bias = gain, bias
    return rm


RM_IDS = torch.tensor([[6, 11, 21, 1, 0, 0], [6, 11, 21, 25, 28, 1]])
RM_MASK = (RM_IDS != 0).long()


def test_fold_moves_the_gain_into_the_head_and_keeps_every_score(tmp_path):
    import pytest

    from tether.forward import token_values
    from tether.models import portable_reward_model

    rm = normalised_rm(tmp_path)
    tok = load_tokenizer(tmp_path)
    with torch.no_grad():
        raw, score = reward_scores(rm, RM_IDS, RM_MASK, normalize=False), reward_scores(rm, RM_IDS, RM_MASK)
        values = token_values(rm, RM_IDS, RM_MASK)
    saved_tok = portable_reward_model(rm, tok)
    assert saved_tok.pad_token_id == tok.pad_token_id == 0  # <pad> is no end token: kept, no new token
    assert rm.config.pad_token_id == 0 and saved_tok.padding_side == "right"
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(rm, RM_IDS, RM_MASK, normalize=False), 2.5 * raw)  # W' = gain W
        torch.testing.assert_close(reward_scores(rm, RM_IDS, RM_MASK), score)  # (2.5 raw - 0.75) = 2.5 (raw - 0.3)
        torch.testing.assert_close(token_values(rm, RM_IDS, RM_MASK), values)  # PPO's value init: the same scale
    assert (rm.config.reward_gain, rm.config.reward_bias) == (1.0, pytest.approx(0.75))
    assert (rm.config.reward_raw_gain, rm.config.reward_raw_bias) == (2.5, 0.3)
    assert rm.config.reward_normalization_in_weights == "gain"


def test_fold_takes_the_bias_too_when_the_head_has_one(tmp_path):
    import pytest

    from tether.models import portable_reward_model

    rm = normalised_rm(tmp_path)
    head = torch.nn.Linear(rm.config.hidden_size, 1, bias=True)
    with torch.no_grad():
        head.weight.copy_(rm.score.weight)
        head.bias.fill_(0.1)
    rm.score = head
    with torch.no_grad():
        score = reward_scores(rm, RM_IDS, RM_MASK)  # 2.5 (W h + 0.1 - 0.3)
    portable_reward_model(rm, load_tokenizer(tmp_path))
    assert rm.score.bias.item() == pytest.approx(2.5 * (0.1 - 0.3)) and rm.config.reward_bias == 0.0
    assert rm.config.reward_normalization_in_weights == "gain and bias"
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(rm, RM_IDS, RM_MASK, normalize=False), score)  # weights alone


def test_fold_under_lora_reaches_the_saved_merged_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from tether.models import portable_reward_model, save_pretrained

    rm = apply_lora(normalised_rm(tmp_path / "base"), LoraSettings(r=4), task_type="SEQ_CLS")
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.05)
        score = reward_scores(rm, RM_IDS, RM_MASK)
    save_pretrained(rm, tmp_path / "rm", portable_reward_model(rm, load_tokenizer(tmp_path / "base")))
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(rm, RM_IDS, RM_MASK), score)
        saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
        hf = saved(input_ids=RM_IDS, attention_mask=RM_MASK).logits[:, 0]
    torch.testing.assert_close(hf - saved.config.reward_bias, score, atol=1e-5, rtol=0)
