"""The parts without a model: fair scheduling, rate windows, settings and their errors."""

from __future__ import annotations

import hashlib
import threading

import pytest

from qlorakit.serve import FairScheduler, QueueFull, RateLimiter, ServeError, load_config, parse_keys
from qlorakit.serve.cli import build_parser, config_from_args
from qlorakit.serve.limits import Denied


def test_scheduler_serves_keys_round_robin():
    s = FairScheduler(max_queue=100, max_queue_per_key=100)
    gate, order = threading.Event(), []
    s.submit("hold", lambda: gate.wait(10))
    futs = [s.submit(k, lambda k=k, i=i: order.append(f"{k}{i}"))
            for k, n in (("a", 4), ("b", 2), ("c", 1)) for i in range(n)]
    gate.set()
    for f in futs:
        f.result(10)
    s.close()
    # a flood from key a delays b and c by one request per turn, not by four
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]


def test_scheduler_bounds_and_exceptions():
    s = FairScheduler(max_queue=3, max_queue_per_key=2)
    gate = threading.Event()
    s.submit("hold", lambda: gate.wait(10))
    while not s.busy:
        pass
    s.submit("a", lambda: 1)
    s.submit("a", lambda: 1)
    with pytest.raises(QueueFull) as e:
        s.submit("a", lambda: 1)
    assert e.value.scope == "key" and e.value.retry_after_s > 0
    boom = s.submit("b", lambda: 1 / 0)
    with pytest.raises(QueueFull) as e:
        s.submit("c", lambda: 1)
    assert e.value.scope == "server"
    gate.set()
    with pytest.raises(ZeroDivisionError):
        boom.result(10)
    s.close()


def test_scheduler_skips_cancelled_jobs():
    s = FairScheduler(10, 10)
    gate, ran = threading.Event(), []
    s.submit("hold", lambda: gate.wait(10))
    f = s.submit("a", lambda: ran.append("a"))
    g = s.submit("b", lambda: ran.append("b"))
    assert f.cancel()
    gate.set()
    g.result(10)
    s.close()
    assert ran == ["b"]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_request_window_and_retry_after():
    clock = Clock()
    lim = RateLimiter(clock)
    for i in range(3):
        assert not isinstance(lim.admit("k", rpm=3), Denied)
        clock.t += 10
    d = lim.admit("k", rpm=3)  # t=1030: the first request leaves the window at 1060
    assert isinstance(d, Denied) and d.reason == "requests" and d.retry_after_s == pytest.approx(30)
    assert not isinstance(lim.admit("other", rpm=3), Denied)  # keys are independent
    clock.t += 30.001
    assert not isinstance(lim.admit("k", rpm=3), Denied)


def test_token_window_reserve_settle():
    clock = Clock()
    lim = RateLimiter(clock)
    a = lim.admit("k", rpm=100)
    assert lim.reserve(a, 600, tpm=1000) is None
    clock.t += 20
    b = lim.admit("k", rpm=100)
    d = lim.reserve(b, 500, tpm=1000)
    assert isinstance(d, Denied) and d.reason == "tokens" and d.retry_after_s == pytest.approx(40)
    lim.settle(a, 100)  # a used only 100 of its 600
    assert lim.reserve(b, 500, tpm=1000) is None
    assert lim.usage("k") == (2, 600)


def test_keys_from_text_env_and_config(tmp_path):
    keys = parse_keys("shop:sk-1, bare-key\nops:sha256:" + "ab" * 32, "$X")
    assert [k.id for k in keys] == ["shop", "key-" + hashlib.sha256(b"bare-key").hexdigest()[:8], "ops"]
    assert keys[0].sha256 == hashlib.sha256(b"sk-1").hexdigest() and keys[2].sha256 == "ab" * 32
    with pytest.raises(ServeError, match="expected ID:KEY"):
        parse_keys("a:b:c", "$X")
    kf = tmp_path / "keys.txt"
    kf.write_text("# team keys\nteam:sk-team\n\nbad id!:x\n")
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("auth: {keys_file: keys.txt}\n")
    with pytest.raises(ServeError, match=r"keys.txt:4"):
        load_config(cfg_file, env={})
    kf.write_text("team:sk-team\n")
    cfg_file.write_text("adapters: {a: runs/a}\nlimits: {rpm: 5}\nguards: {output_harmful: flag}\n"
                        "auth:\n  keys_file: keys.txt\n  keys: [{id: ci, key_sha256: '" + "cd" * 32 + "', tpm: 99}]\n")
    cfg = load_config(cfg_file, env={"QLORAKIT_API_KEYS": "env:sk-env"})
    assert [k.id for k in cfg.keys] == ["team", "ci", "env"] and cfg.keys[1].tpm == 99
    assert cfg.adapters == {"a": str(tmp_path / "runs/a")} and cfg.limits.rpm == 5
    assert cfg.guards.output_harmful == "flag" and cfg.guards.input_injection == "block"
    cfg.validate()


def test_config_errors_name_the_key(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("limits: {rmp: 5}\nguard: {}\n")
    with pytest.raises(ServeError) as e:
        load_config(f, env={})
    assert "limits.rmp'; did you mean 'rpm'" in str(e.value) and "'guard'; did you mean 'guards'" in str(e.value)
    f.write_text("adapters: {a: r}\nlimits: {rpm: 0, max_tokens: 10, default_max_tokens: 20}\n"
                 "guards: {input_harmful: warn}\n")
    with pytest.raises(ServeError) as e:
        load_config(f, env={}).validate()
    msg = str(e.value)
    assert "limits.rpm" in msg and "guards.input_harmful" in msg and "no API keys" in msg and "--no-auth" in msg


def test_cli_requires_keys_or_no_auth_on_loopback(monkeypatch):
    monkeypatch.delenv("QLORAKIT_API_KEYS", raising=False)
    p = build_parser()
    with pytest.raises(ServeError, match="no API keys"):
        config_from_args(p.parse_args(["--adapter", "a=runs/a"]))
    cfg = config_from_args(p.parse_args(["--adapter", "a=runs/a", "--no-auth", "--guard", "input_harmful=off"]))
    assert cfg.no_auth and cfg.host == "127.0.0.1" and cfg.guards.input_harmful == "off"
    with pytest.raises(ServeError, match="loopback"):
        config_from_args(p.parse_args(["--adapter", "a=runs/a", "--no-auth", "--host", "0.0.0.0"]))
    with pytest.raises(ServeError, match="NAME=RUN_DIR"):
        config_from_args(p.parse_args(["--adapter", "runs/a", "--no-auth"]))
    with pytest.raises(ServeError, match="CHECK=ACTION"):
        config_from_args(p.parse_args(["--adapter", "a=r", "--no-auth", "--guard", "input_harmful=warn"]))


def test_serve_main_reports_bad_settings_in_one_line(capsys, monkeypatch):
    from qlorakit.cli import main

    monkeypatch.setenv("QLORAKIT_API_KEYS", "ci:sk-ci")
    assert main(["serve", "--adapter", "a=/nonexistent/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/nonexistent/run is not a folder" in err[0]
