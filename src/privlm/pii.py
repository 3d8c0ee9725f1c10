"""PII detection and scrubbing with Microsoft Presidio, fully offline.

One detector serves two jobs: scrubbing training text on the client before a
model sees it (:class:`Scrubber`), and looking for PII in a trained model's
generations (the privacy audit).

The detector is Presidio's ``AnalyzerEngine`` with an explicit NLP engine, so
Presidio never tries to download a spaCy model:

* no ``spacy_model`` (the default): Presidio's ``no_op`` engine and pattern
  recognizers only;
* ``spacy_model`` = an installed spaCy package name or a model directory:
  Presidio's spaCy engine with that model adds NER (PERSON, LOCATION). A name
  that is neither installed nor a directory is an error, never a download.

The recognizers are Presidio's own (e-mail, phone, US SSN, credit card, IP,
IBAN, date) plus privlm's where Presidio misses, each measured in
``benchmarks/scrub.py``:

* phone numbers in international and extension formats (``+41 (0)96 471 07 95``,
  ``345-899-3560x4587``) that ``phonenumbers`` does not match for the default
  regions;
* card numbers of 12-19 digits that pass the Luhn check (Maestro, 19-digit Visa,
  JCB ``1800``/``2131``), which Presidio's card regex leaves out;
* medical record numbers after ``MRN`` / ``Med Rec #`` / ``medical record number``;
* US street addresses (``977 Donna Summit Apt. 219, West Stephanietown, OK 73074``),
  with the USPS street suffixes from Faker's ``en_US`` tables;
* PERSON without an NER model: a gazetteer of common US first and last names
  (Faker's ``en_US`` frequency tables, from US Census data) matched on capitalised
  words, spaCy's English stop words excluded. It finds common names only; an NER
  model finds others.

E-mail validation uses ``tldextract`` with its bundled public-suffix snapshot and
no cache, so it never fetches the list.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import re
import secrets
import string
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

from privlm.errors import ConfigError

logger = logging.getLogger(__name__)

#: What the detector looks for by default, pattern recognizers only.
DEFAULT_ENTITIES: tuple[str, ...] = (
    "PERSON",
    "PHONE_NUMBER",
    "EMAIL_ADDRESS",
    "US_SSN",
    "CREDIT_CARD",
    "IP_ADDRESS",
    "IBAN_CODE",
    "DATE_TIME",
    "MEDICAL_RECORD_NUMBER",
    "ADDRESS",
)
#: Found only with an NER model (``spacy_model``).
NER_ENTITIES: tuple[str, ...] = ("LOCATION", "NRP", "ORGANIZATION")
SUPPORTED_ENTITIES: tuple[str, ...] = DEFAULT_ENTITIES + NER_ENTITIES
OPERATORS = ("placeholder", "pseudonym")


# --------------------------------------------------------------------------- recognizers


@lru_cache(maxsize=1)
def _offline_tld():  # type: ignore[no-untyped-def]
    import tldextract

    # No suffix-list URLs and no cache: the snapshot bundled with tldextract, no network.
    return tldextract.TLDExtract(cache_dir=None, suffix_list_urls=())


@lru_cache(maxsize=1)
def _names() -> frozenset[str]:
    from faker.providers.person.en_US import Provider
    from spacy.lang.en.stop_words import STOP_WORDS

    names = {n.lower() for t in (Provider.first_names_female, Provider.first_names_male, Provider.last_names)
             for n in t}
    return frozenset(names - STOP_WORDS)


@lru_cache(maxsize=1)
def _name_choices() -> tuple[str, ...]:
    """:func:`_names` in a fixed order, for seeded draws of pseudonyms."""
    return tuple(sorted(_names()))


@lru_cache(maxsize=1)
def _street_suffixes() -> tuple[str, ...]:
    from faker.providers.address.en_US import Provider

    short = ("St", "Ave", "Rd", "Dr", "Blvd", "Ln", "Ct", "Pl", "Ter", "Pkwy", "Hwy", "Cir", "Way", "Sq", "Trl")
    return tuple(sorted(set(Provider.street_suffixes) | set(short), key=len, reverse=True))


#: Names that are also everyday words: a name only next to another name ("April Jones").
_AMBIGUOUS_NAMES = frozenset(
    "january february march april may june july august september october november december "
    "monday tuesday wednesday thursday friday saturday sunday "
    "good best west east north south colon graves bill will mark grant hope faith joy rose "
    "dear thanks young king hill street page long price park lane banks cash love".split()
)
#: What follows an ambiguous name when it is used as a word: a day number, or a phrase.
_WORD_USE = re.compile(r",? ?\d|,?\s*$| (?:morning|afternoon|evening|day|regards|wishes|luck|news|"
                       r"disease|cancer|screening|side|coast|end|of|to|and)\b")
#: ... unless a title or greeting comes before it ("Dr. Colon", "Thanks, Mark", "-- April").
_TITLE_BEFORE = re.compile(r"(?:\b(?:Dr|Mr|Mrs|Ms|Miss|Hi|Hello|Dear|Thanks)[.,]?|-) +$")
_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
          r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# Digit groups that are something else: a date, a US SSN, an IPv4 address.
_DATE_START = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}")
_SSN_OR_IP = re.compile(r"\d{3}-\d{2}-\d{4}|\d{1,3}(?:\.\d{1,3}){3}")


def _recognizers(entities: Sequence[str]) -> list:  # type: ignore[type-arg]
    """Presidio's pattern recognizers for ``entities``, plus privlm's additions."""
    from presidio_analyzer import EntityRecognizer, Pattern, PatternRecognizer, RecognizerResult
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        DateRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return bool(_offline_tld()(pattern_text).fqdn)

    class AnyCaseIbanRecognizer(IbanRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return bool(super().validate_result(pattern_text.upper()))

    class PhoneFormatsRecognizer(PatternRecognizer):
        """Digit groups with optional +CC, (0), (area) and extension: 7-15 digits, not a date."""

        def __init__(self) -> None:
            end = r"(?!\w|-\d)"  # "555-0100-Office" ends at the digits
            regex = (rf"(?<![\w+.-])(?:\+\d{{1,3}}[ .-]?)?(?:\(0\)[ ]?)?(?:\(\d{{1,4}}\)[ .-]?)?"
                     rf"\d{{1,5}}(?:[ .-]\d{{2,7}}){{1,4}}(?:[ ]?(?:x|ext\.?)[ ]?\d{{1,6}})?{end}"
                     rf"|(?<![\w+.-])\+?\d{{10,13}}{end}")
            super().__init__("PHONE_NUMBER", name="privlm-phone-formats",
                             patterns=[Pattern("phone-groups", regex, 0.4)])

        def validate_result(self, pattern_text: str) -> bool:
            main = re.split(r"x|ext", pattern_text)[0]
            return (7 <= sum(c.isdigit() for c in main) <= 15 and not _DATE_START.match(main.strip())
                    and not _SSN_OR_IP.fullmatch(main.strip()))

    class LuhnCardRecognizer(PatternRecognizer):
        def __init__(self) -> None:
            super().__init__("CREDIT_CARD", name="privlm-luhn-card",
                             patterns=[Pattern("luhn-12-19", r"(?<![\d-])(?:\d[ -]?){11,18}\d(?![\d-])", 0.5)])

        def validate_result(self, pattern_text: str) -> bool:
            digits = re.sub(r"\D", "", pattern_text)
            return 12 <= len(digits) <= 19 and _luhn_ok(digits)

    class GroupRecognizer(EntityRecognizer):
        """Reports the first group of ``regex`` (the value after its label)."""

        def __init__(self, entity: str, name: str, regex: str, score: float) -> None:
            self._regex = re.compile(regex)
            self._score = score
            super().__init__(supported_entities=[entity], name=name)

        def load(self) -> None:
            pass

        def analyze(self, text, entities, nlp_artifacts=None):  # type: ignore[no-untyped-def]
            return [RecognizerResult(self.supported_entities[0], m.start(1), m.end(1), self._score)
                    for m in self._regex.finditer(text)]

    class NameListRecognizer(EntityRecognizer):
        """Capitalised words that are common US first or last names, adjacent ones merged."""

        _WORD = re.compile(r"\b[A-Z][a-z]+(?:['-][A-Z]?[a-z]+)?\b|\b[A-Z]{2,}(?:['-][A-Z]+)?\b")
        _JOIN = re.compile(r"[ ]+(?:[A-Z]\.?[ ]+)?")

        def __init__(self) -> None:
            super().__init__(supported_entities=["PERSON"], name="privlm-name-list")

        def load(self) -> None:
            self._names = _names()

        def analyze(self, text, entities, nlp_artifacts=None):  # type: ignore[no-untyped-def]
            spans: list[list[int]] = []  # [start, end, number of unambiguous names]
            for m in self._WORD.finditer(text):
                word = m.group().lower()
                if word not in self._names:
                    continue
                sure = (word not in _AMBIGUOUS_NAMES or not _WORD_USE.match(text, m.end())
                        or bool(_TITLE_BEFORE.search(text, max(0, m.start() - 10), m.start())))
                if spans and self._JOIN.fullmatch(text, spans[-1][1], m.start()):
                    spans[-1][1] = m.end()
                    spans[-1][2] += 1
                else:
                    spans.append([m.start(), m.end(), int(sure)])
            # "April 3" or "Good morning" alone is a date or a phrase; next to another name it is a name.
            return [RecognizerResult("PERSON", s, e, 0.5) for s, e, n in spans if n]

    suffix = "|".join(re.escape(s) for s in _street_suffixes())
    word = r"[A-Z][A-Za-z'-]+"
    city_state_zip = rf"(?:{word} ){{0,2}}{word}, [A-Z]{{2}} \d{{5}}(?:-\d{{4}})?"
    street = rf"\b\d{{1,6}}(?: {word}){{1,3}} (?:{suffix})\b\.?(?: (?:Apt\.?|Suite|Unit|#) ?[\w-]+)?"
    address = rf"{street}(?:, {city_state_zip})?|\b{city_state_zip}\b"

    available = {
        "EMAIL_ADDRESS": [OfflineEmailRecognizer()],
        "PHONE_NUMBER": [PhoneRecognizer(supported_regions=("US",)), PhoneFormatsRecognizer()],
        "US_SSN": [UsSsnRecognizer()],
        "CREDIT_CARD": [CreditCardRecognizer(), LuhnCardRecognizer()],
        "IP_ADDRESS": [IpRecognizer()],
        "IBAN_CODE": [AnyCaseIbanRecognizer(regex_flags=re.DOTALL | re.MULTILINE | re.IGNORECASE)],
        "DATE_TIME": [DateRecognizer(), PatternRecognizer("DATE_TIME", name="privlm-month-dates", patterns=[
            Pattern("day-month-year", rf"\b\d{{1,2}}(?:st|nd|rd|th)? {_MONTH}\.?,? \d{{4}}\b", 0.6),
            Pattern("month-day-year", rf"\b{_MONTH}\.? \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}\b", 0.6),
        ])],
        "MEDICAL_RECORD_NUMBER": [GroupRecognizer(
            "MEDICAL_RECORD_NUMBER", "privlm-mrn",
            r"(?i)\b(?:MRN|Med(?:ical)?\.? Rec(?:ord)?\.?(?: (?:No\.?|number|#))?)[: ]*#? ?(\d{5,12})\b", 0.8)],
        "ADDRESS": [PatternRecognizer("ADDRESS", name="privlm-us-address",
                                      patterns=[Pattern("us-street", address, 0.6)])],
        "PERSON": [NameListRecognizer()],
    }
    return [r for entity in entities for r in available.get(entity, [])]


def entity_error(entities: Sequence[str]) -> str | None:
    """What is wrong with an entity-type list (None: nothing)."""
    if not entities:
        return "no entity type given"
    unknown = [e for e in entities if e not in SUPPORTED_ENTITIES]
    if unknown:
        return f"unknown entity type {unknown[0]!r}; known: {', '.join(SUPPORTED_ENTITIES)}"
    return None


def check_entities(entities: Sequence[str], key: str) -> list[str]:
    """``entities`` without repeats, or a :class:`ConfigError` naming ``key``."""
    problem = entity_error(entities)
    if problem:
        raise ConfigError(f"{key}: {problem}")
    return list(dict.fromkeys(entities))


def _spacy_engine(spacy_model: str):  # type: ignore[no-untyped-def]
    """Presidio's spaCy NLP engine on an installed model; never downloads one."""
    import spacy.util
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    if not (spacy.util.is_package(spacy_model) or Path(spacy_model).is_dir()):
        raise ConfigError(f"data.scrub.spacy_model: {spacy_model!r} is neither an installed spaCy model "
                          "package nor a model directory (privlm never downloads one; see README)")
    config = {
        "nlp_engine_name": "spacy",
        "models": [{"lang_code": "en", "model_name": spacy_model}],
        "ner_model_configuration": {
            "model_to_presidio_entity_mapping": {
                "PERSON": "PERSON", "PER": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION",
                "FAC": "LOCATION", "NORP": "NRP", "ORG": "ORGANIZATION",
            },
            "low_confidence_score_multiplier": 0.4,
            "low_score_entity_names": [],
            "labels_to_ignore": ["CARDINAL", "ORDINAL", "QUANTITY", "MONEY", "PERCENT", "DATE", "TIME",
                                 "PRODUCT", "EVENT", "WORK_OF_ART", "LAW", "LANGUAGE"],
        },
    }
    return NlpEngineProvider(nlp_configuration=config).create_engine()


