"""Every test of the project: python test_all.py [name_substring]

Plain test_* functions and a tiny runner (bottom of the file). CPU only, no network, no
files outside the repository: each test makes its own small data. Every check compares
against an independent reference (float64 loops, the algorithm written out, hand-computed
numbers), never against the code under test itself.
"""
import ast
import builtins
import collections
import contextlib
import csv
import doctest
import errno
import gzip
import hashlib
import importlib
import io
import itertools
import json
import math
import os
import random
import re
import resource
import runpy
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels, when installed, run on CPU tensors

import numpy as np
import regex
import torch
import torch._dynamo  # what torch.optim.Optimizer imports on first use (1.5 s): once here, not in every forked run

import bench
import checkpoint
import configurator
import bpe
import data
import hf
import kernels
import model
import plot
import train
from model import (Embedding, KERNEL_OPS, Linear, MultiHeadSelfAttention, RMSNorm, RotaryPositionalEmbedding,
                   TransformerLM, accounting, cross_entropy, scaled_dot_product_attention, silu, softmax)
from optim import AdamW, clip_grad_norm, cosine_lr
from sample import generate, next_token as sample_next_token, top_p_filter


def slow(test):
    """Mark a test that starts processes, injects faults or compiles ahead of time: `python test_all.py faults` runs
    these, the plain `python test_all.py` the rest (CI runs both), so the everyday command stays short."""
    test.slow = True
    return test


class Skipped(Exception):
    """Raised by a test that cannot run here (an optional extra is absent); the runner counts it as skipped."""


# ----------------------------------------------------------------------------------------------------
# Tokenizer (bpe.py)
# ----------------------------------------------------------------------------------------------------

# Written out again here (not imported) so the references below do not share code with bpe.py.
_BPE_GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_BPE_EOT = "<|endoftext|>"
_BPE_WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "don't", "we'll", "I'm", "naïve", "café", "Größe",
              "日本語", "東京", "🙂", "👩‍💻", "e\u0301", "مرحبا", "42", "3.14", "x", "zz", "ab", "aba"]
_BPE_SEPS = [" ", " ", " ", "  ", "\n", "\n\n", " \n", "\t", ", ", ". ", "!\n", " -- ", "\r\n"]


def _bpe_split_specials(text, specials):
    """Plain text at even positions, specials at odd ones (stdlib re, longest special first)."""
    if not specials:
        return [text]
    return re.split("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")", text)


def _bpe_merge(word, pair):
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _bpe_naive_train(pretokens, vocab_size, specials=()):
    """BPE from the definition: recount every pair each round, merge the max (count, pair)."""
    words = collections.Counter(tuple(bytes([b]) for b in w.encode()) for w in pretokens)
    tokens = [s.encode() for s in specials] + [bytes([b]) for b in range(256)]
    merges = []
    while len(tokens) < vocab_size:
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        if best[0] + best[1] not in tokens:
            tokens.append(best[0] + best[1])
        new_words = collections.Counter()
        for word, count in words.items():
            new_words[_bpe_merge(word, best)] += count
        words = new_words
    return dict(enumerate(tokens)), merges


def _bpe_gpt2_pretokens(text, specials):
    return [w for part in _bpe_split_specials(text, specials)[::2] for w in regex.findall(_BPE_GPT2_PAT, part)]


def _bpe_naive_encode(text, vocab, merges, specials):
    """Encode from the definition: split specials, pre-tokenize, apply every merge in creation order."""
    ids_of = {token: i for i, token in vocab.items()}
    memo, ids = {}, []
    for i, part in enumerate(_bpe_split_specials(text, specials)):
        if i % 2:
            ids.append(ids_of[part.encode()])
            continue
        for word in regex.findall(_BPE_GPT2_PAT, part):
            if word not in memo:
                tokens = tuple(bytes([b]) for b in word.encode())
                for pair in merges:
                    tokens = _bpe_merge(tokens, pair)
                memo[word] = [ids_of[t] for t in tokens]
            ids += memo[word]
    return ids


def _bpe_corpus(seed, num_docs, words_per_doc=40, specials=(_BPE_EOT,)):
    """Random documents of _BPE_WORDS (Zipf-like) and _BPE_SEPS, joined by a special token."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) for k in range(len(_BPE_WORDS))]
    docs = []
    for _ in range(num_docs):
        words = rng.choices(_BPE_WORDS, weights, k=words_per_doc)
        docs.append("".join(w + rng.choice(_BPE_SEPS) for w in words))
    return (specials[0] if specials else "\n").join(docs)


def _bpe_random_unicode(rng, length):
    pools = ["abcXYZ019 ", " \n\t\r", "'.,!?<|>-", "日本語東京大阪", "🙂👍🏽👩‍💻🇫🇷", "e\u0301a\u0308\u0327",
             "مرحبا", "\U0001F600\U00010348", _BPE_EOT, "\u00a0\u2028"]
    return "".join(rng.choice(rng.choice(pools)) if rng.random() < 0.95 else _BPE_EOT for _ in range(length))


def _bpe_byte_to_unicode():
    """GPT-2's byte-to-unicode table, written out as in openai/gpt-2 encoder.py."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe_write(path, text, compress=False):
    opener = gzip.open if compress else open
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        f.write(text)
    return path


def _bpe_trained(tmp, text, vocab_size, specials=(_BPE_EOT,)):
    vocab, merges = bpe.train_bpe(_bpe_write(os.path.join(tmp, "train.txt"), text), vocab_size, list(specials), 1)
    return bpe.Tokenizer(vocab, merges, list(specials))


def _bpe_cli(*args):
    return subprocess.run([sys.executable, bpe.__file__, *args], capture_output=True, text=True, timeout=60)


def test_bpe_worked_example():
    """CS336's example with whitespace pre-tokenization: merges worked out by hand."""
    text = "low low low low low lower lower widest widest widest newest newest newest newest newest newest"
    expected = [(b"s", b"t"), (b"e", b"st"), (b"o", b"w"), (b"l", b"ow"), (b"w", b"est"), (b"n", b"e"),
                (b"ne", b"west"), (b"w", b"i"), (b"wi", b"d"), (b"wid", b"est"), (b"low", b"e"), (b"lowe", b"r")]
    vocab, naive = _bpe_naive_train(text.split(), 256 + 1 + 12, [_BPE_EOT])
    assert naive == expected
    assert vocab[0] == _BPE_EOT.encode() and vocab[257 + 11] == b"lower"
    assert bpe.learn_merges(collections.Counter(text.split()), 12) == expected
    assert bpe.learn_merges(collections.Counter(text.split()), 6) == expected[:6]


def test_bpe_tie_breaking():
    """Equal counts go to the greater (bytes, bytes); b'ab' > b'a' although it starts with it."""
    counts = {"ab": 5, "aba": 2, "az": 2}
    assert bpe.learn_merges(counts, 10) == [(b"a", b"b"), (b"ab", b"a"), (b"a", b"z")]
    assert bpe.learn_merges({"ba": 1, "cd": 1, "ab": 1}, 1) == [(b"c", b"d")]
    rng = random.Random(0)
    for _ in range(30):  # tiny alphabets and counts: ties everywhere
        words = ["".join(rng.choices("abc", k=rng.randint(1, 7))) for _ in range(rng.randint(1, 12))]
        counts = collections.Counter(words)
        _, naive = _bpe_naive_train(list(counts.elements()), 256 + 20)
        assert bpe.learn_merges(counts, 20) == naive


def test_bpe_special_tokens():
    byte_vocab = {b: bytes([b]) for b in range(256)}
    double = _BPE_EOT * 2
    tok = bpe.Tokenizer(byte_vocab, [], [_BPE_EOT, double])  # missing specials are appended: 256, 257
    assert tok.vocab_size == 258 and tok.encode(_BPE_EOT) == [256] and tok.encode(double) == [257]
    assert tok.encode("a" + double + "b" + _BPE_EOT + double) == [97, 257, 98, 257, 256]
    assert tok.encode(_BPE_EOT * 3) == [257, 256]
    assert tok.decode([97, 257, 256]) == "a" + _BPE_EOT * 3
    assert len(bpe.Tokenizer(byte_vocab, []).encode(_BPE_EOT)) == len(_BPE_EOT)  # no specials: plain text
    # A special token ends its text like the end of the string: "\n\n" before it is one pre-token.
    vocab = {**byte_vocab, 256: b"\n\n", 257: _BPE_EOT.encode()}
    tok = bpe.Tokenizer(vocab, [(b"\n", b"\n")], [_BPE_EOT])
    assert tok.encode("a\n\n" + _BPE_EOT + "\n\nb") == [97, 256, 257, 10, 10, 98]
    assert tok.encode(_BPE_EOT + "\n\n" + _BPE_EOT) == [257, 256, 257]
    # Training: special tokens are neither counted nor merged, and take the first ids.
    text = ("hi there" + _BPE_EOT + "\n") * 50 + "<| |>"
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = bpe.train_bpe(_bpe_write(os.path.join(tmp, "t.txt"), text), 300, [_BPE_EOT, "<|pad|>"], 1)
    _, naive = _bpe_naive_train(_bpe_gpt2_pretokens(text, [_BPE_EOT]), 300, [_BPE_EOT, "<|pad|>"])
    assert merges == naive and not any(b"end" in a + b for a, b in merges)
    assert vocab[0] == _BPE_EOT.encode() and vocab[1] == b"<|pad|>" and vocab[2] == b"\x00"
    assert sorted(vocab) == list(range(len(vocab)))


def test_bpe_round_trip_random_unicode():
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        train_text = _bpe_corpus(2, 30) + "".join(_bpe_random_unicode(rng, 400) for _ in range(5))
        tok = _bpe_trained(tmp, train_text, 500)
    assert len(tok.merges) > 150
    for n in range(150):
        s = _bpe_random_unicode(rng, rng.randint(0, 60))
        ids = tok.encode(s)
        assert tok.decode(ids) == s, repr(s)
        if n % 5 == 0:
            assert ids == _bpe_naive_encode(s, tok.vocab, tok.merges, [_BPE_EOT]), repr(s)
    first_byte = {t: i for i, t in tok.vocab.items()}[b"\xf0"]  # half an emoji decodes to U+FFFD
    assert tok.decode([first_byte]) == "\ufffd" and tok.decode([first_byte, tok.encode("a")[0]]) == "\ufffda"


def test_bpe_encode_matches_naive_on_long_text():
    """encode works through ~32K-character pieces; a 100K text with many specials must still match."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = _bpe_trained(tmp, _bpe_corpus(3, 40), 400)
    text = _bpe_corpus(4, 500, specials=(_BPE_EOT + "\n",)) + "   \n  " + _BPE_EOT
    assert len(text) > 100_000
    assert tok.encode(text) == _bpe_naive_encode(text, tok.vocab, tok.merges, [_BPE_EOT])


def test_bpe_segments_cut_only_at_whitespace_the_pretokenizer_sees():
    """encode looks up whitespace-delimited segments found with the stdlib `re`; its whitespace class must be
    the `regex` module's \\s on every code point (str.isspace differs: \\x1c-\\x1f), and mixed whitespace,
    \\x1c-style separators and contractions must encode as the definition says."""
    every_char = "".join(map(chr, range(0x110000)))
    assert re.findall(f"[{bpe._WS}]", every_char) == regex.findall(r"\s", every_char)
    rng = random.Random(8)
    alphabet = list(" \t\n\r\x0b\x0c\x85\xa0\u1680\u2003\u2028\u3000\x1c\x1d\x1e\x1f") + ["a", "Z", "7", "!", "'s", "'"]
    text = "".join(rng.choice(alphabet) for _ in range(3000)) + ("x!\x1c!\x1f " * 40) + _BPE_EOT + " \x1c\n "
    with tempfile.TemporaryDirectory() as tmp:
        tok = _bpe_trained(tmp, text, 400)
    assert (b"!", b"\x1c") in tok.merges  # a merge across \x1c, which str.isspace would call a space
    words = regex.findall(_BPE_GPT2_PAT, text + _bpe_random_unicode(rng, 3000))
    assert all(regex.findall(_BPE_GPT2_PAT, w) == [w] for w in words)  # so one cache holds pre-tokens and segments
    for n in range(0, len(text), 500):
        piece = text[n:n + 700]
        assert tok.encode(piece) == tok.encode(piece) == _bpe_naive_encode(piece, tok.vocab, tok.merges, [_BPE_EOT])


def test_bpe_long_pretokens_take_the_heap_path_and_agree():
    """Pre-tokens over 32 bytes are merged with a heap (O(n log n)) instead of rounds over the whole word; both
    must give the definition's ids: for runs of one repeated character (overlapping pairs), random letters, and
    real words run together, where many pairs change rank while they wait in the heap."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = _bpe_trained(tmp, _bpe_corpus(11, 60) + " aaaaaaaaaaaaaaaa" * 20 + " abababab" * 20, 500)
    rng = random.Random(12)
    for n in (1, 5, 31, 32, 33, 100, 1500):
        for alphabet in ("abcdefghijklmnopqrstuvwxyz", "a", "ab", "theca", "日本語e\u0301"):
            word = " " + "".join(rng.choice(alphabet) for _ in range(n))
            assert tok.encode(word) == _bpe_naive_encode(word, tok.vocab, tok.merges, [_BPE_EOT]), (n, alphabet)
    shakespeare = os.path.join(os.path.dirname(os.path.abspath(bpe.__file__)), "data", "shakespeare_val.txt.gz")
    tok = bpe.Tokenizer(*bpe.train_bpe(shakespeare, 1000, [_BPE_EOT], 1), [_BPE_EOT])
    with gzip.open(shakespeare, "rt", encoding="utf-8") as f:
        words = [word for word in f.read().split() if word.isalpha()]
    for _ in range(25):
        run_together = "".join(rng.choices(words, k=12))  # letters only: one pre-token
        assert tok.encode(run_together) == _bpe_naive_encode(run_together, tok.vocab, tok.merges, [_BPE_EOT])


def test_bpe_any_ids_even_in_the_surrogate_range():
    """The encoder spells tokens as chr(id): ids past 55,296 (the UTF-16 surrogates, vocabularies over 55k) work."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = _bpe_trained(tmp, _bpe_corpus(9, 30), 400)
    shift = 0xD800 - 300  # new tokens land on both sides of U+D800
    shifted = bpe.Tokenizer({i + shift: t for i, t in tok.vocab.items()}, tok.merges, [_BPE_EOT])
    text = _bpe_corpus(10, 5)
    assert shifted.encode(text) == [i + shift for i in tok.encode(text)]
    assert max(shifted.encode(text)) > 0xD800 and shifted.decode(shifted.encode(text)) == text


def _bpe_check_stream(tok, text, specials, rng):
    """encode_iterable == the definition's ids, for adversarial ways of cutting text into pieces."""
    expected = _bpe_naive_encode(text, tok.vocab, tok.merges, specials)
    assert tok.encode(text) == expected
    cuts = [list(text), re.split(r"(?<=\s)", text)]  # one character at a time; inside every whitespace run
    cuts += [re.split("(?<=" + re.escape(s[:k]) + ")", text) for s in specials for k in range(1, len(s))]
    for _ in range(5):
        points = sorted(rng.sample(range(len(text)), 60))
        cuts.append([text[i:j] for i, j in zip([0] + points, points + [len(text)])])
    for pieces in cuts:
        assert "".join(pieces) == text
        assert list(tok.encode_iterable(iter(pieces))) == expected
    return expected


def test_bpe_encode_iterable():
    rng = random.Random(5)
    specials = [_BPE_EOT, _BPE_EOT * 2]
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = bpe.train_bpe(_bpe_write(os.path.join(tmp, "t.txt"), _bpe_corpus(6, 30)), 400, specials, 1)
        tok = bpe.Tokenizer(vocab, merges, specials)
        text = _bpe_corpus(7, 20, 30, specials=(_BPE_EOT + "\n",)) + "a  \n  b \n\n" + _BPE_EOT * 3 + "\n  "
        expected = _bpe_check_stream(tok, text, specials, rng)
        path = _bpe_write(os.path.join(tmp, "lines.txt"), text)
        with open(path, encoding="utf-8", newline="") as f:
            assert list(tok.encode_iterable(f)) == expected
    spaced = ["< |sep|>", "x"]  # a special with a space right after its first character, and a 1-char one
    tok = bpe.Tokenizer(vocab, merges, spaced)
    _bpe_check_stream(tok, "a < |sep|> b< |sep|>< |sep|>\n < |sep|< |sep|>x\n" * 3, spaced, rng)
    # Streaming: the first ids come out long before a big input is consumed.
    consumed = [0]

    def lines():
        for _ in range(100_000):
            consumed[0] += 1
            yield "the cat sat on the mat\n"
    assert len(list(itertools.islice(tok.encode_iterable(lines()), 50))) == 50 and consumed[0] < 100


def test_bpe_trainer_agrees_with_naive():
    with tempfile.TemporaryDirectory() as tmp:
        text = _bpe_corpus(8, 120) + "\n" + _bpe_random_unicode(random.Random(9), 3000)
        path = _bpe_write(os.path.join(tmp, "corpus.txt"), text)
        gz_path = _bpe_write(os.path.join(tmp, "corpus.txt.gz"), text, compress=True)
        pretokens = _bpe_gpt2_pretokens(text, [_BPE_EOT])
        counts = bpe.count_pretokens(gz_path, [_BPE_EOT], num_workers=2, chunk_chars=1000)  # many chunks, a pool
        assert counts == collections.Counter(pretokens)
        for workers in (1, 3):  # workers hand their tables over every ~50 distinct pre-tokens, and at the end
            assert bpe.count_pretokens(path, [_BPE_EOT], workers, chunk_chars=500, table_size=50) == counts
        bpe._fresh_table()  # what bounds a worker's memory: its table goes to the main process once it is full
        assert bpe._count_into_table("a b c", (), table_size=5) is None
        assert bpe._count_into_table("a d e", (), table_size=5) == collections.Counter(["a", " b", " c", "a", " d", " e"])
        assert bpe._fresh_table() == collections.Counter()
        naive_vocab, naive_merges = _bpe_naive_train(pretokens, 600, [_BPE_EOT])
        assert len(naive_merges) == 600 - 257
        for workers, source in [(1, path), (2, gz_path)]:
            vocab, merges = bpe.train_bpe(source, 600, [_BPE_EOT], num_workers=workers)
            assert merges == naive_merges and vocab == naive_vocab
        small = _bpe_corpus(13, 3, 20)
        vocab, merges = bpe.train_bpe(_bpe_write(path, small), 100_000, [_BPE_EOT], num_workers=1)  # runs out of pairs
        assert len(vocab) < 100_000 and sorted(vocab) == list(range(len(vocab)))
        assert merges == _bpe_naive_train(_bpe_gpt2_pretokens(small, [_BPE_EOT]), 100_000, [_BPE_EOT])[1]


