from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.config import Endpoint, describe_keys, key_spellings, load_settings
from gateway.errors import ConfigError

SEED_SOUND_YAML = """
sounds:
  enabled: true
  provider: vllm
  vllm:
    host: "gpu-box"
    port: 8001
    tts_model: "canopylabs/orpheus-3b-0.1-ft"
    tts_voice: "leo"
    temperature: 0.6
    top_p: 0.95
    max_tokens: 1200
    repetition_penalty: 1.1
    max_concurrent_requests: 8
    request_queue_size: 20
    timeout:
      connect: 15000
      total: 120000
    retry:
      enabled: true
      max_retries: 3
      initial_wait_ms: 1000
      max_wait_ms: 30000
      exponential_base: 2
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_match_the_seed_deployment() -> None:
    s = load_settings(env={})
    v = s.vllm
    assert (v.tts_voice, v.temperature, v.top_p, v.max_tokens, v.repetition_penalty) == (
        "tara",
        0.6,
        0.95,
        1200,
        1.1,
    )
    assert (v.max_concurrent_requests, v.request_queue_size) == (4, 10)
    assert (v.timeout.connect, v.timeout.total) == (15000, 120000)
    r = v.retry
    assert (r.enabled, r.max_retries, r.initial_wait_ms, r.max_wait_ms, r.exponential_base) == (
        True,
        3,
        1000,
        30000,
        2.0,
    )
    assert v.snac_model == "hubertsiuzdak/snac_24khz" and v.snac_device == "auto"


def test_an_existing_sound_yaml_loads_unchanged(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, SEED_SOUND_YAML), env={})
    assert s.vllm.host == "gpu-box" and s.vllm.port == 8001 and s.vllm.tts_voice == "leo"
    assert s.vllm.max_concurrent_requests == 8 and s.vllm.request_queue_size == 20
    assert s.vllm.endpoint_list == (Endpoint("gpu-box", 8001),)
    # Sibling keys the gateway does not use are reported, not silently dropped.
    assert any("sounds.enabled" in w for w in s.warnings)


def test_split_layout_tts_providers(tmp_path: Path) -> None:
    s = load_settings(
        write(
            tmp_path,
            """
        tts_providers:
          vllm:
            host: a
            port: 9000
            endpoints: [{host: b, port: 1}, {host: c, port: 2}]
        """,
        ),
        env={},
    )
    assert [e.base_url for e in s.vllm.endpoint_list] == ["http://b:1", "http://c:2"]


def test_precedence_file_env_cli(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        sounds: {vllm: {port: 8001, timeout: {connect: 100}}}
        gateway: {server: {port: 7000}, segmenter: {max_chars: 150}}
        """,
    )
    env = {
        "VOICEGW_VLLM__PORT": "8002",
        "VOICEGW_SERVER__PORT": "7001",
        "VOICEGW_VLLM__TIMEOUT__CONNECT": "200",
    }
    s = load_settings(path, env=env, overrides={"server.port": 7002})
    assert s.vllm.port == 8002 and s.vllm.timeout.connect == 200
    assert s.gateway.server.port == 7002
    assert s.gateway.segmenter.max_chars == 150


def test_config_path_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, "sounds: {vllm: {port: 8123}}")
    assert load_settings(env={"VOICEGW_CONFIG": str(path)}).vllm.port == 8123


def test_settings_are_frozen() -> None:
    s = load_settings(env={})
    with pytest.raises(AttributeError):
        s.vllm.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("yaml_text", "fragment"),
    [
        (
            "sounds: {vllm: {temperature: 9}}",
            "vllm.temperature: 9 is not allowed; expected a number from 0.0 to 2.0",
        ),
        (
            "sounds: {vllm: {tts_voice: bob}}",
            "vllm.tts_voice: 'bob' is not allowed; expected one of tara",
        ),
        ("sounds: {vllm: {port: http}}", "vllm.port: 'http' is not allowed; expected an integer"),
        ("sounds: {vllm: {snac_device: tpu}}", "vllm.snac_device: 'tpu' is not allowed"),
        ("sounds: {vllm: {retry: {enabled: maybe}}}", "vllm.retry.enabled: 'maybe' is not allowed"),
        ("gateway: {segmenter: {min_chars: 500, max_chars: 100}}", "min_chars: 500 is not allowed"),
        ("sounds: {vllm: {timeout: 5}}", "vllm.timeout: expected a mapping"),
        ("[1, 2]", "must hold a mapping"),
        ("a: [", "not valid YAML"),
    ],
)
def test_bad_values_name_the_key_value_and_what_is_allowed(
    tmp_path: Path, yaml_text: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, yaml_text), env={})
    assert fragment in str(info.value)


