"""build_app(ctx) -> gr.Blocks from the tab list, and `python -m studio.app`: launch with the security checks.

Security invariants (DESIGN.md): bind 127.0.0.1 by default; share or a non-loopback host only with auth from a
file; the file route serves only the outputs folder and never the models, config or cache folders; uploads are
capped; monitoring and MCP endpoints are off; every route sits behind studio.http_guard (body caps, upload quota,
same-origin check when exposed, login back-off, no API description before login).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from studio import api
from studio.context import StudioContext, Tab
from studio.offline import apply_env
from studio.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger(__name__)

TAB_MODULES = (
    "tabs.chat",
    "tabs.rag",
    "tabs.image",
    "tabs.vision",
    "tabs.audio",
    "tabs.vlm",
    "tabs.finetune",
    "tabs.tinylm",
    "tabs.models",
    "tabs.gpu",
    "tabs.runs",
    "tabs.settings",
)
CONFIG_FILE = Path("studio.toml")


class LaunchRefused(RuntimeError):
    """Starting as asked would expose the studio without a password."""


def read_auth(path: Path | None) -> list[tuple[str, str]] | None:
    """'user:password' per line; blank lines and '#' comments ignored."""
    if path is None:
        return None
    if not path.is_file():
        raise LaunchRefused(f"Auth file {path} does not exist. Create it with one 'user:password' per line.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LaunchRefused(
            f"Auth file {path} is not UTF-8 text: save it as UTF-8 with one 'user:password' per line."
        ) from None
    except OSError as e:
        raise LaunchRefused(f"Auth file {path} cannot be read ({e.strerror}).") from None
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or len(password) < 8:
            raise LaunchRefused(f"{path}:{n}: expected 'user:password' with a password of at least 8 characters.")
        pairs.append((user, password))
    if not pairs:
        raise LaunchRefused(f"Auth file {path} has no 'user:password' line.")
    return pairs


def check_launch_safety(settings: Settings) -> list[tuple[str, str]] | None:
    """Refuse share or a non-loopback bind without auth; return the auth pairs to use (or None locally)."""
    auth = read_auth(settings.auth_file)
    try:
        api.check_settings(settings)
    except api.ApiConfigError as e:
        raise LaunchRefused(str(e)) from None
    if settings.exposed and not auth:
        what = "a share link" if settings.share else f"binding to {settings.host}"
        raise LaunchRefused(
            f"Refusing {what} without a password: anyone who reaches it could use your GPU and read your outputs. "
            "Create a file with 'user:password' and pass --auth-file FILE (or STUDIO_AUTH_FILE)."
        )
    return auth


def build_context(settings: Settings) -> StudioContext:
    from studio.catalog import Catalog
    from studio.jobs import JobRunner
    from studio.residency import ResidencyManager
    from studio.runs import RunStore
    from studio.safety import remove_orphan_temps

    for folder in (settings.data_dir, settings.outputs_dir, settings.runs_dir, settings.cache_dir, settings.models_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for path in remove_orphan_temps([settings.data_dir, settings.models_dir]):
        log.info("removed %s, left by an interrupted save", path)
    runs = RunStore(settings.runs_dir)
    for run in runs.mark_interrupted():
        log.warning("run %s was left running by a crash: marked interrupted", run.id)
    return StudioContext(
        settings=settings,
        residency=ResidencyManager.from_settings(settings),
        catalog=Catalog(settings.models_dir),
        jobs=JobRunner(),
        runs=runs,
    )


def load_tabs(modules: tuple[str, ...] = TAB_MODULES) -> list[Tab | tuple[str, Exception]]:
    tabs: list[Tab | tuple[str, Exception]] = []
    for name in modules:
        try:
            tabs.append(importlib.import_module(name).TAB)
        except Exception as e:  # one broken tab must not take the studio down
            log.exception("tab module %s failed to import", name)
            tabs.append((name.split(".")[-1].capitalize(), e))
    return tabs


def quiet_user_errors() -> None:
    """A gr.Error is a user mistake whose message says the fix: log it as one line, without a traceback.

    Gradio prints the full traceback of every gr.Error unless it was raised with print_exception=False; the tabs
    raise plenty of them ("Choose a knowledge base first"), so the default flips here, once, for the whole app.
    Real failures are not gr.Error and keep their tracebacks (the tabs also log them with log.exception).
    """
    import gradio.exceptions as gx

    init = gx.Error.__init__
    if getattr(init, "_studio_quiet", False):
        return

    def __init__(self, message="Error raised.", duration=10, visible=True, title="Error", print_exception=False):
        init(self, message, duration, visible, title, print_exception)
        if not print_exception:
            logging.getLogger("studio.user").info("refused: %s", " ".join(str(message).split())[:300])

    __init__._studio_quiet = True  # type: ignore[attr-defined]
    gx.Error.__init__ = __init__


def build_app(ctx: StudioContext) -> gr.Blocks:
    import gradio as gr

    quiet_user_errors()

    with gr.Blocks(title="OneCard Studio", analytics_enabled=False) as demo:
        gr.Markdown("# OneCard Studio\nOne GPU, every local AI tool. Models load and unload themselves.")
        for tab in load_tabs():
            if isinstance(tab, Tab):
                with gr.Tab(tab.title):
                    try:
                        tab.build(ctx)
                    except Exception as e:
                        log.exception("tab %s failed to build", tab.title)
                        gr.Markdown(f"**This tab failed to load:** `{type(e).__name__}: {e}`. See the log.")
            else:
                title, error = tab
                with gr.Tab(title):
                    gr.Markdown(f"**This tab failed to load:** `{type(error).__name__}: {error}`. See the log.")
    return demo


def launch(ctx: StudioContext, *, prevent_thread_lock: bool = False) -> gr.Blocks:
    from studio.http_guard import start_upload_cleaner

    s = ctx.settings
    auth = check_launch_safety(s)
    demo = build_app(ctx)
    demo.queue(max_size=64, default_concurrency_limit=4)
    app = guarded_app(s)
    api.mount(app, ctx)  # the OpenAI-compatible /v1 routes, on the same port
    start_upload_cleaner(Path(app.uploaded_file_dir), s.upload_keep_hours * 3600)
    blocked = [str(p.resolve()) for p in (s.models_dir, s.cache_dir, CONFIG_FILE) if p is not None]
    blocked += [str(f.resolve()) for f in (s.auth_file, s.api_keys_file) if f is not None]
    demo.launch(
        server_name=s.host,
        server_port=s.port,
        share=s.share,
        auth=auth,
        inbrowser=s.open_browser,
        allowed_paths=[str(s.outputs_dir.resolve())],
        blocked_paths=blocked,
        max_file_size=f"{s.max_upload_mb}mb",
        enable_monitoring=False,
        mcp_server=False,
        prevent_thread_lock=prevent_thread_lock,
        quiet=False,
        _app=app,
    )
    return demo


def guarded_app(settings: Settings) -> object:
    """Gradio's App (no OpenAPI/docs routes) with the HTTP guard in front of every route."""
    from gradio.routes import App

    from studio.http_guard import GuardPolicy, HttpGuard, app_kwargs

    app = App(**app_kwargs())
    app.add_middleware(HttpGuard, policy=GuardPolicy.from_settings(settings), gradio_app=app)
    return app


