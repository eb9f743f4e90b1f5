"""`tether label <sample | serve | add-rater | export>`: collect human comparisons.

    tether label sample --model runs/sft/model --prompts prompts.jsonl --n 2 --out cand.jsonl [--critic SPEC]
    tether label serve --candidates cand.jsonl --db feedback.sqlite [--raters-per-item 3] [--gold gold.jsonl]
    tether label add-rater alice --db feedback.sqlite             # prints alice's personal link (token inside)
    tether label add-rater boss --db feedback.sqlite --admin      # the admin page's link
    tether label export --db feedback.sqlite --out prefs.jsonl [--mode all]

The flow and the formats are in docs/feedback.md; the candidates format in feedback/candidates.py, the queue and
storage rules in feedback/store.py, the export rule in feedback/export.py. Bad input is one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from tether.config import ConfigError


def _sample(args) -> dict:
    from tether.data import load_records, write_jsonl
    from tether.feedback.candidates import add_critiques, load_critic, make_candidates
    from tether.models import load_causal_lm, load_tokenizer

    records = list(load_records(args.prompts, "prompts"))[: args.limit or None]
    critic = load_critic(args.critic) if args.critic else None  # fail on a bad spec before sampling
    tokenizer, model = load_tokenizer(args.model), load_causal_lm(args.model)
    candidates = make_candidates(model, tokenizer, records, args.n, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size)
    if critic is not None:
        candidates = add_critiques(candidates, critic)
    write_jsonl(args.out, candidates)
    return {"prompts": len(candidates), "responses": len(candidates) * args.n, "out": args.out}


def _serve(args) -> dict:
    from tether.feedback.app import serve
    from tether.feedback.store import Store

    store = Store(args.db, lease_s=args.lease)
    if args.raters_per_item:
        store.set_meta("raters_per_item", str(args.raters_per_item))
    new = 0
    if args.candidates:
        from tether.feedback.candidates import read_candidates

        new += sum(store.add_items(read_candidates(path), round=args.round) for path in args.candidates)
    new += sum(store.add_items(_gold_records(path), round=args.round) for path in args.gold)
    print(json.dumps({"new_items": new, "items": len(store.item_rows()), "raters_per_item": store.raters_per_item}),
          flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("note: plain HTTP beyond this machine; put TLS in front of it", file=sys.stderr)
    serve(store, args.host, args.port)
    return {}


def _gold_records(path: str) -> list[dict]:
    from tether.data import DataError
    from tether.feedback.candidates import read_candidates

    records = read_candidates(path)
    missing = [i for i, r in enumerate(records, start=1) if r.get("gold") is None]
    if missing:
        raise DataError(f"record {missing[0]} has no `gold`; every record of a gold file needs 0 or 1", path, field="gold")
    return records


def _add_rater(args) -> dict:
    from tether.feedback.store import Store

    if not args.name.strip():
        raise ConfigError("a rater needs a name")
    token = Store(args.db).add_rater(args.name, admin=args.admin)
    link = f"{args.url.rstrip('/')}/login?token={token}"
    print(link)
    return {}


def _export(args) -> dict:
    from tether.feedback.export import export_file
    from tether.feedback.store import Store

    return export_file(Store(args.db), args.out, mode=args.mode, include_gold=args.include_gold)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tether label", description="collect human comparisons")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="sample candidate responses per prompt")
    p.add_argument("--model", required=True, help="policy directory to sample from")
    p.add_argument("--prompts", required=True, help="prompt records: JSONL, Parquet or saved dataset")
    p.add_argument("--n", type=int, default=2, help="responses per prompt (every pair becomes an item)")
    p.add_argument("--out", required=True, help="candidates JSONL to write")
    p.add_argument("--critic", default="", help="AI critique per response: model:DIR or python:MODULE:FUNCTION")
    p.add_argument("--max-new-tokens", type=int, default=48, help="response budget in tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--batch-size", type=int, default=64, help="sequences sampled at once")
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(run=_sample)

    p = sub.add_parser("serve", help="serve the rating web app")
    p.add_argument("--db", required=True, help="SQLite database (created if missing)")
    p.add_argument("--candidates", action="append", default=[], help="candidates JSONL to add (repeatable)")
    p.add_argument("--gold", action="append", default=[], help="gold items: candidates with `gold` (repeatable)")
    p.add_argument("--raters-per-item", type=int, default=0, help="R: raters per item (stored in the db; default 1)")
    p.add_argument("--round", type=int, default=0, help="round number the added items belong to")
    p.add_argument("--lease", type=float, default=600.0, help="seconds an unanswered item stays reserved for a rater")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.set_defaults(run=_serve)

    p = sub.add_parser("add-rater", help="add a rater (or the admin) and print the personal link")
    p.add_argument("name", help="rater name (a name that exists gets a fresh token; the old link stops working)")
    p.add_argument("--db", required=True, help="SQLite database")
    p.add_argument("--admin", action="store_true", help="an admin account: sees /admin, labels nothing")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL the app is reached at")
    p.set_defaults(run=_add_rater)

    p = sub.add_parser("export", help="write preference pairs for `tether rm` / `tether dpo`")
    p.add_argument("--db", required=True, help="SQLite database")
    p.add_argument("--out", required=True, help="pairs JSONL to write")
    p.add_argument("--mode", choices=("majority", "all"), default="majority",
                   help="majority: one pair per item; all: one pair per label with its rater")
    p.add_argument("--include-gold", action="store_true", help="export gold items too")
    p.set_defaults(run=_export)
    return top


def user_errors() -> tuple[type[Exception], ...]:
    """Errors printed as one line. DataError only when tether.data was imported: it imports torch, which `serve`
    without candidates never needs (the server starts in about a second instead of several)."""
    data = sys.modules.get("tether.data")
    return (ConfigError, FileNotFoundError) + ((data.DataError,) if data else ())


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        summary = args.run(args)
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        print(f"tether label {args.command}: {e}", file=sys.stderr)
        return 2
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
