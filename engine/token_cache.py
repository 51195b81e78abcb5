"""Token ids of long runs of text between a tokenizer's added tokens, kept for the next request.

An agent resends its system prompt on every request, a chat all its earlier turns. Tokenizing a
32K-token system prompt takes tens of milliseconds of CPU (benchmarks/bench_tokenizer.py: 50-60 ms
with a Qwen-style byte-level BPE on the 2-core VM), several times the device-pool hit that then
reuses its KV. A chat template puts added tokens (<|im_start|>, <|im_end|>) around every message,
and a tokenizer cuts its input at added tokens first and then normalizes, pre-tokenizes and
tokenizes each piece between them on its own: a message's ids do not depend on what surrounds it.
So a piece seen before takes its ids from here, an added token is its id, and only new pieces are
tokenized: a chat's earlier turns however short, a system prompt however long.

A long piece is also kept in parts of ~4K characters, cut where a word starts (a space between two
ASCII letters, a pre-token boundary in byte-level BPEs), so a piece that starts like one seen
before (RAG documents, then another question) reuses the parts they share and tokenizes the rest.
Only under a pre-tokenizer that cuts words apart, and where a check at load (cut_check) finds that
cutting sample prose at every such place leaves its ids unchanged; otherwise pieces stay whole.

That independence is a property of the tokenizer's pipeline, so the cache is on only where it
holds: normalizers and pre-tokenizers that work on each piece alone (_PER_PIECE; not a Metaspace
that prepends to the text's first piece only), a deterministic model (no BPE dropout), added
tokens that strip no whitespace and match anywhere, no truncation or padding in tokenizer.json.
A self-check at load encodes sample texts both ways; any difference turns the cache off.
"""
from __future__ import annotations

import array
import json
import logging
import random
import re
import threading
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

log = logging.getLogger("kvc.engine")

MIN_CHARS = 2048  # texts this long go through the cache (Tokenizer.encode); shorter ones tokenize in ~0.5 ms
CUT_CHARS = 4096  # a longer piece is kept in parts of at least this many characters (_parts)
# Where a part may end: a space between two ASCII letters, where a word's pre-token starts in the
# byte-level BPEs' split regexes (GPT-2's, cl100k's, Qwen2's: " ?\p{L}+" / "[^\r\n\p{L}\p{N}]?\p{L}+").
# cut_check tries every such place of a sample text; any difference keeps pieces whole.
_WORD_START = re.compile(r"[A-Za-z] [A-Za-z]")
MAX_BYTES = 16 << 20  # all entries' estimated memory: about eight 32K-token system prompts

# Normalizers and pre-tokenizers that act on each piece between added tokens by itself.
_PER_PIECE = {
    "normalizer": {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents", "Replace",
                   "Prepend", "BertNormalizer", "Nmt", "Precompiled"},
    "pre_tokenizer": {"ByteLevel", "Split", "Whitespace", "WhitespaceSplit", "Punctuation", "Digits",
                      "BertPreTokenizer", "UnicodeScripts", "CharDelimiterSplit"},
}
_CHILDREN = {"normalizer": "normalizers", "pre_tokenizer": "pretokenizers"}


class TokenIds(list):
    """Token ids (a list) that also carry them packed as little-endian uint32 with their min and
    max: what the engine's add_request would compute from the list (~0.2 ms for 32K ids on the
    2-core VM, a C conversion per id), here joined from each piece's, kept with its ids."""
    __slots__ = ("packed", "low", "high")


class _Piece(NamedTuple):
    ids: list[int]
    packed: bytes
    low: int
    high: int


def _piece(ids: list[int]) -> _Piece:
    packed = array.array("I", ids).tobytes()  # token ids: 0 <= id < 2**32 (an OverflowError otherwise)
    if not ids:
        return _Piece(ids, packed, 0, 0)
    v = np.frombuffer(packed, dtype=np.uint32)
    return _Piece(ids, packed, int(v.min()), int(v.max()))


def _cost(text: str, piece: _Piece) -> int:
    """An entry's memory, estimated from above: each id a list slot and an int object (~40
    bytes), packed (4), the key's text at up to 4 bytes a character, and ~300 bytes of objects
    (the dict's entry, the key, the tuple, the lists)."""
    return 44 * len(piece.ids) + 4 * len(text) + 300


def _per_piece(node, kind: str) -> bool:
    if node is None:
        return True
    t = node.get("type")
    if t == "Sequence":
        return all(_per_piece(n, kind) for n in node.get(_CHILDREN[kind], []))
    if kind == "pre_tokenizer" and t == "Metaspace":  # "first" prepends to the text's first piece only
        return node.get("prepend_scheme") in ("always", "never")
    return t in _PER_PIECE[kind]


def _no_normalizer(node) -> bool:
    """None, or a Sequence of nothing (some tokenizer.json files write no normalizer as
    `{"type": "Sequence", "normalizers": []}`): normalized text is the raw text."""
    return node is None or (node.get("type") == "Sequence"
                            and all(_no_normalizer(n) for n in node.get("normalizers", [])))


