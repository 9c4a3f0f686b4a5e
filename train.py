"""Train a Transformer language model from scratch: tokenizer, data, model, AdamW, logs and exact resume.

    python train.py config/demo.py                          # CPU, no download: about two minutes
    python train.py config/tinystories.py --lr=3e-3         # one CUDA GPU; any key can be overridden
    python train.py config/tinystories.py --resume=True     # continue out_dir/ckpt.pt exactly where it stopped
    python train.py config/demo_finetune.py                 # fine-tune: start from a checkpoint's weights (init_from)
    torchrun --standalone --nproc_per_node=8 train.py config/owt.py    # data parallel on 8 GPUs
    python train.py --help                                  # every key, its default and what it does

Config files are Python run with the defaults below in scope (they can run any code: use only your own);
inside one, include('tinystories.py') first runs another file from the same folder.
Writes out_dir/ckpt.pt (at every eval and at the end), out_dir/log.csv, out_dir/config.json and out_dir/run.json,
and nothing there before every input (config, data, tokenizer, checkpoint, first step) has been checked.
"""
import contextlib
import csv
import dataclasses
import datetime
import json
import math
import os
import signal
import subprocess
import textwrap
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

import bpe
import data
from bpe import atomic_write, hms
from checkpoint import checkpoint_tokenizer, load_checkpoint, read_checkpoint, read_model_checkpoint, save_checkpoint
from configurator import check_known, configure, overrides, run_cli, silence_stdout, typed
from model import KERNEL_OPS, MODEL_KEYS, TransformerLM, accounting, format_preflight, model_config
from optim import AdamW, clip_grad_norm, cosine_lr

_names_before_config = set(globals())
# --- output ---
out_dir = "out/tinystories"  # ckpt.pt, log.csv, config.json and run.json go here
# --- data and tokenizer ---
train_data = "data/TinyStoriesV2-GPT4-train.txt"  # raw .txt/.txt.gz (tokenized once, cached) or a prepared uint16 .bin
val_data = "data/TinyStoriesV2-GPT4-valid.txt"  # the same for validation
tokenizer_dir = "data/ts10k"  # vocab.json + merges.txt (trained from train_data when missing) and cached .bin files
vocab_size = 10000  # tokenizer and embedding size
special_tokens = ("<|endoftext|>",)  # strings the tokenizer keeps whole; the first separates documents
init_from = ""  # start from these weights with a fresh optimizer and schedule: '' | PATH/ckpt.pt | hf:DIR (Llama/Qwen3)
# --- model (model.py) ---
context_length = 256  # tokens per training sequence
d_model = 512  # width of the residual stream
num_layers = 4  # Transformer blocks
num_heads = 16  # attention heads; must divide d_model
d_ff = None  # FFN hidden size; None = the multiple of 64 nearest 8/3 d_model (swiglu) or 4 d_model (silu)
rope_theta = 10000.0  # RoPE base period
norm = "pre"  # RMSNorm placement: 'pre' | 'post' | 'none'
pos = "rope"  # position information: 'rope' | 'none' (NoPE)
ffn = "swiglu"  # feed-forward: 'swiglu' | 'silu' (ungated)
qk_norm = False  # RMSNorm on queries and keys per head
n_kv_heads = None  # key/value heads for grouped-query attention; None = num_heads, 1 = multi-query
logit_softcap = 0.0  # logits -> C tanh(logits / C); 0 = off
tie_embeddings = False  # lm_head shares the token-embedding matrix
block = "serial"  # 'serial' | 'parallel' (attention and FFN read the same input)
norm_eps = 1e-5  # epsilon of every RMSNorm
# --- loss, optimizer, schedule ---
z_loss = 0.0  # weight of mean(logsumexp(logits)^2) in the loss; train_loss in the CSV stays plain cross-entropy
lr = 2e-3  # peak learning rate
min_lr = None  # learning rate at the end of the cosine decay; None = lr x min_lr_ratio
min_lr_ratio = 0.1  # min_lr as a fraction of lr, when min_lr is None
warmup_iters = 150  # steps of linear warm-up from 0 to lr
cosine_iters = None  # step at which the cosine decay reaches min_lr; None = max_iters
betas = (0.9, 0.95)  # AdamW decay rates of the first and second moments
eps = 1e-8  # AdamW denominator epsilon
weight_decay = 0.1  # decoupled weight decay on matrices (norm gains are not decayed)
grad_clip = 1.0  # clip the global gradient L2 norm to this; 0 = off
batch_size = 128  # sequences per micro-batch on each process
grad_accum_steps = 1  # micro-batches per optimizer step: tokens/step = batch_size x context_length x this x ranks
max_iters = 10000  # optimizer steps
# --- evaluation, logging, stopping ---
eval_interval = 500  # steps between validations (each also saves ckpt.pt)
eval_tokens = 2**21  # validation tokens: fixed non-overlapping windows spread over val_data; 0 = the whole file
log_interval = 10  # steps between console lines and CSV rows (the step's statistics are read from the GPU there)
target_val_loss = None  # stop once the validation loss is at or below this; None = off
diverge_factor = 3.0  # stop when, after warm-up, loss > this x min(first loss, loss at end of warm-up); 0 = off
# --- system ---
device = "auto"  # 'auto' (cuda, then mps, then cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"  # 'auto' (CUDA: bfloat16 if supported, else float16; else float32) | 'float32' | 'bfloat16' | 'float16'
compile = "auto"  # torch.compile the loss: 'auto' = on CUDA, eager if compiling fails | True | False
kernels = "auto"  # kernels.py's fused ops: 'auto' = on CUDA, each op checked against its reference first | True | False
seed = 1337  # model initialisation and training data stream
resume = False  # continue from out_dir/ckpt.pt (same out_dir, same model flags)
DEFAULTS = {k: v for k, v in globals().items() if k not in _names_before_config and not k.startswith("_")}

CSV_COLUMNS = ("step", "tokens", "elapsed_s", "lr", "train_loss", "val_loss", "val_ppl", "val_bpb", "grad_norm",
               "tokens_per_s", "mfu", "z_loss", "skipped", "status")
EMA_BETA = 0.9  # smoothing of the logged training loss (debiased, as in nanochat)
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "T4": 65e12, "V100": 125e12}  # dense 16-bit FLOP/s by GPU name
RUN_STATE = ("model_config", "config", "loop", "rng")  # what --resume needs beyond the bare save_checkpoint fields


