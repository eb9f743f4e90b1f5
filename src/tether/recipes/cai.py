"""`tether cai`: Constitutional AI's supervised stage (SL-CAI, Bai et al. 2022 §3): sample a response, critique it
against a principle, revise it, repeat, then fine-tune the policy on the final revisions.

    tether cai model=runs/sft/model constitution=reviews task=reviews rounds=2 out=runs/cai
    tether cai model=... constitution=hhh.yaml prompts=red_team.jsonl rounds=4 helpful=helpful.jsonl
    tether cai ... direct=true                    # revise without a critique first (Bai et al. §3.5's ablation)

Per prompt: the policy samples a response (temperature `temperature`); each round draws one principle by weight
(§3.1: one of 16 per round), the judge writes `Critique:` after the constitution's critique prompt (skipped with
direct=true) and `Revision:` after the revision prompt, greedily; the revision is the response of the next round.
The revisions of the last round (plus `helpful` demonstrations, mixed in as §3.1 mixes helpful samples) are the
SFT data of `tether sft` with this command's SFT keys (1 epoch by default; the paper's lr is 0.5x the pretraining
lr). Written: out/revisions.jsonl ({prompt, completion}), out/rounds.jsonl (every round's critique and revision, with
the task's gold reward when task= is set), out/sft/ (the SFT run; its model is out/sft/model). On held-out prompts
(`eval_prompts`, or the task's test split) the starting policy and the SL-CAI policy are evaluated alike
(`evaluate.evaluate_policy`: gold when the task has one, KL to the starting policy, length, diversity) and
summary.json compares them (gold_start, gold_end, kl_end, and each evaluation whole under eval_start / eval_end).

Departure from the paper: the *judge* (the constitution's feedback model) writes critiques and revisions, not the
policy itself; the embedded policy is too small to follow a critique request, the embedded judge was pretrained on
critique/revision documents (tasks/reviews_judge.py).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from tether.config import ConfigError, above, at_least, between, load_config, one_of, opt
from tether.recipes.sft import SFTConfig
from tether.tasks import TASKS


@dataclass
class CAIConfig(SFTConfig):
    constitution: str = opt("reviews", "constitution: a packaged name (reviews, hhh) or a YAML file")
    prompts: str = opt("", "prompt records (JSONL); empty: n_prompts of the task's train prompts")
    task: str = opt("", "embedded task: its prompts, and gold reward logged per round", check=one_of("", *TASKS))
    n_prompts: int = opt(256, "prompts to revise", check=at_least(1))
    rounds: int = opt(2, "critique -> revision rounds per prompt (the paper: up to 4)", check=between(1, 4))
    direct: bool = opt(False, "revise without a critique first")
    response_tokens: int = opt(48, "policy response budget (tokens)", check=at_least(1))
    revision_tokens: int = opt(64, "critique and revision budget (tokens)", check=at_least(1))
    temperature: float = opt(1.0, "the policy's sampling temperature", check=above(0))
    helpful: str = opt("", "demonstrations {prompt, completion} mixed into the SFT data")
    judge_cache: str = opt("", "on-disk judge cache (SQLite); empty: none")
    epochs: int = opt(1, "SFT epochs over the revisions (the paper: 1)", check=at_least(1))
    eval_prompts: str = opt("", "held-out prompts on which the policy is evaluated before and after (default: the "
                                "task's test split; neither: no evaluation)")
    n_eval_prompts: int = opt(64, "held-out prompts drawn from the task", check=at_least(1))
    eval_samples: int = opt(4, "samples per held-out prompt", check=at_least(1))

    def validate(self) -> None:
        super(SFTConfig, self).validate()  # the training keys' checks; `data` is made here, not given
        if not self.model:
            raise ConfigError("cai needs model=DIR (the policy to revise and fine-tune)")
        if not self.prompts and not self.task:
            raise ConfigError("cai needs prompts=FILE or task=NAME")


def strip_prompt(revision: str, prompt: str) -> str:
    """A revision may restate the prompt it continues (the embedded judge rewrites the whole review): drop it."""
    text = revision.strip()
    return text[len(prompt):].strip() if prompt and text.startswith(prompt) else text


def revise_rounds(judge, constitution, prompts: list[str], responses: list[str], rounds: int, direct: bool,
                  rng: random.Random, max_new_tokens: int) -> list[list[dict]]:
    """Per prompt, one dict per round: principle, critique (None when direct), revision (prompt stripped)."""
    usable = [p for p in constitution.principles if p.revision and (direct or p.critique)]
    if not usable:
        raise ConfigError(f"{constitution.source}: no principle has the critique and revision wording SL-CAI needs")
    history = [[] for _ in prompts]
    current, stop = list(responses), constitution.templates["stop"]
    for _ in range(rounds):
        picked = [rng.choices(usable, weights=[p.weight for p in usable])[0] for _ in prompts]
        if direct:
            asks = [constitution.direct_revision_prompt(p, r, q) for p, r, q in zip(prompts, current, picked)]
            critiques = [None] * len(prompts)
        else:
            contexts = [constitution.critique_prompt(p, r, q) for p, r, q in zip(prompts, current, picked)]
            critiques = [c.strip() for c in judge.generate(contexts, max_new_tokens, stop=stop)]
            asks = [constitution.revision_prompt(x, c, q) for x, c, q in zip(contexts, critiques, picked)]
        revisions = [strip_prompt(r, p) for r, p in zip(judge.generate(asks, max_new_tokens, stop=stop), prompts)]
        current = [r or old for r, old in zip(revisions, current)]  # an empty revision keeps the response
        for h, q, c, r in zip(history, picked, critiques, current):
            h.append({"principle": q.name, "critique": c, "revision": r})
    return history


def compare_policies(cfg: CAIConfig, task, start_dir: str, end_dir: str) -> dict:
    """The starting and the SL-CAI policy on the same held-out prompts, sampled with the same seed."""
    from tether.evaluate import evaluate_policy
    from tether.models import load_causal_lm, load_tokenizer
    from tether.prompts import load_prompts

    records = load_prompts(cfg.eval_prompts, task, "test", cfg.n_eval_prompts, cfg.seed, key="eval_prompts")
    tokenizer, start = load_tokenizer(start_dir), load_causal_lm(start_dir).eval()
    settings = dict(n_samples=cfg.eval_samples, max_new_tokens=cfg.response_tokens, temperature=cfg.temperature,
                    ref_model=start, seed=cfg.seed)
    result = {}
    for name, model in (("start", start), ("end", load_causal_lm(end_dir).eval())):
        numbers = {k: v for k, v in evaluate_policy(model, tokenizer, task, records, **settings).items()
                   if isinstance(v, (int, float))}
        result[f"eval_{name}"] = numbers
        for key, short in (("gold_mean", "gold"), ("gold_std", "gold_std"), ("kl_mean", "kl")):
            if key in numbers:
                result[f"{short}_{name}"] = numbers[key]
    return result


def run(cfg: CAIConfig) -> dict:
    from tether.data import load_records, write_jsonl
    from tether.feedback.ai_labels import prompt_text
    from tether.feedback.candidates import sample_responses
    from tether.models import load_causal_lm, load_tokenizer
    from tether.prompts import load_prompts
    from tether.recipes import sft
    from tether.rewards.constitution import load_constitution
    from tether.rewards.judge import Judge
    from tether.tasks import get_task

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(cfg.task) if cfg.task else None
    constitution = load_constitution(cfg.constitution)
    records = load_prompts(cfg.prompts, task, "train", cfg.n_prompts, cfg.seed)[:cfg.n_prompts]
    prompts = [prompt_text(r.get("prompt", r.get("messages"))) for r in records]
    tokenizer, policy = load_tokenizer(cfg.model), load_causal_lm(cfg.model)
    responses = [g[0] for g in sample_responses(policy, tokenizer, prompts, 1, cfg.response_tokens,
                                                temperature=cfg.temperature, seed=cfg.seed)]
    del policy
    judge = Judge.from_constitution(constitution, cache=cfg.judge_cache or None, seed=cfg.seed)
    history = revise_rounds(judge, constitution, prompts, responses, cfg.rounds, cfg.direct,
                            random.Random(f"cai-{cfg.seed}"), cfg.revision_tokens)

    summary = {"prompts": len(prompts), "rounds": cfg.rounds, "direct": cfg.direct}
    if task is not None:
        for r in range(cfg.rounds + 1):
            texts = responses if r == 0 else [h[r - 1]["revision"] for h in history]
            summary[f"gold_round_{r}"] = sum(task.gold_reward(prompts, texts)) / len(texts)
    rows = [{"prompt": p, "response": resp, "rounds": h} for p, resp, h in zip(prompts, responses, history)]
    (out / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = [{"prompt": p, "completion": h[-1]["revision"]} for p, h in zip(prompts, history)]
    if cfg.helpful:
        data += [dict(r) for r in load_records(cfg.helpful, "demonstrations")]
    write_jsonl(out / "revisions.jsonl", data)

    sft_keys = {f.name for f in dataclasses.fields(SFTConfig)}
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k in sft_keys}
    settings.update(data=str(out / "revisions.jsonl"), out=str(out / "sft"))
    result = sft.run(load_config(SFTConfig, None, settings, recipe="sft"))
    summary.update({f"sft_{k}": v for k, v in result.items() if isinstance(v, (int, float, str))})
    summary["model"] = str(out / "sft" / "model")
    if cfg.eval_prompts or task is not None:
        summary.update(compare_policies(cfg, task, cfg.model, summary["model"]))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
