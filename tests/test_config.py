"""Config loading: YAML + key=value overrides, type coercion and errors that name the key."""

from dataclasses import dataclass

import pytest

from tether.config import (
    ConfigError,
    above,
    at_least,
    between,
    describe,
    load_config,
    one_of,
    opt,
    save_config,
)


@dataclass
class ToyConfig:
    lr: float = opt(1e-3, "learning rate")
    steps: int = opt(10, "steps")
    name: str = opt("run", "a name")
    packing: bool = opt(False, "pack")
    stages: list[str] = opt(["sft", "rm"], "stages")
    beta: float | None = opt(None, "optional number")


def test_overrides_are_typed():
    cfg = load_config(ToyConfig, None, ["lr=3e-5", "steps=7", "packing=true", "stages=sft,ppo", "beta=0.1"])
    assert (cfg.lr, cfg.steps, cfg.packing, cfg.stages, cfg.beta) == (3e-5, 7, True, ["sft", "ppo"], 0.1)


def test_string_fields_keep_text_verbatim():
    assert load_config(ToyConfig, None, ["name=1e-3"]).name == "1e-3"


def test_yaml_file_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nsteps: 3\n")
    cfg = load_config(ToyConfig, path, ["steps=4"])
    assert (cfg.lr, cfg.steps) == (0.5, 4)


def test_unknown_key_names_key_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'lrr' for toy \(did you mean 'lr'\?\)"):
        load_config(ToyConfig, None, ["lrr=1"])
    path = tmp_path / "c.yaml"
    path.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'stepz'"):
        load_config(ToyConfig, path)


@pytest.mark.parametrize("item,message", [
    ("steps=abc", "key 'steps' expects an integer, got 'abc'"),
    ("steps=1.5", "key 'steps' expects an integer"),
    ("lr=fast", "key 'lr' expects a number, got 'fast'"),
    ("packing=maybe", "key 'packing' expects true/false"),
    ("lr", "expected key=value"),
])
def test_wrong_types_are_clear(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ToyConfig, None, [item])


