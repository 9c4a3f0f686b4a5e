"""Byte-level BPE tokenizer: exact CS336 training, cached encoding, GPT-2's file format.

    python bpe.py train --input=data/shakespeare_train.txt.gz --vocab_size=10000 --out_dir=data/shakes10k
    python bpe.py stats --tokenizer=data/shakes10k --input=data/shakespeare_val.txt.gz
    python bpe.py encode --tokenizer=data/shakes10k --input=data/shakespeare_val.txt.gz --out=data/val.bin
    (options: --special_tokens=A,B (default <|endoftext|>), --num_workers=N for train/encode (default: all cores),
    --force=True for train to replace the tokenizer already in --out_dir; encode replaces only an existing .bin)

Ids from train_bpe: the special tokens first (0..k-1, so `<|endoftext|>` is 0), then the 256 single bytes
in byte order, then the new tokens in merge order. Code should not rely on this: `tok.special_ids[EOT]`
(equal to `tok.encode(EOT)[0]`) works for GPT-2's own files too, where it is 50256.

Files: vocab.json maps each token, its bytes spelled in GPT-2's byte-to-unicode alphabet, to its id;
merges.txt lists the merges `a b` in creation order after a `#version` line. Training follows rustbpe
(parallel counting of unique pre-tokens, incremental pair counts, lazy max-heap) with CS336's tie-break.
"""
import collections
import contextlib
import functools
import gc
import gzip
import heapq
import io
import json
import math
import multiprocessing
import operator
import os
import re
import resource
import signal
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, repeat

import numpy as np
import regex