def test_bad_env_value_is_reported_with_its_key() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.server\.port: 99999 is not allowed"):
        load_settings(env={"VOICEGW_SERVER__PORT": "99999"})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_unknown_keys_warn(tmp_path: Path) -> None:
    s = load_settings(
        write(
            tmp_path,
            """
        sounds: {vllm: {colour: blue}}
        gateway: {server: {prot: 1}}
        other: 1
        """,
        ),
        env={},
    )
    assert any("'vllm.colour'" in w for w in s.warnings)
    assert any("'gateway.server.prot'" in w for w in s.warnings)
    assert any("'other'" in w for w in s.warnings)


def test_api_keys_from_config_and_env() -> None:
    s = load_settings(env={}, overrides={"auth.api_keys": ["a", "b"]})
    assert s.api_keys(env={"VOICEGW_API_KEYS": "c, a"}) == ("a", "b", "c")


def test_extra_body_passes_through(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "sounds: {vllm: {extra_body: {seed: 7, top_k: 40}}}"), env={})
    assert dict(s.vllm.extra_body) == {"seed": 7, "top_k": 40}


@pytest.mark.parametrize(
    ("overrides", "suggestion"),
    [
        ({"vllm.prot": 8001}, "did you mean vllm.port?"),
        ({"sounds.vllm.timeout.conect": 5}, "did you mean vllm.timeout.connect?"),
        ({"segmenter.max_char": 200}, "did you mean segmenter.max_chars?"),
        ({"vllm.port.number": 1}, "did you mean vllm.port?"),
        ({"colour": "blue"}, "`voicegw config --keys` lists them all"),
    ],
)
def test_an_unknown_command_line_key_is_an_error_with_a_suggestion(
    overrides: dict[str, object], suggestion: str
) -> None:
    # On the command line a wrong key can only be a typo: warning and going on would run
    # with the default the user meant to change.
    with pytest.raises(ConfigError, match="unknown config key") as info:
        load_settings(env={}, overrides=overrides)
    assert str(info.value).endswith(suggestion)


def test_an_unknown_env_key_is_an_error_in_the_env_spelling() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"VOICEGW_VLLM__PROT": "8001"})
    assert str(info.value) == (
        "unknown environment variable 'VOICEGW_VLLM__PROT'; did you mean VOICEGW_VLLM__PORT?"
    )
    with pytest.raises(ConfigError, match="did you mean VOICEGW_SERVER__PORT"):
        load_settings(env={"VOICEGW_SERVER__PROT": "9000"})


def test_free_form_and_section_overrides_are_still_accepted() -> None:
    s = load_settings(
        env={"VOICEGW_VLLM__EXTRA_BODY__SEED": "7"},
        overrides={"vllm.extra_body.top_k": 40, "vllm.timeout": {"connect": 5}, "demo": True},
    )
    assert dict(s.vllm.extra_body) == {"seed": 7, "top_k": 40}
    assert (s.vllm.timeout.connect, s.gateway.demo, s.warnings) == (5, True, ())


def test_keys_are_described_in_the_yaml_spelling_with_the_short_forms() -> None:
    names = [name for name, _, _ in describe_keys()]
    assert "sounds.vllm.port" in names and "gateway.server.port" in names
    assert not [n for n in names if not n.startswith(("sounds.vllm.", "gateway."))]
    assert key_spellings("sounds.vllm.timeout.connect") == (
        "vllm.timeout.connect",
        "VOICEGW_VLLM__TIMEOUT__CONNECT",
    )
    assert key_spellings("gateway.server.port") == ("server.port", "VOICEGW_SERVER__PORT")
    # Every spelling shown is one that loads (given the key's own default).
    defaults = load_settings(env={})
    for name, _, _ in describe_keys():
        flag, env = key_spellings(name)
        node: object = defaults
        path = ["vllm", *name.split(".")[2:]] if name.startswith("sounds.") else name.split(".")
        for part in path:
            node = getattr(node, part)
        assert load_settings(env={}, overrides={flag: node}) == defaults, flag
        if isinstance(node, (int, float, str)):
            assert load_settings(env={env: str(node)}) == defaults, env
