"""The hallucination eval (evals/hallucination.py): rank buckets, ECE on hand-made lists, teacher-forced answer
confidence against a manual forward pass, scripted answerers through the full run (exact values), config validation,
check(), and the real run on an untrained tiny llama."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llm_limits import evals
from llm_limits.evals import EVALS, EvalResult, LimitSpec, read_limit
from llm_limits.evals.hallucination import (
    Hallucination,
    HallucinationConfig,
    answer_confidences,
    answer_span,
    bucket_ranges,
    expected_calibration_error,
    expected_train_questions,
    rank_bucket,
    reliability,
)
from llm_limits.evals.tasks import kb, world
from llm_limits.trainers.build.tokenizers import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"num_entities": 20, "rank_buckets": [5, 20], "examples_per_bucket": 3, "unanswerable_examples": 3,
        "rag_distractors": 2, "max_new_tokens": 8, "batch_size": 8}
"""The real run: 6 closed-book, 3 unanswerable and 3 RAG questions."""


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def tiny_llama(vocab_size: int, positions: int = 256):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=positions))


def knowledge_of(config: HallucinationConfig) -> kb.KnowledgeBase:
    return kb.build_kb(kb.KBConfig(kb_seed=config.kb_seed, num_entities=config.num_entities,
                                   attributes=config.attributes, values_per_attribute=config.values_per_attribute,
                                   zipf=config.zipf))


def asked(prompt: str) -> tuple[str, str]:
    """``(attribute, entity)`` of a prompt's question."""
    question = next(line for line in prompt.split("\n") if line.startswith(kb.QUESTION_PREFIX))[2:-1]
    attribute, entity = question.split(" of ")
    return attribute, entity


# --- pure pieces -----------------------------------------------------------------------------------------------------
def test_buckets():
    assert bucket_ranges([10, 25, 50, 100, 200]) == [(1, 10), (11, 25), (26, 50), (51, 100), (101, 200)]
    bounds = [10, 25, 50]
    assert [rank_bucket(r, bounds) for r in range(1, 52)] == [0] * 10 + [1] * 15 + [2] * 25 + [None]
    assert rank_bucket(0, bounds) is None and rank_bucket(5, [5]) == 0
    # one expected count per entity: summed over the bucket sizes it is every training question
    probabilities = kb.zipf_probabilities(200, 1.0)
    expected = expected_train_questions(probabilities, [10, 25, 50, 100, 200], 2000)
    sizes = [hi - lo + 1 for lo, hi in bucket_ranges([10, 25, 50, 100, 200])]
    assert sum(v * n for v, n in zip(expected.values(), sizes)) == pytest.approx(2000)
    assert list(expected.values()) == sorted(expected.values(), reverse=True)
    assert expected[10.0] == pytest.approx(2000 * sum(probabilities[:10]) / 10)


def test_expected_calibration_error_by_hand():
    # perfectly calibrated: 0.8-confident answers right 4 times in 5
    assert expected_calibration_error([0.8] * 5, [True] * 4 + [False]) == pytest.approx(0.0)
    # overconfident: always 1.0, right half the time
    assert expected_calibration_error([1.0] * 4, [True, False, True, False]) == 0.5
    # bins (0.2, 0.3] and (0.9, 1.0]: (2 * |0 - 0.3| + 2 * |1 - 0.95|) / 4 = (0.6 + 0.1) / 4
    assert expected_calibration_error([0.3, 0.3, 0.9, 1.0], [False, False, True, True]) == pytest.approx(0.175)
    # an edge belongs to the bin it closes: 0.3 is in (0.2, 0.3], 0 in the first bin
    assert [centre for centre, *_ in reliability([0.3, 0.0, 0.31], [True, True, True])] == [0.05, 0.25, 0.35]
    # the bin count matters: 0.4 and 0.6 share a bin of 2 but not of 10
    assert expected_calibration_error([0.4, 0.6], [False, True], bins=1) == pytest.approx(0.0)
    assert expected_calibration_error([0.4, 0.6], [False, True], bins=10) == pytest.approx(0.4)
    assert math.isnan(expected_calibration_error([], []))


def test_answer_span():
    assert answer_span("E:none\nA:teln\nQ:home of Vokar?\nA:zzz") == (9, 13, True)
    assert answer_span("A: teln") == (2, 7, False) and answer_span("") is None and answer_span("E:none\n") is None