def test_bpe_gpt2_files_round_trip():
    b2u = _bpe_byte_to_unicode()
    order = list(b2u)  # GPT-2 gives the bytes ids in the table's order, not byte order

    def enc(token):
        return "".join(b2u[b] for b in token)
    merges = [(b" ", b"t"), (b"h", b"e"), (b" t", b"he"), (b"\xe6", b"\x97"), (b"\n", b"\n")]
    tokens = [bytes([b]) for b in order] + [a + b for a, b in merges] + [_BPE_EOT.encode()]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_path, "w", encoding="utf-8") as f:
            json.dump({enc(t): i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
        with open(merges_path, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{enc(a)} {enc(b)}\n" for a, b in merges))
        tok = bpe.Tokenizer.from_files(vocab_path, merges_path, [_BPE_EOT])
        the, eot = 256 + 2, 256 + 5
        assert tok.special_ids[_BPE_EOT] == eot and tok.vocab_size == 262
        assert tok.encode(" the\n\n" + _BPE_EOT) == [the, 256 + 4, eot]
        assert tok.encode("a") == [order.index(ord("a"))]
        tok.save(os.path.join(tmp, "v2.json"), os.path.join(tmp, "m2.txt"))
        with open(os.path.join(tmp, "v2.json"), encoding="utf-8") as f:
            assert json.load(f) == {enc(t): i for i, t in enumerate(tokens)}
        with open(os.path.join(tmp, "m2.txt"), encoding="utf-8") as f:
            assert f.read().splitlines()[1:] == [f"{enc(a)} {enc(b)}" for a, b in merges]
        again = bpe.Tokenizer.from_files(os.path.join(tmp, "v2.json"), os.path.join(tmp, "m2.txt"), [_BPE_EOT])
        assert again.vocab == dict(enumerate(tokens)) and again.merges == merges
        trained = bpe.train_tokenizer(_bpe_write(os.path.join(tmp, "t.txt"), _bpe_corpus(10, 30)), 400, tmp)
        loaded = bpe.load_tokenizer(tmp)
        assert loaded.vocab == trained.vocab and loaded.merges == trained.merges
        assert loaded.special_ids == {_BPE_EOT: 0}


def test_bpe_encode_file():
    with tempfile.TemporaryDirectory() as tmp:
        tok = bpe.train_tokenizer(_bpe_write(os.path.join(tmp, "t.txt"), _bpe_corpus(11, 40)), 400, tmp)
        text = _bpe_corpus(12, 1300, 200, specials=("\n" + _BPE_EOT + "\n",))  # > 1 MB: several chunks
        assert len(text) > 1_100_000
        out = os.path.join(tmp, "out.bin")
        for workers, compress in [(2, True), (1, False)]:
            src = _bpe_write(os.path.join(tmp, "in.txt" + ".gz" * compress), text, compress)
            assert bpe.encode_file(src, out, tmp, num_workers=workers) == os.path.getsize(out) // 2
            ids = np.fromfile(out, dtype="<u2")
            assert ids.tolist() == _bpe_naive_encode(text, tok.vocab, tok.merges, [_BPE_EOT])
        with open(out, "wb") as f:
            f.write(b"old")
        try:
            bpe.encode_file(os.path.join(tmp, "missing.txt"), out, tmp)
            raise AssertionError("missing input accepted")
        except FileNotFoundError:
            pass
        with open(out, "rb") as f:
            assert f.read() == b"old" and not os.path.exists(out + ".tmp")
        big = os.path.join(tmp, "big")
        os.mkdir(big)
        u = _bpe_byte_to_unicode()
        pairs = list(itertools.product(range(256), repeat=2))[:65536 - 256]  # two-byte tokens, each made by a merge
        with open(os.path.join(big, "vocab.json"), "w") as f:
            json.dump({**{c: b for b, c in u.items()}, **{u[x] + u[y]: 256 + i for i, (x, y) in enumerate(pairs)}}, f)
        with open(os.path.join(big, "merges.txt"), "w") as f:
            f.writelines(f"{u[x]} {u[y]}\n" for x, y in pairs)
        small = _bpe_write(os.path.join(tmp, "small.txt"), "hi")
        assert bpe.encode_file(small, out, big, special_tokens=()) == 1  # 65536 tokens fit in uint16; "hi" is one
        try:
            bpe.encode_file(small, out, big)  # <|endoftext|> is appended as token 65537
            raise AssertionError("65537 tokens accepted for uint16")
        except ValueError as e:
            assert "65537" in str(e)


def test_bpe_bad_inputs():
    tok = bpe.Tokenizer({b: bytes([b]) for b in range(256)}, [], [_BPE_EOT])
    for ids in ([257], [-1], [0, 10**6]):
        try:
            tok.decode(ids)
            raise AssertionError(f"decoded {ids}")
        except ValueError as e:
            assert "id" in str(e) and "\n" not in str(e)
    b2u = _bpe_byte_to_unicode()
    good_vocab = json.dumps({c: b for b, c in b2u.items()})
    bad = [("{not json", ""), (json.dumps({"a": 0, "b": 2}), ""), (json.dumps({"a": "0"}), ""), ("[1, 2]", ""),
           (good_vocab, "a b c\n"), (good_vocab, "a\n"), (good_vocab, "a \u4e00\n"), (good_vocab, "a b\n"),
           (json.dumps({"a": 0}), "")]  # the last two: a merge result / single bytes missing from the vocab
    with tempfile.TemporaryDirectory() as tmp:
        for vocab_text, merges_text in bad:
            with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
                f.write(vocab_text)
            with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
                f.write(merges_text)
            try:
                bpe.load_tokenizer(tmp)
                raise AssertionError(f"accepted {vocab_text[:20]!r} / {merges_text!r}")
            except ValueError as e:
                assert "\n" not in str(e)
        path = _bpe_write(os.path.join(tmp, "t.txt"), "some text")
        for size in (0, 256):
            try:
                bpe.train_bpe(path, size, [_BPE_EOT])
                raise AssertionError(f"vocab_size={size} accepted")
            except ValueError as e:
                assert "257" in str(e)
        out_dir = os.path.join(tmp, "tok")
        os.mkdir(out_dir)
        with open(os.path.join(out_dir, "vocab.json"), "w") as f:
            f.write("keep")
        ckpt = _bpe_write(os.path.join(tmp, "ckpt.pt"), "weights")  # encode may replace only a .bin
        force = "--force=True"  # past the tokenizer already in out_dir, to the check each run is about
        runs = [(_bpe_cli("train", f"--input={path}", "--vocab_size=256", f"--out_dir={out_dir}", force), "257"),
                (_bpe_cli("train", f"--input={tmp}/missing.txt", "--vocab_size=300", f"--out_dir={out_dir}", force),
                 "missing.txt"),
                (_bpe_cli("train", f"--input={path}", "--vocab_size=300", f"--out_dir={out_dir}", "--colour=red"),
                 "--colour"),
                (_bpe_cli("train", f"--input={path}", "--vocab_size=300", f"--out_dir={out_dir}"),
                 f"--out_dir={out_dir} already holds a tokenizer (vocab.json); pick another --out_dir, or pass "
                 "--force=True"),
                (_bpe_cli("train", f"--input={path}", "--vocab_size=300", f"--out_dir={out_dir}", "--force=yes"),
                 "--force must be True or False"),
                (_bpe_cli("stats", f"--tokenizer={tmp}", f"--input={path}"), "vocab.json"),  # the last bad files
                (_bpe_cli("encode", f"--tokenizer={out_dir}", f"--input={path}", f"--out={tmp}/o.bin"), "merges.txt not"),
                (_bpe_cli("encode", f"--tokenizer={tmp}", f"--input={path}", f"--out={ckpt}"),
                 f"--out={ckpt} exists and is not a .bin token file"),
                (_bpe_cli("encode", f"--tokenizer={tmp}", f"--input={path}", f"--out={out_dir}"), "is a directory")]
        for run, words in runs:
            assert run.returncode == 2 and run.stdout == "", run
            assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and words in run.stderr, run.stderr
        with open(os.path.join(out_dir, "vocab.json")) as f, open(ckpt) as g:
            assert f.read() == "keep" and g.read() == "weights"
        ok = _bpe_cli("train", f"--input={path}", "--vocab_size=300", f"--out_dir={out_dir}", "--num_workers=1", force)
        assert ok.returncode == 0 and "longest tokens" in ok.stdout, ok.stderr
        tok = bpe.load_tokenizer(out_dir)
        assert tok.decode(tok.encode("some text")) == "some text"
        old_bin = _bpe_write(os.path.join(tmp, "old.bin"), "an earlier token file")
        ok = _bpe_cli("encode", f"--tokenizer={out_dir}", f"--input={path}", f"--out={old_bin}", "--num_workers=1")
        assert ok.returncode == 0 and np.fromfile(old_bin, dtype="<u2").tolist() == tok.encode("some text"), ok.stderr


def test_bpe_docstring_examples():
    """The >>> examples in bpe.py's docstrings are true."""
    result = doctest.testmod(bpe)
    assert result.attempted >= 6 and result.failed == 0, result


# ----------------------------------------------------------------------------------------------------
# Model (model.py) and sampling (sample.py)
# ----------------------------------------------------------------------------------------------------

_MODEL_SHAPE = dict(vocab_size=23, context_length=12, d_model=16, num_layers=2, num_heads=4)


def _model_build(seed: int = 0, **flags) -> TransformerLM:
    """A tiny float64 model; norm gains are randomised so that a gain applied in the wrong place shows."""
    torch.manual_seed(seed)
    model = TransformerLM(**{**_MODEL_SHAPE, **flags}, dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


def _model_rms(x, gain):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * gain


def _model_rope(x, theta):
    """RoPE as complex multiplication: (x[2k] + i x[2k+1]) * exp(i t theta^(-2k/d)) at position t. x: (..., T, d)."""
    T, d = x.shape[-2:]
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous())
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).reshape(x.shape)


def _model_reference_logits(sd: dict, cfg: dict, idx):
    """The whole model written out from the raw state dict and a resolved config, one formula per flag (float64)."""
    H, kvh, theta = cfg["num_heads"], cfg["n_kv_heads"], cfg["rope_theta"]

    def attention(x, p):
        B, T, d = x.shape
        dh = d // H
        q = (x @ sd[p + "q_proj.weight"].T).reshape(B, T, H, dh).transpose(1, 2)
        k = (x @ sd[p + "k_proj.weight"].T).reshape(B, T, kvh, dh).transpose(1, 2).repeat_interleave(H // kvh, 1)
        v = (x @ sd[p + "v_proj.weight"].T).reshape(B, T, kvh, dh).transpose(1, 2).repeat_interleave(H // kvh, 1)
        if cfg["qk_norm"]:
            q, k = _model_rms(q, sd[p + "q_norm.weight"]), _model_rms(k, sd[p + "k_norm.weight"])
        if cfg["pos"] == "rope":
            q, k = _model_rope(q, theta), _model_rope(k, theta)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(~torch.ones(T, T).bool().tril(), -math.inf)
        return (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, d) @ sd[p + "output_proj.weight"].T

    def ffn(x, p):
        a = x @ sd[p + "w1.weight"].T
        h = a / (1 + torch.exp(-a))  # silu
        if cfg["ffn"] == "swiglu":
            h = h * (x @ sd[p + "w3.weight"].T)
        return h @ sd[p + "w2.weight"].T

    x = sd["token_embeddings.weight"][idx]
    norm = cfg["norm"]
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        n1 = (lambda z: _model_rms(z, sd[p + "ln1.weight"])) if norm != "none" else (lambda z: z)
        n2 = (lambda z: _model_rms(z, sd[p + "ln2.weight"])) if norm != "none" else (lambda z: z)
        if cfg["block"] == "parallel":
            x = x + attention(n1(x), p + "attn.") + ffn(n2(x), p + "ffn.")
        elif norm == "post":
            x = n1(x + attention(x, p + "attn."))
            x = n2(x + ffn(x, p + "ffn."))
        else:
            x = x + attention(n1(x), p + "attn.")
            x = x + ffn(n2(x), p + "ffn.")
    if norm != "none":
        x = _model_rms(x, sd["ln_final.weight"])
    logits = x @ sd["token_embeddings.weight" if cfg["tie_embeddings"] else "lm_head.weight"].T
    cap = cfg["logit_softcap"]
    return cap * torch.tanh(logits / cap) if cap else logits


def _model_greedy_by_recompute(model, prompt, n):
    """Reference decoding: run the model on the whole cropped prefix for every new token."""
    ids, ctx = list(prompt), model.config["context_length"]
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids[-ctx:]]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_linear_and_embedding_init_and_forward():
    torch.manual_seed(0)
    lin = Linear(256, 512)
    std = math.sqrt(2 / (256 + 512))
    assert lin.weight.shape == (512, 256)
    assert abs(lin.weight.std().item() / std - 0.987) < 0.03  # a normal cut at 3 std has std 0.987 sigma
    assert lin.weight.abs().max().item() <= 3 * std + 1e-6
    x = torch.randn(3, 5, 256)
    ref = (x.double()[..., None, :] * lin.weight.double()).sum(-1)  # y_j = sum_i x_i W_ji
    assert torch.allclose(lin(x).double(), ref, atol=1e-5)
    emb = Embedding(1000, 32)
    assert emb.weight.shape == (1000, 32)
    assert abs(emb.weight.std().item() - 0.987) < 0.03 and emb.weight.abs().max().item() <= 3.0
    ids = torch.tensor([[3, 999, 0], [3, 3, 7]])
    assert torch.equal(emb(ids)[1, 2], emb.weight[7]) and emb(ids).shape == (2, 3, 32)


def test_softmax_cross_entropy_silu_on_large_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 50) * 1000  # exp would overflow without the max shift
    targets = torch.randint(0, 50, (4, 7))
    x = logits.double()
    m = x.max(-1, keepdim=True).values
    log_probs = x - m - torch.log(torch.exp(x - m).sum(-1, keepdim=True))
    ce_ref = -log_probs.gather(-1, targets[..., None]).mean()
    assert torch.isfinite(cross_entropy(logits, targets))
    assert abs(cross_entropy(logits, targets).item() - ce_ref.item()) < 1e-5 * abs(ce_ref.item())
    assert torch.allclose(softmax(logits, -1).double(), log_probs.exp(), atol=1e-6)
    assert torch.allclose(softmax(logits, 0).sum(0), torch.ones(7, 50))
    z = torch.linspace(-30, 30, 101, dtype=torch.float64)
    assert torch.allclose(silu(z), z / (1 + torch.exp(-z)))


def test_rmsnorm_computes_in_fp32_returns_input_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
    x = (torch.randn(3, 64) * 300).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    x64 = x.double()
    ref = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    assert ((y.double() - ref).abs() <= ref.abs() * 2 ** -8).all()  # only the final rounding to bf16
    assert norm(x.float()).dtype == torch.float32


def test_attention_against_float64_loops():
    torch.manual_seed(0)
    Q, K, V = torch.randn(2, 3, 4, 5).double(), torch.randn(2, 3, 6, 5).double(), torch.randn(2, 3, 6, 7).double()
    mask = torch.rand(4, 6) > 0.4
    mask[:, 0] = True  # every query sees at least one key
    out = scaled_dot_product_attention(Q, K, V, mask)
    for b, h, i in itertools.product(range(2), range(3), range(4)):
        keys = [j for j in range(6) if mask[i, j]]
        s = [sum(Q[b, h, i, c].item() * K[b, h, j, c].item() for c in range(5)) / math.sqrt(5) for j in keys]
        w = [math.exp(v - max(s)) for v in s]
        for e in range(7):
            ref = sum(wj * V[b, h, j, e].item() for wj, j in zip(w, keys)) / sum(w)
            assert abs(out[b, h, i, e].item() - ref) < 1e-12


def test_rope_against_2x2_rotations():
    torch.manual_seed(0)
    theta, d = 10000.0, 8
    rope = RotaryPositionalEmbedding(theta, d, max_seq_len=16)
    x = torch.randn(2, 5, d).double()
    pos = torch.tensor([[0, 3, 1, 15, 2], [4, 4, 0, 9, 11]])
    out = rope(x, pos)
    for b, t, k in itertools.product(range(2), range(5), range(d // 2)):
        a = pos[b, t].item() * theta ** (-2 * k / d)
        R = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
        assert torch.allclose(out[b, t, 2 * k:2 * k + 2], R @ x[b, t, 2 * k:2 * k + 2], atol=1e-6)
    assert list(rope.state_dict()) == []  # cos/sin are recomputed, not saved


def test_default_model_state_dict_keys_and_outputs():
    model = _model_build()
    layer = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.output_proj", "ffn.w1", "ffn.w2", "ffn.w3",
             "ln1", "ln2"]
    keys = ["token_embeddings.weight"] + [f"layers.{i}.{n}.weight" for i in range(2) for n in layer]
    assert list(model.state_dict()) == keys + ["ln_final.weight", "lm_head.weight"]
    assert model.config["d_ff"] == 64 and model.config["n_kv_heads"] == 4  # 8/3 * 16 = 42.7 -> 64
    assert TransformerLM(**_MODEL_SHAPE, ffn="silu").config["d_ff"] == 64  # 4 * 16
    assert TransformerLM(**{**_MODEL_SHAPE, "d_model": 96, "num_heads": 4}).config["d_ff"] == 256  # 8/3 * 96 = 256
    idx = torch.randint(0, 23, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = _model_reference_logits(model.state_dict(), model.config, idx)
    assert torch.allclose(model(idx), ref, atol=1e-5)  # float64 model, but RoPE's cos/sin tables are float32


def test_every_flag_equals_its_formula_and_changes_the_output():
    idx = torch.randint(0, 23, (2, 12), generator=torch.Generator().manual_seed(1))
    default = _model_build()
    same_params = [dict(norm="post"), dict(pos="none"), dict(logit_softcap=0.5), dict(block="parallel")]
    new_params = [dict(norm="none"), dict(ffn="silu"), dict(qk_norm=True), dict(n_kv_heads=2), dict(n_kv_heads=1),
                  dict(tie_embeddings=True), dict(block="parallel", norm="none", qk_norm=True, n_kv_heads=2)]
    for flags in same_params + new_params:
        model = _model_build(**flags)
        ref = _model_reference_logits(model.state_dict(), model.config, idx)
        assert torch.allclose(model(idx), ref, atol=1e-5), flags
        if flags in same_params:  # the same weights in the standard model give other logits
            default.load_state_dict(model.state_dict())
            assert (default(idx) - model(idx)).abs().max() > 1e-2, flags
        else:
            assert {k: v.shape for k, v in model.state_dict().items()} != \
                   {k: v.shape for k, v in default.state_dict().items()}, flags


def test_gqa_equals_standard_attention_with_repeated_kv_weights():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16).double()
    for n_kv in (4, 2, 1):
        gqa = MultiHeadSelfAttention(16, 4, n_kv_heads=n_kv, dtype=torch.float64)
        std = MultiHeadSelfAttention(16, 4, dtype=torch.float64)
        sd = dict(gqa.state_dict())
        for name in ("k_proj.weight", "v_proj.weight"):  # (n_kv*4, 16): kv head g serves query heads g*G .. g*G+G-1
            sd[name] = sd[name].reshape(n_kv, 4, 16).repeat_interleave(4 // n_kv, 0).reshape(16, 16)
        std.load_state_dict(sd)
        assert gqa.k_proj.weight.shape == (n_kv * 4, 16)
        assert torch.allclose(gqa(x), std(x), atol=1e-12), n_kv
    model = _model_build(n_kv_heads=2)
    assert model.new_kv_cache(batch_size=3).k.shape == (2, 3, 2, 12, 4)  # layers, batch, kv heads, positions, d_head


def test_logit_softcap_bounded_and_equal_to_formula():
    idx = torch.randint(0, 23, (2, 12), generator=torch.Generator().manual_seed(1))
    capped, plain = _model_build(logit_softcap=0.5), _model_build()
    plain.load_state_dict(capped.state_dict())
    raw = plain(idx)
    assert raw.abs().max() > 1  # the cap bites
    assert capped(idx).abs().max() < 0.5
    assert torch.allclose(capped(idx), 0.5 * torch.tanh(raw / 0.5), atol=1e-12)


def test_tied_embeddings_one_parameter_saved_once_gradient_is_sum_of_uses():
    tied = _model_build(tie_embeddings=True)
    W = tied.token_embeddings.weight
    assert "lm_head.weight" not in tied.state_dict() and tied.lm_head is None
    assert sum(p.data_ptr() == W.data_ptr() for p in tied.parameters()) == 1
    assert tied.num_params() == _model_build().num_params() - 23 * 16
    idx = torch.randint(0, 23, (2, 12), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 23, (2, 12), generator=torch.Generator().manual_seed(2))
    untied = _model_build()
    untied.load_state_dict({**tied.state_dict(), "lm_head.weight": W.detach().clone()})
    tied.loss(idx, targets)[0].backward()
    untied.loss(idx, targets)[0].backward()
    both = untied.token_embeddings.weight.grad + untied.lm_head.weight.grad
    assert torch.allclose(W.grad, both, atol=1e-12)
    buffer = io.BytesIO()
    torch.save(tied.state_dict(), buffer)
    buffer.seek(0)
    restored = _model_build(seed=5, tie_embeddings=True)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored(idx), tied(idx))


def test_z_loss_value_and_gradient_against_written_out_loss():
    model = _model_build()
    idx = torch.randint(0, 23, (2, 12), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 23, (2, 12), generator=torch.Generator().manual_seed(2))
    params = list(model.parameters())
    ce, z = model.loss(idx, targets)
    grads = torch.autograd.grad(ce + 0.1 * z, params)
    logits = model(idx)
    lse = torch.logsumexp(logits, -1)
    ce_ref = (lse - logits.gather(-1, targets[..., None])[..., 0]).mean()
    z_ref = (lse ** 2).mean()
    grads_ref = torch.autograd.grad(ce_ref + 0.1 * z_ref, params, retain_graph=True)
    assert abs(ce.item() - ce_ref.item()) < 1e-12 and abs(z.item() - z_ref.item()) < 1e-12
    assert all(torch.allclose(g, r, atol=1e-12) for g, r in zip(grads, grads_ref))
    assert not torch.allclose(grads[0], torch.autograd.grad(ce_ref, params[0])[0])  # z-loss moves the gradient


def test_accounting_params_equal_numel_for_every_flag_combination():
    combos = itertools.product(("pre", "post", "none"), ("rope", "none"), ("swiglu", "silu"), (False, True),
                               (None, 2, 1), (False, True), ("serial", "parallel"))
    checked = 0
    for norm, pos, ffn, qk_norm, n_kv, tie, block in combos:
        if norm == "post" and block == "parallel":
            continue  # refused: see test_bad_config_values_raise_one_line_errors
        cfg = dict(_MODEL_SHAPE, norm=norm, pos=pos, ffn=ffn, qk_norm=qk_norm, n_kv_heads=n_kv, tie_embeddings=tie,
                   block=block)
        model = TransformerLM(**cfg, device="meta")
        numel = sum(v.numel() for v in model.state_dict().values())  # what a checkpoint stores
        assert accounting(cfg)["params"]["total"] == model.num_params() == numel, cfg
        checked += 1
    assert checked == 240


def test_accounting_flops_of_tinystories_and_gpt2_xl_by_hand():
    tiny = dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344)
    # multiply-adds per layer: q,k,v,o 4 * 512^2; QK^T and AV 2 * 256 * 512; SwiGLU 3 * 512 * 1344.
    # Plus the head 512 * 10,000; 2 FLOPs per multiply-add.
    fwd = 2 * (4 * (4 * 512 ** 2 + 2 * 256 * 512 + 3 * 512 * 1344) + 512 * 10_000)
    assert fwd == 37_240_832
    acc = accounting(tiny, batch_size=128)
    assert acc["flops"]["total"] == 37_240_832
    assert acc["params"]["total"] == 22_696_448  # 2 * 5,120,000 + 4 * (4 * 512^2 + 3 * 512 * 1344 + 2 * 512) + 512
    assert TransformerLM(**tiny, device="meta").flops_per_token() == 37_240_832
    mem = acc["memory"]
    assert mem["fp32"]["params"] == mem["fp32"]["grads"] == 4 * 22_696_448 and mem["fp32"]["adam"] == 8 * 22_696_448
    assert mem["bf16"]["adam"] == mem["fp32"]["adam"] and mem["bf16"]["activations"] < mem["fp32"]["activations"]
    xl = dict(vocab_size=50_257, context_length=1024, d_model=1600, num_layers=48, num_heads=25, d_ff=6400)
    acc = accounting(xl)
    assert acc["params"]["total"] == 2 * 50_257 * 1600 + 48 * (4 * 1600 ** 2 + 3 * 1600 * 6400 + 2 * 1600) + 1600
    assert 4.4e12 < acc["flops"]["total"] * 1024 < 4.6e12  # "about 4.5 TFLOPs per sequence"


def test_bad_config_values_raise_one_line_errors():
    bad = [("num_heads", dict(num_heads=3)), ("n_kv_heads", dict(n_kv_heads=3)),
           ("logit_softcap", dict(logit_softcap=-1.0)),
           ("norm", dict(norm="layer")), ("pos", dict(pos="alibi")), ("ffn", dict(ffn="relu")),
           ("block", dict(block="mixed")), ("block", dict(block="parallel", norm="post")), ("d_ff", dict(d_ff=0)),
           ("rope_theta", dict(rope_theta=0.0)), ("rope_theta", dict(rope_theta=-1e4)),
           ("rope_theta", dict(rope_theta=float("nan"))), ("rope_theta", dict(rope_theta=float("inf"))),
           ("logit_softcap", dict(logit_softcap=float("nan"))), ("logit_softcap", dict(logit_softcap=float("inf")))]
    for key, flags in bad:
        try:
            TransformerLM(**{**_MODEL_SHAPE, **flags})
        except ValueError as e:
            assert key in str(e) and "\n" not in str(e), (key, str(e))
        else:
            raise AssertionError(f"{flags} was accepted")
    try:
        _model_build()(torch.zeros(1, 13, dtype=torch.long))
    except ValueError as e:
        assert "context_length" in str(e)
    else:
        raise AssertionError("a sequence longer than the context was accepted")


def test_default_d_ff_is_the_multiple_of_64_nearest_8_3_d_model():
    # 8/3 d_model = 1365.3, 341.3, 2048, 4266.7, 42.7, 10.7: nearest multiples of 64 (and never below 64)
    for d_model, want in ((512, 1344), (128, 320), (768, 2048), (1600, 4288), (16, 64), (4, 64)):
        assert model.model_config(10, 8, d_model, 1, 4, ffn="swiglu", pos="none")["d_ff"] == want, d_model
    assert model.model_config(10, 8, 512, 1, 4, ffn="silu")["d_ff"] == 2048


def test_kv_cache_prefill_matches_full_forward():
    for flags in (dict(), dict(n_kv_heads=2, qk_norm=True), dict(pos="none", block="parallel")):
        model = _model_build(**flags)
        idx = torch.randint(0, 23, (2, 10), generator=torch.Generator().manual_seed(1))
        cache = model.new_kv_cache(batch_size=2)
        parts = [model(idx[:, a:b], cache) for a, b in ((0, 3), (3, 7), (7, 8), (8, 10))]  # prefill, then chunks
        assert cache.length == 10
        assert torch.allclose(torch.cat(parts, 1), model(idx), atol=1e-12), flags


def test_kv_cache_greedy_equals_recompute_inside_and_past_the_window():
    for flags in (dict(), dict(n_kv_heads=1, qk_norm=True, tie_embeddings=True)):
        model = _model_build(**flags)
        for prompt in ([5, 1, 7], list(range(15))):  # short; longer than the context (12): cropped
            ref = _model_greedy_by_recompute(model, prompt, 25)  # runs 2x past the 12-token window
            assert generate(model, prompt, 25, temperature=0.0) == ref, (flags, prompt)
            assert generate(model, prompt, 25, temperature=0.0, use_cache=False) == ref
            eos = ref[6]
            assert generate(model, prompt, 25, temperature=0.0, eos_id=eos) == ref[:ref.index(eos)]


def test_seeded_sampling_reproducible_and_greedy_ignores_seed():
    model = _model_build()
    sample = lambda seed, **kw: generate(model, [3, 4], 20, generator=torch.Generator().manual_seed(seed), **kw)
    assert sample(0, temperature=1.5) == sample(0, temperature=1.5)
    assert sample(0, temperature=1.5) != sample(1, temperature=1.5)
    assert sample(0, temperature=0.0) == sample(1, temperature=0.0) == _model_greedy_by_recompute(model, [3, 4], 20)
    assert sample(0, temperature=1.0, top_p=1e-9) == sample(0, temperature=0.0)  # nucleus of one token = greedy
    for prompt, kwargs, word in (([], {}, "empty"), ([3], dict(temperature=-1.0), "temperature"),
                                 ([3], dict(top_p=0.0), "top_p")):
        try:
            generate(model, prompt, 5, **kwargs)
        except ValueError as e:
            assert word in str(e)
        else:
            raise AssertionError(f"{prompt}, {kwargs} was accepted")


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=torch.float64)
    expect = {0.3: [0, 1, 0, 0], 0.5: [0, 1, 0, 0], 0.7: [0, 0.5, 0, 0.3], 0.9: [0, 0.5, 0.15, 0.3],
              0.99: [0.05, 0.5, 0.15, 0.3]}
    for p, kept in expect.items():
        kept = torch.tensor(kept, dtype=torch.float64)
        assert torch.allclose(top_p_filter(probs.clone(), p), kept / kept.sum()), p


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=32, context_length=16, d_model=32, num_layers=2, num_heads=2)
    idx = torch.randint(0, 32, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(300):
        ce, _ = model.loss(idx[:, :-1], idx[:, 1:])
        if ce.item() < 0.1:
            break
        opt.zero_grad()
        ce.backward()
        opt.step()
    assert ce.item() < 0.1, (step, ce.item())


def test_activation_memory_estimate_matches_tensors_saved_for_backward():
    cfg = dict(vocab_size=500, context_length=32, d_model=64, num_layers=2, num_heads=4, qk_norm=True)
    model = TransformerLM(**cfg)
    idx = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(1))
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for bf16 in (False, True):
        saved = {}

        def pack(t):  # every tensor autograd keeps, counted once per storage; parameters are not activations
            if t.untyped_storage().data_ptr() not in param_storages:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        autocast = torch.autocast("cpu", torch.bfloat16, enabled=bf16)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            model.loss(idx, idx)
        estimate = model.memory_estimate(batch_size=2, autocast_bf16=bf16)["activations"]
        assert abs(estimate / sum(saved.values()) - 1) < 0.1, (bf16, estimate, sum(saved.values()))


# ----------------------------------------------------------------------------------------------------
# Optimizer, data, training loop (optim.py, data.py, train.py)
# ----------------------------------------------------------------------------------------------------

_PIPELINE_TINY = dict(vocab_size=64, context_length=16, d_model=16, num_layers=1, num_heads=2, d_ff=32, batch_size=4,
                      lr=3e-3, min_lr=3e-4, warmup_iters=2, cosine_iters=12, eval_tokens=128, eval_interval=4,
                      log_interval=1, device="cpu", dtype="float32", seed=7)


def _pipeline_tokens(path, n=4000, vocab=64, seed=0):
    """A .bin of uint16 ids with learnable structure: mostly id+1 after id, sometimes a random id."""
    rng = np.random.default_rng(seed)
    ids = np.cumsum(rng.integers(0, 4, n) == 0).astype(np.int64) + rng.integers(0, 2, n)
    np.asarray(ids % vocab, dtype="<u2").tofile(path)
    return path


def _pipeline_cfg(root, **overrides):
    """A full config for a tiny run in root, on prepared .bin data."""
    bins = [os.path.join(root, name) for name in ("train.bin", "val.bin")]
    for seed, path in enumerate(bins):
        if not os.path.exists(path):
            _pipeline_tokens(path, seed=seed)
    paths = dict(train_data=bins[0], val_data=bins[1], tokenizer_dir=os.path.join(root, "tok"),
                 out_dir=os.path.join(root, "out"))
    return {**train.DEFAULTS, **_PIPELINE_TINY, **paths, **overrides}


def _pipeline_rows(out_dir, columns=("step", "tokens", "lr", "train_loss", "val_loss", "val_ppl", "grad_norm",
                                     "z_loss", "status")):
    """log.csv rows, keeping the columns that do not depend on wall-clock time."""
    with open(os.path.join(out_dir, "log.csv"), newline="") as f:
        return [tuple(row[c] for c in columns) for row in csv.DictReader(f)]


def _pipeline_assert_same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _pipeline_adamw_reference(params, grads_per_step, groups):
    """CS336 Algorithm 1 in float64, one scalar at a time. groups: [(indices, lr, wd)], betas 0.9/0.99, eps 1e-8."""
    b1, b2, eps = 0.9, 0.99, 1e-8
    theta = [p.double().flatten().tolist() for p in params]
    m = [[0.0] * len(t) for t in theta]
    v = [[0.0] * len(t) for t in theta]
    for t, grads in enumerate(grads_per_step, start=1):
        for indices, lr, wd in groups:
            for i in indices:
                g = grads[i].double().flatten().tolist()
                for j in range(len(g)):
                    m[i][j] = b1 * m[i][j] + (1 - b1) * g[j]
                    v[i][j] = b2 * v[i][j] + (1 - b2) * g[j] ** 2
                    alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                    theta[i][j] -= alpha * m[i][j] / (math.sqrt(v[i][j]) + eps)
                    theta[i][j] -= lr * wd * theta[i][j]
    return [torch.tensor(t, dtype=torch.float64).view_as(p) for t, p in zip(theta, params)]


def test_adamw_matches_written_out_algorithm():
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(5)]
    expected = _pipeline_adamw_reference(init, grads, [([0], 1e-2, 0.1), ([1], 3e-2, 0.0)])
    for foreach in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = AdamW([{"params": [params[0]]}, {"params": [params[1]], "lr": 3e-2, "weight_decay": 0.0}],
                    lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=foreach)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        for p, e in zip(params, expected):
            assert torch.allclose(p.detach(), e, rtol=0, atol=1e-12), (foreach, (p - e).abs().max())


def test_adamw_foreach_agrees_with_loop_in_float32():
    gen = torch.Generator().manual_seed(1)
    shapes = [(8, 16), (16,), (3, 5, 7)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    results = []
    for foreach in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = AdamW(params, lr=1e-2, weight_decay=0.05, foreach=foreach)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        results.append(params)
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), (a - b).abs().max()


def test_adamw_matches_torch_adamw_without_weight_decay():
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(20, generator=gen, dtype=torch.float64)
    ours, theirs = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt_ours = AdamW([ours], lr=1e-2, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    opt_theirs = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    for _ in range(6):
        g = torch.randn(20, generator=gen, dtype=torch.float64)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-10)


def test_adamw_state_dict_round_trip():
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(6, generator=gen)
    grads = [torch.randn(6, generator=gen) for _ in range(6)]

    def run(params, opt, steps):
        for g in steps:
            params.grad = g.clone()
            opt.step()

    straight = torch.nn.Parameter(init.clone())
    opt = AdamW([straight], lr=1e-2)
    run(straight, opt, grads)
    first = torch.nn.Parameter(init.clone())
    opt1 = AdamW([first], lr=1e-2)
    run(first, opt1, grads[:3])
    buffer = io.BytesIO()
    torch.save(opt1.state_dict(), buffer)
    buffer.seek(0)
    second = torch.nn.Parameter(first.detach().clone())
    opt2 = AdamW([second], lr=5.0)  # lr comes back from the state dict
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.state[second]["step"] == 3
    run(second, opt2, grads[3:])
    assert torch.equal(second, straight)


def test_cosine_lr_known_points():
    expected = {0: 0.0, 3: 3 / 7, 7: 1.0, 8: 0.9887175604818206, 14: 0.55, 20: 0.11128243951817937, 21: 0.1, 30: 0.1}
    for t, lr in expected.items():
        assert math.isclose(cosine_lr(t, 1.0, 0.1, 7, 21), lr, rel_tol=1e-12, abs_tol=1e-15), (t, lr)
    assert cosine_lr(5, 2e-3, 2e-4, 0, 10) < 2e-3 and cosine_lr(0, 2e-3, 2e-4, 0, 10) == 2e-3  # no warm-up


def test_clip_grad_norm_hand_computed():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])  # global norm sqrt(9 + 16 + 144) = 13
    norm = clip_grad_norm([a, b], max_norm=1.0)
    assert math.isclose(float(norm), 13.0, rel_tol=1e-6)
    scale = 1.0 / (13.0 + 1e-6)
    assert torch.allclose(a.grad, torch.tensor([3 * scale, 4 * scale]))
    assert torch.allclose(b.grad, torch.tensor([12 * scale]))
    a.grad, b.grad = torch.tensor([0.3, 0.4]), torch.tensor([1.2])  # norm 1.3 < 2: untouched
    assert math.isclose(float(clip_grad_norm([a, b], max_norm=2.0)), 1.3, rel_tol=1e-6)
    assert torch.equal(a.grad, torch.tensor([0.3, 0.4])) and torch.equal(b.grad, torch.tensor([1.2]))


def test_get_batch_shapes_shift_range_and_reproducibility():
    x = np.arange(50, dtype=np.uint16)
    seen = set()
    for seed in range(200):
        inputs, targets = data.get_batch(x, 4, 8, "cpu", torch.Generator().manual_seed(seed))
        assert inputs.shape == targets.shape == (4, 8) and inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(targets, inputs + 1) and torch.equal(inputs, inputs[:, :1] + torch.arange(8))
        seen.update(inputs[:, 0].tolist())
    assert seen == set(range(50 - 8))  # every start 0..len-context-1, and none beyond
    a = data.get_batch(x, 4, 8, "cpu", torch.Generator().manual_seed(5))
    b = data.get_batch(x, 4, 8, "cpu", torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0])
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "t.bin")
        x.astype("<u2").tofile(path)
        c = data.get_batch(data.load_tokens(path, 64), 4, 8, "cpu", torch.Generator().manual_seed(5))
        assert torch.equal(a[0], c[0])
    on_device = torch.from_numpy(x.astype(np.int32))  # what data.tokens_to_device keeps on a GPU
    d = data.get_batch(on_device, 4, 8, "cpu", torch.Generator().manual_seed(5))  # gathered from the tensor
    assert torch.equal(a[0], d[0]) and torch.equal(a[1], d[1]) and d[0].dtype == torch.int64
    assert data.tokens_to_device(x, torch.device("cpu")) is x  # off CUDA the array stays where it is


