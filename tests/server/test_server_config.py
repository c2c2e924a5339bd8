"""pie.server.config: TOML in, validated frozen sections out; unknown keys and bad values named."""

import pytest

from pie.server.config import ConfigError, PieConfig, load_config


def test_defaults_round_trip_through_toml():
    cfg = PieConfig()
    assert load_config(text=cfg.to_toml()) == cfg
    changed = cfg.replace(server={"port": 0}, limits={"http_allow": ["a.example:80"]}, scheduler={"policy": "eager"})
    assert load_config(text=changed.to_toml()) == changed


@pytest.mark.parametrize("text, match", [
    ("[server]\nprot = 1\n", "unknown key server.prot"),
    ("[servers]\nport = 1\n", r"unknown section \[servers\]"),
    ('[server]\nport = "80"\n', "server.port must be int"),
    ("[server]\nport = 70000\n", "server.port must be in"),
    ("[limits]\nhttp_allow = [1]\n", "limits.http_allow must be a list of strings"),
    ('[scheduler]\npolicy = "fixed_size"\n', "needs batch_size >= 1"),
    ("[model]\nmemory_fraction = 1.5\n", "memory_fraction"),
    ("[server\n", "not valid TOML"),
])
def test_bad_configurations_are_named(text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(text=text)


def test_kv_cache_from_memory_fraction_and_token_from_the_environment(monkeypatch):
    cfg = load_config(text="[model]\nmemory_fraction = 0.01\nnum_pages = 0\n")
    assert 0 < cfg.model.kv_cache_megabytes() < 1 << 20
    assert cfg.model.engine_config().kv_cache_mb == cfg.model.kv_cache_megabytes()
    assert load_config(text="[model]\nnum_pages = 64\n").model.engine_config().num_pages == 64
    monkeypatch.setenv("PIE_TOKEN", "from-env")
    assert load_config().auth.token == "from-env"


def test_old_scheduler_keys_are_read_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning) as seen:
        cfg = load_config(text='[scheduler]\npolicy = "k_or_t"\nk = 8\nt = 0.01\n')
    assert (cfg.scheduler.policy, cfg.scheduler.batch_size, cfg.scheduler.max_wait) == ("size_or_wait", 8, 0.01)
    assert {str(w.message).split(" is now")[0] for w in seen} == {"scheduler.k", "scheduler.t",
                                                                   "scheduling policy 'k_or_t'"}
    assert 'policy = "size_or_wait"' in cfg.to_toml() and "k =" not in cfg.to_toml()
