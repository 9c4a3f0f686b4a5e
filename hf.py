"""Hugging Face interop: our TransformerLM as a Llama/Qwen3 directory that transformers loads, and back.

    save_pretrained(model, tokenizer, "hf/tinystories")       # config.json, model.safetensors, tokenizer.json, ...
    model, tokenizer = load_pretrained("hf/smollm2")           # a local Llama or Qwen3 directory -> TransformerLM

No transformers, tokenizers or safetensors package is needed: the safetensors format (8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes) is written and read here.
The one layout difference: our RoPE rotates interleaved pairs (x0, x1), (x2, x3), ...; HF's rotate_half rotates
x[k] with x[k + d/2]. Reordering each head's q/k rows (and the q_norm/k_norm gains) as [0, 2, 4, ..., 1, 3, 5, ...]
makes the HF model compute exactly our function, since the attention scores q.k are unchanged by the reordering.
"""
import json
import mmap
import os
import shutil
import struct
import sys
from itertools import chain

import regex
import torch
from torch import Tensor

import bpe
from checkpoint import state_dict_mismatch
from model import RotaryPositionalEmbedding, TransformerLM, model_config

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# what save_pretrained writes (and a hub download beside it); --force replaces a directory holding only these
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "README.md", ".gitattributes"}
# GPT-2's pre-tokenizer as HF's ByteLevel(use_regex=True) spells it; bpe.PAT is the same expression regrouped
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# our flags that Llama/Qwen3 have no equivalent for, with the value each needs
_NEEDED = {"norm": "pre", "pos": "rope", "ffn": "swiglu", "block": "serial", "logit_softcap": 0.0}


# ---------------------------------------------------------------------------------------------------- safetensors

