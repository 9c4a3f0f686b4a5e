"""Benchmark what train.py runs: its training step under each setting of compile, kernels and dtype, then KV-cache
generation against recomputing the prefix, then the tokenizer; `--gpu_check` is the first thing to run on a new GPU.

    python bench.py                                   # the TinyStories model at batch 128 on CUDA, every path
    python bench.py --device=cpu --tiny               # a small model on CPU, in seconds
    python bench.py --gpu_check                       # environment, kernel checks, timings, a 40 + 20 step resume
    python bench.py --help                            # every key

Each path is a train.py setting (PATHS) and runs train.py's own functions: build (model and AdamW), fast_path (the
kernel preflight and torch.compile), first_step (compilation, with its fallbacks), then train_step on batches drawn
as train.py draws them (step_batch) from random tokens on the device, at train.py's learning-rate schedule. `burn_in`
untimed steps, then `steps` timed ones bracketed by synchronize (nanoGPT bench.py). The last stdout line is one JSON
object with every figure.
"""
import collections
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time

import numpy as np
import torch

import bpe
import kernels
import sample
import train
from configurator import configure, run_cli
from model import MODEL_KEYS, TransformerLM, model_config

DEFAULTS = {
    **{key: train.DEFAULTS[key] for key in MODEL_KEYS},  # the TinyStories model (train.py's defaults)
    **{key: train.DEFAULTS[key] for key in ("batch_size", "grad_accum_steps", "lr", "betas", "eps", "weight_decay",
                                            "grad_clip", "z_loss", "warmup_iters", "seed")},
    "device": "cuda",  # 'cuda' | 'cuda:1' | 'cpu'
    "tiny": False,  # a 2-layer, 64-wide model at batch 4 with few steps: a smoke test in seconds
    "paths": "default,kernels,compiled,eager,reference",  # training paths to time, in order (see PATHS)
    "burn_in": 10,  # untimed steps per path (torch.compile compiles in the first)
    "steps": 40,  # timed steps per path
    "check": True,  # on CUDA, check each kernel (and the model's fused loss) against the reference first
    "gpu_check": False,  # the first-GPU check: environment, kernel checks, every path, a 40-step run resumed to 60
    "generate_tokens": 200,  # tokens per generation timing (0 = skip); greedy, from a 16-token prompt
    "tok_train": "data/shakespeare_train.txt.gz:10000",  # FILE:VOCAB[,...] to train tokenizers on ('' = skip)
    "tok_encode_dir": "",  # tokenizer dir (vocab.json + merges.txt) to time encoding with; '' = the last one trained
    "tok_encode_text": "data/shakespeare_val.txt.gz",  # text to encode ('' = skip)
}
TINY = dict(vocab_size=512, context_length=64, d_model=64, num_layers=2, num_heads=4, d_ff=None, batch_size=4,
            burn_in=2, steps=3, generate_tokens=40, tok_train="data/shakespeare_val.txt.gz:600",
            paths="default,eager,reference")  # no compile: Inductor on a CPU takes minutes

