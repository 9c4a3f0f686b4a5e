"""Train a Transformer language model from scratch: tokenizer, data, model, AdamW, logs and exact resume.

    python train.py config/demo.py                          # CPU, no download: about two minutes
    python train.py config/tinystories.py --lr=3e-3         # one CUDA GPU; any key can be overridden
    python train.py config/tinystories.py --resume=True     # continue out_dir/ckpt.pt exactly where it stopped
    torchrun --standalone --nproc_per_node=8 train.py config/owt.py    # data parallel on 8 GPUs
    python train.py --help                                  # every key, its default and what it does

Config files are Python run with the defaults below in scope (they can run any code: use only your own);
inside one, include('tinystories.py') first runs another file from the same folder.
Writes out_dir/ckpt.pt (at every eval and at the end), out_dir/log.csv, out_dir/config.json and out_dir/run.json.
"""
import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import BinaryIO

import numpy as np
import torch
import torch.distributed as dist

import data
from bpe import atomic_write, hms
from configurator import check_known, configure, typed
from kernels import available as triton_available
from model import MODEL_KEYS, TransformerLM
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
# --- model (model.py) ---
context_length = 256  # tokens per training sequence
d_model = 512  # width of the residual stream
num_layers = 4  # Transformer blocks
num_heads = 16  # attention heads; must divide d_model
d_ff = None  # FFN hidden size; None = 8/3 d_model rounded up to 64 (swiglu) or 4 d_model (silu)
rope_theta = 10000.0  # RoPE base period
norm = "pre"  # RMSNorm placement: 'pre' | 'post' | 'none'
pos = "rope"  # position information: 'rope' | 'none' (NoPE)
ffn = "swiglu"  # feed-forward: 'swiglu' | 'silu' (ungated)
qk_norm = False  # RMSNorm on queries and keys per head
n_kv_heads = None  # key/value heads for grouped-query attention; None = num_heads, 1 = multi-query
logit_softcap = 0.0  # logits -> C tanh(logits / C); 0 = off
tie_embeddings = False  # lm_head shares the token-embedding matrix
block = "serial"  # 'serial' | 'parallel' (attention and FFN read the same input)
# --- loss, optimizer, schedule ---
z_loss = 0.0  # weight of mean(logsumexp(logits)^2) in the loss; train_loss in the CSV stays plain cross-entropy
lr = 2e-3  # peak learning rate
min_lr = 2e-4  # learning rate after the cosine decay
warmup_iters = 150  # steps of linear warm-up from 0 to lr
cosine_iters = 10000  # step at which the cosine decay reaches min_lr (usually max_iters)
betas = (0.9, 0.95)  # AdamW decay rates of the first and second moments
eps = 1e-8  # AdamW denominator epsilon
weight_decay = 0.1  # decoupled weight decay on matrices (norm gains are not decayed)
grad_clip = 1.0  # clip the global gradient L2 norm to this; 0 = off
batch_size = 128  # sequences per step on each process
max_iters = 10000  # optimizer steps
# --- evaluation, logging, stopping ---
eval_interval = 500  # steps between validations (each also saves ckpt.pt)
eval_iters = 50  # validation batches, drawn from a fixed seed: the same every run and resume
log_interval = 10  # steps between console lines and CSV rows
target_val_loss = None  # stop once the validation loss is at or below this; None = off
diverge_factor = 3.0  # stop when, after warm-up, loss > this x min(first loss, loss at end of warm-up); 0 = off
# --- system ---
device = "auto"  # 'auto' (cuda, then mps, then cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"  # 'auto' (bfloat16 on a CUDA GPU that supports it, else float32) | 'float32' | 'bfloat16' (autocast)
compile = False  # torch.compile the training forward/backward (slow first steps, faster after on CUDA)
kernels = False  # fused Triton kernels of kernels.py for norms, FFN, attention and loss (CUDA; bench.py checks them)
seed = 1337  # model initialisation and training data stream
resume = False  # continue from out_dir/ckpt.pt (same out_dir, same model flags)
DEFAULTS = {k: v for k, v in globals().items() if k not in _names_before_config and not k.startswith("_")}

CSV_COLUMNS = ("step", "tokens", "elapsed_s", "lr", "train_loss", "val_loss", "val_ppl", "grad_norm", "tokens_per_s",
               "mfu", "z_loss", "status")
VAL_SEED = 20250  # validation batches come from this seed, independent of `seed`: runs are compared on equal data
EMA_BETA = 0.9  # smoothing of the logged training loss (debiased, as in nanochat)
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12}  # dense bf16 FLOP/s by GPU name (first match); TF32 counts half


