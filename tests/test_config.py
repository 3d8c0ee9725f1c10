"""Config: TOML + pydantic + --set; errors name the bad key."""

import pytest

from privlm.config import RunConfig, load_config, parse_override
from privlm.errors import ConfigError


def test_defaults_are_valid_and_private():
    cfg = load_config()
    assert cfg.privacy.mode == "user" and cfg.data.source == "synthetic-clinic"
    assert cfg.privacy.budget == cfg.privacy.target_epsilon


def test_set_overrides_with_dotted_paths(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('seed = 3\n[privacy]\nnoise_multiplier = 1.5\n[data]\nsource = "tinyshakespeare"\n')
    cfg = load_config(p, ["privacy.noise_multiplier=0.8", "federation.rounds=7",
                          "privacy.mode=none", 'data.path="/x/y"'])
    assert cfg.seed == 3 and cfg.privacy.noise_multiplier == 0.8
    assert cfg.federation.rounds == 7 and cfg.privacy.mode == "none"
    assert str(cfg.data.path) == "/x/y" and cfg.data.source == "tinyshakespeare"


def test_override_values_are_toml():
    assert parse_override("a.b=inf") == (["a", "b"], float("inf"))
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=hello") == (["a"], "hello")


@pytest.mark.parametrize("overrides,needle", [
    (["privacy.noise_multipler=0.8"], "privacy.noise_multipler: unknown key"),
    (["privacy.clip_norm=-1"], "privacy.clip_norm: Input should be greater than 0"),
    (["federation.rounds=abc"], "federation.rounds: "),
    (["model.n_embd=100", "model.n_head=3"], "n_embd (100) must be divisible by n_head (3)"),
    (["privacy.target_epsilon=inf"], "mode = \"none\""),
    (["data.source=mystery"], "data.source: "),
    (["bogus=1"], "bogus: unknown key"),
    (["privacy=1"], "privacy: "),
])
def test_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[privacy\n")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        load_config(bad)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"seed = 1 # \xe9\n")
    with pytest.raises(ConfigError, match="latin.toml: not UTF-8"):
        load_config(latin)


def test_resolved_toml_roundtrips(tmp_path):
    cfg = load_config(None, ["privacy.noise_multiplier=1.1", "data.path=/tmp/x"])
    p = tmp_path / "r.toml"
    p.write_text(cfg.to_toml())
    assert load_config(p) == cfg
    assert RunConfig.model_validate(cfg.model_dump()) == cfg


def test_privacy_mechanism_table_is_the_flat_keys_in_another_form():
    """[privacy.mechanism] (a union told apart by ``kind``) and the flat keys build the same mechanism;
    a stored config.toml of either form reads back the same; mixing the forms is refused."""
    from privlm.build import make_mechanism, resolve_privacy
    from privlm.config import config_from_toml

    base = ["privacy.noise_multiplier=1.0", "federation.clients_per_round=50"]
    table = load_config(None, [*base, "privacy.mechanism.kind=adaptive", "privacy.mechanism.target_quantile=0.7",
                               "privacy.mechanism.learning_rate=0.3"])
    flat = load_config(None, [*base, "privacy.adaptive_clipping=true", "privacy.target_quantile=0.7",
                              "privacy.clip_learning_rate=0.3"])
    mechanisms = []
    for cfg in (table, flat):
        resolved, _ = resolve_privacy(cfg, 100)
        stored = config_from_toml(resolved.to_toml())
        assert stored.privacy.user_mechanism == resolved.privacy.user_mechanism
        mechanisms.append(make_mechanism(stored, 100))
    assert mechanisms[0] == mechanisms[1] and mechanisms[0].adaptive.count_stddev == 50 / 20
    assert table.privacy.clip_norm == flat.privacy.clip_norm == 0.1  # the paper's initial C, both forms
    assert make_mechanism(load_config(None, [*base, "privacy.mechanism.kind=gaussian"]), 100) == \
        make_mechanism(load_config(None, base), 100)
    for bad, words in ([["privacy.mechanism.kind=adaptive", "privacy.target_quantile=0.6"], "use one form"],
                       [["privacy.mechanism.kind=median"], "privacy.mechanism"],
                       [["privacy.mode=none", "privacy.mechanism.kind=gaussian"], "user-level mechanism"],
                       [["privacy.mechanism.kind=gaussian", "privacy.mechanism.target_quantile=0.5"], "target_quantile"]):
        with pytest.raises(ConfigError, match=words):
            load_config(None, bad)
