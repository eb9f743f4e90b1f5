"""The data layer of tether: record schemas and validation, readers, tokenisation with chat templates, collation.

    records = load_records("pairs.jsonl", "pairs")               # validated dicts; DataError names file:line: field
    examples = [encode_pair(tok, r, 256, 256) for r in records]  # token ids, prompt cut left, completions cut right
    batch = collate_pairs(examples, tok.pad_token_id)            # rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected
    chosen, rejected = split_pairs(scores)                       # (2B,) per-row results -> two (B,)

One module an idea, each importing only those above it; every public name is re-exported here:
    schemas    DataError, the record kinds (SCHEMAS, RECORD_KINDS), validate_record, prompt_of, extract_prompt,
               expand_ranking
    readers    Records, read_rows (.jsonl/.json, .parquet, `save_to_disk` directories, dataset repositories and Hub
               IDs with ":split"), parse_source, load_records, detect_kind, write_jsonl
    tokenize   IGNORE_INDEX, Example, PairExample, RankingExample, UnpairedExample, encode_prompt/_completion/_reply/
               _demonstration/_pair/_ranking/_unpaired (chat templates, truncation), TruncationStats, encode_records
    collate    pad_sequences, collate_lm, model_inputs, collate_completions/_pairs/_rankings/_unpaired/_prompts,
               split_pairs, pack_examples, prompt_lengths, count_tokens

Record kinds (one JSON object per line in .jsonl/.json; Parquet, `Dataset.save_to_disk` directories, dataset
repositories and Hub datasets hold the same fields; unknown extra fields are kept). A prompt is `"prompt": str`,
`"prompt": [turns]` or `"messages": [turns]`, a turn is `{"role": str, "content": str}`; a completion ("completion",
"chosen", "rejected") is a string, or after a chat prompt also [turns] opening with an assistant turn:
    prompts          prompt
    demonstrations   prompt + "completion"; or "messages" alone (loss on every assistant turn); or "text" alone
                     (language modelling: loss on every token)
    pairs            prompt + "chosen", "rejected" (both strings or both turns); or, with the prompt implicit, no
                     prompt and "chosen", "rejected" whole (schemas.extract_prompt); optional "margin": number,
                     "weight": number > 0, "rater": str
    rankings         prompt + "completions": [str, ...] (K >= 2), "ranking": [best ... worst] a permutation of 0..K-1
    unpaired         prompt + "completion", "label": true|false
    verifiable       prompt + "answer": str|number and/or "tests": str|[str, ...]
    steps            prompt + "steps": [str, ...], "labels": [1|0|-1|true|false, ...] (PRM800K: good, neutral,
                     wrong), one per step, or fewer when labelling stopped at the first wrong step (-1 last)

TRL's dataset formats map onto these kinds, each in its standard (strings) and conversational (turns) form: language
modelling {"text"} / {"messages"} and prompt-completion are demonstrations, prompt-only is prompts, preference
(explicit or implicit prompt) is pairs, unpaired preference is unpaired. TRL's stepwise supervision
({"prompt", "completions", "labels"}) is not read: tether's steps kind names the field "steps".
A source (readers) is a path or a Hub dataset ID, with ":split" where it has splits: `dd_dir:test`, `org/name:train`.

Choices worth knowing:
- A ranking must order all K completions. A partial ranking (a prefix) leaves the place of the unranked completions
  open (below all ranked ones? tied?), and each reading gives different pairs; drop unranked completions instead.
- Tokens (tokenize): a plain prompt is tokenised with the tokenizer's special tokens (BOS where the model wants one),
  a chat is rendered by the tokenizer's chat template; a string completion is raw text + EOS, a chat completion the
  template's continuation of the prompt (it ends as the template ends a turn). Prompts are cut from the left
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
from tether.data.readers import Records, detect_kind, load_records, parse_source, read_rows, write_jsonl
from tether.data.schemas import (
    RECORD_KINDS,
    SCHEMAS,
    DataError,
    expand_ranking,
    extract_prompt,
    prompt_of,
    validate_record,
)
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
    encode_records,
    encode_reply,
    encode_unpaired,
)

__all__ = [
    # schemas
    "DataError", "SCHEMAS", "RECORD_KINDS", "validate_record", "prompt_of", "extract_prompt", "expand_ranking",
    # readers
    "Records", "read_rows", "parse_source", "load_records", "detect_kind", "write_jsonl",
    # tokenize
    "IGNORE_INDEX", "Example", "PairExample", "RankingExample", "UnpairedExample", "encode_prompt", "encode_completion",
    "encode_reply", "encode_demonstration", "encode_pair", "encode_ranking", "encode_unpaired", "TruncationStats",
    "encode_records",
    # collate
    "pad_sequences", "collate_lm", "model_inputs", "collate_completions", "collate_pairs", "split_pairs",
    "collate_rankings", "collate_unpaired", "collate_prompts", "pack_examples", "prompt_lengths", "count_tokens",
]
