"""What tokenizing a long shared prompt costs the server, with and without engine.token_cache.

An agent resends its system prompt with every question and a chat resends its earlier turns: the
server renders the chat template and tokenizes the whole text before the engine sees it. This
script times that per request for system prompts of --lengths tokens: the template's render, the
tokenizer's own encode, and Tokenizer.encode with the segment cache on a new question (the system
prompt's ids taken from the cache) and on a first sight (every piece tokenized, the long ones
kept); then documents of --lengths tokens and a new question in one user message (RAG: the
documents' parts taken from the cache, the part with the question tokenized); then a chat of
--turns turns of ~1K tokens each, its next question; then a chat of --short-turns turns of 100-600
characters, its newest turn (every earlier turn a piece of its own). Every cached encode is
checked against the tokenizer's own ids. The last columns time the engine's conversion of the ids
in add_request (llm_engine._token_ids: packed uint32, min, max) from a plain list and from the
cache's TokenIds, which carry them packed.

The tokenizer: --tokenizer-dir (a checkpoint's tokenizer.json, chat template and config), or by
default a byte-level BPE with Qwen2's normalizer and split regex (30K vocab) trained here on the
Python standard library's sources, with the project's ChatML template. The prompts' text is
English prose from the standard library's pydoc topics.

    python benchmarks/bench_tokenizer.py
    python benchmarks/bench_tokenizer.py --tokenizer-dir /models/Qwen3-30B-A3B --lengths 8192 32768 131072
"""
from __future__ import annotations

import argparse
import glob
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.llm_engine import _token_ids  # noqa: E402
from engine.tiny import CHAT_TEMPLATE, trained_bpe  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402

STDLIB = Path(glob.__file__).parent


def qwen_like_dir(d: Path) -> Path:
    files = sorted(str(p) for p in STDLIB.glob("*.py"))[:200] + [str(STDLIB / "pydoc_data" / "topics.py")]
    tok = trained_bpe(files, 30000)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None}))
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return d


def prose(tok: Tokenizer, tokens: int, offset: int = 0) -> str:
    text = (STDLIB / "pydoc_data" / "topics.py").read_text()
    text = (text * (1 + 8 * tokens // len(text)))[offset:]
    n = len(tok._tok.encode(text[:200_000]).ids)
    chars = int(200_000 * tokens / max(n, 1))
    return text[:chars]


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer-dir", default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--turns", type=int, default=16, help="turns of the chat row (~1K tokens each)")
    ap.add_argument("--short-turns", type=int, default=120, help="turns of the short-turn chat row (100-600 characters)")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    tmp = None
    if a.tokenizer_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="kvc-bench-tok-"))
        d, what = qwen_like_dir(tmp), "a Qwen2-style byte-level BPE (30K vocab) trained on the stdlib"
    else:
        d, what = Path(a.tokenizer_dir), a.tokenizer_dir
    tok = Tokenizer(d)
    if tok.segments is None:
        sys.exit(f"{what}: the segment cache is off for this tokenizer (its log line says why)")
    hf = tok._tok

    def plain(text):
        return hf.encode_batch([text], add_special_tokens=False)[0].ids

    print(f"tokenizer: {what}; ms per request, median of {a.repeat}")
    print("| request | tokens | render | tokenizer's encode | cached: new question | cached: first sight | equal "
          "| add_request's id conversion: list / cache's TokenIds |")
    print("|---|---|---|---|---|---|---|---|")
    for L in a.lengths:
        system = {"role": "system", "content": prose(tok, L)}
        q = iter(range(10 ** 6))

        def msgs():
            return [system, {"role": "user", "content": f"Question {next(q)}: what does this say?"}]
        r_ms, text = timed(lambda: tok.apply_chat_template(msgs()), a.repeat)
        p_ms, want = timed(lambda: plain(text), a.repeat)
        tok.encode(tok.apply_chat_template(msgs()))  # the system prompt seen once
        texts = [tok.apply_chat_template(msgs()) for _ in range(a.repeat)]
        it = iter(texts)
        h_ms, _ = timed(lambda: tok.encode(next(it)), a.repeat)
        ok = all(tok.encode(t) == plain(t) for t in texts)

        def first():
            tok.segments.clear()
            return tok.encode(text)
        f_ms, got = timed(first, a.repeat)
        ok = ok and got == want
        got = tok.encode(texts[-1])
        c_list, _ = timed(lambda: _token_ids(list(want)), a.repeat)
        c_ids, _ = timed(lambda: _token_ids(got), a.repeat)
        print(f"| system prompt + question | {len(want):,} | {r_ms:.2f} | {p_ms:.1f} | **{h_ms:.2f}** | {f_ms:.1f} "
              f"| {ok} | {c_list:.3f} / {c_ids:.3f} |")

    for L in a.lengths:  # RAG: the same documents, then another question, in one user message
        docs = prose(tok, L, 4241)
        q = iter(range(10 ** 6))

        def rag():
            return tok.apply_chat_template([{"role": "user", "content": f"{docs}\n\nQuestion {next(q)}: why?"}])
        text = rag()
        p_ms, want = timed(lambda: plain(text), a.repeat)
        tok.encode(rag())  # the documents seen once
        texts = [rag() for _ in range(a.repeat)]
        it = iter(texts)
        h_ms, _ = timed(lambda: tok.encode(next(it)), a.repeat)
        ok = all(tok.encode(t) == plain(t) for t in texts)
        print(f"| documents + question in one message | {len(want):,} | - | {p_ms:.1f} | **{h_ms:.2f}** | - "
              f"| {ok} | - |")

    turns = [{"role": ("user", "assistant")[i % 2], "content": prose(tok, 1024, 9973 * (i + 1))}
             for i in range(a.turns)]
    system = {"role": "system", "content": prose(tok, a.lengths[0])}
    chat = [system] + turns
    tok.encode(tok.apply_chat_template(chat[:-1]))  # the turns before the last, seen as the chat grew
    tok.encode(tok.apply_chat_template(chat))
    text = tok.apply_chat_template(chat + [{"role": "user", "content": "And the next question?"}])
    p_ms, want = timed(lambda: plain(text), a.repeat)
    h_ms, got = timed(lambda: tok.encode(text), a.repeat)
    print(f"| chat of {a.turns} turns over a {a.lengths[0]:,}-token system prompt, its next question | "
          f"{len(want):,} | - | {p_ms:.1f} | **{h_ms:.2f}** | - | {got == want} | - |")
    src = (STDLIB / "pydoc_data" / "topics.py").read_text()
    rng = random.Random(0)
    chat = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(a.short_turns):
        o = rng.randrange(len(src) - 1000)
        chat.append({"role": ("user", "assistant")[i % 2], "content": src[o:o + rng.randrange(100, 600)]})
    tok.encode(tok.apply_chat_template(chat[:-1]))  # the chat so far, seen as it grew
    text = tok.apply_chat_template(chat)
    p_ms, want = timed(lambda: plain(text), a.repeat)
    h_ms, got = timed(lambda: tok.encode(text), a.repeat)
    print(f"| chat of {a.short_turns} short turns (100-600 characters), its newest turn | "
          f"{len(want):,} | - | {p_ms:.1f} | **{h_ms:.2f}** | - | {got == want} | - |")
    print(f"\nsegment cache: {tok.segments.hits} pieces from the cache, {tok.segments.misses} tokenized and kept")
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
