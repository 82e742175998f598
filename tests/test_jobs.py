"""JobRunner: progress, logs, cooperative cancel, one GPU job at a time, failures isolated, shutdown saves."""

from __future__ import annotations

import threading
import time

import pytest

from studio.jobs import MAX_LOG_LINES, Job, JobRunner


@pytest.fixture
def runner():
    r = JobRunner()
    yield r
    r.shutdown(timeout=5)


def _wait_until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return False


def test_job_runs_in_background_reports_progress_and_result(runner):
    gate = threading.Event()

    threads = []

    def work(job: Job) -> int:
        threads.append(threading.current_thread())
        job.set_progress(0.25, "quarter")
        job.log("hello")
        gate.wait(5)
        return 42

    job = runner.submit("answer", work, gpu=False)
    assert _wait_until(lambda: job.progress == 0.25)
    assert job.status == "running" and job.message == "quarter"
    assert job.started is not None and job.finished is None
    assert job.wait(0.05) is False  # still blocked on the gate
    gate.set()
    assert job.wait(5)
    assert job.status == "done" and job.result == 42 and job.progress == 1.0
    assert job.error is None and job.finished >= job.started >= job.created
    assert any(line.endswith("hello") for line in job.logs)
    assert threads and threads[0] is not threading.current_thread()
    assert runner.get(job.id) is job


def test_progress_is_clamped(runner):
    job = runner.submit("clamp", lambda j: (j.set_progress(3.0), j.progress)[1], gpu=False)
    assert job.wait(5) and job.result == 1.0


def test_only_one_gpu_job_at_a_time_and_queue_is_visible(runner):
    running = []
    peak = []
    lock = threading.Lock()
    release = threading.Event()

    def gpu_work(job: Job) -> str:
        with lock:
            running.append(job.id)
            peak.append(len(running))
        release.wait(5)
        with lock:
            running.remove(job.id)
        return job.id

    jobs = [runner.submit(f"g{i}", gpu_work) for i in range(3)]
    assert _wait_until(lambda: jobs[0].status == "running")
    time.sleep(0.05)
    assert jobs[1].status == "queued" and jobs[2].status == "queued"
    assert "position 1" in jobs[1].message and "position 2" in jobs[2].message
    release.set()
    for j in jobs:
        assert j.wait(5)
    assert [j.status for j in jobs] == ["done"] * 3
    assert max(peak) == 1
    # started strictly one after another
    assert jobs[0].finished <= jobs[1].started and jobs[1].finished <= jobs[2].started


def test_cpu_jobs_run_concurrently_with_a_gpu_job(runner):
    barrier = threading.Barrier(3, timeout=5)

    def meet(job: Job) -> bool:
        barrier.wait()  # raises BrokenBarrierError unless all three run at the same time
        return True

    jobs = [runner.submit("gpu", meet), runner.submit("cpu1", meet, gpu=False), runner.submit("cpu2", meet, gpu=False)]
    for j in jobs:
        assert j.wait(6)
    assert [j.status for j in jobs] == ["done"] * 3, [j.error for j in jobs]


def test_cancel_running_job_is_cooperative_and_keeps_partial_result(runner):
    saved = []

    def train(job: Job) -> int:
        step = 0
        while not job.should_stop():
            step += 1
            job.set_progress(min(step / 1e6, 0.99))
            time.sleep(0.002)
        saved.append(step)  # "checkpoint" on stop
        return step

    job = runner.submit("train", train)
    assert _wait_until(lambda: job.progress > 0)
    assert runner.cancel(job.id) is True
    assert job.wait(5)
    assert job.status == "cancelled"
    assert saved and job.result == saved[0] > 0
    assert runner.cancel(job.id) is False  # already finished


def test_cancel_queued_job_is_immediate_and_frees_its_place(runner):
    release = threading.Event()
    first = runner.submit("first", lambda j: release.wait(5))
    second = runner.submit("second", lambda j: "never")
    third = runner.submit("third", lambda j: "ran")
    assert _wait_until(lambda: first.status == "running")
    assert runner.cancel(second.id)
    assert second.status == "cancelled" and second.wait(0) and second.started is None
    assert "position 1" in third.message
    release.set()
    assert third.wait(5) and third.result == "ran"
    assert second.result is None
    assert runner.cancel("job-9999") is False


def test_failing_job_is_marked_failed_with_traceback_and_runner_survives(runner):
    def boom(job: Job) -> None:
        job.log("about to fail")
        raise ValueError("bad learning rate 1e9")

    bad = runner.submit("boom", boom)
    assert bad.wait(5)
    assert bad.status == "failed"
    assert "ValueError" in bad.error and "bad learning rate 1e9" in bad.error
    assert any("Traceback" in line for line in bad.logs)
    assert any("raise ValueError" in line for line in bad.logs)
    # the GPU slot was released and the runner still works
    good = runner.submit("after", lambda j: "ok")
    assert good.wait(5) and good.status == "done" and good.result == "ok"


def test_logs_are_bounded(runner):
    def chatty(job: Job) -> None:
        for i in range(MAX_LOG_LINES + 50):
            job.log(f"line {i}")

    job = runner.submit("chatty", chatty, gpu=False)
    assert job.wait(5)
    logs = job.logs
    assert len(logs) == MAX_LOG_LINES
    assert logs[-1].endswith(f"line {MAX_LOG_LINES + 49}") and logs[0].endswith("line 50")


