"""Checkpoints: one file per run, written atomically, loadable for any torch Module and Optimizer (the CS336 API).

    save_checkpoint(model, optimizer, iteration, "ckpt.pt")      # any nn.Module / optim.Optimizer
    iteration = load_checkpoint("ckpt.pt", model, optimizer)     # optimizer=None loads the weights alone

train.py adds what continues a run bit for bit (config, tokenizer, rng, loop, scaler); sample.py, export.py and
train.py's init_from find the tokenizer a checkpoint was trained with through checkpoint_tokenizer. torch.load runs
with weights_only=True: nothing in a file executes.
"""
import contextlib
import os
from typing import BinaryIO

import torch


def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
                    out: str | os.PathLike | BinaryIO, **extra) -> None:
    """Save model, optimizer and iteration (plus model_config for a TransformerLM, and extra: train.py adds config,
    tokenizer, rng, loop and scaler) to a path or a binary file object. A path is written as path.tmp, synced, then
    renamed over path, so a crash never leaves a partial file. Batches need no sampler state: see batch_seed."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper would prefix every name with _orig_mod.
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration, **extra}
    if hasattr(model, "config"):
        state["model_config"] = model.config
    if not isinstance(out, (str, os.PathLike)):
        torch.save(state, out)
        return
    tmp = f"{out}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:  # disk full, out_dir unwritable: the previous checkpoint stays intact
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = str(e).strip().splitlines()[0]
        raise OSError(f"could not write checkpoint {out} ({reason}); the previous checkpoint is unchanged") from None


def read_checkpoint(src: str | os.PathLike | BinaryIO) -> dict:
    """torch.load (weights only: nothing in the file is executed) with one clear error for a damaged file."""
    name = src if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "checkpoint file")
    if isinstance(src, (str, os.PathLike)) and not os.path.isfile(src):
        problem = ": it is a directory, not a checkpoint file" if os.path.isdir(src) else ""
        raise FileNotFoundError(f"no checkpoint at {src}{problem}; train first or fix the path")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and I/O errors all mean the same here: the file is damaged
        raise ValueError(f"{name} is not a readable checkpoint ({type(e).__name__}): truncated or corrupt") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{name} is not a checkpoint: it holds no 'model' state dict")
    return ckpt


def read_model_checkpoint(src: str, fix: str) -> dict:
    """read_checkpoint of a TransformerLM's checkpoint, which records the model_config to rebuild the model from
    (sample.py, export.py and train.py's init_from); a bare save_checkpoint of another module is refused, with fix."""
    ckpt = read_checkpoint(src)
    if "model_config" not in ckpt:
        raise ValueError(f"{src} is not a train.py TransformerLM checkpoint (no model_config); {fix}")
    return ckpt


def state_dict_mismatch(want: dict, got: dict, most: int = 3) -> str:
    """'' when got fits want key for key and shape for shape; else the first few missing, unexpected, misshapen."""
    def first(names: list[str]) -> str:
        return ", ".join(names[:most]) + (f" (+{len(names) - most} more)" if len(names) > most else "")

    missing, unexpected = [k for k in want if k not in got], [k for k in got if k not in want]
    shapes = [f"{k} {tuple(got[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
              if k in got and tuple(got[k].shape) != tuple(v.shape)]
    parts = [f"{what}: {first(names)}" for what, names in (("missing keys", missing), ("unexpected keys", unexpected),
                                                            ("shapes (checkpoint vs model)", shapes)) if names]
    return "; ".join(parts)


def load_checkpoint(src: str | os.PathLike | BinaryIO | dict, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None) -> int:
    """Restore model (and optimizer, if given) from a path, a file object or a read_checkpoint dict; return the step
    (0 when the checkpoint records none). Works for any Module and Optimizer (the CS336 API)."""
    ckpt = src if isinstance(src, dict) else read_checkpoint(src)
    model = getattr(model, "_orig_mod", model)
    problem = state_dict_mismatch(model.state_dict(), ckpt["model"])
    if problem:
        raise ValueError(f"checkpoint does not fit this model: {problem}")
    model.load_state_dict(ckpt["model"])
    if optimizer is not None:
        if "optimizer" not in ckpt:
            raise ValueError("checkpoint holds no optimizer state; load it with optimizer=None")
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            reason = str(e).strip().splitlines()[0]
            raise ValueError(f"checkpoint's optimizer does not fit this one: {reason}") from None
    return int(ckpt.get("iteration", 0))


def checkpoint_tokenizer(ckpt: dict, ckpt_path: str) -> tuple[str, tuple[str, ...]]:
    """(tokenizer directory, special tokens) of a train.py checkpoint, from any working directory.

    Tried in order: ckpt["tokenizer"]["dir"] (absolute), its "rel" (relative to the checkpoint's folder), then the
    tokenizer_dir string of older checkpoints, relative to where train.py ran: unknown, so from each folder above
    the checkpoint (out_dir usually lies below it), from here and from this repository. Old checkpoints without
    a tokenizer record take the special tokens from their config.
    """
    record, config = ckpt.get("tokenizer") or {}, ckpt.get("config") or {}
    specials = tuple(record.get("special_tokens", config.get("special_tokens", ("<|endoftext|>",))))
    given = ckpt.get("tokenizer_dir") or config.get("tokenizer_dir")
    folders = [os.path.dirname(os.path.abspath(ckpt_path))]  # the checkpoint's, then each one above it
    while os.path.dirname(folders[-1]) != folders[-1]:
        folders.append(os.path.dirname(folders[-1]))
    candidates = [record.get("dir"), record.get("rel") and os.path.join(folders[0], record["rel"])]
    if given:
        repo = os.path.dirname(os.path.abspath(__file__))
        candidates += [os.path.join(f, given) for f in folders] + [given, os.path.join(repo, given)]
    tried = list(dict.fromkeys(os.path.abspath(c) for c in candidates if c))
    for path in tried:
        if all(os.path.isfile(os.path.join(path, name)) for name in ("vocab.json", "merges.txt")):
            return path, specials
    raise FileNotFoundError(f"{ckpt_path}: its tokenizer (vocab.json + merges.txt) is in none of "
                            f"{', '.join(tried) or 'the places recorded (none)'}; copy the run's tokenizer_dir there")