def write_safetensors(path: str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors to path in the safetensors format, each as its own contiguous little-endian bytes."""
    if sys.byteorder != "little":
        raise OSError("write_safetensors writes the host's byte order, and this host is big-endian")
    header, offset = {}, 0
    blobs = []
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} is not one of {sorted(map(str, _DTYPE_NAMES))}")
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # a copy: no sharing
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensor bytes start 8-byte aligned
    with bpe.atomic_write(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.writelines(blobs)


def read_safetensors(path: str) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, as CPU tensors of its own dtype; a damaged file is one ValueError.
    The file is memory-mapped, so only the tensors' own copies take memory."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
            return _parse_safetensors(raw)
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                         "download or export it again") from None


def _parse_safetensors(raw: mmap.mmap) -> dict[str, Tensor]:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    tensors = {}
    for name, h in header.items():
        start, end = h["data_offsets"]
        count = 1
        for size in h["shape"]:
            count *= size
        dtype = DTYPES[h["dtype"]]
        if not 0 <= start <= end <= len(raw) - 8 - n or end - start != count * dtype.itemsize:
            raise ValueError(f"tensor {name} has data_offsets {start, end} that do not fit its shape or the file")
        data = bytearray(raw[8 + n + start:8 + n + end])  # the tensor's own writable copy of its bytes
        flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(h["shape"])
    return tensors


# ------------------------------------------------------------------------------------------------- weight names

def _rope_order(d_head: int) -> Tensor:
    """Row order taking our interleaved pairs to HF's halves: d_head=4 -> [0, 2, 1, 3]."""
    return torch.cat((torch.arange(0, d_head, 2), torch.arange(1, d_head, 2)))


def _permute_heads(w: Tensor, d_head: int, order: Tensor) -> Tensor:
    """Reorder the rows of each head: w (heads * d_head, ...) or a gain (d_head,)."""
    return w.unflatten(0, (-1, d_head))[:, order].flatten(0, 1)  # (heads, d_head, ...) -> (heads * d_head, ...)


def _name_map(cfg: dict) -> dict[str, str]:
    """Our state-dict name -> the HF name, for every tensor of a TransformerLM with cfg."""
    names = {"token_embeddings.weight": "model.embed_tokens.weight", "ln_final.weight": "model.norm.weight"}
    if not cfg["tie_embeddings"]:
        names["lm_head.weight"] = "lm_head.weight"
    per_layer = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
                 "attn.v_proj": "self_attn.v_proj", "attn.output_proj": "self_attn.o_proj",
                 "ln1": "input_layernorm", "ln2": "post_attention_layernorm",
                 "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj", "ffn.w2": "mlp.down_proj"}
    if cfg["qk_norm"]:
        per_layer |= {"attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}
    for i in range(cfg["num_layers"]):
        names |= {f"layers.{i}.{ours}.weight": f"model.layers.{i}.{theirs}.weight"
                  for ours, theirs in per_layer.items()}
    return names


def _convert(state_dict: dict[str, Tensor], cfg: dict, to_hf: bool) -> dict[str, Tensor]:
    """Rename and re-permute a state dict, ours -> HF (to_hf) or HF -> ours; missing tensors raise ValueError."""
    d_head = cfg["d_model"] // cfg["num_heads"]
    order = _rope_order(d_head)
    if not to_hf:
        order = torch.argsort(order)  # the inverse permutation
    names = _name_map(cfg) if to_hf else {v: k for k, v in _name_map(cfg).items()}
    missing = [name for name in names if name not in state_dict]
    if missing:
        raise ValueError(f"the weights lack {len(missing)} tensors (e.g. {missing[0]}) that the config needs")
    out = {}
    for src, dst in names.items():
        w = state_dict[src].detach()
        if any(part in src for part in ("q_proj", "k_proj", "q_norm", "k_norm")):
            w = _permute_heads(w, d_head, order)
        out[dst] = w.contiguous()
    return out


# ------------------------------------------------------------------------------------------------------- export

def check_exportable(cfg: dict) -> str:
    """The HF architecture for a model config (LlamaForCausalLM, or Qwen3ForCausalLM with qk_norm), or a ValueError
    naming every flag that Llama and Qwen3 cannot express."""
    bad = [f"{k}={cfg[k]!r}" for k, v in _NEEDED.items() if cfg[k] != v]
    if bad:
        allowed = ", ".join(f"{k}={v!r}" for k, v in _NEEDED.items())
        verb = "has" if len(bad) == 1 else "have"
        raise ValueError(f"{', '.join(bad)} {verb} no Llama/Qwen3 equivalent; only models with {allowed} export")
    return "Qwen3ForCausalLM" if cfg["qk_norm"] else "LlamaForCausalLM"


def hf_config(cfg: dict, tokenizer: bpe.Tokenizer | None, dtype: str = "float32") -> dict:
    """config.json for a model config: the fields Llama and Qwen3 read, in their names."""
    arch = check_exportable(cfg)
    eot = tokenizer.special_ids.get(bpe.EOT) if tokenizer else None
    return {"architectures": [arch], "model_type": "qwen3" if cfg["qk_norm"] else "llama",
            "vocab_size": cfg["vocab_size"], "hidden_size": cfg["d_model"], "intermediate_size": cfg["d_ff"],
            "num_hidden_layers": cfg["num_layers"], "num_attention_heads": cfg["num_heads"],
            "num_key_value_heads": cfg["n_kv_heads"], "head_dim": cfg["d_model"] // cfg["num_heads"],
            "hidden_act": "silu", "max_position_embeddings": cfg["context_length"], "rms_norm_eps": cfg["norm_eps"],
            "rope_theta": cfg["rope_theta"], "rope_scaling": None,  # both spellings: transformers 4.x and 5.x
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg["rope_theta"]},
            "tie_word_embeddings": cfg["tie_embeddings"], "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "use_cache": True, "bos_token_id": eot, "eos_token_id": eot,
            "torch_dtype": dtype, "dtype": dtype}


def tokenizer_json(tokenizer: bpe.Tokenizer) -> dict:
    """tokenizer.json (HF tokenizers' format): byte-level BPE, GPT-2's pre-tokenizer, our specials as added tokens.
    Specials keep their raw text in the vocab too, so the added token and the vocab entry agree on the id."""
    specials = {s.encode(): s for s in tokenizer.special_ids}
    vocab = {specials.get(t) or bpe._to_unicode(t): i for i, t in sorted(tokenizer.vocab.items())}
    if len(vocab) != tokenizer.vocab_size:
        raise ValueError("the tokenizer has two ids for the same token bytes; tokenizer.json can hold only one")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for s, i in sorted(tokenizer.special_ids.items(), key=lambda kv: kv[1])]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": byte_level, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab,
                      "merges": [f"{bpe._to_unicode(a)} {bpe._to_unicode(b)}" for a, b in tokenizer.merges]}}


