"""`tetris serve --demo`: one real chat request over HTTP, its answer and its chunk plan."""

from __future__ import annotations

import json
import time
import urllib.request

DOCUMENT_TOPICS = (
    "Early observers tracked the motions of the Sun, the Moon and the planets, and built "
    "calendars around them.",
    "Careful measurements showed that the planets move on ellipses around the Sun, and the "
    "laws of motion explained why.",
    "Telescopes revealed moons around Jupiter, the phases of Venus and countless faint stars "
    "in the Milky Way.",
    "Spectroscopy showed what the stars are made of and how fast they move towards or away "
    "from us.",
    "Photographic plates let astronomers compare the sky night after night and find variable "
    "stars and new comets.",
    "Radio telescopes opened a second window on the sky and found pulsars, quasars and the "
    "faint glow left over from the early universe.",
)
QUESTION = "What did telescopes reveal around Jupiter?"


def demo_messages(repeats: int = 14) -> list[dict[str, str]]:
    """A ~2,000-token document (long enough to be prefilled in several chunks) and a question."""
    paragraphs = [f"Part {i + 1}. " + " ".join(DOCUMENT_TOPICS[i % len(DOCUMENT_TOPICS):]
                                               + DOCUMENT_TOPICS[:i % len(DOCUMENT_TOPICS)])
                  for i in range(repeats)]
    return [{"role": "user", "content": "\n\n".join(paragraphs) + "\n\n" + QUESTION}]


def run_demo(url: str, model: str, max_tokens: int = 48) -> dict[str, object]:
    body = json.dumps({"model": model, "messages": demo_messages(), "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=600) as reply:
        answer = json.loads(reply.read())
    seconds = time.monotonic() - started
    usage, plan = answer["usage"], answer.get("tetris", {})
    print(f"\nQ: (a {usage['prompt_tokens']}-token document) {QUESTION}")
    print(f"A: {answer['choices'][0]['message']['content'].strip()}\n")
    print(f"{usage['completion_tokens']} tokens in {seconds:.1f} s. Prefill chunk plan:")
    for c in plan.get("chunks", []):
        print(f"  tokens [{c['start_token']:5d}, {c['end_token']:5d}) on prefill instances "
              f"{c['instances']}  ({c['seconds']:.2f} s)")
    print(f"  decode on decode instance(s) {plan.get('decode_instances')}")
    return dict(answer)