def test_load_tokens_refuses_odd_bytes_and_out_of_range_ids():
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "t.bin")
        with open(path, "wb") as f:
            f.write(b"\x01\x00\x02")
        try:
            data.load_tokens(path, 100)
            assert False, "odd byte count accepted"
        except ValueError as e:
            assert path in str(e) and "3 bytes" in str(e) and "\n" not in str(e)
        text = _bpe_write(os.path.join(root, "t.txt"), _bpe_corpus(0, 30))
        with contextlib.redirect_stdout(io.StringIO()):
            cache = data.prepare_splits([text, text], os.path.join(root, "tok"), 300)[0]
        for name in (path, cache):  # a .bin of the user's, then a cache that prepare made from text
            open(name, "wb").close()
            try:
                data.load_tokens(name, 300)
                assert False, "an empty token file accepted"
            except ValueError as e:
                fix = f"delete it and run again to tokenize {text} again" if name == cache else "point train_data"
                assert str(e).startswith(f"{name} has 0 bytes, no uint16 tokens") and fix in str(e), e
        np.array([1, 2, 700, 3], dtype="<u2").tofile(path)
        try:
            data.load_tokens(path, 512)
            assert False, "id 700 accepted with vocab 512"
        except ValueError as e:
            assert path in str(e) and "700" in str(e) and "512" in str(e) and "\n" not in str(e)
        with open(path + ".json") as f:
            assert json.load(f)["max_id"] == 700  # cached for the next load
        assert data.load_tokens(path, 701).tolist() == [1, 2, 700, 3]
        np.array([1, 2, 3, 4, 5, 9000], dtype="<u2").tofile(path)  # new size: the cache must not be trusted
        try:
            data.load_tokens(path, 701)
            assert False, "stale cache used"
        except ValueError as e:
            assert "9000" in str(e)


def test_configure_files_and_overrides():
    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(root, "base.py"), "w") as f:
            f.write("lr = 1\nbatch_size = 16\nnum_layers = 8\n")
        with open(os.path.join(root, "child.py"), "w") as f:
            f.write("include('base.py')\nnum_layers = 2\nmin_lr = lr / 10\nd_model = 512\n")
        argv = [os.path.join(root, "child.py"), "--batch_size=8", "--betas=(0.8, 0.9)", "--compile=true",
                "--target_val_loss=1.5", "--out_dir=2024", "--max_iters=1e3", "--device=cpu", "--d_ff=96"]
        with contextlib.redirect_stdout(io.StringIO()):
            cfg, given = train.configure(train.DEFAULTS, argv), configurator.overrides(train.DEFAULTS, argv)
    # What the files and flags set, including a value equal to the default (d_model = 512) and an included file's.
    assert set(given) == {"lr", "batch_size", "num_layers", "min_lr", "d_model", "betas", "compile",
                          "target_val_loss", "out_dir", "max_iters", "device", "d_ff"}, set(given)
    assert train.DEFAULTS["d_model"] == 512 and cfg == train.DEFAULTS | given
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float) and cfg["min_lr"] == 0.1
    assert cfg["num_layers"] == 2 and cfg["batch_size"] == 8 and cfg["betas"] == (0.8, 0.9)
    assert cfg["target_val_loss"] == 1.5 and cfg["out_dir"] == "2024"
    assert train.check_config(cfg)["compile"] is True  # a tri-state key ('auto', True, False) reads true/false too
    assert cfg["max_iters"] == 1000 and isinstance(cfg["max_iters"], int)
    assert cfg["device"] == "cpu" and cfg["d_ff"] == 96
    assert set(cfg) == set(train.DEFAULTS)


def test_configure_errors_name_the_key():
    def message(argv=(), **cfg):
        try:
            if cfg:
                train.check_config(dict(train.DEFAULTS, **cfg))
            else:
                train.configure(train.DEFAULTS, list(argv))
        except ValueError as e:
            assert "\n" not in str(e)
            return str(e)
        raise AssertionError(f"accepted {argv or cfg}")

    assert "'lrr'" in message(["--lrr=1"]) and "'lr'" in message(["--lrr=1"])
    assert "batch_size" in message(["--batch_size=abc"]) and "int" in message(["--batch_size=abc"])
    assert "compile" in message(compile=1) and "compile" in message(compile="1")  # ints are not booleans
    assert "max_iters" in message(["--max_iters=2.5"])
    assert "batch_size" in message(batch_size=0) and "dtype" in message(dtype="float8")
    assert "betas" in message(betas=(0.9, 1.0)) and "diverge_factor" in message(diverge_factor=0.5)
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "c.py")
        with open(path, "w") as f:
            f.write("leraning_rate = 3e-3\n")
        assert "leraning_rate" in message([path])


def test_cli_bad_key_exits_2_without_traceback():
    repo = os.path.dirname(os.path.abspath(train.__file__))
    proc = subprocess.run([sys.executable, "train.py", "--nope=1"], cwd=repo, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: ") and "'nope'" in proc.stderr


def test_checkpoint_round_trip_through_file_object():
    torch.manual_seed(0)
    model = train.TransformerLM(64, 16, 16, 1, 2, d_ff=32)
    opt = AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 64, (2, 16))
    model.loss(x, x)[0].backward()
    opt.step()
    buffer = io.BytesIO()
    train.save_checkpoint(model, opt, 5, buffer, config={"lr": 1e-3}, tokenizer_dir="tok")
    buffer.seek(0)
    model2 = train.TransformerLM(**model.config)
    opt2 = AdamW(model2.parameters(), lr=1.0)
    assert train.load_checkpoint(buffer, model2, opt2) == 5
    _pipeline_assert_same_params(model, model2)
    assert opt2.param_groups[0]["lr"] == 1e-3
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for moment in ("m", "v"):
            assert torch.equal(opt.state[p][moment], opt2.state[p2][moment])
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    assert ckpt["model_config"] == model.config and ckpt["tokenizer_dir"] == "tok" and ckpt["config"] == {"lr": 1e-3}


def test_resume_gives_bitwise_the_same_run():
    with tempfile.TemporaryDirectory() as root:
        whole = train.main(_pipeline_cfg(root, out_dir=os.path.join(root, "whole"), max_iters=10, z_loss=1e-3))
        split_dir = os.path.join(root, "split")
        train.main(_pipeline_cfg(root, out_dir=split_dir, max_iters=6, z_loss=1e-3))
        with open(os.path.join(split_dir, "log.csv"), "a") as f:
            f.write("7,999,1.0,0.1,9.9,,,1.0,1.0,0.0,0.0,\n8,1")  # rows past the checkpoint, one cut off: dropped
        resumed = train.main(_pipeline_cfg(root, out_dir=split_dir, max_iters=10, z_loss=1e-3, resume=True))
        assert whole["status"] == resumed["status"] == "done" and whole["step"] == resumed["step"] == 10
        rows = _pipeline_rows(os.path.join(root, "whole"))
        assert [int(r[0]) for r in rows] == list(range(11)) and rows[4][4] and rows[8][4]  # val at 0, 4, 8, 10
        split_rows = _pipeline_rows(split_dir)  # the same, plus a val loss at 6 (where the first part ended)
        assert split_rows[:6] + split_rows[7:] == rows[:6] + rows[7:] and split_rows[6][:4] == rows[6][:4]
        assert split_rows[6][4] and not rows[6][4]
        _pipeline_assert_same_params(whole["model"], resumed["model"])


def _stopped_by(cfg, signum):
    """train.main(cfg), sent signum once log.csv holds steps 0..3 -> its result, after checking it saved there."""
    log = os.path.join(cfg["out_dir"], "log.csv")
    finished = threading.Event()

    def interrupt_after_three_rows():
        while not os.path.exists(log) or sum(1 for _ in open(log)) < 5:  # header and steps 0..3
            if finished.wait(0.01):
                return  # main() ended on its own (a failure): never signal the test runner
        os.kill(os.getpid(), signum)

    threading.Thread(target=interrupt_after_three_rows, daemon=True).start()
    try:
        stopped = train.main(cfg)
    finally:
        finished.set()
    assert stopped["status"] == "interrupted" and 3 <= stopped["step"] < 1000
    assert train.read_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"))["iteration"] == stopped["step"]
    return stopped


def test_ctrl_c_saves_and_resume_continues_exactly():
    with tempfile.TemporaryDirectory() as root:
        cfg = _pipeline_cfg(root, max_iters=100000, eval_interval=1000, cosine_iters=100000)
        _stopped_by(dict(cfg, out_dir=os.path.join(root, "hangup")), signal.SIGHUP)  # a closed terminal saves too
        stopped = _stopped_by(cfg, signal.SIGINT)
        end = stopped["step"] + 3
        resumed = train.main(dict(cfg, max_iters=end, resume=True))
        whole = train.main(dict(cfg, max_iters=end, out_dir=os.path.join(root, "whole")))
        assert resumed["step"] == whole["step"] == end
        _pipeline_assert_same_params(whole["model"], resumed["model"])
        assert _pipeline_rows(cfg["out_dir"]) == _pipeline_rows(os.path.join(root, "whole"))


