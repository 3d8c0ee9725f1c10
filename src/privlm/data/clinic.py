"""Synthetic clinic corpus: one client per patient, with planted PII.

This is privlm's built-in data set ("a medical data set, many data owners").
Every patient is a client whose text is a short chart history written in
ordinary English: clinic visit notes (chief complaint, history, vitals, exam,
assessment and plan with medication doses), patient portal messages, clinic
replies, refill and appointment requests, telephone notes, lab result
summaries, referral letters and registration updates. All people, numbers and
addresses are fake (Faker ``en_US`` plus hand-written clinical vocabulary in
:mod:`privlm.data.clinic_vocab`); the text is ASCII only.

The patient's own PII is woven in the way it appears in real charts: full and
first name, date of birth, phone numbers in several US formats, e-mail,
medical record number and home address; doctors, nurses and emergency
contacts are named too. :func:`generate_clinic_with_pii` returns every planted
span as ground truth for measuring a PII scrubber's recall. Spans cover the
value only (for ``MRN 4821937`` the span is ``4821937``; for ``Dr. Patel`` it is
``Patel``).

Records are in date order and joined with ``"\\n"``; each patient's last 20%
of records (at least one) is the test text. Generation is deterministic: the
same ``(num_clients, seed)`` gives identical text, and patient ``i`` is the same
whatever ``num_clients`` is (each patient has its own seeded generators).
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import random
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypedDict

from faker import Faker

from privlm.data._common import train_count
from privlm.data.clinic_vocab import (
    ACUTE_PROBLEMS,
    CLINICS,
    CONDITIONS,
    EMAIL_DOMAINS,
    LABS,
    MEDICATIONS,
    NEGATIVES,
    PHARMACIES,
    RELATIONS,
    ROUTINE_LABS,
    SPECIALTIES,
    AcuteProblem,
    Condition,
    Medication,
)
from privlm.data.corpus import ClientData, FederatedCorpus
from privlm.errors import ConfigError

#: Entity types of the planted PII.
ENTITY_TYPES: tuple[str, ...] = (
    "PERSON",
    "PHONE_NUMBER",
    "EMAIL_ADDRESS",
    "MEDICAL_RECORD_NUMBER",
    "DATE_OF_BIRTH",
    "ADDRESS",
)

# Template fields whose values are PII, and their entity type.
_PII_FIELDS: dict[str, str] = {
    "name": "PERSON",
    "first": "PERSON",
    "last": "PERSON",
    "dr": "PERSON",
    "dr_full": "PERSON",
    "spec_dr": "PERSON",
    "nurse": "PERSON",
    "contact": "PERSON",
    "contact_full": "PERSON",
    "phone": "PHONE_NUMBER",
    "contact_phone": "PHONE_NUMBER",
    "email": "EMAIL_ADDRESS",
    "mrn": "MEDICAL_RECORD_NUMBER",
    "dob": "DATE_OF_BIRTH",
    "address": "ADDRESS",
}

_FIELD_RE = re.compile(r"\{(\w+)\}")
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_STATES = (
    "AL", "AK", "AZ", "AR", "CA", "CO", "CT", "DE", "FL", "GA", "HI", "ID", "IL", "IN", "IA", "KS", "KY",
    "LA", "ME", "MD", "MA", "MI", "MN", "MS", "MO", "MT", "NE", "NV", "NH", "NJ", "NM", "NY", "NC", "ND",
    "OH", "OK", "OR", "PA", "RI", "SC", "SD", "TN", "TX", "UT", "VT", "VA", "WA", "WV", "WI", "WY",
)  # fmt: skip
_FIRST_DAY = dt.date(2021, 1, 4)
_SPAN_DAYS = 3 * 365


class PiiSpan(TypedDict):
    """One planted PII value: ``text[start:end] == value`` in the client's split text."""

    client_id: str
    split: str  # "train" or "test"
    start: int
    end: int
    entity_type: str
    value: str


# --------------------------------------------------------------------------- names


@dataclass(frozen=True)
class _WeightedNames:
    names: tuple[str, ...]
    cum_weights: tuple[float, ...]

    def pick(self, rng: random.Random) -> str:
        x = rng.random() * self.cum_weights[-1]
        return self.names[bisect.bisect_right(self.cum_weights, x)]


@lru_cache(maxsize=1)
def _name_tables() -> dict[str, _WeightedNames]:
    """Faker's en_US name frequency tables, prepared for fast weighted draws."""
    from faker.providers.person.en_US import Provider as PersonProvider

    tables = {}
    for key, table in (
        ("F", PersonProvider.first_names_female),
        ("M", PersonProvider.first_names_male),
        ("last", PersonProvider.last_names),
    ):
        names = tuple(_ascii(n) for n in table)
        tables[key] = _WeightedNames(names, tuple(itertools.accumulate(table.values())))
    return tables


def _ascii(text: str) -> str:
    """Transliterate to ASCII (accents dropped, anything else removed)."""
    if text.isascii():
        return text
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


# --------------------------------------------------------------------------- people


@dataclass(frozen=True)
class _Person:
    first: str
    last: str
    sex: str  # "F" or "M"

    @property
    def full(self) -> str:
        return f"{self.first} {self.last}"


@dataclass(frozen=True)
class _Staff:
    clinic: str
    doctors: tuple[_Person, ...]  # primary care
    specialists: dict[str, tuple[_Person, ...]]
    nurses: tuple[_Person, ...]


def _person(rng: random.Random, sex: str | None = None) -> _Person:
    tables = _name_tables()
    sex = sex or rng.choice("FM")
    return _Person(tables[sex].pick(rng), tables["last"].pick(rng), sex)