def check_config(cfg: dict) -> dict:
    """Complete cfg from DEFAULTS, check types and the values this script needs (model.py checks the model's), and
    resolve the derived values: min_lr (None = lr x min_lr_ratio), cosine_iters (None = max_iters)."""
    for key in cfg:
        check_known(key, DEFAULTS)
    cfg = {k: typed(k, cfg.get(k, v), v) for k, v in DEFAULTS.items()}
    for key in ("compile", "kernels"):  # 'auto', True or False (also spelt true/false on a command line)
        cfg[key] = {"true": True, "false": False}.get(str(cfg[key]).lower(), cfg[key])
    if cfg["min_lr"] is None:
        cfg["min_lr"] = cfg["lr"] * cfg["min_lr_ratio"]
    run_length = cfg["cosine_iters"] is None  # then the decay ends with the run
    if run_length:
        cfg["cosine_iters"] = cfg["max_iters"]
    number = lambda key: isinstance(cfg[key], (int, float)) and not isinstance(cfg[key], bool)
    positive = ("batch_size", "grad_accum_steps", "eval_interval", "log_interval", "eps")
    checks = {k: (cfg[k] > 0, "> 0") for k in positive}
    checks |= {k: (cfg[k] >= 0, ">= 0") for k in ("max_iters", "warmup_iters", "lr", "weight_decay", "grad_clip",
                                                  "z_loss", "seed", "eval_tokens")}
    warmed_up = isinstance(cfg["cosine_iters"], int) and (cfg["cosine_iters"] >= cfg["warmup_iters"]
                                                          or cfg["max_iters"] == 0)
    checks |= {"min_lr_ratio": (0 <= cfg["min_lr_ratio"] <= 1, "a fraction in [0, 1]"),
               "min_lr": (number("min_lr") and 0 <= cfg["min_lr"] <= cfg["lr"], "a value between 0 and lr, or None "
                          "(lr x min_lr_ratio)"),
               "max_iters" if run_length else "cosine_iters": (
                   warmed_up, f"a step at or after warmup_iters={cfg['warmup_iters']} (the decay cannot start before "
                   "the warm-up ends)" + ("" if run_length else ", or None (max_iters)") + "; or lower warmup_iters"),
               "betas": (len(cfg["betas"]) == 2 and all(0 <= b < 1 for b in cfg["betas"]), "two numbers in [0, 1)"),
               "diverge_factor": (cfg["diverge_factor"] == 0 or cfg["diverge_factor"] > 1, "0 (off) or > 1"),
               "target_val_loss": (cfg["target_val_loss"] is None or number("target_val_loss"), "a number, or None"),
               "compile": (cfg["compile"] in ("auto", True, False), "'auto', True or False"),
               "kernels": (cfg["kernels"] in ("auto", True, False), "'auto', True or False"),
               "vocab_size": (cfg["vocab_size"] <= 65536, "at most 65,536 (token files hold uint16 ids)"),
               "dtype": (cfg["dtype"] in ("auto", "float32", "bfloat16", "float16"),
                         "'auto', 'float32', 'bfloat16' or 'float16'"),
               "init_from": (not (cfg["init_from"] and cfg["resume"]), "'' with resume=True (resume continues "
                             "out_dir/ckpt.pt; init_from starts a new run from other weights)"),
               "out_dir": (cfg["out_dir"].strip() != "", "a directory for the run's files, e.g. out/mine")}
    for key, (ok, allowed) in checks.items():
        if not ok:
            raise ValueError(f"{key}={cfg[key]!r} is not allowed; use {allowed}")
    return cfg


# --- Where a run starts: random weights, out_dir/ckpt.pt (resume) or other weights (init_from) ---------------------

def model_flags(cfg: dict, given: set, source: dict | None, name: str) -> dict:
    """The model keys to build: cfg's own, or, starting from other weights, the source's. A key this run set (is in
    given) to a value other than the source's is refused, except a shorter context_length (RoPE and the causal mask
    only need positions the source has seen)."""
    if source is None:
        return {k: cfg[k] for k in MODEL_KEYS}
    flags, conflicts = model_config(**source), []  # a source written before a key existed has its default
    mine = model_config(**flags | {k: cfg[k] for k in MODEL_KEYS if k in given})  # None resolved: n_kv_heads, d_ff
    for key in MODEL_KEYS:
        if mine[key] == flags[key]:
            continue
        if key == "context_length" and mine[key] < flags[key]:
            flags[key] = mine[key]
        else:
            conflicts.append(f"{key} (source {flags[key]!r}, this run {mine[key]!r})")
    if conflicts:
        raise ValueError(f"init_from={name}: the model flags come from the weights; {', '.join(conflicts)} differ: "
                         "drop them from the config or use the source's values")
    return flags


def read_source(cfg: dict) -> tuple[dict | None, str]:
    """The weights and flags to start from: {model_config, state_dict, tokenizer or None, iteration}, and a name for
    messages; (None, '') for a random start or a resume."""
    path = cfg["init_from"]
    if not path:
        return None, ""
    if path.startswith("hf:"):
        import hf  # only fine-tuning an imported model needs it
        return {**hf.read_pretrained(path[3:]), "iteration": 0}, path  # model_config, state_dict, tokenizer
    if os.path.abspath(path) == os.path.abspath(os.path.join(cfg["out_dir"], "ckpt.pt")):
        raise ValueError(f"init_from={path} is this run's own out_dir/ckpt.pt, which the new run would replace at "
                         "step 0; pick another out_dir")
    try:
        ckpt = read_model_checkpoint(path, "start from a train.py run's ckpt.pt, or hf:DIR")
    except (ValueError, OSError) as e:
        raise ValueError(f"init_from={path}: {e}") from None
    try:
        tokenizer_dir = checkpoint_tokenizer(ckpt, path)[0]
    except FileNotFoundError as e:
        tokenizer_dir = str(e)  # for the message, should tokenizer_dir hold none
    return {"model_config": ckpt["model_config"], "state_dict": ckpt["model"], "tokenizer": None,
            "iteration": int(ckpt.get("iteration", 0)), "tokenizer_dir": tokenizer_dir}, path


def check_resume(ckpt: dict, cfg: dict, flags: dict, path: str) -> None:
    """Resuming must find train.py's run state and must not change what is being trained: model flags and z_loss."""
    lacking = [k for k in RUN_STATE if k not in ckpt]
    if lacking:
        fix = (f"start a new run from its weights with --init_from={path} and --resume=False" if "model_config" in ckpt
               else "it is not a TransformerLM's (no model_config); use a new out_dir")
        raise ValueError(f"cannot resume {path}: it lacks {', '.join(lacking)} (not written by train.py's loop); {fix}")
    old = {**model_config(**ckpt["model_config"]), "z_loss": ckpt["config"].get("z_loss", 0.0)}
    new = {**flags, "z_loss": cfg["z_loss"]}
    differ = [f"{k} (checkpoint {old.get(k)!r}, now {v!r})" for k, v in new.items() if old.get(k) != v]
    if differ:
        raise ValueError(f"cannot resume {path} with different flags: {', '.join(differ)}; "
                         "use the checkpoint's values or a new out_dir")
    if cfg["max_iters"] < ckpt["iteration"]:
        raise ValueError(f"max_iters={cfg['max_iters']} is before the step of {path} ({ckpt['iteration']}); "
                         "resume with a larger max_iters")