def _tokenizer_files(tokenizer: bpe.Tokenizer, context_length: int) -> dict[str, dict]:
    """tokenizer.json plus the two small files AutoTokenizer reads to find it and its special tokens."""
    eot = bpe.EOT if bpe.EOT in tokenizer.special_ids else None
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot} if eot else {}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False, **special}
    return {"tokenizer.json": tokenizer_json(tokenizer), "tokenizer_config.json": config,
            "special_tokens_map.json": special}


def check_dtype(dtype: str) -> None:
    """The file dtypes export offers (and transformers' Llama/Qwen3 load): float32 or bfloat16."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r} is not allowed; use 'float32' or 'bfloat16'")


def check_target(path: str, force: bool) -> None:
    """path may be new, an empty directory, or (with force) an earlier export: a directory of an export's files
    alone, so that force never deletes a run, a repository or anything else a user keeps there."""
    bpe.check_writable(f"--to={path}", os.path.dirname(path))
    if not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path)):
        return
    if not os.path.isdir(path) or not force:
        raise FileExistsError(f"{path} exists and is not an empty directory; pick another --to or pass --force=True")
    others = sorted(n for n in os.listdir(path) if n not in EXPORT_FILES or not os.path.isfile(os.path.join(path, n)))
    if others:
        raise FileExistsError(f"--to={path} holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}, not "
                              "only an earlier export's files; --force=True replaces only an export: pick another --to")


def save_pretrained(model: TransformerLM, tokenizer: bpe.Tokenizer | None, path: str, dtype: str = "float32",
                    force: bool = False) -> None:
    """Write model (and tokenizer) as an HF directory at path. It is built in a temporary directory beside path and
    renamed into place, so path is never half written; an existing non-empty path is replaced only with force."""
    cfg = model.config
    check_dtype(dtype)
    if tokenizer is not None and max(tokenizer.vocab) >= cfg["vocab_size"]:
        raise ValueError(f"the tokenizer has ids up to {max(tokenizer.vocab)} but the model's vocab_size is "
                         f"{cfg['vocab_size']}; export with the tokenizer the model was trained with")
    path = os.path.abspath(path)
    check_target(path, force)
    weights = {k: v.to(getattr(torch, dtype)) for k, v in _convert(model.state_dict(), cfg, to_hf=True).items()}
    eot = tokenizer.special_ids.get(bpe.EOT) if tokenizer else None
    files = {"config.json": hf_config(cfg, tokenizer, dtype),
             "generation_config.json": {"bos_token_id": eot, "eos_token_id": eot}}
    if tokenizer is not None:
        files |= _tokenizer_files(tokenizer, cfg["context_length"])
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_safetensors(os.path.join(tmp, "model.safetensors"), weights, {"format": "pt"})
        for name, obj in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=1, ensure_ascii=False)
        if os.path.isdir(path) and os.listdir(path):  # force: swap the old directory out, then delete it
            os.rename(path, tmp + ".old")
            os.rename(tmp, path)
            shutil.rmtree(tmp + ".old")
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- import

def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def config_from_hf(hf: dict, where: str = "config.json") -> dict:
    """Our model config (MODEL_KEYS) for an HF Llama/Qwen3 config.json dict; anything we cannot run is a ValueError
    naming the field."""
    archs = hf.get("architectures")
    if archs not in (["LlamaForCausalLM"], ["Qwen3ForCausalLM"]):
        raise ValueError(f"{where}: architectures={archs} is not supported; "
                         "only LlamaForCausalLM and Qwen3ForCausalLM import")
    rope = hf.get("rope_parameters") or {}
    fields = (("attention_bias", hf.get("attention_bias", False), False),
              ("mlp_bias", hf.get("mlp_bias", False), False),
              ("rope_scaling", hf.get("rope_scaling") or None, None),
              ("rope_parameters.rope_type", rope.get("rope_type", "default"), "default"),
              ("use_sliding_window", hf.get("use_sliding_window", False), False),
              ("hidden_act", hf.get("hidden_act", "silu"), "silu"))
    refused = [f"{name}={value!r}" for name, value, needed in fields if value != needed]
    if refused:
        what = ", ".join(refused)
        raise ValueError(f"{where}: {what} is not supported (TransformerLM has no biases, rope scaling, "
                         "sliding windows or activations other than silu)")
    try:
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        if (hf.get("head_dim") or d // heads) * heads != d:
            raise ValueError(f"{where}: head_dim={hf.get('head_dim')} and hidden_size={d} with num_attention_heads="
                             f"{heads}; TransformerLM needs head_dim = hidden_size/num_attention_heads, a whole number")
        return model_config(vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"], d_model=d,
                            num_layers=hf["num_hidden_layers"], num_heads=heads, d_ff=hf["intermediate_size"],
                            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                            qk_norm=archs == ["Qwen3ForCausalLM"],
                            n_kv_heads=hf.get("num_key_value_heads") or heads,
                            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                            norm_eps=float(hf.get("rms_norm_eps", 1e-6)))  # transformers' default
    except KeyError as e:
        raise ValueError(f"{where} lacks {e.args[0]!r}; it is not a complete Llama/Qwen3 config") from None


def _read_weights(path: str) -> dict[str, Tensor]:
    """model.safetensors, or the shards listed by model.safetensors.index.json."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found; download the model again (only safetensors weights import)")
        tensors |= read_safetensors(file)
    return tensors