def check_config(cfg: dict) -> dict:
    """Complete cfg from DEFAULTS and check types and the values this script needs (model.py checks the model's)."""
    for key in cfg:
        check_known(key, DEFAULTS)
    cfg = {k: typed(k, cfg.get(k, v), v) for k, v in DEFAULTS.items()}
    checks = {k: (cfg[k] > 0, "> 0") for k in ("batch_size", "eval_interval", "eval_iters", "log_interval", "eps")}
    checks |= {k: (cfg[k] >= 0, ">= 0") for k in ("max_iters", "warmup_iters", "cosine_iters", "lr", "weight_decay",
                                                  "grad_clip", "z_loss", "seed")}
    checks |= {"min_lr": (0 <= cfg["min_lr"] <= cfg["lr"], "a value between 0 and lr"),
               "betas": (len(cfg["betas"]) == 2 and all(0 <= b < 1 for b in cfg["betas"]), "two numbers in [0, 1)"),
               "diverge_factor": (cfg["diverge_factor"] == 0 or cfg["diverge_factor"] > 1, "0 (off) or > 1"),
               "target_val_loss": (not isinstance(cfg["target_val_loss"], str), "a number, or None for off"),
               "dtype": (cfg["dtype"] in ("auto", "float32", "bfloat16"), "'auto', 'float32' or 'bfloat16'")}
    for key, (ok, allowed) in checks.items():
        if not ok:
            raise ValueError(f"{key}={cfg[key]!r} is not allowed; use {allowed}")
    return cfg


# --- Checkpoints: one file, written atomically, enough to continue the run bit for bit -------------------------------

def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
                    out: str | os.PathLike | BinaryIO, **extra) -> None:
    """Save model, optimizer, iteration, model_config and extra (train.py adds config, tokenizer_dir, rng and loop)
    to a path or a binary file object. A path is written as path.tmp, synced, then renamed over path, so a crash never
    leaves a partial ckpt.pt. No data-sampler state is needed: batches are drawn from batch_seed(seed, rank, step).
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper would prefix every name with _orig_mod.
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
             "model_config": model.config, **extra}
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
        raise FileNotFoundError(f"no checkpoint at {src}; train first or fix out_dir")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and I/O errors all mean the same here: the file is damaged
        raise ValueError(f"{name} is not a readable checkpoint ({type(e).__name__}): truncated or corrupt; "
                         "delete it to start over or restore a copy") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "iteration", "model_config"} <= ckpt.keys():
        raise ValueError(f"{name} is not a train.py checkpoint (it lacks model, optimizer, iteration or model_config)")
    return ckpt


def load_checkpoint(src: str | os.PathLike | BinaryIO | dict, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None) -> int:
    """Restore model (and optimizer, if given) from a path, a file object or a read_checkpoint dict; return the step."""
    ckpt = src if isinstance(src, dict) else read_checkpoint(src)
    try:
        getattr(model, "_orig_mod", model).load_state_dict(ckpt["model"])
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"checkpoint does not fit this model: {str(e).strip().splitlines()[0]}") from None
    return ckpt["iteration"]


def _check_same_flags(ckpt: dict, cfg: dict, model_config: dict) -> None:
    """Resuming must not change what is being trained: the model flags and the loss (z_loss)."""
    old = {**ckpt["model_config"], "z_loss": ckpt.get("config", {}).get("z_loss", 0.0)}
    new = {**model_config, "z_loss": cfg["z_loss"]}
    differ = [f"{k} (checkpoint {old.get(k)!r}, now {v!r})" for k, v in new.items() if old.get(k) != v]
    if differ:
        raise ValueError(f"cannot resume {cfg['out_dir']}/ckpt.pt with different flags: {', '.join(differ)}; "
                         "use the checkpoint's values or a new out_dir")


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
    """Compute dtype and the reason for it. bfloat16 means autocast: weights, grads and AdamW state stay float32."""
    if name == "auto":
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this CUDA GPU supports bfloat16"
        return torch.float32, f"auto: no bfloat16 autocast default on {dev.type}"
    return getattr(torch, name), "set by dtype"


def batch_seed(seed: int, rank: int, step: int) -> int:
    """Seed for the batch `rank` draws at `step`. The data stream is a function of (seed, rank, step), so a resumed run
    needs no sampler state and redraws exactly; resumed on more ranks, ranks 0..n-1 keep their streams. torch's CPU
    generator keeps only a seed's low 32 bits, so the three are hashed into 32 bits (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence((seed, rank, step)).generate_state(1)[0])