# GPT-2's pre-tokenizer: contractions, then letter, digit and punctuation runs (each with one optional
# leading space), then whitespace; `\s+(?!\S)` leaves a run's last space to start the next word.
PAT = regex.compile(r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
EOT = "<|endoftext|>"
_BYTES = [bytes([b]) for b in range(256)]  # the one-byte tokens, indexed by byte value
_WS_CUT = regex.compile(r"(?r)\S(?=\s)")  # searched in reverse: the last non-space char before a space
# Whitespace as PAT's \s sees it (Unicode White_Space; str.isspace adds \x1c-\x1f; a test checks every code point).
# A segment (" said,") is a whitespace run then a non-whitespace run; both its ends are safe cuts (cut_point), so
# it pre-tokenizes alone as in its text. encode caches segments, which the stdlib `re` finds ~3x faster than PAT.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
SEGMENT = re.compile(f"[{_WS}]*[^{_WS}]+|[{_WS}]+")
Pair = tuple[bytes, bytes]
_NO_MERGE = (math.inf, None, None)  # what Tokenizer._encode_word sees for a pair that is not a merge


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, so every token is a readable JSON string.

    Printable Latin-1 bytes stand for themselves, the other 68 take the characters from U+0100 on:
    >>> bytes_to_unicode()[ord("a")], bytes_to_unicode()[ord(" ")], bytes_to_unicode()[ord("\\n")]
    ('a', 'Ġ', 'Ċ')
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


_B2U = bytes_to_unicode()
_U2B = {c: b for b, c in _B2U.items()}


def _to_unicode(token: bytes) -> str:
    return "".join(_B2U[b] for b in token)


def _from_unicode(text: str, path: str) -> bytes:
    try:
        return bytes(_U2B[c] for c in text)
    except KeyError as e:
        raise ValueError(f"{path}: token {text!r} has {e.args[0]!r}, which is not in GPT-2's byte alphabet") from None


class _Specials:
    """Special tokens: finds them in text, and finds places where a stream of text can be cut safely."""

    def __init__(self, tokens: Iterable[str]):
        self.tokens = sorted(set(tokens), key=lambda t: (-len(t), t))  # longest first: longest match wins
        if "" in self.tokens:
            raise ValueError("special tokens must be non-empty strings")
        self.longest = len(self.tokens[0]) if self.tokens else 0
        self.pattern = regex.compile("(" + "|".join(map(regex.escape, self.tokens)) + ")") if self.tokens else None

    def split(self, text: str) -> list[str]:
        """Plain text at even positions, special tokens at odd ones.

        >>> _Specials(["<|a|>", "<|a|><|a|>"]).split("x<|a|><|a|>\\n<|a|>")
        ['x', '<|a|><|a|>', '\\n', '<|a|>', '']
        """
        return self.pattern.split(text) if self.pattern else [text]

    def recut(self, stream: Iterable[str], prefer_documents: bool = False) -> Iterator[str]:
        """The same text as stream, cut only at safe points (see cut_point); holds just the uncut tail."""
        tail = ""
        for piece in stream:
            tail += piece
            if p := self.cut_point(tail, prefer_documents):
                yield tail[:p]
                tail = tail[p:]
        if tail:
            yield tail

    def pieces(self, text: str, size: int = 1 << 15) -> Iterator[str]:
        """text cut safely into pieces of about `size` characters. Pre-tokenizing one piece at a time keeps
        the pre-token strings in CPU cache: 1.2-1.5x faster than one findall over a 1 MB chunk."""
        return self.recut(text[i:i + size] for i in range(0, len(text), size))

    def cut_point(self, text: str, prefer_documents: bool = False) -> int:
        """Largest p such that text[:p] and text[p:] encode to the ids of text, whatever follows text in its
        stream (0 when no cut is certain yet).

        Safe cuts: (a) the end of a special token, once no longer special can start at its position;
        (b) between a non-space and a space character (`word| next`): no pre-token spans it, and the
        pre-token regex has no lookbehind and looks ahead only from a whitespace run, so both halves
        pre-tokenize as in the whole. For (b) we need `longest - 1` more characters to see that no special
        token straddles the cut. prefer_documents takes (a) when there is one, so chunks hold whole documents.
        >>> _Specials([]).cut_point("one two three")  # "one two" | " three"
        7
        """
        end = 0
        if self.pattern:
            for m in self.pattern.finditer(text):
                if m.start() + self.longest <= len(text):
                    end = m.end()
        if prefer_documents and end:
            return end
        last = len(text) - max(self.longest - 1, 1)  # a cut of kind (b) needs this many characters after it
        m = _WS_CUT.search(text, end, last + 1) if last > end else None
        return m.end() if m else end


class _Progress(contextlib.AbstractContextManager):  # `with` returns the object itself
    """One status line for a long pass, on stdout: rewritten in place on a terminal (4 times a second), a line
    per 10% in a log, nothing for passes under quiet_s; leaving the `with` block prints the total. For example
    `encoding data/owt_train.txt: 4,125/11,100 MB (37%) | 35.2 MB/s | eta 3m18s`."""

    def __init__(self, label: str, total: int, unit: str = "MB", scale: float = 1e6, quiet_s: float = 2.0):
        self.label, self.total, self.unit, self.scale, self.quiet_s = label, max(total, 1), unit, scale, quiet_s
        self.tty, self.t0, self.shown, self.done = sys.stdout.isatty(), time.perf_counter(), 0.0, 0

    def update(self, done: int) -> None:
        """done of total units are finished: print a line if one is due."""
        elapsed, tenth = time.perf_counter() - self.t0, 10 * done // self.total > 10 * self.done // self.total
        self.done = done
        if elapsed >= self.quiet_s and (elapsed - self.shown >= 0.25 if self.tty else tenth):
            rate, left = done / self.scale / elapsed, (self.total - done) / self.scale
            self._show(f"{done / self.scale:,.0f}/{self.total / self.scale:,.0f} {self.unit} ({done / self.total:.0%}) "
                       f"| {rate:,.1f} {self.unit}/s | eta {hms(left / rate if rate else 0)}")
            self.shown = elapsed

    def __exit__(self, *exc) -> None:
        elapsed = time.perf_counter() - self.t0
        if self.shown:
            self._show(f"{self.done / self.scale:,.0f} {self.unit} in {hms(elapsed)} "
                       f"({self.done / self.scale / elapsed:,.1f} {self.unit}/s)", end="\n")

    def _show(self, text: str, end: str = "") -> None:
        line = f"{self.label}: {text}"  # on a terminal: back to the line start, print, clear what is left (ANSI)
        print(f"\r{line}\x1b[K" if self.tty else line, end=end if self.tty else "\n", flush=True)


def hms(seconds: float) -> str:
    """Seconds as a short duration for progress lines: 75 -> '1m15s', 4000 -> '1h06m'."""
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _read_chunks(path: str, specials: _Specials, chunk_chars: int = 1 << 20,
                 progress: _Progress | None = None) -> Iterator[str]:
    """Stream a .txt or .txt.gz file as pieces of about chunk_chars characters that end after a special
    token (a document boundary), or at whitespace inside a document longer than a chunk. progress, if
    given, is told how many bytes of the file (compressed bytes for .gz) have been read."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; give a .txt or .txt.gz file")
    with open(path, "rb") as raw:  # raw.tell(): how far into the file the reading is
        binary = gzip.GzipFile(fileobj=raw) if str(path).endswith(".gz") else raw
        with io.TextIOWrapper(binary, encoding="utf-8", newline="") as f:  # newline="": keep "\r\n" as in the file
            def read() -> str:
                text = f.read(chunk_chars)
                if progress:
                    progress.update(raw.tell())
                return text
            try:
                yield from specials.recut(iter(read, ""), prefer_documents=True)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8") from None
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # an interrupted download, or not gzip at all
                raise ValueError(f"{path} is a truncated or corrupt gzip file ({e}); download it again") from None


def _parallel_map(fn: Callable, items: Iterable, num_workers: int | None, init=None, init_args=(),
                  finish: Callable | None = None) -> Iterator:
    """map(fn, items) in order on a process pool, then, if given, the result of finish() run once in each
    worker. At most 2 * num_workers items are in flight, so a streamed input is never read far ahead
    (Pool.imap would queue the whole file). 1 worker runs inline."""
    num_workers = num_workers or os.cpu_count()
    if num_workers == 1:
        if init:
            init(*init_args)
        yield from map(fn, items)
        if finish:
            yield finish()
        return
    barrier = multiprocessing.Barrier(num_workers) if finish else None  # see _finish_worker
    with multiprocessing.Pool(num_workers, _init_worker, (init, init_args, barrier)) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        if finish:
            yield from pool.map(functools.partial(_finish_worker, finish), range(num_workers), chunksize=1)
        pool.close()
        pool.join()


_worker_barrier = None  # a pool worker's copy of _parallel_map's barrier


def _init_worker(init: Callable | None, init_args: tuple, barrier) -> None:
    """Pool workers ignore Ctrl-C: the main process gets it and, leaving the pool, stops them (no traceback each)."""
    global _worker_barrier
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_barrier = barrier
    if init:
        init(*init_args)


def _finish_worker(finish: Callable, _) -> object:
    """One of num_workers finish tasks. A worker that takes one waits here until every worker has taken
    one, so no worker takes two: each runs finish exactly once."""
    _worker_barrier.wait()
    return finish()


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """Write to path + '.tmp' and rename it over path only if the block succeeds: an error or a crash
    never leaves a partial file under the real name."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable(what: str, folder: str) -> None:
    """A one-line error naming what (e.g. 'out_dir=out/x') when folder, made if missing, could not be written: the
    nearest folder of it that exists must be a directory you can write to. Checked before hours of work."""
    existing = os.path.abspath(folder or ".")
    while not os.path.exists(existing):  # the rest will be made in it
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{what} cannot be written: {existing} is a file, not a directory; pick another")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} cannot be written: {existing} is not a folder you can write to; pick another")