# Each path is what `python train.py --compile=.. --kernels=.. --dtype=..` runs; 'default' is train.py's defaults.
PATHS = {
    "default": dict(compile="auto", kernels="auto", dtype="auto"),  # on CUDA: compiled, kernels that pass, bf16
    "kernels": dict(compile=True, kernels=True, dtype="auto"),  # every fused op, compiled
    "compiled": dict(compile=True, kernels=False, dtype="auto"),  # torch.compile over the reference ops
    "eager": dict(compile=False, kernels=False, dtype="auto"),  # the reference ops, eager, in 16-bit autocast
    "reference": dict(compile=False, kernels=False, dtype="float32"),  # the plain model in float32
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_model(cfg: dict, device: torch.device) -> TransformerLM:
    torch.manual_seed(cfg["seed"])
    return TransformerLM(**{key: cfg[key] for key in MODEL_KEYS}, device=device)


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak allocated memory in GB (10^9 bytes, the peer's unit); None off CUDA."""
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None


def path_config(cfg: dict, path: str) -> dict:
    """The train.py config a path runs: bench's model and optimizer keys, the path's settings, train.py's defaults."""
    shared = {k: cfg[k] for k in DEFAULTS if k in train.DEFAULTS}
    steps = cfg["burn_in"] + cfg["steps"]  # the schedule of a run at least as long as the warm-up
    return train.check_config({**train.DEFAULTS, **shared, **PATHS[path], "max_iters": steps,
                               "cosine_iters": max(steps, cfg["warmup_iters"])})


def bench_training(cfg: dict, path: str, device: torch.device, tokens: torch.Tensor | None = None) -> dict:
    """Time `steps` of train.py's training step (after `burn_in`) on one path, from a fresh model of `seed`, on
    random tokens on the device (or `tokens`: a 1-D int tensor) gathered as train.py gathers them."""
    tcfg = path_config(cfg, path)
    if device.type == "cuda":  # peak over the whole path, compilation included, as the peer measures it
        torch.cuda.reset_peak_memory_stats(device)
    say = lambda line: print(f"  {path}: {line}")
    dtype, _ = train.pick_dtype(tcfg["dtype"], device)
    model, optimizer = train.build(tcfg, model_config(**{k: tcfg[k] for k in MODEL_KEYS}), device)
    loss_fn = train.fast_path(model, tcfg, device, dtype, say)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = train.LossScaler(dtype == torch.float16)
    if tokens is None:
        generator = torch.Generator(device).manual_seed(cfg["seed"])
        tokens = torch.randint(0, cfg["vocab_size"], (1 << 20,), device=device, generator=generator, dtype=torch.int32)
    x, y = train.step_batch(tokens, tcfg, 0, 0, device)
    loss_fn, first_s = train.first_step(model, loss_fn, x, y, tcfg, dtype, say)

    def step(i: int) -> torch.Tensor:
        x, y = train.step_batch(tokens, tcfg, 0, i, device)
        return train.train_step(model, loss_fn, optimizer, x, y, train.lr_at(i, tcfg), tcfg, autocast, scaler, 1)

    stats = [step(i) for i in range(cfg["burn_in"])]
    synchronize(device)
    t0 = time.perf_counter()
    stats += [step(i) for i in range(cfg["burn_in"], cfg["burn_in"] + cfg["steps"])]
    synchronize(device)
    dt = (time.perf_counter() - t0) / cfg["steps"]
    losses = torch.stack(stats)[:, 0].tolist()
    tokens_per_s = cfg["batch_size"] * cfg["grad_accum_steps"] * cfg["context_length"] / dt
    mfu = tokens_per_s * cfg["train_flops_per_token"] / cfg["peak"] if cfg["peak"] else 0.0
    fused = sorted({type(m).__name__ for m in model.modules() if getattr(m, "fast", False)})
    return {"path": path, **PATHS[path], "dtype": str(dtype)[6:], "compiled": loss_fn != model.loss,
            "fused": ",".join(fused), "first_step_s": round(first_s, 2), "ms_per_step": round(1000 * dt, 2),
            "tokens_per_s": round(tokens_per_s), "mfu": round(mfu, 4), "peak_mem_gb": peak_memory_gb(device),
            "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4), "losses": losses}


# ----------------------------------------------------------------------------------------------------------------
# Checks on the device: each kernel, and the model's fast loss, against the reference (STYLE point 3)
# ----------------------------------------------------------------------------------------------------------------

def _report(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> bool:
    """One `name PASS/FAIL maxdiff=...` line; passes when max |got - want| <= rtol * max |want| (NaN fails)."""
    diff, scale = (got.double() - want.double()).abs().max().item(), want.double().abs().max().item()
    ok = diff <= rtol * max(scale, 1e-6)
    print(f"  {name} {'PASS' if ok else 'FAIL'} maxdiff={diff:.2e} (max |ref| {scale:.2e}, rtol {rtol:g})")
    return ok


def _grads(fn, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs of fn on fresh leaf copies of inputs, and the gradients of sum(out * fixed random weights)."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    upstream = torch.Generator(inputs[0].device).manual_seed(0)
    total = sum((o.double() * torch.randn(o.shape, device=o.device, generator=upstream)).sum() for o in outs)
    total.backward()
    return list(outs), [x.grad for x in leaves if x.requires_grad]


def check_kernels(cfg: dict, device: torch.device, batch: int = 8) -> bool:
    """Each kernel in bf16, fp16 and fp32 against its torch reference on float64 copies of the same inputs, at the
    model's shapes (batch 8) and at odd ones (seq 37, d_head 24, grouped kv heads, widths 24 and 100), then the
    model (check_model). One PASS/FAIL line per tensor; an exception fails its case only. Never raises."""
    from model import RotaryPositionalEmbedding, model_config
    print(f"checks on {device} (kernel vs float64 reference, max error relative to the largest reference value):")
    rtols = {torch.bfloat16: (2e-2, 3e-2), torch.float16: (5e-3, 1e-2), torch.float32: (5e-3, 1e-2)}  # out, grads:
    ok = True  # float32's are fp16's, since its matmuls use TF32 on the GPU
    try:
        c = model_config(**{key: cfg[key] for key in MODEL_KEYS})
        T, d, H, H_kv, d_ff = (c[k] for k in ("context_length", "d_model", "num_heads", "n_kv_heads", "d_ff"))
        g = torch.Generator(device).manual_seed(cfg["seed"])
        targets = torch.randint(0, c["vocab_size"], (batch * T,), device=device, generator=g)
    except Exception as e:
        print(f"  setup FAIL {type(e).__name__}: {(str(e).strip() or '-').splitlines()[0][:200]}")
        return False

    def attention(B: int, heads: int, kv_heads: int, seq: int, d_head: int, dtype: torch.dtype) -> tuple:
        tables = RotaryPositionalEmbedding(c["rope_theta"], d_head, seq, device) if c["pos"] == "rope" else None
        cos, sin = (tables.cos, tables.sin) if tables is not None else (None, None)
        return (lambda q, k, v: kernels.attention(q, k, v, True, cos, sin),
                lambda q, k, v: kernels.attention_reference(q, k, v, True, cos, sin),
                [randn(B, heads, seq, d_head, dtype=dtype), randn(B, kv_heads, seq, d_head, dtype=dtype),
                 randn(B, kv_heads, seq, d_head, dtype=dtype)])

    def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, device=device, generator=g)).to(dtype)

    def under(autocast, fn):
        def run(*args):
            with autocast:
                return fn(*args)
        return run

    for dtype, (rtol_out, rtol_grad) in rtols.items():
        name = str(dtype).removeprefix("torch.")
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        cases = {  # name: (fused, reference, inputs); lazily built so a failing build fails only its case
            "rmsnorm": lambda: (kernels.rmsnorm, kernels.rmsnorm_reference,
                                [randn(batch, T, d, dtype=dtype), randn(d, dtype=torch.float32) + 1]),
            "rmsnorm d24": lambda: (kernels.rmsnorm, kernels.rmsnorm_reference,
                                    [randn(37, 24, dtype=dtype), randn(24, dtype=torch.float32) + 1]),
            "swiglu": lambda: (kernels.swiglu, kernels.swiglu_reference,
                               [randn(batch * T, d_ff, dtype=dtype), randn(batch * T, d_ff, dtype=dtype)]),
            "silu 37x100": lambda: (kernels.silu, kernels.swiglu_reference, [randn(37, 100, dtype=dtype)]),
            f"attention H{H}/{H_kv} T{T} d{d // H}": lambda: attention(batch, H, H_kv, T, d // H, dtype),
            "attention H4/2 T37 d24": lambda: attention(2, 4, 2, 37, 24, dtype),
            "linear_cross_entropy": lambda: (
                under(autocast, lambda h, w: kernels.linear_cross_entropy(h, w, targets)),
                lambda h, w: kernels.linear_cross_entropy_reference(h, w, targets),
                [randn(batch * T, d, dtype=torch.float32), randn(c["vocab_size"], d, dtype=torch.float32, scale=0.05)]),
        }
        for case, build in cases.items():
            label = f"{case} {name}"
            try:
                fused, reference, inputs = build()
                outs, grads = _grads(fused, inputs)
                outs_ref, grads_ref = _grads(reference, [x.double() for x in inputs])
                pairs = [(f"out {i}", a, b, rtol_out) for i, (a, b) in enumerate(zip(outs, outs_ref))]
                pairs += [(f"grad {i}", a, b, rtol_grad) for i, (a, b) in enumerate(zip(grads, grads_ref))]
                ok &= all([_report(f"{label} {what}", a, b, rtol) for what, a, b, rtol in pairs])
            except Exception as e:
                print(f"  {label} FAIL {type(e).__name__}: {(str(e).strip() or '-').splitlines()[0][:200]}")
                ok = False
    return check_model(cfg, device, batch) & ok


def check_model(cfg: dict, device: torch.device, batch: int) -> bool:
    """The model's loss and every parameter gradient with each fused op alone (TransformerLM.kernel_preflight, what
    train.py's kernels='auto' runs) against the reference ops, under bf16 and fp16 autocast and in float32."""
    ok, lm = True, None
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        try:
            lm = new_model(cfg, device) if lm is None else lm
            result = lm.kernel_preflight(batch, dtype)
        except Exception as e:
            result = {"reference ops": f"{type(e).__name__}: {(str(e).strip() or '-').splitlines()[0][:200]}"}
        for op, why in result.items():
            print(f"  model {op} {str(dtype).removeprefix('torch.')} {'PASS' if why is None else 'FAIL ' + why}")
            ok &= why is None
    return ok


# ----------------------------------------------------------------------------------------------------------------
# Generation: sample.generate with the KV cache against recomputing the prefix
# ----------------------------------------------------------------------------------------------------------------

def bench_generation(cfg: dict, device: torch.device) -> dict:
    """Greedy tokens/s of one sequence with and without the KV cache, from a random model and prompt."""
    model = new_model(cfg, device).eval()
    prompt = torch.randint(0, cfg["vocab_size"], (16,), generator=torch.Generator().manual_seed(cfg["seed"])).tolist()
    results, outputs = {}, {}
    for use_cache in (True, False):
        sample.generate(model, prompt, 4, temperature=0.0, use_cache=use_cache)  # warm-up
        synchronize(device)
        t0 = time.perf_counter()
        outputs[use_cache] = sample.generate(model, prompt, cfg["generate_tokens"], temperature=0.0,
                                             use_cache=use_cache)
        synchronize(device)
        results["kv_cache" if use_cache else "recompute"] = round(len(outputs[use_cache]) /
                                                                  (time.perf_counter() - t0), 1)
    results["identical"] = outputs[True] == outputs[False]
    return {"tokens_per_s": results, "new_tokens": cfg["generate_tokens"]}


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer: pre-tokenizer and encoder against a bare regex pass, training phases, parallel encode_file
# Single-process figures are CPU seconds (time.process_time), best of interleaved rounds, so other jobs on a shared
# machine move the ratios little; pool figures (training, encode_file) are wall-clock.
# ----------------------------------------------------------------------------------------------------------------

def _best_cpu_seconds(fns: dict, repeat: int = 3) -> dict:
    """Best CPU time of each function over `repeat` interleaved rounds."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - t0)
    return best


def _text_chunks(path: str, max_mb: float = 2.0) -> tuple[list[str], int]:
    """The first ~max_mb of a file as the document-aligned chunks a pool worker receives, and their bytes."""
    chunks, size = [], 0
    for chunk in bpe._read_chunks(path, bpe._Specials((bpe.EOT,))):  # bpe's own reader, so both sides see the same
        chunks.append(chunk)
        size += len(chunk.encode("utf-8"))
        if size >= max_mb * 1e6:
            break
    return chunks, size


def _bare_regex_pass(chunks: list[str]) -> None:
    for chunk in chunks:
        collections.deque(bpe.PAT.finditer(chunk), maxlen=0)  # iterate the matches, keep none


def bench_tokenizer_training(path: str, vocab_size: int) -> dict:
    """Pre-tokenize + count in one process against the bare regex pass (target >= 0.7x), then train_bpe's two
    phases on the whole file: counting (one worker, then a pool over all cores), and the merges."""
    chunks, size = _text_chunks(path)
    t = _best_cpu_seconds({"bare": lambda: _bare_regex_pass(chunks),
                           "count": lambda: [bpe._count_chunk(c, (bpe.EOT,), collections.Counter()) for c in chunks]})
    t0 = time.perf_counter()
    bpe.count_pretokens(path, (bpe.EOT,), num_workers=1)
    one_worker, t0 = time.perf_counter() - t0, time.perf_counter()
    counts = bpe.count_pretokens(path, (bpe.EOT,))
    t1 = time.perf_counter()
    merges = bpe.learn_merges(counts, vocab_size - 257)
    t2 = time.perf_counter()
    mb = sum(len(w.encode("utf-8")) * c for w, c in counts.items()) / 1e6  # the text, without special tokens
    return {"file": path, "mb": round(mb, 2), "vocab_size": 257 + len(merges), "unique_pretokens": len(counts),
            "bare_regex_mb_s": round(size / 1e6 / t["bare"], 2), "count_mb_s": round(size / 1e6 / t["count"], 2),
            "count_vs_regex": round(t["bare"] / t["count"], 2), "count_s_1_worker": round(one_worker, 2),
            "count_s": round(t1 - t0, 2), "merge_s": round(t2 - t1, 2), "train_mb_s": round(mb / (t2 - t0), 2),
            "workers": os.cpu_count()}


def bench_tokenizer_encoding(tok: bpe.Tokenizer, tokenizer_dir: str, path: str) -> dict:
    """encode in one process with a warm cache against the bare regex pass (target >= 0.8x), and encode_file on
    all cores over four copies of the file (each worker starts with an empty cache, which would dominate a small
    file)."""
    chunks, size = _text_chunks(path)
    num_tokens = sum(len(tok.encode(c)) for c in chunks)  # also warms the cache
    t = _best_cpu_seconds({"bare": lambda: _bare_regex_pass(chunks), "encode": lambda: [tok.encode(c) for c in chunks]})
    with tempfile.TemporaryDirectory() as tmp:
        copies = os.path.join(tmp, "input.txt")
        with open(copies, "w", encoding="utf-8") as out:
            out.write("".join(chunks) * 4)
        t0 = time.perf_counter()
        bpe.encode_file(copies, os.path.join(tmp, "out.bin"), tokenizer_dir)
        wall = time.perf_counter() - t0
    return {"file": path, "bytes_per_token": round(size / num_tokens, 3),
            "encode_mb_s": round(size / 1e6 / t["encode"], 2), "bare_regex_mb_s": round(size / 1e6 / t["bare"], 2),
            "encode_vs_regex": round(t["bare"] / t["encode"], 2),
            "encode_file_mb_s": round(4 * size / 1e6 / wall, 2), "workers": os.cpu_count()}


def bench_tokenizer(cfg: dict) -> dict:
    """Train a tokenizer on each tok_train file (FILE:VOCAB), then time encoding of tok_encode_text with the
    tokenizer in tok_encode_dir (default: the last one trained here)."""
    results = {"training": [], "encoding": None}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = cfg["tok_encode_dir"]
        for spec in filter(None, cfg["tok_train"].split(",")):
            path, _, vocab = spec.rpartition(":")
            if not path or not vocab.isdigit():
                raise ValueError(f"tok_train: {spec!r} should be FILE:VOCAB_SIZE, "
                                 "e.g. data/shakespeare_train.txt.gz:10000")
            run = bench_tokenizer_training(path, int(vocab))
            print("tokenizer training: " + " | ".join(f"{k} {v}" for k, v in run.items()))
            results["training"].append(run)
            if not cfg["tok_encode_dir"]:
                tokenizer_dir = os.path.join(tmp, "tok")
                bpe.train_tokenizer(path, int(vocab), tokenizer_dir)
        if tokenizer_dir and cfg["tok_encode_text"]:
            tok = bpe.load_tokenizer(tokenizer_dir)
            results["encoding"] = bench_tokenizer_encoding(tok, tokenizer_dir, cfg["tok_encode_text"])
            print("tokenizer encoding: " + " | ".join(f"{k} {v}" for k, v in results["encoding"].items()))
    return results


def model_facts(cfg: dict, device: torch.device) -> dict:
    """Resolved d_ff and n_kv_heads, training FLOPs per token, and the bf16 peak FLOP/s every path's MFU uses
    (the peer's denominator; 0 off CUDA or for an unknown GPU)."""
    model = new_model(cfg, device)
    return {"d_ff": model.config["d_ff"], "n_kv_heads": model.config["n_kv_heads"],
            "train_flops_per_token": 3 * model.flops_per_token(), "peak": train.peak_flops(device, torch.bfloat16)}


def time_paths(cfg: dict, paths: list[str], device: torch.device) -> list[dict]:
    """bench_training on each path; a path that fails is reported with its one-line error and the rest still run."""
    runs = []
    for path in paths:
        try:
            run = bench_training(cfg, path, device)
        except Exception as e:  # report a broken path and keep timing the others
            run = {"path": path, "error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]}
            print(f"{path:>10}: FAIL {run['error']}")
        else:
            print(f"{path:>10}: {run['ms_per_step']:8.2f} ms/step | {run['tokens_per_s']:>12,} tok/s | "
                  f"MFU {run['mfu']:.1%} | {run['dtype']}, {'compiled' if run['compiled'] else 'eager'}, fused: "
                  f"{run['fused'] or '-'} | first step {run['first_step_s']} s | peak mem {run['peak_mem_gb']} GB | "
                  f"loss {run['first_loss']} -> {run['last_loss']}")
        runs.append(run)
        torch._dynamo.reset()  # each path compiles from scratch and frees the last one's graphs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return runs


# ----------------------------------------------------------------------------------------------------------------
# The first-GPU check: what the machine has, every kernel against its reference, every path, and train.py itself
# ----------------------------------------------------------------------------------------------------------------

def environment() -> dict:
    """torch, CUDA, driver, Triton and the C compiler plus Python.h that Triton needs to build its launcher."""
    driver = "n/a"
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        try:
            driver = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            driver = "unknown"
    include = __import__("sysconfig").get_paths()["include"]
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "driver": driver,
            "triton": getattr(kernels.triton, "__version__", None), "cc": shutil.which(os.environ.get("CC", "cc")),
            "python_h": os.path.isfile(os.path.join(include, "Python.h"))}


def resume_check(cfg: dict, device: torch.device, root: str) -> tuple[bool, str]:
    """train.py with compile and kernels on random tokens: 40 steps, then resumed to 60, against 60 in one go. Two
    compilations need not pick the same kernels (autotuning; even on a CPU two fresh compiled runs differ in the
    last bits), so the weights are compared to a tolerance and the largest difference is reported."""
    for split, n in (("train", 1 << 20), ("val", 1 << 16)):
        np.random.default_rng(len(split)).integers(0, cfg["vocab_size"], n).astype("<u2").tofile(f"{root}/{split}.bin")
    run = {**path_config(cfg, "kernels"), "device": str(device), "train_data": f"{root}/train.bin",
           "val_data": f"{root}/val.bin", "tokenizer_dir": f"{root}/tok", "eval_interval": 20, "log_interval": 10,
           "eval_tokens": 16 * cfg["context_length"], "warmup_iters": 10, "max_iters": 60, "cosine_iters": 60}
    whole = train.main({**run, "out_dir": f"{root}/whole"})
    train.main({**run, "out_dir": f"{root}/split", "max_iters": 40})
    resumed = train.main({**run, "out_dir": f"{root}/split", "resume": True})
    pairs = list(zip(whole["model"].state_dict().values(), resumed["model"].state_dict().values()))
    diff = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
    close = all(torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4) for a, b in pairs)
    ok = close and whole["status"] == resumed["status"] == "done" and resumed["step"] == 60
    return ok, (f"val loss {whole['val_loss']:.5f} in one go, {resumed['val_loss']:.5f} resumed; largest weight "
                f"difference {diff:.1e}")


def gpu_check(cfg: dict, device: torch.device) -> dict:
    """Every check, one PASS/FAIL line each; the JSON summary is the last line bench.py prints."""
    results = {}

    def check(name: str, ok: bool, detail: str = "") -> None:
        results[name] = bool(ok)
        print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")

    env = environment()
    check("environment", device.type == "cuda" and env["triton"] and env["cc"] and env["python_h"],
          ", ".join(f"{k} {v}" for k, v in env.items()))
    try:
        check("kernels against their references", check_kernels(cfg, device))
    except Exception as e:  # check_kernels reports each kernel itself; this is a failure around them
        check("kernels against their references", False, f"{type(e).__name__}: {str(e)[:200]}")
    runs = time_paths(cfg, list(PATHS), device)
    for run in runs:
        check(f"path {run['path']}", "error" not in run, run.get("error", f"{run.get('ms_per_step')} ms/step"))
    with tempfile.TemporaryDirectory() as root:
        name = "train.py 40 steps, resumed to 60, against 60 in one go"
        try:
            check(name, *resume_check(cfg, device, root))
        except Exception as e:
            check(name, False, f"{type(e).__name__}: {e}"[:300])
    return {"environment": env, "checks": results, "training": runs, "ok": all(results.values())}


def check_bench_config(cfg: dict) -> list[str]:
    """The paths to time, after one-line refusals of counts that cannot work and of files that are not there."""
    paths = [p for p in cfg["paths"].split(",") if p]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"paths: unknown {', '.join(unknown)}; use a comma-separated list of {', '.join(PATHS)}")
    for key, least in (("steps", 1), ("burn_in", 0), ("generate_tokens", 0)):
        if cfg[key] < least:
            raise ValueError(f"{key}={cfg[key]} is not allowed; use at least {least}")
    files = [("tok_train", spec.rpartition(":")[0]) for spec in filter(None, cfg["tok_train"].split(","))]
    files += [("tok_encode_text", cfg["tok_encode_text"])] if cfg["tok_train"] or cfg["tok_encode_dir"] else []
    for key, path in files:
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{key}: {path} not found (paths are relative to where you run bench.py); "
                                    f"pass an existing file, or --{key}= to skip it")
    return paths


def main(argv: list[str]) -> dict:
    argv = ["--tiny=True" if arg == "--tiny" else "--gpu_check=True" if arg == "--gpu_check" else arg for arg in argv]
    cfg = configure(DEFAULTS, argv)
    if cfg["tiny"]:
        cfg.update({k: v for k, v in TINY.items() if f"--{k}=" not in " ".join(argv)})
    paths = check_bench_config(cfg)
    device = train.pick_device(cfg["device"], 0)
    if cfg["gpu_check"] and device.type != "cuda" and not cfg["tiny"]:  # the full model on a CPU: over 10 minutes
        raise ValueError(f"gpu_check=True needs a CUDA device, not {device}; run it on a GPU, or add --tiny for "
                         "the small smoke run")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores, as the peer does
    cfg.update(model_facts(cfg, device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name} | torch {torch.__version__} | triton kernels {'on' if kernels.available() else 'off'} | "
          f"batch {cfg['batch_size']} x {cfg['grad_accum_steps']} x {cfg['context_length']} | "
          f"{cfg['train_flops_per_token'] / 1e6:.1f} MFLOPs/token (training) | "
          f"peak {cfg['peak'] / 1e12:.0f} TFLOP/s bf16")
    result = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "config": {k: cfg[k] for k in DEFAULTS}}
    if cfg["gpu_check"]:
        return {**result, **gpu_check(cfg, device)}
    if cfg["check"] and device.type == "cuda":
        result["checks_ok"] = check_kernels(cfg, device)
    result["training"] = time_paths(cfg, paths, device)
    if cfg["generate_tokens"]:
        result["generation"] = bench_generation(cfg, device)
        gen = result["generation"]["tokens_per_s"]
        print(f"generation: KV cache {gen['kv_cache']} tok/s | recompute {gen['recompute']} tok/s | "
              f"identical {gen['identical']}")
    if cfg["tok_train"] or cfg["tok_encode_dir"]:
        result["tokenizer"] = bench_tokenizer(cfg)
    return result


def cli(argv: list[str]) -> int:
    """Print every figure as one JSON line (per-step losses left out); exit 1 when a --gpu_check check failed."""
    result = main(argv)
    for run in result.get("training", []):
        run.pop("losses", None)
    print(json.dumps(result))
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    run_cli(cli)