def _make_staff(seed: int) -> tuple[_Staff, ...]:
    """The clinics of this corpus, each with its doctors, specialists and nurses."""
    rng = random.Random(f"privlm-clinic:{seed}:staff")
    staff = []
    for clinic in CLINICS:
        doctors = tuple(_person(rng) for _ in range(rng.randint(3, 6)))
        specialists = {s: tuple(_person(rng) for _ in range(2)) for s in SPECIALTIES}
        nurses = tuple(_person(rng) for _ in range(3))
        staff.append(_Staff(clinic, doctors, specialists, nurses))
    return tuple(staff)


@dataclass
class _Patient:
    client_id: str
    person: _Person
    middle_initial: str
    dob: dt.date
    phone: tuple[str, str, str]
    email: str
    mrn: str
    address: str
    contact: _Person
    relation: str
    contact_phone: tuple[str, str, str]
    staff: _Staff
    pcp: _Person
    pharmacy: str
    conditions: list[Condition]
    weight_lb: int
    # current dose and frequency of each medication the patient takes
    meds: dict[str, tuple[str, str]] = field(default_factory=dict)


def _phone_digits(rng: random.Random) -> tuple[str, str, str]:
    area = rng.choice("23456789") + str(rng.randint(0, 8)) + str(rng.randint(0, 9))
    exchange = rng.choice("23456789") + f"{rng.randint(0, 99):02d}"
    return area, exchange, f"{rng.randint(0, 9999):04d}"


def _email(rng: random.Random, person: _Person, birth_year: int) -> str:
    first = re.sub(r"[^a-z]", "", person.first.lower())
    last = re.sub(r"[^a-z]", "", person.last.lower())
    local = rng.choice(
        (
            f"{first}.{last}",
            f"{first[0]}{last}",
            f"{first}{last}{rng.randint(1, 99)}",
            f"{last}.{first}{birth_year % 100:02d}",
            f"{first}_{last}",
            f"{first}{birth_year}",
            f"{first[0]}.{last}{rng.randint(1, 9)}",
        )
    )
    return f"{local}@{rng.choice(EMAIL_DOMAINS)}"


def _street_address(rng: random.Random, fake: Faker) -> str:
    """Like Faker's ``street_address()`` (same formats), with names from the fast tables."""
    tables = _name_tables()
    name = tables["last"].pick(rng) if rng.random() < 0.5 else tables[rng.choice("FM")].pick(rng)
    street = f"{fake.building_number()} {name} {fake.street_suffix()}"
    if rng.random() < 0.25:
        street += f" {fake.secondary_address()}"
    return street


def _city(rng: random.Random, fake: Faker) -> str:
    """Like Faker's en_US ``city()`` (same four formats), with names from the fast tables."""
    tables = _name_tables()
    first = tables[rng.choice("FM")].pick(rng)
    style = rng.randrange(4)
    if style == 0:
        return f"{fake.city_prefix()} {first}{fake.city_suffix()}"
    if style == 1:
        return f"{fake.city_prefix()} {first}"
    if style == 2:
        return f"{first}{fake.city_suffix()}"
    return f"{tables['last'].pick(rng)}{fake.city_suffix()}"


def _make_patient(index: int, seed: int, staff: Sequence[_Staff], fake: Faker) -> tuple[_Patient, random.Random]:
    rng = random.Random(f"privlm-clinic:{seed}:patient:{index}")
    fake.seed_instance(rng.getrandbits(64))
    person = _person(rng)
    age = int(rng.triangular(18, 92, 58))
    dob = _FIRST_DAY - dt.timedelta(days=age * 365 + rng.randint(0, 364))
    state = rng.choice(_STATES)
    address = _ascii(f"{_street_address(rng, fake)}, {_city(rng, fake)}, {state} {fake.zipcode_in_state(state)}")
    clinic = rng.choice(staff)

    conditions: list[Condition] = []
    eligible = [c for c in CONDITIONS if c.sex in (None, person.sex)]
    n_conditions = rng.choices((0, 1, 2, 3), weights=(1, 4, 4, 2))[0]
    if age > 55:
        n_conditions = min(3, n_conditions + 1)
    for condition in rng.sample(eligible, n_conditions):
        conditions.append(condition)

    relation, contact_sex = rng.choice(RELATIONS)
    contact = _person(rng, contact_sex)
    # Family usually shares the last name.
    if relation != "friend" and rng.random() < 0.7:
        contact = _Person(contact.first, person.last, contact.sex)
    weight = rng.randint(135, 260) if person.sex == "M" else rng.randint(105, 230)

    patient = _Patient(
        client_id=f"patient-{index:05d}",
        person=person,
        middle_initial=rng.choice("ABCDEFGHJKLMNPRSTW"),
        dob=dob,
        phone=_phone_digits(rng),
        email=_email(rng, person, dob.year),
        mrn=str(rng.randint(1_000_000, 99_999_999)),
        address=address,
        contact=contact,
        relation=relation,
        contact_phone=_phone_digits(rng),
        staff=clinic,
        pcp=rng.choice(clinic.doctors),
        pharmacy=rng.choice(PHARMACIES),
        conditions=conditions,
        weight_lb=weight,
    )
    for condition in conditions:
        if condition.meds:
            med = MEDICATIONS[rng.choice(condition.meds)]
            patient.meds.setdefault(med.name, (rng.choice(med.doses), rng.choice(med.frequencies)))
    return patient, rng


# --------------------------------------------------------------------------- formats