def test_bad_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(ToyConfig, path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(ToyConfig, path)


def test_save_round_trip_and_describe(tmp_path):
    cfg = load_config(ToyConfig, None, ["steps=5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(ToyConfig, tmp_path / "config.yaml") == cfg
    text = describe(ToyConfig)
    assert "steps=10  (int)  steps" in text and "lr=0.001  (float)  learning rate" in text


@dataclass
class RangedConfig:
    lr: float = opt(1e-3, "learning rate", check=above(0))
    steps: int = opt(10, "steps", check=at_least(1))
    share: float = opt(0.1, "share held out", check=between(0, 1, high_open=True))
    mode: str = opt("a", "a mode", check=one_of("a", "b"))
    ns: list[int] = opt([1, 2], "n values", check=at_least(1))
    cap: float | None = opt(None, "optional", check=above(0))


@pytest.mark.parametrize("override, message", [
    ("lr=0", "key 'lr' must be > 0, got 0.0"),
    ("lr=-1e-4", "key 'lr' must be > 0"),
    ("lr=nan", "key 'lr' must be a finite number, got nan"),
    ("lr=inf", "key 'lr' must be a finite number, got inf"),
    ("steps=0", "key 'steps' must be >= 1, got 0"),
    ("share=1", "key 'share' must be in [0, 1), got 1.0"),
    ("share=-0.5", "key 'share' must be in [0, 1)"),
    ("mode=c", "key 'mode' must be one of a | b, got 'c'"),
    ("ns=1,0", "key 'ns' must be >= 1, got 0"),
])
def test_values_outside_their_range_name_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(RangedConfig, None, [override])
    assert message in str(e.value)


def test_ranges_accept_the_edges_and_none_and_show_in_help():
    cfg = load_config(RangedConfig, None, ["share=0", "steps=1", "mode=b", "cap=none"])
    assert (cfg.share, cfg.steps, cfg.mode, cfg.cap) == (0.0, 1, "b", None)
    text = describe(RangedConfig)
    assert "(float [> 0])" in text and "[in [0, 1)]" in text and "[one of a | b]" in text


@pytest.mark.parametrize("content, message", [(b"\xff\xfe\x00binary", "not a text file"), (None, "is a directory")])
def test_unreadable_config_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(RangedConfig, path)


# --- the recipes' declared ranges: a bad value fails at load, naming the key and what it allows ----------------------
SFT, RM, RM_EVAL, RM_SCORE = ("tether.recipes.sft:SFTConfig", "tether.recipes.reward:RewardConfig",
                              "tether.recipes.reward_eval:RMEvalConfig", "tether.recipes.reward_score:RMScoreConfig")
PPO, DPO, ODPO, GRPO = ("tether.recipes.ppo:PPOConfig", "tether.recipes.dpo:DPOConfig",
                        "tether.recipes.online_dpo:OnlineDPOConfig", "tether.recipes.grpo:GRPOConfig")
BON, EVAL, LOOP, BENCH = ("tether.recipes.best_of_n:BoNConfig", "tether.evaluate:EvalConfig",
                          "tether.feedback.loop:LoopConfig", "tether.bench:BenchConfig")
PIPELINE, DEMO, FRONTIER = ("tether.recipes.pipeline:PipelineConfig", "tether.recipes.demo:DemoConfig",
                            "tether.recipes.frontier:FrontierConfig")
# the keys each config requires, so that only the declared range can fail
REQUIRED = {SFT: ["model=m", "data=d.jsonl"], RM: ["model=m", "data=d.jsonl"], RM_EVAL: ["model=m", "data=d.jsonl"],
            RM_SCORE: ["model=m", "data=d.jsonl"], PPO: ["model=m", "reward=r", "task=reviews"],
            DPO: ["model=m", "data=d.jsonl"], ODPO: ["model=m", "task=reviews"], BON: ["model=m", "reward=r",
            "task=reviews"], EVAL: ["model=m"]}


@pytest.mark.parametrize("where, item, message", [
    (SFT, "eval_fraction=-0.5", "key 'eval_fraction' must be in [0, 1), got -0.5"),
    (SFT, "eval_fraction=1", "key 'eval_fraction' must be in [0, 1), got 1.0"),
    (SFT, "max_prompt_len=0", "key 'max_prompt_len' must be >= 1, got 0"),
    (SFT, "max_completion_len=0", "key 'max_completion_len' must be >= 1, got 0"),
    (SFT, "lr=-1", "key 'lr' must be > 0, got -1.0"),
    (SFT, "epochs=0", "key 'epochs' must be > 0, got 0.0"),  # engine's BatchFields
    (SFT, "lora_r=-2", "key 'lora_r' must be >= 0, got -2"),  # engine's ModelFields
    (RM, "label_smoothing=0.7", "key 'label_smoothing' must be in [0, 0.5), got 0.7"),
    (RM, "ensemble=0", "key 'ensemble' must be >= 1, got 0"),
    (RM, "data_kind=triples", "key 'data_kind' must be one of auto | pairs | rankings | steps | unpaired, got 'triples'"),
    (RM, "min_lr_ratio=1.5", "key 'min_lr_ratio' must be in [0, 1], got 1.5"),
    (RM, "lr_schedule=step", "key 'lr_schedule' must be one of constant | linear | cosine, got 'step'"),
    (RM, "task=chess", "key 'task' must be one of"),
    (RM_EVAL, "data_kind=triples", "key 'data_kind' must be one of auto | pairs | rankings"),
    (RM_EVAL, "length_buckets=0", "key 'length_buckets' must be >= 1, got 0"),
    (RM_SCORE, "chunk=0", "key 'chunk' must be >= 1, got 0"),
    (PPO, "max_new_tokens=0", "key 'max_new_tokens' must be >= 1, got 0"),
    (PPO, "rollout_batch=0", "key 'rollout_batch' must be >= 1, got 0"),
    (PPO, "num_minibatches=0", "key 'num_minibatches' must be >= 1, got 0"),
    (PPO, "temperature=0", "key 'temperature' must be > 0, got 0.0"),
    (PPO, "epochs=0", "key 'epochs' must be > 0, got 0.0"),
    (PPO, "max_steps=-1", "key 'max_steps' must be >= 0, got -1"),
    (PPO, "lr=-1", "key 'lr' must be > 0, got -1.0"),
    (PPO, "cliprange=0", "key 'cliprange' must be > 0, got 0.0"),
    (PPO, "gamma=1.5", "key 'gamma' must be in [0, 1], got 1.5"),
    (PPO, "kl_coef=-0.1", "key 'kl_coef' must be >= 0, got -0.1"),
    (PPO, "kl_estimator=k4", "key 'kl_estimator' must be one of k1 | k2 | k3, got 'k4'"),
    (PPO, "kl_controller=pid", "key 'kl_controller' must be one of adaptive | fixed | uncertainty, got 'pid'"),
    (PPO, "task=chess", "key 'task' must be one of"),
    (DPO, "beta=0", "key 'beta' must be > 0, got 0.0"),
    (DPO, "label_smoothing=0.7", "key 'label_smoothing' must be in [0, 0.5), got 0.7"),
    (DPO, "loss=dpo2", "key 'loss' must be one of dpo | hinge | ipo | kto | orpo | robust_dpo | simpo, got 'dpo2'"),
    (DPO, "max_completion_len=0", "key 'max_completion_len' must be >= 1, got 0"),
    (DPO, "n_eval_prompts=0", "key 'n_eval_prompts' must be >= 1, got 0"),
    (DPO, "rpo_alpha=-1", "key 'rpo_alpha' must be >= 0, got -1.0"),
    (ODPO, "rounds=0", "key 'rounds' must be >= 1, got 0"),
    (ODPO, "pairs_per_round=0", "key 'pairs_per_round' must be >= 1, got 0"),
    (ODPO, "temperature=0", "key 'temperature' must be > 0, got 0.0"),
    (ODPO, "label_tau=0", "key 'label_tau' must be > 0, got 0.0"),
    (ODPO, "beta=0", "key 'beta' must be > 0, got 0.0"),
    (GRPO, "group_size=1", "key 'group_size' must be >= 2, got 1"),
    (GRPO, "estimator=ppo", "key 'estimator' must be one of dr_grpo | grpo | reinforce_pp | rloo, got 'ppo'"),
    (GRPO, "aggregation=sum", "key 'aggregation' must be one of"),
    (GRPO, "temperature=0", "key 'temperature' must be > 0, got 0.0"),
    (GRPO, "clip_high=0", "key 'clip_high' must be > 0, got 0.0"),
    (GRPO, "max_steps=0", "key 'max_steps' must be >= 1, got 0"),
    (BON, "n=0", "key 'n' must be >= 1, got 0"),
    (BON, "samples=-1", "key 'samples' must be >= 0, got -1"),
    (BON, "rounds=0", "key 'rounds' must be >= 1, got 0"),
    (BON, "ns=1,0", "key 'ns' must be >= 1, got 0"),
    (BON, "sft_lr=0", "key 'sft_lr' must be > 0, got 0.0"),
    (EVAL, "n_samples=0", "key 'n_samples' must be >= 1, got 0"),
    (EVAL, "temperature=-1", "key 'temperature' must be >= 0, got -1.0"),
    (EVAL, "task=chess", "key 'task' must be one of"),
    (LOOP, "n=1", "key 'n' must be >= 2, got 1"),
    (LOOP, "rounds=0", "key 'rounds' must be >= 1, got 0"),
    (LOOP, "raters=robots", "key 'raters' must be one of simulated | human, got 'robots'"),
    (LOOP, "sim_tau=0", "key 'sim_tau' must be > 0, got 0.0"),
    (LOOP, "port=70000", "key 'port' must be in [1, 65535], got 70000"),
    (LOOP, "ppo_rollout_batch=0", "key 'ppo_rollout_batch' must be >= 1, got 0"),
    (BENCH, "suite=mlperf", "key 'suite' must be one of gpu | vs_trl, got 'mlperf'"),
    (BENCH, "repeats=-1", "key 'repeats' must be >= 0, got -1"),
    (PIPELINE, "sft_max_completion_len=0", "key 'sft_max_completion_len' must be >= 1, got 0"),
    (PIPELINE, "task=chess", "key 'task' must be one of"),
    (DEMO, "task=arithmetic", "key 'task' must be one of reviews, got 'arithmetic'"),
    (DEMO, "n_sft=-1", "key 'n_sft' must be >= 0, got -1"),
    (DEMO, "dpo_beta=0", "key 'dpo_beta' must be > 0, got 0.0"),
    (FRONTIER, "betas_dpo=0.1,0", "key 'betas_dpo' must be > 0, got 0.0"),
    (FRONTIER, "task=arithmetic", "key 'task' must be one of reviews"),
    (FRONTIER, "odpo_rounds=0", "key 'odpo_rounds' must be >= 1, got 0"),
])
def test_recipe_values_outside_their_range_fail_at_load_naming_the_key(where, item, message):
    import importlib

    module, name = where.split(":")
    cls = getattr(importlib.import_module(module), name)
    load_config(cls, None, REQUIRED.get(where, []))  # the required keys alone load
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, [*REQUIRED.get(where, []), item])
    assert message in str(e.value)


def test_stage_keys_of_demo_and_pipeline_keep_the_stage_range():
    """`tether demo ppo_lr=-1`: the prefixed copy of a stage key checks as the stage does, and --help shows it."""
    from tether.recipes.demo import DemoConfig
    from tether.recipes.pipeline import PipelineConfig

    with pytest.raises(ConfigError, match=r"key 'ppo_lr' must be > 0, got -1\.0"):
        load_config(DemoConfig, None, ["ppo_lr=-1"])
    with pytest.raises(ConfigError, match=r"key 'ppo_kl_estimator' must be one of k1 \| k2 \| k3"):
        load_config(PipelineConfig, None, ["ppo_kl_estimator=k9"])
    assert load_config(DemoConfig, None, ["ppo_lr=1e-5"]).ppo_lr == 1e-5
    assert "ppo_lr=6e-05  (float [> 0])  ppo: peak learning rate" in describe(DemoConfig)


def test_choices_spelled_out_match_the_tables_defined_below_their_config():
    """PPO's CONTROLLERS and rm eval's COMPARISON_KINDS come after the config class, so its choices are literal."""
    from tether.recipes import ppo, reward_eval

    for cls, key, table in [(ppo.PPOConfig, "kl_controller", ppo.CONTROLLERS),
                            (reward_eval.RMEvalConfig, "data_kind", {"auto": 0, **reward_eval.COMPARISON_KINDS})]:
        check = cls.__dataclass_fields__[key].metadata["check"]
        assert all(check.ok(k) for k in table) and check.text == "one of " + " | ".join(sorted(table)), key


def test_trl_key_names_are_read_as_tethers_and_noted_once(capsys, monkeypatch):
    from tether import config
    from tether.recipes.dpo import DPOConfig

    monkeypatch.setattr(config, "_NOTED", set())  # as in a fresh process, whatever ran before in this one

    cfg = load_config(DPOConfig, None, ["model_name_or_path=m", "data=d.jsonl", "learning_rate=3e-6",
                                        "per_device_train_batch_size=4", "gradient_accumulation_steps=2",
                                        "output_dir=runs/x", "bf16=true", "num_train_epochs=2"])
    assert (cfg.model, cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.out, cfg.mixed_precision, cfg.epochs) == (
        "m", 3e-6, 4, 2, "runs/x", "bf16", 2.0)
    err = capsys.readouterr().err
    assert "key 'learning_rate' is 'lr' here" in err and "key 'bf16' is 'mixed_precision' here" in err
    load_config(DPOConfig, None, ["model=m", "data=d.jsonl", "learning_rate=1e-5"])
    assert "learning_rate" not in capsys.readouterr().err  # once per process
    with pytest.raises(ConfigError, match="max_prompt_len and max_completion_len"):
        load_config(DPOConfig, None, ["model=m", "data=d.jsonl", "max_length=512"])