def test_answer_confidence_is_the_teacher_forced_probability(tokenizer):
    """Against one manual forward pass per sequence: the answer's tokens and its newline, or its EOS."""
    model = tiny_llama(len(tokenizer))
    prompt = "Q:home of Vokar?\n"
    completions = ["E:none\nA:teln\nQ:x", "A:teln", "E:none", "A:pilo"]
    got = answer_confidences(model, tokenizer, [prompt] * 4, completions, batch_size=2)
    got_one = answer_confidences(model, tokenizer, [prompt] * 4, completions, batch_size=1)

    def manual(text: str, scored: int, eos: bool) -> float:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        return math.exp(sum(float(logp[i - 1, ids[i]]) for i in range(len(ids) - scored, len(ids))))

    assert got[0] == pytest.approx(manual(prompt + "E:none\nA:teln\n", 5, eos=False), rel=1e-4)  # "teln\n"
    assert got[1] == pytest.approx(manual(prompt + "A:teln", 5, eos=True), rel=1e-4)  # "teln<eos>"
    assert math.isnan(got[2]) and 0.0 < got[3] < 1.0 and got[1] != got[3]
    assert got_one[:2] == pytest.approx(got[:2], rel=1e-4) and got_one[3] == pytest.approx(got[3], rel=1e-4)


def test_registered_and_spec():
    assert EVALS["hallucination"] is Hallucination and evals.Hallucination is Hallucination
    assert Hallucination.limit == "hallucination" and Hallucination.summary
    assert Hallucination().spec() == LimitSpec(metric="closed_book_accuracy", axis="rank",
                                               axis_values=(10.0, 25.0, 50.0, 100.0, 200.0), higher_is_better=True,
                                               threshold=0.5, limit="hallucination", limit_unit="entities")
    assert HallucinationConfig().kb_seed == kb.KBConfig().kb_seed == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank_buckets": [10, 400]}, r"rank_buckets must be <= num_entities \(200\) \(got \[10, 400\]\)"),
        ({"num_entities": 40}, r"rank_buckets must be <= num_entities \(40\)"),
        ({"rank_buckets": [25, 10]}, "rank_buckets must be strictly ascending"),
        ({"rank_buckets": []}, "rank_buckets must not be empty"),
        ({"rank_buckets": [0, 10]}, "rank_buckets must be integers >= 1"),
        ({"examples_per_bucket": 0}, "examples_per_bucket must be >= 1"),
        ({"calibration_bins": 0}, "calibration_bins must be >= 1"),
        ({"unanswerable_examples": -1}, "unanswerable_examples must be >= 0"),
        ({"confident": 1.5}, r"confident must be within \[0, 1\]"),
        ({"threshold": -0.5}, r"threshold must be within \[0, 1\]"),
        ({"distractor_mode": "random"}, "distractor_mode must be one of retrieved, same_attribute"),
        ({"retriever": "grep"}, "retriever must be one of bm25, dense, hybrid"),
        ({"values_per_attribute": 1}, r"^hallucination: values_per_attribute must be an integer >= 2"),
    ],
)
def test_invalid_config_is_a_one_line_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        HallucinationConfig(**kwargs)
    assert "\n" not in str(info.value) and str(info.value).startswith("hallucination: ")


def test_questions_sample_their_buckets():
    config = HallucinationConfig(examples_per_bucket=8, unanswerable_examples=5)
    knowledge = knowledge_of(config)
    questions = Hallucination(config).questions(knowledge)
    closed = [q for q in questions if q.part == "closed_book"]
    assert len(closed) == 40 and all(q.prompt == f"Q:{q.attribute} of {q.entity}?\n" for q in closed)
    for (lo, hi), b in zip(bucket_ranges(config.rank_buckets), config.rank_buckets):
        ranks = [q.rank for q in closed if q.bucket == b]
        assert len(ranks) == 8 and all(lo <= r <= hi for r in ranks)
        assert all(rank_bucket(r, config.rank_buckets) == config.rank_buckets.index(b) for r in ranks)
    unknown = [q for q in questions if q.part != "closed_book"]
    assert len(unknown) == 10 and all(knowledge.rank(q.entity) == 0 and q.gold == kb.ABSTAIN for q in unknown)
    rag = [q for q in unknown if q.part == "unanswerable_rag"]
    assert all(q.prompt.count("\nP:") + q.prompt.startswith("P:") == 4 for q in rag)
    assert Hallucination(config).questions(knowledge) == questions  # seeded


