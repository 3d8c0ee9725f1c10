"""Run configuration: TOML validated by pydantic, with dotted ``--set`` overrides.

Every section forbids unknown keys, so a typo is an error that names the key,
never a silently ignored setting.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from privlm.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    source: Literal["synthetic-clinic", "shakespeare", "tinyshakespeare", "dir", "jsonl"] = (
        "synthetic-clinic"
    )
    path: Path | None = None  # shakespeare/tinyshakespeare: default is the download cache
    num_clients: int = Field(5000, gt=0)  # generated corpora only


class ModelConfig(_Section):
    kind: Literal["transformer"] = "transformer"
    block_size: int = Field(64, gt=1)
    n_layer: int = Field(2, gt=0)
    n_head: int = Field(4, gt=0)
    n_embd: int = Field(64, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class ClientConfig(_Section):
    local_epochs: int = Field(1, gt=0)
    local_steps: int | None = Field(None, gt=0)  # overrides local_epochs when set
    batch_size: int = Field(8, gt=0)
    lr: float = Field(3e-3, ge=0, allow_inf_nan=False)
    optimizer: Literal["sgd", "adam"] = "adam"


class FederationConfig(_Section):
    rounds: int = Field(50, gt=0)
    clients_per_round: int = Field(100, gt=0)  # expected number, q*N, under DP


class ServerConfig(_Section):
    optimizer: Literal["fedavg", "fedadam"] = "fedavg"
    lr: float = Field(1.0, gt=0, allow_inf_nan=False)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


class PrivacyConfig(_Section):
    mode: Literal["user", "none"] = "user"
    clip_norm: float = Field(2.0, gt=0, allow_inf_nan=False)
    noise_multiplier: float | None = Field(None, gt=0, allow_inf_nan=False)
    target_epsilon: float | None = Field(8.0, gt=0)
    max_epsilon: float | None = Field(None, gt=0)
    delta: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)
    accountant: Literal["pld", "rdp"] = "pld"
    seeded_noise: bool = False  # tests only: noise and sampling from `seed`

    @model_validator(mode="after")
    def _has_noise(self) -> PrivacyConfig:
        if self.mode == "user" and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("user mode needs noise_multiplier or target_epsilon")
        if self.target_epsilon is not None and math.isinf(self.target_epsilon) and self.mode == "user" and self.noise_multiplier is None:
            raise ValueError("target_epsilon = inf means no privacy: set mode = \"none\" instead")
        return self

    @property
    def budget(self) -> float | None:
        """The epsilon no round may push the ledger past (None: no stop)."""
        if self.max_epsilon is not None:
            return self.max_epsilon
        return self.target_epsilon


class EvalConfig(_Section):
    every: int = Field(1, gt=0)  # evaluate every k rounds (and after the last)
    max_clients: int | None = Field(200, gt=0)  # held-out clients used for per-round metrics
    batch_size: int = Field(64, gt=0)


class OutputConfig(_Section):
    dir: Path | None = None  # default: ./runs/<timestamp>
    checkpoint_every: int = Field(10, gt=0)


class RunConfig(_Section):
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.model_dump(mode="json")))


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    value = first.get("input")
    shown = "" if first["type"] in ("extra_forbidden", "missing") or isinstance(value, dict) else f" (got {value!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{shown}{more}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"privacy.noise_multiplier=0.8"`` -> (["privacy", "noise_multiplier"], 0.8).

    The value is read as a TOML value (numbers, booleans, strings in quotes,
    arrays, ``inf``); anything that is not valid TOML is taken as a string.
    """
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (TOML; None = defaults), apply ``overrides``, validate."""
    data: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None
