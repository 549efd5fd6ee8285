"""Config: defaults, ${VAR} expansion, strict validation, backend options, secrets."""
from __future__ import annotations

import pytest
import yaml

from fakebackend import FakePlugin
from vecshim import Backend, ConfigError, hookimpl
from vecshim.app import create_app
from vecshim.config import ENV_CONFIG, expand_env, load_config, parse_config


def write(tmp_path, data, name="vecshim.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_lines(excinfo) -> list[str]:
    return excinfo.value.message.splitlines()


def build(config: dict, *plugins):
    """Validate a config through create_app (plugins, backends and options), without loading models."""
    app = create_app(config, plugins=[FakePlugin(), *plugins], load_entrypoints=False, load=False)
    return app.extensions["vecshim"]


# -- defaults and the config file ---------------------------------------------

def test_no_file_serves_bundled_minilm():
    cfg = load_config(None, env={})
    assert cfg.default_model == "minilm"
    assert list(cfg.models) == ["minilm"]
    assert cfg.models["minilm"].backend == "sentence-transformers"
    assert cfg.models["minilm"].long_text == "chunk_mean"


def test_vecshim_config_env_names_the_file(tmp_path):
    path = write(tmp_path, {"models": {"e5": {"backend": "fake"}}})
    cfg = load_config(None, env={ENV_CONFIG: str(path)})
    assert list(cfg.models) == ["e5"]
    assert cfg.default_model == "e5"


def test_explicit_path_wins_over_env(tmp_path):
    a = write(tmp_path, {"models": {"a": {"backend": "fake"}}}, "a.yaml")
    b = write(tmp_path, {"models": {"b": {"backend": "fake"}}}, "b.yaml")
    assert list(load_config(a, env={ENV_CONFIG: str(b)}).models) == ["a"]


def test_empty_file_is_the_default(tmp_path):
    assert load_config(write(tmp_path, ""), env={}).default_model == "minilm"


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load_config(tmp_path / "nope.yaml", env={})


def test_invalid_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "models: [\n"), env={})


def test_non_mapping_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="<root>: the config must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), env={})


# -- ${VAR} expansion ----------------------------------------------------------

@pytest.mark.parametrize("text, env, expected", [
    ("${KEY}", {"KEY": "sk-1"}, "sk-1"),
    ("pre-${KEY}-post", {"KEY": "x"}, "pre-x-post"),
    ("${KEY:-fallback}", {}, "fallback"),
    ("${KEY:-fallback}", {"KEY": ""}, "fallback"),  # compose: `:-` also covers empty
    ("${KEY:-fallback}", {"KEY": "set"}, "set"),
    ("${KEY:-}", {}, ""),
    ("${KEY}", {"KEY": ""}, ""),
    ("$$", {}, "$"),
    ("$${KEY}", {"KEY": "x"}, "${KEY}"),
    ("price: 5$", {}, "price: 5$"),
    ("${A}${B:-b}", {"A": "a"}, "ab"),
])
def test_expand_env(text, env, expected):
    assert expand_env(text, env) == expected


def test_expansion_reaches_nested_values_and_lists():
    data = {"a": {"b": ["${X}", 3, None, True]}, "c": "${Y:-7}"}
    assert expand_env(data, {"X": "x"}) == {"a": {"b": ["x", 3, None, True]}, "c": "7"}


def test_expanded_values_are_validated_as_their_types():
    cfg = parse_config({"models": {"m": {"backend": "fake", "batch": {"max_size": "${BATCH:-8}"}}}}, env={})
    assert cfg.models["m"].batch.max_size == 8


def test_unset_var_without_default_names_the_key_path():
    data = {"models": {"cohere-en": {"backend": "cohere", "options": {"api_key": "${COHERE_API_KEY}"}}}}
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data, env={})
    assert error_lines(excinfo) == [
        "models.cohere-en.options.api_key: environment variable COHERE_API_KEY is not set"]


