"""Export a train.py checkpoint as a Hugging Face directory (Llama, or Qwen3 for qk_norm) that transformers loads.

    python export.py --out_dir=out/tinystories --to=hf/tinystories
    python export.py --out_dir=out/tinystories --to=hf/tinystories --dtype=bfloat16 --force=True

Then: AutoModelForCausalLM.from_pretrained("hf/tinystories") and AutoTokenizer.from_pretrained("hf/tinystories").
"""
import os
import time

import bpe
import hf
import train
from checkpoint import checkpoint_tokenizer, read_model_checkpoint
from configurator import configure, run_cli
from model import model_config

DEFAULTS = {
    "out_dir": train.DEFAULTS["out_dir"],  # directory holding ckpt.pt (written by train.py)
    "to": "",  # directory to write (config.json, model.safetensors, tokenizer.json, ...)
    "dtype": "float32",  # weights in the file: 'float32' | 'bfloat16'
    "force": False,  # replace an existing non-empty --to directory
}


def main(argv: list[str]) -> None:
    cfg = configure(DEFAULTS, argv)
    if not cfg["to"]:
        raise ValueError("--to is empty; name the directory to write, e.g. --to=hf/tinystories")
    hf.check_dtype(cfg["dtype"])
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    t0 = time.perf_counter()
    ckpt = read_model_checkpoint(ckpt_path, "export a checkpoint train.py wrote")
    try:
        hf.check_exportable(model_config(**ckpt["model_config"]))  # refuse unsupported flags before building anything
    except TypeError as e:
        raise ValueError(f"{ckpt_path} does not fit this model.py ({e})") from None
    model = hf.build_model(ckpt["model_config"], ckpt["model"], f"the weights in {ckpt_path}")
    tokenizer_dir, specials = checkpoint_tokenizer(ckpt, ckpt_path)  # or a one-line FileNotFoundError
    hf.save_pretrained(model, bpe.load_tokenizer(tokenizer_dir, specials), cfg["to"], cfg["dtype"], cfg["force"])
    size = os.path.getsize(os.path.join(cfg["to"], "model.safetensors"))
    print(f"wrote {cfg['to']} ({hf.hf_config(model.config, None)['architectures'][0]}, {cfg['dtype']}, "
          f"model.safetensors {size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    run_cli(main)