def setup_distributed(device_name: str) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment, after joining the process group; (0, 0, 1) alone."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_nccl = device_name not in ("cpu", "mps") and torch.cuda.is_available()
    if use_nccl:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_nccl else "gloo")
    return rank, local_rank, world


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
    return peak if dtype == torch.bfloat16 else peak / 2


def git_commit() -> str:
    try:
        run = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                           cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        return f"{commit}{' (dirty)' if run('status', '--porcelain') else ''}" if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_log(path: str, keep_until: int | None) -> None:
    """Write log.csv's header; on resume keep the complete rows up to the checkpoint's step (later ones replay)."""
    rows = []
    if keep_until is not None and os.path.isfile(path):
        with open(path, newline="") as f:  # a row cut short by a crash has no status field (None): dropped
            rows = [r for r in csv.DictReader(f) if r.get("status") is not None and int(r["step"]) <= keep_until]
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def write_row(path: str, **row) -> None:
    """Append one row to log.csv; absent fields stay empty."""
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow("" if row.get(k) is None else row[k] for k in CSV_COLUMNS)


def memory_report(model: TransformerLM, batch_size: int, dtype: torch.dtype, dev: torch.device) -> str:
    """model.py's training-memory estimate beside the peak the allocator actually saw."""
    est = model.memory_estimate(batch_size, dtype == torch.bfloat16)
    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in est.items() if k != "total")
    used = (f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)"
            if dev.type == "cuda" else f"n/a on {dev.type}")
    return f"memory: estimate {est['total'] / 2**30:.2f} GiB ({parts}) | measured peak {used}"


@torch.no_grad()
def evaluate(model: TransformerLM, tokens, cfg: dict, dev: torch.device, autocast) -> float:
    """Mean cross-entropy over eval_iters validation batches drawn from VAL_SEED: identical in every run and resume."""
    generator = torch.Generator().manual_seed(VAL_SEED)
    losses = []
    for _ in range(cfg["eval_iters"]):
        x, y = data.get_batch(tokens, cfg["batch_size"], cfg["context_length"], dev, generator)
        with autocast:
            losses.append(model.loss(x, y)[0].float())
    return torch.stack(losses).mean().item()