def _why_not(hf, spec: dict) -> str | None:
    """Why the pieces of hf's input may not tokenize independently, or None when they do (spec:
    hf's tokenizer.json, parsed)."""
    if spec.get("truncation") or spec.get("padding"):
        return "tokenizer.json sets truncation or padding"
    if getattr(hf, "encode_special_tokens", False):
        return "special tokens are tokenized as text"
    for kind in ("normalizer", "pre_tokenizer"):
        if not _per_piece(spec.get(kind), kind):
            return f"its {kind} ({json.dumps(spec.get(kind))[:80]}) does not act on each piece alone"
    if (spec.get("model") or {}).get("dropout"):
        return "its BPE model has dropout"
    for a in hf.get_added_tokens_decoder().values():
        if a.lstrip or a.rstrip or a.single_word:
            return f"added token {a.content!r} strips whitespace or matches single words only"
        if a.normalized and not _no_normalizer(spec.get("normalizer")):
            return f"added token {a.content!r} matches in normalized text"
    return None


def _splits_at_spaces(node) -> bool:
    """Whether a pre-tokenizer cuts its input into words (so no id spans a space between two
    words): a regex Split, ByteLevel with its regex, the whitespace and BERT splitters, a
    splitting Metaspace. Without one (no pre-tokenizer, ByteLevel without its regex, a Metaspace
    that does not split) a model may hold ids across words, and parts are not cut at words."""
    if node is None:
        return False
    t = node.get("type")
    if t == "Sequence":
        return any(_splits_at_spaces(n) for n in node.get("pretokenizers", []))
    if t == "ByteLevel":
        return node.get("use_regex", True)
    if t == "Metaspace":
        return node.get("split", True)
    return t in ("Split", "Whitespace", "WhitespaceSplit", "BertPreTokenizer")


def _alternation(tokens: list[str]) -> re.Pattern | None:
    """Leftmost-longest match of any of tokens (tokenizers' added-token split), capturing."""
    if not tokens:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")