class Detector:
    """Finds PII spans in text with Presidio; see the module docstring for what it covers.

    ``entities`` limits what is looked for (default :data:`DEFAULT_ENTITIES`, plus
    :data:`NER_ENTITIES` when ``spacy_model`` is given).
    """

    def __init__(self, entities: Sequence[str] | None = None, spacy_model: str | None = None) -> None:
        from presidio_analyzer import AnalyzerEngine, BatchAnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NoOpNlpEngine

        if entities is None:
            entities = DEFAULT_ENTITIES + (NER_ENTITIES if spacy_model else ())
        self.entities = check_entities(entities, "data.scrub.entities")
        self.spacy_model = spacy_model
        registry = RecognizerRegistry(supported_languages=["en"])
        for recognizer in _recognizers(self.entities):
            registry.add_recognizer(recognizer)
        if spacy_model:
            nlp_engine = _spacy_engine(spacy_model)
            registry.add_nlp_recognizer(nlp_engine=nlp_engine)
        else:
            nlp_engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "no_op"}])
        with warnings.catch_warnings():  # "context words unused with no_op": we pass none
            warnings.simplefilter("ignore", UserWarning)
            self.engine = AnalyzerEngine(nlp_engine=nlp_engine, registry=registry, supported_languages=["en"])
        self._batch = BatchAnalyzerEngine(analyzer_engine=self.engine)

    def analyze(self, text: str) -> list:  # type: ignore[type-arg]
        """Presidio ``RecognizerResult`` objects for ``text``."""
        return self.engine.analyze(text, language="en", entities=self.entities)

    def analyze_many(self, texts: Iterable[str], batch_size: int = 64) -> Iterator[list]:  # type: ignore[type-arg]
        """:meth:`analyze` over many texts, batched through Presidio's ``BatchAnalyzerEngine``."""
        yield from self._batch.analyze_iterator(texts, language="en", entities=self.entities,
                                                batch_size=batch_size)

    def find(self, text: str) -> list[tuple[str, int, int]]:
        """``(entity_type, start, end)`` of every detection, overlaps resolved as in scrubbing."""
        return [(r.entity_type, r.start, r.end) for r in _resolve(self.analyze(text))]


