"""The federated corpus: the one shape every data source produces.

A client is one data owner (a user, a patient, a speaking role). Each holds a
training text and a held-out test text that never leave it in the simulation
except as model updates (training) or aggregate metrics (evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClientData:
    client_id: str
    train: str
    test: str


@dataclass(frozen=True)
class FederatedCorpus:
    name: str
    clients: tuple[ClientData, ...]
    # Optional extra facts a source wants reported (e.g. planted PII ground truth lives elsewhere).
    info: dict = field(default_factory=dict)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def stats(self) -> dict:
        return {
            "name": self.name,
            "num_clients": self.num_clients,
            "train_chars": sum(len(c.train) for c in self.clients),
            "test_chars": sum(len(c.test) for c in self.clients),
            **self.info,
        }


def silo_members(corpus: FederatedCorpus, silos: int) -> list[list[ClientData]]:
    """The clients that make up each of ``silos`` silos (see :func:`group_into_silos`)."""
    groups: dict[str, list[ClientData]] = {}
    for c in corpus.clients:
        groups.setdefault(c.client_id.split("/", 1)[0], []).append(c)
    if silos > len(groups):
        raise ValueError(f"data.silos: {silos} silos need at least as many client groups; "
                         f"the corpus has {len(groups)}")
    members: list[list[ClientData]] = [[] for _ in range(silos)]
    for i, key in enumerate(sorted(groups)):
        members[i % silos].extend(groups[key])
    return members


def merge_clients(client_id: str, members: list[ClientData]) -> ClientData:
    """One client whose text is its members' texts joined by newlines."""
    return ClientData(client_id, "\n".join(c.train for c in members), "\n".join(c.test for c in members))


def group_into_silos(corpus: FederatedCorpus, silos: int) -> FederatedCorpus:
    """Merge the clients into ``silos`` silos, e.g. five hospitals out of many patients.

    Clients sharing the id prefix before ``"/"`` (a play of the Shakespeare
    corpus) stay together; the groups, in sorted order, are dealt round-robin to
    silos ``silo-0`` ... A silo's text is its members' texts joined by newlines.
    """
    members = silo_members(corpus, silos)
    merged = tuple(merge_clients(f"silo-{i}", ms) for i, ms in enumerate(members))
    return FederatedCorpus(f"{corpus.name} in {silos} silos", merged,
                           {**corpus.info, "silo_members": [len(ms) for ms in members]})


def split_into_pseudo_users(corpus: FederatedCorpus, parts: int) -> FederatedCorpus:
    """Each client's lines cut into ``parts`` contiguous pseudo-users ``<id>#0`` ... ``<id>#{parts-1}``.

    Training lines and held-out lines are each cut into ``parts`` runs of
    consecutive lines; pseudo-user j gets run j of both. A client with fewer
    training lines than ``parts`` yields fewer pseudo-users (no empty ones). This
    changes the unit of protection: user-level DP then protects one pseudo-user,
    and a real client spread over k of them is protected only as a group of k.
    """
    def runs(lines: list[str], k: int) -> list[list[str]]:
        return [lines[len(lines) * j // k: len(lines) * (j + 1) // k] for j in range(k)]

    out = []
    for c in corpus.clients:
        train = c.train.split("\n")
        k = min(parts, len(train))
        for j, (tr, te) in enumerate(zip(runs(train, k), runs(c.test.split("\n") if c.test else [], k))):
            out.append(ClientData(f"{c.client_id}#{j}", "\n".join(tr), "\n".join(te)))
    return FederatedCorpus(f"{corpus.name}, {parts} pseudo-users per client", tuple(out),
                           {**corpus.info, "pseudo_users_per_client": parts,
                            "real_clients": corpus.num_clients})


def split_into_records(text: str, unit: str) -> list[str]:
    """The records (the unit example-level DP protects) of one client's text."""
    parts = text.split("\n\n") if unit == "paragraphs" else text.split("\n")
    return [p for p in (p.strip("\n") for p in parts) if p.strip()]
