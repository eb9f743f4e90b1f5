"""The data layer of tether: record schemas and validation, readers, tokenisation with chat templates, collation.

    records = load_records("pairs.jsonl", "pairs")               # validated dicts; DataError names file:line: field
    examples = [encode_pair(tok, r, 256, 256) for r in records]  # token ids, prompt cut left, completions cut right
    batch = collate_pairs(examples, tok.pad_token_id)            # rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected
    chosen, rejected = split_pairs(scores)                       # (2B,) per-row results -> two (B,)

One module an idea, each importing only those above it; every public name is re-exported here:
    schemas    DataError, the record kinds (SCHEMAS, RECORD_KINDS), validate_record, prompt_of, expand_ranking
    readers    Records, read_rows (.jsonl/.json, .parquet, `save_to_disk` directories), load_records, detect_kind,
               write_jsonl
    tokenize   IGNORE_INDEX, Example, PairExample, RankingExample, UnpairedExample, encode_prompt/_completion/
               _demonstration/_pair/_ranking/_unpaired (chat templates, truncation), TruncationStats
    collate    pad_sequences, collate_lm, model_inputs, collate_completions/_pairs/_rankings/_unpaired/_prompts,
               split_pairs, pack_examples, prompt_lengths, count_tokens

Record kinds (one JSON object per line in .jsonl/.json; Parquet and `Dataset.save_to_disk` directories hold the same
fields; unknown extra fields are kept). A prompt is `"prompt": str`, `"prompt": [turns]` or `"messages": [turns]`,
a turn is `{"role": str, "content": str}`:
    prompts          prompt
    demonstrations   prompt + "completion": str, or "messages" alone (loss on every assistant turn)
    pairs            prompt + "chosen", "rejected": str; optional "margin": number, "weight": number > 0, "rater": str
    rankings         prompt + "completions": [str, ...] (K >= 2), "ranking": [best ... worst] a permutation of 0..K-1
    unpaired         prompt + "completion": str, "label": true|false
    verifiable       prompt + "answer": str|number and/or "tests": str|[str, ...]
    steps            prompt + "steps": [str, ...], "labels": [0|1|true|false, ...] of the same length

Choices worth knowing:
- A ranking must order all K completions. A partial ranking (a prefix) leaves the place of the unranked completions
  open (below all ranked ones? tied?), and each reading gives different pairs; drop unranked completions instead.
- Tokens (tokenize): a plain prompt is tokenised with the tokenizer's special tokens (BOS where the model wants one),
  a chat is rendered by the tokenizer's chat template; a completion is raw text + EOS. Prompts are cut from the left
  (a leading BOS is kept), completions from the right (a cut completion loses its EOS). Truncation is counted by
  `TruncationStats`, never silent.
- Packing (collate's `pack_examples`) is exact only when the model gets no 2D attention mask and no KV cache:
  `model_inputs` then passes `position_ids` alone with use_cache=False, and transformers 5 derives the block-diagonal
  causal mask from the restarts of the positions (sdpa and eager on CPU, flash-attention varlen on GPU). Passing the
  2D attention_mask, or leaving the cache on (the default in eval mode), silently lets packed examples see each other.
  tests/test_data.py checks packed NLL == unpacked NLL on the tiny Llama for both attention implementations.
"""

from tether.data.collate import (
    collate_completions,
    collate_lm,
    collate_pairs,
    collate_prompts,
    collate_rankings,
    collate_unpaired,
    count_tokens,
    model_inputs,
    pack_examples,
    pad_sequences,
    prompt_lengths,
    split_pairs,
)
from tether.data.readers import Records, detect_kind, load_records, read_rows, write_jsonl
from tether.data.schemas import RECORD_KINDS, SCHEMAS, DataError, expand_ranking, prompt_of, validate_record
from tether.data.tokenize import (
    IGNORE_INDEX,
    Example,
    PairExample,
    RankingExample,
    TruncationStats,
    UnpairedExample,
    encode_completion,
    encode_demonstration,
    encode_pair,
    encode_prompt,
    encode_ranking,
    encode_unpaired,
)

__all__ = [
    # schemas
    "DataError", "SCHEMAS", "RECORD_KINDS", "validate_record", "prompt_of", "expand_ranking",
    # readers
    "Records", "read_rows", "load_records", "detect_kind", "write_jsonl",
    # tokenize
    "IGNORE_INDEX", "Example", "PairExample", "RankingExample", "UnpairedExample", "encode_prompt", "encode_completion",
    "encode_demonstration", "encode_pair", "encode_ranking", "encode_unpaired", "TruncationStats",
    # collate
    "pad_sequences", "collate_lm", "model_inputs", "collate_completions", "collate_pairs", "split_pairs",
    "collate_rankings", "collate_unpaired", "collate_prompts", "pack_examples", "prompt_lengths", "count_tokens",
]