def test_unset_var_in_a_list_names_the_index():
    with pytest.raises(ConfigError, match=r"^server\.auth\.embed_tokens\.1: environment variable TOK"):
        parse_config({"server": {"auth": {"embed_tokens": ["abcd", "${TOK}"]}}}, env={})


def test_expansion_uses_the_process_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VECSHIM_TEST_BATCH", "17")
    path = write(tmp_path, "models:\n  m:\n    backend: fake\n    batch: {max_size: '${VECSHIM_TEST_BATCH}'}\n")
    assert load_config(path).models["m"].batch.max_size == 17


# -- strict validation ------------------------------------------------------------

def test_unknown_keys_are_rejected_with_their_paths():
    data = {"bogus": 1, "models": {"m": {"backend": "fake", "batchh": {}, "batch": {"max_sise": 3}}},
            "server": {"auth": {"tokens": []}}}
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data, env={})
    assert sorted(error_lines(excinfo)) == [
        "bogus: unknown key",
        "models.m.batch.max_sise: unknown key (did you mean 'max_size'?)",
        "models.m.batchh: unknown key (did you mean 'batch'?)",
        "server.auth.tokens: unknown key (did you mean 'embed_tokens'?)",
    ]


def test_invalid_long_text():
    with pytest.raises(ConfigError) as excinfo:
        parse_config({"models": {"m": {"backend": "fake", "long_text": "chop"}}}, env={})
    [line] = error_lines(excinfo)
    assert line.startswith("models.m.long_text: ")
    assert "'chunk_mean', 'truncate' or 'error'" in line


def test_out_of_range_values_name_the_key():
    with pytest.raises(ConfigError, match=r"^models\.m\.batch\.max_size: Input should be greater than or equal to 1"):
        parse_config({"models": {"m": {"backend": "fake", "batch": {"max_size": 0}}}}, env={})


def test_default_model_must_be_configured():
    with pytest.raises(ConfigError) as excinfo:
        parse_config({"default_model": "big", "models": {"a": {"backend": "fake"}, "b": {"backend": "fake"}}},
                     env={})
    assert error_lines(excinfo) == ["default_model: 'big' is not in models (a, b)"]


def test_default_model_is_the_first_model():
    cfg = parse_config({"models": {"b": {"backend": "fake"}, "a": {"backend": "fake"}}}, env={})
    assert cfg.default_model == "b"


def test_fallback_naming_a_missing_model():
    with pytest.raises(ConfigError) as excinfo:
        parse_config({"models": {"a": {"backend": "fake", "fallbacks": ["ghost"]}}}, env={})
    assert error_lines(excinfo) == ["models.a.fallbacks.0: 'ghost' is not another configured model"]


def test_fallback_naming_itself():
    with pytest.raises(ConfigError, match=r"^models\.a\.fallbacks\.0: 'a' is not another"):
        parse_config({"models": {"a": {"backend": "fake", "fallbacks": ["a"]}}}, env={})


def test_bad_model_name():
    with pytest.raises(ConfigError, match=r"^models\.bad name: model name 'bad name' must match"):
        parse_config({"models": {"bad name": {"backend": "fake"}}}, env={})


# -- backends and their options -------------------------------------------------------

def test_backend_options_validated_by_the_backends_options_model():
    with pytest.raises(ConfigError) as excinfo:
        build({"models": {"f": {"backend": "fake", "options": {"dim": 8, "dimm": 9}}}})
    assert error_lines(excinfo) == ["models.f.options.dimm: unknown key (did you mean 'dim'?)"]


def test_builtin_backend_options_are_strict():
    cfg = {"models": {"st": {"backend": "sentence-transformers", "options": {"modle": "x"}}}}
    with pytest.raises(ConfigError) as excinfo:
        build(cfg)
    assert error_lines(excinfo) == ["models.st.options.modle: unknown key (did you mean 'model'?)"]


