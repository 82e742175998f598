"""Settings: studio.toml, then STUDIO_* environment variables, then command-line flags (later wins).

Unknown keys and wrong types are refused with a message that names the bad key or value and suggests the
closest valid key. Defaults are the safe ones: loopback only, no share, no auth file needed locally.
"""

from __future__ import annotations

import difflib
import ipaddress
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
    # ---- what a remote user may reach (the owner decides here; no request field can widen it) ------------
    trusted_model_dirs: tuple[Path, ...] = Field(
        (),
        description="Folders whose pickled model files (YOLO .pt, pyannote pipelines) and custom checkpoints may "
        "be loaded, besides the models folder and the studio's own training runs. Uploaded files are never trusted.",
    )
    ingest_roots: tuple[Path, ...] = Field(
        (),
        description="Server folders (with their subfolders) that the RAG tab may ingest and the Vision tab may train "
        "on, besides data/ingest, the sample notes and uploads. Never the models, cache or config.",
    )
    remote_engine_hosts: tuple[str, ...] = Field(
        ("127.0.0.1", "localhost", "::1"),
        description="Hosts an OpenAI-compatible chat engine may be on ('*' = any). With offline only loopback.",
    )
    # ---- request limits --------------------------------------------------------------------------------
    max_body_mb: float = Field(8.0, gt=0, description="Largest request body on any route except uploads, in MB.")
    max_upload_request_mb: int | None = Field(
        None, gt=0, description="Largest upload request (all its files together), in MB (default: max_upload_mb)."
    )
    upload_quota_mb: int = Field(
        20480, gt=0, description="Most MB one user (login, or address when local) may upload per upload_keep_hours."
    )
    upload_keep_hours: float = Field(24.0, gt=0, description="Uploads older than this are deleted, in hours.")
    login_attempts: int = Field(5, ge=1, description="Wrong passwords per user and address before a back-off.")
    api_enabled: bool = Field(True, description="Serve the OpenAI-compatible API under /v1 on the same port.")
    api_keys_file: Path | None = Field(
        None,
        description="File with one /v1 API key per line; required when the studio is reachable from other machines.",
    )
    api_keys_on_loopback: bool = Field(False, description="Require a /v1 API key on 127.0.0.1 too.")
    api_max_queue: int = Field(
        8, ge=0, le=1024, description="Most /v1 requests waiting per kind of model; more get 503 with Retry-After."
    )

    @field_validator("host")
    @classmethod
    def _host_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("host must not be empty; use 127.0.0.1 for local use")
        return v.strip()

    @field_validator("trusted_model_dirs", "ingest_roots", "remote_engine_hosts", mode="before")
    @classmethod
    def _split_list(cls, v: Any, info: Any) -> Any:
        """An env var or flag gives one string: paths split on os.pathsep, hosts on commas."""
        if isinstance(v, str):
            sep = "," if info.field_name == "remote_engine_hosts" else os.pathsep
            return tuple(part.strip() for part in v.split(sep) if part.strip())
        return v

    @field_validator("remote_engine_hosts")
    @classmethod
    def _hosts_plain(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for host in v:
            if not host or (any(c in host for c in "/:@ ") and not _is_ip(host)):
                raise ValueError(f"remote_engine_hosts entry {host!r}: give a bare host name such as 'gpu-box'")
        return tuple(h.lower() for h in v)

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
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def upload_request_bytes(self) -> int:
        return int((self.max_upload_request_mb or self.max_upload_mb) * 2**20)

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def exposed(self) -> bool:
        """Anyone but this machine's user may connect: a share link or a non-loopback bind."""
        return self.share or not self.is_loopback

    def model_dirs(self) -> tuple[Path, ...]:
        """Where pickled weights and custom checkpoints may come from (resolved)."""
        return tuple(p.resolve() for p in (self.models_dir, *self.trusted_model_dirs))

    def data_roots(self) -> tuple[Path, ...]:
        """Server folders that may be read as data (RAG ingest, datasets), resolved; data/ingest first."""
        return tuple(p.resolve() for p in (self.data_dir / "ingest", *self.ingest_roots))

    def protected_paths(self) -> tuple[Path, ...]:
        """Never readable through any tab: the models, cache and config, and the auth file."""
        paths = [self.models_dir, self.cache_dir, *self.trusted_model_dirs, Path("studio.toml")]
        if self.auth_file is not None:
            paths.append(self.auth_file)
        return tuple(p.resolve() for p in paths)

    def field_descriptions(self) -> list[tuple[str, Any, str]]:
        """(name, current value, description) for every field, for the Settings tab."""
        return [(name, getattr(self, name), info.description or "") for name, info in type(self).model_fields.items()]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_loopback_host(host: str) -> bool:
    """'localhost' or a loopback IP address; '127.0.0.1.evil.com' is a host name, not loopback."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