def test_list_is_newest_first_and_summary_is_plain_data(runner):
    a = runner.submit("a", lambda j: 1, gpu=False)
    time.sleep(0.01)
    b = runner.submit("b", lambda j: 2, gpu=False)
    assert [j.id for j in runner.list()][:2] == [b.id, a.id]
    assert a.wait(5) and b.wait(5)
    s = a.summary()
    assert s["name"] == "a" and s["status"] == "done" and s["gpu"] is False


def test_shutdown_asks_running_jobs_to_save_and_refuses_new_ones():
    runner = JobRunner()
    saved = threading.Event()
    release = threading.Event()

    def train(job: Job) -> None:
        while not job.should_stop():
            time.sleep(0.005)
        saved.set()  # final save

    running = runner.submit("train", train)
    queued = runner.submit("queued", lambda j: release.wait(5))
    assert _wait_until(lambda: running.status == "running")
    assert runner.shutdown(timeout=5) is True
    assert saved.is_set()
    assert running.status == "cancelled" and queued.status == "cancelled"
    with pytest.raises(RuntimeError, match="shut down"):
        runner.submit("late", lambda j: None)


def test_shutdown_reports_a_job_that_does_not_stop_in_time():
    runner = JobRunner()
    release = threading.Event()
    job = runner.submit("stubborn", lambda j: release.wait(5))
    assert _wait_until(lambda: job.status == "running")
    t0 = time.monotonic()
    assert runner.shutdown(timeout=0.2) is False
    assert time.monotonic() - t0 < 2
    release.set()
    assert job.wait(5)


def test_old_finished_jobs_are_pruned():
    runner = JobRunner(max_jobs_kept=5)
    jobs = [runner.submit(f"j{i}", lambda j: None, gpu=False) for i in range(12)]
    for j in jobs:
        assert j.wait(5)
    runner.submit("last", lambda j: None, gpu=False).wait(5)
    assert len(runner.list()) <= 6
    assert runner.get(jobs[0].id) is None
    runner.shutdown(1)


def test_process_exit_lets_a_running_job_save(tmp_path):
    """Ctrl+C / window close ends the main thread; the atexit hook asks jobs to stop and waits for their save."""
    import subprocess
    import sys
    import textwrap

    marker = tmp_path / "checkpoint.txt"
    script = textwrap.dedent(
        f"""
        import time
        from studio.jobs import JobRunner

        def train(job):
            steps = 0
            while not job.should_stop():
                steps += 1
                time.sleep(0.01)
            time.sleep(0.3)  # a slow save
            open({str(marker)!r}, "w").write(f"saved after {{steps}} steps")

        runner = JobRunner(exit_timeout=10)
        job = runner.submit("train", train)
        while job.status != "running":
            time.sleep(0.01)
        time.sleep(0.1)
        raise KeyboardInterrupt  # the main thread ends as on Ctrl+C
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    assert marker.read_text().startswith("saved after ")


def test_a_double_clicked_start_makes_one_job():
    """The second click gets the job already running (and its id, so the page follows it); nothing is queued."""
    import threading

    from studio.jobs import JobRunner

    runner, release, calls = JobRunner(), threading.Event(), []
    first = runner.submit("train", lambda job: (calls.append(1), release.wait(5)), gpu=False, unique="tinylm:cfg")
    second = runner.submit("train", lambda job: calls.append(2), gpu=False, unique="tinylm:cfg")
    assert second is first and [j.id for j in runner.list()] == [first.id]
    other = runner.submit("train other", lambda job: None, gpu=False, unique="tinylm:other")
    assert other is not first
    release.set()
    assert first.wait(5) and other.wait(5) and calls == [1]
    again = runner.submit("train", lambda job: None, gpu=False, unique="tinylm:cfg")  # a new run once it ended
    assert again is not first and again.wait(5)
    runner.shutdown(5)


def test_clicks_from_two_sessions_at_once_share_one_queued_gpu_job():
    """Eight threads submit the same unique GPU job behind a busy one: one job is queued, all get it."""
    import threading

    from studio.jobs import JobRunner

    runner, release, ran = JobRunner(), threading.Event(), []
    blocker = runner.submit("holds the GPU", lambda job: release.wait(5), gpu=True)
    got, start = [], threading.Barrier(8)

    def click() -> None:
        start.wait()
        got.append(runner.submit("LoRA x", lambda job: ran.append(job.id), gpu=True, unique="sd-lora:x"))

    threads = [threading.Thread(target=click) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(got) == 8 and len({j.id for j in got}) == 1 and got[0].status == "queued"
    release.set()
    assert blocker.wait(5) and got[0].wait(5) and ran == [got[0].id]
    runner.shutdown(5)


def test_the_train_button_says_queued_started_or_that_it_follows_the_run_already_under_way():
    from types import SimpleNamespace

    from tabs._session import started_note

    def job(status, ran):
        return SimpleNamespace(status=status, name="YOLO detect training", id="job-0001", elapsed=lambda: ran)

    assert started_note(job("queued", 0.0)) == "Queued **YOLO detect training** (job-0001)."
    assert started_note(job("running", 0.3)) == "Started **YOLO detect training** (job-0001)."
    note = started_note(job("running", 75.0))
    assert "already running (1 min 15 s)" in note and "following it" in note