def _check_pre_tokenizer(pre: dict | None, where: str) -> bool:
    """Accept GPT-2's pre-tokenizer (ByteLevel with its regex, or Split(GPT-2's regex) then ByteLevel without one),
    optionally after Digits(individual_digits=True); returns whether digits are split off one by one."""
    given = list(pre.get("pretokenizers", [])) if pre and pre.get("type") == "Sequence" else [pre]
    digits = bool(given) and (given[0] or {}).get("type") == "Digits" and bool(given[0].get("individual_digits"))
    steps = given[1:] if digits else given
    split = steps[0] if len(steps) == 2 and (steps[0] or {}).get("type") == "Split" else None
    pattern = (split or {}).get("pattern", {}).get("Regex")
    ok_split = split is None or (pattern in (GPT2_PATTERN, bpe.PAT.pattern) and split.get("behavior") == "Isolated"
                                 and not split.get("invert"))
    level = (steps or [None])[-1] or {}
    ok_level = (len(steps) == (2 if split else 1) and level.get("type") == "ByteLevel"
                and not level.get("add_prefix_space") and level.get("use_regex", True) == (split is None))
    if not (ok_split and ok_level):
        kinds = "+".join(str((step or {}).get("type")) for step in given)
        raise ValueError(f"{where}: pre_tokenizer {kinds} is not GPT-2's byte-level pattern (optionally after "
                         "single digits), the one bpe.Tokenizer implements; such a tokenizer cannot be used here")
    return digits


class DigitsTokenizer(bpe.Tokenizer):
    """bpe.Tokenizer that first cuts every digit off on its own, as HF's Digits(individual_digits=True) pre-tokenizer
    does before GPT-2's pattern (SmolLM2's tokenizer): "in 2024" -> "in", " ", "2", "0", "2", "4"."""

    DIGIT = regex.compile(r"(\p{N})")  # Rust's char::is_numeric, which HF's Digits tests, is \p{N}

    def _encode_segment(self, segment: str) -> tuple[int, ...]:
        pieces = [p for p in self.DIGIT.split(segment) if p]
        if len(pieces) == 1:
            return super()._encode_segment(segment)
        return tuple(chain.from_iterable(map(self._cache.__getitem__, pieces)))


