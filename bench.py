"""Benchmark the training step: the fast path (bf16 autocast, torch.compile, kernels.py's fused ops, compiled AdamW)
against the plain model, then KV-cache generation against recomputing the prefix, then the tokenizer.

    python bench.py                                   # the TinyStories model at batch 128 on CUDA
    python bench.py --device=cpu --tiny               # a small model on CPU, in seconds
    python bench.py --paths=fast --compile_mode=reduce-overhead   # the fast path with CUDA graphs
    python bench.py --help                            # every key

Random tokens; each path gets a fresh model from the same seed, `burn_in` untimed steps (compilation happens there),
then `steps` timed steps bracketed by synchronize (nanoGPT bench.py). On CUDA it first checks every kernel against
its reference at the model's shapes, since Triton's CPU interpreter cannot run bf16 matmuls. The last stdout line is
one JSON object with every figure.
"""
import collections
import json
import os
import sys
import tempfile
import time
import traceback

import torch

import bpe
import kernels
import sample
import train
from configurator import configure
from model import MODEL_KEYS, TransformerLM
from optim import AdamW, clip_grad_norm

DEFAULTS = {
    **{key: train.DEFAULTS[key] for key in MODEL_KEYS},  # the TinyStories model (train.py's defaults)
    **{key: train.DEFAULTS[key] for key in ("batch_size", "lr", "betas", "eps", "weight_decay", "grad_clip", "z_loss",
                                            "seed")},
    "device": "cuda",  # 'cuda' | 'cuda:1' | 'cpu'
    "tiny": False,  # a 2-layer, 64-wide model at batch 4 with few steps and no compile: a smoke test in seconds
    "paths": "fast,fast_attn_ce,compiled,reference",  # training paths to time, in order (see PATHS)
    "burn_in": 10,  # untimed steps per path (torch.compile compiles here)
    "steps": 40,  # timed steps per path
    "compile_mode": "default",  # torch.compile mode: 'default' | 'reduce-overhead' (CUDA graphs) | 'max-autotune'
    "check": True,  # on CUDA, check each kernel (and the model's fast loss) against the reference first
    "generate_tokens": 200,  # tokens per generation timing (0 = skip); greedy, from a 16-token prompt
    "tok_train": "data/shakespeare_train.txt.gz:10000",  # FILE:VOCAB[,...] to train tokenizers on ('' = skip)
    "tok_encode_dir": "",  # tokenizer dir (vocab.json + merges.txt) to time encoding with; '' = the last one trained
    "tok_encode_text": "data/shakespeare_val.txt.gz",  # text to encode ('' = skip)
}
TINY = dict(vocab_size=512, context_length=64, d_model=64, num_layers=2, num_heads=4, d_ff=None, batch_size=4,
            burn_in=2, steps=3, generate_tokens=40, tok_train="data/shakespeare_val.txt.gz:600")

# How each training path runs: `compile` wraps model.loss (and, with the 'compiled' optimizer, clipping and AdamW);
# `kernels` names the ops model.use_kernels routes through kernels.py; `optimizer` is 'compiled'
# (kernels.adamw_step_compiled), 'foreach' or 'loop' (optim.AdamW).
ALL_OPS = ("rmsnorm", "swiglu", "attention", "cross_entropy")
PATHS = {
    "fast": dict(bf16=True, compile=True, kernels=ALL_OPS, optimizer="compiled"),
    "fast_attn_ce": dict(bf16=True, compile=True, kernels=("attention", "cross_entropy"), optimizer="compiled"),
    "kernels": dict(bf16=True, compile=False, kernels=ALL_OPS, optimizer="compiled"),  # eager: the kernels alone
    "compiled": dict(bf16=True, compile=True, kernels=(), optimizer="foreach"),  # train.py --compile=True today
    "reference": dict(bf16=False, compile=False, kernels=(), optimizer="loop"),  # the plain model in float32
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_model(cfg: dict, device: torch.device) -> TransformerLM:
    torch.manual_seed(cfg["seed"])
    return TransformerLM(**{key: cfg[key] for key in MODEL_KEYS}, device=device)


def compiled_adamw(groups: list[tuple[list[torch.Tensor], float]], cfg: dict, device: torch.device, compiled: bool):
    """AdamW through kernels.adamw_step(_compiled): moments as tensor lists, t and lr as 0-D device tensors that
    change in place, so the compiled step never recompiles. Returns step(lr)."""
    adamw_step = kernels.adamw_step_compiled if compiled else kernels.adamw_step
    state = [(params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], wd)
             for params, wd in groups]
    t, lr_t = torch.zeros((), device=device), torch.zeros((), device=device)

    def step(lr: float) -> None:
        t.add_(1)
        lr_t.fill_(lr)
        for params, exp_avgs, exp_avg_sqs, wd in state:
            adamw_step(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, t, lr_t, *cfg["betas"], cfg["eps"], wd)

    return step


