"""Models named by Hub ID (offline, from a Hugging Face cache the test fills itself) and unmerged LoRA adapter
directories as model inputs: models.resolve_model, the loaders, rm:ID, and `tether sft model=org/tiny`."""

import json
import os
import shutil
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file

from tether import data as D
from tether.cli import main as cli_main
from tether.models import (
    LoraSettings,
    apply_lora,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_model,
    save_pretrained,
    split_revision,
)
from tether.rewards.spec import reward_from_spec
from tether.testing import save_tiny
from tether.wrappers import has_adapters

SHA_1, SHA_2 = "1" * 40, "2" * 40
IDS = torch.tensor([[6, 11, 21, 28, 1]])


def put_in_cache(cache, repo_id: str, source, sha: str, refs=("main",)) -> None:
    """The hub cache layout snapshot_download reads: models--org--name/snapshots/<sha>/<files>, refs/<ref> = sha."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(source, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(sha)  # no newline: the file holds the hash exactly


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF cache with HF_HUB_OFFLINE=1: for this process (huggingface_hub read the env at import, so its
    constants are set too) and for child processes (the env)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_split_revision():
    assert split_revision("org/name") == ("org/name", None)
    assert split_revision("org/name@v2") == ("org/name", "v2")
    assert split_revision(f"org/name@{SHA_2}") == ("org/name", SHA_2)


def test_hub_id_loads_from_the_cache_offline(tmp_path, offline_cache):
    local = save_tiny(tmp_path / "tiny", seed=0)
    put_in_cache(offline_cache, "org/tiny", local, SHA_1)
    assert resolve_model("org/tiny") == offline_cache / "models--org--tiny" / "snapshots" / SHA_1
    tok = load_tokenizer("org/tiny")
    assert tok("the film was good .").input_ids == load_tokenizer(local)("the film was good .").input_ids
    torch.testing.assert_close(logits(load_causal_lm("org/tiny")), logits(load_causal_lm(local)), rtol=0, atol=0)
    rm = load_reward_model("org/tiny")  # a causal LM named by ID gets a scalar head like a directory does
    assert rm.config.num_labels == 1 and rm.score.weight.shape == (1, 32)


def test_revision_picks_the_snapshot(tmp_path, offline_cache):
    """main -> seed 0; a tag v2 and the commit hash itself -> seed 1: the weights say which snapshot was read."""
    put_in_cache(offline_cache, "org/tiny", save_tiny(tmp_path / "a", seed=0), SHA_1)
    put_in_cache(offline_cache, "org/tiny", save_tiny(tmp_path / "b", seed=1), SHA_2, refs=("v2",))
    seed0, seed1 = logits(load_causal_lm(tmp_path / "a")), logits(load_causal_lm(tmp_path / "b"))
    assert not torch.allclose(seed0, seed1)
    torch.testing.assert_close(logits(load_causal_lm("org/tiny")), seed0, rtol=0, atol=0)
    torch.testing.assert_close(logits(load_causal_lm("org/tiny@v2")), seed1, rtol=0, atol=0)
    torch.testing.assert_close(logits(load_causal_lm(f"org/tiny@{SHA_2}")), seed1, rtol=0, atol=0)


def test_a_name_found_nowhere_is_one_line(tmp_path, offline_cache, capsys):
    put_in_cache(offline_cache, "org/tiny", save_tiny(tmp_path / "a"), SHA_1)
    for name in ("org/none", "org/tiny@nope"):
        with pytest.raises(FileNotFoundError) as e:
            load_causal_lm(name)
        assert str(e.value) == f"{name}: not a local model directory and not found in the Hugging Face cache (offline)"
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_tokenizer(str(tmp_path / "no" / "such" / "dir"))  # not an ID either: two slashes, absolute
    D.write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "the film was", "completion": "good ."}])
    capsys.readouterr()  # saving the tiny model printed a progress bar
    code = cli_main(["sft", "model=org/none", f"data={tmp_path / 'demos.jsonl'}", f"out={tmp_path / 'r'}",
                     "progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["tether sft: org/none: not a local model directory and not found in the Hugging Face "
                                 "cache (offline)"]


def test_online_asks_for_safetensors_only_and_a_failure_is_one_line(tmp_path, monkeypatch):
    """Online (stubbed: nothing leaves the machine): .bin copies are skipped when the repo has safetensors; a repo the
    Hub does not give is one line naming the Hub's reason."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from tether import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    asked = {}

    def snapshot(repo_id, revision, allow_patterns, local_files_only):
        asked.update(repo_id=repo_id, revision=revision, patterns=allow_patterns, local=local_files_only)
        if repo_id == "org/none":
            raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub.\nmore")
        return str(tmp_path)

    monkeypatch.setattr(models, "snapshot_download", snapshot)
    monkeypatch.setattr(models, "list_repo_files", lambda repo_id, revision: ["config.json", "model.safetensors"])
    assert resolve_model("org/tiny@v2") == tmp_path
    assert asked == {"repo_id": "org/tiny", "revision": "v2", "patterns": models.HUB_FILES, "local": False}
    assert "*.bin" not in models.HUB_FILES and "*.safetensors" in models.HUB_FILES
    monkeypatch.setattr(models, "list_repo_files", lambda repo_id, revision: ["config.json", "pytorch_model.bin"])
    resolve_model("org/tiny")
    assert "*.bin" in asked["patterns"]
    with pytest.raises(FileNotFoundError) as e:
        resolve_model("org/none")
    assert str(e.value) == ("org/none: not a local model directory and not found on the Hugging Face Hub (An error "
                            "happened while trying to locate the files on the Hub.)")


