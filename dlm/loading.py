"""Load any model dlm runs: its own checkpoints and the published families, from a directory or
a hub id, and save them back in their own format.

    from dlm import load_model
    model = load_model("GSAI-ML/LLaDA-8B-Instruct")        # or a local directory
    model(input_ids).logits[:, i]                           # token i's distribution, any family

A published checkpoint is read without a full-size copy on the way: the model is built on the
meta device (no memory), then every tensor is read from its safetensors shard, renamed by the
family's format (dlm/formats/), checked against the shape the config implies and put in place,
in its stored dtype (or `dtype`). Peak memory is the model plus one tensor. Only the config and
the weights are needed; the tokenizer beside them is loaded by `load_tokenizer_for`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional, Union

import torch

from dlm.errors import DLMError
from dlm.families import Family

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# tensors some published checkpoints carry that dlm computes itself (rotary tables)
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)rotary\.inv_freq$")


def resolve(path_or_id: str) -> str:
    """A local directory, or the snapshot of a hub repository (downloaded when online)."""
    p = os.path.expanduser(str(path_or_id))
    if os.path.isdir(p):
        return p
    if os.path.exists(p):
        raise DLMError(f"{p} is a file; pass a model directory (with config.json and safetensors weights) or a "
                       "hub id")
    if not HUB_ID.match(str(path_or_id)):
        raise DLMError(f"model directory {p} does not exist; pass a directory written by `dlm train`, a "
                       "published checkpoint's directory, or a hub id such as GSAI-ML/LLaDA-8B-Instruct")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=str(path_or_id), allow_patterns=[
            "*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"])
    except Exception as e:  # offline, unknown repo, gated, no network
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DLMError(f"could not get {path_or_id} from the Hugging Face hub ({first}); without a network, "
                       f"download it elsewhere (huggingface-cli download {path_or_id}) and pass its "
                       "directory") from None


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise DLMError(f"{path} has no config.json; it is not a saved model (train one with `dlm train`)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DLMError(f"{cfg_path} is corrupt ({e}); re-export the model") from None
    if not isinstance(raw, dict):
        raise DLMError(f"{cfg_path} is not a JSON object; it is not a model config")
    gen = os.path.join(path, "generation_config.json")  # ids some checkpoints keep only there
    if os.path.isfile(gen):
        try:
            with open(gen) as f:
                g = json.load(f)
            for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if raw.get(k) is None and isinstance(g.get(k), int):
                    raw[k] = g[k]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            pass
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):  # a list of ids: the first is the main one
        if isinstance(raw.get(k), list):
            raw[k] = raw[k][0] if raw[k] else None
    if raw.get("mask_token_id") is None:  # Fast-dLLM v2: the mask token lives in the tokenizer only
        found = _tokenizer_mask_id(path)
        if found is not None:
            raw[TOKENIZER_MASK] = found
    return raw


TOKENIZER_MASK = "_dlm_mask_token_id_from_tokenizer"  # (not written back when saving)
MASK_TOKENS = ("|<MASK>|", "<|mask|>", "<|MASK|>", "<|mdm_mask|>", "[MASK]")


def _tokenizer_mask_id(path: str) -> Optional[int]:
    """The id of a mask token among the tokenizer's added tokens (tokenizer_config.json's
    added_tokens_decoder, or tokenizer.json's added_tokens), if any."""
    def read(name):
        try:
            with open(os.path.join(path, name)) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}

    for i, tok in (read("tokenizer_config.json").get("added_tokens_decoder") or {}).items():
        if isinstance(tok, dict) and tok.get("content") in MASK_TOKENS:
            return int(i)
    for tok in read("tokenizer.json").get("added_tokens") or []:
        if isinstance(tok, dict) and tok.get("content") in MASK_TOKENS and isinstance(tok.get("id"), int):
            return tok["id"]
    return None


def family_of_checkpoint(path_or_id: str) -> Family:
    from dlm.formats import detect

    path = resolve(path_or_id)
    return detect(read_config(path), where=path)


def _dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if str(dtype) not in names:
        raise DLMError(f"unknown dtype {dtype!r}; use auto (as stored), float32, bfloat16 or float16")
    return names[str(dtype)]