def make_optimizer(model: TransformerLM, cfg: dict, kind: str, device: torch.device, compiled: bool):
    """step(lr) for the optimizer kind; matrices decay, norm gains do not (as in train.py)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    gains = [p for p in model.parameters() if p.dim() < 2]
    if kind == "compiled":
        return compiled_adamw([(ps, wd) for ps, wd in ((matrices, cfg["weight_decay"]), (gains, 0.0)) if ps], cfg,
                              device, compiled)
    groups = [g for g in ({"params": matrices}, {"params": gains, "weight_decay": 0.0}) if g["params"]]
    optimizer = AdamW(groups, lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"], weight_decay=cfg["weight_decay"],
                      foreach=kind == "foreach")

    def step(lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()

    return step


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak allocated memory in GB (10^9 bytes, the peer's unit); None off CUDA."""
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None


def bench_training(cfg: dict, path: str, device: torch.device) -> dict:
    """Time `steps` training steps (forward, backward, clip, AdamW) of one path on a fixed random batch."""
    spec = PATHS[path]
    if device.type == "cuda":  # peak over the whole path, compilation included, as the peer measures it
        torch.cuda.reset_peak_memory_stats(device)
    model = new_model(cfg, device)
    model.use_kernels(spec["kernels"])
    compiled = spec["compile"] and cfg["compile_enabled"]
    loss_fn = torch.compile(model.loss, dynamic=False, mode=cfg["compile_mode"]) if compiled else model.loss
    optimizer_step = make_optimizer(model, cfg, spec["optimizer"], device, compiled)
    params = list(model.parameters())
    compile_step = compiled and spec["optimizer"] == "compiled"
    clip = torch.compile(clip_grad_norm, dynamic=False) if compile_step else clip_grad_norm
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"])
    tokens = torch.randint(0, cfg["vocab_size"], (cfg["batch_size"], cfg["context_length"] + 1), device=device,
                           generator=torch.Generator(device).manual_seed(cfg["seed"]))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> torch.Tensor:
        with autocast:
            ce, z = loss_fn(x, y)
        (ce + cfg["z_loss"] * z if cfg["z_loss"] else ce).backward()
        clip(params, cfg["grad_clip"] or float("inf"))
        optimizer_step(cfg["lr"])
        model.zero_grad(set_to_none=True)
        return ce.detach()

    first_loss = float(step())
    for _ in range(cfg["burn_in"] - 1):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        loss = step()
    synchronize(device)
    dt = (time.perf_counter() - t0) / cfg["steps"]
    tokens_per_s = cfg["batch_size"] * cfg["context_length"] / dt
    mfu = tokens_per_s * cfg["train_flops_per_token"] / cfg["peak"] if cfg["peak"] else 0.0
    return {"path": path, **spec, "kernels": ",".join(spec["kernels"]), "compile": compiled,
            "ms_per_step": round(1000 * dt, 2), "tokens_per_s": round(tokens_per_s), "mfu": round(mfu, 4),
            "peak_mem_gb": peak_memory_gb(device), "first_loss": round(first_loss, 4),
            "last_loss": round(float(loss), 4)}


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


def main(argv: list[str]) -> dict:
    argv = ["--tiny=True" if arg == "--tiny" else arg for arg in argv]  # the one bare flag
    cfg = configure(DEFAULTS, argv)
    if cfg["tiny"]:
        cfg.update({k: v for k, v in TINY.items() if f"--{k}=" not in " ".join(argv)})
    paths = [p for p in cfg["paths"].split(",") if p]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"paths: unknown {', '.join(unknown)}; use a comma-separated list of {', '.join(PATHS)}")
    device = train.pick_device(cfg["device"], 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores, as the peer does
    cfg["compile_enabled"] = device.type == "cuda" and not cfg["tiny"]  # Inductor on CPU needs minutes and a compiler
    cfg.update(model_facts(cfg, device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name} | torch {torch.__version__} | triton kernels {'on' if kernels.available() else 'off'} | "
          f"batch {cfg['batch_size']} x {cfg['context_length']} | {cfg['train_flops_per_token'] / 1e6:.1f} "
          f"MFLOPs/token (training) | peak {cfg['peak'] / 1e12:.0f} TFLOP/s bf16")
    result = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "config": {k: cfg[k] for k in DEFAULTS}}
    if cfg["check"] and device.type == "cuda":
        result["checks_ok"] = check_kernels(cfg, device)
    result["training"] = []
    for path in paths:
        try:
            run = bench_training(cfg, path, device)
        except Exception as e:  # report a broken path and keep timing the others
            traceback.print_exc()
            run = {"path": path, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        else:
            print(f"{path:>12}: {run['ms_per_step']:8.2f} ms/step | {run['tokens_per_s']:>12,} tok/s | "
                  f"MFU {run['mfu']:.1%} | peak mem {run['peak_mem_gb']} GB | loss {run['first_loss']} -> "
                  f"{run['last_loss']}")
        result["training"].append(run)
        torch._dynamo.reset()  # each path compiles from scratch and frees the last one's graphs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if cfg["generate_tokens"]:
        result["generation"] = bench_generation(cfg, device)
        gen = result["generation"]["tokens_per_s"]
        print(f"generation: KV cache {gen['kv_cache']} tok/s | recompute {gen['recompute']} tok/s | "
              f"identical {gen['identical']}")
    if cfg["tok_train"] or cfg["tok_encode_dir"]:
        result["tokenizer"] = bench_tokenizer(cfg)
    return result


if __name__ == "__main__":
    try:
        print(json.dumps(main(sys.argv[1:])))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