def test_resume_refuses_other_flags_and_corrupt_checkpoints():
    with tempfile.TemporaryDirectory() as root:
        cfg = _pipeline_cfg(root, max_iters=2)
        train.main(cfg)
        for changes, named in (({"d_model": 32}, "d_model"), ({"pos": "none", "z_loss": 0.1}, "z_loss")):
            try:
                train.main(dict(cfg, resume=True, **changes))
                assert False, f"resumed with {changes}"
            except ValueError as e:
                message = str(e)
            assert named in message and "\n" not in message
        assert "pos (checkpoint 'rope', now 'none')" in message
        path = os.path.join(cfg["out_dir"], "ckpt.pt")
        with open(path, "rb") as f:
            good = f.read()
        for damaged in (good[: len(good) // 2], b"not a checkpoint at all"):
            with open(path, "wb") as f:
                f.write(damaged)
            try:
                train.main(dict(cfg, resume=True, max_iters=4))
                assert False, "corrupt checkpoint accepted"
            except ValueError as e:
                assert path in str(e) and "corrupt" in str(e) and "\n" not in str(e)


def test_divergence_stops_early_and_keeps_the_last_good_checkpoint():
    with tempfile.TemporaryDirectory() as root:
        # A training loss above 3x its start (lr 50), then non-finite losses with the factor off (lr 1e30), caught
        # by the training step (eval every 100) or by the validation at step 1 (eval every step).
        for lr, factor, every in ((50.0, 3.0, 100), (1e30, 0.0, 100), (1e30, 0.0, 1)):
            cfg = _pipeline_cfg(root, lr=lr, min_lr=0.0, warmup_iters=0, max_iters=200, diverge_factor=factor,
                                eval_interval=every, out_dir=os.path.join(root, f"lr{lr}_{every}"))
            result = train.main(cfg)
            assert result["status"] == "diverged" and result["step"] < 5, result
            last = _pipeline_rows(cfg["out_dir"])[-1]
            assert last[-1] == "diverged" and int(last[0]) == result["step"] + (every == 100)
            if factor:
                assert float(last[3]) > factor * math.log(64) * 0.9, last
            else:
                losses = (last[3] or "nan", last[4] or "nan", last[6] or "nan")  # train, val, grad norm
                assert not all(math.isfinite(float(v)) for v in losses), last
            ckpt = train.read_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"))
            assert ckpt["iteration"] < int(last[0]) and all(t.isfinite().all() for t in ckpt["model"].values())
            model = train.TransformerLM(**ckpt["model_config"])
            train.load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"), model, None)
            x = torch.randint(0, 64, (2, 16))
            assert math.isfinite(model.loss(x, x)[0].item())


def test_target_val_loss_stops_the_run():
    with tempfile.TemporaryDirectory() as root:
        result = train.main(_pipeline_cfg(root, max_iters=50, target_val_loss=100.0))
        assert result["status"] == "target" and result["step"] == 0
        assert _pipeline_rows(os.path.join(root, "out"))[-1][-1] == "target"


def test_raw_text_trains_tokenizer_once_and_caches_token_files():
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        words = ["".join(rng.choice(list("abcdefghijklmnop"), rng.integers(2, 7))) for _ in range(300)]
        for name, n in (("train.txt", 300), ("val.txt", 40)):
            with open(os.path.join(root, name), "w") as f:
                f.write("<|endoftext|>".join(" ".join(rng.choice(words, 12)) + "." for _ in range(n)))
        cfg = dict(_pipeline_cfg(root, max_iters=2, vocab_size=300), train_data=os.path.join(root, "train.txt"),
                   val_data=os.path.join(root, "val.txt"))
        assert train.main(cfg)["status"] == "done"
        bins = [data.token_cache_path(cfg[key], cfg["tokenizer_dir"]) for key in ("train_data", "val_data")]
        stamps = [os.stat(p).st_mtime_ns for p in bins + [os.path.join(cfg["tokenizer_dir"], "vocab.json")]]
        train.main(cfg)
        assert stamps == [os.stat(p).st_mtime_ns for p in bins + [os.path.join(cfg["tokenizer_dir"], "vocab.json")]]
        with open(os.path.join(cfg["out_dir"], "config.json")) as f:
            assert json.load(f)["vocab_size"] == 300
        assert train.main(dict(cfg, train_data=bins[0], val_data=bins[1], tokenizer_dir="unused"))["status"] == "done"
        try:
            train.main(dict(cfg, vocab_size=400))
            assert False, "tokenizer / vocab_size mismatch accepted"
        except ValueError as e:
            assert "vocab_size" in str(e) and "300" in str(e)


def test_repository_configs_resolve():
    repo = os.path.dirname(os.path.abspath(train.__file__))
    configs = {name: train.configure(train.DEFAULTS, [os.path.join(repo, "config", name + ".py")])
               for name in ("demo", "tinystories", "tinystories_no_norm", "tinystories_post_norm", "tinystories_nope",
                            "tinystories_silu", "owt")}
    base = configs["tinystories"]
    assert base["batch_size"] * base["context_length"] * base["max_iters"] == 327_680_000
    shape = tuple(base[k] for k in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"))
    assert shape == (10000, 256, 512, 4, 16, 1344) and base["target_val_loss"] == 1.45
    assert configs["tinystories_no_norm"]["norm"] == "none" and configs["tinystories_no_norm"]["lr"] < base["lr"]
    assert configs["tinystories_post_norm"]["norm"] == "post" and configs["tinystories_nope"]["pos"] == "none"
    assert configs["tinystories_silu"]["ffn"] == "silu" and configs["tinystories_silu"]["d_ff"] == 2048
    assert configs["owt"]["vocab_size"] == 32000 and len({c["out_dir"] for c in configs.values()}) == len(configs)


def _two_gloo_ranks(argv_of_rank, **popen) -> list[subprocess.Popen]:
    """Ranks 0 and 1 of a two-process torchrun-style group on a free local port, started from the repository:
    argv_of_rank(r) is rank r's command line; popen adds Popen arguments (stdout, stderr)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.abspath(train.__file__))
    return [subprocess.Popen(argv_of_rank(r), cwd=repo, text=True, **popen,
                             env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
            for r in range(2)]


@slow
def test_ddp_two_gloo_processes_match_one_process_on_the_concatenated_batch():
    with tempfile.TemporaryDirectory() as root:
        steps = 3
        # eps and no clipping make the update depend on the gradient's scale (Adam alone would hide a sum vs a mean).
        cfg = _pipeline_cfg(root, max_iters=steps, eval_interval=100, warmup_iters=0, grad_clip=0.0, eps=1e-2)
        worker = ("import json, sys, torch, train; cfg = json.loads(sys.argv[1]); "
                  "torch.save(train.main(cfg)['model'].state_dict(), sys.argv[2])")
        procs = _two_gloo_ranks(lambda r: [sys.executable, "-c", worker, json.dumps(cfg),
                                           os.path.join(root, f"rank{r}.pt")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
        ranks = [torch.load(os.path.join(root, f"rank{r}.pt"), weights_only=True) for r in range(2)]
        for name in ranks[0]:
            assert torch.equal(ranks[0][name], ranks[1][name]), name
        rows = _pipeline_rows(cfg["out_dir"])
        assert [int(r[0]) for r in rows] == [0, 1, 2, 3]  # one writer: rank 0

        # One process, the same initial weights, each step on both ranks' batches concatenated.
        model = train.main(dict(cfg, max_iters=0, out_dir=os.path.join(root, "init")))["model"]
        tokens = data.load_tokens(cfg["train_data"], cfg["vocab_size"])
        opt = AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2]},
                     {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                    lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"], weight_decay=cfg["weight_decay"])
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, cfg["lr"], cfg["min_lr"], cfg["warmup_iters"], cfg["cosine_iters"])
            generators = [torch.Generator().manual_seed(train.batch_seed(cfg["seed"], r, step)) for r in range(2)]
            batches = [data.get_batch(tokens, cfg["batch_size"], cfg["context_length"], "cpu", g) for g in generators]
            x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            loss = model.loss(x, y)[0]
            loss.backward()
            opt.step()
            if step == 0:  # the logged loss is the mean over ranks (at step 1 the smoothed loss is the raw one)
                assert math.isclose(float(rows[1][3]), loss.item(), rel_tol=1e-5), (rows[1], loss.item())
            opt.zero_grad()
        for name, p in model.state_dict().items():
            assert torch.allclose(p, ranks[0][name], rtol=1e-4, atol=1e-6), (name, (p - ranks[0][name]).abs().max())


# ----------------------------------------------------------------------------------------------------
# Numbers to trust and the usual knobs (train.py, checkpoint.py): fixed validation windows, bits per byte,
# schedules that follow overrides, accumulation, fine-tuning, float16, checkpoints for any module
# ----------------------------------------------------------------------------------------------------

def _quiet_main(cfg):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = train.main(cfg)
    return result, out.getvalue()


def _tree_digest(root):
    """{path under root: its bytes' sha256} for every file below root: to check that nothing was touched."""
    return {os.path.relpath(os.path.join(d, n), root): hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
            for d, _, names in os.walk(root) for n in names}


def _error_of(fn):
    """The one-line ValueError/OSError message fn raises (fails the test if it raises nothing)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            fn()
    except (ValueError, OSError, MemoryError) as e:
        assert "\n" not in str(e), str(e)
        return str(e)
    raise AssertionError("accepted")


def test_eval_starts_fixed_windows_spread_over_the_file():
    assert data.eval_starts(10, 3, 0).tolist() == [0, 3, 6]  # 3 whole windows (the last target is token 9)
    assert data.eval_starts(10, 3, 6).tolist() == [0, 3]
    assert data.eval_starts(1000, 10, 0).tolist() == list(range(0, 990, 10))  # 99 windows: 990 + 10 targets > 999
    spread = data.eval_starts(1000, 10, 40).tolist()  # 4 of the 99, evenly apart, whole windows, no overlap
    assert spread == [0, 240, 490, 740]
    assert data.eval_starts(1000, 10, 10**9).tolist() == data.eval_starts(1000, 10, 0).tolist()


def test_val_loss_independent_of_batch_size_and_its_bpb_by_hand():
    with tempfile.TemporaryDirectory() as root:
        base = _pipeline_cfg(root, max_iters=0, eval_tokens=0)
        losses = [_quiet_main(dict(base, batch_size=b, out_dir=os.path.join(root, f"b{b}")))[0]["val_loss"]
                  for b in (1, 8, 64)]
        assert max(losses) - min(losses) < 1e-6 * losses[0], losses
        # The loss by hand: every non-overlapping 16-token window of val.bin (4000 tokens: 249 windows), one by one.
        tokens = np.fromfile(base["val_data"], dtype="<u2").astype(np.int64)
        torch.manual_seed(base["seed"])
        flags = {k: base[k] for k in model.MODEL_KEYS}
        reference = TransformerLM(**flags)
        nll = [reference.loss(torch.tensor(tokens[s:s + 16])[None], torch.tensor(tokens[s + 1:s + 17])[None])[0].item()
               for s in range(0, 249 * 16, 16)]
        assert math.isclose(losses[0], sum(nll) / len(nll), rel_tol=1e-5)

        # Bits per byte: a stand-in model with loss 2 nats on every token and a vocabulary with known byte lengths.
        class Constant(torch.nn.Module):
            def loss(self, x, y):
                return torch.tensor(2.0), torch.tensor(0.0)
        lengths = torch.tensor([1, 2, 3, 13])  # bytes of tokens 0..3 (3: a special token, its string's 13 bytes)
        val = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])  # windows of 4 at 0 and 4: targets 1,2,3,0 and 1,2,3,0
        cfg = dict(train.DEFAULTS, batch_size=1, context_length=4)
        loss, bpb, stopped = train.evaluate(Constant(), val, np.array([0, 4]), lengths, cfg, torch.device("cpu"),
                                            contextlib.nullcontext(), 0, 1, [])
        assert loss == 2.0 and not stopped and math.isclose(bpb, 2.0 * 8 / math.log(2) / (2 * (2 + 3 + 13 + 1)))
        # The byte lengths of a real tokenizer: the tokens of a text (special token, accents, emoji) sum to its bytes.
        text = _bpe_write(os.path.join(root, "u.txt"), ("Ça va? naïve café 🙂 " * 30 + _BPE_EOT) * 5)
        tok_dir = os.path.join(root, "utok")
        with contextlib.redirect_stdout(io.StringIO()):
            bpe.train_tokenizer(text, 300, tok_dir)
        lengths = train.token_byte_lengths(dict(train.DEFAULTS, tokenizer_dir=tok_dir, vocab_size=300),
                                           torch.device("cpu"))
        raw = open(text, encoding="utf-8").read()
        ids = bpe.load_tokenizer(tok_dir).encode(raw)
        assert len(set(ids)) > 5 and len(ids) < len(raw) and int(lengths[ids].sum()) == len(raw.encode("utf-8"))


def test_schedule_follows_overrides_of_a_config_file():
    repo = os.path.dirname(os.path.abspath(train.__file__))
    with contextlib.redirect_stdout(io.StringIO()):
        cfg = train.check_config(train.configure(train.DEFAULTS, [os.path.join(repo, "config", "tinystories.py"),
                                                                 "--lr=1e-4", "--max_iters=20000"]))
    assert cfg["min_lr"] == 1e-5 and cfg["cosine_iters"] == 20000
    assert train.lr_at(150, cfg) == 1e-4 and train.lr_at(20000, cfg) == 1e-5
    assert math.isclose(train.lr_at(10075, cfg), 1e-5 + 0.5 * (1e-4 - 1e-5))  # half way through the decay
    assert train.check_config(dict(cfg, min_lr=None, min_lr_ratio=0.5, lr=1.0, cosine_iters=None))["min_lr"] == 0.5
    message = _error_of(lambda: train.check_config(dict(cfg, warmup_iters=300, cosine_iters=200)))
    assert "cosine_iters" in message and "warmup_iters" in message
    message = _error_of(lambda: train.check_config(dict(cfg, warmup_iters=300, max_iters=200, cosine_iters=None)))
    assert message.startswith("max_iters=200 ") and "warmup_iters=300" in message and "None" not in message, message
    assert _error_of(lambda: train.check_config(dict(cfg, min_lr=None, min_lr_ratio=2))).startswith("min_lr_ratio=2")
    for bad in ({"grad_accum_steps": 0}, {"eval_tokens": -1}, {"min_lr": 1.0}, {"init_from": "x", "resume": True},
                {"vocab_size": 70000}, {"compile": "yes"}):
        assert next(iter(bad)) in _error_of(lambda: train.check_config(dict(cfg, **bad))), bad


def test_resume_with_a_new_max_iters_says_how_the_schedule_continues():
    with tempfile.TemporaryDirectory() as root:
        cfg = _pipeline_cfg(root, max_iters=4, cosine_iters=None, min_lr=None)
        _quiet_main(cfg)
        _, out = _quiet_main(dict(cfg, max_iters=8, resume=True))
        assert "schedule: step 4 of 8" in out and "cosine to 0.0003 at step 8" in out and "checkpoint's schedule" in out


def test_grad_accumulation_equals_the_big_batch_and_resumes_exactly():
    with tempfile.TemporaryDirectory() as root:
        base = _pipeline_cfg(root, max_iters=5, eval_interval=5, grad_clip=0.0, eps=1e-2)
        big, _ = _quiet_main(dict(base, batch_size=8, out_dir=os.path.join(root, "big")))
        acc, _ = _quiet_main(dict(base, batch_size=2, grad_accum_steps=4, out_dir=os.path.join(root, "acc")))
        for (name, p), q in zip(big["model"].named_parameters(), acc["model"].parameters()):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (name, (p - q).abs().max())
        rows_big, rows_acc = (_pipeline_rows(os.path.join(root, d)) for d in ("big", "acc"))
        for a, b in zip(rows_big[1:], rows_acc[1:]):  # the same tokens and (to rounding) the same mean loss
            assert a[1] == b[1] and math.isclose(float(a[3]), float(b[3]), rel_tol=1e-5)
        assert int(rows_acc[-1][1]) == 5 * 8 * 16
        split = dict(base, batch_size=2, grad_accum_steps=4, out_dir=os.path.join(root, "split"))
        _quiet_main(dict(split, max_iters=3))
        resumed, _ = _quiet_main(dict(split, resume=True))
        _pipeline_assert_same_params(acc["model"], resumed["model"])


@slow
def test_ddp_accumulation_one_all_reduce_per_step_and_the_same_val_loss_on_two_ranks():
    worker = ("import json, sys, torch, torch.distributed as d, train; cfg = json.loads(sys.argv[1]); n = [0]\n"
              "reduce = d.all_reduce\n"
              "def counted(*a, **k):\n    n[0] += 1\n    return reduce(*a, **k)\n"
              "d.all_reduce = counted\nr = train.main(cfg)\n"
              "torch.save({'params': r['model'].state_dict(), 'reduces': n[0]}, sys.argv[2])")
    with tempfile.TemporaryDirectory() as root:
        base = _pipeline_cfg(root, max_iters=3, eval_interval=100, eval_tokens=0, grad_clip=0.0, eps=1e-2)
        runs = {"acc": dict(base, batch_size=2, grad_accum_steps=2), "big": dict(base, batch_size=4)}
        procs = []
        for name, cfg in runs.items():
            cfg["out_dir"] = os.path.join(root, name)
            procs += _two_gloo_ranks(lambda r, name=name, cfg=cfg: [sys.executable, "-c", worker, json.dumps(cfg),
                                                                    os.path.join(root, f"{name}{r}")],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        outputs = [p.communicate(timeout=180)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
        got = {name: torch.load(os.path.join(root, f"{name}0"), weights_only=True) for name in runs}
        assert got["acc"]["reduces"] == got["big"]["reduces"] == 3 + 2  # one per step, one per evaluation (0 and 3)
        for key, p in got["big"]["params"].items():
            assert torch.allclose(p, got["acc"]["params"][key], rtol=1e-5, atol=1e-6), key
        one_rank, _ = _quiet_main(dict(base, max_iters=0, batch_size=7, out_dir=os.path.join(root, "one")))
        two_ranks = [r for r in _pipeline_rows(os.path.join(root, "acc")) if r[0] == "0"][0]
        assert math.isclose(float(two_ranks[4]), one_rank["val_loss"], rel_tol=1e-6)


def test_init_from_loads_weights_and_nothing_else():
    with tempfile.TemporaryDirectory() as root:
        first, _ = _quiet_main(_pipeline_cfg(root, max_iters=4, out_dir=os.path.join(root, "first")))
        source = os.path.join(root, "first", "ckpt.pt")
        cfg = _pipeline_cfg(root, init_from=source, out_dir=os.path.join(root, "tuned"), max_iters=0, seed=99,
                            lr=1e-3, min_lr=None)
        tuned, out = _quiet_main(cfg)
        _pipeline_assert_same_params(first["model"], tuned["model"])
        assert "starting from the weights of" in out and math.isclose(tuned["val_loss"], first["val_loss"])
        ckpt = train.read_checkpoint(os.path.join(root, "tuned", "ckpt.pt"))
        assert ckpt["iteration"] == 0 and ckpt["optimizer"]["state"] == {} and ckpt["loop"]["first_loss"] is None
        with open(os.path.join(root, "tuned", "run.json")) as f:
            assert json.load(f)["init_from"] == {"path": source, "iteration": 4}
        unset = {k: v for k, v in cfg.items() if k not in train.MODEL_KEYS}  # flags it does not set: the weights'
        _, out = _quiet_main(dict(unset, out_dir=os.path.join(root, "unset")))
        assert f"from the weights vocab_size={first['model'].config['vocab_size']}, context_length=16, d_model=16" in out
        defaults = {k: train.DEFAULTS[k] for k in ("qk_norm", "context_length", "d_model")}  # set, to train.py's values
        message = _error_of(lambda: train.main(dict(unset, **defaults, out_dir=os.path.join(root, "bad"))))
        assert "context_length (source 16, this run 256), d_model (source 16, this run 512) differ" in message, message
        shorter, _ = _quiet_main(dict(cfg, context_length=8, out_dir=os.path.join(root, "short"), eval_tokens=0))
        assert shorter["model"].config["context_length"] == 8 and torch.equal(
            shorter["model"].lm_head.weight, first["model"].lm_head.weight)
        for bad, named in (({"d_model": 32}, "d_model"), ({"context_length": 32}, "context_length"),
                           ({"init_from": os.path.join(root, "nothing.pt")}, f"init_from={root}/nothing.pt: no "),
                           ({"init_from": os.path.join(root, "first")}, "first: it is a directory"),
                           ({"resume": True}, "init_from")):
            assert named in _error_of(lambda: train.main(dict(cfg, out_dir=os.path.join(root, "bad"), **bad))), bad
        with open(os.path.join(root, "junk.pt"), "wb") as f:
            f.write(b"not a checkpoint")
        message = _error_of(lambda: train.main(dict(cfg, init_from=os.path.join(root, "junk.pt"))))
        assert message.startswith(f"init_from={root}/junk.pt: ") and "truncated or corrupt" in message, message
        assert "delete" not in message  # not advice for the weights a user starts from
        assert not os.path.exists(os.path.join(root, "bad"))  # refused before anything was written
        with tempfile.TemporaryDirectory() as text_root:  # raw text needs the weights' own tokenizer
            rng = np.random.default_rng(1)
            words = [" ".join(rng.choice(["to", "be", "or", "not", "that", "is", "the", "question"], 60))
                     for _ in range(40)]
            text = _bpe_write(os.path.join(text_root, "t.txt"), _BPE_EOT.join(words))
            raw = _pipeline_cfg(text_root, train_data=text, val_data=text, vocab_size=270, max_iters=1, warmup_iters=1,
                                out_dir=os.path.join(text_root, "a"))
            _quiet_main(raw)
            other = os.path.join(text_root, "other")
            with contextlib.redirect_stdout(io.StringIO()):
                bpe.train_tokenizer(_bpe_write(os.path.join(text_root, "u.txt"), "".join(reversed(open(text).read()))),
                                    270, other)
            tuned = dict(raw, init_from=os.path.join(text_root, "a", "ckpt.pt"), out_dir=os.path.join(text_root, "b"))
            assert "another tokenizer" in _error_of(lambda: train.main(dict(tuned, tokenizer_dir=other)))
            assert _quiet_main(tuned)[0]["status"] == "done"


def test_float16_overflow_skips_the_step_and_resume_stays_exact():
    scale = train.LossScaler(True, scale=8.0, interval=2)
    assert scale.skip(torch.tensor(float("inf"))) and scale.scale == 4.0
    assert not scale.skip(torch.tensor(1.0)) and not scale.skip(torch.tensor(1.0)) and scale.scale == 8.0
    # A scaled loss (2^10, exact in float32) is unscaled before clipping and AdamW: the same norm and the same step.
    cfg = dict(train.DEFAULTS, grad_accum_steps=2, grad_clip=0.5, z_loss=0.0)
    x, y = torch.randint(0, 32, (4, 8)), torch.randint(0, 32, (4, 8))
    steps = []
    for scaler in (train.LossScaler(False), train.LossScaler(True, scale=2.0**10)):
        torch.manual_seed(0)
        lm = TransformerLM(32, 8, 16, 1, 2, d_ff=32)
        stats = train.train_step(lm, lm.loss, AdamW(lm.parameters(), lr=1e-2), x, y, 1e-2, cfg, contextlib.nullcontext(),
                                 scaler, world=1)
        steps.append((stats[3].item(), [p.detach().clone() for p in lm.parameters()]))
    (norm, weights), (scaled_norm, scaled_weights) = steps
    assert norm > 0.5 and math.isclose(scaled_norm, norm, rel_tol=1e-6), (norm, scaled_norm)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(weights, scaled_weights))
    pick_dtype, init = train.pick_dtype, train.LossScaler.__init__
    train.pick_dtype = lambda name, dev: (torch.float16, "test: float16 autocast on the CPU")
    train.LossScaler.__init__ = lambda self, enabled: init(self, enabled, scale=2.0**40)  # gradients overflow first
    try:
        with tempfile.TemporaryDirectory() as root:
            cfg = _pipeline_cfg(root, max_iters=30, eval_interval=10, lr=1e-2)
            whole, _ = _quiet_main(dict(cfg, out_dir=os.path.join(root, "whole")))
            _quiet_main(dict(cfg, max_iters=14))
            resumed, _ = _quiet_main(dict(cfg, resume=True))
            _pipeline_assert_same_params(whole["model"], resumed["model"])
            with open(os.path.join(root, "whole", "log.csv"), newline="") as f:
                rows = list(csv.DictReader(f))
            skipped = int(rows[-1]["skipped"])
            assert 5 <= skipped < 30 and int(rows[1]["skipped"]) == 1, [r["skipped"] for r in rows]
            ckpt = train.read_checkpoint(os.path.join(root, "whole", "ckpt.pt"))
            assert ckpt["scaler"]["scale"] == 2.0**40 / 2**skipped and ckpt["loop"]["skipped"] == skipped
            fresh, _ = _quiet_main(dict(cfg, max_iters=1, out_dir=os.path.join(root, "one")))
            torch.manual_seed(cfg["seed"])
            _pipeline_assert_same_params(fresh["model"], TransformerLM(**{k: cfg[k] for k in model.MODEL_KEYS}))
    finally:
        train.pick_dtype, train.LossScaler.__init__ = pick_dtype, init
    assert "float16" in _error_of(lambda: train.pick_dtype("float16", torch.device("cpu")))


def test_checkpoints_for_any_module_and_load_errors_name_the_keys():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "ckpt.pt")
        train.save_checkpoint(net, opt, 7, path)
        net2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        opt2 = torch.optim.AdamW(net2.parameters(), lr=1.0)
        assert train.load_checkpoint(path, net2, opt2) == 7 and opt2.param_groups[0]["lr"] == 1e-2
        for a, b in zip(net.parameters(), net2.parameters()):
            assert torch.equal(a, b) and torch.equal(opt.state[a]["exp_avg"], opt2.state[b]["exp_avg"])
        wider = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.ReLU(), torch.nn.Linear(9, 2), torch.nn.Linear(2, 2))
        message = _error_of(lambda: train.load_checkpoint(path, wider, None))
        assert "unexpected" not in message and "missing keys: 3.weight, 3.bias" in message
        assert "0.weight (8, 4) vs (9, 4)" in message
        cfg = _pipeline_cfg(root, out_dir=root, max_iters=2)  # path holds the Sequential's: not for init_from either
        message = _error_of(lambda: train.main(dict(cfg, resume=True)))
        assert "lacks model_config, config, loop, rng" in message and "--init_from" not in message, message
        # A bare checkpoint of a TransformerLM: weights load, --resume says what it lacks.
        cfg = _pipeline_cfg(root, out_dir=os.path.join(root, "run"), max_iters=2)
        lm = TransformerLM(**{k: cfg[k] for k in model.MODEL_KEYS})
        os.makedirs(cfg["out_dir"])
        train.save_checkpoint(lm, AdamW(lm.parameters()), 3, os.path.join(cfg["out_dir"], "ckpt.pt"))
        message = _error_of(lambda: train.main(dict(cfg, resume=True)))
        assert "lacks config, loop, rng" in message and "--init_from=" in message
        tuned, _ = _quiet_main(dict(cfg, init_from=os.path.join(cfg["out_dir"], "ckpt.pt"), max_iters=0,
                                    out_dir=os.path.join(root, "tuned")))
        _pipeline_assert_same_params(lm, tuned["model"])


def test_failing_run_leaves_the_previous_out_dir_byte_for_byte():
    with tempfile.TemporaryDirectory() as root:
        cfg = _pipeline_cfg(root, max_iters=2)
        _quiet_main(cfg)
        before = _tree_digest(cfg["out_dir"])
        short = os.path.join(root, "short.bin")
        np.arange(10, dtype="<u2").tofile(short)
        for bad, named in (({"val_data": short}, "val_data"), ({"train_data": short}, "train_data"),
                           ({"init_from": os.path.join(root, "missing.pt")}, "missing.pt"),
                           ({"eval_tokens": 3}, "eval_tokens"), ({"d_model": 15}, "d_model")):
            assert named in _error_of(lambda: train.main(dict(cfg, **bad))), bad
            assert _tree_digest(cfg["out_dir"]) == before, bad


@slow
def test_closed_stdout_silences_the_console_and_the_run_finishes():
    repo = os.path.dirname(os.path.abspath(train.__file__))
    with tempfile.TemporaryDirectory() as root:
        cfg = _pipeline_cfg(root, max_iters=40, log_interval=1)
        script = "import json, sys, train, configurator\nconfigurator.run_cli(lambda argv: train.main(json.loads(argv[0])) and 0)"
        proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(cfg)], cwd=repo, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        while not proc.stdout.readline().startswith("step 0:"):  # `| grep -m1 "step 0:"`: the reader leaves
            pass
        proc.stdout.close()
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
        assert train.read_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"))["iteration"] == 40


def test_out_dir_own_init_from_resume_past_the_end_and_a_broken_log_refused_before_writing():
    with tempfile.TemporaryDirectory() as root:
        cfg = _pipeline_cfg(root, max_iters=4)
        _quiet_main(cfg)
        open(os.path.join(root, "afile"), "w").close()
        before = _tree_digest(root)
        for bad, named in (({"out_dir": os.path.join(root, "afile", "x")}, "afile is a file, not a directory"),
                           ({"out_dir": " "}, "out_dir=' ' is not allowed"),
                           ({"init_from": os.path.join(cfg["out_dir"], "ckpt.pt")}, "this run's own out_dir/ckpt.pt"),
                           ({"resume": True, "max_iters": 3}, "max_iters=3 is before the step of"),
                           ({"d_model": 2**40, "d_ff": 64}, "weights, gradients and AdamW state (72,057,594"),
                           ({"grad_accum_steps": 2**30}, "a step's batch (1,088.0 GiB)")):  # 2 x 8 x 4 x 2^30 x 17
            message = _error_of(lambda: train.main(dict(cfg, **bad)))
            assert named in message, (bad, message)
        assert _tree_digest(root) == before
        with open(os.path.join(cfg["out_dir"], "log.csv"), "wb") as f:
            f.write(b"step,status\n\xff\xfe,\n")
        before = _tree_digest(root)
        message = _error_of(lambda: train.main(dict(cfg, resume=True, max_iters=6)))
        assert "log.csv is not a readable train.py log" in message and _tree_digest(root) == before, message


def test_two_runs_started_together_prepare_the_data_once():
    """The study starts runs two at a time: both find no tokenizer and no token files; a lock in tokenizer_dir lets
    one prepare while the other waits, then finds the files (they used to race on the same .tmp)."""
    with tempfile.TemporaryDirectory() as root:
        words = [" ".join(random.Random(i).choices(["to", "be", "or", "not", "that", "is"], k=400)) for i in range(30)]
        text = _bpe_write(os.path.join(root, "text.txt"), _BPE_EOT.join(words))
        tok = os.path.join(root, "tok")
        pids = []
        for _ in range(2):
            pid = os.fork()
            if pid == 0:  # the child prepares and reports through its exit code
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        data.prepare_splits([text, text], tok, 270)
                    os._exit(0)
                except BaseException:
                    os._exit(1)
            pids.append(pid)
        assert [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids] == [0, 0]
        bins = [n for n in os.listdir(tok) if n.endswith(".bin")]
        assert len(bins) == 1 and not [n for n in os.listdir(tok) if n.endswith(".tmp")]
        ids = bpe.load_tokenizer(tok).encode(open(text).read())
        assert np.fromfile(os.path.join(tok, bins[0]), dtype="<u2").tolist() == ids


@slow
def test_out_of_memory_at_the_first_step_is_one_line_and_writes_nothing():
    repo = os.path.dirname(os.path.abspath(train.__file__))
    with tempfile.TemporaryDirectory() as root:
        cfg = _pipeline_cfg(root)
        script = ("import json, sys, torch, train, configurator\n"
                  "def full(*a, **k):\n    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 9 GiB')\n"
                  "train.TransformerLM.loss = full\n"
                  "configurator.run_cli(lambda argv: train.main(json.loads(argv[0])) and 0)")
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(cfg)], cwd=repo, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("error: out of memory: the first step with batch_size=4") and \
            "grad_accum_steps" in proc.stderr and not os.path.exists(cfg["out_dir"])


@slow
def test_ddp_rank_0_failing_to_prepare_data_stops_every_rank_with_one_line():
    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(root, "train.txt"), "w") as f:
            f.write("just a few words")  # too little text for a 300-token tokenizer: rank 0 fails while preparing
        argv = [sys.executable, "train.py", f"--train_data={root}/train.txt", f"--val_data={root}/train.txt",
                f"--tokenizer_dir={root}/tok", "--vocab_size=300", f"--out_dir={root}/out", "--device=cpu"]
        procs = _two_gloo_ranks(lambda r: argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        (_, err0), (_, err1) = (p.communicate(timeout=120) for p in procs)
        assert [p.returncode for p in procs] == [2, 2], (err0, err1)
        assert err0.startswith("error: ") and err0.count("\n") == 1 and "Traceback" not in err0 and err1 == "", (err0, err1)
        assert not os.path.exists(f"{root}/out")


def test_tokens_go_to_the_device_in_chunks_without_a_whole_int32_copy():
    tokens = np.random.default_rng(0).integers(0, 65536, 1000).astype("<u2")
    copies = []
    from_numpy = torch.from_numpy
    torch.from_numpy = lambda a: copies.append(len(a)) or from_numpy(a)
    try:
        out = data.upload(tokens, torch.device("cpu"), chunk=300)
    finally:
        torch.from_numpy = from_numpy
    assert out.dtype == torch.int32 and out.tolist() == tokens.astype(np.int64).tolist()
    assert copies == [300, 300, 300, 100]  # the host holds one chunk's int32 copy at a time


def test_kernels_auto_on_cuda_switches_on_only_the_ops_that_pass_the_preflight():
    """train.fast_path as it runs on a CUDA device ('auto' for both): the preflight's one line names the op that
    failed and why, the other ops are switched on, and the loss is compiled (lazily: nothing runs here)."""
    cfg = {**train.DEFAULTS, **_PIPELINE_TINY}
    model_ = TransformerLM(**{k: cfg[k] for k in model.MODEL_KEYS})
    attention = kernels.attention

    def broken(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory (injected)")
    kernels.attention, lines = broken, []
    try:
        loss_fn = train.fast_path(model_, dict(cfg, kernels="auto", compile="auto"), torch.device("cuda"),
                                  torch.float32, lines.append)
    finally:
        kernels.attention = attention
    assert lines == ["kernels: on rmsnorm, swiglu, cross_entropy | off: attention (RuntimeError: out of resource: "
                     "shared memory (injected))"], lines
    fast = {type(m).__name__ for m in model_.modules() if getattr(m, "fast", False)}
    assert fast == {"RMSNorm", "SwiGLU", "TransformerLM"} and loss_fn != model_.loss


def test_ctrl_c_during_evaluation_stops_within_seconds():
    with tempfile.TemporaryDirectory() as root:
        cfg = _pipeline_cfg(root, val_data=_pipeline_tokens(os.path.join(root, "big.bin"), n=400_000), eval_tokens=0,
                            batch_size=1, max_iters=10)
        log, finished, sent = os.path.join(cfg["out_dir"], "log.csv"), threading.Event(), []

        def interrupt_once_evaluating():  # log.csv's header is written just before the step-0 evaluation
            while not os.path.exists(log):
                if finished.wait(0.01):
                    return
            time.sleep(0.3)
            sent.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=interrupt_once_evaluating, daemon=True).start()
        try:
            result, out = _quiet_main(cfg)  # the whole evaluation: 25,000 windows one at a time
        finally:
            finished.set()
        assert sent and time.perf_counter() - sent[0] < 5 and result["status"] == "interrupted", out
        assert result["step"] == 0 and train.read_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"))["iteration"] == 0


def test_compile_failure_and_a_failing_kernel_fall_back_with_one_line_and_the_same_losses():
    with tempfile.TemporaryDirectory() as root:
        cfg = _pipeline_cfg(root, max_iters=3, compile=False, kernels=False)
        plain, _ = _quiet_main(dict(cfg, out_dir=os.path.join(root, "plain")))
        compile_fn, attention = torch.compile, kernels.attention

        def broken_compile(fn, **kwargs):
            def compiled(*args):
                raise RuntimeError("BackendCompilerFailed: injected\nsecond line")
            return compiled

        def broken_attention(*args, **kwargs):
            raise RuntimeError("Illegal shared layout (injected)")
        torch.compile, kernels.attention = broken_compile, broken_attention
        try:
            compiled, out = _quiet_main(dict(cfg, compile=True, out_dir=os.path.join(root, "compiled")))
            assert "compile: failed (RuntimeError: BackendCompilerFailed: injected); continuing with eager ops" in out
            fused, out = _quiet_main(dict(cfg, kernels=True, out_dir=os.path.join(root, "fused")))
            assert "kernels: failed (RuntimeError: Illegal shared layout (injected)); continuing with the reference" in out
        finally:
            torch.compile, kernels.attention = compile_fn, attention
        for run in (compiled, fused):
            _pipeline_assert_same_params(plain["model"], run["model"])
        assert _pipeline_rows(os.path.join(root, "plain")) == _pipeline_rows(os.path.join(root, "compiled"))


# ----------------------------------------------------------------------------------------------------
# Faults, corrupt inputs and distributed training
# ----------------------------------------------------------------------------------------------------

_FAULTS_TINY = dict(vocab_size=64, context_length=16, d_model=16, num_layers=1, num_heads=2, d_ff=32, batch_size=4,
                    lr=3e-3, min_lr=3e-4, warmup_iters=2, cosine_iters=40, eval_tokens=128, eval_interval=4,
                    log_interval=1, device="cpu", dtype="float32", seed=7)
_FAULTS_TIMED = ("elapsed_s", "tokens_per_s", "mfu")  # log.csv columns that measure time, so differ between runs


def _faults_cfg(root, **overrides):
    """A full config for a tiny run in root/out on two generated .bin files (ids mostly count up: learnable)."""
    paths = {}
    for seed, split in enumerate(("train", "val")):
        paths[f"{split}_data"] = path = os.path.join(root, f"{split}.bin")
        if not os.path.exists(path):
            rng = np.random.default_rng(seed)
            ids = np.cumsum(rng.integers(0, 4, 4000) == 0) + rng.integers(0, 2, 4000)
            np.asarray(ids % 64, dtype="<u2").tofile(path)
    return {**train.DEFAULTS, **_FAULTS_TINY, **paths, "tokenizer_dir": os.path.join(root, "tok"),
            "out_dir": os.path.join(root, "out"), **overrides}


def _faults_argv(cfg, **overrides):
    """cfg as train.py command-line overrides (keys that differ from the defaults)."""
    cfg = {**cfg, **overrides}
    return [f"--{k}={v!r}" for k, v in cfg.items() if v != train.DEFAULTS[k]]


def _faults_fork(fn, log_path):
    """Run fn() in a forked child with stdout and stderr appended to log_path; return its pid. Exit code 0 when fn
    returns, a SystemExit's code, 1 after any other exception (traceback in the log). A fork skips the 2-4 s torch
    import of a fresh interpreter. OpenMP's thread pool does not survive a fork (a child that used it would hang),
    so the child computes on one thread."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        torch.set_num_threads(1)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        fn()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _faults_wait(pid, timeout=60.0):
    """The child's exit code (-9 when SIGKILLed); kill it and fail if it runs past timeout."""
    deadline = time.monotonic() + timeout
    while not (ended := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} still running after {timeout:.0f} s")
        time.sleep(0.002)
    return os.waitstatus_to_exitcode(ended[1])


def _faults_tail(path, n=2000):
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def _faults_cli(argv, root, prepare=None):
    """`python train.py *argv` in a forked child (prepare() runs first, in the child): (exit code, stderr text).
    runpy executes train.py as __main__, so its own CLI code parses the arguments and reports the errors."""
    err_path = os.path.join(root, "cli.stderr")
    with open(err_path, "w"):
        pass

    def cli():
        os.dup2(os.open(err_path, os.O_WRONLY), 2)
        if prepare:
            prepare()
        sys.argv = ["train.py", *argv]
        runpy.run_path(train.__file__, run_name="__main__")

    code = _faults_wait(_faults_fork(cli, os.path.join(root, "cli.stdout")))
    return code, _faults_tail(err_path)


def _faults_assert_equal(a, b, where="checkpoint"):
    """Nested dicts/lists of tensors and numbers, equal bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (where, a.keys(), b.keys())
        for k in a:
            _faults_assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _faults_assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)


def _faults_rows(out_dir):
    """log.csv as a list of rows, without the columns that measure time."""
    with open(os.path.join(out_dir, "log.csv")) as f:
        header, *rows = [line.split(",") for line in f.read().splitlines()]
    assert header == list(train.CSV_COLUMNS), header
    keep = [i for i, c in enumerate(header) if c not in _FAULTS_TIMED]
    return [[row[i] for i in keep] for row in rows]


def _faults_assert_same_run(out_dir, reference_dir):
    """The finished run in out_dir equals the uninterrupted one in reference_dir: weights, AdamW moments, RNG and loop
    state (except elapsed time) bit for bit, and log.csv in every column that does not measure time."""
    got, want = (train.read_checkpoint(os.path.join(d, "ckpt.pt")) for d in (out_dir, reference_dir))
    for key in ("iteration", "model", "optimizer", "rng", "model_config"):
        _faults_assert_equal(got[key], want[key], key)
    _faults_assert_equal({**got["loop"], "elapsed": 0}, {**want["loop"], "elapsed": 0}, "loop")
    assert _faults_rows(out_dir) == _faults_rows(reference_dir)


def _faults_logged_step(log_path, stale_inode):
    """The last step in log.csv once this run has rewritten it (start_log replaces the file: a new inode); else -1."""
    try:
        if os.stat(log_path).st_ino == stale_inode:
            return -1
        with open(log_path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return -1
    return int(lines[-1].split(",")[0]) if len(lines) > 1 else -1  # a row cut short reads as a step <= its own


def _faults_kill_at(pid, log_path, stale_inode, step, delay):
    """SIGKILL child pid `delay` s after its run logs `step` (step -1: `delay` s after it starts). Returns None once
    killed, or the exit code if the child ended first."""
    deadline = time.monotonic() + 60
    while step >= 0 and _faults_logged_step(log_path, stale_inode) < step and time.monotonic() < deadline:
        ended, status = os.waitpid(pid, os.WNOHANG)
        if ended:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.001)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return None if code == -signal.SIGKILL else code


def _faults_kill_mid_write(cfg, at_step, log_path):
    """Run cfg in a child whose checkpoint write at `at_step` stops halfway (half the bytes in ckpt.pt.tmp, then a
    long sleep), and SIGKILL it there."""
    ready_r, ready_w = os.pipe()

    def run():
        save = torch.save

        def save_half_then_wait(obj, f):
            if obj["iteration"] == at_step:
                buffer = io.BytesIO()
                save(obj, buffer)
                f.write(buffer.getvalue()[: buffer.tell() // 2])
                f.flush()
                os.write(ready_w, b"!")  # tell the parent: the file is half written now
                time.sleep(60)
            save(obj, f)

        torch.save = save_half_then_wait  # only in this child
        train.main(cfg)

    pid = _faults_fork(run, log_path)
    os.close(ready_w)
    ready = select.select([ready_r], [], [], 60)[0] and os.read(ready_r, 1)  # b"" if the child ended without pausing
    os.close(ready_r)
    os.kill(pid, signal.SIGKILL)
    assert _faults_wait(pid) == -signal.SIGKILL and ready == b"!", _faults_tail(log_path)


def _faults_assert_partial(path):
    """path is a cut-off checkpoint that train.py refuses to load."""
    try:
        train.read_checkpoint(path)
    except ValueError as e:
        assert "corrupt" in str(e)
        return
    raise AssertionError(f"{path} loaded, but it should be a half-written file")


def _faults_text(path, num_docs, seed, num_words=2000):
    """Documents of random words (a fixed pool, so the tokenizer has something to merge) joined by <|endoftext|>."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    pool = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(num_words)]
    text = "<|endoftext|>".join(" ".join(rng.choices(pool, k=rng.randint(50, 300))) + ".\n" for _ in range(num_docs))
    with open(path, "w") as f:
        f.write(text)
    return text


def _faults_alive(pids):
    """Those of pids still running (not gone, not a zombie)."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except FileNotFoundError:
            pass
    return alive


# --- Training killed, disk failing, inputs corrupt --------------------------------------------------------------------

@slow
def test_faults_sigkill_at_random_points_resumes_exactly():
    """SIGKILL training at random steps (and during start-up), resume from ckpt.pt each time, until the run finishes.
    After every kill ckpt.pt is absent (none written yet) or a complete checkpoint no older than before, config.json
    and run.json parse, and the finished run equals an uninterrupted one bit for bit. Kill points come from a seeded
    generator."""
    rng = random.Random(336)
    with tempfile.TemporaryDirectory() as root:
        cfg = _faults_cfg(root, max_iters=40)
        reference = dict(cfg, out_dir=os.path.join(root, "reference"))
        log = os.path.join(root, "children.log")
        assert _faults_wait(_faults_fork(lambda: train.main(reference), log)) == 0, _faults_tail(log)
        ckpt, tmp, csv_path = (os.path.join(cfg["out_dir"], n) for n in ("ckpt.pt", "ckpt.pt.tmp", "log.csv"))
        kills = mid_write = startup = 0
        last, resumed_from = -1, []
        for _ in range(100):
            resume = os.path.exists(ckpt)
            resumed_from.append(last if resume else "new")
            stale_inode = os.stat(csv_path).st_ino if os.path.exists(csv_path) else None
            stale_tmp = os.stat(tmp).st_mtime_ns if os.path.exists(tmp) else None
            at = -1 if rng.random() < 0.2 else last + rng.randint(1, 8)
            pid = _faults_fork(lambda: train.main(dict(cfg, resume=resume)), log)
            code = _faults_kill_at(pid, csv_path, stale_inode, at, rng.uniform(0, 0.05 if at < 0 else 0.004))
            if code is not None:
                assert code == 0, _faults_tail(log)
                break
            kills, startup = kills + 1, startup + (at < 0)
            if os.path.exists(ckpt):
                step = train.read_checkpoint(ckpt)["iteration"]  # raises on a partial file
                assert step >= last and step % cfg["eval_interval"] == 0, (step, last)
                last = step
            else:
                assert last == -1, "ckpt.pt disappeared"
            for name in ("config.json", "run.json"):  # written whole or not at all
                if os.path.exists(path := os.path.join(cfg["out_dir"], name)):
                    with open(path) as f:
                        json.load(f)
            mid_write += os.path.exists(tmp) and os.stat(tmp).st_mtime_ns != stale_tmp  # this kill cut a save short
        else:
            raise AssertionError("the run never finished")
        assert kills >= 8 and not os.path.exists(tmp), (kills, resumed_from)
        _faults_assert_same_run(cfg["out_dir"], reference["out_dir"])
        print(f"  {kills} SIGKILLs survived ({startup} in start-up, {mid_write} while writing ckpt.pt); "
              f"starts: {resumed_from}")


@slow
def test_faults_sigkill_while_writing_a_checkpoint_keeps_the_previous_one():
    """Kill a run halfway through writing a checkpoint: ckpt.pt is the previous complete one (absent before the first),
    the half-written ckpt.pt.tmp is never loaded and is replaced by the next save, and the resumed run is exact."""
    with tempfile.TemporaryDirectory() as root:
        cfg = _faults_cfg(root, max_iters=24)
        reference = dict(cfg, out_dir=os.path.join(root, "reference"))
        log = os.path.join(root, "children.log")
        assert _faults_wait(_faults_fork(lambda: train.main(reference), log)) == 0, _faults_tail(log)
        ckpt, tmp = (os.path.join(cfg["out_dir"], n) for n in ("ckpt.pt", "ckpt.pt.tmp"))

        _faults_kill_mid_write(cfg, 0, log)  # the very first checkpoint: there is nothing to resume
        assert not os.path.exists(ckpt) and os.path.exists(tmp)
        _faults_assert_partial(tmp)
        code, err = _faults_cli(_faults_argv(cfg, resume=True), root)
        assert code == 2 and err.startswith("error: no checkpoint at") and err.count("\n") == 1, (code, err)

        _faults_kill_mid_write(cfg, 8, log)  # a new run, cut off while saving step 8: step 4 stays
        assert train.read_checkpoint(ckpt)["iteration"] == 4
        _faults_assert_partial(tmp)
        _faults_kill_mid_write(dict(cfg, resume=True), 16, log)  # resumed at 4, cut off while saving 16
        assert train.read_checkpoint(ckpt)["iteration"] == 12
        _faults_assert_partial(tmp)
        assert _faults_wait(_faults_fork(lambda: train.main(dict(cfg, resume=True)), log)) == 0, _faults_tail(log)
        assert not os.path.exists(tmp)
        _faults_assert_same_run(cfg["out_dir"], reference["out_dir"])


@slow
def test_faults_full_disk_or_unwritable_out_dir_reported_and_last_checkpoint_kept():
    """A checkpoint write that fails (file size limit: EFBIG, as a full disk gives ENOSPC; or the directory refusing
    new files: EACCES) ends the CLI with one `error:` line and exit code 2; ckpt.pt keeps the previous step's bytes,
    no .tmp is left, and resuming later finishes exactly as an uninterrupted run."""
    with tempfile.TemporaryDirectory() as root:
        cfg = _faults_cfg(root, max_iters=8)
        reference = dict(cfg, out_dir=os.path.join(root, "reference"))
        log = os.path.join(root, "children.log")
        assert _faults_wait(_faults_fork(lambda: train.main(reference), log)) == 0, _faults_tail(log)
        assert _faults_wait(_faults_fork(lambda: train.main(dict(cfg, max_iters=4)), log)) == 0, _faults_tail(log)
        ckpt = os.path.join(cfg["out_dir"], "ckpt.pt")
        with open(ckpt, "rb") as f:
            good = f.read()
        limit = len(good) // 2  # the step-8 checkpoint is as large as this one; log.csv and config.json stay smaller

        def full_disk():  # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        def unwritable():  # chmod stops no one running as root: make open() refuse new checkpoint files instead
            real_open = builtins.open

            def refusing_open(file, mode="r", *args, **kwargs):
                if str(file).endswith("ckpt.pt.tmp"):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
                return real_open(file, mode, *args, **kwargs)

            builtins.open = refusing_open

        for prepare, reason in ((full_disk, "File too large"), (unwritable, "Permission denied")):
            code, err = _faults_cli(_faults_argv(cfg, resume=True), root, prepare)
            assert code == 2 and err.count("\n") == 1 and reason in err, (code, err)
            assert err.startswith(f"error: could not write checkpoint {ckpt}") and "previous checkpoint is" in err
            with open(ckpt, "rb") as f:
                assert f.read() == good
            assert not os.path.exists(ckpt + ".tmp")
            assert train.read_checkpoint(ckpt)["iteration"] == 4
        assert _faults_wait(_faults_fork(lambda: train.main(dict(cfg, resume=True)), log)) == 0, _faults_tail(log)
        _faults_assert_same_run(cfg["out_dir"], reference["out_dir"])


@slow
def test_faults_corrupt_token_files_refused_by_the_cli_and_nothing_overwritten():
    """Token files with an odd byte count, no bytes, or ids beyond vocab_size stop `python train.py` before it writes
    anything: one `error:` line naming the file and the problem, exit code 2, out_dir unchanged byte for byte."""
    with tempfile.TemporaryDirectory() as root:
        cfg = _faults_cfg(root, max_iters=4)
        log = os.path.join(root, "children.log")
        assert _faults_wait(_faults_fork(lambda: train.main(cfg), log)) == 0, _faults_tail(log)
        bad = {name: os.path.join(root, name) for name in ("odd.bin", "empty.bin", "big_ids.bin")}
        with open(bad["odd.bin"], "wb") as f:
            f.write(b"\x01\x00\x02")
        open(bad["empty.bin"], "wb").close()
        np.array([1, 2, 700, 3] * 100, dtype="<u2").tofile(bad["big_ids.bin"])
        cases = [(dict(train_data=bad["odd.bin"]), ["3 bytes", "not a whole number of uint16 tokens"]),
                 (dict(val_data=bad["empty.bin"]), ["0 bytes"]),
                 (dict(train_data=bad["big_ids.bin"], resume=True), ["token id 700", "vocab_size is 64"])]

        def snapshot():
            return {name: open(os.path.join(cfg["out_dir"], name), "rb").read()
                    for name in sorted(os.listdir(cfg["out_dir"]))}

        before = snapshot()
        for overrides, expected in cases:
            code, err = _faults_cli(_faults_argv(cfg, **overrides), root)
            path = overrides.get("train_data") or overrides["val_data"]
            assert code == 2 and err.startswith(f"error: {path} ") and err.count("\n") == 1, (code, err)
            assert all(e in err for e in expected), err
            assert snapshot() == before


@slow
def test_faults_killed_data_preparation_restarts_cleanly():
    """Kill `prepare_splits` while it writes train.bin (pool workers mid-chunk), and delete vocab.json as a tokenizer
    save cut between its two renames would: the killed run leaves no train.bin, its workers exit, and running again
    retrains the tokenizer and tokenizes both files to exactly what one-shot Tokenizer.encode gives."""
    with tempfile.TemporaryDirectory() as root:
        texts = {name: _faults_text(os.path.join(root, name + ".txt"), num_docs, seed)
                 for name, num_docs, seed in (("train", 1500, 0), ("val", 50, 1))}
        paths = [os.path.join(root, name + ".txt") for name in texts]
        tok_dir = os.path.join(root, "tok")
        ready_r, ready_w = os.pipe()

        def prepare_and_stall():  # after train.bin.tmp gets its first chunk, stop there (and get killed)
            parallel_map = bpe._parallel_map

            def stalling_map(fn, *args, **kwargs):
                for n, result in enumerate(parallel_map(fn, *args, **kwargs)):
                    yield result
                    if fn is bpe._encode_chunk and n == 0:  # encode_file has written chunk 0 when it asks for more
                        os.write(ready_w, b"!")
                        time.sleep(60)

            bpe._parallel_map = stalling_map
            data.prepare_splits(paths, tok_dir, 400)

        log = os.path.join(root, "children.log")
        pid = _faults_fork(prepare_and_stall, log)
        os.close(ready_w)
        ready = select.select([ready_r], [], [], 60)[0] and os.read(ready_r, 1)
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            workers = f.read().split()  # the encoding pool
        os.kill(pid, signal.SIGKILL)
        assert _faults_wait(pid) == -signal.SIGKILL and ready == b"!", _faults_tail(log)
        partial = data.token_cache_path(paths[0], tok_dir) + ".tmp"
        assert os.path.getsize(partial) > 0 and not os.path.exists(data.token_cache_path(paths[0], tok_dir))
        assert len(workers) == 2
        deadline = time.monotonic() + 20
        while _faults_alive(workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _faults_alive(workers), "orphaned pool workers kept running"
        with open(os.path.join(tok_dir, "merges.txt")) as f:
            merges = f.read()
        os.remove(os.path.join(tok_dir, "vocab.json"))

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            bins = data.prepare_splits(paths, tok_dir, 400)
        said = out.getvalue()
        assert "vocab.json is missing" in said and said.count("tokenizing") == 2 and "partial .tmp" in said, said
        with open(os.path.join(tok_dir, "merges.txt")) as f:
            assert f.read() == merges  # the same text trains the same tokenizer
        tok = bpe.load_tokenizer(tok_dir)
        for path, text in zip(bins, texts.values()):
            assert np.fromfile(path, dtype="<u2").tolist() == tok.encode(text), path
        assert not [name for name in os.listdir(tok_dir) if name.endswith(".tmp")]


@slow
def test_faults_resume_on_two_ranks_from_a_one_rank_checkpoint():
    """A run checkpointed by one process continues on two (gloo): rank 0 keeps its data stream, rank 1 adds its own,
    the two stay identical, and each step equals one process stepping on both ranks' batches concatenated."""
    with tempfile.TemporaryDirectory() as root:
        # eps and no clipping make the update depend on the gradient's scale (Adam alone would hide a sum vs a mean).
        cfg = _faults_cfg(root, max_iters=4, eval_interval=100, grad_clip=0.0, eps=1e-2)
        log = os.path.join(root, "children.log")
        assert _faults_wait(_faults_fork(lambda: train.main(cfg), log)) == 0, _faults_tail(log)
        start = train.read_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

        def rank(r):
            os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
            model = train.main(dict(cfg, max_iters=6, resume=True))["model"]
            torch.save(model.state_dict(), os.path.join(root, f"rank{r}.pt"))

        pids = [_faults_fork(lambda r=r: rank(r), log) for r in range(2)]
        assert [_faults_wait(pid) for pid in pids] == [0, 0], _faults_tail(log)
        ranks = [torch.load(os.path.join(root, f"rank{r}.pt"), weights_only=True) for r in range(2)]
        _faults_assert_equal(ranks[0], ranks[1], "rank 1 vs rank 0")
        rows = _faults_rows(cfg["out_dir"])
        tokens = [int(row[1]) for row in rows]
        per_rank = cfg["batch_size"] * cfg["context_length"]
        assert [int(row[0]) for row in rows] == list(range(7)) and tokens[6] - tokens[4] == 2 * 2 * per_rank

        model = train.TransformerLM(**start["model_config"])
        model.load_state_dict(start["model"])
        opt = AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2]},
                     {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}])
        opt.load_state_dict(start["optimizer"])
        tokens = data.load_tokens(cfg["train_data"], cfg["vocab_size"])
        for step in (4, 5):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, cfg["lr"], cfg["min_lr"], cfg["warmup_iters"], cfg["cosine_iters"])
            batches = [data.get_batch(tokens, cfg["batch_size"], cfg["context_length"], "cpu",
                                      torch.Generator().manual_seed(train.batch_seed(cfg["seed"], r, step)))
                       for r in range(2)]
            model.loss(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))[0].backward()
            opt.step()
            opt.zero_grad()
        for name, p in model.state_dict().items():
            assert torch.allclose(p, ranks[0][name], rtol=1e-4, atol=1e-6), (name, (p - ranks[0][name]).abs().max())


