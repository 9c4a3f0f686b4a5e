"""Sample text from a trained checkpoint, decoding with a KV cache.

    python sample.py --out_dir=out/demo
    python sample.py --out_dir=out/tinystories --prompt="Once upon a time" --temperature=0.8 --top_p=0.95
    python sample.py --out_dir=out/demo --compare=True     # time KV-cache decoding against recomputing the prefix

The tokenizer and its special tokens are the run's, as its checkpoint records them; a sample stops at the first
special token (the run's document separator), and a prompt may hold any of them.
"""
import os
import sys
import time

import torch
from torch import Tensor

import bpe
import hf
import train
from checkpoint import checkpoint_tokenizer, read_model_checkpoint
from configurator import configure, run_cli
from model import TransformerLM, softmax

DEFAULTS = {
    "out_dir": train.DEFAULTS["out_dir"],  # directory holding ckpt.pt (written by train.py)
    "init_from": "",  # '' = out_dir/ckpt.pt; 'hf:PATH' = a local Hugging Face Llama/Qwen3 directory (see hf.py)
    "prompt": "Once upon a time",  # text the samples continue
    "temperature": 0.8,  # 0 (or below 1e-38) = greedy; below 1 sharpens, above 1 flattens the distribution
    "top_p": 0.95,  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)
    "max_new_tokens": 256,  # tokens generated per sample (fewer if the run's document separator comes first)
    "num_samples": 3,  # samples printed
    "seed": 0,  # seeds the sampling generator: same seed, same samples
    "device": "auto",  # 'auto' picks cuda, then mps, then cpu
    "compare": False,  # also time greedy decoding with and without the KV cache and check they agree
}


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p, renormalised. probs: (vocab,).

    Example: probs (0.5, 0.3, 0.15, 0.05) with top_p=0.7 keeps 0.5 and 0.3 -> (0.625, 0.375, 0, 0).
    """
    sorted_probs, order = probs.sort(descending=True)
    mass_before = torch.cat((sorted_probs.new_zeros(1), sorted_probs.cumsum(0)[:-1]))  # of the tokens ranked above
    drop = mass_before >= top_p  # those above already reach top_p
    drop[0] = False  # the most likely token always stays, also when a tiny top_p rounds to 0 in float32
    sorted_probs[drop] = 0
    kept = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return kept / kept.sum()


def next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Pick a token from logits (vocab,): argmax if temperature is 0, else sample the nucleus of softmax(logits / T).

    A temperature below float32's smallest normal number (1.2e-38) is greedy too, the limit as T -> 0: divided by a
    T that rounds to 0 in float32, the top logit would be 0 / 0 = nan.
    """
    if temperature < torch.finfo(torch.float32).tiny:
        return int(logits.argmax())
    logits = logits.float()
    probs = softmax((logits - logits.max()) / temperature, -1)  # shifted first: a tiny T gives -inf, never inf - inf
    if top_p < 1:
        probs = top_p_filter(probs, top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: TransformerLM, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, eos_id: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> list[int]:
    """Continue prompt_ids by up to max_new_tokens tokens, stopping before eos_id; returns the new ids.

    The model sees at most the last context_length tokens. With use_cache, each new token costs one position until
    the cache is full; then positions must restart at 0, so each further token re-encodes the last context_length - 1
    tokens before its own step. Either way the logits equal those of the model run on the cropped prefix.
    """
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty; give at least one token")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is not allowed; use 0 (greedy) or a positive value such as 0.8")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is not allowed; use a value in (0, 1], 1 = off")
    ctx, device = model.config["context_length"], model.token_embeddings.weight.device
    ids = list(prompt_ids)[-ctx:]

    def as_batch(tokens: list[int]) -> Tensor:
        return torch.tensor([tokens], dtype=torch.long, device=device)  # (1, len(tokens))

    cache = model.new_kv_cache(1) if use_cache else None
    logits = model(as_batch(ids), cache)[0, -1]  # prefill: (vocab,)
    new = []
    for _ in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, generator)
        if token == eos_id:
            break
        new.append(token)
        ids = (ids + [token])[-ctx:]
        if not use_cache:
            logits = model(as_batch(ids))[0, -1]
            continue
        if cache.length == ctx:  # full: rebuild it from the window that precedes the new token
            cache.reset()
            model(as_batch(ids[:-1]), cache)
        logits = model(as_batch([token]), cache)[0, -1]
    return new