# --- scripted answerers ----------------------------------------------------------------------------------------------
def test_knower_of_the_frequent_entities():
    """Knows the 50 most frequent entities, abstains on the rest: the limit is 50, and 0.9 confidence on answers that
    are all right is an ECE of 0.1."""
    config = HallucinationConfig()
    knowledge = knowledge_of(config)

    def answer(model, tokenizer, prompts, device="cpu"):
        out = []
        for prompt in prompts:
            attribute, entity = asked(prompt)
            known = 1 <= knowledge.rank(entity) <= 50
            out.append(f"A:{knowledge.facts[(entity, attribute)] if known else kb.ABSTAIN}\nQ:next?\nA:zzz")
        return out

    ev = Hallucination(config)
    ev.answer = answer
    ev.confidence = lambda model, tokenizer, prompts, completions, device="cpu": [0.9] * len(prompts)
    result = ev.run(None, None, progress=False)
    assert result.curve == {10.0: 1.0, 25.0: 1.0, 50.0: 1.0, 100.0: 0.0, 200.0: 0.0} and result.limit_value == 50.0
    assert result.limit_value == read_limit(result.curve, 0.5, True)
    assert result.series["abstention_by_rank"].points == {10.0: 0.0, 25.0: 0.0, 50.0: 0.0, 100.0: 1.0, 200.0: 1.0}
    s = result.scalars
    assert s["overall_accuracy"] == s["answered_fraction"] == 0.6 and s["num_examples"] == 160
    assert s["ece"] == pytest.approx(0.1) and s["confident_wrong_rate"] == 0.0
    assert s["mean_confidence"] == pytest.approx(0.9)
    assert s["abstention_rate"] == s["abstention_rate_rag"] == 1.0
    assert s["hallucination_rate"] == s["hallucination_rate_rag"] == 0.0
    assert result.series["reliability"].points == {0.85: 1.0}  # 0.9 closes the bin (0.8, 0.9]
    expected = result.series["expected_train_questions"].points
    assert expected == expected_train_questions(knowledge.probabilities, config.rank_buckets, 2000)
    assert not result.notes


def test_guesser_hallucinates():
    """Answers the asked attribute's most common value, always, with confidence 0.8: right only when that is the
    fact; it never abstains, so every unanswerable question is a hallucination."""
    config = HallucinationConfig(rank_buckets=[20, 60], num_entities=60, examples_per_bucket=40)
    knowledge = knowledge_of(config)
    guess = {a: Counter(v for (_, b), v in knowledge.facts.items() if b == a).most_common(1)[0][0]
             for a in config.attributes}
    ev = Hallucination(config)
    ev.answer = lambda model, tokenizer, prompts, device="cpu": [f"A:{guess[asked(p)[0]]}" for p in prompts]
    ev.confidence = lambda model, tokenizer, prompts, completions, device="cpu": [0.8] * len(prompts)
    result = ev.run(None, None, progress=False)
    closed = [q for q in ev.questions(knowledge) if q.part == "closed_book"]
    right = [q.gold == guess[q.attribute] for q in closed]
    for b in (20.0, 60.0):
        rows = [r for q, r in zip(closed, right) if q.bucket == b]
        assert result.curve[b] == sum(rows) / len(rows)
    accuracy = sum(right) / len(right)
    s = result.scalars
    assert 0.0 < s["overall_accuracy"] == accuracy < 0.5 and result.limit_value == 0.0
    assert s["ece"] == pytest.approx(0.8 - accuracy) and s["confident_wrong_rate"] == pytest.approx(1 - accuracy)
    assert s["hallucination_rate"] == s["hallucination_rate_rag"] == 1.0 and s["abstention_rate"] == 0.0
    assert any("makes answers up" in n for n in result.notes)
    assert any("below the threshold 0.5: limit 0" in n for n in result.notes)
    # below the confidence cut nothing is a confident error
    ev.config.confident = 0.9
    assert ev.run(None, None, progress=False).scalars["confident_wrong_rate"] == 0.0


