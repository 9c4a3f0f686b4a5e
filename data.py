"""Token data: tokenize raw text once into a cached .bin, load it as a checked memmap, sample training batches.

    python data.py config/owt.py        # train the tokenizer (if missing) and tokenize train/val data once

A .bin file is a flat array of little-endian uint16 token ids (vocab <= 65,536). Beside it, `<file>.bin.json`
caches the largest id so the vocab check reads the file only once, and for a .bin made from a text, that text and
the size and mtime_ns of the text and tokenizer files it was made from; the sidecar counts only while the .bin
has the size and mtime_ns it records. The .bin made from a text is tokenizer_dir/<name>-<hash>.bin, the hash that
of the text's full path, so data/train/text.txt and data/val/text.txt never share one (a cache of older versions,
named <name>.bin or without that record, is not used: tokenized once more).
Preparation can be stopped at any point and run again: every file is written as `<name>.tmp` and renamed when
complete, so a finished file is never partial; a tokenizer directory with merges.txt but no vocab.json (a save cut
between its renames) is trained again, and a .bin whose text or tokenizer files differ from its record (replaced,
even by an older file) is tokenized again (over any stale .tmp).
"""
import fcntl
import hashlib
import json
import os

import numpy as np
import torch

import bpe


def get_batch(x: np.ndarray | torch.Tensor, batch_size: int, context_length: int, device: str | torch.device,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample batch_size windows at uniformly random starts; targets are the inputs shifted by one token.

    x: 1-D integer array or np.memmap, or a tensor already on device (see tokens_to_device): the same starts give
    the same windows either way. Returns int64 (inputs, targets), each (batch_size, context_length), on device.
    Pass a CPU torch.Generator to make the stream reproducible (its state can be saved and restored).
    Example: x = [0..9], context 3, start 4 -> inputs [4, 5, 6], targets [5, 6, 7].
    """
    check_length(getattr(x, "filename", None) or "the token array", x, context_length, "train_data/val_data")
    starts = torch.randint(len(x) - context_length, (batch_size,), generator=generator)  # on the CPU: one stream
    return windows(x, starts, context_length, device)


def windows(x: np.ndarray | torch.Tensor, starts: torch.Tensor, context_length: int,
            device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x[s : s + context_length] and targets x[s + 1 : s + context_length + 1] for each start s (a CPU int64
    tensor (batch,)): two int64 (batch, context_length) tensors on device. No host sync on CUDA: the starts (or
    the windows, for a host array) are copied from pinned memory, asynchronously."""
    cuda = torch.device(device).type == "cuda"
    if isinstance(x, torch.Tensor):  # gather on the device itself
        starts = starts.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else starts.to(x.device)
        rows = x[starts[:, None] + torch.arange(context_length + 1, device=x.device)].long()  # (batch, context + 1)
        return rows[:, :-1], rows[:, 1:]
    starts = starts.numpy()
    rows = x[starts[:, None] + np.arange(context_length + 1)].astype(np.int64)  # (batch, context + 1)
    inputs, targets = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
    if cuda:  # pinned host memory lets the copy overlap with compute
        return inputs.pin_memory().to(device, non_blocking=True), targets.pin_memory().to(device, non_blocking=True)
    return inputs.to(device), targets.to(device)


def eval_starts(num_tokens: int, context_length: int, eval_tokens: int) -> np.ndarray:
    """Starts of the validation windows: non-overlapping context_length windows spread evenly over the whole file,
    eval_tokens // context_length of them (0 or more than the file holds = all). They depend on the file alone, not
    on batch size, seed or world size, so every run and resume is measured on the same tokens.
    Example: 10 tokens, context 3 -> 3 whole windows (each needs one more token for its last target) at 0, 3, 6;
    eval_tokens=6 keeps 2 of them, spread out: starts 0 and 3."""
    available = (num_tokens - 1) // context_length
    wanted = eval_tokens // context_length if eval_tokens else available
    n = min(wanted, available)
    return np.arange(n, dtype=np.int64) * available // max(n, 1) * context_length


def check_length(path: str, tokens: np.ndarray | torch.Tensor, context_length: int, key: str) -> None:
    """Refuse data too short for one training window (context_length + 1 tokens), in one line naming the file and
    its config key: train.py calls this before it writes anything. Example: 10 tokens, context_length 16 -> error."""
    if len(tokens) <= context_length:
        shorter = f" or set context_length to at most {len(tokens) - 1}" if len(tokens) > 1 else ""
        text = _sidecar(path).get("text")  # a cache made by prepare: name the user's text, not the cache
        name = f"{text} ({key}, tokenized into {path})" if text else f"{path} ({key})"
        raise ValueError(f"{name} has {len(tokens):,} tokens, fewer than context_length + 1 = "
                         f"{context_length + 1:,}; point {key} at a longer text{shorter}")


def tokens_to_device(tokens: np.ndarray, device: torch.device,
                     max_fraction: float = 0.25) -> np.ndarray | torch.Tensor:
    """The whole token array as int32 on a CUDA device when it takes at most max_fraction of the free memory (batches
    are then gathered there, see get_batch); otherwise, or off CUDA, the array itself (read through the memmap).
    It is copied in chunks (see upload), so the host never holds an int32 copy of the whole file."""
    if device.type != "cuda" or 4 * len(tokens) > max_fraction * torch.cuda.mem_get_info(device)[0]:
        return tokens
    return upload(tokens, device)


def upload(tokens: np.ndarray, device: torch.device, chunk: int = 1 << 26) -> torch.Tensor:
    """tokens (uint16, e.g. a memmap) as an int32 tensor on device, converted chunk tokens at a time."""
    out = torch.empty(len(tokens), dtype=torch.int32, device=device)
    for i in range(0, len(tokens), chunk):
        out[i:i + chunk] = torch.from_numpy(np.asarray(tokens[i:i + chunk], dtype=np.int32)).to(device)
    return out


def load_tokens(path: str, vocab_size: int) -> np.memmap:
    """Open a uint16 .bin as a read-only memmap after checking its size and that every id is below vocab_size."""
    _check_file(path)
    size = os.path.getsize(path)
    if size == 0 or size % 2:
        text = _sidecar(path, current=False).get("text")  # a cache made by prepare, damaged since: make it again
        fix = (f"delete it and run again to tokenize {text} again" if text else "point train_data/val_data at a "
               "complete token file, or at the raw text to tokenize it")
        raise ValueError(f"{path} has {size} bytes, {'no' if size == 0 else 'not a whole number of'} uint16 "
                         f"tokens (truncated or not a token file); {fix}")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    max_id = _max_token_id(path, tokens)
    if max_id >= vocab_size:
        raise ValueError(f"{path} holds token id {max_id} but vocab_size is {vocab_size}; set vocab_size to the "
                         f"tokenizer's vocab (at least {max_id + 1}) or re-tokenize with the matching tokenizer")
    return tokens


def _max_token_id(path: str, tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    """Largest id in the file, read from the JSON sidecar when it matches the file's size and mtime."""
    meta = _sidecar(path)
    if type(meta.get("max_id")) is not int:  # no usable sidecar: compute it, with bounded memory
        meta["max_id"] = max(int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk))
        _write_sidecar(path, {**meta, "num_tokens": len(tokens)})
    return meta["max_id"]


def _stamp(path: str) -> dict[str, int]:
    """Size and mtime_ns of path: what the sidecar compares to tell one version of a file from another."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _sidecar(path: str, current: bool = True) -> dict:
    """What path + '.json' records about the .bin path; {} when it is missing or unreadable, or (current) when it
    was written for another version of the file."""
    try:
        with open(path + ".json") as f:
            meta = json.load(f)
        if isinstance(meta, dict) and (not current or {k: meta.get(k) for k in ("size", "mtime_ns")} == _stamp(path)):
            return meta
    except (OSError, ValueError):
        pass
    return {}


def _write_sidecar(path: str, meta: dict) -> None:
    """Write meta and path's _stamp to path + '.json', atomically; not at all where that cannot be written (a
    read-only data directory): the sidecar only saves work, the .bin's own checks have already run."""
    try:
        with bpe.atomic_write(path + ".json") as f:
            json.dump({**meta, **_stamp(path)}, f)
    except OSError:
        pass