@contextlib.contextmanager
def stop_on_signal():
    """While training, Ctrl-C and SIGTERM only set a flag: the loop finishes its step, saves and exits cleanly."""
    requested = []

    def handler(signum, frame):
        if requested:  # a second Ctrl-C quits at once, without saving
            raise KeyboardInterrupt
        requested.append(signum)
        print("stopping after this step to save a checkpoint (Ctrl-C again to quit without saving)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --- The training run ------------------------------------------------------------------------------------------------

def main(cfg: dict) -> dict:
    """Train as cfg says (missing keys take DEFAULTS). Returns {status, step, train_loss, val_loss, model}, where status
    is 'done', 'target' (target_val_loss reached), 'diverged' or 'interrupted', and model is the raw trained model."""
    cfg = check_config(cfg)
    rank, local_rank, world = setup_distributed(cfg["device"])
    master = rank == 0
    say = print if master else (lambda *args, **kwargs: None)
    dev = pick_device(cfg["device"], local_rank)
    dtype, dtype_why = pick_dtype(cfg["dtype"], dev)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores, as the MFU peak assumes

    if world > 1 and not master:  # rank 0 trains the tokenizer and tokenizes first; the others then find it cached
        dist.barrier()
    bins = data.prepare_splits([cfg["train_data"], cfg["val_data"]], cfg["tokenizer_dir"], cfg["vocab_size"],
                               cfg["special_tokens"])
    if world > 1 and master:
        dist.barrier()
    train_tokens, val_tokens = (data.load_tokens(path, cfg["vocab_size"]) for path in bins)
    train_tokens, val_tokens = (data.tokens_to_device(t, dev) for t in (train_tokens, val_tokens))  # on a GPU if it fits

    torch.manual_seed(cfg["seed"])
    model = TransformerLM(**{k: cfg[k] for k in MODEL_KEYS}, device=dev)
    gains = [p for p in model.parameters() if p.dim() < 2]  # norm gains are not decayed, matrices are
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2]}, {"params": gains, "weight_decay": 0.0}]
    optimizer = AdamW(groups[:2 if gains else 1], lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"],
                      weight_decay=cfg["weight_decay"], foreach=dev.type == "cuda")
    ckpt_path, log_path = (os.path.join(cfg["out_dir"], name) for name in ("ckpt.pt", "log.csv"))
    step, loop = 0, {"elapsed": 0.0, "tokens": 0, "ema": 0.0, "first_loss": None, "ref_loss": None}
    if cfg["resume"]:
        ckpt = read_checkpoint(ckpt_path)
        _check_same_flags(ckpt, cfg, model.config)
        step, loop = load_checkpoint(ckpt, model, optimizer), ckpt["loop"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if dev.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], dev)
        changed = [f"{k}={v!r}" for k, v in cfg.items() if k != "resume" and ckpt["config"].get(k) != v]
        say(f"resuming {ckpt_path} at step {step}" + (f" with {', '.join(changed)}" if changed else ""))
    else:
        if os.path.exists(ckpt_path):
            say(f"note: a new run replaces {ckpt_path} and its log.csv (--resume=True would continue it)")
        for p in model.parameters() if world > 1 else []:  # every rank starts from rank 0's weights
            dist.broadcast(p.data, src=0)
    start = step

    # Header: what is needed to trace a curve back to its settings, printed and saved beside the CSV.
    tokens_per_step = cfg["batch_size"] * cfg["context_length"] * world
    flops_per_step = 3 * model.flops_per_token() * tokens_per_step  # the backward pass costs twice the forward
    peak = peak_flops(dev, dtype) * world
    run = {"git": git_commit(), "torch": torch.__version__, "world_size": world, "dtype": str(dtype)[6:],
           "dtype_why": dtype_why, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
           else f"{dev.type} ({torch.get_num_threads()} threads)", "params": model.num_params(),
           "flops_per_token": model.flops_per_token(), "tokens_per_step": tokens_per_step,
           "ops": "kernels.py " + ("Triton" if triton_available() else "torch references") if cfg["kernels"]
           else "model.py reference ops"}
    say(textwrap.fill("config: " + " ".join(f"{k}={v!r}" for k, v in cfg.items()), 120, subsequent_indent="  "))
    say(f"git {run['git']} | torch {run['torch']} | {run['device']} x {world} | {run['dtype']} ({dtype_why}) | "
        f"{run['params']:,} parameters | {run['flops_per_token'] / 1e6:.2f} MFLOPs/token forward | "
        f"{tokens_per_step:,} tokens/step | {run['ops']}")
    if master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        for name, obj in (("config.json", cfg), ("run.json", run)):
            with atomic_write(os.path.join(cfg["out_dir"], name)) as f:  # a crash never leaves half a JSON file
                json.dump(obj, f, indent=1)
        start_log(log_path, keep_until=step if cfg["resume"] else None)

    def save(step: int) -> None:
        rng = {"torch": torch.get_rng_state()}
        if dev.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(dev)
        save_checkpoint(model, optimizer, step, ckpt_path, config=cfg, tokenizer_dir=cfg["tokenizer_dir"], rng=rng,
                        loop=dict(loop))

    if cfg["kernels"]:
        model.use_kernels()  # on CPU without Triton each op runs its torch reference
    loss_fn = torch.compile(model.loss, dynamic=False) if cfg["compile"] else model.loss  # `model` stays raw
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    generator = torch.Generator()
    status, last, val_loss, stopping, saved_step = "done", {}, None, False, start
    window = (loop["elapsed"], step)  # (training seconds, step) at the previous console line
    with stop_on_signal() as stop_signals:
        while True:
            last_step = step >= cfg["max_iters"]
            # Evaluate, log and save at the top of the step, so the final ones happen inside the loop (last_step).
            # A resumed run did all three for its first step before that checkpoint was written.
            if step > start or not cfg["resume"]:
                do_eval = step % cfg["eval_interval"] == 0 or last_step
                val_loss = evaluate(model, val_tokens, cfg, dev, autocast) if do_eval else None
                if do_eval and not math.isfinite(val_loss):
                    status = "diverged"
                elif do_eval and cfg["target_val_loss"] is not None and val_loss <= cfg["target_val_loss"]:
                    status = "target"
                if step > start and (step % cfg["log_interval"] == 0 or do_eval):
                    dt = (loop["elapsed"] - window[0]) / (step - window[1])  # seconds per step since the last line
                    last.update(tokens_per_s=round(tokens_per_step / dt, 1),
                                mfu=round(flops_per_step / dt / peak, 4) if peak else 0.0)
                    say(f"step {step}/{cfg['max_iters']} ({step / max(cfg['max_iters'], 1):.1%}) | "
                        f"loss {last['train_loss']:.4f} | lr {last['lr']:.2e} | dt {1000 * dt:.1f} ms | "
                        f"{last['tokens_per_s']:,.0f} tok/s | MFU {last['mfu']:.1%} | "
                        f"elapsed {hms(loop['elapsed'])} | eta {hms(dt * max(cfg['max_iters'] - step, 0))}")
                    if window[1] == start:
                        say(memory_report(model, cfg["batch_size"], dtype, dev))
                    window = (loop["elapsed"], step)
                if master and (step % cfg["log_interval"] == 0 or do_eval):
                    write_row(log_path, step=step, tokens=loop["tokens"], elapsed_s=round(loop["elapsed"], 3),
                              val_loss=val_loss, val_ppl=None if val_loss is None else math.exp(min(val_loss, 700)),
                              status=None if status == "done" else status, **last)
                if do_eval:
                    if master and status != "diverged":
                        save(step)
                        saved_step = step
                    say(f"step {step}: val loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 700)):.2f})" +
                        (f" | saved {ckpt_path}" if status != "diverged" else " | not saved: diverged"))
                if status != "done":
                    break
            if last_step:
                break
            if stopping:
                status = "interrupted"
                if master and saved_step != step:
                    save(step)
                say(f"stopped at step {step}; saved {ckpt_path}; continue with --resume=True")
                break

            # One optimizer step on this rank's batch.
            t0 = time.perf_counter()
            lr_now = cosine_lr(step, cfg["lr"], cfg["min_lr"], cfg["warmup_iters"], cfg["cosine_iters"])
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            generator.manual_seed(batch_seed(cfg["seed"], rank, step))
            x, y = data.get_batch(train_tokens, cfg["batch_size"], cfg["context_length"], dev, generator)
            with autocast:
                ce, z = loss_fn(x, y)
            (ce + cfg["z_loss"] * z if cfg["z_loss"] else ce).backward()
            stop_here = torch.full((), float(bool(stop_signals)), device=dev)  # Ctrl-C / SIGTERM seen on this rank
            stats = torch.stack([ce.detach().float(), z.detach().float(), stop_here])
            if world > 1:
                stats = all_reduce_gradients(model, stats, world)  # every rank now holds the same mean loss and flag
            norm = clip_grad_norm(model.parameters(), cfg["grad_clip"] or math.inf)
            loss, z_mean, stop_flag, grad_norm = torch.cat([stats, norm.view(1).to(stats)]).tolist()  # one host sync
            factor, ref_loss = cfg["diverge_factor"], loop["ref_loss"]
            too_big = bool(factor) and ref_loss is not None and loss > factor * ref_loss
            if too_big or not (math.isfinite(loss) and math.isfinite(grad_norm)):
                status = "diverged"  # the update is not applied and nothing is saved: ckpt.pt keeps the last good state
                if master:
                    write_row(log_path, step=step + 1, tokens=loop["tokens"], elapsed_s=round(loop["elapsed"], 3),
                              lr=lr_now, train_loss=loss, grad_norm=grad_norm, z_loss=z_mean, status=status)
                say(f"diverged at step {step + 1}: loss {loss:.4g}, grad norm {grad_norm:.4g}" +
                    (f" (> {factor} x reference loss {ref_loss:.4f})" if too_big else "") +
                    f"; stopped, {ckpt_path} keeps step {saved_step}")
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loop["elapsed"] += time.perf_counter() - t0
            loop["tokens"] += tokens_per_step
            loop["ema"] = EMA_BETA * loop["ema"] + (1 - EMA_BETA) * loss
            if loop["first_loss"] is None:
                loop["first_loss"] = loss
            if loop["ref_loss"] is None and step >= cfg["warmup_iters"]:  # divergence is judged against this
                loop["ref_loss"] = min(loop["first_loss"], loop["ema"] / (1 - EMA_BETA**step))
            last.update(lr=lr_now, train_loss=loop["ema"] / (1 - EMA_BETA**step), grad_norm=grad_norm, z_loss=z_mean)
            stopping = stop_flag > 0
    if world > 1:
        dist.destroy_process_group()
    return {"status": status, "step": step, "train_loss": last.get("train_loss"), "val_loss": val_loss, "model": model}


if __name__ == "__main__":
    try:
        result = main(configure(DEFAULTS, sys.argv[1:]))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(130 if result["status"] == "interrupted" else 0)
