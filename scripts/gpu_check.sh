#!/usr/bin/env bash
# The scale-out checks that need a GPU (issue 20), in one run of at most ~10 minutes on a machine with CUDA GPUs:
#   bash scripts/gpu_check.sh            # writes benchmarks/gpu_check/ and prints a table for benchmarks/RESULTS.md
# 1. FSDP2 bf16 throughput: tether sft with train_shard=fsdp2 mixed_precision=bf16 on every GPU (torchrun), a
#    Qwen2-0.5B-shaped random model (494M) built in-process, tokens/s and peak memory from summary.json/metrics;
# 2. weight sync time for the same model: distributed/sync.py between two processes, sync_bucket_mb=64, 5 pushes;
# 3. 20 GRPO steps on the arithmetic task with backend=ray max_staleness=1 in bf16: behaviour_kl (the trainer-vs-
#    engine KL of each stale batch) must stay below 1e-3 at version lag 0 and is reported at lag 1.
# 4. where vLLM is installed (build/vllm-venv, or vllm importable by $PY): 20 GRPO steps with generation_backend=vllm,
#    colocated on one GPU, with vllm_sleep=true (sleep -> train -> wake -> push -> generate each step) and without:
#    peak memory of each, and the train-vs-engine KL (behaviour_kl) in bf16, which must stay below 1e-3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/gpu_check}
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then echo "gpu_check: no CUDA device"; exit 2; fi
mkdir -p "$OUT"

"$PY" - "$OUT" <<'PY'
import json, random, sys
from pathlib import Path
from transformers import AutoModelForCausalLM, Qwen2Config
from tether.testing import tiny_tokenizer
out = Path(sys.argv[1])
tok = tiny_tokenizer()
cfg = Qwen2Config(vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
AutoModelForCausalLM.from_config(cfg).save_pretrained(out / "model")
tok.save_pretrained(out / "model")
words = "good great bad awful film movie book plot the a was is".split()
rng = random.Random(0)
with open(out / "demos.jsonl", "w") as f:
    for _ in range(4096):
        f.write(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(64)),
                            "completion": " ".join(rng.choice(words) for _ in range(448))}) + "\n")
PY

echo "== 1. FSDP2 bf16 throughput on $NGPU GPU(s)"
timeout 240 "$PY" -m torch.distributed.run --nproc_per_node "$NGPU" -m tether.cli sft model="$OUT/model" \
  data="$OUT/demos.jsonl" train_shard=fsdp2 mixed_precision=bf16 batch_size=8 max_steps=20 max_prompt_len=64 max_completion_len=448 \
  eval_fraction=0 progress=false out="$OUT/fsdp2" overwrite=true

echo "== 2. weight sync of the 0.5B model"
timeout 120 "$PY" - "$OUT" <<'PY'
import json, socket, sys, threading, time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from tether.distributed.sync import SyncGroup, named_full_weights, receive_weights, send_weights
out = Path(sys.argv[1])
a = AutoModelForCausalLM.from_pretrained(out / "model", torch_dtype=torch.float32).cuda()
b = AutoModelForCausalLM.from_pretrained(out / "model", torch_dtype=torch.float32)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
times = []
def receiver():
    g = SyncGroup("127.0.0.1", port, 1, 2, 120)
    for _ in range(5):
        receive_weights(g, b, 64)
th = threading.Thread(target=receiver); th.start()
g = SyncGroup("127.0.0.1", port, 0, 2, 120)
for _ in range(5):
    t0 = time.perf_counter(); n = send_weights(g, named_full_weights(a), 64); times.append(time.perf_counter() - t0)
th.join()
res = {"sync_seconds_median": sorted(times)[2], "bytes": n}
print(res); (out / "sync.json").write_text(json.dumps(res))
PY

echo "== 3. GRPO, 20 steps, backend=ray, max_staleness=1, bf16"
timeout 300 .venv/bin/tether grpo task=arithmetic backend=ray max_staleness=1 max_steps=20 mixed_precision=bf16 \
  gpus_per_node=1 progress=false out="$OUT/grpo" overwrite=true
VPY=$PY
[ -x build/vllm-venv/bin/python ] && VPY=build/vllm-venv/bin/python
if "$VPY" -c "import vllm" 2>/dev/null; then
  for SLEEP in true false; do
    echo "== 4. GRPO, 20 steps, generation_backend=vllm vllm_sleep=$SLEEP, bf16"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/gpu_mb_sleep_$SLEEP.txt" &
    MON=$!
    timeout 300 "$VPY" -m tether.cli grpo task=arithmetic generation_backend=vllm vllm_sleep=$SLEEP max_steps=20 \
      mixed_precision=bf16 progress=false out="$OUT/grpo_vllm_sleep_$SLEEP" overwrite=true || true
    kill $MON || true
  done
else
  echo "== 4. skipped: vLLM is not installed (make test-vllm installs it into build/vllm-venv)"
fi
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
fsdp = json.loads((out / "fsdp2" / "summary.json").read_text())
sync = json.loads((out / "sync.json").read_text())
rows = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
lag1 = [r["behaviour_kl"] for r in rows if r.get("version_lag") == 1]
print("| check | figure |\n|---|---|")
print(f"| FSDP2 bf16 sft, 494M, tokens/s | {fsdp['tokens_per_second']:.0f} |")
print(f"| weight sync 494M fp32, 64 MiB buckets, median s | {sync['sync_seconds_median']:.3f} |")
print(f"| GRPO max_staleness=1: behaviour_kl at lag 1, mean | {sum(lag1) / max(1, len(lag1)):.2e} |")
for sleep in ("true", "false"):
    run = out / f"grpo_vllm_sleep_{sleep}"
    if (run / "metrics.jsonl").exists():
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        kl = max(r.get("behaviour_kl", 0.0) for r in rows)
        used = [int(x.split(",")[0]) for x in (out / f"gpu_mb_sleep_{sleep}.txt").read_text().split()]
        print(f"| GRPO vLLM vllm_sleep={sleep}: max behaviour_kl; GPU memory used, peak MB (nvidia-smi) | "
              f"{kl:.2e}; {max(used)} |")
PY