# --- check and the real run ------------------------------------------------------------------------------------------
def test_check(tokenizer):
    model = tiny_llama(len(tokenizer))
    Hallucination(HallucinationConfig(**TINY)).check(model, tokenizer)
    digits_only = build_char_tokenizer("0123456789QA:\n")
    with pytest.raises(ValueError, match=r"^hallucination: the tokenizer cannot spell the kb task \(missing: "):
        Hallucination(HallucinationConfig(**TINY)).check(model, digits_only)
    short = tiny_llama(len(tokenizer), positions=64)
    with pytest.raises(ValueError, match=r"^hallucination: the longest prompt \(\d+ tokens, a question with 4 "
                                         r"passages\) .* position range is 64; lower rag_distractors or "
                                         r"max_new_tokens$"):
        Hallucination(HallucinationConfig(**{**TINY, "rag_distractors": 4})).check(short, tokenizer)
    with pytest.raises(ValueError, match=r"a closed-book question\) plus max_new_tokens=64 .*; lower max_new_tokens$"):
        Hallucination(HallucinationConfig(**{**TINY, "rag_distractors": 0, "max_new_tokens": 64})).check(
            short, tokenizer)


def test_run_on_a_tiny_llama(tokenizer):
    model = tiny_llama(len(tokenizer))
    model.train()
    ev = Hallucination(HallucinationConfig(**TINY))
    ev.check(model, tokenizer)
    result = ev.run(model, tokenizer, progress=False)
    assert model.training  # restored
    assert result.version == EVALS["hallucination"].version
    assert result.eval == "hallucination" and result.spec == ev.spec() and result.threshold == 0.5
    assert list(result.curve) == [5.0, 20.0] and all(0.0 <= v <= 1.0 for v in result.curve.values())
    assert result.limit_value == read_limit(result.curve, 0.5, True)
    s = result.scalars
    for key in ("overall_accuracy", "confident_wrong_rate", "answered_fraction", "abstention_rate",
                "hallucination_rate", "abstention_rate_rag", "hallucination_rate_rag"):
        assert 0.0 <= s[key] <= 1.0, key
    assert s["num_examples"] == 6 and ("ece" in s) == (s["answered_fraction"] > 0)
    assert {"expected_train_questions", "abstention_by_rank"} <= set(result.series)
    assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


# --- real facts: facts: world ----------------------------------------------------------------------------------------
WORLD = {"facts": "world", "rank_buckets": [100, 1000, 30000], "examples_per_bucket": 6, "unanswerable_examples": 4,
         "rag_distractors": 2, "distractor_mode": "same_attribute", "max_new_tokens": 8, "batch_size": 8}
"""18 closed-book questions about real cities in three population-rank buckets, 4 made-up cities, 4 with passages."""


@pytest.fixture(scope="module")
def cities_by_name() -> dict[str, world.City]:
    return {c.name: c for c in world.cities()}


def city_asked(prompt: str) -> str:
    """The city of a world prompt's question line."""
    line = next(line for line in prompt.split("\n") if line.startswith(world.QUESTION_PREFIX))
    return line.split("the city of ", 1)[1].rsplit(" in?", 1)[0]


def test_world_spec_and_validation():
    ev = Hallucination(HallucinationConfig(**WORLD))
    assert ev.spec() == LimitSpec(metric="closed_book_accuracy", axis="rank", axis_values=(100.0, 1000.0, 30000.0),
                                  higher_is_better=True, threshold=0.5, limit="hallucination", limit_unit="cities")
    assert HallucinationConfig().facts == "kb"  # every kb recipe measures what it did
    HallucinationConfig(facts="world", rank_buckets=[10, 500])  # num_entities (200) bounds the kb's ranks only
    with pytest.raises(ValueError, match=r"^hallucination: facts must be one of kb, world \(got 'wiki'\)$"):
        HallucinationConfig(facts="wiki")
    n = len(world.cities())
    with pytest.raises(ValueError, match=rf"^hallucination: rank_buckets must be <= {n}, the cities of the world task "
                                         rf"\(got \[10, {n + 1}\]\)$"):
        HallucinationConfig(facts="world", rank_buckets=[10, n + 1])