def check_tokenizer_source(cfg: dict, source: dict | None, name: str) -> bpe.Tokenizer | None:
    """Starting from other weights, tokenizer_dir must hold their tokenizer to tokenize raw text (an imported one is
    written there when the directory has none: returned for writing once every check has passed)."""
    if source is None or all(cfg[key].endswith(".bin") for key in ("train_data", "val_data")):
        return None
    have = os.path.isfile(os.path.join(cfg["tokenizer_dir"], "vocab.json"))
    imported = source["tokenizer"]
    if "tokenizer_dir" in source:  # a train.py checkpoint: its tokenizer directory is recorded
        if not have:
            raise ValueError(f"init_from={name}: tokenizer_dir={cfg['tokenizer_dir']!r} holds no tokenizer; set it "
                             f"to the one these weights were trained with ({source['tokenizer_dir']})")
        if os.path.isdir(source["tokenizer_dir"]) and not same_files(source["tokenizer_dir"], cfg["tokenizer_dir"]):
            raise ValueError(f"init_from={name}: tokenizer_dir={cfg['tokenizer_dir']!r} holds another tokenizer than "
                             f"the one these weights were trained with ({source['tokenizer_dir']}); use that one")
        return None
    if imported is None or type(imported) is not bpe.Tokenizer:  # bpe.encode_file tokenizes with a plain Tokenizer
        why = "has no tokenizer.json" if imported is None else "has a tokenizer that splits digits off first"
        raise ValueError(f"init_from={name} {why}, which bpe.py cannot tokenize raw text with; pass train_data and "
                         "val_data as .bin files of its token ids")
    if not have:
        return imported
    mine = bpe.load_tokenizer(cfg["tokenizer_dir"], cfg["special_tokens"])
    if (mine.vocab, mine.merges) != (imported.vocab, imported.merges):
        raise ValueError(f"init_from={name}: tokenizer_dir={cfg['tokenizer_dir']!r} holds another tokenizer; "
                         "point it at a new directory (the imported tokenizer is written there)")
    return None


def same_files(dir_a: str, dir_b: str, names: tuple[str, ...] = ("vocab.json", "merges.txt")) -> bool:
    """Whether two tokenizer directories hold byte-identical vocab.json and merges.txt."""
    def read(directory: str, name: str) -> bytes:
        with open(os.path.join(directory, name), "rb") as f:
            return f.read()
    return all(read(dir_a, n) == read(dir_b, n) for n in names)


# --- System: device, precision, data parallelism, logging ------------------------------------------------------------

def pick_device(name: str, local_rank: int) -> torch.device:
    """'auto' takes cuda, then mps, then cpu; 'cuda' means this process's GPU (one per torchrun process)."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        name = next(kind for kind in ("cuda", "mps", "cpu") if available[kind])
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        dev = torch.device(name)
    except RuntimeError:  # not a device string at all
        dev = torch.device("meta")
    if not available.get(dev.type, False):
        raise ValueError(f"device={name!r} is not available here; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return dev


def pick_dtype(name: str, dev: torch.device) -> tuple[torch.dtype, str]:
    """Compute dtype and the reason for it. 16-bit means autocast: weights, grads and AdamW state stay float32."""
    if name == "auto":
        if dev.type != "cuda":
            return torch.float32, f"auto: no 16-bit autocast default on {dev.type}"
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this CUDA GPU supports bfloat16"
        return torch.float16, "auto: no bfloat16 on this GPU, float16 with loss scaling"
    if name == "float16" and dev.type != "cuda":
        raise ValueError(f"dtype='float16' needs a CUDA GPU (loss-scaled autocast); use 'bfloat16' or 'float32' on "
                         f"{dev.type}")
    return getattr(torch, name), "set by dtype"


def batch_seed(seed: int, rank: int, step: int) -> int:
    """Seed for the batch `rank` draws at `step`. The data stream is a function of (seed, rank, step), so a resumed run
    needs no sampler state and redraws exactly; resumed on more ranks, ranks 0..n-1 keep their streams. torch's CPU
    generator keeps only a seed's low 32 bits, so the three are hashed into 32 bits (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence((seed, rank, step)).generate_state(1)[0])


def setup_distributed(device_name: str) -> tuple[int, int, int, object]:
    """(rank, local_rank, world_size, preparation group) from torchrun's environment after joining the process group;
    (0, 0, 1, None) alone. Data preparation (hours for OpenWebText) waits on its own gloo group with a day-long
    timeout, so the training collectives keep NCCL's default one."""
    if "RANK" not in os.environ:
        return 0, 0, 1, None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device_name not in ("cpu", "mps") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return rank, local_rank, world, dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))


def prepare_data(cfg: dict, rank: int, world: int, group, vocab_size: int) -> list[str]:
    """Token files for train_data and val_data, with a tokenizer of vocab_size tokens: rank 0 trains the tokenizer and
    tokenizes first; the other ranks wait, then find them cached. A failure on rank 0 reaches every rank as the same
    one-line error."""
    error = None
    if rank == 0:
        try:
            data.prepare_splits([cfg["train_data"], cfg["val_data"]], cfg["tokenizer_dir"], vocab_size,
                                cfg["special_tokens"])
        except (ValueError, OSError) as e:
            error = str(e)
    if world > 1:
        message = [error]
        dist.broadcast_object_list(message, src=0, group=group)
        error = message[0]
    if error is not None:
        raise ValueError(error)
    return data.prepare_splits([cfg["train_data"], cfg["val_data"]], cfg["tokenizer_dir"], vocab_size,
                               cfg["special_tokens"])


def all_reduce_gradients(model: torch.nn.Module, stats: torch.Tensor, world: int) -> torch.Tensor:
    """Average every gradient, and a few per-rank scalars in stats, over ranks with one all_reduce of a flat buffer."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [stats.to(grads[0])])  # (n_params + len(stats),)
    dist.all_reduce(flat)
    flat /= world
    *chunks, stats = flat.split([g.numel() for g in grads] + [len(stats)])
    for g, chunk in zip(grads, chunks):
        g.copy_(chunk.view_as(g))
    return stats


def peak_flops(dev: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s for MFU from PEAK_FLOPS; 0 (MFU reported as 0) for CPUs and unknown devices."""
    if dev.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(dev)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)
    return peak if dtype in (torch.bfloat16, torch.float16) else peak / 2


