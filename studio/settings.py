"""Settings: studio.toml, then STUDIO_* environment variables, then command-line flags (later wins).

Unknown keys and wrong types are refused with a message that names the bad key or value and suggests the
closest valid key. Defaults are the safe ones: loopback only, no share, no auth file needed locally.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "STUDIO_"


class SettingsError(ValueError):
    """A setting was misspelled, of the wrong type, or unsafe; the message says which and how to fix it."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    host: str = Field("127.0.0.1", description="Address to bind. Anything but loopback requires an auth file.")
    port: int = Field(7860, ge=1, le=65535, description="Port of the web UI.")
    share: bool = Field(False, description="Gradio share link (public URL). Requires an auth file.")
    auth_file: Path | None = Field(
        None, description="File with one 'user:password' per line; needed for share or a non-loopback host."
    )
    vram_cap_gb: float | None = Field(
        None, gt=0, description="Most GPU memory the studio may use, in GB (default: whatever is free)."
    )
    ram_cap_gb: float | None = Field(
        None, gt=0, description="Most pinned CPU RAM used to park models off the GPU, in GB (default: 1/4 of RAM)."
    )
    reserve_gb: float = Field(0.8, ge=0, description="GPU memory always left free for other programs, in GB.")
    keep_alive_s: float | None = Field(
        None, gt=0, description="Move a model off the GPU after this many idle seconds (default: never)."
    )
    offline: bool = Field(False, description="Never touch the network; use only models already present.")
    data_dir: Path = Field(Path("data"), description="Outputs, runs, caches and uploads.")
    models_dir: Path = Field(Path("models"), description="Downloaded and converted model weights.")
    max_upload_mb: int = Field(2048, gt=0, description="Largest accepted upload, in MB.")
    open_browser: bool = Field(True, description="Open the studio in a browser after start-up.")

    @field_validator("host")
    @classmethod
    def _host_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("host must not be empty; use 127.0.0.1 for local use")
        return v.strip()

    # ---- derived paths -------------------------------------------------------------------------------
    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def is_loopback(self) -> bool:
        return self.host in {"127.0.0.1", "localhost", "::1"} or self.host.startswith("127.")

    def field_descriptions(self) -> list[tuple[str, Any, str]]:
        """(name, current value, description) for every field, for the Settings tab."""
        return [(name, getattr(self, name), info.description or "") for name, info in type(self).model_fields.items()]


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(Settings.model_fields), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(Settings.model_fields)}."


def _env_values(environ: dict[str, str]) -> dict[str, str]:
    values = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in Settings.model_fields:
            raise SettingsError(f"Unknown environment variable {name}.{_suggest(key)}")
        values[key] = value
    return values


def _toml_values(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{path} is not valid TOML: {e}") from None
    for key in data:
        if key not in Settings.model_fields:
            raise SettingsError(f"Unknown setting '{key}' in {path}.{_suggest(key)}")
    return data


def load_settings(
    toml_path: Path | None = Path("studio.toml"),
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Merge studio.toml < STUDIO_* env < overrides (CLI flags) and validate once."""
    values: dict[str, Any] = {}
    if toml_path is not None and toml_path.is_file():
        values.update(_toml_values(toml_path))
    values.update(_env_values(dict(os.environ) if environ is None else environ))
    for key, value in (overrides or {}).items():
        if key not in Settings.model_fields:
            raise SettingsError(f"Unknown setting '{key}'.{_suggest(key)}")
        if value is not None:
            values[key] = value
    return _validated(values)


def _validated(values: dict[str, Any]) -> Settings:
    try:
        return Settings(**values)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])} = {err.get('input')!r}: {err['msg']}" for err in e.errors()
        )
        raise SettingsError(f"Invalid setting: {problems}") from None


# Settings the running studio applies at once (the residency caps); every other change needs a restart.
LIVE_KEYS = frozenset({"vram_cap_gb", "ram_cap_gb"})


def with_changes(current: Settings, changes: dict[str, Any]) -> Settings:
    """`current` with `changes` applied, refused with the same messages as studio.toml ('' means unset)."""
    for key in changes:
        if key not in Settings.model_fields:
            raise SettingsError(f"Unknown setting '{key}'.{_suggest(key)}")
    values = current.model_dump()
    values.update({k: (None if v == "" else v) for k, v in changes.items()})
    return _validated(values)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if any(ord(ch) < 32 for ch in str(v)):
        raise SettingsError(f"{str(v)!r}: control characters (newlines, tabs) are not allowed in a setting.")
    text = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def save_toml(path: Path, settings: Settings, keys: list[str]) -> None:
    """Write `keys` of `settings` into the TOML file (other keys in it kept), atomically; None removes a key."""
    from studio.safety import atomic_write_text

    values = _toml_values(path) if path.is_file() else {}
    for key in keys:
        value = getattr(settings, key)
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    lines = ["# OneCard Studio settings (edited in the Settings tab; STUDIO_* variables and flags still win)"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    atomic_write_text(path, "\n".join(lines) + "\n")