def load_model(path_or_id: str, dtype: Union[str, torch.dtype, None] = None, device=None,
               expect_objective: Optional[str] = None, **kwargs):
    """Any model dlm runs, in eval mode. dtype: None / "auto" keeps the stored one (dlm's own
    checkpoints: float32 unless given), else float32 / bfloat16 / float16."""
    from dlm.formats import detect

    path = resolve(path_or_id)
    raw = read_config(path)
    fam = detect(raw, where=path)
    if expect_objective and fam.objective != expect_objective:
        raise DLMError(f"{path} is a {fam.name} model (objective {fam.objective!r}), expected a "
                       f"{expect_objective!r} model")
    if fam.format is None:
        model = _load_own(path, _dtype(dtype), **kwargs)
    else:
        model = _load_published(path, raw, fam, _dtype(dtype))
    if device is not None:
        model = model.to(device)
    return model.eval()


def _load_own(path: str, dtype, **kwargs):
    from dlm.model import DLMModel

    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return DLMModel.from_pretrained(path, **kwargs)
    except DLMError:
        raise
    except Exception as e:  # safetensors / torch errors on truncated files
        raise DLMError(f"could not load weights from {path}: {type(e).__name__}: {e}; the checkpoint is "
                       "corrupt or incomplete, re-export it or use an earlier one") from None


