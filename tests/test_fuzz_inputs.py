"""Fuzzing the readers of untrusted input (issue #26): whatever the bytes, the only error is
privlm's own one-line kind (ValueError for a ledger, ConfigError / DataError elsewhere)."""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privlm.config import load_config
from privlm.errors import ConfigError, DataError
from privlm.privacy import Ledger
from privlm.privacy.accountant import accounting_problem
from privlm.rundir import RunDir

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
ENTRY_KEYS = ["round", "event", "lost", "silo", "clip_norm", "digest", "class", "sampling_probability",
              "noise_multiplier", "count"]
entries = st.dictionaries(st.sampled_from(ENTRY_KEYS), json_values, max_size=6)
event = st.fixed_dictionaries({"class": st.sampled_from(["PoissonSampledDpEvent", "GaussianDpEvent",
                                                        "SelfComposedDpEvent", "NoOpDpEvent"]),
                               "sampling_probability": json_values, "noise_multiplier": json_values,
                               "event": json_values, "count": json_values})
shaped = st.fixed_dictionaries({"round": json_values, "event": event}, optional={"digest": json_values,
                                                                                 "lost": json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, st.lists(st.one_of(entries, shaped), max_size=4)), st.sampled_from(
    [None, "user", "example", "none"]))
def test_any_ledger_json_loads_or_is_a_value_error(data, mode):
    try:
        Ledger.from_list(data, mode=mode)
    except ValueError:
        pass


CONFIG_KEYS = ["privacy.noise_multiplier", "privacy.target_epsilon", "privacy.clip_norm", "privacy.delta",
               "privacy.seeded_noise", "privacy.adaptive_clipping", "privacy.clip_learning_rate",
               "federation.rounds", "federation.clients_per_round", "model.block_size", "model.n_embd",
               "client.lr", "seed", "data.num_clients", "privacy.example.sampling_rate", "audit.canaries",
               "output.checkpoint_every", "privacy.mode", "data.source", "model.dropout"]
toml_values = st.one_of(
    st.integers(-2**70, 2**70).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "true", "false", "yes", '"x"', "[]", "{}", "1e308", "1e-300", ""]),
    st.text(max_size=12))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), toml_values), max_size=4))
def test_any_config_override_loads_or_is_a_config_error(overrides):
    try:
        load_config(None, [f"{k}={v}" for k, v in overrides])
    except ConfigError as e:
        assert "\n" not in str(e)


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True, allow_infinity=True),
       st.integers(-2**40, 2**40))
def test_accounting_problem_never_raises_and_bounds_the_work(q, z, rounds):
    problem = accounting_problem(q, z, rounds)
    if problem is None:
        assert 0 < q <= 1 and 0.05 <= z <= 1e4 and 0 <= rounds and math.sqrt(rounds) / z <= 1.5e3


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_run_directory_file_reads_or_is_a_data_error(tmp_path, content):
    rd = RunDir(tmp_path)
    for path, read in [(rd.privacy_path, rd.read_privacy), (rd.metrics_path, rd.read_metrics),
                       (rd.head_path, rd.read_head)]:
        path.write_bytes(content)
        try:
            read()
        except DataError as e:
            assert "\n" not in str(e)