def git_commit() -> str:
    try:
        run = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                           cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        return f"{commit}{' (dirty)' if run('status', '--porcelain') else ''}" if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def kept_rows(path: str, keep_until: int) -> list[dict]:
    """A resumed run's log.csv rows up to the checkpoint's step (later ones replay); read before anything is written."""
    if not os.path.isfile(path):
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:  # a row cut short by a crash has no status field: dropped
            return [r for r in csv.DictReader(f) if r.get("status") is not None and int(r["step"]) <= keep_until]
    except (UnicodeDecodeError, csv.Error, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"resume=True: {path} is not a readable train.py log ({type(e).__name__}); move it away to "
                         "resume without its earlier rows") from None


def console(*args, **kwargs) -> None:
    """print, where a closed stdout (`python train.py | head`) silences the console instead of stopping the run."""
    try:
        print(*args, **kwargs, flush=True)
    except BrokenPipeError:
        silence_stdout()  # the run goes on; its console lines go nowhere


def start_log(path: str, rows: list[dict]) -> None:
    """Write log.csv's header and the rows a resumed run keeps."""
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def write_row(path: str, **row) -> None:
    """Append one row to log.csv; absent fields stay empty."""
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow("" if row.get(k) is None else row[k] for k in CSV_COLUMNS)


def memory_report(model: TransformerLM, batch_size: int, dtype: torch.dtype, dev: torch.device) -> str:
    """model.py's training-memory estimate beside the peak the allocator actually saw."""
    est = model.memory_estimate(batch_size, dtype != torch.float32)
    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in est.items() if k != "total")
    used = (f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)"
            if dev.type == "cuda" else f"n/a on {dev.type}")
    return f"memory: estimate {est['total'] / 2**30:.2f} GiB ({parts}) | measured peak {used}"


@contextlib.contextmanager
def stop_on_signal():
    """While training, Ctrl-C, SIGTERM and SIGHUP (the terminal or ssh session closed) only set a flag: the loop
    finishes its step (or evaluation batch), saves and exits cleanly."""
    requested = []

    def handler(signum, frame):
        if requested:  # a second Ctrl-C quits at once, without saving
            raise KeyboardInterrupt
        requested.append(signum)
        try:
            print("stopping at the next log line to save a checkpoint (Ctrl-C again to quit without saving)")
        except OSError:  # SIGHUP: the terminal may be gone; save all the same
            pass

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --- Evaluation: a validation set fixed by the data alone ------------------------------------------------------------

def token_byte_lengths(cfg: dict, dev: torch.device) -> torch.Tensor | None:
    """(vocab,) UTF-8 bytes of each token (a special token counts its string's bytes), for bits per byte; None when
    tokenizer_dir holds no tokenizer (data given as .bin)."""
    if not os.path.isfile(os.path.join(cfg["tokenizer_dir"], "vocab.json")):
        return None
    vocab = bpe.load_tokenizer(cfg["tokenizer_dir"], cfg["special_tokens"]).vocab
    lengths = torch.zeros(cfg["vocab_size"], dtype=torch.int64)
    for i, token in vocab.items():
        if i < len(lengths):
            lengths[i] = len(token)
    return lengths.to(dev)


@torch.no_grad()
def evaluate(model: TransformerLM, tokens, starts: np.ndarray, token_bytes: torch.Tensor | None, cfg: dict,
             dev: torch.device, autocast, rank: int, world: int, stop: list) -> tuple[float, float | None, bool]:
    """(val_loss, val_bpb, interrupted): mean cross-entropy per token and bits per UTF-8 byte of the targets over the
    fixed windows at starts, split over ranks and summed with one all_reduce. Ctrl-C stops it after a batch."""
    mine = torch.from_numpy(starts[rank::world])
    acc = torch.float32 if dev.type == "mps" else torch.float64
    nll = torch.zeros((), dtype=acc, device=dev)  # summed over target tokens
    n_bytes = torch.zeros((), dtype=acc, device=dev)
    for i in range(0, len(mine), cfg["batch_size"]):
        if stop:
            break
        x, y = data.windows(tokens, mine[i:i + cfg["batch_size"]], cfg["context_length"], dev)
        with autocast:
            ce = model.loss(x, y)[0]
        nll += ce.to(acc) * y.numel()
        if token_bytes is not None:
            n_bytes += token_bytes[y].sum()
    totals = torch.stack([nll, n_bytes, torch.tensor(float(bool(stop)), dtype=acc, device=dev)])
    if world > 1:
        dist.all_reduce(totals)
    nll, n_bytes, stopped = totals.tolist()
    bpb = nll / math.log(2) / n_bytes if n_bytes else None
    return nll / (len(starts) * cfg["context_length"]), bpb, stopped > 0


# --- The training step, shared with bench.py ------------------------------------------------------------------------

class LossScaler:
    """Dynamic loss scaling for float16 autocast (Micikevicius et al. 2018): the loss is multiplied by `scale` before
    backward so small gradients do not flush to zero in float16; a step whose gradients overflow is skipped and the
    scale halved; after `interval` good steps in a row it doubles. Disabled (scale 1, never skips) for other dtypes."""

    def __init__(self, enabled: bool, scale: float = 2.0**16, interval: int = 2000):
        self.enabled, self.scale, self.good_steps, self.interval = enabled, scale if enabled else 1.0, 0, interval

    def skip(self, grad_norm: torch.Tensor) -> bool:
        """Whether to skip this step (gradients overflowed), updating the scale; a host sync, float16 only."""
        if not self.enabled:
            return False
        overflow = not torch.isfinite(grad_norm).item()
        self.good_steps = 0 if overflow else self.good_steps + 1
        if overflow:
            self.scale /= 2
        elif self.good_steps % self.interval == 0:
            self.scale *= 2
        return overflow

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = state["scale"], state["good_steps"]


def check_fits(cfg: dict, flags: dict, dev: torch.device) -> None:
    """Weights, gradients, AdamW's moments (model.py's exact count) and the step's int64 batch fit the device's
    memory: a d_model or grad_accum_steps typed with extra zeros is one line, not an allocator traceback or the
    kernel's OOM killer."""
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
    elif dev.type == "cpu" and hasattr(os, "sysconf"):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    memory = accounting(flags)["memory"]["fp32"]
    batch = 2 * 8 * cfg["batch_size"] * cfg["grad_accum_steps"] * (flags["context_length"] + 1)  # x and y, int64
    state = memory["params"] + memory["grads"] + memory["adam"]
    if state + batch > total:
        raise MemoryError(f"the model's weights, gradients and AdamW state ({state / 2**30:,.1f} GiB, "
                          f"model.py) and a step's batch ({batch / 2**30:,.1f} GiB) are more than the {dev.type}'s "
                          f"{total / 2**30:,.0f} GiB; lower d_model, num_layers, batch_size or grad_accum_steps")