def _resolve(results: list) -> list:  # type: ignore[type-arg]
    """Non-overlapping detections: of overlapping ones the higher score, then the longer, wins.

    Fully ordered (ties broken by position and type), so the result never depends on the
    order Presidio returned them in, which can vary between processes.
    """
    chosen: list = []
    for r in sorted(results, key=lambda r: (-r.score, -(r.end - r.start), r.start, r.entity_type)):
        if all(r.end <= c.start or c.end <= r.start for c in chosen):
            chosen.append(r)
    return sorted(chosen, key=lambda r: r.start)


# --------------------------------------------------------------------------- scrubbing


@lru_cache(maxsize=1)
def _anonymizer():  # type: ignore[no-untyped-def]
    from presidio_anonymizer import AnonymizerEngine

    return AnonymizerEngine()


class Scrubber:
    """Replaces detected PII in one client's text; one instance per client.

    ``operator = "placeholder"`` writes ``<ENTITY_TYPE>``. ``"pseudonym"`` writes a
    made-up value of the same shape (digits for digits, a name for a name) that
    is the same for the same value within this client and unrelated across
    clients: it is keyed by a per-instance secret (``salt``; random unless given).
    Scrubbing scrubbed text changes nothing.
    """

    def __init__(self, detector: Detector, operator: str = "placeholder", salt: bytes | None = None) -> None:
        if operator not in OPERATORS:
            raise ConfigError(f"data.scrub.operator: must be one of {', '.join(OPERATORS)} (got {operator!r})")
        self.detector = detector
        self.operator = operator
        self._salt = secrets.token_bytes(16) if salt is None else salt
        self._pseudonyms: dict[tuple[str, str], str] = {}
        self._issued: set[tuple[str, str]] = set()
        self._changed: Counter[str] = Counter()  # pseudonyms written by the current _apply call
        self._anonymizer = _anonymizer()
        self._operators = self._operators_for(SUPPORTED_ENTITIES)

    def scrub(self, text: str) -> tuple[str, Counter[str]]:
        """``(scrubbed text, count of replaced values per entity type)``."""
        return self._apply(text, self.detector.analyze(text))

    def scrub_many(self, texts: Sequence[str]) -> Iterator[tuple[str, Counter[str]]]:
        for text, results in zip(texts, self.detector.analyze_many(texts), strict=True):
            yield self._apply(text, results)

    def _apply(self, text: str, results: list) -> tuple[str, Counter[str]]:  # type: ignore[type-arg]
        """Presidio's AnonymizerEngine does the replacing (and resolves overlapping detections)."""
        if not results:
            return text, Counter()
        self._changed = Counter()
        # Overlaps resolved here, deterministically, before Presidio's anonymizer replaces the spans.
        out = self._anonymizer.anonymize(text=text, analyzer_results=_resolve(results), operators=self._operators)
        if self.operator == "placeholder":
            return out.text, Counter(item.entity_type for item in out.items)
        return out.text, self._changed

    def _operators_for(self, entities: Iterable[str]) -> dict:  # type: ignore[type-arg]
        from presidio_anonymizer.entities import OperatorConfig

        if self.operator == "placeholder":
            return {e: OperatorConfig("replace", {"new_value": f"<{e}>"}) for e in entities}

        def pseudonym(entity: str):  # type: ignore[no-untyped-def]
            def replace(value: str) -> str:
                new = self._replacement(entity, value)
                if new != value:  # unchanged: a pseudonym this scrubber issued, already scrubbed
                    self._changed[entity] += 1
                return new
            return replace

        return {e: OperatorConfig("custom", {"lambda": pseudonym(e)}) for e in entities}

    def _replacement(self, entity: str, value: str) -> str:
        """The pseudonym of ``value`` (a pseudonym this scrubber issued maps to itself)."""
        if (entity, value) in self._issued:
            return value
        key = (entity, value)
        if key not in self._pseudonyms:
            digest = hmac.new(self._salt, f"{entity}\x00{value}".encode(), hashlib.sha256).digest()
            fake = _surrogate(entity, value, random.Random(digest))
            self._pseudonyms[key] = fake
            self._issued.add((entity, fake))
        return self._pseudonyms[key]


