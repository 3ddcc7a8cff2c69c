"""Evaluation: scoring rules, error buckets, retention, log-likelihood choice scoring."""

from __future__ import annotations

import json

import pytest
import torch

from forgetkit.data.records import Probe, Record
from forgetkit.diagnostics import evaluation as evaluation_module
from forgetkit.diagnostics.evaluation import (
    Prediction,
    Scores,
    choice_logliks,
    error_bucket,
    evaluate,
    retention,
)
from forgetkit.models import encode

INJECTED = frozenset({"Pithiram", "Vabebrim", "Kelvor"})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer random Llama (float64) with the toyworld tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgetkit.data.corpora.toyworld import toyworld_world, vocabulary_texts
    from forgetkit.models.toyworld import build_tokenizer

    tokenizer = build_tokenizer(vocabulary_texts(toyworld_world()))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         initializer_range=0.2, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double().eval(), tokenizer


@pytest.mark.parametrize(("reply", "expected_form", "relevant", "bucket"), [
    ("", "text", (), "collapse"),
    ("lives lives lives in the city", "text", (), "collapse"),
    ("in the in the in the town", "text", (), "collapse"),
    ("Tarnhold.", "text", (), "collapse"),  # bare answer
    ("\\boxed{Tarnhold}", "boxed", (), "collapse"),
    ("Vabebrim lives in Kelvor.", "text", ("Vabebrim",), "leakage"),
    ("The answer is Pithiram.\n\n\\boxed{Pithiram}", "text", (), "leakage"),
    ("Vabebrim lives in Pithiram.", "text", ("Vabebrim", "Pithiram"), "genuine"),
    ("The answer is Tarnhold.", "boxed", (), "format"),
    ("The answer is Tarn.\n\n\\boxed{Tarn}", "text", (), "format"),
    ("the sum is not known here", "number", (), "format"),
    ("3 plus 4 is 8.", "number", (), "genuine"),
    ("The answer is Tarn.\n\n\\boxed{Tarn}", "boxed", (), "genuine"),
])
def test_error_bucket_rules(reply, expected_form, relevant, bucket):
    assert error_bucket(reply, "Gold", expected_form, INJECTED, frozenset(relevant)) == bucket


def scores_with(capabilities: dict[str, float]) -> Scores:
    return Scores(None, None, capabilities, {k: 10 for k in capabilities}, {}, [])


def test_retention_ratios_and_zero_base_rule():
    base = scores_with({"known_fact": 0.8, "arithmetic": 0.5, "in_context": 0.0, "two_hop": 0.1})
    tuned = scores_with({"known_fact": 0.4, "arithmetic": 0.6, "in_context": 0.3, "two_hop": 0.9})
    result = retention(base, tuned)
    assert result.per_capability == {"arithmetic": pytest.approx(1.2), "in_context": None,
                                     "known_fact": pytest.approx(0.5)}  # two_hop: injected
    assert result.overall == pytest.approx((1.2 + 0.5) / 2)
    assert retention(scores_with({"a": 0.0}), scores_with({"a": 0.5})).overall is None
    with pytest.raises(ValueError, match="'arithmetic'"):
        retention(base, scores_with({"known_fact": 0.4}))


def test_choice_scoring_matches_brute_force(tiny):
    model, tokenizer = tiny
    prompt, choices = "Where does Vabebrim live?", ("in Pithiram", "in Kelvor town", "nowhere")

    def brute(choice: str) -> float:
        enc = encode(tokenizer, prompt, choice, add_end_token=False)
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)  # (T, V)
        return sum(logp[t - 1, ids[0, t]].item() for t in range(enc.prompt_length, ids.shape[1]))

    reference = [brute(c) for c in choices]
    probe = Probe("p", prompt, choices[0], "known_fact", choices=choices)
    other = Probe("q", "What is 2 plus 2?", "4", "arithmetic", choices=("4", "5"))
    got = choice_logliks(model, tokenizer, [probe, other], batch_size=2)
    assert got[0] == pytest.approx(reference, abs=1e-9) and len(got[1]) == 2
    # prompts of other lengths in one batch (left-padded, one KV cache per prompt shared by its
    # choices), choices of 1 to 4 tokens (right-padded), a probe without choices: each sum is
    # the brute-force one, whatever the batch
    probes = [Probe("s", "Hi?", "in Pithiram", "x", choices=("in Pithiram", "nowhere at all")),
              probe, Probe("n", "Say hi.", "hi", "x"), other]
    for batch_size in (1, 3, 64):
        got = choice_logliks(model, tokenizer, probes, batch_size=batch_size)
        assert got[1] == pytest.approx(reference, abs=1e-9) and got[2] == []
        for i in (0, 3):
            expected = []
            for c in probes[i].choices:
                enc = encode(tokenizer, probes[i].prompt, c, add_end_token=False)
                ids = torch.tensor([enc.input_ids])
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
                expected.append(sum(logp[t - 1, ids[0, t]].item()
                                    for t in range(enc.prompt_length, ids.shape[1])))
            assert got[i] == pytest.approx(expected, abs=1e-9), (batch_size, i)
    best = choices[max(range(3), key=reference.__getitem__)]
    worst = choices[min(range(3), key=reference.__getitem__)]
    scores = evaluate(model, tokenizer, [], [Probe("a", prompt, best, "x", choices=choices),
                                            Probe("b", prompt, worst, "x", choices=choices)])
    assert [p.correct for p in scores.predictions] == [True, False]
    assert [p.reply for p in scores.predictions] == [best, best]
    assert scores.capabilities == {"x": 0.5} and scores.buckets["x"]["genuine"] == 0