def build(cfg: dict, flags: dict, dev: torch.device) -> tuple[TransformerLM, AdamW]:
    """The model (from `seed`) and AdamW: matrices decay, norm gains do not; multi-tensor updates on CUDA."""
    torch.manual_seed(cfg["seed"])
    model = TransformerLM(**flags, device=dev)
    gains = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2]}, {"params": gains, "weight_decay": 0.0}]
    optimizer = AdamW(groups[:2 if gains else 1], lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"],
                      weight_decay=cfg["weight_decay"], foreach=dev.type == "cuda")
    return model, optimizer


def step_batch(tokens, cfg: dict, rank: int, step: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The grad_accum_steps x batch_size sequences this rank trains on at `step`, drawn from batch_seed: with
    accumulation the micro-batches are exactly the rows of the one big batch."""
    generator = torch.Generator().manual_seed(batch_seed(cfg["seed"], rank, step))
    return data.get_batch(tokens, cfg["batch_size"] * cfg["grad_accum_steps"], cfg["context_length"], dev, generator)


def train_step(model: TransformerLM, loss_fn: Callable, optimizer: AdamW, x: torch.Tensor, y: torch.Tensor, lr: float,
               cfg: dict, autocast, scaler: LossScaler, world: int, stop: bool = False) -> torch.Tensor:
    """One optimizer step on x, y: (grad_accum_steps x batch_size, context), gradients averaged over micro-batches
    and ranks (one all_reduce). Returns (ce, z, stop, grad_norm, skipped) on the device, means over micro-batches and
    ranks; no host sync (float16's overflow check excepted), so the GPU never waits for Python."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    accum, weight = cfg["grad_accum_steps"], cfg["z_loss"]
    sums = torch.zeros(2, device=x.device)  # (ce, z) summed over micro-batches
    for xb, yb in zip(x.chunk(accum), y.chunk(accum)):
        with autocast:
            ce, z = loss_fn(xb, yb)
        ((ce + weight * z if weight else ce) * (scaler.scale / accum)).backward()
        sums += torch.stack([ce.detach().float(), z.detach().float()])
    stats = torch.cat([sums / accum, torch.full((1,), float(stop), device=x.device)])
    if world > 1:
        stats = all_reduce_gradients(model, stats, world)  # every rank now holds the same mean loss and flag
    if scaler.enabled:
        torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], 1 / scaler.scale)
    norm = clip_grad_norm(model.parameters(), cfg["grad_clip"] or math.inf)
    skipped = scaler.skip(norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.cat([stats, norm.view(1).to(stats), torch.full((1,), float(skipped), device=stats.device)])


def fast_path(model: TransformerLM, cfg: dict, dev: torch.device, dtype: torch.dtype, say: Callable) -> Callable:
    """Switch on kernels.py's ops (kernels='auto': each checked against its reference at the run's shapes first) and
    return the loss function, compiled for compile=True or 'auto' on CUDA (compilation happens at the first step)."""
    on_cuda = dev.type == "cuda"
    if cfg["kernels"] is True:
        model.use_kernels()  # forced: without Triton each op runs its torch reference
        say(f"kernels: on {', '.join(KERNEL_OPS)} (kernels=True)")
    elif cfg["kernels"] == "auto" and on_cuda:
        report = model.kernel_preflight(batch_size=2, dtype=dtype)
        model.use_kernels(tuple(op for op, reason in report.items() if reason is None))
        say(format_preflight(report))
    if cfg["compile"] is True or (cfg["compile"] == "auto" and on_cuda):
        return torch.compile(model.loss, dynamic=False)  # `model` stays raw for evaluation, sampling and saving
    return model.loss


def first_step(model: TransformerLM, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, cfg: dict,
               dtype: torch.dtype, say: Callable) -> tuple[Callable, float]:
    """Forward and backward once on the first batch (gradients dropped): compiles, and catches a failing compile or
    kernel (one line, then the eager or reference path) and an out-of-memory batch (one line, exit 2), all before
    anything is written. Returns the loss function that worked and the seconds it took."""
    attempts = [(loss_fn, "")]
    if loss_fn != model.loss:
        attempts.append((model.loss, "compile failed"))
    if any(getattr(m, "fast", False) for m in model.modules()):
        attempts.append((model.loss, "kernels failed"))
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)
    for i, (fn, why) in enumerate(attempts):
        if why == "kernels failed":
            model.use_kernels(())
        t0 = time.perf_counter()
        try:
            with autocast:
                ce, _ = fn(x[:cfg["batch_size"]], y[:cfg["batch_size"]])
            ce.backward()
            seconds = time.perf_counter() - t0
            break
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError in newer torch: the same class
            raise MemoryError(out_of_memory_message(model, cfg, x.device, dtype)) from None
        except Exception as e:
            if i == len(attempts) - 1:
                raise
            reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
            next_why = attempts[i + 1][1]
            say(f"{'compile' if next_why == 'compile failed' else 'kernels'}: failed ({reason}); continuing with "
                f"{'eager ops' if next_why == 'compile failed' else 'the reference ops'}")
        finally:
            model.zero_grad(set_to_none=True)
    return fn, seconds


def out_of_memory_message(model: TransformerLM, cfg: dict, dev: torch.device, dtype: torch.dtype) -> str:
    est = model.memory_estimate(cfg["batch_size"], dtype != torch.float32)["total"] / 2**30
    have = f"; the GPU has {torch.cuda.get_device_properties(dev).total_memory / 2**30:.1f} GiB" if dev.type == "cuda" \
        else ""
    return (f"the first step with batch_size={cfg['batch_size']} needs more (model.py estimates {est:.1f} GiB"
            f"{have}): lower batch_size and raise grad_accum_steps to keep the tokens per step")


# --- The training run ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Loop:
    """The run's state from step to step, saved in ckpt.pt as `loop`, so a resume continues it exactly."""
    elapsed: float = 0.0  # training seconds (evaluation and saving excluded)
    tokens: int = 0  # training tokens seen, all ranks
    ema: float = 0.0  # smoothed training loss, not yet debiased
    first_loss: float | None = None
    ref_loss: float | None = None  # divergence is judged against this: min(first loss, loss at end of warm-up)
    skipped: int = 0  # float16 steps skipped because their gradients overflowed
    last: dict = dataclasses.field(default_factory=dict)  # the latest step's lr, train_loss, grad_norm, z_loss