def _term_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM takes Ctrl+C's path: jobs save their checkpoint, then the server closes


def parse_args(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(
        prog="launch.py",
        description="Start OneCard Studio.",
        epilog="python launch.py test [pytest args] runs the tests. Settings: studio.toml < STUDIO_* env < flags.",
    )
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--share", action="store_true", default=None, help="public share link (needs --auth-file)")
    p.add_argument("--auth-file", type=Path)
    p.add_argument("--api-keys-file", type=Path, help="API keys for the /v1 routes, one per line")
    p.add_argument("--vram-cap-gb", type=float)
    p.add_argument("--ram-cap-gb", type=float)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--models-dir", type=Path)
    p.add_argument("--offline", action="store_true", default=None, help="never touch the network")
    p.add_argument("--no-browser", dest="open_browser", action="store_false", default=None)
    p.add_argument("--config", type=Path, default=CONFIG_FILE, help="settings file (default studio.toml)")
    args = vars(p.parse_args(argv))
    return args


def main(argv: list[str] | None = None) -> int:
    from studio.logs import setup_logging

    setup_logging()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    config = args.pop("config")
    try:
        settings = load_settings(config, overrides=args)
        # launch.py probes the Hub once and sets HF_HUB_OFFLINE when it is unreachable; here we never touch the network.
        offline = settings.offline or os.environ.get("HF_HUB_OFFLINE") == "1"
        apply_env(settings.data_dir, offline=offline)
        if offline:
            log.info("offline mode: only models already on this machine are used")
        check_launch_safety(settings)  # refuse before any model or folder is touched
        signal.signal(signal.SIGTERM, _term_as_interrupt)
        ctx = build_context(settings)
        sys.stdout.write(f"OneCard Studio on http://{settings.host}:{settings.port}\n")
        sys.stdout.flush()
        launch(ctx)
    except (SettingsError, LaunchRefused) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