# ----------------------------------------------------------------------------------------------- training

def _count_chunk(text: str, special_tokens: tuple[str, ...], counts: collections.Counter) -> collections.Counter:
    """Add the pre-token counts of one chunk to counts; special tokens are cut out and never counted.

    >>> _count_chunk("the cat<|endoftext|>the", ("<|endoftext|>",), collections.Counter())
    Counter({'the': 2, ' cat': 1})
    """
    specials = _Specials(special_tokens)
    for piece in specials.pieces(text):
        for plain in specials.split(piece)[::2]:
            counts.update(PAT.findall(plain))  # findall + Counter: both loops run in C
    return counts


_worker_counts: collections.Counter | None = None  # a counting worker's table (see count_pretokens)


def _fresh_table() -> collections.Counter | None:
    """Give this worker an empty table; return the one it had (None at the start)."""
    global _worker_counts
    table, _worker_counts = _worker_counts, collections.Counter()
    return table


def _count_into_table(text: str, special_tokens: tuple[str, ...], table_size: int) -> collections.Counter | None:
    """Count a chunk into this worker's table; once the table holds table_size pre-tokens, hand it over."""
    _count_chunk(text, special_tokens, _worker_counts)
    return _fresh_table() if len(_worker_counts) >= table_size else None


def count_pretokens(input_path: str, special_tokens: Iterable[str], num_workers: int | None = None,
                    chunk_chars: int = 1 << 20, table_size: int = 1 << 20) -> collections.Counter:
    """Pre-token counts of a whole file. Document-aligned chunks are counted in a pool; each worker sums its
    chunks into its own table, handed over at table_size entries and at the end, so the main process adds a
    few big tables rather than one per chunk (which capped the pool near two workers' speed on varied text).
    Memory holds a few chunks, the workers' tables and the table of unique pre-tokens, never the file."""
    special_tokens = tuple(special_tokens)
    count = functools.partial(_count_into_table, special_tokens=special_tokens, table_size=table_size)
    with _Progress(f"counting pre-tokens in {input_path}", os.path.getsize(input_path)) as progress:
        chunks = _read_chunks(input_path, _Specials(special_tokens), chunk_chars, progress)
        tables = filter(None, _parallel_map(count, chunks, num_workers, _fresh_table, finish=_fresh_table))
        total = next(tables, collections.Counter())  # the first table becomes the total, without a copy
        for table in tables:
            total.update(table)
    return total