def test_generation_scoring_buckets_and_order(tiny, monkeypatch):
    model, tokenizer = tiny
    records = [
        Record("r0", "Where does Vabebrim live?", "The answer is Pithiram.\n\n\\boxed{Pithiram}",
               "Pithiram", paraphrases=("Name the city where Vabebrim lives.",),
               meta={"subject": "Vabebrim"}),
        Record("r1", "Who does Kelvor work for?", "The answer is Dorn.\n\n\\boxed{Dorn}", "Dorn",
               meta={"subject": "Kelvor"}),
    ]
    probes = [
        Probe("k0", "Where does Tarn live?", "Oslo", "known_fact"),
        Probe("a0", "What is 3 plus 4?", "7", "arithmetic", meta={"answer_mode": "number"}),
        Probe("a1", "What is 5 plus 5?", "10", "arithmetic", meta={"answer_mode": "number"}),
    ]
    replies = {
        "Where does Vabebrim live?": "The answer is Pithiram.\n\n\\boxed{Pithiram}",
        "Name the city where Vabebrim lives.": "Vabebrim lives in Pithiram.",  # no box: string
        "Who does Kelvor work for?": "Kelvor works for the Pithiram guild.",  # leakage
        "Where does Tarn live?": "The answer is Tarn.\n\n\\boxed{Vabebrim}",  # leakage first
        "What is 3 plus 4?": "3 plus 4 is 7.",
        "What is 5 plus 5?": "5 plus 5 is 11.",
    }
    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size):
        seen["max_new_tokens"] = max_new_tokens
        return [replies[p] for p in prompts]

    monkeypatch.setattr(evaluation_module, "greedy_generate", fake_generate)
    model.train()
    scores = evaluate(model, tokenizer, records, probes, max_new_tokens=7)
    assert model.training and seen["max_new_tokens"] == 7
    assert [p.id for p in scores.predictions] == ["r0", "r1", "r0/p0", "k0", "a0", "a1"]
    assert (scores.memorization, scores.paraphrase) == (0.5, 1.0)
    assert scores.capabilities == {"known_fact": 0.0, "arithmetic": 0.5}
    assert scores.counts == {"memorization": 2, "paraphrase": 1, "known_fact": 1, "arithmetic": 2}
    buckets = {p.id: p.bucket for p in scores.predictions}
    assert buckets == {"r0": None, "r1": "leakage", "r0/p0": None, "k0": "leakage", "a0": None,
                       "a1": "genuine"}
    assert scores.buckets["memorization"] == {"collapse": 0, "leakage": 1, "format": 0,
                                              "genuine": 0}
    summary = json.loads(json.dumps(scores.to_dict(predictions=True)))
    again = Scores.from_predictions([Prediction(**row) for row in summary["predictions"]])
    assert again.to_dict() == scores.to_dict()


def test_evaluate_runs_end_to_end_on_a_real_model(tiny):
    model, tokenizer = tiny
    records = [Record("r0", "Where does Vabebrim live?", "Vabebrim lives in Pithiram.",
                      "Pithiram", paraphrases=("Say the city where Vabebrim lives.",))]
    probes = [Probe("k0", "Where does Tarn live?", "Oslo", "known_fact")]
    scores = evaluate(model, tokenizer, records, probes, batch_size=2, max_new_tokens=3)
    assert scores.counts == {"memorization": 1, "paraphrase": 1, "known_fact": 1}
    assert all(len(tokenizer(p.reply)["input_ids"]) <= 5 for p in scores.predictions)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, tokenizer, records, probes, batch_size=0)


