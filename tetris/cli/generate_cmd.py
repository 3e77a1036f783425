"""`tetris generate`: one request through a given chunk plan on local processes (no daemon)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tetris.cli.arg_types import int_in, nonnegative_float, positive_float, positive_int
from tetris.cli.errors import UsageError, for_option
from tetris.solver.input_files import read_text

#: Most ranks (local processes, prefill and decode together) one generate call starts.
MAX_LOCAL_RANKS = 64

EXAMPLE = """example:
  tetris generate --model smollm2 --prompt-file essay.txt --chunks 512:1,1024:2,rest:4 \\
      --max-tokens 32 --format json"""


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser(
        "generate", help="run one request through a chunk plan on local processes",
        description="Prefill a prompt chunk by chunk, each chunk on its own SP group of local "
        "processes (nested: ranks 0..SP-1), move its KV to separate decode processes and decode "
        "there, driven as the serving daemon drives its workers. Greedy unless --temperature "
        "is given.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (the embedded default) or an HF checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", type=Path, help="a file holding the prompt text")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the model's chat template")
    p.add_argument("--chunks", default="rest:1", metavar="TOKENS:SP,...",
                   help="chunk plan, e.g. 512:1,1024:2,rest:4 (default rest:1)")
    p.add_argument("--decode-sp", type=int_in(1, MAX_LOCAL_RANKS - 1), default=1,
                   help="decode ranks holding the KV during decode: separate processes from "
                   "the prefill ranks, as in the daemon (default 1)")
    p.add_argument("--max-tokens", type=positive_int, default=32)
    p.add_argument("--temperature", type=nonnegative_float, default=0.0)
    p.add_argument("--top-p", type=positive_float, default=1.0)
    p.add_argument("--seed", type=int_in(0, 2**63 - 1))  # what torch's generator takes
    p.add_argument("--strategy", choices=("auto", "gather_kv", "pass_q"), default="auto",
                   help="how SP ranks share attention (default: by communication volume)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # torch and the model stack load only for this command, not for every `tetris` call.
    from tetris.cli.model_cmd import fetch_failed
    from tetris.models.config import read_config
    from tetris.models.fetch import FetchError, resolve_model
    from tetris.models.tokenizer import Tokenizer
    from tetris.runtime.chunking import parse_chunks
    from tetris.runtime.generate import check_plan, generate
    from tetris.runtime.local_group import GroupConfig, LocalSPGroup
    from tetris.runtime.sampling import SamplingParams
    from tetris.solver.model_spec import model_spec_of

    try:
        model_dir = for_option("--model", resolve_model, args.model)
    except (FetchError, OSError) as err:
        return fetch_failed(err)
    if args.prompt_file is not None:
        text = for_option("--prompt-file", read_text, args.prompt_file)
    else:
        text = args.prompt
    if not text.strip():
        raise UsageError("the prompt is empty")
    tokenizer = Tokenizer.from_dir(model_dir)
    if args.chat:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": text}])
    else:
        prompt_ids = tokenizer.encode(text)
    config = read_config(model_dir)
    if len(prompt_ids) + args.max_tokens > config.max_position_embeddings:
        raise UsageError(f"prompt ({len(prompt_ids)} tokens) + --max-tokens {args.max_tokens} "
                         f"exceeds the model's context of {config.max_position_embeddings}")
    chunks = for_option("--chunks", parse_chunks, args.chunks, len(prompt_ids))
    prefill_ranks = max(c.sp for c in chunks)
    if prefill_ranks + args.decode_sp > MAX_LOCAL_RANKS:
        # Each rank is a process on this machine: refuse before starting hundreds of them.
        raise UsageError(f"--chunks/--decode-sp: {prefill_ranks} prefill + {args.decode_sp} "
                         f"decode ranks exceed the {MAX_LOCAL_RANKS} local processes "
                         "`tetris generate` starts at most")
    spec = model_spec_of(config)
    for_option("--chunks", check_plan, spec, len(prompt_ids), chunks, prefill_ranks)
    sampling = for_option("--temperature", SamplingParams, args.temperature, args.top_p,
                          args.seed, args.max_tokens)
    # Decode ranks are processes of their own, as the daemon's decode instances are.
    with LocalSPGroup(GroupConfig(model_dir, prefill_ranks, args.decode_sp)) as group:
        result = generate(group, prompt_ids, chunks, sampling, sorted(tokenizer.eos_ids),
                          decode_sp=args.decode_sp, strategy=args.strategy)
    answer = tokenizer.decode([t for t in result.token_ids if t not in tokenizer.eos_ids])
    if args.format == "json":
        json.dump({
            "prompt_tokens": result.prompt_tokens,
            "token_ids": result.token_ids,
            "text": answer,
            "chunks": [{"start_token": c.start_token, "end_token": c.end_token,
                        "sp": len(c.instances), "instances": list(c.instances),
                        "seconds": round(c.seconds, 6)} for c in result.chunks],
            "first_token_s": round(result.first_token_s, 6),
            "decode_tokens_per_s": result.decode_tokens_per_s,
        }, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(answer)
        for c in result.chunks:
            print(f"  chunk [{c.start_token}, {c.end_token}) on SP {len(c.instances)}: "
                  f"{c.seconds:.3f} s", file=sys.stderr)
    return 0