def read_stats(loop: Loop, pending: list, cfg: dict) -> tuple[str | None, int, bool]:
    """Fold the steps since the last log line into loop (one host sync for all of them): the smoothed loss, the
    divergence reference and check, the stop flag. pending holds (step, lr, stats) per step. Returns (divergence
    message or None, steps folded before it, stop requested on any rank)."""
    if not pending:
        return None, 0, False
    rows = torch.stack([stats for _, _, stats in pending]).tolist()  # the one host sync
    stop = False
    for n, ((step, lr, _), (loss, z, stop_flag, grad_norm, skipped)) in enumerate(zip(pending, rows)):
        factor, ref = cfg["diverge_factor"], loop.ref_loss
        too_big = bool(factor) and ref is not None and loss > factor * ref
        if too_big or not math.isfinite(loss) or not (skipped or math.isfinite(grad_norm)):
            loop.last = dict(lr=lr, train_loss=loss, grad_norm=grad_norm, z_loss=z)
            return (f"loss {loss:.4g}, grad norm {grad_norm:.4g}" +
                    (f" (> {factor} x reference loss {ref:.4f})" if too_big else "")), n, stop
        loop.skipped += int(skipped)
        loop.ema = EMA_BETA * loop.ema + (1 - EMA_BETA) * loss
        if loop.first_loss is None:
            loop.first_loss = loss
        debiased = loop.ema / (1 - EMA_BETA ** (step + 1))
        if loop.ref_loss is None and step + 1 >= cfg["warmup_iters"]:
            loop.ref_loss = min(loop.first_loss, debiased)
        loop.last = dict(lr=lr, train_loss=debiased, grad_norm=grad_norm, z_loss=z)
        stop = stop or stop_flag > 0
    return None, len(rows), stop


def lr_at(step: int, cfg: dict) -> float:
    return cosine_lr(step, cfg["lr"], cfg["min_lr"], cfg["warmup_iters"], cfg["cosine_iters"])


def check_lengths(cfg: dict, bins: list[str], tokens: list) -> np.ndarray:
    """Both token files hold at least one window, and the validation windows (returned as starts) are fixed."""
    for key, path, t in zip(("train_data", "val_data"), bins, tokens):
        data.check_length(path, t, cfg["context_length"], key)
    return data.eval_starts(len(tokens[1]), cfg["context_length"], cfg["eval_tokens"])


@dataclasses.dataclass
class Run:
    """Everything one training run holds: its settings, data, model and optimizer, and the state of its loop."""
    cfg: dict
    rank: int
    world: int
    dev: torch.device
    dtype: torch.dtype
    say: Callable
    train_tokens: object  # np.memmap, or a tensor on the GPU
    val_tokens: object
    val_starts: np.ndarray  # the fixed validation windows
    token_bytes: torch.Tensor | None  # bytes per token id, for bits per byte
    model: TransformerLM
    optimizer: AdamW
    loss_fn: Callable
    scaler: LossScaler
    source: dict | None  # the weights init_from started from
    ckpt: dict | None  # the checkpoint a resume continues
    step: int = 0
    start_step: int = 0  # where this process started: 0, or the checkpoint's step
    loop: Loop = dataclasses.field(default_factory=Loop)
    status: str = "done"  # 'done' | 'target' | 'diverged' | 'interrupted'
    val_loss: float | None = None
    val_bpb: float | None = None
    saved_step: int | None = None  # the step ckpt.pt holds
    pending: list = dataclasses.field(default_factory=list)  # (step, lr, stats on the device) not yet read back
    window: tuple = (0.0, 0)  # (training seconds, step) at the last console line
    clock: float = 0.0  # when the training clock last started

    @property
    def autocast(self):
        return torch.autocast(self.dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg["batch_size"] * self.cfg["grad_accum_steps"] * self.cfg["context_length"] * self.world

    def path(self, name: str) -> str:
        return os.path.join(self.cfg["out_dir"], name)


def start(cfg: dict, given: set) -> Run:
    """Check every input (config, starting point, tokenizer, data, the first step) before anything in out_dir is
    written, build the run, then write config.json, run.json and log.csv's header."""
    rank, local_rank, world, prep_group = setup_distributed(cfg["device"])
    say = console if rank == 0 else (lambda *args, **kwargs: None)
    dev = pick_device(cfg["device"], local_rank)
    dtype, dtype_why = pick_dtype(cfg["dtype"], dev)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores, as the MFU peak assumes
    bpe.check_writable(f"out_dir={cfg['out_dir']}", cfg["out_dir"])  # before data preparation, not at the end
    source, source_name = read_source(cfg)
    flags = model_config(**model_flags(cfg, given, source and source["model_config"], source_name))
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    try:
        ckpt = read_checkpoint(ckpt_path) if cfg["resume"] else None
    except ValueError as e:  # a damaged ckpt.pt
        raise ValueError(f"resume=True: {e}; restore a copy, or delete it to start over") from None
    if ckpt is not None:
        check_resume(ckpt, cfg, flags, ckpt_path)
    taken = [f"{k}={v!r}" for k, v in flags.items() if source and v != cfg[k]]
    if taken:  # keys this run did not set
        say(f"init_from={source_name}: from the weights {', '.join(taken)}")
    cfg.update(flags)
    if 0 < cfg["eval_tokens"] < cfg["context_length"]:  # checked here, where context_length is the model's
        raise ValueError(f"eval_tokens={cfg['eval_tokens']} is not allowed; use 0 (the whole file) or at least one "
                         f"window (context_length={cfg['context_length']})")
    check_fits(cfg, flags, dev)
    imported = source and source["tokenizer"]  # its vocabulary may be smaller than the model's (padded) embedding
    if imported and cfg["special_tokens"] == DEFAULTS["special_tokens"]:
        cfg["special_tokens"] = tuple(imported.special_ids)  # an imported model's own
    new_tokenizer = check_tokenizer_source(cfg, source, source_name)
    if new_tokenizer is not None and rank == 0:
        os.makedirs(cfg["tokenizer_dir"], exist_ok=True)
        new_tokenizer.save(*(os.path.join(cfg["tokenizer_dir"], f) for f in ("vocab.json", "merges.txt")))
    bins = prepare_data(cfg, rank, world, prep_group, imported.vocab_size if imported else cfg["vocab_size"])
    tokens = [data.load_tokens(path, cfg["vocab_size"]) for path in bins]
    val_starts = check_lengths(cfg, bins, tokens)
    if cfg["eval_tokens"] > len(val_starts) * cfg["context_length"]:
        say(f"eval_tokens={cfg['eval_tokens']:,} is more than {bins[1]} holds: validating on all of it "
            f"({len(val_starts):,} windows, {len(val_starts) * cfg['context_length']:,} tokens)")
    model, optimizer = build(cfg, flags, dev)
    run = Run(cfg, rank, world, dev, dtype, say, *(data.tokens_to_device(t, dev) for t in tokens), val_starts,
              token_byte_lengths(cfg, dev), model, optimizer, fast_path(model, cfg, dev, dtype, say),
              LossScaler(dtype == torch.float16), source, ckpt)
    restore(run, source_name)
    x, y = step_batch(run.train_tokens, cfg, rank, run.step, dev)
    run.loss_fn, seconds = first_step(model, run.loss_fn, x, y, cfg, dtype, say)
    if run.loss_fn != model.loss:
        say(f"compile: the first forward and backward took {seconds:.1f} s (torch.compile)")
    write_header(run, dtype_why, source_name)
    run.start_step, run.window, run.clock = run.step, (run.loop.elapsed, run.step), time.perf_counter()
    return run


def restore(run: Run, source_name: str) -> None:
    """Resume: model, AdamW, loss scale, RNG and loop state from the checkpoint. init_from: the weights alone.
    Under DDP every rank then starts from rank 0's weights."""
    cfg, ckpt = run.cfg, run.ckpt
    if ckpt is not None:
        run.step, run.loop = load_checkpoint(ckpt, run.model, run.optimizer), Loop(**ckpt["loop"])
        run.saved_step = run.step
        if run.scaler.enabled and "scaler" in ckpt:
            run.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if run.dev.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], run.dev)
        changed = [f"{k}={v!r}" for k, v in cfg.items() if k != "resume" and ckpt["config"].get(k) != v]
        run.say(f"resuming {run.path('ckpt.pt')} at step {run.step}" +
                (f" with {', '.join(changed)}" if changed else ""))
        run.say(schedule_note(run.step, cfg, ckpt["config"]))
        return
    if run.source is not None:
        load_checkpoint({"model": run.source["state_dict"]}, run.model, None)
        run.say(f"starting from the weights of {source_name} (step {run.source['iteration']}): fresh optimizer "
                "and schedule")
    if os.path.exists(run.path("ckpt.pt")):
        run.say(f"note: a new run replaces {run.path('ckpt.pt')} and its log.csv (--resume=True would continue it)")
    for p in run.model.parameters() if run.world > 1 else []:
        dist.broadcast(p.data, src=0)