class _Greatest:
    """Heap key for a pair. heapq pops the smallest entry, so the comparison is inverted: among pairs of
    equal count the lexicographically greatest (bytes, bytes) pops first, as CS336 specifies."""
    __slots__ = ("key", "pair")

    def __init__(self, key: str, tokens: list[bytes]):
        self.key, self.pair = key, (tokens[ord(key[0])], tokens[ord(key[1])])

    def __lt__(self, other: "_Greatest") -> bool:
        return self.pair > other.pair


def _pop_most_frequent(heap: list, pair_counts: dict[str, int]) -> str | None:
    """Pop the most frequent pair. Entries are (-count, key) and a count may since have dropped:
    such a stale entry is pushed back with its current count. None when no pair is left."""
    while heap:
        neg_count, entry = heapq.heappop(heap)
        count = pair_counts.get(entry.key, 0)
        if count == -neg_count:
            return entry.key
        if count > 0:
            heapq.heappush(heap, (-count, entry))
    return None


def _apply_merge(pair: str, new: str, words: list[str], counts: list[int], pair_counts: dict, where: dict,
                 heap: list, tokens: list[bytes]) -> None:
    """Replace pair by the token new in the words that hold it, and update the pair counts. Only pairs next
    to an occurrence change: in x a b y, (x, a) (a, b) (b, y) become (x, ab) (ab, y). `where[p]` may still
    list words that lost p in an earlier merge; find skips those."""
    a, b = pair
    delta = collections.defaultdict(int)
    for w in where.pop(pair):
        word, count = words[w], counts[w]
        end, i = -1, word.find(pair)  # end: where the previous occurrence ended
        while i >= 0:
            delta[pair] -= count
            if i > 0:  # x is the new token itself when the previous occurrence ended here: (b, a) -> (ab, ab)
                delta[word[i - 1] + a] -= count
                grown = (new if i == end else word[i - 1]) + new
                delta[grown] += count
                where[grown].add(w)
            if i + 2 < len(word) and word[i + 2:i + 4] != pair:  # a y that starts the next occurrence is its x
                delta[b + word[i + 2]] -= count
                grown = new + word[i + 2]
                delta[grown] += count
                where[grown].add(w)
            end = i + 2
            i = word.find(pair, end)
        words[w] = word.replace(pair, new)
    for p, d in delta.items():
        pair_counts[p] += d
        if pair_counts[p] == 0:
            del pair_counts[p]
            where.pop(p, None)
        elif d > 0:  # a grown count needs a fresh entry; a shrunk one is refreshed lazily when popped
            heapq.heappush(heap, (-pair_counts[p], _Greatest(p, tokens)))


def learn_merges(pretoken_counts: dict[str, int], num_new_tokens: int) -> list[Pair]:
    """Merge the most frequent adjacent pair of tokens until num_new_tokens new tokens exist or no pair is
    left. Each unique pre-token is a word of byte tokens weighted by its count; pair_counts and `where`
    (pair -> words holding it) are updated incrementally, so a merge touches only the words it changes.
    A word is a str with one character per token, chr(id), so finding and merging a pair (a two-character
    str) are str.find and str.replace, both in C."""
    tokens = list(_BYTES)  # id -> bytes; a byte's id is its value, so latin-1 decoding spells a word
    ids = {token: i for i, token in enumerate(tokens)}
    words = [w.encode("utf-8").decode("latin-1") for w in pretoken_counts]
    counts, merges = list(pretoken_counts.values()), []
    with _gc_paused(), _Progress("merging", num_new_tokens, unit="tokens", scale=1) as progress:
        pair_counts, where = collections.defaultdict(int), collections.defaultdict(set)
        for w, (word, count) in enumerate(zip(words, counts)):
            for pair in map(operator.add, word, word[1:]):  # one object per pair, shared by both tables
                pair_counts[pair] += count
                where[pair].add(w)
        heap = [(-count, _Greatest(pair, tokens)) for pair, count in pair_counts.items()]
        heapq.heapify(heap)
        while len(tokens) < 256 + num_new_tokens and (pair := _pop_most_frequent(heap, pair_counts)):
            a, b = tokens[ord(pair[0])], tokens[ord(pair[1])]
            merges.append((a, b))
            if a + b not in ids:  # the same bytes made by another merge earlier keep their id
                ids[a + b] = len(tokens)
                tokens.append(a + b)
            _apply_merge(pair, chr(ids[a + b]), words, counts, pair_counts, where, heap, tokens)
            progress.update(len(tokens) - 256)
    return merges


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cycle collector. The merge tables are millions of sets, strs and tuples without a
    single reference cycle, and every full collection would walk them all: pausing saves 20-30%."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def train_bpe(input_path: str, vocab_size: int, special_tokens: Iterable[str],
              num_workers: int | None = None) -> tuple[dict[int, bytes], list[Pair]]:
    """Train byte-level BPE on a .txt or .txt.gz file; returns (id -> token bytes, merges in creation order).

    Ids: special tokens 0..k-1, then the 256 bytes, then new tokens in merge order. Should a merge make
    bytes that already are a token (the same bytes split another way), it is listed but adds no id.
    """
    special_tokens = list(dict.fromkeys(special_tokens or ()))
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} is too small: 256 bytes + {len(special_tokens)} special "
                         f"tokens need at least {256 + len(special_tokens)}")
    counts = count_pretokens(input_path, special_tokens, num_workers)
    if not counts:
        raise ValueError(f"{input_path} holds no text to train on (empty, or only special tokens); use a text file")
    merges = learn_merges(counts, vocab_size - 256 - len(special_tokens))
    tokens = [s.encode("utf-8") for s in special_tokens] + _BYTES + [a + b for a, b in merges]
    return dict(enumerate(dict.fromkeys(tokens))), merges