def test_world_questions_follow_population():
    config = HallucinationConfig(**WORLD)
    questions = Hallucination(config).world_questions()
    closed = [q for q in questions if q.part == "closed_book"]
    assert len(closed) == 18
    previous_smallest = math.inf
    for (lo, hi), b in zip(bucket_ranges(config.rank_buckets), config.rank_buckets):
        rows = [q for q in closed if q.bucket == b]
        assert len(rows) == 6 and len({q.entity for q in rows}) == 6 and all(lo <= q.rank <= hi for q in rows)
        assert max(q.popularity for q in rows) <= previous_smallest  # buckets ordered by population
        previous_smallest = min(q.popularity for q in rows)
    for q in closed:
        city = world.cities()[q.rank - 1]
        assert (q.entity, q.gold, q.popularity) == (city.name, city.country, city.population)
        assert q.prompt == world.render_prompt([], world.question_text(q.entity)) and q.attribute == "country"
    unknown = [q for q in questions if q.part == "unanswerable"]
    names = {world.normalize(c.name) for c in world.cities()}
    assert len(unknown) == 4 and all(q.gold == world.ABSTAIN and q.rank == 0 for q in unknown)
    assert not {world.normalize(q.entity) for q in unknown} & names
    rag = [q for q in questions if q.part == "unanswerable_rag"]
    asked = {world.passage_text(q.entity, q.gold) for q in closed}
    for q in rag:
        lines = q.prompt.split("\n")
        assert len(lines) == 4 and lines[3] == "" and lines[2].startswith(world.QUESTION_PREFIX)
        assert set(lines[:2]) <= asked and lines[0] != lines[1]
    assert Hallucination(config).world_questions() == questions  # seeded
    other = Hallucination(HallucinationConfig(**{**WORLD, "seed": 7, "unanswerable_examples": 0})).world_questions()
    assert [q.entity for q in other] != [q.entity for q in closed]
    retrieved = Hallucination(HallucinationConfig(**{**WORLD, "distractor_mode": "retrieved"})).world_questions()
    assert [q.prompt.count("\n") for q in retrieved if q.part == "unanswerable_rag"] == [3] * 4


def test_world_knower_of_the_populous_cities(cities_by_name):
    """Names the country of the 1000 most populous cities (a chat model's sentence), says it does not know the rest
    and the made-up ones: the limit is 1000, every made-up city is an abstention."""

    def answer(model, tokenizer, prompts, device="cpu"):
        out = []
        for prompt in prompts:
            city = cities_by_name.get(city_asked(prompt))
            known = city is not None and city.rank <= 1000
            out.append(f"The city of {city.name} is located in {city.country}.\nMore." if known else
                       "I'm not sure where that is.")
        return out

    ev = Hallucination(HallucinationConfig(**WORLD))
    ev.answer = answer
    ev.confidence = lambda model, tokenizer, prompts, completions, device="cpu": [0.9] * len(prompts)
    result = ev.run(None, None, progress=False)
    assert result.curve == {100.0: 1.0, 1000.0: 1.0, 30000.0: 0.0} and result.limit_value == 1000.0
    assert result.series["abstention_by_rank"].points == {100.0: 0.0, 1000.0: 0.0, 30000.0: 1.0}
    s = result.scalars
    assert s["overall_accuracy"] == pytest.approx(2 / 3) and s["answered_fraction"] == pytest.approx(2 / 3)
    assert s["ece"] == pytest.approx(0.1) and s["confident_wrong_rate"] == 0.0
    assert s["abstention_rate"] == s["abstention_rate_rag"] == 1.0
    assert s["hallucination_rate"] == s["hallucination_rate_rag"] == 0.0
    pool = world.cities()
    assert result.series["population_at_rank"].points == {float(b): float(pool[b - 1].population)
                                                          for b in (100, 1000, 30000)}
    majority = result.series["majority_answer_rate"].points
    assert list(majority) == [100.0, 1000.0, 30000.0] and all(1 / 6 <= v <= 1 for v in majority.values())
    assert "expected_train_questions" not in result.series and not result.notes