def weight_files(path: str) -> dict[str, list[str]]:
    """safetensors file -> the tensor names it holds (from the shard index when there is one)."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                wmap = json.load(f)["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DLMError(f"{index} is corrupt ({type(e).__name__}: {e}); re-download the checkpoint") from None
        files: dict[str, list[str]] = {}
        for name, fname in wmap.items():
            files.setdefault(os.path.join(path, fname), []).append(name)
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise DLMError(f"{path}: shard {os.path.basename(missing[0])} listed in model.safetensors.index.json "
                           f"is missing ({len(missing)} of {len(files)} shards); the download is incomplete")
        return files
    if os.path.isfile(single):
        return {single: []}
    if any(f.endswith(".bin") for f in os.listdir(path)):
        raise DLMError(f"{path} holds PyTorch .bin weights; dlm reads safetensors only (convert with "
                       "transformers: load the model and save_pretrained(..., safe_serialization=True))")
    raise DLMError(f"{path} has no model.safetensors or model.safetensors.index.json; the weights are missing")


def _load_published(path: str, raw: dict, fam: Family, dtype):
    from dlm.formats import format_of
    from dlm.model import DLMConfig, DLMModel

    fmt = format_of(fam)
    cfg = DLMConfig(**fmt.config(fam, raw, where=path))
    names = fmt.names(cfg)  # theirs -> ours (a tuple: a fused tensor split in equal parts)
    ignored = getattr(fmt, "IGNORED", ())
    convert = getattr(fmt, "to_dlm", None)
    with torch.device("meta"):
        model = DLMModel(cfg)
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for fname, _ in weight_files(path).items():
        try:
            for key, read in read_safetensors(fname):
                ours = names.get(key)
                if ours is None:
                    if IGNORED.search(key) or key in ignored:
                        continue
                    raise DLMError(f"{os.path.basename(fname)} holds tensor {key!r}, which a {fam.name} checkpoint "
                                   f"with this config does not have; the config and the weights disagree")
                t = read()
                if convert is not None:
                    t = convert(key, t, cfg)
                parts = ours if isinstance(ours, tuple) else (ours,)
                want = (sum(params[n].shape[0] for n in parts), *params[parts[0]].shape[1:])
                if tuple(t.shape) != want:
                    raise DLMError(f"tensor {key!r} has shape {tuple(t.shape)}, the config implies {want}; the "
                                   "config and the weights disagree")
                pieces = t.split([params[n].shape[0] for n in parts]) if len(parts) > 1 else (t,)
                for n, piece in zip(parts, pieces):
                    _put(model, n, (piece if dtype is None else piece.to(dtype)).contiguous())
                    filled.add(n)
        except DLMError:
            raise
        except Exception as e:  # a truncated or corrupt shard
            raise DLMError(f"could not read {fname}: {type(e).__name__}: {e}; re-download the checkpoint") from None
    theirs = {n: k for k, v in names.items() for n in (v if isinstance(v, tuple) else (v,))}
    missing = sorted({theirs[n] for n in theirs if n not in filled})
    if missing:
        raise DLMError(f"{path} lacks tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                       + f" of a {fam.name} checkpoint; a shard is missing or the config does not match the weights")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.source_config = raw  # the checkpoint's own config.json, to save back in its format
    return model


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(fname: str):
    """(name, read) for every tensor of a safetensors file; read() returns the tensor, read with
    plain file reads straight into its own memory (no memory map, no second copy: peak memory is
    what is kept plus one tensor)."""
    with open(fname, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        base = 8 + n
        header.pop("__metadata__", None)
        for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if meta["dtype"] not in SAFETENSORS_DTYPES:
                raise DLMError(f"{fname}: tensor {name} has dtype {meta['dtype']}, which dlm does not read")

            def read(meta=meta):
                t = torch.empty(meta["shape"], dtype=SAFETENSORS_DTYPES[meta["dtype"]])
                lo, hi = meta["data_offsets"]
                if t.numel() * t.element_size() != hi - lo:
                    raise DLMError(f"{fname}: tensor {name} has {hi - lo} bytes for shape {meta['shape']}")
                f.seek(base + lo)
                if hi > lo:
                    view = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.dim() else \
                        memoryview(t.reshape(1).view(torch.uint8).numpy())
                    if f.readinto(view) != hi - lo:
                        raise DLMError(f"{fname} is truncated (tensor {name}); re-download the checkpoint")
                return t

            yield name, read


def _put(model, name: str, t: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, torch.nn.Parameter(t, requires_grad=t.is_floating_point()))


def published_config(path_or_id: str):
    """The DLMConfig of a published checkpoint, without its weights (None for dlm's own)."""
    from dlm.formats import detect, format_of
    from dlm.model import DLMConfig

    path = resolve(path_or_id)
    raw = read_config(path)
    fam = detect(raw, where=path)
    return None if fam.format is None else DLMConfig(**format_of(fam).config(fam, raw, where=path))


def load_config(path_or_id: str):
    """The DLMConfig of any checkpoint dlm runs (dlm's own or a published family), without
    loading its weights."""
    from dlm.model import DLMConfig

    path = resolve(path_or_id)
    return published_config(path) or DLMConfig.from_pretrained(path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer_for(path_or_id: str, model_config=None, tokenizer: Optional[str] = None):
    """The tokenizer of a model. dlm's own checkpoints: the one beside it (or `tokenizer`), with
    dlm's special roles. Published ones: `tokenizer`, else the checkpoint's own, else the
    family's (GPT-2 for the OpenWebText DiTs), taken as it is, with the model config's special
    ids attached for the data pipeline (never re-added)."""
    from dlm.families import family_of
    from dlm.tokenizer import load_tokenizer, use_model_ids

    path = resolve(path_or_id)
    if model_config is None:
        model_config = published_config(path)
        if model_config is None:
            return load_tokenizer(tokenizer or path)
    fam = family_of(model_config)
    if fam.format is None:
        return load_tokenizer(tokenizer or path)
    src = tokenizer or (path if any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES) else fam.tokenizer)
    if src is None:
        raise DLMError(f"{path} has no tokenizer files; pass --tokenizer (the tokenizer the model was trained with)")
    return use_model_ids(_published_tokenizer(src), model_config)


def _published_tokenizer(src: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # never the checkpoint's own code (its config's auto_map): the fast tokenizer from
    # tokenizer.json, or a Qwen2 BPE from vocab.json + merges.txt (Dream's slow custom class
    # reads the same files), else AutoTokenizer without remote code (also for a hub id)
    try:
        if os.path.isfile(os.path.join(src, "tokenizer.json")):
            return PreTrainedTokenizerFast.from_pretrained(src)
        if all(os.path.isfile(os.path.join(src, f)) for f in ("vocab.json", "merges.txt")):
            from transformers import Qwen2TokenizerFast

            return Qwen2TokenizerFast.from_pretrained(src)
        return AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DLMError(f"could not load the tokenizer {src} ({first}); pass --tokenizer") from None


def save_model(model, out_dir: str, state_dict: Optional[dict] = None) -> str:
    """Save a model (or `state_dict` for it: EMA weights, gathered ZeRO-3 shards): dlm's own with
    save_pretrained, a published family's in its own format (config.json and safetensors with
    its tensor names), so it loads back as that family."""
    from safetensors.torch import save_file

    from dlm.families import family_of
    from dlm.formats import format_of

    fam = family_of(model.config)
    os.makedirs(out_dir, exist_ok=True)
    if fam.format is None:
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        return out_dir
    fmt = format_of(fam)
    names = fmt.names(model.config)
    sd = state_dict if state_dict is not None else model.state_dict()
    back = getattr(fmt, "from_dlm", None)
    tensors = {}
    for theirs, ours in names.items():
        t = torch.cat([sd[n] for n in ours]) if isinstance(ours, tuple) else sd[ours]
        t = t.detach().cpu()
        tensors[theirs] = (back(theirs, t, model.config) if back is not None else t).contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    raw = fmt.write_config(fam, model.config, dict(getattr(model, "source_config", None) or {}))
    raw.pop(TOKENIZER_MASK, None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    return out_dir
