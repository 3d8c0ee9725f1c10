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