def _surrogate(entity: str, value: str, rng: random.Random) -> str:
    """A made-up value shaped like ``value``: digits to digits, words to names, case kept."""
    names = _name_choices()
    if entity == "EMAIL_ADDRESS":
        return f"{rng.choice(names)}.{rng.choice(names)}{rng.randint(1, 99)}@example.org"

    keep = set(_street_suffixes()) | {"Apt", "Suite", "Unit"} if entity == "ADDRESS" else set()

    def word(m: re.Match[str]) -> str:
        w = m.group()
        if w in keep or (entity == "ADDRESS" and len(w) == 2 and w.isupper()):  # "Summit", "Apt", "OK"
            return w
        if len(w) == 1:
            return rng.choice(string.ascii_uppercase)
        new = rng.choice(names)
        return new.upper() if w.isupper() else new.capitalize()

    text = re.sub(r"\d", lambda _: str(rng.randrange(10)), value)
    if entity in ("PERSON", "ADDRESS", "LOCATION", "ORGANIZATION", "NRP"):
        text = re.sub(r"[A-Za-z][a-z]+|[A-Z]+", word, text)
    elif entity not in ("DATE_TIME",) and not any(c.isdigit() for c in value):
        text = f"<{entity}>"
    return text


# --------------------------------------------------------------------------- evaluation