class SegmentCache:
    """Encodes texts as the tokenizer does, reusing the ids of the pieces between added tokens.

    encode() cuts the text where the tokenizer's added tokens are (those matched in the raw text
    first, then those matched after normalization, which here is none): an added token is its id;
    each piece of text between them (or each part of a long one, _parts) is looked up, and those
    not held are encoded in one encode_batch call (which lets go of the GIL and runs them in
    parallel) and kept, least recently used dropped past MAX_BYTES (_cost: the ids as Python
    ints, packed, and the text, which is the key). Kept per cache_salt: a tenant's prompt
    tokenized in a fraction of the time would tell that another tenant sent it (the timing side
    channel that cache_salt closes for the KV pages). Safe from several threads (the server
    tokenizes on worker threads)."""

    def __init__(self, hf, max_bytes: int = MAX_BYTES):
        self._hf = hf
        self.max_bytes = max_bytes
        added = list(hf.get_added_tokens_decoder().items())
        self._raw = _alternation([a.content for _, a in added if not a.normalized])
        self._normalized = _alternation([a.content for _, a in added if a.normalized])
        self._token = {a.content: _piece([i]) for i, a in added}  # an added token's text -> its id
        self._held: OrderedDict[tuple[str, str], _Piece] = OrderedDict()  # (salt, piece) -> its ids
        self.cut_chars: int | None = CUT_CHARS  # None: long pieces are kept whole (_parts)
        self._size = 0  # the entries' _cost in bytes
        self._lock = threading.Lock()
        self.hits = self.misses = 0  # pieces taken from here / tokenized and kept

    @staticmethod
    def for_tokenizer(hf) -> "SegmentCache | None":
        """A cache for hf, or None (with the reason logged once) where its pieces may not
        tokenize independently or its self-check fails."""
        try:
            spec = json.loads(hf.to_str())  # once: a 151K-vocab tokenizer.json is megabytes
            why = _why_not(hf, spec)
        except AttributeError as e:  # a tokenizers release without get_added_tokens_decoder
            why = f"this tokenizers release cannot list its added tokens ({e})"
        if why is None:
            cache = SegmentCache(hf)
            why = cache.self_check()
            if why is None:
                cut = cache.cut_check(spec)
                if cut is not None:
                    cache.cut_chars = None
                    log.info("tokenizer: long prompt pieces are kept whole, not in parts (%s)", cut)
                cache.hits = cache.misses = 0
                return cache
        log.info("tokenizer: prompts are tokenized whole every time, no pieces kept (%s)", why)
        return None

    def self_check(self) -> str | None:
        """Sample texts around every added token, encoded whole and piece by piece (twice, the
        second from the cache); a description of the first difference, or None."""
        added = [a.content for a in self._hf.get_added_tokens_decoder().values()][:32] or [""]
        bits = ["Hello world", " x  y ", "\n\n  z\t", "é ü 12 345 ǅ", "  ", "\n", "a.b,c;d", "'s 're"]
        texts = ["".join(b + t for b, t in zip(bits * 2, added * 2)) + "tail",
                 "".join(t + b for b, t in zip(bits, added * 8)), " ".join(added) + " end\n"]
        try:
            for text in texts:
                whole = self._hf.encode_batch([text], add_special_tokens=False)[0].ids
                for attempt in ("first", "from the cache"):
                    got = self.encode(text)
                    if got != whole:
                        return f"self-check: {text[:40]!r} piece by piece ({attempt}) differs from whole"
        finally:
            self.clear()
        return None

    def cut_check(self, spec: dict | None = None) -> str | None:
        """Why long pieces may not be cut where a word starts, or None: the pre-tokenizer must
        cut words apart (_splits_at_spaces), and sample prose encoded whole must equal its parts
        cut at every place _WORD_START allows, encoded apart. spec: the parsed tokenizer.json, if
        the caller has it."""
        if spec is None:
            spec = json.loads(self._hf.to_str())
        if not _splits_at_spaces(spec.get("pre_tokenizer")):
            return "its pre-tokenizer does not cut words apart"
        words = ("the cache's pages, e.g. a KV page: it's 16 tokens. Don't re-read them; Mr. Smith "
                 "said x y z A B C. CamelCase snake_case x86 3 cats 42nd (see p. 7) and/or 'quoted' "
                 "\"double\" [a] {b} c-d e+f. I'll, we've, they're, he'd; OK? Yes! ...no\n\nnew para\t"
                 "tab a\u00e9b caf\u00e9 au lait \u4e2d\u6587 a \U0001F600 b").split(" ")
        rng = random.Random(0)
        text = " ".join(rng.choice(words) for _ in range(3000))
        cuts = [m.start() + 1 for m in _WORD_START.finditer(text)]
        if not cuts:
            return "the sample has no place to cut"
        parts = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        whole = self._hf.encode_batch([text], add_special_tokens=False)[0].ids
        apart = [i for e in self._hf.encode_batch(parts, add_special_tokens=False) for i in e.ids]
        return None if apart == whole else "a word's start is not a pre-token boundary of this tokenizer"

    def _parts(self, piece: str) -> list[str]:
        """piece in parts of at least cut_chars characters (the last one shorter), each ending
        where _WORD_START finds the next word after cut_chars: the same parts for the same text
        from the piece's start, so pieces that start alike share their first parts."""
        if self.cut_chars is None or len(piece) < 2 * self.cut_chars:
            return [piece]
        out, start = [], 0
        while True:
            m = _WORD_START.search(piece, start + self.cut_chars)
            if m is None:
                break
            out.append(piece[start:m.start() + 1])
            start = m.start() + 1
        out.append(piece[start:])
        return out

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self._size = 0

    def _split(self, text: str) -> list[tuple[str, bool]]:
        """(string, is text) in order: the text between added tokens and the added tokens, cut
        where the tokenizer cuts (tokens matched in the raw text, then in each piece between them
        those matched after normalization, which is the raw text here: no normalizer then)."""
        out: list[tuple[str, bool]] = []
        for i, p in enumerate(self._raw.split(text) if self._raw is not None else [text]):
            if i % 2:
                out.append((p, False))
            elif self._normalized is not None:
                out += [(q, j % 2 == 0) for j, q in enumerate(self._normalized.split(p))]
            else:
                out.append((p, True))
        return out

    def _units(self, text: str) -> list[tuple[str, _Piece | None]]:
        """(text, None) for each piece of text (each part of a long one) to look up or encode,
        (added token, its id) for each added token, in order."""
        units: list[tuple[str, _Piece | None]] = []
        for p, is_text in self._split(text):
            if not is_text:
                units.append((p, self._token[p]))
            elif p:
                units += [(q, None) for q in self._parts(p)]
        return units

    def encode(self, text: str, salt: str = "") -> TokenIds:
        units = self._units(text)
        got = [g for _, g in units]
        with self._lock:
            for i, (u, g) in enumerate(units):
                if g is None:
                    held = self._held.get((salt, u))
                    if held is not None:
                        self._held.move_to_end((salt, u))
                        self.hits += 1
                        got[i] = held
        todo = [i for i, g in enumerate(got) if g is None]
        if todo:
            for i, enc in zip(todo, self._hf.encode_batch([units[i][0] for i in todo], add_special_tokens=False)):
                got[i] = _piece(enc.ids)
            with self._lock:
                for i in todo:
                    u = units[i][0]
                    if (salt, u) not in self._held and _cost(u, got[i]) <= self.max_bytes:
                        self._held[salt, u] = got[i]
                        self._size += _cost(u, got[i])
                        self.misses += 1
                while self._size > self.max_bytes:
                    (_, u), piece = self._held.popitem(last=False)
                    self._size -= _cost(u, piece)
        out = TokenIds()
        for g in got:
            out += g.ids
        out.packed = b"".join([g.packed for g in got])
        kept = [g for g in got if g.ids]
        out.low = min(g.low for g in kept) if kept else 0
        out.high = max(g.high for g in kept) if kept else 0
        return out