def test_world_guesser_makes_answers_up(cities_by_name):
    """Answers "A: India" to everything, plain style: right exactly on the Indian cities, and every made-up city
    gets a country."""
    ev = Hallucination(HallucinationConfig(**WORLD))
    ev.answer = lambda model, tokenizer, prompts, device="cpu": ["A: India\nQ: next"] * len(prompts)
    ev.confidence = lambda model, tokenizer, prompts, completions, device="cpu": [0.8] * len(prompts)
    result = ev.run(None, None, progress=False)
    closed = [q for q in ev.world_questions() if q.part == "closed_book"]
    for b in (100.0, 1000.0, 30000.0):
        rows = [q.gold == "India" for q in closed if q.bucket == b]
        assert result.curve[b] == sum(rows) / len(rows)
    s = result.scalars
    assert s["hallucination_rate"] == s["hallucination_rate_rag"] == 1.0 and s["abstention_rate"] == 0.0
    assert any("questions about cities that do not exist" in n for n in result.notes)


def test_world_check_and_run_on_a_tiny_llama():
    config = HallucinationConfig(**WORLD)
    prompts = [q.prompt for q in Hallucination(config).world_questions()]
    alphabet = "".join(dict.fromkeys(kb.KB_ALPHABET + "".join(prompts)))
    tokenizer = build_char_tokenizer(alphabet)
    model = tiny_llama(len(tokenizer), positions=512)
    ev = Hallucination(config)
    ev.check(model, tokenizer)
    ascii_only = build_char_tokenizer("".join(ch for ch in alphabet if ch.isascii()))
    if not all(p.isascii() for p in prompts):
        with pytest.raises(ValueError, match=r"^hallucination: the tokenizer cannot spell the world task's questions "
                                             r"\(missing: '.+'\); use the model's own tokenizer$"):
            ev.check(model, ascii_only)
    result = ev.run(model, tokenizer, progress=False)
    assert list(result.curve) == [100.0, 1000.0, 30000.0] and all(0.0 <= v <= 1.0 for v in result.curve.values())
    assert result.limit_value == read_limit(result.curve, 0.5, True) and result.scalars["num_examples"] == 18
    for key in ("abstention_rate", "hallucination_rate", "abstention_rate_rag", "hallucination_rate_rag"):
        assert 0.0 <= result.scalars[key] <= 1.0, key
    assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


SMOLLM2 = "smollm2-135m-instruct"


@pytest.mark.slow
def test_world_on_the_real_model():
    """SmolLM2-135M-Instruct from the model cache, 2 cities per bucket: the eval runs end to end in its chat format
    and every number is in range (the measured curve is in the issue #19 report, not asserted)."""
    from transformers import AutoTokenizer

    from llm_limits.trainers.build.pretrained import model_dir

    path = model_dir(SMOLLM2)
    if not (path / "config.json").is_file():
        pytest.skip(f"{SMOLLM2} is not in the model cache ({path}): run `llm-limits models pull {SMOLLM2}`")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    config = HallucinationConfig(**{**WORLD, "examples_per_bucket": 2, "unanswerable_examples": 2,
                                    "max_new_tokens": 20})
    ev = Hallucination(config)
    ev.check(model, tokenizer)
    result = ev.run(model, tokenizer, progress=False)
    assert result.prompt_format == "chat" and result.spec.limit_unit == "cities"
    assert list(result.curve) == [100.0, 1000.0, 30000.0] and all(0.0 <= v <= 1.0 for v in result.curve.values())
    assert result.scalars["num_examples"] == 6 and 0.0 <= result.scalars["hallucination_rate"] <= 1.0
    assert result.limit_value == read_limit(result.curve, 0.5, True)


def test_world_confidence_is_the_named_country(tokenizer):
    """With the world facts, the confidence is the probability of the first country the answer names, teacher-forced
    after the words before it, with no end token; an answer naming none has none."""
    model = tiny_llama(len(tokenizer))
    prompt = "Q: Which country is the city of Osaka in?\n"
    completions = ["Osaka is in Japan.\nQ: x", "A: Japan", "I do not know"]
    got = answer_confidences(model, tokenizer, [prompt] * 3, completions, batch_size=2, locate=world.confidence_span)

    def manual(text: str, scored: int) -> float:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        return math.exp(sum(float(logp[i - 1, ids[i]]) for i in range(len(ids) - scored, len(ids))))

    assert got[0] == pytest.approx(manual(prompt + "Osaka is in Japan", 5), rel=1e-4)  # "Japan", one char a token
    assert got[1] == pytest.approx(manual(prompt + "A: Japan", 5), rel=1e-4) and math.isnan(got[2])
