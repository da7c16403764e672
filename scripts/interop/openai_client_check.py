#!/usr/bin/env python3
"""Drives a running quantd with the official `openai` Python client (PyPI) and checks what an
OpenAI user relies on: completions, chat, streaming (with usage), logprobs, echo scoring, and
error types. Exits non-zero with a message on the first mismatch.

    python scripts/interop/openai_client_check.py --base-url http://127.0.0.1:8080/v1 \
        --api-key KEY --model smol
"""

import argparse
import math
import sys

import openai


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)

    ids = [m.id for m in client.models.list().data]
    check(args.model in ids, f"models.list contains {args.model} ({ids})")

    c = client.completions.create(model=args.model, prompt="The capital of France is",
                                  max_tokens=4, temperature=0)
    check(c.object == "text_completion", "completion object")
    check(c.choices[0].text.startswith(" Paris"), f"greedy completion {c.choices[0].text!r}")
    check(c.choices[0].finish_reason == "length", "finish_reason length")
    check(c.usage.prompt_tokens == 5 and c.usage.completion_tokens == 4, f"usage {c.usage}")

    c = client.completions.create(model=args.model, prompt="The capital of France is",
                                  max_tokens=3, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    check(len(lp.tokens) == 3 and len(lp.token_logprobs) == 3, "completion logprobs per token")
    check(all(len(t) == 2 for t in lp.top_logprobs), "two top logprobs per token")
    check(all(v <= 0 for v in lp.token_logprobs), "logprobs are log-probabilities")
    check(max(lp.top_logprobs[0].values()) == lp.token_logprobs[0],
          "greedy token is the most likely one")

    c = client.completions.create(model=args.model, prompt="The capital of France is",
                                  max_tokens=0, echo=True, logprobs=1)
    lp = c.choices[0].logprobs
    check(c.choices[0].text == "The capital of France is", "echo returns the prompt")
    check(lp.token_logprobs[0] is None and all(v < 0 for v in lp.token_logprobs[1:]),
          "echo scores the prompt")
    check(math.isfinite(sum(lp.token_logprobs[1:])), "prompt log-likelihood is finite")

    stream = client.completions.create(model=args.model, prompt="The capital of France is",
                                       max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        for ch in chunk.choices:
            text += ch.text
            finish = ch.finish_reason or finish
        usage = chunk.usage or usage
    check(text.startswith(" Paris"), f"streamed completion {text!r}")
    check(finish == "length" and usage is not None and usage.completion_tokens == 6,
          "stream finish_reason and usage")

    r = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0, logprobs=True, top_logprobs=2)
    msg = r.choices[0].message
    check(r.object == "chat.completion" and msg.role == "assistant", "chat completion shape")
    check("Paris" in msg.content, f"chat answer {msg.content!r}")
    content = r.choices[0].logprobs.content
    check(len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content),
          "chat logprobs per token")
    check(r.choices[0].finish_reason in ("stop", "length"), "chat finish_reason")

    stream = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0, stream=True)
    parts, roles = [], []
    for chunk in stream:
        for ch in chunk.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            if ch.delta.content:
                parts.append(ch.delta.content)
    check(roles == ["assistant"], "stream starts with the assistant role once")
    check("".join(parts) == msg.content, "streamed chat equals the non-streamed answer")

    r = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=30, temperature=0.8, seed=42, n=2)
    check(len(r.choices) == 2, "n=2 gives two choices")
    again = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=30, temperature=0.8, seed=42, n=2)
    check([c.message.content for c in r.choices] == [c.message.content for c in again.choices],
          "the same seed gives the same samples")

    try:
        client.completions.create(model=args.model, prompt="x", max_tokens=10**6)
        check(False, "max_tokens over the limit is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "max_tokens" in str(e), "max_tokens over the limit is a 400")
    try:
        client.completions.create(model="no-such-model", prompt="x")
        check(False, "unknown model is refused")
    except openai.NotFoundError:
        check(True, "unknown model is a 404")
    print("all checks passed")


if __name__ == "__main__":
    main()