def test_rm_spec_by_hub_id(tmp_path, offline_cache):
    rm_dir = save_pretrained(load_reward_model(save_tiny(tmp_path / "base")), tmp_path / "rm",
                             tokenizer=load_tokenizer(tmp_path / "base"))
    put_in_cache(offline_cache, "org/rm", rm_dir, SHA_1)
    prompts, completions = ["the film was", "the plot was"], ["good .", "awful and dull ."]
    by_id = reward_from_spec("rm:org/rm", device="cpu")(prompts, completions, None).scores
    by_dir = reward_from_spec(f"rm:{rm_dir}", device="cpu")(prompts, completions, None).scores
    torch.testing.assert_close(by_id, by_dir, rtol=0, atol=0)
    assert by_id[0] != by_id[1]


def test_cli_sft_by_hub_id_offline(tmp_path, offline_cache):
    """`tether sft model=org/tiny` in a fresh process whose only model source is the offline cache."""
    put_in_cache(offline_cache, "org/tiny", save_tiny(tmp_path / "tiny"), SHA_1)
    D.write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "the film was", "completion": "good ."}] * 4)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(offline_cache), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "tether.cli", "sft", "model=org/tiny",
                           f"data={tmp_path / 'demos.jsonl'}", f"out={out}", "max_steps=1", "batch_size=2",
                           "progress=false"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    before = load_file(offline_cache / "models--org--tiny" / "snapshots" / SHA_1 / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_run_json_fingerprints_a_hub_id_by_the_commit_it_stands_for(tmp_path, offline_cache):
    from tether.recipes.sft import SFTConfig
    from tether.rundir import changes, hub_commit, manifest

    assert hub_commit("org/tiny") is None  # not cached (yet): nothing recorded, and resume does not call it a change
    put_in_cache(offline_cache, "org/tiny", save_tiny(tmp_path / "tiny"), SHA_1, refs=("main", "v1"))
    assert hub_commit("org/tiny") == hub_commit("org/tiny@v1") == SHA_1 and hub_commit(f"org/tiny@{SHA_2}") == SHA_2
    assert hub_commit("tiny") is None and hub_commit("org/tiny@nope") is None
    first = manifest(SFTConfig(model="org/tiny", data="d.jsonl"), "sft")
    assert first["inputs"] == {"model": f"hub {SHA_1}"}
    assert changes({**first, "inputs": {}}, first, []) == []
    (offline_cache / "models--org--tiny" / "refs" / "main").write_text(SHA_2)  # main moved on: another model
    assert changes(first, manifest(SFTConfig(model="org/tiny", data="d.jsonl"), "sft"), []) == [
        "model: the contents of org/tiny changed"]


# --- unmerged LoRA adapter directories ----------------------------------------------------------------------------------
def moved_adapter(base_dir, out_dir, task_type="CAUSAL_LM"):
    """A LoRA adapter directory (merge_lora=False) whose adapters are not zero, so it differs from its base."""
    load = load_causal_lm if task_type == "CAUSAL_LM" else load_reward_model
    model = apply_lora(load(base_dir), LoraSettings(r=4), task_type=task_type)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    save_pretrained(model, out_dir, tokenizer=load_tokenizer(base_dir), merge_lora=False)
    assert not (out_dir / "config.json").exists() and (out_dir / "adapter_config.json").exists()
    return model.eval()


def test_adapter_dir_loads_merged_or_as_adapters_to_train(tmp_path):
    base = save_tiny(tmp_path / "base")
    torch.manual_seed(0)
    adapted = logits(moved_adapter(base, tmp_path / "adapter"))
    assert not torch.allclose(adapted, logits(load_causal_lm(base)), atol=1e-4)
    merged = load_causal_lm(tmp_path / "adapter")  # lora_r = 0: the adapter merged, a full model to fine-tune
    assert not has_adapters(merged)
    torch.testing.assert_close(logits(merged), adapted, rtol=0, atol=1e-5)
    again = load_causal_lm(tmp_path / "adapter", LoraSettings(r=8)).eval()  # lora_r > 0: these adapters, trained on
    assert has_adapters(again)
    trainable = [n for n, p in again.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert again.peft_config["default"].r == 4  # the adapter's own rank, not a new adapter of rank 8
    torch.testing.assert_close(logits(again), adapted, rtol=0, atol=1e-5)
    tok = load_tokenizer(tmp_path / "adapter")
    assert tok("good .").input_ids == load_tokenizer(base)("good .").input_ids


def test_adapter_on_a_hub_base_and_a_reward_adapter(tmp_path, offline_cache):
    base = save_tiny(tmp_path / "base")
    put_in_cache(offline_cache, "org/tiny", base, SHA_1)
    torch.manual_seed(1)
    adapted = logits(moved_adapter(base, tmp_path / "adapter"))
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "org/tiny"}))
    shutil.move(base, tmp_path / "gone")  # only the cache can give the base now
    torch.testing.assert_close(logits(load_causal_lm(tmp_path / "adapter")), adapted, rtol=0, atol=1e-5)

    rm = moved_adapter(tmp_path / "gone", tmp_path / "rm-adapter", task_type="SEQ_CLS")  # head in modules_to_save
    with torch.no_grad():
        expected = rm(input_ids=IDS).logits
    torch.testing.assert_close(logits(load_reward_model(tmp_path / "rm-adapter").eval()), expected, rtol=0, atol=1e-5)


def test_sft_continues_the_adapters_of_an_adapter_dir(tmp_path):
    base = save_tiny(tmp_path / "base")
    torch.manual_seed(2)
    moved_adapter(base, tmp_path / "adapter")
    D.write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "the film was", "completion": "good ."}] * 4)
    out = tmp_path / "run"
    assert cli_main(["sft", f"model={tmp_path / 'adapter'}", f"data={tmp_path / 'demos.jsonl'}", f"out={out}",
                     "lora_r=4", "merge_lora=false", "max_steps=2", "batch_size=2", "lr=1e-2", "progress=false"]) == 0
    before = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    after = load_file(out / "model" / "adapter_model.safetensors")
    assert before.keys() == after.keys()  # the same adapters, not new ones on top
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
