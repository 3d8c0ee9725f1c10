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