def _fmt_phone(rng: random.Random, digits: tuple[str, str, str]) -> str:
    a, e, n = digits
    style = rng.randrange(8)
    return (
        f"({a}) {e}-{n}",
        f"({a}) {e}-{n}",
        f"{a}-{e}-{n}",
        f"{a}-{e}-{n}",
        f"{a}.{e}.{n}",
        f"{a} {e} {n}",
        f"+1 {a}-{e}-{n}",
        f"{a}{e}{n}",
    )[style]


def _fmt_date(day: dt.date, style: int) -> str:
    if style == 0:
        return f"{day.month:02d}/{day.day:02d}/{day.year}"
    if style == 1:
        return f"{day.month}/{day.day}/{day.year}"
    if style == 2:
        return f"{_MONTHS[day.month - 1]} {day.day}, {day.year}"
    if style == 3:
        return day.isoformat()
    if style == 4:
        return f"{day.month:02d}-{day.day:02d}-{day.year}"
    return f"{day.day} {_MONTHS[day.month - 1][:3]} {day.year}"


def _age(dob: dt.date, on: dt.date) -> int:
    return on.year - dob.year - ((on.month, on.day) < (dob.month, dob.day))


def _join_words(items: Sequence[str], conjunction: str = "and") -> str:
    """``a``, ``a and b``, ``a, b and c`` (or another conjunction)."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conjunction} " + items[-1]


def _render(template: str, ctx: dict[str, str]) -> tuple[str, list[tuple[int, int, str, str]]]:
    """Fill ``{field}`` placeholders; return the text and the PII spans in it."""
    pieces = _FIELD_RE.split(template)
    out: list[str] = []
    spans: list[tuple[int, int, str, str]] = []
    pos = 0
    for i, piece in enumerate(pieces):
        if i % 2 == 1:
            entity_type = _PII_FIELDS.get(piece)
            piece = ctx[piece]
            if entity_type is not None:
                spans.append((pos, pos + len(piece), entity_type, piece))
        out.append(piece)
        pos += len(piece)
    return "".join(out), spans


# --------------------------------------------------------------------------- records


class _ChartWriter:
    """Writes one patient's records; each method returns a template string."""

    def __init__(self, patient: _Patient, rng: random.Random) -> None:
        self.p = patient
        self.rng = rng
        self.day = _FIRST_DAY + dt.timedelta(days=rng.randint(0, _SPAN_DAYS))
        self.ctx: dict[str, str] = {}
        self.last_acute: AcuteProblem | None = None

    # -- helpers

    def choice(self, options: Sequence[str]) -> str:
        return self.rng.choice(options)

    def new_context(self) -> None:
        """Fresh per-record values: formats of names, dates and phones vary by record."""
        p, rng = self.p, self.rng
        person = p.person
        he, him, his = ("she", "her", "her") if person.sex == "F" else ("he", "him", "his")
        name_style = rng.random()
        if name_style < 0.6:
            name = person.full
        elif name_style < 0.75:
            name = f"{person.first} {p.middle_initial}. {person.last}"
        elif name_style < 0.9:
            name = f"{person.last}, {person.first}"
        else:
            name = person.full.upper()
        doctor = p.pcp
        specialty = rng.choice(SPECIALTIES)
        if p.conditions:
            specialty = rng.choice(p.conditions).specialty
        self.ctx = {
            "name": name,
            "first": person.first,
            "last": person.last,
            "dob": _fmt_date(p.dob, rng.randrange(6)),
            "phone": _fmt_phone(rng, p.phone),
            "email": p.email,
            "mrn": p.mrn,
            "address": p.address,
            "dr": doctor.last,
            "dr_full": doctor.full,
            "nurse": rng.choice(p.staff.nurses).full,
            "specialty": specialty,
            "spec_dr": rng.choice(p.staff.specialists[specialty]).full,
            "contact": p.contact.first,
            "contact_full": p.contact.full,
            "relation": p.relation,
            "contact_phone": _fmt_phone(rng, p.contact_phone),
            "clinic": p.staff.clinic,
            "pharmacy": p.pharmacy,
            "date": _fmt_date(self.day, rng.choice((0, 0, 1, 2, 3))),
            "age": str(_age(p.dob, self.day)),
            "sex_word": "woman" if person.sex == "F" else "man",
            "sex_short": person.sex,
            "he": he,
            "He": he.capitalize(),
            "him": him,
            "his": his,
            "His": his.capitalize(),
        }

    def pick_med(self) -> tuple[Medication, str, str] | None:
        """One of the patient's current medications with dose and frequency."""
        if not self.p.meds:
            return None
        name = self.rng.choice(sorted(self.p.meds))
        dose, freq = self.p.meds[name]
        return MEDICATIONS[name], dose, freq

    def set_med(self, med: Medication, dose: str, freq: str) -> None:
        self.ctx.update(
            med=med.name,
            dose=dose,
            freq=freq,
            med_sig=f"{med.name} {dose} {freq}",
            side_effect=self.rng.choice(med.side_effects),
            purpose=med.purpose,
        )

    def med_list(self) -> str:
        if not self.p.meds:
            return "none"
        return "; ".join(f"{name} {dose} {freq}" for name, (dose, freq) in sorted(self.p.meds.items()))

    def lab_line(self, lab_name: str, abnormal_chance: float) -> tuple[str, bool]:
        """One result line (value, unit, flag, reference range) and whether it is abnormal."""
        lab = LABS[lab_name]
        rng = self.rng
        abnormal = rng.random() < abnormal_chance
        if abnormal and lab.extreme > lab.high:
            value = rng.uniform(lab.high, lab.extreme)
            flag = rng.choice((" (H)", " HIGH", " (high)"))
        elif abnormal:
            value = rng.uniform(lab.extreme, lab.low)
            flag = rng.choice((" (L)", " LOW", " (low)"))
        else:
            value = rng.uniform(lab.low, lab.high)
            flag = ""
        number = f"{value:.{lab.decimals}f}"
        unit = f" {lab.unit}" if lab.unit else ""
        ref = f"{lab.low:.{lab.decimals}f}-{lab.high:.{lab.decimals}f}"
        return f"{lab.name}: {number}{unit}{flag} (ref {ref})", abnormal

    def vitals(self, fever: bool) -> str:
        rng = self.rng
        hypertensive = any("hypertension" in c.name for c in self.p.conditions)
        sbp = rng.randint(128, 162) if hypertensive else rng.randint(104, 138)
        dbp = rng.randint(76, 98) if hypertensive else rng.randint(62, 86)
        hr = rng.randint(58, 98) + (10 if fever else 0)
        temp = rng.uniform(100.2, 101.9) if fever else rng.uniform(97.4, 99.0)
        rr = rng.randint(12, 20)
        spo2 = rng.randint(94, 100)
        weight = self.p.weight_lb + rng.randint(-4, 4)
        return self.choice(
            (
                f"Vitals: BP {sbp}/{dbp}, HR {hr}, Temp {temp:.1f} F, RR {rr}, SpO2 {spo2}% on room air, Wt {weight} lb.",
                f"BP {sbp}/{dbp} mmHg | pulse {hr} | temp {temp:.1f} | resp {rr} | O2 sat {spo2}% RA | weight {weight} lbs",
                f"Vital signs: blood pressure {sbp}/{dbp}, heart rate {hr}, temperature {temp:.1f} F, oxygen saturation {spo2}%, weight {weight} pounds.",
                f"T {temp:.1f}  P {hr}  R {rr}  BP {sbp}/{dbp}  SpO2 {spo2}%  Wt {weight} lb",
            )
        )

    # -- record types

    def visit_note(self) -> str:
        rng = self.rng
        kinds = ["acute", "annual"] + (["followup", "followup"] if self.p.conditions else [])
        kind = rng.choice(kinds)
        header = self.choice(
            (
                "OFFICE VISIT {date} - {clinic}\nProvider: {dr_full}, MD",
                "Progress note, {date}. Seen by Dr. {dr_full}.",
                "{clinic} - clinic note dated {date}",
                "Visit date: {date}   Provider: Dr. {dr}",
            )
        )
        ident = self.choice(
            (
                "Patient: {name}   DOB: {dob}   MRN: {mrn}",
                "Pt: {name}, DOB {dob}, MRN {mrn}",
                "{name} (MRN #{mrn}), date of birth {dob}",
                "Name: {name} | DOB {dob} | Med Rec # {mrn}",
            )
        )
        history = _join_words([c.name for c in self.p.conditions])
        self.ctx["pmh"] = f" with a history of {history}" if history else ""
        fever = False
        if kind == "acute":
            eligible = [a for a in ACUTE_PROBLEMS if a.sex in (None, self.p.person.sex)]
            problem = rng.choice(eligible)
            self.last_acute = problem
            fever = problem.fever and rng.random() < 0.7
            body = self._acute_body(problem)
        elif kind == "followup":
            body = self._followup_body()
        else:
            body = self._annual_body()
        vitals = self.vitals(fever)
        closing = self.choice(
            (
                "Follow up in {fu}.",
                "RTC {fu}.",
                "Return to clinic in {fu}, sooner if needed.",
                "Next visit in {fu}. Patient verbalized understanding of the plan.",
            )
        )
        self.ctx["fu"] = self.choice(("2 weeks", "4 weeks", "6 weeks", "3 months", "3 months", "6 months", "1 year"))
        signature = self.choice(("", "\nElectronically signed by {dr_full}, MD.", "\n-- Dr. {dr}"))
        cc, hpi, exam, plan = body
        return f"{header}\n{ident}\n{cc}\n{hpi}\n{vitals}\n{exam}\n{plan}\n{closing}{signature}"

    def _acute_body(self, problem: AcuteProblem) -> tuple[str, str, str, str]:
        rng = self.rng
        self.ctx.update(
            cc=problem.complaint,
            duration=self.choice(("2 days", "3 days", "4 days", "a week", "10 days", "2 weeks", "a month")),
            assessment=problem.assessment,
        )
        cc = self.choice(("Chief complaint: {cc}.", "CC: {cc}", "Reason for visit: {cc}."))
        opening = self.choice(
            (
                "HPI: {first} is a {age}-year-old {sex_word}{pmh} who presents with {cc} for {duration}.",
                "HPI: {age} y/o {sex_short}{pmh}, here with {cc} x {duration}.",
                "History: {He} reports {cc} that started {duration} ago.",
                "HPI: {first} {last} comes in today for {cc}, present for {duration}.",
            )
        )
        details = " ".join(rng.sample(problem.details, rng.randint(1, min(3, len(problem.details)))))
        negatives = [n for n in NEGATIVES if n not in problem.complaint and n not in details.lower()]
        self.ctx["negs"] = _join_words(rng.sample(negatives, rng.randint(2, 4)), "or")
        denies = self.choice(("Denies {negs}.", "No {negs}.", "{He} denies {negs}."))
        exam = "Exam: " + " ".join(rng.sample(problem.exam, rng.randint(1, len(problem.exam))))
        plans = rng.sample(problem.plans, rng.randint(1, len(problem.plans)))
        plan = self.choice(("Assessment: {assessment}.\nPlan: ", "A/P: {assessment}. ", "Impression: {assessment}.\nPlan: "))
        return cc, f"{opening} {details} {denies}", exam, plan + " ".join(plans)

    def _followup_body(self) -> tuple[str, str, str, str]:
        rng = self.rng
        condition = rng.choice(self.p.conditions)
        self.ctx.update(cond=condition.name, cond_lay=condition.lay, months=str(rng.choice((3, 3, 4, 6))))
        others = _join_words([c.name for c in self.p.conditions if c is not condition])
        self.ctx["pmh"] = f" with a history of {others}" if others else ""
        cc = self.choice(("Chief complaint: follow-up of {cond}.", "CC: {cond} follow-up", "Reason for visit: {months}-month check on {cond}."))
        opening = self.choice(
            (
                "HPI: {first} is a {age}-year-old {sex_word}{pmh}, here for follow-up of {cond}.",
                "HPI: {age} y/o {sex_short} returns for a {months}-month follow-up of {cond}.",
                "Follow-up visit for {cond}.",
            )
        )
        sentences = [opening]
        meds_for = [m for m in condition.meds if m in self.p.meds]
        med_plan = ""
        if meds_for:
            med = MEDICATIONS[rng.choice(meds_for)]
            dose, freq = self.p.meds[med.name]
            self.set_med(med, dose, freq)
            sentences.append(
                self.choice(
                    (
                        "Taking {med_sig} as prescribed.",
                        "Takes {med} {dose} {freq}, misses a dose about once a week.",
                        "On {med_sig} without side effects.",
                        "On {med} {dose}; reports {side_effect} since starting it.",
                    )
                )
            )
            med_plan = self._med_change(med, dose, freq)
        sentences.append(" ".join(rng.sample(condition.followups, rng.randint(1, min(2, len(condition.followups))))))
        if condition.symptoms:
            self.ctx["symptom"] = rng.choice(condition.symptoms)
            sentences.append(self.choice(("Reports {symptom}.", "Notes {symptom} at times.", "Denies {symptom} lately.")))
        exam = self.choice(
            (
                "Exam: well appearing, in no distress. Heart regular, lungs clear.",
                "Exam: alert and oriented. Regular rate and rhythm. Lungs clear bilaterally. No edema.",
                "Physical exam: no acute distress; heart and lung exam unremarkable.",
            )
        )
        self.ctx["status"] = self.choice(("stable", "well controlled", "improving", "not at goal", "suboptimally controlled"))
        plans = rng.sample(condition.plans, rng.randint(1, len(condition.plans)))
        if condition.labs:
            plans.append("Labs: " + ", ".join(rng.sample(condition.labs, rng.randint(1, len(condition.labs)))) + ".")
        plan = self.choice(("Assessment/Plan:\n1. {cond} - {status}.", "A/P: {cond}, {status}.", "Assessment: {cond}, {status}.\nPlan:"))
        return cc, " ".join(sentences), exam, " ".join([plan, med_plan, *plans]).replace("  ", " ")

    def _med_change(self, med: Medication, dose: str, freq: str) -> str:
        rng = self.rng
        if len(med.doses) > 1 and rng.random() < 0.35:
            index = med.doses.index(dose)
            new_index = min(len(med.doses) - 1, index + 1) if index + 1 < len(med.doses) else index - 1
            new_dose = med.doses[new_index]
            self.p.meds[med.name] = (new_dose, freq)
            verb = "Increase" if new_index > index else "Decrease"
            return f"{verb} {med.name} from {dose} to {new_dose} {freq}."
        return f"Continue {med.name} {dose} {freq}."

    def _annual_body(self) -> tuple[str, str, str, str]:
        rng = self.rng
        age = int(self.ctx["age"])
        cc = self.choice(("Chief complaint: annual physical.", "CC: annual wellness visit", "Reason for visit: yearly check-up."))
        lifestyle = [
            self.choice(("{first} feels well overall.", "No new concerns today.", "Feels well; main question is about {his} weight.")),
            f"Exercise: {self.choice(('walks 30 minutes most days', 'none currently', 'gym twice a week', 'yard work and gardening', 'bikes on weekends'))}.",
            f"Diet: {self.choice(('mostly home cooked', 'a lot of fast food', 'vegetarian', 'trying to cut sugar', 'skips breakfast'))}.",
            f"Tobacco: {self.choice(('never', 'never', 'former smoker, quit 10 years ago', 'half a pack a day', 'vapes daily'))}. "
            f"Alcohol: {self.choice(('none', 'socially', '1 to 2 drinks a week', '2 beers most nights'))}.",
        ]
        hpi = "HPI: " + " ".join(lifestyle)
        exam = "Exam: " + self.choice(
            (
                "normal exam. HEENT normal, heart regular without murmur, lungs clear, abdomen soft.",
                "well appearing. Skin without concerning lesions. Cardiac and lung exams normal.",
                "no abnormalities found; BMI reviewed.",
            )
        )
        items = ["Routine labs ordered: " + ", ".join(rng.sample(ROUTINE_LABS, 4)) + "."]
        if age >= 45:
            items.append(self.choice(("Colon cancer screening due; colonoscopy referral placed.", "FIT kit given for colon cancer screening.", "Colonoscopy up to date.")))
        if self.p.person.sex == "F" and age >= 40:
            items.append(self.choice(("Screening mammogram ordered.", "Mammogram done last year, normal.")))
        if self.p.person.sex == "F" and age < 65:
            items.append("Cervical cancer screening up to date.")
        if age >= 50:
            items.append("Shingles vaccine series recommended.")
        items.append(self.choice(("Flu shot given today.", "Tdap booster given.", "Declined flu shot.", "Covid booster discussed.")))
        if self.p.meds:
            self.ctx["meds"] = self.med_list()
            items.append("Medications reviewed: {meds}.")
        plan = self.choice(("Plan: ", "A/P: healthy adult. ", "Assessment: routine health maintenance. Plan: "))
        return cc, hpi, exam, plan + " ".join(items)

    def portal_message(self) -> str:
        rng = self.rng
        greeting = self.choice(("Hi Dr. {dr},", "Hello Dr. {dr},", "Dear Dr. {dr_full},", "Hi,", "Good morning,"))
        signoff = self.choice(("Thanks, {first}", "Thank you,\n{name}", "- {first}", "Thanks so much, {first} {last}", "{name}\nDOB {dob}"))
        medication = self.pick_med()
        topics = ["symptom", "form", "travel"]
        if medication is not None:
            topics += ["side_effect", "side_effect", "med_question"]
        if self.p.conditions:
            topics += ["lab_question", "condition"]
        if self.last_acute is not None:
            topics.append("acute_update")
        topic = rng.choice(topics)
        if medication is not None:
            self.set_med(*medication)
        if topic == "side_effect":
            body = self.choice(
                (
                    "Since starting {med} {dose} I've had {side_effect}. Is that normal, or should I stop it?",
                    "I think the {med} is giving me {side_effect}. It started about a week after the new dose. Can I switch to something else?",
                    "Quick question about {med}. I've noticed {side_effect}, mostly in the afternoons. Should I take it at night instead?",
                )
            )
        elif topic == "med_question":
            body = self.choice(
                (
                    "Can I take ibuprofen for a headache while I'm on {med}?",
                    "I forgot my {med} yesterday. Should I take two today or just skip it?",
                    "The pharmacy changed the look of my {med} {dose} pills. Is it still the same medicine?",
                    "My insurance stopped covering {med} (it's {purpose}). Is there a cheaper option?",
                )
            )
        elif topic == "lab_question":
            condition = rng.choice(self.p.conditions)
            self.ctx["cond_lay"] = condition.lay
            self.ctx["lab"] = rng.choice(condition.labs) if condition.labs else "blood work"
            body = self.choice(
                (
                    "I saw my {lab} result in the portal and it was flagged. What does that mean for {cond_lay}?",
                    "Do I need to fast before the {lab} test next week?",
                    "Were my labs okay? I haven't heard anything about the {lab}.",
                )
            )
        elif topic == "condition":
            condition = rng.choice(self.p.conditions)
            self.ctx.update(cond_lay=condition.lay, symptom=rng.choice(condition.symptoms) if condition.symptoms else "some new symptoms")
            body = self.choice(
                (
                    "I wanted to give you an update on {cond_lay}. I've had {symptom} again this week.",
                    "Is it normal to have {symptom} with {cond_lay}? It has been worse since the weather changed.",
                    "Good news about {cond_lay}: it has been better lately. I've been walking every day like you said.",
                )
            )
        elif topic == "acute_update":
            self.ctx["cc"] = self.last_acute.complaint if self.last_acute else "symptoms"
            body = self.choice(
                (
                    "I was seen for {cc} last week. I'm a little better but not back to normal yet. Should I come back in?",
                    "Just letting you know the {cc} is gone. Thank you for seeing me so quickly.",
                    "The {cc} came back over the weekend. Can I get an appointment this week?",
                )
            )
        elif topic == "form":
            body = self.choice(
                (
                    "My employer needs a note saying I was out sick on Monday and Tuesday. Can you send one?",
                    "Can you fill out the FMLA paperwork for my {relation}'s surgery? I'll drop it off at the front desk.",
                    "I need a copy of my vaccine records for a new job. Can you email them to {email}?",
                    "I need a physical form signed for my new job. Do I need a visit for that?",
                )
            )
        elif topic == "travel":
            body = self.choice(
                (
                    "I'm traveling for three weeks next month. Could I get an early refill of all my medicines?",
                    "I'm going on a trip abroad in the spring. Do I need any vaccines?",
                    "I'll be out of state until the 20th. If anything comes back on my labs please call my cell at {phone}.",
                )
            )
        else:
            problem = rng.choice([a for a in ACUTE_PROBLEMS if a.sex in (None, self.p.person.sex)])
            self.ctx["cc"] = problem.complaint
            body = self.choice(
                (
                    "I've had {cc} for a few days. Do I need to be seen or can I wait?",
                    "My {relation} {contact} thinks I should get checked for {cc}. Can I get an appointment this week?",
                    "I've been dealing with {cc} since the weekend. Over-the-counter stuff isn't helping.",
                )
            )
        contact_line = self.choice(("", "", " You can reach me at {phone}.", " Best number is {phone}.", " Please call me at {phone} after 3 pm."))
        prefix = self.choice(("Patient portal message, {date}\n", "Portal message from {name} ({date}):\n", "MyChart message {date}: "))
        return f"{prefix}{greeting}\n{body}{contact_line}\n{signoff}"

    def clinic_reply(self) -> str:
        advice = self.choice(
            (
                "Dr. {dr} reviewed your message. Please keep taking your medicine for now and we will talk about it at your next visit.",
                "Your results were reviewed by Dr. {dr} and look stable. No changes are needed.",
                "Dr. {dr} would like to see you this week. Please call the front desk or book online.",
                "We sent the note to your employer portal. Let us know if they need anything else.",
                "Dr. {dr} recommends taking it with food and checking back in two weeks if it continues.",
            )
        )
        return self.choice(("Reply from {clinic}, {date}: ", "Message to patient ({date}): ")) + self.choice(
            ("Hi {first},\n", "Hello {first},\n", "Dear {name},\n")
        ) + advice + self.choice(("\n{nurse}, RN", "\n-- {nurse}, RN, for Dr. {dr}", " Thanks, {nurse}, RN"))

    def refill_request(self) -> str:
        rng = self.rng
        medication = self.pick_med()
        if medication is None:
            medication = (MEDICATIONS["vitamin D3"], "2,000 IU", "once daily")
        self.set_med(*medication)
        self.ctx.update(qty=str(rng.choice((30, 60, 90, 180))), refills=str(rng.randint(0, 3)), left=str(rng.randint(1, 6)))
        return self.choice(
            (
                "Refill request from {pharmacy}, {date}: {med} {dose}, take {freq}, qty {qty}, refills {refills}. "
                "Patient: {name}, DOB {dob}.",
                "Hi, I need a refill on my {med} {dose}. I only have {left} left. Please send it to {pharmacy}. My number is {phone}. Thanks, {first}",
                "Refill approved for {name} (MRN {mrn}): {med_sig}, 90-day supply with {refills} refills, sent to {pharmacy}. "
                "Due for an office visit before the next refill. {nurse}, RN",
                "Medication refill ({date}). {first} {last} called asking for {med} {dose} ({purpose}). Last filled 2 months ago. Routed to Dr. {dr}.",
                "Please mail my {med} to my new address: {address}. I switched to mail order. - {name}, DOB {dob}",
            )
        )

    def appointment_request(self) -> str:
        self.ctx.update(
            visit_type=self.choice(("my annual physical", "a follow-up", "a sick visit", "a medication check", "a blood pressure check", "a telehealth visit")),
            when=self.choice(("next Tuesday", "any morning next week", "the 14th at 10:30", "Friday afternoon", "the first week of the month")),
            time=self.choice(("8:40 AM", "9:15 AM", "10:30 AM", "1:00 PM", "2:45 PM", "4:20 PM")),
        )
        return self.choice(
            (
                "Appointment request ({date}): Hello, this is {name}, date of birth {dob}. I'd like to schedule {visit_type} with Dr. {dr}. "
                "Mornings work best. Call me at {phone} or email {email}.",
                "Hi, I need to reschedule {visit_type} on {when}. My {relation} {contact} can drive me on a different day. - {first} {last}",
                "Scheduled {name} (MRN {mrn}) for {visit_type} with Dr. {dr_full} on {when} at {time}. Reminder sent to {email}.",
                "Voicemail {date}: {first} {last}, DOB {dob}, asking to move {visit_type} to {when}. Callback {phone}.",
                "Can I get in for {visit_type} {when}? My phone is {phone}. Thanks, {name}",
            )
        )

    def lab_summary(self) -> str:
        rng = self.rng
        names: list[str] = []
        for condition in self.p.conditions:
            names.extend(condition.labs)
        names = sorted(set(names))
        chance = 0.35
        if not names or rng.random() < 0.3:
            names = list(ROUTINE_LABS)
            chance = 0.1
        chosen = rng.sample(names, min(len(names), rng.randint(2, 5)))
        results = [self.lab_line(name, chance) for name in chosen]
        lines = "\n".join(line for line, _ in results)
        header = self.choice(
            (
                "Lab results - {name}, MRN {mrn}, collected {date}:",
                "LAB REPORT for {name} (DOB {dob}), drawn {date}",
                "Results {date}, {last}, {first} - MRN: {mrn}",
            )
        )
        if any(abnormal for _, abnormal in results):
            comment = self.choice(
                (
                    "Comment: abnormal values flagged; patient to schedule a visit to discuss.",
                    "Dr. {dr}: one or more results out of range. Please see the plan from the last visit; repeat in 6 weeks.",
                    "Note to patient: Hi {first}, a few of your results are outside the normal range. Dr. {dr} would like to go over them with you.",
                )
            )
        else:
            comment = self.choice(
                (
                    "Comment: reviewed by Dr. {dr}. Results discussed with the patient by phone.",
                    "Dr. {dr}: stable compared with last time, no changes to treatment.",
                    "Note to patient: Hi {first}, your labs look good. We will recheck at your next visit.",
                )
            )
        return f"{header}\n{lines}\n{comment}"

    def phone_note(self) -> str:
        rng = self.rng
        if self.p.conditions and rng.random() < 0.5:
            condition = rng.choice(self.p.conditions)
            self.ctx["symptom"] = rng.choice(condition.symptoms) if condition.symptoms else "feeling unwell"
        else:
            problem = rng.choice([a for a in ACUTE_PROBLEMS if a.sex in (None, self.p.person.sex)])
            self.ctx["symptom"] = problem.complaint
        self.ctx["duration"] = self.choice(("since yesterday", "for 3 days", "for about a week", "since the weekend"))
        advice = self.choice(
            (
                "Advised rest, fluids and to call back if worse.",
                "Appointment made for tomorrow with Dr. {dr}.",
                "Advised urgent care tonight if symptoms get worse.",
                "Dr. {dr} notified; will call the patient back this afternoon.",
            )
        )
        return self.choice(
            (
                "Telephone encounter {date}: {name} called from {phone} reporting {symptom} {duration}. " + advice + " {nurse}, RN",
                "Phone note: {contact_full}, the patient's {relation}, called from {contact_phone}. Says {first} has had {symptom} {duration}. " + advice,
                "Nurse triage call {date}. Pt {first} {last} (DOB {dob}) with {symptom} {duration}. No red flags. " + advice,
            )
        )

    def referral(self) -> str:
        if self.p.conditions:
            condition = self.rng.choice(self.p.conditions)
            self.ctx.update(specialty=condition.specialty, cond=condition.name)
            self.ctx["spec_dr"] = self.rng.choice(self.p.staff.specialists[condition.specialty]).full
        else:
            self.ctx["cond"] = self.rng.choice(("fatigue", "abnormal lab results", "joint pain", "chronic headaches"))
        self.ctx["meds"] = self.med_list()
        return self.choice(
            (
                "Referral to {specialty}, {date}\nDear Dr. {spec_dr}, I am referring {name} (DOB {dob}), a {age}-year-old {sex_word} with {cond}, "
                "for further evaluation and management. Current medications: {meds}. Thank you for seeing {him}. Dr. {dr_full}",
                "REFERRAL: {specialty} - {name}, MRN {mrn}. Reason: {cond}, not at goal despite treatment. Meds: {meds}. "
                "Patient phone {phone}. Referring provider: Dr. {dr}.",
            )
        )

    def registration(self) -> str:
        return self.choice(
            (
                "Registration update for {name}, MRN {mrn}: address {address}. Preferred phone {phone}. Email {email}. "
                "Emergency contact: {contact_full} ({relation}), {contact_phone}.",
                "Demographics verified at check-in {date}: {name}, DOB {dob}, {address}, cell {phone}, {email}.",
                "New patient intake: {name}, born {dob}. Lives at {address}. Emergency contact {contact_full}, {relation}, {contact_phone}.",
            )
        )

    def write_record(self, kind: str) -> tuple[str, list[tuple[int, int, str, str]]]:
        self.new_context()
        template = getattr(self, kind)()
        return _render(template, self.ctx)

    def advance(self) -> None:
        """Move the chart forward a few days to a few months."""
        self.day += dt.timedelta(days=int(self.rng.choice((2, 3, 5, 7, 10, 14, 21, 30, 45, 60, 90, 120))))