@slow
def test_faults_batch_stream_depends_on_seed_rank_and_step():
    """Each (seed, rank, step) draws its own training batch, the same one every time: ranks must not train on copies
    of one batch, and a second seed must see other data. (torch's CPU generator keeps only a seed's low 32 bits.)"""
    tokens = np.arange(100_000, dtype=np.uint16)

    def batch(seed, rank, step):
        generator = torch.Generator().manual_seed(train.batch_seed(seed, rank, step))
        return tuple(data.get_batch(tokens, 4, 8, "cpu", generator)[0][:, 0].tolist())  # the 4 window starts

    keys = [(seed, rank, step) for seed in (1337, 2) for rank in (0, 1, 7) for step in (0, 1, 5000)]
    starts = {key: batch(*key) for key in keys}
    assert len(set(starts.values())) == len(keys), "two of (seed, rank, step) draw the same batch"
    assert all(batch(*key) == starts[key] for key in keys)


# --- OpenWebText configs and data preparation at scale ---------------------------------------------------------------

@slow
def test_faults_owt_configs_train_on_a_small_slice():
    """config/owt.py and config/owt_leaderboard.py run end to end on CPU with their own flags, shrunk in size only
    (data, tokenizer, widths, steps) through --key=value, and the leaderboard recipe keeps its stated budget."""
    repo = os.path.dirname(os.path.abspath(train.__file__))
    with tempfile.TemporaryDirectory() as root:
        for name, num_docs, seed in (("owt_train", 60, 0), ("owt_valid", 15, 1)):
            _faults_text(os.path.join(root, name + ".txt"), num_docs, seed, num_words=300)
        shrink = {"train_data": f"{root}/owt_train.txt", "val_data": f"{root}/owt_valid.txt",
                  "tokenizer_dir": f"{root}/tok", "vocab_size": 300, "d_model": 32, "num_layers": 2, "num_heads": 4,
                  "d_ff": 64, "context_length": 32, "batch_size": 4, "max_iters": 3, "warmup_iters": 1,
                  "cosine_iters": 3, "eval_interval": 3, "eval_tokens": 128, "device": "cpu", "compile": False}
        full = {}
        for name in ("owt", "owt_leaderboard"):
            path = os.path.join(repo, "config", name + ".py")
            argv = [path, *(f"--{k}={v}" for k, v in shrink.items()), f"--out_dir={root}/{name}"]
            with contextlib.redirect_stdout(io.StringIO()):
                full[name] = train.configure(train.DEFAULTS, [path])
                cfg = train.configure(train.DEFAULTS, argv)
                result = train.main(cfg)
            assert result["status"] == "done" and math.isfinite(result["val_loss"]), result
            kept = {k for k in cfg if k not in shrink and k != "out_dir"}  # every flag, as the config sets it
            assert {k: cfg[k] for k in kept} == {k: full[name][k] for k in kept}
            assert full[name]["vocab_size"] == 32000 and full[name]["train_data"] == "data/owt_train.txt"
        board = full["owt_leaderboard"]
        assert board["context_length"] == 512 and board["tie_embeddings"] and board["qk_norm"] and board["z_loss"] > 0
        assert board["cosine_iters"] is None and board["dtype"] == "auto" and board["compile"] == "auto"  # None: max_iters
        acc = accounting(board, board["batch_size"])
        tokens = board["batch_size"] * board["context_length"] * board["max_iters"]
        assert 100e6 < acc["params"]["total"] < 130e6 and 1.5e9 < tokens < 2.5e9, (acc["params"]["total"], tokens)
        assert acc["memory"]["bf16"]["total"] < 70 * 2**30  # fits an 80 GB H100 with room for the allocator


@slow
def test_faults_progress_line_every_tenth_off_a_terminal():
    """bpe's progress display, redirected to a file: nothing for a short pass, else a line per 10% plus a final one,
    each with done/total MB, percent, MB/s and ETA (numbers checked against a pass that took a known time)."""
    for seconds, expected_lines in ((0.0, 0), (100.0, 11)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            with bpe._Progress("encoding x.txt", 1_000_000_000) as progress:
                progress.t0 -= seconds  # the pass began this long ago
                for done in range(0, 1_000_000_001, 50_000_000):
                    progress.update(done)
        lines = out.getvalue().splitlines()
        assert len(lines) == expected_lines, lines
    assert lines[0].startswith("encoding x.txt: 100/1,000 MB (10%) | 1.0 MB/s | eta 15m0"), lines[0]
    assert lines[4].startswith("encoding x.txt: 500/1,000 MB (50%) | 5.0 MB/s | eta 1m40s"), lines[4]
    assert lines[-1].startswith("encoding x.txt: 1,000 MB in 1m40s (10.0 MB/s)"), lines[-1]


# ----------------------------------------------------------------------------------------------------
# Run logs and plots (plot.py)
# ----------------------------------------------------------------------------------------------------

_PLOT_HEADER = "step,tokens,elapsed_s,lr,train_loss,val_loss,val_ppl,grad_norm,tokens_per_s,mfu,z_loss,status"


def _plot_write_run(root, name, config, rows, tail=""):
    """A run dir as train.py writes it. rows: (step, train_loss, val_loss or None, status);
    tokens = 1000 * step, elapsed_s = step / 2, tokens_per_s = 2000. `tail` is appended as-is (a cut-off line)."""
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    lines = [_PLOT_HEADER]
    for step, train, val, status in rows:
        val_cells = "," if val is None else f"{val},{math.exp(val)}"
        lines.append(f"{step},{1000 * step},{step / 2},0.001,{train},{val_cells},1.0,2000,0.01,0.0,{status}")
    with open(os.path.join(run_dir, "log.csv"), "w") as f:
        f.write("\n".join(lines) + "\n" + tail)
    if config is not None:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(config, f)
    return run_dir


def _plot_three_runs(root):
    """lr=0.001 healthy; lr=0.1 stopped by train.py ('diverged'); lr=0.03 with an inf loss but no status."""
    _plot_write_run(root, "lr_a", {"out_dir": "out/lr_a", "lr": 0.001, "d_model": 64},
                    [(0, 9.0, 9.1, ""), (10, 4.0, None, ""), (20, 3.0, 3.2, ""), (30, 2.4, 2.5, ""),
                     (40, 2.2, 2.6, "")])
    _plot_write_run(root, "lr_b", {"out_dir": "out/lr_b", "lr": 0.1, "d_model": 64},
                    [(0, 9.0, 9.1, ""), (10, 5.0, 4.0, ""), (20, 7.0, None, ""), (30, math.nan, None, "diverged")])
    _plot_write_run(root, "lr_c", {"out_dir": "out/lr_c", "lr": 0.03, "d_model": 64},
                    [(0, 9.0, 9.1, ""), (10, 3.5, 3.4, ""), (20, math.inf, math.inf, "")])


def _plot_main(argv, hide_matplotlib=False):
    """Run plot.main in-process -> (exit code, stdout, stderr). hide_matplotlib makes `import matplotlib` fail."""
    names = [k for k in sys.modules if k.split(".")[0] == "matplotlib"] + ["matplotlib"]
    saved = {k: sys.modules[k] for k in names if k in sys.modules}
    if hide_matplotlib:
        sys.modules.update(dict.fromkeys(names, None))  # a None entry makes import raise ImportError
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = plot.main(argv)
    finally:
        for k in names:
            sys.modules.pop(k, None)
        sys.modules.update(saved)
    return code, out.getvalue(), err.getvalue()


def _plot_matplotlib_importable():
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def _plot_md_table(text):
    """Markdown table -> {run label: [cells after the label]}."""
    lines = [line.strip().strip("|") for line in text.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.split("|")] for line in lines]
    assert rows[0] == ["run", "best val", "final val", "tokens", "wall time", "tokens/s", "diverged"], rows[0]
    return {cells[0]: cells[1:] for cells in rows[2:]}


def _plot_check_three(table):
    assert set(table) == {"lr=0.001", "lr=0.1", "lr=0.03"}, table  # only the differing key; out_dir is ignored
    assert table["lr=0.001"] == ["2.5000", "2.6000", "40k", "20s", "2k", "no"]
    assert table["lr=0.1"] == ["4.0000", "4.0000", "30k", "15s", "2k", "yes"]
    assert table["lr=0.03"][:2] == ["3.4000", "inf"] and table["lr=0.03"][-1] == "yes"


def test_plot_table_and_png():
    with tempfile.TemporaryDirectory() as tmp:
        _plot_three_runs(tmp)
        png = os.path.join(tmp, "fig", "curves.png")
        code, out, err = _plot_main([os.path.join(tmp, "lr_*"), f"--out={png}", "--table=md"])
        assert code == 0, err
        _plot_check_three(_plot_md_table(out))
        logs = [os.path.join(tmp, "lr_*", "log.csv"), os.path.join(tmp, "lr_a")]  # a log.csv names its run, once
        code, out_logs, err = _plot_main([*logs, f"--out={png}", "--table=md"])
        assert code == 0 and out_logs == out, err
        if _plot_matplotlib_importable():
            with open(png, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
            assert os.path.getsize(png) > 10_000 and not os.path.exists(png + ".tmp")
        else:
            assert not os.path.exists(png) and "pip install matplotlib" in err


def test_plot_metric_bpb_compares_val_bpb_and_notes_older_logs():
    with tempfile.TemporaryDirectory() as tmp:
        for vocab, bpbs in ((300, [3.0, 1.5, 1.75]), (500, [3.2, 2.5, 2.1])):  # logs as train.py writes them now
            os.makedirs(os.path.join(tmp, f"v{vocab}"))
            rows = [dict(step=i, tokens=1000 * i, elapsed_s=i, lr=1e-3, train_loss=5.0 - i, val_loss=4.0 - i,
                         val_ppl=math.exp(4.0 - i), val_bpb=b, tokens_per_s=1000, status="") for i, b in enumerate(bpbs)]
            with open(os.path.join(tmp, f"v{vocab}", "log.csv"), "w", newline="") as f:
                writer = csv.DictWriter(f, train.CSV_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
            with open(os.path.join(tmp, f"v{vocab}", "config.json"), "w") as f:
                json.dump({"vocab_size": vocab}, f)
        _plot_write_run(tmp, "old", {"vocab_size": 700}, [(0, 9.0, 9.1, ""), (10, 4.0, 3.9, "")])  # no val_bpb column
        png = os.path.join(tmp, "bpb.png")
        code, out, err = _plot_main([os.path.join(tmp, "v*"), os.path.join(tmp, "old"), "--metric=bpb", "--table=md",
                                     f"--out={png}"])
        assert code == 0 and "old: no val_bpb in its log.csv" in err, err
        lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()]
        assert lines[0][:3] == ["run", "best val bpb", "final val bpb"], lines[0]
        table = {cells[0]: cells[1:3] for cells in lines[2:]}
        assert table == {"vocab_size=300": ["1.5000", "1.7500"], "vocab_size=500": ["2.1000", "2.1000"],
                         "vocab_size=700": ["-", "-"]}, table
        code, out, _ = _plot_main([os.path.join(tmp, "v300"), "--table=md", f"--out={png}"])  # the default: loss
        assert "| best val | final val |" in out and "| 2.0000 | 2.0000 |" in out, out
        if _plot_matplotlib_importable():
            with open(png, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib():
    with tempfile.TemporaryDirectory() as tmp:
        _plot_three_runs(tmp)
        code, out, err = _plot_main([os.path.join(tmp, "lr_*")], hide_matplotlib=True)
        assert code == 0, err
        assert not os.path.exists(os.path.join(tmp, "plot.png"))
        assert [line for line in err.splitlines() if "pip install matplotlib" in line], err
        lines = out.splitlines()  # plain-text table: header, then one row per run in glob order
        assert lines[0].split()[:3] == ["run", "best", "val"] and len(lines) == 4
        assert lines[1].split() == ["lr=0.001", "2.5000", "2.6000", "40k", "20s", "2k", "no"]


def test_plot_labels_name_differing_keys():
    configs = {"a": {"out_dir": "x/a", "lr": 0.01, "betas": [0.9, 0.95], "norm": "pre"},
               "b": {"out_dir": "x/b", "lr": 0.01, "betas": [0.9, 0.95], "norm": "pre"},
               "c": {"out_dir": "x/c", "lr": 0.1, "betas": [0.9, 0.99], "norm": "pre"},
               "d": {}}  # no config.json: labelled by its directory
    runs = [plot.Run(os.path.join("x", name), config, []) for name, config in configs.items()]
    plot.label_runs(runs)
    assert [r.label for r in runs] == ["lr=0.01 betas=[0.9,0.95] (a)", "lr=0.01 betas=[0.9,0.95] (b)",
                                       "lr=0.1 betas=[0.9,0.99]", "d"], [r.label for r in runs]
    plot.label_runs(runs, only=["lr", "norm"])  # --label=lr,norm: only these keys, and only where they differ
    assert [r.label for r in runs] == ["lr=0.01 (a)", "lr=0.01 (b)", "lr=0.1", "d"], [r.label for r in runs]


def test_plot_auto_ylim_skips_start_and_diverged_runs():
    with tempfile.TemporaryDirectory() as tmp:
        _plot_three_runs(tmp)
        runs = [plot.read_run(os.path.join(tmp, name)) for name in ("lr_a", "lr_b", "lr_c")]
        # healthy run after its first 10% of tokens: min 2.2, max 4.0; diverged runs only lower the floor
        lo, hi = plot.auto_ylim(runs)
        assert abs(lo - (2.2 - 0.09)) < 1e-9 and abs(hi - (4.0 + 0.09)) < 1e-9, (lo, hi)


def test_plot_bad_inputs_reported_others_kept():
    good = [(0, 9.0, 9.1, ""), (10, 3.0, 3.1, ""), (20, 2.5, 2.7, "")]
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "no_log"))
        _plot_write_run(tmp, "good", {"seed": 1, "lr": 0.01}, good)
        _plot_write_run(tmp, "cut", {"seed": 2, "lr": 0.01}, good, tail="30,30000,15.0,0.001,2.4,2.")
        _plot_write_run(tmp, "bad_number", {"seed": 3}, [(0, 9.0, 9.1, ""), (10, "abc", 3.0, "")])
        open(os.path.join(_plot_write_run(tmp, "empty", {"seed": 4}, []), "log.csv"), "w").close()
        with open(os.path.join(_plot_write_run(tmp, "other_csv", {"seed": 5}, []), "log.csv"), "w") as f:
            f.write("a,b\n1,2\n")
        names = ["no_log", "good", "cut", "bad_number", "empty", "other_csv", "missing"]
        code, out, err = _plot_main([os.path.join(tmp, n) for n in names] + ["--table=md"], hide_matplotlib=True)
        assert code == 0, err
        table = _plot_md_table(out)
        assert table == {"seed=1": ["2.7000", "2.7000", "20k", "10s", "2k", "no"],
                         "seed=2": ["2.7000", "2.7000", "20k", "10s", "2k", "no"]}, table  # cut line skipped
        for name, problem in [("no_log", "no log.csv"), ("cut", "incomplete"), ("bad_number", "line 3"),
                              ("empty", "empty"), ("other_csv", "lacks column(s) tokens, elapsed_s"),
                              ("missing", "no such directory")]:
            lines = [line for line in err.splitlines() if os.path.join(tmp, name) in line]
            assert len(lines) == 1 and problem in lines[0], (name, err)