def read_tokenizer_json(path: str) -> bpe.Tokenizer:
    """Our Tokenizer for an HF tokenizer.json that is byte-level BPE with GPT-2's pre-tokenizer (same ids); a
    DigitsTokenizer when the pre-tokenizer first splits off single digits."""
    tj = _read_json(path)
    m = tj.get("model") or {}
    if m.get("type") != "BPE":
        raise ValueError(f"{path}: model type {m.get('type')!r} is not byte-level BPE (SentencePiece/Unigram and "
                         "WordPiece tokenizers are not supported)")
    flags = {k: m.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback",
                                   "ignore_merges")}
    if tj.get("normalizer") or any(flags.values()):
        what = ", ".join(f"{k}={v!r}" for k, v in {"normalizer": tj.get("normalizer"), **flags}.items() if v)
        raise ValueError(f"{path}: {what} is not supported; bpe.Tokenizer is plain byte-level BPE")
    digits = _check_pre_tokenizer(tj.get("pre_tokenizer"), path)
    added = tj.get("added_tokens", [])
    stripping = [a["content"] for a in added if a.get("lstrip") or a.get("rstrip") or a.get("single_word")]
    if stripping:
        raise ValueError(f"{path}: added token {stripping[0]!r} strips spaces or matches single words; not supported")
    specials = {a["content"]: a["id"] for a in added}
    vocab = {i: t.encode() if t in specials else bpe._from_unicode(t, path) for t, i in m.get("vocab", {}).items()}
    vocab |= {i: s.encode() for s, i in specials.items()}
    merges = [tuple(pair.split(" ") if isinstance(pair, str) else pair) for pair in m.get("merges", [])]
    if any(len(pair) != 2 for pair in merges):
        raise ValueError(f"{path}: a merge is not a pair of tokens")
    merges = [(bpe._from_unicode(a, path), bpe._from_unicode(b, path)) for a, b in merges]
    tok = (DigitsTokenizer if digits else bpe.Tokenizer)(vocab, merges, list(specials))
    if any(tok.special_ids[s] != i for s, i in specials.items()):
        raise ValueError(f"{path}: an added token's id differs from its id in the vocab")
    return tok


def _read_tokenizer(path: str) -> bpe.Tokenizer | None:
    file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(file):
        return read_tokenizer_json(file)
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        raise ValueError(f"{path}/tokenizer.model is a SentencePiece tokenizer; only byte-level BPE "
                         "tokenizer.json files import")
    return None


def read_pretrained(path: str) -> dict:
    """A local HF Llama/Qwen3 directory as {"model_config": MODEL_KEYS dict, "state_dict": our names, float32,
    "tokenizer": Tokenizer or None (no tokenizer.json)}. Nothing is downloaded."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found; point hf:PATH at a downloaded model directory")
    hf = _read_json(config_path)
    cfg = config_from_hf(hf, config_path)
    weights = _read_weights(path)
    if cfg["tie_embeddings"]:
        weights.pop("lm_head.weight", None)  # some savers write the tied matrix twice
    state_dict = {k: v.float() for k, v in _convert(weights, cfg, to_hf=False).items()}
    tokenizer = _read_tokenizer(path)
    if tokenizer is not None and max(tokenizer.vocab) >= cfg["vocab_size"]:
        raise ValueError(f"{path}: tokenizer id {max(tokenizer.vocab)} is past vocab_size={cfg['vocab_size']}")
    return {"model_config": cfg, "state_dict": state_dict, "tokenizer": tokenizer}


def build_model(cfg: dict, state_dict: dict[str, Tensor], where: str = "the weights") -> TransformerLM:
    """TransformerLM(**cfg) holding state_dict's tensors, without the cost of a random init: built on the meta device,
    the weights assigned (keys and shapes checked), the RoPE tables (buffers outside the state dict) made anew."""
    try:
        model = TransformerLM(**cfg, device="meta")
    except TypeError as e:
        raise ValueError(f"{where} do not fit this model.py: {e}") from None
    problem = state_dict_mismatch(model.state_dict(), state_dict)  # the same check as load_checkpoint's
    if problem:
        raise ValueError(f"{where} do not fit this model.py: {problem}")
    model.load_state_dict(state_dict, assign=True)
    d_head = cfg["d_model"] // cfg["num_heads"]
    device = model.token_embeddings.weight.device
    rope = RotaryPositionalEmbedding(cfg["rope_theta"], d_head, cfg["context_length"], device)
    for layer in model.layers:
        if layer.attn.rope is not None:
            layer.attn.rope = rope
    return model


def load_pretrained(path: str, device=None) -> tuple[TransformerLM, bpe.Tokenizer | None]:
    """A local HF Llama/Qwen3 directory as our TransformerLM (float32, eval mode) and its tokenizer (None if absent)."""
    pretrained = read_pretrained(path)
    model = build_model(pretrained["model_config"], pretrained["state_dict"], path)
    return model.to(device or "cpu").eval(), pretrained["tokenizer"]