def write_header(run: Run, dtype_why: str, source_name: str) -> None:
    """What is needed to trace a curve back to its settings, printed and saved beside the CSV (run.json)."""
    cfg, model, dev = run.cfg, run.model, run.dev
    fused = any(getattr(m, "fast", False) for m in model.modules())
    info = {"git": git_commit(), "torch": torch.__version__, "world_size": run.world, "dtype": str(run.dtype)[6:],
            "dtype_why": dtype_why, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"{dev.type} ({torch.get_num_threads()} threads)", "params": model.num_params(),
            "flops_per_token": model.flops_per_token(), "tokens_per_step": run.tokens_per_step,
            "compiled": run.loss_fn != model.loss, "ops": "kernels.py fused ops" if fused else "model.py reference ops",
            "eval_windows": len(run.val_starts),
            "init_from": source_name and {"path": source_name, "iteration": run.source["iteration"]}}
    run.say(textwrap.fill("config: " + " ".join(f"{k}={v!r}" for k, v in cfg.items()), 120, subsequent_indent="  "))
    run.say(f"git {info['git']} | torch {info['torch']} | {info['device']} x {run.world} | {info['dtype']} "
            f"({dtype_why}) | {info['params']:,} parameters | {info['flops_per_token'] / 1e6:.2f} MFLOPs/token "
            f"forward | {run.tokens_per_step:,} tokens/step | {'compiled' if info['compiled'] else 'eager'}, "
            f"{info['ops']} | validation {len(run.val_starts):,} x {cfg['context_length']} tokens")
    if run.rank == 0:
        rows = kept_rows(run.path("log.csv"), run.step) if run.ckpt is not None else []
        os.makedirs(cfg["out_dir"], exist_ok=True)
        for name, obj in (("config.json", cfg), ("run.json", info)):
            with atomic_write(run.path(name)) as f:  # a crash never leaves half a JSON file
                json.dump(obj, f, indent=1)
        start_log(run.path("log.csv"), rows)


def save(run: Run) -> None:
    """ckpt.pt at run.step (rank 0): weights, AdamW, loss scale, RNG, loop state, config and the tokenizer's place."""
    if run.rank != 0:
        return
    cfg = run.cfg
    rng = {"torch": torch.get_rng_state()}
    if run.dev.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.dev)
    tok = os.path.abspath(cfg["tokenizer_dir"])
    tokenizer = {"dir": tok, "rel": os.path.relpath(tok, os.path.abspath(cfg["out_dir"])),
                 "special_tokens": list(cfg["special_tokens"])}
    save_checkpoint(run.model, run.optimizer, run.step, run.path("ckpt.pt"), config=cfg,
                    tokenizer_dir=cfg["tokenizer_dir"], tokenizer=tokenizer, rng=rng,
                    loop=dataclasses.asdict(run.loop), scaler=run.scaler.state_dict())
    run.saved_step = run.step