def test_plot_cli_exit_2_when_nothing_readable():
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "no_log"))
        open(os.path.join(_plot_write_run(tmp, "empty", None, []), "log.csv"), "w").close()
        script = os.path.join(os.path.dirname(os.path.abspath(plot.__file__)), "plot.py")
        result = subprocess.run([sys.executable, script, os.path.join(tmp, "*")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stdout == "", result
        for problem in ("no log.csv", "log.csv is empty", "no run could be read"):
            assert problem in result.stderr, result.stderr


# ----------------------------------------------------------------------------------------------------
# Fast GPU path (kernels.py)
# ----------------------------------------------------------------------------------------------------

def _kernels_check(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    """Assert |got - want| <= atol + rtol * |want| everywhere; print one `name OK maxdiff=...` line."""
    diff = (got.double() - want.double()).abs()
    assert (diff <= atol + rtol * want.double().abs()).all(), f"{name}: maxdiff={diff.max().item():.2e}"
    print(f"  {name} OK maxdiff={diff.max().item():.1e}")


def _kernels_need_triton() -> None:
    """Skip the calling test (reported as skipped, not passed) unless the Triton kernels will run here."""
    if not kernels.HAS_TRITON:
        raise Skipped("Triton is not importable here (CPU build of torch); the kernels run only where it is")
    if not kernels.available():
        raise Skipped("Triton is importable but TRITON_INTERPRET=1 was not set before kernels was imported")


def _kernels_rope(seq: int, d: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE written out: (seq, d, d) float64 block-diagonal 2x2 rotations of the pairs (x[2k], x[2k+1]) by
    pos * theta^(-2k/d), and the (seq, d/2) float32 cos, sin tables the kernel takes."""
    rotation = torch.zeros(seq, d, d, dtype=torch.float64)
    cos, sin = torch.zeros(seq, d // 2), torch.zeros(seq, d // 2)
    for pos in range(seq):
        for k in range(d // 2):
            angle = pos * theta ** (-2 * k / d)
            cos[pos, k], sin[pos, k] = math.cos(angle), math.sin(angle)
            rotation[pos, 2 * k:2 * k + 2, 2 * k:2 * k + 2] = torch.tensor(
                [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64)
    return rotation, cos, sin


def _kernels_attention64(q, k, v, causal, rotation):
    """softmax(R q (R k)^T / sqrt(d)) v in float64, query head h reading kv head h // (heads / kv_heads)."""
    q, k, v = q.double(), k.double(), v.double()
    seq, d = q.shape[2], q.shape[3]
    if rotation is not None:
        q = torch.einsum("tij,bhtj->bhti", rotation[:seq], q)
        k = torch.einsum("tij,bhtj->bhti", rotation[:seq], k)
    kv_head = torch.arange(q.shape[1]) // (q.shape[1] // k.shape[1])
    k, v = k[:, kv_head], v[:, kv_head]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (batch, heads, seq, seq)
    if causal:
        future = torch.arange(seq)[None, :] > torch.arange(seq)[:, None]
        scores = scores.masked_fill(future, float("-inf"))
    weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
    return (weights / weights.sum(-1, keepdim=True)) @ v


def _kernels_cross_entropy64(h, weight, targets, softcap):
    """(mean cross-entropy, mean logsumexp^2) written out in float64 with max subtraction."""
    logits = h.double() @ weight.double().t()
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    top = logits.max(-1, keepdim=True).values
    lse = (top + torch.log(torch.exp(logits - top).sum(-1, keepdim=True))).squeeze(-1)
    ce = lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return ce.mean(), (lse * lse).mean()


def _kernels_grads(fn, inputs, upstream):
    """fn(*inputs) and the gradients of sum(fn * upstream) w.r.t. fresh leaf copies of inputs."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    (out.double() * upstream).sum().backward()
    return out, [x.grad for x in leaves]


def test_kernels_linear_cross_entropy_matches_float64():
    torch.manual_seed(0)
    h = torch.randn(2, 25, 12, dtype=torch.float64)
    weight = torch.randn(37, 12, dtype=torch.float64)
    targets = torch.randint(0, 37, (2, 25))
    for softcap in (0.0, 5.0):
        for z_weight in (0.0, 0.3):
            h1, w1 = h.clone().requires_grad_(), weight.clone().requires_grad_()
            ce, z = kernels.linear_cross_entropy(h1, w1, targets, softcap, chunk_rows=16)  # 50 rows: 4 chunks
            (ce + z_weight * z if z_weight else ce).backward()
            h2, w2 = h.clone().requires_grad_(), weight.clone().requires_grad_()
            ce64, z64 = _kernels_cross_entropy64(h2, w2, targets, softcap)
            (ce64 + z_weight * z64).backward()
            name = f"linear_cross_entropy softcap={softcap} z_loss={z_weight}"
            _kernels_check(f"{name} ce", ce, ce64, 1e-12)
            _kernels_check(f"{name} z", z, z64, 1e-12)
            _kernels_check(f"{name} dh", h1.grad, h2.grad, 1e-12)
            _kernels_check(f"{name} dweight", w1.grad, w2.grad, 1e-12)
    ce_ref, z_ref = kernels.linear_cross_entropy_reference(h, weight, targets, 5.0)
    ce64, z64 = _kernels_cross_entropy64(h, weight, targets, 5.0)
    _kernels_check("linear_cross_entropy_reference ce", ce_ref, ce64, 1e-12)
    _kernels_check("linear_cross_entropy_reference z", z_ref, z64, 1e-12)


def test_kernels_linear_cross_entropy_bf16_and_fp16_autocast():
    torch.manual_seed(1)
    h = torch.randn(40, 16)
    weight = torch.randn(50, 16) * 0.3
    targets = torch.randint(0, 50, (40,))
    h2, w2 = h.double().requires_grad_(), weight.double().requires_grad_()
    ce64, z64 = _kernels_cross_entropy64(h2, w2, targets, 0.0)
    (ce64 + 0.1 * z64).backward()
    for dtype in (torch.bfloat16, torch.float16):
        h1, w1 = h.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            ce, z = kernels.linear_cross_entropy(h1, w1, targets, chunk_rows=7)
        (ce + 0.1 * z).backward()
        assert ce.dtype == torch.float32 and h1.grad.dtype == torch.float32 and w1.grad.dtype == torch.float32
        name = f"linear_cross_entropy {dtype}"
        _kernels_check(f"{name} ce", ce, ce64, 0.0, rtol=2e-2)
        _kernels_check(f"{name} z", z, z64, 0.0, rtol=2e-2)
        scale = h2.grad.abs().max().item()
        _kernels_check(f"{name} dh", h1.grad, h2.grad, 2e-2 * scale, rtol=2e-2)
        scale = w2.grad.abs().max().item()
        _kernels_check(f"{name} dweight", w1.grad, w2.grad, 2e-2 * scale, rtol=2e-2)


def test_kernels_reference_paths_match_float64():
    """The torch fallbacks that run wherever Triton cannot: RMSNorm, SwiGLU, attention with RoPE and GQA."""
    torch.manual_seed(2)
    x, weight = torch.randn(3, 10), torch.rand(10) + 0.5
    x64 = x.double()
    want = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-5) * weight.double()
    _kernels_check("rmsnorm_reference", kernels.rmsnorm_reference(x, weight, 1e-5), want, 1e-5)
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    a64 = a.double()
    _kernels_check("swiglu_reference", kernels.swiglu_reference(a, b), a64 / (1 + torch.exp(-a64)) * b.double(), 1e-6)
    rotation, cos, sin = _kernels_rope(9, 8)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    got = kernels.attention_reference(q, k, v, True, cos, sin)
    _kernels_check("attention_reference", got, _kernels_attention64(q, k, v, True, rotation), 1e-5)
    try:
        kernels.attention(q, k[:, :1].expand(2, 3, 9, 8), v[:, :1].expand(2, 3, 9, 8))
        raise AssertionError("4 query heads over 3 kv heads was accepted")
    except ValueError as err:
        assert "H % H_kv" in str(err)


def test_kernels_triton_rmsnorm():
    _kernels_need_triton()
    torch.manual_seed(4)
    for shape, dtype, tol in [((3, 5, 40), torch.float32, 1e-5), ((6, 24), torch.float16, 2e-2)]:
        x, weight = torch.randn(shape).to(dtype), torch.rand(shape[-1]) + 0.5
        upstream = torch.randn(shape, dtype=torch.float64)

        def rms64(x, w):
            x = x.double()
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w.double()

        got, (dx, dw) = _kernels_grads(lambda x, w: kernels.rmsnorm(x, w, 1e-5), (x, weight), upstream)
        want, (dx64, dw64) = _kernels_grads(rms64, (x, weight), upstream)
        assert type(got.grad_fn).__name__ == "_RMSNormBackward" and got.dtype == dtype and dw.dtype == torch.float32
        _kernels_check(f"rmsnorm {dtype} out", got, want, tol, tol)
        _kernels_check(f"rmsnorm {dtype} dx", dx, dx64, tol, tol)
        _kernels_check(f"rmsnorm {dtype} dweight", dw, dw64, tol * shape[0], tol)


def test_kernels_triton_swiglu_and_silu():
    _kernels_need_triton()
    torch.manual_seed(5)
    a, b = torch.randn(3, 700) * 3, torch.randn(3, 700)  # 2100 elements: three programs, the last one masked
    upstream = torch.randn(3, 700, dtype=torch.float64)

    def swiglu64(a, b):
        a = a.double()
        return a / (1 + torch.exp(-a)) * b.double()

    got, grads = _kernels_grads(kernels.swiglu, (a, b), upstream)
    want, grads64 = _kernels_grads(swiglu64, (a, b), upstream)
    assert type(got.grad_fn).__name__ == "_SwiGLUBackward"
    _kernels_check("swiglu out", got, want, 1e-5, 1e-5)
    for name, g, g64 in zip(("da", "db"), grads, grads64):
        _kernels_check(f"swiglu {name}", g, g64, 1e-5, 1e-5)
    got, (da,) = _kernels_grads(kernels.silu, (a,), upstream)
    want, (da64,) = _kernels_grads(lambda a: swiglu64(a, torch.ones_like(a)), (a,), upstream)
    _kernels_check("silu out", got, want, 1e-5, 1e-5)
    _kernels_check("silu da", da, da64, 1e-5, 1e-5)
    a16, b16 = a.half(), b.half()
    got, grads = _kernels_grads(kernels.swiglu, (a16, b16), upstream)
    want, grads64 = _kernels_grads(swiglu64, (a16, b16), upstream)
    assert got.dtype == grads[0].dtype == torch.float16
    _kernels_check("swiglu fp16 out", got, want, 2e-3, 2e-3)
    for name, g, g64 in zip(("da", "db"), grads, grads64):
        _kernels_check(f"swiglu fp16 {name}", g, g64, 2e-3, 2e-3)


def test_kernels_triton_attention():
    """Causal and not, RoPE and not, GQA, MQA, seq and d_head not powers of two, q as a strided view, fp16, the
    fused RoPE in fp32 (attention() itself rotates fp32 in torch), and the launch grid's axes."""
    _kernels_need_triton()
    torch.manual_seed(6)
    cases = [  # batch, heads, kv_heads, seq, d_head, causal, rope, dtype
        (2, 4, 2, 37, 24, True, True, torch.float32),
        (1, 3, 3, 20, 16, False, False, torch.float32),
        (1, 4, 1, 33, 32, True, True, torch.float32),
        (1, 2, 2, 21, 16, True, True, torch.float16),
    ]

    def fused_rope(q, k, v, causal, cos, sin):  # attention() rotates fp32 in torch: call the kernel's RoPE directly
        return kernels._Attention.apply(q, k, v, causal, cos, sin)

    cases = [(*case, kernels.attention) for case in cases] + [(2, 4, 2, 37, 24, True, True, torch.float32, fused_rope)]
    for batch, heads, kv_heads, seq, d, causal, rope, dtype, fn in cases:
        rotation, cos, sin = _kernels_rope(seq + 3, d) if rope else (None, None, None)
        q = torch.randn(batch, seq, heads, d).to(dtype).transpose(1, 2)  # (B, H, T, d) view, as the model makes it
        k, v = torch.randn(batch, kv_heads, seq, d).to(dtype), torch.randn(batch, kv_heads, seq, d).to(dtype)
        upstream = torch.randn(batch, heads, seq, d, dtype=torch.float64)
        got, grads = _kernels_grads(lambda q, k, v: fn(q, k, v, causal, cos, sin), (q, k, v), upstream)
        want, grads64 = _kernels_grads(lambda q, k, v: _kernels_attention64(q, k, v, causal, rotation), (q, k, v),
                                       upstream)
        assert type(got.grad_fn).__name__ == "_AttentionBackward" and got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        name = f"attention B{batch} H{heads}/{kv_heads} T{seq} d{d} causal={causal} rope={rope} {dtype} {fn.__name__}"
        _kernels_check(f"{name} out", got, want, tol, tol)
        for grad_name, g, g64 in zip(("dq", "dk", "dv"), grads, grads64):
            _kernels_check(f"{name} {grad_name}", g, g64, tol * 4, tol)
    assert kernels._attn_grid(4097 * 16, 37, 16) == (65_552, 3)  # heads on axis 0: axis 1 caps at 65,535


_KERNELS_AOT_SCRIPT = r'''
"""Compile-only run of kernels.py's wrappers, forward and backward, for the GPU arch in argv[1] (80, 90) on a
machine without one: a stand-in CUDA driver makes Triton compile for that target, and every launch becomes a
warm-up (compile, never run). One JSON line per launch: kernel, grid, shared memory and cuobjdump's counts."""
import json, os, re, subprocess, sys, tempfile
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver, jit


class FakeDriver:
    """Just enough of Triton's CUDA driver for compiling to `cap` (e.g. 90 = sm_90)."""
    def __init__(self, cap):
        self.target = GPUTarget("cuda", cap, 32)
    def is_active(self): return True
    def get_current_target(self): return self.target
    def get_current_device(self): return 0
    def set_current_device(self, device): pass
    def get_current_stream(self, device=None): return 0
    def get_active_torch_device(self): return torch.device("cpu")
    def get_device_interface(self): return torch.cuda
    def get_benchmarker(self): raise RuntimeError("no benchmarker without a GPU")


driver.set_active(FakeDriver(int(sys.argv[1])))
launched, _run = [], jit.JITFunction.run
def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    launched.append((self.fn.__name__, grid, kernel))
    return kernel
jit.JITFunction.run = compile_only
import kernels
kernels._use_triton = lambda x: True  # CPU tensors stand in for CUDA ones: only their shapes and dtypes matter
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def usage(kernel):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", out)}


def leaf(*shape, dtype):
    return torch.empty(*shape, dtype=dtype).requires_grad_()  # never touched, so never paged in


def attention(dtype, rope, batch, heads, kv_heads, seq, d):
    q = leaf(batch, seq, heads, d, dtype=dtype).transpose(1, 2)  # (B, H, T, d) views, as the model makes them
    k, v = (leaf(batch, seq, kv_heads, d, dtype=dtype).transpose(1, 2) for _ in range(2))
    cos = sin = torch.zeros(seq, d // 2) if rope else None
    o = kernels.attention(q, k, v, True, cos, sin)
    o.backward(torch.empty_like(o))


def rmsnorm(dtype, rows, d):
    y = kernels.rmsnorm(leaf(rows, d, dtype=dtype), leaf(d, dtype=torch.float32))
    y.backward(torch.empty_like(y))


def swiglu(dtype, rows, d_ff, gated):
    a, b = leaf(rows, d_ff, dtype=dtype), leaf(rows, d_ff, dtype=dtype)
    y = kernels.swiglu(a, b) if gated else kernels.silu(a)
    y.backward(torch.empty_like(y))


def cases():
    """A covering set, since a cold compile costs seconds per attention case: the largest head dim of each tile
    configuration (64, 128), where registers and shared memory peak, in bf16 with and without RoPE, fp16 and
    fp32 (whose RoPE runs in torch); head dims 16 and 24; an odd length with grouped kv heads and the aligned
    multi-head TinyStories shape (different integer specialisations; multi-query shares the grouped binary);
    the norms and gates at the model widths; and more than 65,535 heads in one launch."""
    attn = [("bf16", True, 64), ("bf16", True, 128), ("bf16", False, 128), ("fp16", True, 128), ("fp32", True, 64),
            ("fp32", False, 128), ("bf16", True, 16), ("bf16", True, 24), ("fp32", False, 24)]
    for name, rope, d in attn:
        yield f"attention {name} rope={rope} H8/2 T37 d{d}", attention, (DTYPES[name], rope, 2, 8, 2, 37, d)
    yield "attention bf16 rope=True H8/1 T37 d64", attention, (torch.bfloat16, True, 2, 8, 1, 37, 64)
    yield "attention bf16 rope=True H16/16 T256 d32", attention, (torch.bfloat16, True, 2, 16, 16, 256, 32)
    yield "attention bf16 rope=True B4097 H16/16 T16 d32", attention, (torch.bfloat16, True, 4097, 16, 16, 16, 32)
    for name, dtype in DTYPES.items():
        for d in (24, 64, 768, 1600):
            yield f"rmsnorm {name} d{d}", rmsnorm, (dtype, 37, d)
        for d_ff in (1344, 37):
            yield f"swiglu {name} d_ff{d_ff}", swiglu, (dtype, 5, d_ff, True)
            yield f"silu {name} d_ff{d_ff}", swiglu, (dtype, 5, d_ff, False)


resources = {}  # kernel hash -> cuobjdump's counts
for case, fn, args in cases():
    launched.clear()
    try:
        fn(*args)
    except Exception as e:
        print(json.dumps({"case": case, "error": f"{type(e).__name__}: {(str(e).strip() or '?').splitlines()[0]}"}))
        continue
    for name, grid, kernel in launched:
        if kernel.hash not in resources:
            resources[kernel.hash] = usage(kernel)
        print(json.dumps({"case": case, "kernel": name, "hash": kernel.hash, "grid": list(grid),
                          "smem": kernel.metadata.shared, **resources[kernel.hash]}), flush=True)
'''
_KERNELS_SMEM_LIMIT = {80: 166_912, 90: 232_448}  # bytes of dynamic shared memory per block: A100, H100


def _kernels_aot_problems(arch: int, row: dict) -> list[str]:
    """What is wrong with one compiled launch: a compile error, spilled registers (ptxas puts them in a stack frame;
    local memory would hold them too), shared memory over the arch's limit, or heads on the capped grid axis 1."""
    where = f"sm_{arch} {row['case']} {row.get('kernel', '')}"
    if "error" in row:
        return [f"{where}: {row['error']}"]
    problems = []
    if row["local"] or row["stack"] or row["smem"] > _KERNELS_SMEM_LIMIT[arch]:
        problems.append(f"{where}: local={row['local']} stack={row['stack']} smem={row['smem']} "
                        f"(limit {_KERNELS_SMEM_LIMIT[arch]})")
    big = "B4097" in row["case"] and row["grid"][0] != 4097 * 16
    if big or row["kernel"].startswith("_attn") and row["grid"][1] > 65_535:
        problems.append(f"{where}: grid {row['grid']} (batch * heads belongs on axis 0; axis 1 caps at 65,535)")
    return problems


@slow
def test_kernels_compile_ahead_of_time_sm80_sm90():
    """Every Triton kernel configuration the model can launch compiles for sm_80 and sm_90 without spills and
    within the arch's shared memory, with batch * heads on grid axis 0 (no GPU needed: see _KERNELS_AOT_SCRIPT)."""
    if not kernels.HAS_TRITON:
        raise Skipped("Triton is not importable here")
    tools = os.path.join(os.path.dirname(kernels.triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(tools, tool)) for tool in ("ptxas", "cuobjdump")):
        raise Skipped(f"ptxas or cuobjdump missing from {tools}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated to silence its warning
    repo = os.path.dirname(os.path.abspath(kernels.__file__))
    runs = {arch: subprocess.Popen([sys.executable, "-c", _KERNELS_AOT_SCRIPT, str(arch)], cwd=repo, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for arch in _KERNELS_SMEM_LIMIT}  # one process per arch, in parallel
    problems, seen, rows = [], set(), []
    for arch, run in runs.items():
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, f"sm_{arch} compile script failed:\n{err[-3000:]}"
        for row in map(json.loads, out.splitlines()):
            rows.append(row)
            problems += _kernels_aot_problems(arch, row)
            if "error" not in row and (arch, row["hash"]) not in seen:  # a binary shared by several cases: once
                seen.add((arch, row["hash"]))
                print(f"  sm_{arch} {row['case']:<42} {row['kernel']:<23} regs={row['reg']:<3} "
                      f"smem={row['smem']:<6} stack={row['stack']} local={row['local']}")
    assert not problems, "\n".join(problems)
    assert sum("B4097" in row["case"] for row in rows) == 8  # its four launches on each arch were seen
    assert len({row["kernel"] for row in rows}) == 8  # rmsnorm fwd/bwd, swiglu fwd/bwd, attention fwd/delta/dkdv/dq


def test_kernels_model_use_kernels_matches_reference_ops():
    """model.use_kernels(): loss, z and every parameter gradient equal the reference ops' for each flag family, with
    Triton's interpreter where it is installed (else the kernels' torch paths, so the wiring is still checked);
    logits and KV-cache decoding are untouched."""
    idx, targets = torch.randint(0, 50, (2, 13)), torch.randint(0, 50, (2, 13))
    every_other_flag = {"qk_norm": True, "n_kv_heads": 2, "logit_softcap": 5.0, "tie_embeddings": True, "ffn": "silu",
                        "block": "parallel", "pos": "none"}
    for flags in ({}, every_other_flag, {"norm": "post"}):
        results = []
        for ops in (KERNEL_OPS, ()):
            torch.manual_seed(1)
            model = TransformerLM(50, 24, 48, 2, 4, **flags).use_kernels(ops)
            assert any(getattr(m, "fast", False) for m in model.modules()) == bool(ops)
            ce, z = model.loss(idx, targets)
            (ce + 0.1 * z).backward()
            results.append((ce, z, {n: p.grad for n, p in model.named_parameters()}))
        (ce, z, grads), (ce_ref, z_ref, grads_ref) = results
        _kernels_check(f"{flags} ce", ce, ce_ref, 1e-5)
        _kernels_check(f"{flags} z", z, z_ref, 1e-4, 1e-5)
        for name, g in grads.items():
            _kernels_check(f"{flags} grad {name}", g, grads_ref[name], 1e-5, 1e-4)
    fast = TransformerLM(50, 24, 48, 2, 4)
    plain = TransformerLM(50, 24, 48, 2, 4)
    plain.load_state_dict(fast.state_dict())
    fast.use_kernels()
    _kernels_check("logits", fast(idx), plain(idx), 1e-5)


def test_kernels_fused_attention_only_at_default_positions():
    """Explicit token_positions take the reference path, not the kernel's 0..T-1. (A shift of all positions would
    not show: RoPE scores depend on relative positions only; strides and gaps do.)"""
    torch.manual_seed(7)
    rope = RotaryPositionalEmbedding(10000.0, 8, 32)
    fast, plain = MultiHeadSelfAttention(32, 4, 2, rope=rope), MultiHeadSelfAttention(32, 4, 2, rope=rope)
    plain.load_state_dict(fast.state_dict())
    fast.fast = True
    x = torch.randn(2, 11, 32)
    gaps = torch.tensor([0, 1, 2, 4, 8, 9, 10, 15, 16, 20, 31])
    for positions in (2 * torch.arange(11), torch.stack((torch.arange(11), gaps))):
        _kernels_check(f"attention at positions {positions.tolist()}", fast(x, positions), plain(x, positions), 1e-6)
    _kernels_check("attention at default positions", fast(x), plain(x), 1e-5)


def test_kernels_preflight_turns_off_exactly_the_broken_op_and_leaves_the_model_alone():
    """kernel_preflight with attention raising and swiglu 10% off: those two off with their reasons, the rest on;
    the model's weights, gradients and fast flags are as before."""
    torch.manual_seed(8)
    lm = TransformerLM(40, 12, 16, 1, 2, n_kv_heads=1).use_kernels(("rmsnorm",))
    ce, z = lm.loss(torch.randint(0, 40, (2, 12)), torch.randint(0, 40, (2, 12)))
    ce.backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in lm.named_parameters()}
    flags = [getattr(m, "fast", None) for m in lm.modules()]
    attention, swiglu = kernels.attention, kernels.swiglu

    def broken_attention(*args, **kwargs):
        raise RuntimeError("PassManager::run failed\nthe rest of a long compiler log")

    kernels.attention, kernels.swiglu = broken_attention, lambda a, b: swiglu(a, b) * 1.1
    try:
        result = lm.kernel_preflight(batch_size=2)
    finally:
        kernels.attention, kernels.swiglu = attention, swiglu
    print(f"  {model.format_preflight(result)}")
    assert result["rmsnorm"] is None and result["cross_entropy"] is None, result
    assert result["attention"] == "RuntimeError: PassManager::run failed", result
    assert result["swiglu"].startswith(("loss ce differs", "grad ")), result
    assert model.format_preflight(result).startswith("kernels: on rmsnorm, cross_entropy | off: swiglu (")
    assert model.format_preflight(dict.fromkeys(KERNEL_OPS)) == f"kernels: on {', '.join(KERNEL_OPS)} | off: -"
    for name, p in lm.named_parameters():
        assert torch.equal(p, before[name][0]) and torch.equal(p.grad, before[name][1]), name
    assert [getattr(m, "fast", None) for m in lm.modules()] == flags
    for dtype in (torch.bfloat16, torch.float16):  # autocast, nothing broken
        assert lm.kernel_preflight(2, dtype) == dict.fromkeys(KERNEL_OPS), dtype


def test_kernels_train_key_runs_the_fused_ops_with_the_same_losses():
    """train.py --kernels=True: the same run as the reference ops (losses and weights to float32 rounding)."""
    results = []
    with tempfile.TemporaryDirectory() as root:
        for name in ("train.bin", "val.bin"):
            np.random.default_rng(len(name)).integers(0, 40, 3000).astype("<u2").tofile(os.path.join(root, name))
        for use in (True, False):
            cfg = dict(train.DEFAULTS, train_data=os.path.join(root, "train.bin"), val_data=os.path.join(root, "val.bin"),
                       tokenizer_dir=root, out_dir=os.path.join(root, f"out_{use}"), vocab_size=40, context_length=12,
                       d_model=16, num_layers=1, num_heads=2, batch_size=2, max_iters=3, eval_interval=3, eval_tokens=48,
                       warmup_iters=1, cosine_iters=3, device="cpu", dtype="float32", kernels=use)
            with contextlib.redirect_stdout(io.StringIO()) as out:
                results.append(train.main(cfg))
            assert ("kernels.py" in out.getvalue()) == use
    fast, ref = results
    assert fast["status"] == ref["status"] == "done" and fast["step"] == 3
    assert math.isclose(fast["val_loss"], ref["val_loss"], rel_tol=1e-5), (fast["val_loss"], ref["val_loss"])
    for (name, p), q in zip(fast["model"].named_parameters(), ref["model"].parameters()):
        _kernels_check(f"weights {name}", p.detach(), q.detach(), 1e-5, 1e-4)


def test_kernels_bench_check_kernels_reports_each_failure_and_goes_on():
    """bench.check_kernels on CPU (the interpreter where Triton is installed) in bf16, fp16 and fp32 with rmsnorm
    raising and silu 10% off: exactly their lines FAIL (with the reason), every other line PASSes, result False."""
    cfg = dict(bench.DEFAULTS, vocab_size=48, context_length=8, d_model=16, num_layers=1, num_heads=2, n_kv_heads=1,
               d_ff=None)
    rmsnorm, silu = kernels.rmsnorm, kernels.silu

    def broken_rmsnorm(*args):
        raise RuntimeError("out of resource: shared memory\nRequired: 300000")

    kernels.rmsnorm, kernels.silu = broken_rmsnorm, lambda a: silu(a) * 1.1
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            ok = bench.check_kernels(cfg, torch.device("cpu"), batch=1)
    finally:
        kernels.rmsnorm, kernels.silu = rmsnorm, silu
    lines = out.getvalue().splitlines()[1:]
    print("\n".join(lines[::8]))
    assert not ok and len(lines) == 3 * (17 + 2 + 4), len(lines)  # per dtype: 17 tensors, 2 rmsnorm cases, 4 ops
    for line in lines:
        broken = "rmsnorm" in line or "silu" in line
        assert ((" FAIL " in line) if broken else (" PASS" in line)), line
        assert "rmsnorm" not in line or "RuntimeError: out of resource: shared memory" in line, line
    assert sum("model" in line and "PASS" in line for line in lines) == 9  # swiglu, attention, cross_entropy x 3


def test_kernels_bench_tiny_cpu():
    """bench.py end to end on CPU: train.py's default path and the float32 reference start from the same loss, and
    KV-cache decoding gives the tokens recomputation gives; the tokenizer section trains to the asked vocab size."""
    val_text = os.path.join(os.path.dirname(os.path.abspath(bench.__file__)), "data", "shakespeare_val.txt.gz")
    with contextlib.redirect_stdout(io.StringIO()):
        result = bench.main(["--device=cpu", "--tiny", "--paths=default,reference", "--burn_in=1", "--steps=1",
                             "--batch_size=2", "--generate_tokens=8", f"--tok_train={val_text}:300",
                             f"--tok_encode_text={val_text}"])
    default, fp32 = result["training"]
    assert default["path"] == "default" and fp32["path"] == "reference" and default["tokens_per_s"] > 0
    assert default["first_loss"] == fp32["first_loss"] and not default["compiled"]  # on a CPU 'auto' is eager fp32
    assert result["generation"]["tokens_per_s"]["identical"]
    (trained,), encoded = result["tokenizer"]["training"], result["tokenizer"]["encoding"]
    assert trained["vocab_size"] == 300 and trained["count_mb_s"] > 0 and trained["merge_s"] >= 0
    assert 1.0 < encoded["bytes_per_token"] < 4.0 and encoded["encode_file_mb_s"] > 0  # 44 merges: short tokens
    for bad, named in ((["--steps=0"], "steps"), (["--generate_tokens=-1"], "generate_tokens"),
                       (["--tok_train=nowhere.txt:300"], "tok_train"), (["--paths=fast"], "paths")):
        assert named in _error_of(lambda: bench.main(["--device=cpu", "--tiny", *bad])), bad


def test_bench_gpu_check_off_cuda_refused_unless_tiny():
    """--gpu_check on a CPU without --tiny ran the full model for over 10 minutes after its FAIL lines: refused at
    once; with --tiny (the CPU smoke run) it goes on to the checks (stubbed here: they take minutes on a CPU)."""
    checks = bench.gpu_check
    bench.gpu_check = lambda cfg, device: {"ok": True, "ran_on": device.type, "tiny": cfg["tiny"]}
    try:
        assert "--tiny" in _error_of(lambda: bench.main(["--device=cpu", "--gpu_check"]))
        with contextlib.redirect_stdout(io.StringIO()):
            result = bench.main(["--device=cpu", "--gpu_check", "--tiny"])
    finally:
        bench.gpu_check = checks
    assert result["ok"] and result["ran_on"] == "cpu" and result["tiny"], result


def test_bench_times_the_step_train_py_runs():
    """A bench path is a train.py setting: its per-step losses are those train.py logs with the same settings and
    tokens (read back from log.csv's debiased moving average), with accumulation and the schedule's warm-up."""
    cpu = torch.device("cpu")
    cfg = {**bench.DEFAULTS, **bench.TINY, "device": "cpu", "burn_in": 2, "steps": 4, "warmup_iters": 3,
           "batch_size": 2, "grad_accum_steps": 2}
    cfg.update(bench.model_facts(cfg, cpu))
    tokens = torch.randint(0, cfg["vocab_size"], (4000,), generator=torch.Generator().manual_seed(0)).int()
    with contextlib.redirect_stdout(io.StringIO()):
        run = bench.bench_training(cfg, "reference", cpu, tokens)
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "tokens.bin")
        tokens.numpy().astype("<u2").tofile(path)
        tcfg = dict(bench.path_config(cfg, "reference"), train_data=path, val_data=path, log_interval=1,
                    out_dir=os.path.join(root, "out"), tokenizer_dir=os.path.join(root, "tok"), eval_tokens=64)
        _quiet_main(tcfg)
        with open(os.path.join(root, "out", "log.csv"), newline="") as f:
            logged = [float(r["train_loss"]) for r in csv.DictReader(f) if r["train_loss"]]
    beta, ema, raw = train.EMA_BETA, 0.0, []
    for t, value in enumerate(logged, start=1):
        new_ema = value * (1 - beta**t)
        raw.append((new_ema - beta * ema) / (1 - beta))
        ema = new_ema
    assert len(raw) == len(run["losses"]) == 6
    for got, want in zip(run["losses"], raw):
        assert math.isclose(got, want, rel_tol=1e-4), (run["losses"], raw)


# ----------------------------------------------------------------------------------------------------
# The repository: from-scratch rule and size budget
# ----------------------------------------------------------------------------------------------------

_REPO_LINE_BUDGET = {"bpe.py": 760, "model.py": 560, "optim.py": 130, "data.py": 270, "configurator.py": 230,
                     "train.py": 980, "checkpoint.py": 130, "sample.py": 170, "kernels.py": 640, "bench.py": 520,
                     "plot.py": 320, "hf.py": 450, "export.py": 60}
_REPO_ALLOWED = {"torch.nn": {"Parameter", "Module", "ModuleList", "ModuleDict", "init"}, "torch.optim": {"Optimizer"}}


def _repo_torch_uses(source: str) -> set[str]:
    """Names under torch.nn / torch.optim that source imports or reads, as 'torch.nn.X' (X the first member)."""
    uses = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[:2] in (["torch", "nn"],
                                                                                               ["torch", "optim"]):
            uses |= {".".join((node.module + "." + alias.name).split(".")[:3]) for alias in node.names}
        elif isinstance(node, ast.Import):
            uses |= {".".join(a.name.split(".")[:3]) for a in node.names if a.name.startswith(("torch.nn.", "torch.optim."))}
        elif isinstance(node, ast.Attribute):
            parts, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            dotted = ".".join([getattr(inner, "id", "?"), *reversed(parts)])
            if dotted.startswith(("torch.nn.", "torch.optim.")):
                uses.add(".".join(dotted.split(".")[:3]))
    return uses


def _repo_violations(source: str) -> list[str]:
    return sorted(u for u in _repo_torch_uses(source) if u.split(".")[2] not in _REPO_ALLOWED[".".join(u.split(".")[:2])])


def test_from_scratch_rule_and_size_budget():
    """From torch.nn only Parameter, Module, containers (and init); from torch.optim only the Optimizer base class;
    nothing from torch.nn.functional or torch.nn.parallel. Every file stays within its line budget (STYLE point 15)."""
    bad = ("import torch.nn.functional as F", "from torch.nn import Linear", "y = torch.nn.functional.silu(x)",
           "opt = torch.optim.AdamW(ps)", "from torch.nn.parallel import DistributedDataParallel")
    assert all(_repo_violations(line) for line in bad)  # the checker itself catches each kind of use
    assert not _repo_violations("from torch.nn import Module, Parameter\ntorch.nn.init.trunc_normal_(w)\n"
                                "class A(torch.optim.Optimizer): pass")
    repo = os.path.dirname(os.path.abspath(model.__file__))
    for name, budget in _REPO_LINE_BUDGET.items():
        with open(os.path.join(repo, name)) as f:
            source = f.read()
        assert not _repo_violations(source), f"{name} uses {_repo_violations(source)}: not allowed from scratch"
        lines = source.count("\n")
        print(f"  {name:<16} {lines:>4} lines (budget {budget})")
        assert lines <= budget, f"{name} has {lines} lines, over its budget of {budget}"


# ----------------------------------------------------------------------------------------------------
# Hugging Face interop (hf.py, export.py)
# ----------------------------------------------------------------------------------------------------

_HF_TEXTS = ["Hello, world! Größe 大小 naïve café", "emoji 🙂👍🏽👩‍💻🇫🇷 e\u0301", "  leading and trailing spaces   ",
             "\n\n  indented\n\n  ", "tabs\t\tand\t \tmixed \t", "don't we'll I'm 1234 3.14",
             "<|endoftext|>two docs<|endoftext|><|endoftext|>", "odd spaces \x0b\x0c\x85\xa0\u2028\u3000 end ",
             "x" * 40 + " " + "ab" * 30]


def _hf_need(*packages: str) -> list:
    """The optional packages, imported, or Skipped naming the first one missing."""
    try:
        return [importlib.import_module(p) for p in packages]
    except ImportError:
        raise Skipped(f"needs the optional packages {', '.join(packages)} (pip install {' '.join(packages)})") from None


def _hf_tokenizer(tmp: str) -> bpe.Tokenizer:
    """A 300-token tokenizer trained on a slice of the committed Shakespeare text plus a little unicode."""
    repo = os.path.dirname(os.path.abspath(bpe.__file__))
    with gzip.open(os.path.join(repo, "data", "shakespeare_val.txt.gz"), "rt", encoding="utf-8") as f:
        text = f.read(20000)
    path = _bpe_write(os.path.join(tmp, "tok.txt"), text + _BPE_EOT + "".join(_HF_TEXTS[:2]) * 20)
    return bpe.train_tokenizer(path, 300, os.path.join(tmp, "tok"), num_workers=1)


def _hf_model(seed: int = 0, **flags) -> TransformerLM:
    """A tiny random model whose norm gains are not all ones (so a wrong q_norm/k_norm order would show)."""
    torch.manual_seed(seed)
    m = TransformerLM(vocab_size=300, context_length=32, d_model=48, num_layers=2, num_heads=4, **flags).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return m


def _hf_read_header(path: str) -> tuple[dict, int]:
    """The safetensors header and where the data starts, read by hand: 8-byte little-endian n, then n bytes of JSON."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n).decode("utf-8")), 8 + n


def test_hf_export_matches_transformers_logits_and_greedy_tokens():
    """Each exportable flag family, exported and loaded by transformers with no custom code: logits equal ours (1e-5,
    float32) on random ids at full context, greedy generation gives our sample.generate's tokens, config fields fit."""
    transformers, _ = _hf_need("transformers", "tokenizers")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    families = [({}, "LlamaForCausalLM"), ({"n_kv_heads": 2}, "LlamaForCausalLM"),
                ({"n_kv_heads": 1, "tie_embeddings": True, "rope_theta": 123456.0}, "LlamaForCausalLM"),
                ({"qk_norm": True, "n_kv_heads": 2, "rope_theta": 500.0}, "Qwen3ForCausalLM")]
    with tempfile.TemporaryDirectory() as tmp:
        tok = _hf_tokenizer(tmp)
        eot = tok.special_ids[_BPE_EOT]
        for i, (flags, arch) in enumerate(families):
            ours, out = _hf_model(i, **flags), os.path.join(tmp, f"hf{i}")
            hf.save_pretrained(ours, tok, out)
            with open(os.path.join(out, "config.json")) as f:
                config = json.load(f)
            assert config["architectures"] == [arch] and config["tie_word_embeddings"] == ("tie_embeddings" in flags)
            assert config["head_dim"] == 12 and config["intermediate_size"] == 128 and config["bos_token_id"] == eot
            theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
            assert type(theirs).__name__ == arch and theirs.dtype == torch.float32
            idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(i))
            with torch.no_grad():
                diff = (ours(idx) - theirs(idx).logits).abs().max().item()
            assert diff < 1e-5, (flags, diff)
            prompt = idx[0, :8].tolist()
            mine = generate(ours, prompt, 20, temperature=0.0, eos_id=eot)
            with torch.no_grad():
                got = theirs.generate(idx[:1, :8], max_new_tokens=20, do_sample=False)[0, 8:].tolist()
            assert got[:len(mine)] == mine and (len(mine) == 20 or got[len(mine)] == eot), (flags, mine, got)
        auto = transformers.AutoTokenizer.from_pretrained(os.path.join(tmp, "hf0"))
        for text in _HF_TEXTS:
            assert auto(text)["input_ids"] == tok.encode(text), text
            assert auto.decode(tok.encode(text)) == text
        assert auto.eos_token_id == eot


def test_hf_export_import_round_trip_is_bitwise():
    """export then import gives the same state dict bit for bit (float32) and the same tokenizer, for every exportable
    family; bfloat16 export halves the file and imports as the bf16-rounded weights. Needs no optional package."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = _hf_tokenizer(tmp)
        for i, flags in enumerate([{}, {"n_kv_heads": 1, "tie_embeddings": True}, {"qk_norm": True, "n_kv_heads": 2}]):
            ours, out = _hf_model(i, **flags), os.path.join(tmp, f"hf{i}")
            hf.save_pretrained(ours, tok, out)
            back, tok2 = hf.load_pretrained(out)
            a, b = ours.state_dict(), back.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert back.config == ours.config and tok2.vocab == tok.vocab and tok2.merges == tok.merges
            assert tok2.special_ids == tok.special_ids
            assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                               "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
        hf.save_pretrained(ours, None, os.path.join(tmp, "bf16"), dtype="bfloat16")
        header, _ = _hf_read_header(os.path.join(tmp, "bf16", "model.safetensors"))
        assert {h["dtype"] for k, h in header.items() if k != "__metadata__"} == {"BF16"}
        back, no_tok = hf.load_pretrained(os.path.join(tmp, "bf16"))
        assert no_tok is None and all(torch.equal(v.bfloat16().float(), back.state_dict()[k])
                                      for k, v in ours.state_dict().items())
        size = lambda d: os.path.getsize(os.path.join(tmp, d, "model.safetensors"))
        assert abs(size("bf16") / size("hf2") - 0.5) < 0.01
        assert not [n for n in os.listdir(tmp) if n.startswith(".")]  # no temporary directory left behind


def test_hf_safetensors_writer_against_a_handwritten_reader():
    """Our writer's file, read by a header reader written here: 8-byte length, JSON header with
    dtype/shape/data_offsets, 8-aligned data, tensors back to the bit; tied or sliced tensors are written as their own bytes. A truncated file is
    one ValueError naming it."""
    base = torch.randn(6, 4)
    tensors = {"a": base, "tied": base, "slice": base[:, 1], "bf": torch.randn(3, 5).bfloat16(),
               "half": torch.randn(7).half(), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.safetensors")
        hf.write_safetensors(path, tensors, {"format": "pt"})
        header, start = _hf_read_header(path)
        assert start % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
        with open(path, "rb") as f:
            raw = f.read()
        end = 0
        for name, t in tensors.items():
            h = header[name]
            assert h["shape"] == list(t.shape) and h["data_offsets"][0] == end, (name, h)
            end = h["data_offsets"][1]
            got = np.frombuffer(raw[start + h["data_offsets"][0]:start + end], dtype="<u2" if t.dtype == torch.bfloat16
                                else {"F32": "<f4", "F16": "<f2"}[h["dtype"]])
            want = t.view(torch.int16).numpy().view("<u2") if t.dtype == torch.bfloat16 else t.contiguous().numpy()
            assert np.array_equal(got, want.reshape(-1)), name
        assert start + end == len(raw)
        ours = hf.read_safetensors(path)
        assert all(torch.equal(ours[k], v) and ours[k].dtype == v.dtype for k, v in tensors.items())
        with open(os.path.join(tmp, "cut.safetensors"), "wb") as f:
            f.write(raw[:-3])
        open(os.path.join(tmp, "empty.safetensors"), "wb").close()
        for name in ("cut.safetensors", "empty.safetensors"):
            assert name in _hf_error(hf.read_safetensors, os.path.join(tmp, name))


def test_hf_safetensors_writer_read_by_the_safetensors_package():
    """The safetensors package reads our writer's file to the same tensors, and ours reads the package's file."""
    safetensors_torch, = _hf_need("safetensors.torch")
    tensors = {"w": torch.randn(5, 3), "b": torch.randn(4).bfloat16(), "h": torch.randn(2, 2).half(),
               "s": torch.tensor(1.0)}
    with tempfile.TemporaryDirectory() as tmp:
        hf.write_safetensors(os.path.join(tmp, "ours.safetensors"), tensors)
        theirs = safetensors_torch.load_file(os.path.join(tmp, "ours.safetensors"))
        assert theirs.keys() == tensors.keys() and all(torch.equal(theirs[k], v) for k, v in tensors.items())
        safetensors_torch.save_file(tensors, os.path.join(tmp, "theirs.safetensors"))
        back = hf.read_safetensors(os.path.join(tmp, "theirs.safetensors"))
        assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())


def _hf_gpt2_layout_tokenizer(tmp: str) -> bpe.Tokenizer:
    """vocab.json + merges.txt laid out as GPT-2's own (bytes in its byte-to-unicode order, <|endoftext|> last), written
    here: GPT-2's real files are not in the repository and tests download nothing."""
    b2u = _bpe_byte_to_unicode()
    merges = [(b" ", b"t"), (b"h", b"e"), (b" t", b"he"), (b"\xf0", b"\x9f"), (b"\n", b"\n"), (b" ", b" ")]
    tokens = [bytes([b]) for b in b2u] + [a + b for a, b in merges] + [_BPE_EOT.encode()]
    spell = lambda t: "".join(b2u[c] for c in t)
    with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({spell(t): i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{spell(a)} {spell(b)}\n" for a, b in merges))
    tok = bpe.load_tokenizer(tmp)
    assert tok.special_ids[_BPE_EOT] == 262
    return tok


def _hf_tokenizer_files(tmp: str):
    """(tokenizer, its tokenizer.json path) for a trained tokenizer and a GPT-2-layout one."""
    for name, tok in (("trained", _hf_tokenizer(tmp)), ("gpt2", _hf_gpt2_layout_tokenizer(tmp))):
        path = os.path.join(tmp, f"{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(hf.tokenizer_json(tok), f, ensure_ascii=False)
        yield tok, path


def test_hf_tokenizer_json_round_trips_to_the_same_tokenizer():
    """read_tokenizer_json(tokenizer_json(tok)) is tok again: vocab, merges, special ids (trained, GPT-2 layout)."""
    with tempfile.TemporaryDirectory() as tmp:
        for tok, path in _hf_tokenizer_files(tmp):
            back = hf.read_tokenizer_json(path)
            assert back.vocab == tok.vocab and back.merges == tok.merges and back.special_ids == tok.special_ids
            assert all(back.encode(text) == tok.encode(text) for text in _HF_TEXTS)


def test_hf_tokenizer_json_gives_our_ids_in_tokenizers():
    """The tokenizers package, given our tokenizer.json (trained and GPT-2 layout), gives exactly our ids and text back
    on unicode, emoji, whitespace runs (trailing spaces, blank lines, tabs, unusual spaces) and special tokens."""
    tokenizers, = _hf_need("tokenizers")
    rng = random.Random(0)
    texts = _HF_TEXTS + [_bpe_random_unicode(rng, 200) for _ in range(5)]
    with tempfile.TemporaryDirectory() as tmp:
        for tok, path in _hf_tokenizer_files(tmp):
            theirs = tokenizers.Tokenizer.from_file(path)
            for text in texts:
                assert theirs.encode(text).ids == tok.encode(text), text
                assert theirs.decode(tok.encode(text), skip_special_tokens=False) == text


def test_hf_digits_pre_tokenizer_gives_the_ids_of_tokenizers():
    """Digits(individual_digits=True) before GPT-2's ByteLevel (SmolLM2's pre-tokenizer) imports as a DigitsTokenizer
    whose ids equal the tokenizers package's on text with digit runs, spaces before digits and other scripts' digits."""
    tokenizers, = _hf_need("tokenizers")
    texts = _HF_TEXTS + ["in 2024, 1,000,000 and 3.14159  42\n\n 7 ٣٤ ½ x1y22", "  12  ab3 "]
    with tempfile.TemporaryDirectory() as tmp:
        tok = _bpe_trained(tmp, " ".join(_HF_TEXTS) + " in 2024 and 1000 or 20.24" * 30, 300)  # digit merges
        tj = hf.tokenizer_json(tok)
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                     tj["pre_tokenizer"]]}
        path = os.path.join(tmp, "tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(tj, f, ensure_ascii=False)
        ours, theirs = hf.read_tokenizer_json(path), tokenizers.Tokenizer.from_file(path)
        assert isinstance(ours, hf.DigitsTokenizer) and ours.encode("in 2024") != tok.encode("in 2024")
        for text in texts:
            assert ours.encode(text) == theirs.encode(text).ids, text
            assert ours.decode(ours.encode(text)) == text


def test_hf_import_transformers_llama_and_qwen3():
    """A random LlamaForCausalLM (GQA, untied, rms_norm_eps 1e-6, sharded files) and Qwen3ForCausalLM (tied) built
    and saved by transformers import into TransformerLM with logits equal to theirs (1e-5, float32); exported again
    they give transformers' tensors bit for bit; a bfloat16 save imports as the same values in float32."""
    transformers, = _hf_need("transformers")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    shape = dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=32, rms_norm_eps=1e-6)
    cases = [(transformers.LlamaConfig(**shape, num_key_value_heads=2, rope_theta=20000.0), "20KB"),
             (transformers.Qwen3Config(**shape, num_key_value_heads=1, head_dim=12, tie_word_embeddings=True), "50GB")]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (config, shard) in enumerate(cases):
            torch.manual_seed(i)
            theirs = transformers.AutoModelForCausalLM.from_config(config).eval()
            with torch.no_grad():
                for name, p in theirs.named_parameters():
                    p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.1) + (p.dim() == 1))
            out = os.path.join(tmp, f"m{i}")
            theirs.save_pretrained(out, max_shard_size=shard)
            assert os.path.isfile(os.path.join(out, "model.safetensors.index.json")) == (shard == "20KB")
            ours, tok = hf.load_pretrained(out)
            assert tok is None and ours.config["qk_norm"] == (i == 1)
            idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(i))
            with torch.no_grad():
                diff = (ours(idx) - theirs(idx).logits).abs().max().item()
            assert diff < 1e-5, (type(theirs).__name__, diff)
            hf.save_pretrained(ours, None, os.path.join(tmp, f"again{i}"))  # and out again: the same HF tensors
            again = hf.read_safetensors(os.path.join(tmp, f"again{i}", "model.safetensors"))
            want = {k: v for k, v in theirs.state_dict().items() if not (k == "lm_head.weight" and i == 1)}
            assert again.keys() == want.keys() and all(torch.equal(again[k], want[k]) for k in want)
            with open(os.path.join(tmp, f"again{i}", "config.json")) as f:
                assert json.load(f)["rms_norm_eps"] == 1e-6
        theirs.to(torch.bfloat16).save_pretrained(os.path.join(tmp, "bf16"))  # bf16 files import as float32
        ours = hf.read_pretrained(os.path.join(tmp, "bf16"))["state_dict"]
        want = {k: v.float() for k, v in theirs.state_dict().items()}
        assert torch.equal(ours["layers.1.ffn.w2.weight"], want["model.layers.1.mlp.down_proj.weight"])
        assert ours["layers.0.attn.q_norm.weight"].dtype == torch.float32


def _hf_tiny_checkpoint(root: str, tokenizer_record: str = "new") -> str:
    """out_dir with a ckpt.pt of a tiny model, its tokenizer in root/tok, as train.py writes (new or old record)."""
    os.makedirs(root, exist_ok=True)
    tok = _hf_tokenizer(root)
    out_dir = os.path.join(root, "out")
    os.makedirs(out_dir)
    model = _hf_model(0)
    record = ({"tokenizer": {"dir": os.path.join(root, "tok"), "rel": os.path.join("..", "tok"),
                             "special_tokens": list(tok.special_ids)}} if tokenizer_record == "new"
              else {"tokenizer_dir": os.path.join(root, "tok"), "config": {"special_tokens": list(tok.special_ids)}})
    train.save_checkpoint(model, AdamW(model.parameters()), 0, os.path.join(out_dir, "ckpt.pt"), **record)
    return out_dir


def test_hf_export_cli_and_sample_init_from():
    """export.py on a train.py checkpoint (new `tokenizer` record, found again after moving the folders; old
    tokenizer_dir record) writes a directory that sample.py --init_from=hf:PATH samples from, greedy = ours."""
    import export
    import sample
    with tempfile.TemporaryDirectory() as root:
        out_dir = _hf_tiny_checkpoint(os.path.join(root, "a"))
        moved = os.path.join(root, "moved")
        os.rename(os.path.join(root, "a"), moved)  # the absolute dir is gone; the relative one still works
        to = os.path.join(root, "hf", "tiny")
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            export.main([f"--out_dir={os.path.join(moved, 'out')}", f"--to={to}"])
        assert "LlamaForCausalLM" in printed.getvalue()
        old = _hf_tiny_checkpoint(os.path.join(root, "b"), "old")
        with contextlib.redirect_stdout(io.StringIO()):
            export.main([f"--out_dir={old}", f"--to={to}", "--force=True"])
        ours, tok = hf.load_pretrained(to)
        assert all(torch.equal(v, ours.state_dict()[k]) for k, v in _hf_model(0).state_dict().items())
        assert not [n for n in os.listdir(os.path.join(root, "hf")) if n != "tiny"]  # no temporary directory left
        want = tok.decode(tok.encode("To be") + generate(ours, tok.encode("To be"), 5, 0.0,
                                                         eos_id=tok.special_ids[_BPE_EOT]))
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            sample.main([f"--init_from=hf:{to}", "--temperature=0", "--num_samples=1", "--max_new_tokens=5",
                         "--prompt=To be", "--device=cpu"])
        assert printed.getvalue().endswith(want + "\n"), (printed.getvalue(), want)


def _hf_error(fn, *args) -> str:
    try:
        fn(*args)
    except (ValueError, OSError) as e:
        assert "\n" not in str(e), str(e)
        return str(e)
    raise AssertionError(f"{fn.__name__}{args} did not refuse")


def test_hf_init_from_fine_tunes_an_imported_model_with_its_tokenizer():
    """train.py --init_from=hf:DIR: the flags and weights come from the directory, its tokenizer is written to a new
    tokenizer_dir and tokenizes the raw text; a second run finds it there."""
    with tempfile.TemporaryDirectory() as root:
        tok = _hf_tokenizer(root)
        ours = _hf_model(3, n_kv_heads=2)
        hf.save_pretrained(ours, tok, os.path.join(root, "hf"))
        text = _bpe_write(os.path.join(root, "text.txt"), ("To be, or not to be. " * 40 + _BPE_EOT) * 4)
        cfg = dict(init_from=f"hf:{os.path.join(root, 'hf')}", train_data=text, val_data=text,
                   tokenizer_dir=os.path.join(root, "tuned_tok"), out_dir=os.path.join(root, "out"), device="cpu",
                   batch_size=2, max_iters=0, eval_tokens=0)
        tuned, out = _quiet_main(cfg)
        assert tuned["model"].config == ours.config and "starting from the weights of hf:" in out
        _pipeline_assert_same_params(ours, tuned["model"])
        assert bpe.load_tokenizer(cfg["tokenizer_dir"]).merges == tok.merges
        ids = tok.encode(open(text).read())
        windows = [ids[s:s + 33] for s in range(0, (len(ids) - 1) // 32 * 32, 32)]
        want = sum(ours.loss(torch.tensor([w[:-1]]), torch.tensor([w[1:]]))[0].item() for w in windows) / len(windows)
        assert math.isclose(tuned["val_loss"], want, rel_tol=1e-5)
        again, _ = _quiet_main(dict(cfg, max_iters=2, warmup_iters=1, out_dir=os.path.join(root, "again")))
        assert again["step"] == 2


def test_hf_bad_inputs_one_line_errors():
    """Missing or damaged checkpoint, an existing --to, flags Llama/Qwen3 cannot express, HF fields and tokenizers we
    cannot run: each is one line naming what and, from the CLI, exit code 2 without a traceback."""
    import export
    import sample
    cli = lambda *a: subprocess.run([sys.executable, export.__file__, *a], capture_output=True, text=True, timeout=60)
    with tempfile.TemporaryDirectory() as root:
        out_dir, to = _hf_tiny_checkpoint(root), os.path.join(root, "full")
        os.makedirs(to)
        open(os.path.join(to, "keep.txt"), "w").close()
        run = cli(f"--out_dir={out_dir}", f"--to={to}")
        assert run.returncode == 2 and "--force=True" in run.stderr and run.stderr.count("\n") == 1, run.stderr
        assert os.listdir(to) == ["keep.txt"]
        before = _tree_digest(root)
        for target in (to, out_dir, root, os.path.join(to, "keep.txt", "x")):  # force never deletes what is not an export
            message = _hf_error(export.main, [f"--out_dir={out_dir}", f"--to={target}", "--force=True"])
            assert "not only an earlier export's files" in message or "is a file, not a directory" in message, message
        assert _tree_digest(root) == before
        os.rename(os.path.join(root, "tok"), os.path.join(root, "gone"))
        with contextlib.redirect_stdout(io.StringIO()):
            assert "its tokenizer" in _hf_error(export.main, [f"--out_dir={out_dir}", f"--to={root}/z"])
        ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)
        del ckpt["model"]["layers.1.ffn.w2.weight"]
        torch.save(ckpt, os.path.join(root, "ckpt.pt"))
        with contextlib.redirect_stdout(io.StringIO()):
            assert "layers.1.ffn.w2.weight" in _hf_error(export.main, [f"--out_dir={root}", f"--to={root}/y"])
        with open(os.path.join(root, "ckpt.pt"), "wb") as f:
            f.write(b"PK\x03\x04 not a checkpoint")
        with contextlib.redirect_stdout(io.StringIO()):
            assert "truncated or corrupt" in _hf_error(export.main, [f"--out_dir={root}", f"--to={root}/y"])
            assert "no checkpoint at" in _hf_error(export.main, [f"--out_dir={root}/nothing", f"--to={root}/x"])
            assert "dtype='float16'" in _hf_error(export.main, [f"--to={root}/x", "--dtype=float16"])
            assert "--to is empty" in _hf_error(export.main, [f"--out_dir={out_dir}"])
            assert "init_from='gpt2'" in _hf_error(sample.main, ["--init_from=gpt2", "--device=cpu"])
        for flags, named in (({"norm": "post"}, "norm='post'"), ({"norm": "none"}, "norm='none'"),
                             ({"pos": "none"}, "pos='none'"), ({"ffn": "silu"}, "ffn='silu'"),
                             ({"block": "parallel"}, "block='parallel'"),
                             ({"logit_softcap": 30.0}, "logit_softcap=30.0")):
            cfg = model.model_config(10, 8, 16, 1, 2, **flags)
            assert named in _hf_error(hf.check_exportable, cfg) and "no Llama/Qwen3 equivalent" in _hf_error(
                hf.check_exportable, cfg)
        both = _hf_error(hf.check_exportable, model.model_config(10, 8, 16, 1, 2, pos="none", ffn="silu"))
        assert "pos='none', ffn='silu'" in both  # every unsupported flag at once
        llama = {"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 48, "intermediate_size": 96,
                 "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 32}
        hf.config_from_hf(llama)
        for change, named in (({"attention_bias": True}, "attention_bias"), ({"mlp_bias": True}, "mlp_bias"),
                              ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
                              ({"rope_parameters": {"rope_type": "yarn"}}, "rope_type"),
                              ({"use_sliding_window": True}, "use_sliding_window"),
                              ({"hidden_act": "gelu"}, "hidden_act"), ({"head_dim": 16}, "head_dim=16"),
                              ({"hidden_size": 50}, "head_dim=None and hidden_size=50 with num_attention_heads=4"),
                              ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHead")):
            assert named in _hf_error(hf.config_from_hf, {**llama, **change}), change
        no_width = {k: v for k, v in llama.items() if k != "hidden_size"}
        assert "lacks 'hidden_size'" in _hf_error(hf.config_from_hf, no_width)
        tj = hf.tokenizer_json(_hf_tokenizer(root))
        digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False},
                                                        tj["pre_tokenizer"]]}
        for change, named in (({"model": {"type": "Unigram", "vocab": []}}, "Unigram"),
                              ({"pre_tokenizer": digits}, "Digits+ByteLevel"),
                              ({"normalizer": {"type": "NFC"}}, "normalizer"),
                              ({"model": {**tj["model"], "byte_fallback": True}}, "byte_fallback")):
            path = os.path.join(root, "tokenizer.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump({**tj, **change}, f)
            assert named in _hf_error(hf.read_tokenizer_json, path), change
        with open(os.path.join(root, "config.json"), "w") as f:
            json.dump(llama, f)
        os.remove(path)
        open(os.path.join(root, "tokenizer.model"), "wb").close()
        with open(os.path.join(root, "model.safetensors"), "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
        assert "not a readable safetensors file" in _hf_error(hf.read_pretrained, root)
        hf.save_pretrained(_hf_model(), None, os.path.join(root, "ok"))
        for name in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(root, "ok", name), os.path.join(root, name))
        assert "SentencePiece" in _hf_error(hf.read_pretrained, root)


# ----------------------------------------------------------------------------------------------------
# Careless use (issue 15): what a new user types, each answered in one line
# ----------------------------------------------------------------------------------------------------

_CARELESS_REPO = os.path.dirname(os.path.abspath(train.__file__))


def _careless_cli(target, argv, **env):
    """Run a script's __main__ block (runpy) or a main function through configurator.run_cli, in-process, with argv
    and extra environment -> (exit code, stdout, stderr)."""
    import configurator
    out, err, saved_argv, saved_env = io.StringIO(), io.StringIO(), sys.argv, dict(os.environ)
    sys.argv = [str(target), *argv]
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if callable(target):
                configurator.run_cli(target)
            runpy.run_path(os.path.join(_CARELESS_REPO, target), run_name="__main__")
        raise AssertionError(f"{target} returned without sys.exit")
    except SystemExit as e:
        return e.code, out.getvalue(), err.getvalue()
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)


def _careless_unechoed(err):
    """stderr without configurator's echo of the settings, which sample.py sends there (stdout: only the samples)."""
    return "".join(line for line in err.splitlines(True) if not line.startswith(("override: ", "config ")))


def _careless_one_line(code, err, *words):
    """Exit code 2 and one `error: ...` line holding every word (callers pass _careless_cli(...)[::2]: code, stderr),
    besides sample.py's echo of the settings."""
    err = _careless_unechoed(err)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    assert "Traceback" not in err and all(w in err for w in words), (err, words)


def _careless_run(root):
    """root/run/out/ckpt.pt: a tiny model whose head is zero (all logits equal: greedy takes id 0), trained with the
    special token <|doc|> (id 0) and recording tokenizer_dir 'run/tok' relative to root, as older checkpoints do."""
    text = "the cat sat on the mat<|doc|>a dog ran far<|doc|>" * 20
    tok = bpe.train_tokenizer(_bpe_write(os.path.join(root, "t.txt"), text), 300, os.path.join(root, "run", "tok"),
                              ["<|doc|>"], 1)
    torch.manual_seed(0)
    lm = TransformerLM(tok.vocab_size, 16, 16, 1, 2, d_ff=32)
    with torch.no_grad():
        lm.lm_head.weight.zero_()
    out = os.path.join(root, "run", "out")
    os.makedirs(out)
    cfg = {**train.DEFAULTS, "special_tokens": ("<|doc|>",), "tokenizer_dir": "run/tok", "vocab_size": tok.vocab_size}
    train.save_checkpoint(lm, AdamW(lm.parameters(), lr=1e-3), 1, os.path.join(out, "ckpt.pt"), config=cfg,
                          tokenizer_dir="run/tok")
    return out


def test_careless_run_cli_exit_codes_one_line_and_rank_0_speaks():
    def fails(error):
        def main(argv):
            raise error
        return main

    assert _careless_cli(lambda argv: None, [])[0] == 0 and _careless_cli(lambda argv: 3, [])[0] == 3
    for error in (ValueError("bad key"), FileNotFoundError("f.txt not found"), OSError("disk\nfull")):
        code, out, err = _careless_cli(fails(error), [])
        _careless_one_line(code, err, str(error).splitlines()[0])
    oom = type("OutOfMemoryError", (RuntimeError,), {})  # torch.OutOfMemoryError, recognised without importing torch
    for error in (MemoryError(), oom("CUDA out of memory. Tried to allocate 2 GiB\nmore advice")):
        _careless_one_line(*_careless_cli(fails(error), [])[::2], "out of memory")
    assert _careless_cli(fails(KeyboardInterrupt()), []) == (130, "", "interrupted\n")
    assert _careless_cli(fails(KeyboardInterrupt("run again")), [])[2] == "interrupted; run again\n"
    same = fails(ValueError("same on every rank"))
    assert _careless_cli(same, [], RANK="0")[::2] == (2, "error: same on every rank\n")
    assert _careless_cli(same, [], RANK="3") == (2, "", "")  # every rank meets the same bad input: rank 0 says it
    assert _careless_cli(fails(KeyboardInterrupt()), [], RANK="3") == (130, "", "")
    own = _careless_cli(fails(oom("CUDA out of memory")), [], RANK="3")[2]  # its own device: said, naming the rank
    assert own == "error (rank 3): out of memory: CUDA out of memory\n", own
    try:
        _careless_cli(fails(RuntimeError("a bug")), [])
        raise AssertionError("a bug was hidden")
    except RuntimeError as e:
        assert str(e) == "a bug"
    with tempfile.TemporaryDirectory() as root:  # `python bpe.py ... | head`: the reader is gone before we print
        text = _bpe_write(os.path.join(root, "t.txt"), "some text")
        proc = subprocess.Popen([sys.executable, bpe.__file__, "train", f"--input={text}", "--vocab_size=260",
                                 f"--out_dir={root}", "--num_workers=1"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        proc.stdout.close()
        assert proc.wait(timeout=60) == 1 and proc.stderr.read() == b"", "a closed pipe gave a traceback"


def test_careless_key_suggestions_only_when_near():
    def hint(key):
        try:
            train.configure(train.DEFAULTS, [f"--{key}=1"])
        except ValueError as e:
            assert "\n" not in str(e)
            return str(e)
        raise AssertionError(f"--{key} accepted")

    near = {"learning_rate": "'lr'", "iters": "'max_iters'", "batch": "'batch_size'", "n_layer": "'num_layers'",
            "n_head": "'num_heads'", "n_embd": "'d_model'", "block_size": "'context_length'", "lr_min": "'min_lr'",
            "max-iters": "'max_iters'", "lrr": "'lr'", "warmup": "'warmup_iters'", "batchsize": "'batch_size'",
            "eval_iters": "'eval_tokens'", "gradient_accumulation_steps": "'grad_accum_steps'"}
    for key, suggestion in near.items():
        assert f"did you mean {suggestion}?" in hint(key), hint(key)
    assert "this model has no dropout" in hint("dropout") and "did you mean" not in hint("dropout")
    for far in ("leraning_rate", "colour", "xyz"):
        assert "did you mean" not in hint(far), hint(far)
    for positional in ("lr=3e-3", _CARELESS_REPO):  # a forgotten --, a folder for a file
        try:
            train.configure(train.DEFAULTS, [positional])
            raise AssertionError(f"{positional} accepted")
        except FileNotFoundError as e:
            assert "--key=value" in str(e) and positional in str(e), e


def test_careless_non_finite_and_huge_numbers_refused_by_key():
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "c.py")
        with open(path, "w") as f:
            f.write("lr = float('nan')\n")
        latin = os.path.join(root, "latin.py")
        with open(latin, "wb") as f:
            f.write(b"# caf\xe9\nlr = 1e-3\n")
        cases = [(["--lr=nan"], "lr"), (["--lr=inf"], "lr"), (["--min_lr=-inf"], "min_lr"), (["--lr=1e999"], "lr"),
                 ([path], "lr"), (["--max_iters=1e30"], "max_iters"), ([f"--seed={2**70}"], "seed"),
                 (["--target_val_loss=nan"], "target_val_loss"), (["--betas=(0.9, 1e999)"], "betas"),
                 ([f"--d_ff={2**70}"], "d_ff"), ([latin], "latin.py")]
        for argv, key in cases:
            try:
                train.configure(train.DEFAULTS, argv)
                raise AssertionError(f"{argv} accepted")
            except ValueError as e:
                assert str(e).startswith((f"{key}=", "config file")) and key in str(e) and "\n" not in str(e), e
    cfg = train.configure(train.DEFAULTS, [f"--seed={2**63 - 1}", "--lr=1e30"])  # a huge lr is a real experiment
    assert cfg["seed"] == 2**63 - 1 and cfg["lr"] == 1e30


def test_careless_two_texts_with_one_name_get_their_own_caches():
    """data/train/text.txt and data/val/text.txt used to share tokenizer_dir/text.bin: validation on training text."""
    with tempfile.TemporaryDirectory() as root:
        texts = {split: _bpe_corpus(seed, 30) for seed, split in enumerate(("train", "val"))}
        paths = []
        for split, text in texts.items():
            os.makedirs(os.path.join(root, split))
            paths.append(_bpe_write(os.path.join(root, split, "text.txt"), text))
        with contextlib.redirect_stdout(io.StringIO()):
            bins = data.prepare_splits(paths, os.path.join(root, "tok"), 300)
        assert bins[0] != bins[1] and all(os.path.basename(b).startswith("text-") for b in bins), bins
        tok = bpe.load_tokenizer(os.path.join(root, "tok"))
        for path, text in zip(bins, texts.values()):
            assert np.fromfile(path, dtype="<u2").tolist() == tok.encode(text)
        same_file = os.path.join(root, "val", ".", "text.txt")
        assert data.token_cache_path(same_file, "t") == data.token_cache_path(paths[1], "t")


def test_careless_text_replaced_by_an_older_file_is_tokenized_again():
    """The cache was reused while it was newer than its text: a text replaced by a different one with an older mtime
    (cp -p, tar x, rsync -t) kept its stale tokens. Now the text's size and mtime_ns recorded beside the .bin decide."""
    with tempfile.TemporaryDirectory() as root:
        paths = [_bpe_write(os.path.join(root, f"{split}.txt"), _bpe_corpus(seed, 30))
                 for seed, split in enumerate(("train", "val"))]
        tok_dir = os.path.join(root, "tok")
        with contextlib.redirect_stdout(io.StringIO()):
            bins = data.prepare_splits(paths, tok_dir, 300)
        made = os.stat(bins[1]).st_mtime_ns
        with contextlib.redirect_stdout(io.StringIO()):
            assert data.prepare_splits(paths, tok_dir, 300) == bins and os.stat(bins[1]).st_mtime_ns == made
        new_text = _bpe_corpus(7, 30)
        _bpe_write(paths[1], new_text)
        os.utime(paths[1], ns=(made - 10**12, made - 10**12))  # 1000 s older than the cache it replaces
        said = io.StringIO()
        with contextlib.redirect_stdout(said):
            assert data.prepare_splits(paths, tok_dir, 300) == bins
        assert said.getvalue().count("tokenizing") == 1 and paths[1] in said.getvalue(), said.getvalue()
        assert np.fromfile(bins[1], dtype="<u2").tolist() == bpe.load_tokenizer(tok_dir).encode(new_text)


def test_careless_tokenizer_dir_with_vocab_json_but_no_merges_txt_refused():
    """A lone vocab.json was retrained over (with a note on stdout) as if an interrupted run had left it; a cut save
    leaves the other half (bpe.Tokenizer.save renames merges.txt first), so a lone vocab.json is the user's."""
    with tempfile.TemporaryDirectory() as root:
        text = _bpe_write(os.path.join(root, "t.txt"), _bpe_corpus(0, 30))
        tok = bpe.Tokenizer(*bpe.train_bpe(text, 300, [_BPE_EOT], 1), [_BPE_EOT])
        tok_dir, replace = os.path.join(root, "tok"), os.replace
        os.mkdir(tok_dir)

        def cut_after_first_rename(src, dst):
            if dst.endswith("vocab.json"):
                raise KeyboardInterrupt  # the save is stopped between its two renames
            replace(src, dst)

        os.replace = cut_after_first_rename
        try:
            tok.save(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"))
        except KeyboardInterrupt:
            pass
        finally:
            os.replace = replace
        assert sorted(os.listdir(tok_dir)) == ["merges.txt"]  # the state data.py trains again over
        os.remove(os.path.join(tok_dir, "merges.txt"))
        _bpe_write(os.path.join(tok_dir, "vocab.json"), "mine")
        code, out, err = _careless_cli("data.py", [f"--train_data={text}", f"--val_data={text}",
                                                   f"--tokenizer_dir={tok_dir}", "--vocab_size=300"])
        _careless_one_line(code, err, f"tokenizer_dir={tok_dir} holds vocab.json but no merges.txt", "restore")
        assert sorted(os.listdir(tok_dir)) == [".lock", "vocab.json"] and open(f"{tok_dir}/vocab.json").read() == "mine"


def test_careless_short_empty_and_missing_data_named_with_their_key():
    with tempfile.TemporaryDirectory() as root:
        short = os.path.join(root, "short.bin")
        np.arange(10, dtype="<u2").tofile(short)
        tokens = data.load_tokens(short, 64)
        for fn in (lambda: data.check_length(short, tokens, 16, "val_data"),
                   lambda: data.get_batch(tokens, 2, 16, "cpu")):
            try:
                fn()
                raise AssertionError("10 tokens accepted for context_length 16")
            except ValueError as e:
                assert "short.bin" in str(e) and "val_data" in str(e) and "at most 9" in str(e), e
        data.check_length(short, tokens, 9, "val_data")  # 10 tokens make one window of 9 + 1
        short_txt = _bpe_write(os.path.join(root, "short.txt"), "a few words")
        with contextlib.redirect_stdout(io.StringIO()):
            cache = data.prepare_splits([_bpe_write(os.path.join(root, "t.txt"), _bpe_corpus(0, 30)), short_txt],
                                        os.path.join(root, "tok0"), 300)[1]
        try:
            data.check_length(cache, data.load_tokens(cache, 300), 16, "val_data")
            raise AssertionError("a short text accepted")
        except ValueError as e:  # the user's text first, the cache only as where its tokens are
            assert str(e).startswith(f"{short_txt} (val_data, tokenized into {cache}) has "), e
        train_txt = _bpe_write(os.path.join(root, "train.txt"), _bpe_corpus(0, 30))
        empty = _bpe_write(os.path.join(root, "empty.txt"), "")
        blocker = _bpe_write(os.path.join(root, "file"), "x")
        for paths, tok_dir, vocab, words in [([train_txt, empty], "tok", 300, ["empty.txt", "no text"]),
                                             ([train_txt, empty], "big", 70000, ["vocab_size=70,000", "65,536"]),
                                             ([empty, train_txt], "tok2", 300, ["empty.txt", "no text"]),
                                             ([train_txt, root], "tok", 300, ["is a directory"]),
                                             ([train_txt, train_txt], "file/tok", 300, ["tokenizer_dir=", "Not a dir"])]:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    data.prepare_splits(paths, os.path.join(root, tok_dir), vocab)
                raise AssertionError(f"{paths} accepted")
            except (ValueError, OSError) as e:
                assert all(w in str(e) for w in words) and "\n" not in str(e), e
        assert not [n for n in os.listdir(os.path.join(root, "tok")) if n.startswith("empty")]  # no empty .bin left
    try:  # a config's repository-relative path, from another working directory
        data.prepare_splits([os.path.join("..", "no", "such.txt"), "data/shakespeare_val.txt.gz"], "tok", 300)
        raise AssertionError("a missing file accepted")
    except FileNotFoundError as e:
        assert "no/such.txt not found; download it" in str(e), e
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as elsewhere:
        os.chdir(elsewhere)
        try:
            data.prepare_splits(["data/shakespeare_val.txt.gz"], "tok", 300)
            raise AssertionError("a path relative to the repository found from elsewhere")
        except FileNotFoundError as e:
            assert "run from the repository" in str(e) and os.path.join(_CARELESS_REPO, "data") in str(e), e
        finally:
            os.chdir(cwd)


def test_careless_broken_text_files_one_line_from_every_command():
    """A truncated .txt.gz (an interrupted download), not-gzip .gz, non-UTF-8, empty and directory inputs."""
    with tempfile.TemporaryDirectory() as root:
        text = _bpe_corpus(0, 200)
        full = _bpe_write(os.path.join(root, "full.txt.gz"), text, compress=True)
        cut = os.path.join(root, "cut.txt.gz")
        with open(full, "rb") as f, open(cut, "wb") as g:
            g.write(f.read()[:len(text) // 8])
        tok_dir = os.path.join(root, "tok")
        bpe.train_tokenizer(full, 300, tok_dir, num_workers=1)
        for argv in (["train", f"--input={cut}", "--vocab_size=300", f"--out_dir={root}/new", "--num_workers=1"],
                     ["stats", f"--tokenizer={tok_dir}", f"--input={cut}"],
                     ["encode", f"--tokenizer={tok_dir}", f"--input={cut}", f"--out={root}/o.bin", "--num_workers=1"]):
            code, out, err = _careless_cli("bpe.py", argv)
            _careless_one_line(code, err, "cut.txt.gz is a truncated or corrupt gzip file", "download it again")
        assert not os.path.exists(f"{root}/new") and not [n for n in os.listdir(root) if n.startswith("o.bin")]
        code, out, err = _careless_cli("data.py", [f"--train_data={cut}", f"--val_data={full}",
                                                   f"--tokenizer_dir={root}/tok3", "--vocab_size=300"])
        _careless_one_line(code, err, "cut.txt.gz is a truncated or corrupt gzip file")
        not_gzip = _bpe_write(os.path.join(root, "plain.txt.gz"), "plain text")
        latin = os.path.join(root, "latin.txt")
        with open(latin, "wb") as f:
            f.write("café".encode("latin-1"))
        empty = _bpe_write(os.path.join(root, "empty.txt"), "")
        for path, words in [(not_gzip, "corrupt gzip"), (latin, "not UTF-8"), (empty, "no text"), (root, "directory")]:
            _careless_one_line(*_careless_cli("bpe.py", ["train", f"--input={path}", "--vocab_size=300",
                                                         f"--out_dir={root}/new", "--num_workers=1"])[::2], words)
        too_many = ["train", f"--input={full}", "--vocab_size=300", f"--out_dir={root}/new", "--num_workers=1000"]
        _careless_one_line(*_careless_cli("bpe.py", too_many)[::2], "--num_workers=1000")
        under_a_file = ["train", f"--input={full}", "--vocab_size=300", f"--out_dir={empty}/tok"]
        _careless_one_line(*_careless_cli("bpe.py", under_a_file)[::2], "--out_dir=", "cannot be written")
        keep = _bpe_write(os.path.join(root, "keep.txt"), "my text")
        argv = ["encode", f"--tokenizer={tok_dir}", f"--input={keep}", f"--out={keep}"]
        _careless_one_line(*_careless_cli("bpe.py", argv)[::2], "--out=")
        with open(keep) as f:
            assert f.read() == "my text"


def test_careless_tokenizer_files_that_parse_but_do_not_fit():
    with tempfile.TemporaryDirectory() as root:
        tok = bpe.train_tokenizer(_bpe_write(os.path.join(root, "t.txt"), _bpe_corpus(0, 30)), 300, root,
                                  num_workers=1)
        vocab, merges = (os.path.join(root, n) for n in ("vocab.json", "merges.txt"))
        with open(merges) as f:
            lines = f.read().splitlines(keepends=True)
        u = _bpe_byte_to_unicode()
        cases = {"empty": (merges, ""), "cut": (merges, "".join(lines[:20])),
                 "unknown": (merges, "".join(lines) + "q" * 9 + " z\n"), "latin": (merges, "#version\n\xe9 \xe9\n"),
                 "list": (vocab, json.dumps(list(u.values()))),
                 "id to token": (vocab, json.dumps({str(i): c for i, c in enumerate(u.values())}))}
        originals = {p: open(p, encoding="utf-8").read() for p in (vocab, merges)}
        for name, (path, content) in cases.items():
            with open(path, "w", encoding="latin-1" if name == "latin" else "utf-8") as f:
                f.write(content)
            try:
                bpe.load_tokenizer(root)
                raise AssertionError(f"{name} accepted")
            except ValueError as e:
                assert os.path.basename(path) in str(e) and "\n" not in str(e), (name, e)
            with open(path, "w", encoding="utf-8") as f:
                f.write(originals[path])
        assert bpe.load_tokenizer(root).merges == tok.merges
        try:
            bpe.load_tokenizer(root, special_tokens=("<|other|>",))  # its <|endoftext|> would be plain text
            raise AssertionError("a vocab with an unknown special token accepted")
        except ValueError as e:
            assert "special tokens" in str(e)


def test_careless_sample_uses_the_runs_special_tokens_and_finds_its_tokenizer():
    """The run's separator <|doc|> (id 0) ends a sample and may appear in a prompt; <|endoftext|>, not special in this
    run, is plain text (it used to be appended as an id past the model's vocabulary: IndexError). The tokenizer is
    found from the repository as the working directory although the checkpoint records 'run/tok' relative to root."""
    with tempfile.TemporaryDirectory() as root:
        out = _careless_run(root)
        prompt = "a cat<|doc|>the dog<|endoftext|>"
        code, stdout, err = _careless_cli("sample.py", [f"--out_dir={out}", f"--prompt={prompt}", "--temperature=0",
                                                        "--num_samples=2", "--max_new_tokens=5", "--device=cpu"])
        assert code == 0, err
        assert stdout.split("--- sample 1/2 ---\n", 1)[1] == f"{prompt}\n--- sample 2/2 ---\n{prompt}\n", stdout
        ckpt = train.read_checkpoint(os.path.join(out, "ckpt.pt"))
        tokenizer_dir = os.path.join(root, "run", "tok")
        assert checkpoint.checkpoint_tokenizer(ckpt, os.path.join(out, "ckpt.pt")) == (tokenizer_dir, ("<|doc|>",))
        record = {"dir": "/no/such/dir", "rel": "../tok", "special_tokens": ["<|doc|>", "<|x|>"]}
        assert checkpoint.checkpoint_tokenizer({"tokenizer": record}, os.path.join(out, "ckpt.pt")) == (tokenizer_dir,
                                                                                             ("<|doc|>", "<|x|>"))
        try:
            checkpoint.checkpoint_tokenizer({"tokenizer_dir": "gone/tok"}, os.path.join(out, "ckpt.pt"))
            raise AssertionError("a missing tokenizer accepted")
        except FileNotFoundError as e:
            assert os.path.join(root, "gone", "tok") in str(e) and "\n" not in str(e)
        for bad in ("--max_new_tokens=0", "--num_samples=-1", "--temperature=-1", "--top_p=1.5", "--temperature=inf"):
            _careless_one_line(*_careless_cli("sample.py", [f"--out_dir={out}", bad])[::2], bad[2:].split("=")[0])
        _careless_one_line(*_careless_cli("sample.py", [f"--out_dir={root}"])[::2], "no checkpoint")
        logits = torch.tensor([0.0, 1.0, 3.0])
        assert sample_next_token(logits, 1e-30, 0.95, None) == 2  # a tiny temperature is greedy, not nan
        assert sample_next_token(logits, 1e-50, 0.95, None) == 2  # 0 in float32: the top logit was 0 / 0 = nan
        assert sample_next_token(logits, 1.0, 1e-300, None) == 2  # top_p 0 in float32 dropped every token: nan
        bare = os.path.join(root, "bare")
        os.mkdir(bare)
        module = torch.nn.Module()
        module.w = torch.nn.Parameter(torch.zeros(2))
        train.save_checkpoint(module, AdamW(module.parameters()), 0, os.path.join(bare, "ckpt.pt"))
        _careless_one_line(*_careless_cli("sample.py", [f"--out_dir={bare}"])[::2], "not a train.py TransformerLM "
                           "checkpoint (no model_config)")


def test_careless_sample_stdout_holds_only_samples():
    """`python sample.py | head -1` is a sample's header: the override echo goes to stderr (--help stays on stdout).
    A top_p that rounds to 0 in float32 keeps the most likely token instead of failing in torch.multinomial."""
    with tempfile.TemporaryDirectory() as root:
        out = _careless_run(root)
        code, stdout, err = _careless_cli("sample.py", [f"--out_dir={out}", "--top_p=1e-300", "--temperature=1",
                                                        "--num_samples=1", "--max_new_tokens=3", "--device=cpu"])
        assert code == 0 and stdout.startswith("--- sample 1/1 ---\nOnce upon a time"), (code, stdout, err)
        assert "override: top_p = 1e-300" in err and "override" not in stdout, (stdout, err)
    code, stdout, err = _careless_cli("sample.py", ["--help"])
    assert code == 0 and stdout.startswith("usage: python sample.py") and not err, (stdout, err)


@slow
def test_careless_sample_ctrl_c_from_another_directory_exits_130():
    with tempfile.TemporaryDirectory() as root:
        out = _careless_run(root)
        elsewhere = os.path.join(root, "elsewhere")
        os.mkdir(elsewhere)
        argv = [f"--out_dir={out}", "--temperature=1", "--num_samples=1000000", "--max_new_tokens=2", "--device=cpu"]
        proc = subprocess.Popen([sys.executable, os.path.join(_CARELESS_REPO, "sample.py"), *argv], cwd=elsewhere,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"},  # a shell's `&` job ignores Ctrl-C:
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not inherited
        try:
            while "--- sample 1/" not in (line := proc.stdout.readline()) and line:  # a sample: the tokenizer was found
                pass
            proc.send_signal(signal.SIGINT)
            err = proc.communicate(timeout=120)[1]  # stderr read whole: a readline first would buffer lines away
        finally:
            proc.kill()
        assert proc.returncode == 130 and _careless_unechoed(err) == "interrupted\n", (proc.returncode, err)


def test_careless_plot_and_model_cli():
    with tempfile.TemporaryDirectory() as root:
        _plot_three_runs(root)
        runs = os.path.join(root, "lr_*")
        for argv, words in [(["--ylim", "nan", "3"], "--ylim"), (["--ylim", "3", "1"], "--ylim"),
                            ([f"--out={root}"], "is a directory"), ([f"--out={root}/p.xyz"], ".xyz")]:
            _careless_one_line(*_careless_cli("plot.py", [runs, *argv])[::2], words)
        assert not [n for n in os.listdir(root) if n.endswith(".tmp")]
        code, out, err = _careless_cli("plot.py", [runs, "--label=nope", f"--out={root}/p.svg"])
        assert code == 0 and "'nope'" in err, err
    code, out, err = _careless_cli("model.py", ["--d_model=48", "--num_heads=4", "--learning_rate=1"])
    _careless_one_line(code, err, "'lr'")
    for bad in ("--batch_size=0", "--batch_size=-1"):  # printed negative activation memory
        _careless_one_line(*_careless_cli("model.py", [bad])[::2], bad[2:])
    assert _careless_cli("model.py", [os.path.join(_CARELESS_REPO, "config", "demo.py")])[0] == 0


def test_careless_readme_configuration_table_lists_every_key():
    """Every key of train.py once, and no section row left empty (section comments once leaked into it as rows)."""
    with open(os.path.join(_CARELESS_REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    rows = readme[readme.index("| key | default | meaning |"):].split("\n\n")[0].splitlines()[2:]
    keys = [re.match(r"\| `(\w+)` \|", row) for row in rows]
    assert all(k or i + 1 < len(rows) and keys[i + 1] for i, k in enumerate(keys)), "a section row without keys"
    listed = [k[1] for k in keys if k]
    assert sorted(listed) == sorted(train.DEFAULTS), set(listed) ^ set(train.DEFAULTS)


# ----------------------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------------------

def main() -> int:
    """Run the test_* functions not marked @slow, or the @slow ones (argv[1] 'faults'), or those whose name contains
    argv[1]; print failures with tracebacks. A test that raises Skipped (an optional extra is absent) is reported as
    skipped, never as passed."""
    selected = sys.argv[1] if len(sys.argv) > 1 else ""
    tests = [(name, fn) for name, fn in globals().items() if name.startswith("test_") and callable(fn)]
    if selected == "faults" or not selected:
        tests = [(name, fn) for name, fn in tests if getattr(fn, "slow", False) == (selected == "faults")]
    else:
        tests = [(name, fn) for name, fn in tests if selected in name]
    passed = failed = skipped = 0
    t_start = time.perf_counter()
    for name, fn in tests:
        t0 = time.perf_counter()
        try:
            fn()
            passed += 1
            print(f"ok    {name} ({time.perf_counter() - t0:.1f}s)", flush=True)
        except Skipped as why:
            skipped += 1
            print(f"skip  {name}: {why}", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL  {name} ({time.perf_counter() - t0:.1f}s)", flush=True)
            traceback.print_exc()
    print(f"total {time.perf_counter() - t_start:.1f}s")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