def time_decoding(model: TransformerLM, prompt_ids: list[int], max_new_tokens: int) -> dict:
    """Greedy decoding with the KV cache and by recomputing the prefix: speed of each and whether the tokens agree."""
    tokens, speed = {}, {}
    for use_cache in (True, False):
        t0 = time.perf_counter()
        tokens[use_cache] = generate(model, prompt_ids, max_new_tokens, 0.0, use_cache=use_cache)
        speed[use_cache] = len(tokens[use_cache]) / (time.perf_counter() - t0)  # int(token) syncs the GPU each step
    return {"tokens": len(tokens[True]), "cache_tokens_per_s": speed[True], "recompute_tokens_per_s": speed[False],
            "identical": tokens[True] == tokens[False]}


def load_model(ckpt_path: str, device: torch.device) -> tuple[TransformerLM, bpe.Tokenizer]:
    """Rebuild the model of a train.py checkpoint on device, in eval mode, and load its run's tokenizer."""
    ckpt = read_model_checkpoint(ckpt_path, "sample a checkpoint train.py wrote, or a Hugging Face directory with "
                                            "--init_from=hf:PATH")  # or one line for a missing or damaged file
    try:
        model = TransformerLM(**ckpt["model_config"])
    except TypeError as e:
        raise ValueError(f"{ckpt_path} does not fit this model.py ({type(e).__name__}: {e})") from None
    tokenizer_dir, special_tokens = checkpoint_tokenizer(ckpt, ckpt_path)
    tokenizer = bpe.load_tokenizer(tokenizer_dir, special_tokens)
    if tokenizer.vocab_size > model.config["vocab_size"]:  # its ids would index past the embedding
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size:,} tokens but the model of "
                         f"{ckpt_path} only {model.config['vocab_size']:,}; it is not the tokenizer of this run")
    train.load_checkpoint(ckpt, model, None)
    return model.to(device).eval(), tokenizer


def main(argv: list[str]) -> None:
    cfg = configure(DEFAULTS, argv, echo=sys.stderr)  # stdout holds only the samples (and --help)
    for key in ("max_new_tokens", "num_samples"):
        if cfg[key] < 1:
            raise ValueError(f"{key}={cfg[key]} is not allowed; use a count of at least 1")
    device = train.pick_device(cfg["device"], local_rank=0)
    if cfg["init_from"].startswith("hf:"):
        model, tokenizer = hf.load_pretrained(cfg["init_from"][3:], device)
        if tokenizer is None:
            raise ValueError(f"{cfg['init_from'][3:]} has no tokenizer.json; sampling needs one")
    elif cfg["init_from"]:
        raise ValueError(f"init_from={cfg['init_from']!r} is not allowed; use '' (out_dir/ckpt.pt) or 'hf:PATH'")
    else:
        model, tokenizer = load_model(os.path.join(cfg["out_dir"], "ckpt.pt"), device)
    prompt_ids = tokenizer.encode(cfg["prompt"])
    if not prompt_ids:
        raise ValueError("the prompt is empty; pass --prompt=\"some text\"")
    eos_id = next(iter(tokenizer.special_ids.values()), None)  # the first special token separates documents
    generator = torch.Generator(device).manual_seed(cfg["seed"])
    for i in range(cfg["num_samples"]):
        new = generate(model, prompt_ids, cfg["max_new_tokens"], cfg["temperature"], cfg["top_p"], eos_id, generator)
        print(f"--- sample {i + 1}/{cfg['num_samples']} ---\n{tokenizer.decode(prompt_ids + new)}")
    if cfg["compare"]:
        timing = time_decoding(model, prompt_ids, cfg["max_new_tokens"])
        print(f"greedy, {timing['tokens']} tokens: KV cache {timing['cache_tokens_per_s']:.1f} tokens/s, "
              f"recompute {timing['recompute_tokens_per_s']:.1f} tokens/s, identical tokens: {timing['identical']}")


if __name__ == "__main__":
    run_cli(main)