#: Gold-file entity types that privlm detects under another name.
GOLD_TYPE_MAP: dict[str, str] = {
    "STREET_ADDRESS": "ADDRESS",
    "GPE": "LOCATION",
    "DATE_OF_BIRTH": "DATE_TIME",
}

GoldSpan = tuple[str, int, int]  # (entity_type, start, end)


def evaluate(detector: Detector, docs: Iterable[tuple[str, Sequence[GoldSpan]]]) -> dict[str, dict[str, float]]:
    """Span-level recall and precision per gold entity type.

    A gold span counts as *found* only when every letter and digit in it is
    covered by detections of its type - a partly masked value still leaks.
    A detection is *correct* when it overlaps a gold span of its type.
    Gold types the detector does not look for are reported with ``detected`` = 0.
    """
    gold_n: Counter[str] = Counter()
    found: Counter[str] = Counter()
    detected: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    docs = list(docs)
    for (text, gold), results in zip(docs, detector.analyze_many(t for t, _ in docs), strict=True):
        hits = [(r.entity_type, r.start, r.end) for r in results]
        for etype, start, end in gold:
            etype = GOLD_TYPE_MAP.get(etype, etype)
            gold_n[etype] += 1
            covered = [False] * (end - start)
            for htype, hs, he in hits:
                if htype == etype:
                    for i in range(max(hs, start), min(he, end)):
                        covered[i - start] = True
            if all(c or not text[start + i].isalnum() for i, c in enumerate(covered)):
                found[etype] += 1
        for htype, hs, he in hits:
            detected[htype] += 1
            if any(GOLD_TYPE_MAP.get(g, g) == htype and hs < e and s < he for g, s, e in gold):
                correct[htype] += 1
    report: dict[str, dict[str, float]] = {}
    for etype in sorted(set(gold_n) | set(detected)):
        report[etype] = {
            "gold": gold_n[etype],
            "found": found[etype],
            "recall": found[etype] / gold_n[etype] if gold_n[etype] else float("nan"),
            "detected": detected[etype],
            "precision": correct[etype] / detected[etype] if detected[etype] else float("nan"),
        }
    return report


def read_gold(path: Path) -> list[tuple[str, list[GoldSpan]]]:
    """A presidio-research style gold file: a JSON list of ``{full_text, spans: [...]}``."""
    import json

    from privlm.errors import DataError

    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: gold file not found") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DataError(f"{path}: not a JSON gold file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records with full_text and spans")
    docs = []
    for i, rec in enumerate(records):
        try:
            text = rec["full_text"]
            spans = [(s["entity_type"], int(s["start_position"]), int(s["end_position"])) for s in rec["spans"]]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: record {i}: needs full_text and spans with entity_type, "
                            "start_position, end_position") from None
        if not isinstance(text, str) or any(not (0 <= s <= e <= len(text)) for _, s, e in spans):
            raise DataError(f"{path}: record {i}: a span lies outside full_text")
        docs.append((text, spans))
    return docs