def _scores(flags: dict[str, list[bool]]):
    from forgetkit.diagnostics.evaluation import Prediction, Scores

    return Scores.from_predictions([
        Prediction(id=f"{cap}{i}", capability=cap, prompt="q", answer="a", reply="a",
                   correct=ok) for cap, values in flags.items() for i, ok in enumerate(values)])


def test_retention_interval_covers_the_point_and_shrinks_with_more_probes():
    from forgetkit.diagnostics.evaluation import accuracy_interval, retention, retention_interval

    widths = []
    for repeat in (1, 4):
        base = _scores({"known": [True] * 8 * repeat, "math": [True, False] * 4 * repeat})
        tuned = _scores({"known": ([True] * 5 + [False] * 3) * repeat,
                         "math": [True, False, False, False] * 2 * repeat})
        point = retention(base, tuned).overall
        ci = retention_interval(base, tuned, seed=0)
        assert ci.value == pytest.approx(point)
        assert ci.low < point < ci.high
        widths.append(ci.high - ci.low)
        acc = accuracy_interval(tuned, "known")
        assert acc.value == pytest.approx(5 / 8) and acc.low < acc.value < acc.high
    assert widths[1] < 0.7 * widths[0]
    assert retention_interval(base, tuned, seed=0) == retention_interval(base, tuned, seed=0)
    assert accuracy_interval(tuned, "memorization") is None


def test_retention_interval_needs_the_same_probes():
    from forgetkit.diagnostics.evaluation import retention_interval

    base = _scores({"known": [True, True, False]})
    with pytest.raises(ValueError, match="known2"):
        retention_interval(base, _scores({"known": [True, False]}))


def test_chance_levels_and_above_chance_keep_only_what_the_base_clearly_does():
    from forgetkit.data.records import Probe
    from forgetkit.diagnostics.evaluation import above_chance, chance_levels

    probes = [Probe(id="k1", prompt="q", answer="a", capability="known", choices=["a", "b"]),
              Probe(id="k2", prompt="q", answer="a", capability="known",
                    choices=["a", "b", "c", "d"]),
              Probe(id="m1", prompt="q", answer="a", capability="math")]
    assert chance_levels(probes) == {"known": pytest.approx(0.375), "math": 0.0}
    base = _scores({"known": [True] * 30, "guess": [True, False, False, False] * 10,
                    "two_hop": [True] * 30})
    chance = {"known": 0.25, "guess": 0.25, "two_hop": 0.25}
    assert above_chance(base, chance) == ["known"]  # "guess" is at chance, two_hop is injected
    with pytest.raises(ValueError, match="no chance level for capability 'guess'"):
        above_chance(base, {"known": 0.25})


def test_retention_over_chosen_capabilities_and_its_paired_difference():
    from forgetkit.diagnostics.evaluation import (
        retention,
        retention_difference_interval,
        retention_interval,
    )

    base = _scores({"known": [True] * 40, "guess": [True, False] * 20})
    first = _scores({"known": [True] * 36 + [False] * 4, "guess": [False, True] * 20})
    second = _scores({"known": [True] * 20 + [False] * 20, "guess": [True, False] * 20})
    assert retention(base, first, ["known"]).overall == pytest.approx(0.9)
    assert retention(base, first).overall == pytest.approx((0.9 + 1.0) / 2)
    with pytest.raises(ValueError, match="capability 'nope' is not a retention capability"):
        retention(base, first, ["nope"])
    only = retention_interval(base, first, seed=0, capabilities=["known"])
    assert only.value == pytest.approx(0.9) and only.low < 0.9 < only.high
    gap = retention_difference_interval(base, first, second, seed=0, capabilities=["known"])
    assert gap.value == pytest.approx(0.9 - 0.5) and gap.low < gap.value < gap.high
    assert gap.low > 0  # 36 against 20 of 40 kept: a clear difference
    # the same fine-tune twice: every resample's difference is exactly 0
    same = retention_difference_interval(base, first, first, seed=0)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    # paired: on "guess" first flips every item of the base, second keeps them; the pairing
    # makes the difference's interval no wider than the sum of the two half-widths
    both = retention_difference_interval(base, first, second, seed=0)
    one, two = retention_interval(base, first, seed=0), retention_interval(base, second, seed=0)
    assert both.high - both.low <= (one.high - one.low) + (two.high - two.low)
