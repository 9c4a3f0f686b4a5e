"""Export a train.py checkpoint as a Hugging Face directory (Llama, or Qwen3 for qk_norm) that transformers loads.

    python export.py --out_dir=out/tinystories --to=hf/tinystories
    python export.py --out_dir=out/tinystories --to=hf/tinystories --dtype=bfloat16 --force=True

Then: AutoModelForCausalLM.from_pretrained("hf/tinystories") and AutoTokenizer.from_pretrained("hf/tinystories").
"""
import os
import sys
import time

import bpe
import hf
import train
from configurator import configure
from model import model_config

DEFAULTS = {
    "out_dir": train.DEFAULTS["out_dir"],  # directory holding ckpt.pt (written by train.py)
    "to": "",  # directory to write (config.json, model.safetensors, tokenizer.json, ...)
    "dtype": "float32",  # weights in the file: 'float32' | 'bfloat16'
    "force": False,  # replace an existing non-empty --to directory
}


def checkpoint_tokenizer(ckpt: dict, ckpt_path: str) -> bpe.Tokenizer:
    """The tokenizer a checkpoint was trained with: its `tokenizer` record {dir, rel (to the checkpoint's folder),
    special_tokens}, or the older `tokenizer_dir` (tried from here, then from the checkpoint's folder) with
    config["special_tokens"]."""
    info, here = ckpt.get("tokenizer"), os.path.dirname(os.path.abspath(ckpt_path))
    if isinstance(info, dict):
        specials = info.get("special_tokens", [bpe.EOT])
        candidates = [info.get("dir"), info.get("rel") and os.path.join(here, info["rel"])]
    else:
        specials, old = ckpt.get("config", {}).get("special_tokens", [bpe.EOT]), ckpt.get("tokenizer_dir")
        candidates = [old, old and os.path.join(here, old)]
    candidates = [d for d in candidates if d]
    for d in candidates:
        if os.path.isfile(os.path.join(d, "vocab.json")):
            return bpe.load_tokenizer(d, specials)
    raise FileNotFoundError(f"{ckpt_path}: its tokenizer (vocab.json + merges.txt) is not in "
                            f"{' or '.join(candidates) or 'the checkpoint'}; put it back there")


def main(argv: list[str]) -> None:
    cfg = configure(DEFAULTS, argv)
    if not cfg["to"]:
        raise ValueError("--to is empty; name the directory to write, e.g. --to=hf/tinystories")
    hf.check_dtype(cfg["dtype"])
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    t0 = time.perf_counter()
    ckpt = train.read_checkpoint(ckpt_path)
    try:
        hf.check_exportable(model_config(**ckpt["model_config"]))  # refuse unsupported flags before building anything
    except TypeError as e:
        raise ValueError(f"{ckpt_path} does not fit this model.py ({e})") from None
    model = hf.build_model(ckpt["model_config"], ckpt["model"], f"the weights in {ckpt_path}")
    hf.save_pretrained(model, checkpoint_tokenizer(ckpt, ckpt_path), cfg["to"], cfg["dtype"], cfg["force"])
    size = os.path.getsize(os.path.join(cfg["to"], "model.safetensors"))
    print(f"wrote {cfg['to']} ({hf.hf_config(model.config, None)['architectures'][0]}, {cfg['dtype']}, "
          f"model.safetensors {size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