def test_backend_option_types_are_checked():
    with pytest.raises(ConfigError, match=r"^models\.f\.options\.dim: Input should be a valid integer"):
        build({"models": {"f": {"backend": "fake", "options": {"dim": "wide"}}}})


def test_valid_options_reach_the_backend():
    state = build({"models": {"f": {"backend": "fake", "options": {"dim": 8}}}})
    assert state.models["f"].backend.options.dim == 8


def test_unknown_backend_lists_installed_backends():
    with pytest.raises(ConfigError) as excinfo:
        build({"models": {"m": {"backend": "openia"}}})
    msg = excinfo.value.message
    assert "unknown backend 'openia'" in msg
    assert "installed backends: cohere, fake, openai, sentence-transformers" in msg


class NeedsXyz(Backend):
    name = "needs-xyz"
    requires = ("no_such_module_xyz",)
    extra = "xyz"

    def embed(self, texts, task):
        raise AssertionError("never built")


class XyzPlugin:
    @hookimpl
    def register_backends(self, register):
        register(NeedsXyz)


def test_missing_optional_sdk_names_the_pip_extra():
    with pytest.raises(ConfigError) as excinfo:
        build({"models": {"x": {"backend": "needs-xyz"}}}, XyzPlugin())
    assert error_lines(excinfo) == ["models.x: backend 'needs-xyz' needs: pip install 'vecshim[xyz]'"]


# -- secrets --------------------------------------------------------------------------

def test_secrets_finds_keys_tokens_and_redis_password():
    cfg = parse_config({
        "models": {
            "o": {"backend": "openai", "options": {"model": "m", "api_key": "${OPENAI_API_KEY}"}},
            "c": {"backend": "cohere", "options": {"model": "m", "API_KEY": "co-secret-1"}},
            "p": {"backend": "fake", "options": {"proxy_password": "hunter22", "access_token": "tok-123",
                                                 "model": "not-a-secret", "secret": 12345}},
        },
        "server": {"auth": {"embed_tokens": ["embed-tok"], "metrics_tokens": ["metrics-tok"]}},
        "cache": {"redis_url": "redis://user:pa:ss@redis:6379/0"},
    }, env={"OPENAI_API_KEY": "sk-openai"})
    found = set(cfg.secrets())
    assert {"sk-openai", "co-secret-1", "hunter22", "tok-123", "embed-tok", "metrics-tok", "pa:ss"} <= found
    assert "not-a-secret" not in found and "m" not in found
    # Basic auth would send the URL's user:password base64-encoded: that is a secret too.
    assert "user:pa:ss" in found and "dXNlcjpwYTpzcw==" in found


def test_secrets_finds_credentials_in_any_url_and_nested_options():
    cfg = parse_config({
        "models": {
            "o": {"backend": "openai", "options": {"model": "m", "base_url": "http://svc:Pw%2Fd9x@host/v1"}},
            "p": {"backend": "fake", "options": {"upstream": {"headers": {"X-Auth-Token": "hdr-secret-77"}},
                                                 "mirrors": ["https://tok3n-only-user@mirror/x"],
                                                 "api_key_file": "/run/secrets/key"}},
        },
    })
    found = set(cfg.secrets())
    assert {"Pw%2Fd9x", "Pw/d9x", "hdr-secret-77", "tok3n-only-user"} <= found
    assert "/run/secrets/key" not in found  # a key file's path; its content is registered when read


def test_secrets_ignores_short_and_empty_values_and_keyless_redis():
    cfg = parse_config({"models": {"m": {"backend": "fake", "options": {"api_key": "", "token": "abc"}}},
                        "cache": {"redis_url": "redis://redis:6379/0"}}, env={})
    assert cfg.secrets() == []


def test_empty_redis_url_means_no_redis():
    cfg = parse_config({"cache": {"redis_url": "${REDIS_URL:-}"}}, env={})
    assert cfg.cache.redis_url is None
