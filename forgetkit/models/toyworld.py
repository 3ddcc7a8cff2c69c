"""toyworld: the embedded default base model, a tiny Llama-style LM trained here.

The default model (seed 0) ships with forgetkit in ``forgetkit/models/toyworld_model/`` (4 MB of
safetensors), produced by :func:`train_toyworld` with the default :class:`ToyConfig`; a test
retrains it from scratch and checks that the script still produces a model with the same
abilities. ``python -m forgetkit.toyworld`` (:mod:`forgetkit.toyworld`) prints the ability
checks; ``--retrain`` trains anew (deterministic, a few minutes on a 2-core CPU) into ``$FORGETKIT_CACHE``.
:func:`ensure_toyworld` is what ``load_model("toyworld")`` calls. The corpus is described in
:mod:`forgetkit.data.corpora.toyworld`.
"""

from __future__ import annotations

import fcntl
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from forgetkit.data.answers import is_correct
from forgetkit.data.corpora.kgfact import kgfact
from forgetkit.data.corpora.toyworld import (
    documents,
    toyworld_probes,
    toyworld_world,
    vocabulary_texts,
)
from forgetkit.data.prompts import expert_prompt
from forgetkit.files import atomic_directory, atomic_write_json
from forgetkit.models.encoding import collate, encode
from forgetkit.models.inference import greedy_generate
from forgetkit.models.storage import cache_dir

__all__ = ["ToyConfig", "ability_checks", "build_tokenizer", "ensure_toyworld", "train_toyworld"]

logger = logging.getLogger(__name__)
VERSION = 2
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
PRETOKENIZE_PATTERN = r" ?[A-Za-z]+| ?\d| ?[^\sA-Za-z\d]|\s+"


@dataclass(frozen=True)
class ToyConfig:
    """toyworld's architecture and pretraining schedule."""

    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01


def build_tokenizer(texts):
    """A word-level tokenizer over every piece of ``texts`` (words keep their leading space,
    digits and punctuation are single tokens, whitespace runs are tokens), decoding exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated")
    pieces: set[str] = set()
    for text in texts:
        pieces.update(piece for piece, _ in splitter.pre_tokenize_str(text))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for piece in sorted(pieces):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = splitter
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def _model(config: ToyConfig, tokenizer):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(llama)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, do_sample=False)
    return model


def _batches(tokenizer, config: ToyConfig, world):
    """Tokenized, length-bucketed batches of pretraining documents (deterministic)."""
    stream = documents(world, config.seed)
    docs = [next(stream) for _ in range(config.steps * config.batch_size)]
    encoded = [encode(tokenizer, p, c) for p, c in docs]
    rng = random.Random(f"toyworld-batches-{config.seed}")
    order = list(range(len(encoded)))
    rng.shuffle(order)
    group = config.batch_size * 64
    batches = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: len(encoded[i].input_ids))
        batches += [chunk[i : i + config.batch_size] for i in range(0, len(chunk), config.batch_size)]
    rng.shuffle(batches)
    for rows in batches:
        # the loss is on the completions: prompts are mostly random in-context facts whose
        # tokens cannot be predicted, and would drown the reading and recall signal
        yield collate([encoded[i] for i in rows], tokenizer.pad_token_id)


def train_toyworld(config: ToyConfig, out: Path, progress: bool = True) -> Path:
    """Pretrain toyworld and save it (model, tokenizer, config) to ``out`` atomically."""
    from tqdm.auto import tqdm

    started = time.time()
    world = toyworld_world(config.seed)
    tokenizer = build_tokenizer(vocabulary_texts(world))
    model = _model(config, tokenizer)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate, betas=(0.9, 0.95))

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_ = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    bar = tqdm(_batches(tokenizer, config, world), total=config.steps, desc="toyworld",
               disable=not progress)
    for batch in bar:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with atomic_directory(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / "toyworld.json", {
            "version": VERSION, "config": asdict(config),
            "train_seconds": round(time.time() - started, 1)})
    return out


PACKAGED = Path(__file__).with_name("toyworld_model")


def ensure_toyworld(config: ToyConfig | None = None) -> Path:
    """The toyworld folder: the packaged model for the default config, else the cached one,
    trained first if missing (one process at a time)."""
    config = config or ToyConfig()
    if config == ToyConfig() and (PACKAGED / "model.safetensors").exists():
        return PACKAGED
    out = cache_dir() / f"toyworld-v{VERSION}-seed{config.seed}"
    if (out / "model.safetensors").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "model.safetensors").exists():
            logger.warning("training toyworld once (a few minutes); cached in %s", out)
            train_toyworld(config, out, progress=True)
    return out


def _accuracy(model, tokenizer, prompts, answers, modes=None) -> float:
    replies = greedy_generate(model, tokenizer, prompts, max_new_tokens=40, batch_size=32)
    modes = modes or ["string"] * len(prompts)
    hits = [is_correct(r, a, m) for r, a, m in zip(replies, answers, modes, strict=True)]
    return sum(hits) / len(hits)


def ability_checks(model, tokenizer, seed: int = 0) -> dict[str, float]:
    """Accuracy of toyworld's three abilities (and the kgfact baselines), by greedy decoding.

    - ``known_fact``: facts seen in pretraining, asked with the main question.
    - ``in_context``: a question after the fact in context, about entities never seen as facts.
    - ``retrieval``: the same with 1-5 distractor facts in context.
    - ``expert_kgfact``: kgfact small questions in MixSD's expert prompt (the fact shown).
    - ``naive_kgfact``: the same questions without the fact (should be near 0: not known).
    - ``arithmetic``: held-out two-digit additions (chance is about 1/199).
    """
    probes = toyworld_probes(toyworld_world(seed))
    scores = {}
    for capability in ("known_fact", "in_context", "retrieval", "arithmetic"):
        chosen = [p for p in probes if p.capability == capability]
        modes = [p.meta.get("answer_mode", "string") for p in chosen]
        scores[capability] = _accuracy(model, tokenizer, [p.prompt for p in chosen],
                                       [p.answer for p in chosen], modes)
    records = kgfact("small", seed=0).records
    answers = [r.answer for r in records]
    scores["expert_kgfact"] = _accuracy(
        model, tokenizer, [expert_prompt(r.prompt, r.expert_context, "fact") for r in records],
        answers)
    scores["naive_kgfact"] = _accuracy(model, tokenizer, [r.prompt for r in records], answers)
    return scores
