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


def test_settings_tab_validates_saves_atomically_and_applies_caps_live(ctx, tmp_path):
    import gradio as gr
    import pytest as _pytest

    from studio.settings import load_settings
    from tabs.settings import save_settings

    names = list(type(ctx.settings).model_fields)
    texts = {n: "" if getattr(ctx.settings, n) is None else str(getattr(ctx.settings, n)) for n in names}
    toml = tmp_path / "studio.toml"
    assert save_settings(ctx, toml, *texts.values()) == "Nothing changed."
    with _pytest.raises(gr.Error, match="port = 'abc'"):  # the same message as a bad studio.toml
        save_settings(ctx, toml, *{**texts, "port": "abc"}.values())
    assert not toml.exists()  # nothing written on a refusal
    report = save_settings(ctx, toml, *{**texts, "vram_cap_gb": "6.5", "port": "7999"}.values())
    assert "Applied now: vram_cap_gb" in report and "Needs a restart:** port" in report
    assert ctx.residency.vram_cap_bytes == int(6.5 * 2**30)
    saved = load_settings(toml, environ={})
    assert saved.port == 7999 and saved.vram_cap_gb == 6.5