_RECORD_KINDS: tuple[str, ...] = (
    "visit_note",
    "portal_message",
    "clinic_reply",
    "refill_request",
    "appointment_request",
    "lab_summary",
    "phone_note",
    "referral",
    "registration",
)
_RECORD_WEIGHTS: tuple[float, ...] = (1.5, 3.0, 1.0, 2.0, 2.0, 1.5, 1.5, 0.6, 0.6)
_RECORD_COUNTS: tuple[int, ...] = (4, 5, 6, 7, 8, 9, 10, 11, 12)
_RECORD_COUNT_WEIGHTS: tuple[float, ...] = (9, 8, 6, 4, 3, 2, 1.5, 1, 0.5)


def _patient_records(patient: _Patient, rng: random.Random) -> list[tuple[str, list[tuple[int, int, str, str]]]]:
    writer = _ChartWriter(patient, rng)
    n_records = rng.choices(_RECORD_COUNTS, weights=_RECORD_COUNT_WEIGHTS)[0]
    kinds = rng.choices(_RECORD_KINDS, weights=_RECORD_WEIGHTS, k=n_records)
    if rng.random() < 0.4:
        kinds[0] = "registration"
    elif rng.random() < 0.6:
        kinds[0] = "visit_note"
    records = []
    for kind in kinds:
        records.append(writer.write_record(kind))
        writer.advance()
    return records


