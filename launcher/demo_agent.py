"""The demo's example agent: a short conversation with the official SDKs.

A plain agent that knows nothing of the sidecar: it reads ANTHROPIC_BASE_URL /
OPENAI_BASE_URL like any agent, streams some answers and not others.
"""

from __future__ import annotations

import time

import anthropic
import openai

MODEL = "claude-demo-1"


def main() -> None:
    claude = anthropic.Anthropic(api_key="sk-ant-demo-key-not-real")
    history: list[dict] = []
    for turn, (prompt, stream) in enumerate([("Plan a tiny CLI tool.", False), ("Now write its README.", True),
                                             ("Summarise both in one line.", False)], 1):
        history.append({"role": "user", "content": prompt})
        start = time.perf_counter()
        if stream:
            with claude.messages.stream(model=MODEL, max_tokens=200, messages=history) as events:
                reply = events.get_final_message()
        else:
            reply = claude.messages.create(model=MODEL, max_tokens=200, messages=history)
        text = reply.content[0].text
        history.append({"role": "assistant", "content": text})
        print(f"  turn {turn} ({'streamed' if stream else 'json'}, {time.perf_counter() - start:.2f}s): {text[:48]}...")
    gpt = openai.OpenAI(api_key="sk-demo-key-not-real")
    start = time.perf_counter()
    answer = gpt.chat.completions.create(model="gpt-demo-1", messages=[{"role": "user", "content": "Say hello."}])
    print(f"  openai   (json, {time.perf_counter() - start:.2f}s): {answer.choices[0].message.content[:48]}...")


if __name__ == "__main__":
    main()
