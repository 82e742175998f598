from pathlib import Path

import pytest

from studio.settings import Settings, SettingsError, load_settings


def test_defaults_are_safe():
    s = Settings()
    assert s.host == "127.0.0.1" and s.is_loopback and not s.share and s.auth_file is None


def test_toml_then_env_then_overrides(tmp_path: Path):
    toml = tmp_path / "studio.toml"
    toml.write_text('port = 8000\nvram_cap_gb = 10\ndata_dir = "d1"\n')
    s = load_settings(toml, environ={"STUDIO_PORT": "8001", "OTHER": "x"}, overrides={"data_dir": Path("d2")})
    assert (s.port, s.vram_cap_gb, s.data_dir) == (8001, 10.0, Path("d2"))


def test_unknown_toml_key_is_refused_with_suggestion(tmp_path: Path):
    toml = tmp_path / "studio.toml"
    toml.write_text("vram_cap_g = 10\n")
    with pytest.raises(SettingsError, match="Did you mean 'vram_cap_gb'"):
        load_settings(toml, environ={})


def test_unknown_env_var_is_refused_with_suggestion():
    with pytest.raises(SettingsError, match=r"STUDIO_PROT.*Did you mean 'port'"):
        load_settings(None, environ={"STUDIO_PROT": "1"})


def test_wrong_type_names_the_key_and_value(tmp_path: Path):
    with pytest.raises(SettingsError, match=r"port = 'eighty'"):
        load_settings(None, environ={"STUDIO_PORT": "eighty"})
    with pytest.raises(SettingsError, match="vram_cap_gb"):
        load_settings(None, environ={}, overrides={"vram_cap_gb": -1})


def test_invalid_toml_is_reported(tmp_path: Path):
    toml = tmp_path / "studio.toml"
    toml.write_text("port = = 3\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(toml, environ={})


def test_every_field_has_a_description():
    for name, _value, desc in Settings().field_descriptions():
        assert desc, name