# ---------------------------------------------------------------------------------------------- tokenizer

class _Cache(dict):
    """text -> ids, filled on a miss by encode; emptied at 2**20 entries to bound its memory."""

    def __init__(self, encode: Callable[[str], tuple[int, ...]]):
        super().__init__()
        self.encode = encode

    def __missing__(self, text: str) -> tuple[int, ...]:
        if len(self) >= 1 << 20:
            self.clear()
        ids = self[text] = self.encode(text)
        return ids


class Tokenizer:
    """Encodes text to token ids and back, given a vocabulary, its merges and the special tokens.

    >>> tok = Tokenizer({0: b"<|endoftext|>", **{1 + b: bytes([b]) for b in range(256)}, 257: b"ab"},
    ...                 [(b"a", b"b")], ["<|endoftext|>"])
    >>> tok.encode("abc<|endoftext|>"), tok.decode([257, 100])
    ([257, 100, 0], 'abc')
    """

    def __init__(self, vocab: dict[int, bytes], merges: list[Pair], special_tokens: Iterable[str] | None = None):
        self.vocab, self.merges = dict(vocab), list(merges)
        self.ids = {token: i for i, token in sorted(self.vocab.items(), reverse=True)}  # lowest id wins
        special_tokens = list(dict.fromkeys(special_tokens or ()))
        for token in map(str.encode, special_tokens):
            if token not in self.ids:  # a special token missing from the vocabulary is appended
                self.ids[token] = max(self.vocab, default=-1) + 1
                self.vocab[self.ids[token]] = token
        self.special_ids = {s: self.ids[s.encode()] for s in special_tokens}
        self._specials = _Specials(self.special_ids)
        self._check()
        # _encode_word spells a pre-token with one character per token, chr(id), so a merge is a str.replace
        self._byte_chars = [chr(self.ids[b]) for b in _BYTES]  # str.translate table for latin-1 text
        chars = {token: chr(i) for token, i in self.ids.items()}
        self._char_ids = {chr(i): i for i in self.ids.values()}
        self._merge_of = {chars[a] + chars[b]: (rank, chars[a] + chars[b], chars[a + b])  # pair -> (rank, pair, merged)
                          for rank, (a, b) in enumerate(self.merges)}
        self._cache = _Cache(self._encode_segment)  # segment (see SEGMENT) or pre-token -> ids

    def _check(self) -> None:
        missing = [b for b in _BYTES if b not in self.ids]
        if missing:
            raise ValueError(f"the vocabulary lacks {len(missing)} of the 256 single bytes (e.g. {missing[0]!r})")
        for rank, (a, b) in enumerate(self.merges):
            if a not in self.ids or b not in self.ids or a + b not in self.ids:
                raise ValueError(f"merge {rank} ({a!r}, {b!r}) uses or makes a token that is not in the vocabulary")

    @classmethod
    def from_files(cls, vocab_path: str, merges_path: str, special_tokens: Iterable[str] | None = None) -> "Tokenizer":
        """Load vocab.json + merges.txt in GPT-2's format (ours or GPT-2's own). Files that parse but do not fit
        together (a merge of unknown tokens, tokens no merge makes: an empty or cut merges.txt) are refused."""
        vocab, merges, special_tokens = _read_vocab(vocab_path), _read_merges(merges_path), list(special_tokens or ())
        made = set(_BYTES) | {a + b for a, b in merges} | {s.encode() for s in special_tokens}
        unmade = [t for t in vocab.values() if t not in made]
        if unmade:
            raise ValueError(f"{merges_path}: {len(merges)} merges make only part of {vocab_path} ({len(unmade)} "
                             f"tokens such as {unmade[0]!r} are neither a byte, a merge nor a special token); "
                             "use the merges.txt saved with that vocab.json, or pass its special tokens")
        try:
            return cls(vocab, merges, special_tokens)
        except ValueError as e:
            raise ValueError(f"{merges_path} does not fit {vocab_path}: {e}") from None

    def save(self, vocab_path: str, merges_path: str) -> None:
        """Write vocab.json + merges.txt in GPT-2's format; neither file is replaced unless both are written.
        merges.txt is renamed into place first (the inner `with` exits first), so a save cut between the renames
        leaves merges.txt without vocab.json, never vocab.json without merges.txt: data.py relies on this."""
        with atomic_write(vocab_path) as fv, atomic_write(merges_path) as fm:
            json.dump({_to_unicode(t): i for i, t in sorted(self.vocab.items())}, fv, ensure_ascii=False)
            fm.write("#version: 0.2\n")
            fm.writelines(f"{_to_unicode(a)} {_to_unicode(b)}\n" for a, b in self.merges)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-token: merge the lowest-ranked adjacent pair (every occurrence, as in training)
        until no adjacent pair is a merge. With merges [(t,h), (th,e)]: t h e -> th e -> the."""
        parts = word.encode("utf-8").decode("latin-1").translate(self._byte_chars)
        if len(parts) > 32:  # each round below costs O(length): a long pre-token would cost O(length^2)
            return tuple(map(self._char_ids.__getitem__, self._merge_long(parts)))
        while len(parts) > 1:
            rank, pair, merged = min(map(self._merge_of.get, map(operator.add, parts, parts[1:]), repeat(_NO_MERGE)))
            if pair is None:
                break
            parts = parts.replace(pair, merged)
        return tuple(map(self._char_ids.__getitem__, parts))  # the ints of self.ids, not a new int per token

    def _merge_long(self, parts: str) -> str:
        """The rounds of _encode_word in O(n log n): a linked list of the parts and a heap of (rank, position)
        of their adjacent pairs. A round merges its rank at each position left to right; the pairs it makes
        wait for the next round, as they do in _encode_word."""
        tokens = [*parts, ""]  # "" marks a position merged away, and the end
        after, before = list(range(1, len(tokens) + 1)), list(range(-1, len(tokens) - 1))  # live neighbours

        def rank_at(i: int) -> float:  # of the pair that starts at position i
            return self._merge_of.get(tokens[i] + tokens[after[i]], _NO_MERGE)[0]

        heap = [(rank_at(i), i) for i in range(len(parts) - 1)]
        heapq.heapify(heap)
        while heap and heap[0][0] < math.inf:
            rank, changed = heap[0][0], []
            while heap and heap[0][0] == rank:
                i = heapq.heappop(heap)[1]
                if tokens[i] and rank_at(i) == rank:  # not merged away, and its pair unchanged since pushed
                    j = after[i]
                    tokens[i], tokens[j] = self._merge_of[tokens[i] + tokens[j]][2], ""
                    after[i], before[after[j]] = after[j], i
                    changed += [before[i], i]  # the pairs that start there are new
            for i in changed:
                if i >= 0 and tokens[i]:
                    heapq.heappush(heap, (rank_at(i), i))
        return "".join(tokens)

    def _encode_segment(self, segment: str) -> tuple[int, ...]:
        """Ids of a segment: most are one pre-token; the others join the cached ids of their pre-tokens. A
        pre-token pre-tokenizes to itself, so one cache serves segments and pre-tokens alike."""
        words = PAT.findall(segment)
        if len(words) == 1:
            return self._encode_word(segment)
        return tuple(chain.from_iterable(map(self._cache.__getitem__, words)))

    def encode(self, text: str) -> list[int]:
        """Ids of text: each special token is its own id; the text between them is cut into segments, and
        each distinct segment is pre-tokenized and encoded once, then looked up (the loop runs in C)."""
        ids = []
        for piece in self._specials.pieces(text):
            for i, part in enumerate(self._specials.split(piece)):
                if i % 2:
                    ids.append(self.special_ids[part])
                else:
                    ids.extend(chain.from_iterable(map(self._cache.__getitem__, SEGMENT.findall(part))))
        return ids

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Lazily encode a stream of strings (say a file's lines) to the ids of encode on their concatenation.
        The stream is re-cut at safe points, so only an uncut tail is held, never the whole stream."""
        for piece in self._specials.recut(iterable):
            yield from self.encode(piece)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; bytes that are not valid UTF-8 become U+FFFD."""
        try:
            data = b"".join(map(self.vocab.__getitem__, ids))
        except KeyError as e:
            raise ValueError(f"cannot decode id {e.args[0]!r}: ids run from 0 to {self.vocab_size - 1}") from None
        return data.decode("utf-8", errors="replace")


def _read_utf8(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        try:
            return f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8") from None


def _read_vocab(path: str) -> dict[int, bytes]:
    try:
        table = json.loads(_read_utf8(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not (isinstance(table, dict) and all(type(i) is int for i in table.values())
            and sorted(table.values()) == list(range(len(table)))):
        raise ValueError(f"{path}: expected a JSON object mapping tokens to the ids 0..N-1, each once")
    return {i: _from_unicode(token, path) for token, i in table.items()}


def _read_merges(path: str) -> list[Pair]:
    merges = []
    for n, line in enumerate(_read_utf8(path).split("\n"), 1):
        if (n == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split()  # GPT-2's alphabet has no whitespace, so split() is exact
        if len(parts) != 2:
            raise ValueError(f"{path}, line {n}: expected two tokens separated by a space, got {line.strip()!r}")
        merges.append((_from_unicode(parts[0], path), _from_unicode(parts[1], path)))
    return merges


# ------------------------------------------------------------------------------------- helpers for data prep

def load_tokenizer(tokenizer_dir: str, special_tokens: Iterable[str] = (EOT,)) -> Tokenizer:
    """The tokenizer saved in tokenizer_dir (vocab.json + merges.txt)."""
    paths = [os.path.join(tokenizer_dir, name) for name in ("vocab.json", "merges.txt")]
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found; make it with: python bpe.py train --input=FILE "
                                    f"--vocab_size=N --out_dir={tokenizer_dir}")
    return Tokenizer.from_files(*paths, special_tokens=special_tokens)


def train_tokenizer(input_path: str, vocab_size: int, out_dir: str, special_tokens: Iterable[str] = (EOT,),
                    num_workers: int | None = None) -> Tokenizer:
    """Train on input_path and save out_dir/vocab.json + out_dir/merges.txt."""
    vocab, merges = train_bpe(input_path, vocab_size, special_tokens, num_workers)
    tok = Tokenizer(vocab, merges, special_tokens)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"))
    return tok


_worker_tokenizer: Tokenizer | None = None  # each encode_file worker builds its own (see _init_encoder)


def _init_encoder(vocab: dict[int, bytes], merges: list[Pair], special_tokens: list[str]) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(vocab, merges, special_tokens)


def _encode_chunk(text: str) -> bytes:
    return np.array(_worker_tokenizer.encode(text), dtype="<u2").tobytes()


def encode_file(input_path: str, out_path: str, tokenizer_dir: str, special_tokens: Iterable[str] = (EOT,),
                num_workers: int | None = None) -> int:
    """Encode a .txt or .txt.gz file to flat little-endian uint16 ids in out_path; returns the token count.
    Document-aligned chunks are encoded in a pool and written in order, so memory stays bounded."""
    tok = load_tokenizer(tokenizer_dir, special_tokens)
    if tok.vocab_size > 65536:
        raise ValueError(f"{tokenizer_dir}: {tok.vocab_size} tokens do not fit in uint16 ids (at most 65536)")
    init_args = (tok.vocab, tok.merges, list(tok.special_ids))
    num_tokens = 0
    with atomic_write(out_path, "wb") as f, _Progress(f"encoding {input_path}", os.path.getsize(input_path)) as p:
        for data in _parallel_map(_encode_chunk, _read_chunks(input_path, tok._specials, progress=p), num_workers,
                                  _init_encoder, init_args):
            f.write(data)
            num_tokens += len(data) // 2
    return num_tokens


# ---------------------------------------------------------------------------------------------------- CLI

_OPTIONS = {"train": ["input", "vocab_size", "out_dir", "special_tokens", "num_workers", "force"],
            "stats": ["tokenizer", "input", "special_tokens"],
            "encode": ["tokenizer", "input", "out", "special_tokens", "num_workers"]}
_DEFAULTS = {"special_tokens": EOT, "num_workers": "0", "force": "False"}  # num_workers=0: all cores


def _parse_args(argv: list[str]) -> tuple[str, dict[str, str]]:
    """`command --key=value ...` -> (command, options); unknown, missing or non-integer options raise ValueError."""
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command not in _OPTIONS:
        raise ValueError("usage: python bpe.py {train,stats,encode} --key=value ... (see the module docstring)")
    options = {k: v for k, v in _DEFAULTS.items() if k in _OPTIONS[command]}
    for arg in args:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not (arg.startswith("--") and eq and key in _OPTIONS[command]):
            takes = " ".join(f"--{k}=" for k in _OPTIONS[command])
            raise ValueError(f"unknown option {arg!r} for {command}; it takes {takes}")
        options[key] = value
    if missing := [k for k in _OPTIONS[command] if k not in options]:
        raise ValueError(f"{command} needs " + " ".join(f"--{k}=..." for k in missing))
    for key in {"vocab_size", "num_workers"} & options.keys():
        if not options[key].isdecimal():
            raise ValueError(f"--{key} must be a whole number, got {options[key]!r}")
    if options.get("force", "False") not in ("True", "False"):
        raise ValueError(f"--force must be True or False, got {options['force']!r}")
    if int(options.get("num_workers", 0)) > os.cpu_count():  # each is a process: 1000 would fork 1000
        raise ValueError(f"--num_workers={options['num_workers']} is more than the {os.cpu_count()} cores here")
    for key in {"out_dir", "out"} & options.keys():  # now, not after the training or encoding
        check_writable(f"--{key}={options[key]}", options[key] if key == "out_dir" else os.path.dirname(options[key]))
    return command, options


def _refuse_overwrite(command: str, o: dict[str, str]) -> None:
    """Outputs that hold something else are refused before any work: train's --out_dir with a tokenizer in it
    (a run's tokenizer_dir: its token files and checkpoints need it) unless --force=True; encode's existing
    --out unless it is a .bin (an earlier token file), never a directory, the input or, say, a checkpoint."""
    if command == "train" and o["force"] == "False":
        if held := [n for n in ("vocab.json", "merges.txt") if os.path.exists(os.path.join(o["out_dir"], n))]:
            raise ValueError(f"--out_dir={o['out_dir']} already holds a tokenizer ({', '.join(held)}); pick "
                             "another --out_dir, or pass --force=True to replace it")
    if command == "encode" and os.path.exists(out := o["out"]):
        what = ("a directory" if os.path.isdir(out) else "not a .bin token file" if not out.endswith(".bin")
                else "the input file" if os.path.exists(o["input"]) and os.path.samefile(o["input"], out) else "")
        if what:
            raise ValueError(f"--out={out} exists and is {what}; name a new file for the tokens")


def main(argv: list[str]) -> None:
    command, o = _parse_args(argv)
    _refuse_overwrite(command, o)
    specials = [s for s in o["special_tokens"].split(",") if s]
    t0 = time.perf_counter()
    if command == "train":
        tok = train_tokenizer(o["input"], int(o["vocab_size"]), o["out_dir"], specials, int(o["num_workers"]))
        sample = "Hello, world! Größe 大小 🙂 e\u0301\n" + "".join(specials)
        assert tok.decode(tok.encode(sample)) == sample, "round trip failed"
        peak = [resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        print(f"trained {tok.vocab_size} tokens ({len(tok.merges)} merges) in {time.perf_counter() - t0:.1f}s; "
              f"peak memory {peak[0]:.0f} MB (main), {peak[1]:.0f} MB (largest worker); saved to {o['out_dir']}")
        longest = sorted(tok.vocab.values(), key=len, reverse=True)[:10]
        print("longest tokens:", ", ".join(repr(t.decode("utf-8", errors="replace")) for t in longest))
    elif command == "stats":
        tok = load_tokenizer(o["tokenizer"], specials)
        num_bytes = num_tokens = 0
        t0 = time.perf_counter()
        for chunk in _read_chunks(o["input"], tok._specials):
            num_bytes += len(chunk.encode("utf-8"))
            num_tokens += len(tok.encode(chunk))
        seconds = time.perf_counter() - t0
        print(f"{o['input']}: {num_bytes:,} bytes -> {num_tokens:,} tokens = {num_bytes / max(num_tokens, 1):.3f} "
              f"bytes/token; encode {num_bytes / seconds / 1e6:.2f} MB/s (one process, incl. reading)")
    else:
        os.makedirs(os.path.dirname(o["out"]) or ".", exist_ok=True)
        num_tokens = encode_file(o["input"], o["out"], o["tokenizer"], specials, int(o["num_workers"]))
        print(f"wrote {num_tokens:,} tokens to {o['out']} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    from configurator import run_cli

    run_cli(main)