def _check_file(path: str) -> None:
    """A one-line error naming train_data/val_data for a path that is missing or not a file."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; set train_data/val_data to a .txt, .txt.gz or .bin file")
    if not os.path.isfile(path):
        in_repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)  # configs name paths from there
        if not os.path.isabs(path) and os.path.isfile(in_repo):
            raise FileNotFoundError(f"{path} not found from here (it is {in_repo}); run from the repository "
                                    "or give train_data/val_data as absolute paths")
        raise FileNotFoundError(f"{path} not found; download it (README lists the commands) or set "
                                "train_data/val_data to existing .txt, .txt.gz or .bin files")


def _writable_dir(path: str, key: str) -> None:
    """Create the directory path if needed; refusal (a file in the way, no permission) is one line naming key."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OSError(f"{key}={path} cannot be created ({e.strerror}); choose a directory you can write") from None
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{key}={path} is not writable; choose a directory you can write")


def token_cache_path(text_path: str, tokenizer_dir: str) -> str:
    """Where prepare caches the tokens of text_path: tokenizer_dir/<name>-<8 hex digits of its full path>.bin.
    Example: data/val/text.txt.gz -> tokenizer_dir/text-<8 digits>.bin, and other digits for data/train/text.txt."""
    name = os.path.basename(text_path).removesuffix(".gz").removesuffix(".txt")
    digest = hashlib.sha256(os.path.realpath(text_path).encode()).hexdigest()[:8]  # realpath: one file, one cache
    return os.path.join(tokenizer_dir, f"{name}-{digest}.bin")