# --------------------------------------------------------------------------- public API


def generate_clinic_with_pii(num_clients: int, seed: int) -> tuple[FederatedCorpus, list[PiiSpan]]:
    """Generate ``num_clients`` synthetic patients and the PII planted in their text.

    Returns the corpus (client ids ``patient-00000``, ``patient-00001``, ...) and a
    list of :class:`PiiSpan` dicts, one per planted value, with ``start``/``end``
    offsets into that client's ``train`` or ``test`` text.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"data.num_clients must be a positive integer for synthetic-clinic, got {num_clients!r}")
    staff = _make_staff(seed)
    fake = Faker("en_US")
    clients: list[ClientData] = []
    spans: list[PiiSpan] = []
    n_records = 0
    for index in range(num_clients):
        patient, rng = _make_patient(index, seed, staff, fake)
        records = _patient_records(patient, rng)
        n_records += len(records)
        n_train = train_count(len(records))
        for split, part in (("train", records[:n_train]), ("test", records[n_train:])):
            offset = 0
            for text, record_spans in part:
                for start, end, entity_type, value in record_spans:
                    spans.append(
                        PiiSpan(
                            client_id=patient.client_id,
                            split=split,
                            start=offset + start,
                            end=offset + end,
                            entity_type=entity_type,
                            value=value,
                        )
                    )
                offset += len(text) + 1
        clients.append(
            ClientData(
                client_id=patient.client_id,
                train="\n".join(text for text, _ in records[:n_train]),
                test="\n".join(text for text, _ in records[n_train:]),
            )
        )
    info = {"source": "synthetic-clinic", "seed": seed, "records": n_records}
    return FederatedCorpus(name="synthetic-clinic", clients=tuple(clients), info=info), spans


def generate_clinic(num_clients: int, seed: int) -> FederatedCorpus:
    """Generate the synthetic clinic corpus (see the module docstring)."""
    corpus, _ = generate_clinic_with_pii(num_clients, seed)
    return corpus


def example_text(seed: int = 0) -> str:
    """One patient's full chart text (train then test records), e.g. for a README."""
    client = generate_clinic(1, seed).clients[0]
    return client.train + "\n" + client.test