def log_point(run: Run, do_eval: bool, stop_signals: list) -> bool:
    """A console line and a CSV row: read back the steps since the last one (divergence is checked there), evaluate
    if due, save after an evaluation, and honour Ctrl-C. Returns True when the run ends here."""
    cfg, loop = run.cfg, run.loop
    problem, folded, stop = read_stats(loop, run.pending, cfg)  # the host sync, once per log line
    loop.elapsed += time.perf_counter() - run.clock
    loop.tokens += folded * run.tokens_per_step
    if problem is not None:
        diverged(run, run.pending[folded][0], problem)
        return True
    run.pending, evaluated = [], None  # evaluated: (val_loss, val_bpb) when the whole evaluation ran
    if do_eval:
        *evaluated, interrupted = evaluate(run.model, run.val_tokens, run.val_starts, run.token_bytes, cfg, run.dev,
                                           run.autocast, run.rank, run.world, stop_signals)
        stop = stop or interrupted
        evaluated = None if interrupted else evaluated
        if evaluated:
            run.val_loss, run.val_bpb = evaluated
            if not math.isfinite(run.val_loss):
                run.status = "diverged"
            elif cfg["target_val_loss"] is not None and run.val_loss <= cfg["target_val_loss"]:
                run.status = "target"
    speed = report_speed(run) if folded else {}
    if run.rank == 0:
        write_row(run.path("log.csv"), step=run.step, tokens=loop.tokens, elapsed_s=round(loop.elapsed, 3),
                  skipped=loop.skipped, status=None if run.status == "done" else run.status,
                  **(val_columns(*evaluated) if evaluated else {}), **(loop.last | speed if folded else {}))
    if evaluated:
        if run.status != "diverged":
            save(run)
        run.say(f"step {run.step}: val loss {run.val_loss:.4f} (ppl {math.exp(min(run.val_loss, 700)):.2f}" +
                (f", {run.val_bpb:.4f} bits/byte)" if run.val_bpb else ")") +
                (f" | saved {run.path('ckpt.pt')}" if run.status != "diverged" else " | not saved: diverged"))
    if stop or (stop_signals and run.world == 1):
        run.status = "interrupted"
        if run.saved_step != run.step:
            save(run)
        run.say(f"stopped at step {run.step}; saved {run.path('ckpt.pt')}; continue with --resume=True")
    run.clock = time.perf_counter()
    return run.status != "done"


def report_speed(run: Run) -> dict:
    """The console line for the steps since the last one (and the memory report after the first); their speed."""
    loop = run.loop
    dt = (loop.elapsed - run.window[0]) / (run.step - run.window[1])  # seconds per step since the last line
    peak = peak_flops(run.dev, run.dtype) * run.world
    flops_per_step = 3 * run.model.flops_per_token() * run.tokens_per_step  # the backward costs twice the forward
    speed = dict(tokens_per_s=round(run.tokens_per_step / dt, 1), mfu=round(flops_per_step / dt / peak, 4) if peak
                 else 0.0)
    run.say(progress_line(run.step, run.cfg, loop, dt, speed))
    if run.window[1] == run.start_step:
        run.say(memory_report(run.model, run.cfg["batch_size"], run.dtype, run.dev))
    run.window = (loop.elapsed, run.step)
    return speed


def diverged(run: Run, bad_step: int, problem: str) -> None:
    """The step after bad_step is not saved: log it as 'diverged' and stop, keeping ckpt.pt's last good state."""
    run.status, run.step = "diverged", bad_step
    if run.rank == 0:
        write_row(run.path("log.csv"), step=bad_step + 1, tokens=run.loop.tokens, elapsed_s=round(run.loop.elapsed, 3),
                  status="diverged", **run.loop.last)
    kept = f"{run.path('ckpt.pt')} keeps step {run.saved_step}" if run.saved_step is not None else "nothing saved"
    run.say(f"diverged at step {bad_step + 1}: {problem}; stopped, {kept}")


def main(cfg: dict) -> dict:
    """Train as cfg says (missing keys take DEFAULTS; starting from other weights, the model keys cfg holds must
    agree with theirs). Returns {status, step, train_loss, val_loss, val_bpb, model},
    where status is 'done', 'target' (target_val_loss reached), 'diverged' or 'interrupted', and model is the raw
    trained model."""
    try:
        run = start(check_config(cfg), set(cfg))  # the keys cfg holds are the ones this run sets
        train_loop(run)
    finally:  # on an error too: a process group left to the interpreter's exit can abort the process
        if dist.is_initialized():
            dist.destroy_process_group()
    return {"status": run.status, "step": run.step, "train_loss": run.loop.last.get("train_loss"),
            "val_loss": run.val_loss, "val_bpb": run.val_bpb, "model": run.model}


def train_loop(run: Run) -> None:
    """Step until max_iters, the target, divergence or a signal; run.status says which."""
    cfg = run.cfg
    with stop_on_signal() as stop_signals:
        while True:
            # Log, evaluate and save at the top of a step, so the final ones happen inside the loop (last_step).
            # A resumed run did all three for its first step before that checkpoint was written.
            last_step = run.step >= cfg["max_iters"]
            do_eval = run.step % cfg["eval_interval"] == 0 or last_step
            log_now = do_eval or run.step % cfg["log_interval"] == 0 or (run.world == 1 and stop_signals)
            if log_now and (run.step > run.start_step or run.ckpt is None) and log_point(run, do_eval, stop_signals):
                break
            if last_step:
                break
            # One optimizer step on this rank's batch; its statistics stay on the device until the next log line.
            lr = lr_at(run.step, cfg)
            x, y = step_batch(run.train_tokens, cfg, run.rank, run.step, run.dev)
            stats = train_step(run.model, run.loss_fn, run.optimizer, x, y, lr, cfg, run.autocast, run.scaler,
                               run.world, bool(stop_signals))
            run.pending.append((run.step, lr, stats))
            run.step += 1


def val_columns(val_loss: float, val_bpb: float | None) -> dict:
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700)), "val_bpb": val_bpb}


def progress_line(step: int, cfg: dict, loop: Loop, dt: float, speed: dict) -> str:
    """How far, how good, how fast (nanochat's line): step, smoothed loss, lr, ms/step, tok/s, MFU, elapsed, eta."""
    last = loop.last | speed
    skipped = f" | skipped {loop.skipped}" if loop.skipped else ""
    return (f"step {step}/{cfg['max_iters']} ({step / max(cfg['max_iters'], 1):.1%}) | loss {last['train_loss']:.4f} | "
            f"lr {last['lr']:.2e} | dt {1000 * dt:.1f} ms | {last['tokens_per_s']:,.0f} tok/s | "
            f"MFU {last['mfu']:.1%} | elapsed {hms(loop.elapsed)} | "
            f"eta {hms(dt * max(cfg['max_iters'] - step, 0))}{skipped}")


def schedule_note(step: int, cfg: dict, old: dict) -> str:
    """How a resumed run's schedule continues, beside what the checkpoint's schedule gave at this step."""
    note = (f"schedule: step {step} of {cfg['max_iters']}, lr {lr_at(step, cfg):.3g} now, cosine to "
            f"{cfg['min_lr']:.3g} at step {cfg['cosine_iters']}")
    try:
        before = cosine_lr(step, old["lr"], old["min_lr"], old["warmup_iters"], old["cosine_iters"])
    except (KeyError, TypeError, ZeroDivisionError):
        return note
    return note if math.isclose(before, lr_at(step, cfg)) else note + f" (the checkpoint's schedule: {before:.3g} here)"


if __name__ == "__main__":
    run_cli(lambda argv: 130 if main(overrides(DEFAULTS, argv))["status"] == "interrupted" else 0)