def prepare(text_path: str, tokenizer_dir: str, special_tokens: tuple[str, ...] = ("<|endoftext|>",),
            num_workers: int | None = None) -> str:
    """Tokenize text_path (.txt or .txt.gz) once into token_cache_path(text_path, tokenizer_dir); return that path.

    The .bin is reused while the text and the tokenizer files have the size and mtime_ns its sidecar recorded when
    it was made (a text replaced by an older one, as by cp -p or tar, is caught). bpe.encode_file writes to a
    temporary file and renames it, so an interrupted run never leaves a partial file under the final name.
    """
    _check_file(text_path)
    bin_path = token_cache_path(text_path, tokenizer_dir)
    sources = [_stamp(p) for p in (text_path, *(os.path.join(tokenizer_dir, n) for n in ("vocab.json", "merges.txt")))]
    if _sidecar(bin_path).get("sources") == sources:  # stamped before encoding: a change during it is seen next run
        return bin_path
    stale = " (replacing the partial .tmp of an interrupted run)" if os.path.exists(bin_path + ".tmp") else ""
    print(f"tokenizing {text_path} -> {bin_path}{stale}")
    _writable_dir(tokenizer_dir, "tokenizer_dir")
    n = bpe.encode_file(text_path, bin_path, tokenizer_dir, special_tokens=tuple(special_tokens),
                        num_workers=num_workers)
    if n == 0:  # an empty .bin would be refused later with advice (tokenize again) that gives it again
        os.remove(bin_path)
        raise ValueError(f"{text_path} holds no text; point train_data/val_data at a file with text in it")
    _write_sidecar(bin_path, {"text": os.path.abspath(text_path), "sources": sources})
    print(f"wrote {n:,} tokens to {bin_path}")
    return bin_path


def prepare_splits(paths: list[str], tokenizer_dir: str, vocab_size: int,
                   special_tokens: tuple[str, ...] = ("<|endoftext|>",)) -> list[str]:
    """Token files for paths (train first): a .bin is used as given; raw text is tokenized once (cached) with the
    tokenizer in tokenizer_dir, which is trained on paths[0] with vocab_size tokens when it does not exist yet."""
    for path in paths:
        _check_file(path)
    if all(p.endswith(".bin") for p in paths):
        return list(paths)
    if vocab_size > 65536:  # before hours of training a tokenizer whose ids could not be written
        raise ValueError(f"vocab_size={vocab_size:,} does not fit the uint16 token files; use at most 65,536")
    _writable_dir(tokenizer_dir, "tokenizer_dir")
    with open(os.path.join(tokenizer_dir, ".lock"), "w") as lock:  # runs started together prepare one at a time:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the second finds the first one's files instead of racing on its .tmp
        return _prepare_locked(paths, tokenizer_dir, vocab_size, special_tokens)


def _prepare_locked(paths: list[str], tokenizer_dir: str, vocab_size: int,
                    special_tokens: tuple[str, ...]) -> list[str]:
    missing = [f for f in ("vocab.json", "merges.txt") if not os.path.isfile(os.path.join(tokenizer_dir, f))]
    if missing == ["merges.txt"]:  # not what a cut save leaves (see bpe.Tokenizer.save): not ours to replace
        raise FileNotFoundError(f"tokenizer_dir={tokenizer_dir} holds vocab.json but no merges.txt; restore "
                                "merges.txt, or delete the directory to train a new tokenizer there")
    if missing:
        if paths[0].endswith(".bin"):
            raise FileNotFoundError(f"no tokenizer in {tokenizer_dir} to tokenize {paths[1]}; point tokenizer_dir "
                                    f"at the tokenizer that made {paths[0]}, or pass raw text for both")
        half = " (vocab.json is missing: an interrupted run)" if len(missing) == 1 else ""
        print(f"training a {vocab_size:,}-token BPE tokenizer on {paths[0]} -> {tokenizer_dir}{half}")
        bpe.train_tokenizer(paths[0], vocab_size, tokenizer_dir, tuple(special_tokens))
    tokenizer_vocab = bpe.load_tokenizer(tokenizer_dir, tuple(special_tokens)).vocab_size
    if tokenizer_vocab != vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {tokenizer_vocab:,} tokens but vocab_size is "
                         f"{vocab_size:,}; set vocab_size={tokenizer_vocab} or use a new tokenizer_dir")
    return [p if p.endswith(".bin") else prepare(p, tokenizer_dir, special_tokens) for p in paths]


def main(argv: list[str]) -> None:
    """python data.py CONFIG [--key=value ...]: the tokenizer and token files of a train.py configuration."""
    import train  # the same configuration as training; imported here, as train.py imports this module

    cfg = train.configure(train.DEFAULTS, argv)
    try:
        for path in prepare_splits([cfg["train_data"], cfg["val_data"]], cfg["tokenizer_dir"], cfg["vocab_size"],
                                   cfg["special_tokens"]):
            print(f"{path}: {len(load_tokens(path, cfg['vocab_size'])):,} tokens")
    except KeyboardInterrupt:
        raise KeyboardInterrupt("run the same command again: finished files are kept, the rest starts over") from None


if __name__ == "__main__":
    from configurator import run_cli

    run_cli(main)
