from test_queuectl import *  # noqa: F401,F403  (fixtures db/fast and helpers cli, run, start_workers, burst, enqueue, show, status, wait_until, error_line)
from test_queuectl import cli, run, start_workers, burst, enqueue, show, status, wait_until, error_line, db, fast, SCRIPT  # noqa: F401,E501

import collections
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest


# ---------------------------------------------------------------------------
# Workers: helpers for real supervisors, their processes and their jobs
# ---------------------------------------------------------------------------

@pytest.fixture
def pool(tmp_path):
    """start(*argv): `worker start ARGV` in a process group of its own, logging to a file.

    The log goes to a file, not a pipe, so a busy pool never blocks on a full
    pipe. At teardown every group started is killed, and every job that wrote
    its pid to tmp_path/*.pid and still runs `sleep` is killed too: nothing leaks.
    """
    started = []

    def start(*argv):
        log_path = tmp_path / f"supervisor-{len(started) + 1}.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen([sys.executable, SCRIPT, "worker", "start", *map(str, argv)],
                                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        proc.log_path = log_path
        started.append(proc)
        return proc

    yield start
    for proc in started:
        kill_group(proc.pid)
        proc.wait(timeout=10)
    for pid_file in tmp_path.glob("*.pid"):
        pid = read_pid(pid_file)
        if pid and is_running(pid) and b"sleep" in cmdline(pid):
            kill_group(pid)


def kill_group(pgid, signum=signal.SIGKILL):
    """Signal a process group that may already be gone."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def log_text(proc):
    """What a pool() supervisor and its workers logged so far."""
    return proc.log_path.read_text(errors="replace")


def cmdline(pid):
    """A process's command line as bytes ('' where /proc has none)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def is_running(pid):
    """Whether pid is a live process; a zombie (dead, not yet reaped by its parent) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc"):
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def read_pid(path):
    """The pid a job wrote to path, or None while the file is missing or not yet written."""
    try:
        text = open(path).read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def worker_list():
    """`worker list --json` as a list."""
    code, out, err = cli("worker", "list", "--json")
    assert code == 0, err
    return json.loads(out)


def pids_of(kind):
    """The pids `worker list --json` shows for one kind ('supervisor' or 'worker')."""
    return sorted(p["pid"] for p in worker_list() if p["kind"] == kind)


def all_jobs():
    """Every job, as `list --json --limit 0` prints them."""
    code, out, err = cli("list", "--json", "--limit", "0")
    assert code == 0, err
    return json.loads(out)


def job_states():
    """{state: count} from `status --json`."""
    return status()["jobs"]


def jsonl(*jobs):
    """Job objects as a JSON Lines text for `enqueue -f -`."""
    return "".join(json.dumps(job) + "\n" for job in jobs)


def enqueue_lines(text):
    """`enqueue -f -` with text on stdin; return the printed ids."""
    code, out, err = cli("enqueue", "-f", "-", stdin=text)
    assert code == 0, err
    return out.split()


def config_set(key, value):
    """`config set KEY VALUE`, which must succeed."""
    code, _, err = cli("config", "set", key, value)
    assert code == 0, err


@contextmanager
def adopting_orphans():
    """Make this process the reaper of orphaned descendants (Linux), as a prompt init is.

    Yields reap(pid), which waits for an adopted (or own) child to exit and
    reaps it, so no zombie of it is left for `worker list` to see.
    """
    import ctypes
    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    if libc is not None:
        assert libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())

    def reap(pid, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                return  # not ours (another reaper got it) or already reaped
            time.sleep(0.01)
        raise AssertionError(f"process {pid} did not exit within {timeout} s")

    try:
        yield reap
    finally:
        if libc is not None:
            libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)


# ---------------------------------------------------------------------------
# Workers: exactly once, and leases
# ---------------------------------------------------------------------------

def test_four_workers_run_each_of_500_jobs_exactly_once(fast, tmp_path):
    out = tmp_path / "out.txt"
    ids = [f"job-{n:03d}" for n in range(500)]
    command = f'echo "$QUEUECTL_JOB_ID" >> {shlex.quote(str(out))}'
    assert enqueue_lines(jsonl(*({"id": i, "command": command} for i in ids))) == ids

    burst("--count", "4", timeout=120)

    assert collections.Counter(out.read_text().split()) == collections.Counter(ids)
    assert job_states()["completed"] == 500 and sum(job_states().values()) == 500
    assert {(job["state"], job["attempts"]) for job in all_jobs()} == {("completed", 1)}


def test_a_job_longer_than_lease_timeout_runs_exactly_once_while_its_worker_lives(fast, tmp_path):
    config_set("lease_timeout", "1")
    out = tmp_path / "out.txt"
    (job_id,) = enqueue("-c", f"echo run >> {shlex.quote(str(out))}; sleep 2.5")

    burst("--count", "2")

    assert out.read_text() == "run\n"
    job = show(job_id)
    assert (job["state"], job["attempts"], job["exit_code"]) == ("completed", 1, 0)


def test_a_job_can_call_queuectl_on_the_same_database_while_it_runs(fast):
    # A short busy timeout for the job: were a lock held, the inner enqueue would fail fast.
    inner = f"{shlex.quote(sys.executable)} {shlex.quote(SCRIPT)} enqueue -c 'echo inner ran' --id inner"
    (outer,) = enqueue(json.dumps({"id": "outer", "command": inner, "max_retries": 0,
                                   "env": {"QUEUECTL_BUSY_TIMEOUT": "1"}}))

    burst()

    job = show(outer)
    assert (job["state"], job["attempts"], job["stdout"]) == ("completed", 1, "inner\n"), job
    job = show("inner")
    assert (job["state"], job["stdout"]) == ("completed", "inner ran\n")


# ---------------------------------------------------------------------------
# Workers: signals
# ---------------------------------------------------------------------------

def test_sigterm_lets_the_running_job_finish_stops_claiming_and_exits_0(fast, pool, tmp_path):
    enqueue("-c", "touch started; sleep 1; echo done", "--id", "running")
    enqueue("-c", "echo should not run", "--id", "waiting")
    proc = pool("--count", "1")
    assert wait_until(lambda: (tmp_path / "started").exists()), log_text(proc)

    os.kill(proc.pid, signal.SIGTERM)

    assert proc.wait(timeout=15) == 0, log_text(proc)
    job = show("running")
    assert (job["state"], job["attempts"], job["exit_code"], job["stdout"]) == ("completed", 1, 0, "done\n")
    job = show("waiting")
    assert (job["state"], job["attempts"]) == ("pending", 0)
    assert worker_list() == []
    assert "Traceback" not in log_text(proc)


def test_ctrl_c_at_the_terminal_reaches_the_supervisor_not_the_job_and_the_job_finishes(fast, pool, tmp_path):
    (job_id,) = enqueue("-c", "touch started; sleep 1; echo done")
    proc = pool("--count", "2")
    assert wait_until(lambda: (tmp_path / "started").exists()), log_text(proc)

    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group

    assert proc.wait(timeout=15) == 0, log_text(proc)
    job = show(job_id)
    assert (job["state"], job["exit_code"], job["stdout"]) == ("completed", 0, "done\n")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_ends_the_running_job_returns_it_uncounted_and_exits_at_once(fast, pool, tmp_path, signum):
    pid_file = tmp_path / "job.pid"
    path = shlex.quote(str(pid_file))
    # The first run sleeps (exec: $$ is the sleep itself); the run after the abort finishes.
    command = f'[ -e {path} ] || {{ echo $$ > {path}; exec sleep 30; }}; echo "attempt $QUEUECTL_ATTEMPT"'
    (job_id,) = enqueue("-c", command)
    proc = pool("--count", "1")
    assert wait_until(lambda: read_pid(pid_file)), log_text(proc)
    job_pid = read_pid(pid_file)

    os.kill(proc.pid, signum)
    assert wait_until(lambda: "supervisor stopping" in log_text(proc)), log_text(proc)
    assert show(job_id)["state"] == "processing"  # the first signal waits for the job
    started = time.monotonic()
    os.kill(proc.pid, signum)
    code = proc.wait(timeout=15)
    took_s = time.monotonic() - started

    assert code == 128 + signum, log_text(proc)
    assert took_s < 3.0, f"the supervisor took {took_s:.2f} s to exit after the second signal"
    assert not is_running(job_pid), "the job's sleep 30 outlived the forced shutdown"
    job = show(job_id)
    assert (job["state"], job["attempts"]) == ("pending", 0), job
    assert worker_list() == []

    burst()
    job = show(job_id)
    assert (job["state"], job["attempts"], job["stdout"]) == ("completed", 1, "attempt 1\n")


# ---------------------------------------------------------------------------
# Workers: crash safety
# ---------------------------------------------------------------------------

def test_a_job_whose_workers_were_sigkilled_returns_to_the_retry_rules_within_lease_timeout(fast, pool, tmp_path):
    config_set("lease_timeout", "2")
    pid_file = tmp_path / "job.pid"
    (job_id,) = enqueue("-c", f'if [ "$QUEUECTL_ATTEMPT" = 1 ]; then echo $$ > {shlex.quote(str(pid_file))}; exec sleep 30; fi')
    proc = pool("--count", "1")
    assert wait_until(lambda: read_pid(pid_file)), log_text(proc)
    assert show(job_id)["state"] == "processing"

    os.killpg(proc.pid, signal.SIGKILL)  # supervisor and workers; the job, in its own session, lives on
    killed_at = time.monotonic()
    proc.wait(timeout=10)

    # No worker is alive: the read commands themselves return the job.
    assert wait_until(lambda: show(job_id)["state"] != "processing", timeout=6)
    took_s = time.monotonic() - killed_at
    assert took_s <= 2 + 1.0, f"the job came back {took_s:.2f} s after its worker died (lease_timeout 2)"
    job = show(job_id)
    assert (job["state"], job["attempts"], job["exit_code"]) == ("failed", 1, None), job
    assert "worker lost" in job["last_error"]
    kill_group(read_pid(pid_file))  # the orphaned first run

    burst()
    job = show(job_id)
    assert (job["state"], job["attempts"], job["exit_code"]) == ("completed", 2, 0)


def test_chaos_sigkilled_workers_are_replaced_and_every_job_ends_completed_or_dead(fast, pool, tmp_path):
    rng = random.Random(20261122)
    max_retries = 5
    gate = tmp_path / "gate"
    short = [{"command": rng.choice(["true", f"sleep 0.0{rng.randint(1, 5)}"]), "max_retries": max_retries}
             for _ in range(290)]
    # Last to run (lowest priority), these hold the burst open until the chaos is over.
    held = [{"command": f"while [ ! -e {shlex.quote(str(gate))} ]; do sleep 0.02; done", "max_retries": max_retries,
             "priority": -1} for _ in range(10)]
    ids = enqueue_lines(jsonl(*short, *held))
    proc = pool("--count", "4", "--burst")
    assert wait_until(lambda: len(pids_of("worker")) == 4), log_text(proc)

    killed = set()
    for _ in range(8):
        victims = wait_until(lambda: sorted(set(pids_of("worker")) - killed), timeout=5)
        assert victims, log_text(proc)
        victim = rng.choice(victims)
        os.kill(victim, signal.SIGKILL)
        killed.add(victim)
        time.sleep(rng.uniform(0.05, 0.3))  # let the pool run a little between kills
    assert proc.poll() is None, "the burst ended before the chaos did"
    assert wait_until(lambda: len(pids_of("worker")) == 4 and not set(pids_of("worker")) & killed,
                      timeout=5), log_text(proc)
    gate.touch()

    assert proc.wait(timeout=60) == 0, log_text(proc)
    jobs = all_jobs()
    assert sorted(job["id"] for job in jobs) == sorted(ids)
    counts = collections.Counter(job["state"] for job in jobs)
    assert set(counts) <= {"completed", "dead"}, counts
    for job in jobs:
        if job["state"] == "dead":
            assert job["attempts"] == max_retries + 1, job
        else:
            assert 1 <= job["attempts"] <= max_retries + 1, job
    assert any(job["attempts"] > 1 for job in jobs), "no kill hit a running job"
    assert all(job_states()[state] == 0 for state in ("pending", "processing", "failed"))
    assert "Traceback" not in log_text(proc)


def test_a_worker_process_that_dies_is_replaced_with_a_new_pid(fast, pool):
    proc = pool("--count", "2")
    assert wait_until(lambda: len(pids_of("worker")) == 2), log_text(proc)
    victim, survivor = pids_of("worker")

    os.kill(victim, signal.SIGKILL)

    def replaced():
        pids = pids_of("worker")
        return len(pids) == 2 and survivor in pids and victim not in pids
    assert wait_until(replaced, timeout=5), log_text(proc)
    assert pids_of("supervisor") == [proc.pid]
    assert proc.poll() is None
    (job_id,) = enqueue("-c", "true")  # and the new one works
    assert wait_until(lambda: show(job_id)["state"] == "completed"), log_text(proc)


def test_worker_list_never_shows_processes_killed_with_their_group(fast, pool):
    with adopting_orphans() as reap:
        proc = pool("--count", "2")
        assert wait_until(lambda: len(worker_list()) == 3), log_text(proc)
        pids = [p["pid"] for p in worker_list()]

        os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids:  # as init would: the supervisor is our child, its workers are our orphans
            reap(pid)

        assert worker_list() == []  # their rows are stale (lease_timeout 30 s) but their pids are gone
        assert status()["workers"] == []


def test_worker_list_does_not_show_killed_processes_still_waiting_to_be_reaped(fast, pool):
    # A killed process stays a zombie until its parent reaps it: here the
    # supervisor (this test's child) is; its orphaned workers too, until init
    # reaps them, which a container's init may do late or never. Dead is dead.
    proc = pool("--count", "1")
    assert wait_until(lambda: len(worker_list()) == 2), log_text(proc)
    pids = [p["pid"] for p in worker_list()]

    os.killpg(proc.pid, signal.SIGKILL)
    assert wait_until(lambda: not any(is_running(pid) for pid in pids), timeout=5)

    assert worker_list() == []


# ---------------------------------------------------------------------------
# Workers: cancel of a running job
# ---------------------------------------------------------------------------

def test_cancel_of_a_processing_job_ends_its_whole_process_group_at_once(fast, pool, tmp_path):
    command = "sleep 30 & echo $! > child.pid; echo $$ > job.pid; wait"
    (job_id,) = enqueue("-c", command)
    proc = pool("--count", "1")
    assert wait_until(lambda: read_pid(tmp_path / "job.pid")), log_text(proc)
    pids = [read_pid(tmp_path / "job.pid"), read_pid(tmp_path / "child.pid")]

    code, out, err = cli("cancel", job_id)
    canceled_at = time.monotonic()

    assert (code, out, err) == (0, f"canceled {job_id} (its process group is being stopped)\n", "")
    assert wait_until(lambda: not any(is_running(pid) for pid in pids), timeout=0.05 + 5 + 1), log_text(proc)
    took_s = time.monotonic() - canceled_at
    assert took_s < 0.05 + 5, f"the job's group outlived the cancel by {took_s:.2f} s"
    # The worker moves on (the next job runs) and writes nothing over the cancel.
    (next_id,) = enqueue("-c", "true")
    assert wait_until(lambda: show(next_id)["state"] == "completed"), log_text(proc)
    job = show(job_id)
    assert (job["state"], job["attempts"], job["last_error"]) == ("canceled", 1, "canceled by the user"), job


def test_cancel_of_a_job_that_ignores_sigterm_kills_it_5_s_later(fast, pool, tmp_path):
    (job_id,) = enqueue("-c", "trap '' TERM; echo $$ > job.pid; sleep 30")
    proc = pool("--count", "1")
    assert wait_until(lambda: read_pid(tmp_path / "job.pid")), log_text(proc)
    job_pid = read_pid(tmp_path / "job.pid")

    assert cli("cancel", job_id)[0] == 0
    canceled_at = time.monotonic()

    assert not wait_until(lambda: not is_running(job_pid), timeout=4), "SIGKILL came before the 5 s grace"
    assert wait_until(lambda: not is_running(job_pid), timeout=0.05 + 5 + 1 - 4), log_text(proc)
    took_s = time.monotonic() - canceled_at
    assert 4 <= took_s <= 0.05 + 5 + 1
    assert show(job_id)["state"] == "canceled"


# ---------------------------------------------------------------------------
# Workers: detach, stop, list, start methods
# ---------------------------------------------------------------------------

def test_detach_prints_the_pid_logs_to_db_log_and_worker_stop_stops_it(fast, pool):
    result = run("worker", "start", "--detach", "--count", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().isdigit(), result.stdout
    pid = int(result.stdout)
    try:
        assert wait_until(lambda: len(pids_of("worker")) == 2), worker_list()
        assert pids_of("supervisor") == [pid]
        assert all(is_running(p["pid"]) for p in worker_list())
        ids = enqueue_lines(jsonl(*({"command": f"echo {n}"} for n in range(3))))
        assert wait_until(lambda: all(show(i)["state"] == "completed" for i in ids))

        log_path = fast + ".log"
        assert os.stat(log_path).st_mode & 0o777 == 0o600
        log = open(log_path).read()
        assert f"supervisor {pid} started 2 worker(s)" in log
        assert all(f"job {i} completed" in log for i in ids), log

        stopped = run("worker", "stop", "--timeout", "10")
        assert (stopped.returncode, stopped.stdout, stopped.stderr) == (0, "stopped 1 supervisor(s)\n", "")
        assert worker_list() == []
        assert wait_until(lambda: not is_running(pid), timeout=5)
    finally:
        if is_running(pid):
            kill_group(pid)


def test_worker_stop_waits_for_the_running_job_and_records_it(fast, pool, tmp_path):
    (job_id,) = enqueue("-c", "touch started; sleep 1; echo done")
    proc = pool("--count", "2")
    assert wait_until(lambda: (tmp_path / "started").exists()), log_text(proc)

    stopped = run("worker", "stop")

    assert (stopped.returncode, stopped.stdout) == (0, "stopped 1 supervisor(s)\n"), stopped.stderr
    job = show(job_id)  # finished and recorded before stop returned
    assert (job["state"], job["stdout"]) == ("completed", "done\n")
    assert proc.wait(timeout=5) == 0
    assert worker_list() == []


def test_worker_stop_with_no_supervisor_says_so_and_exits_0(db):
    assert cli("worker", "stop") == (0, "no supervisor is running\n", "")


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_every_start_method_runs_a_burst_to_completion(fast, method):
    ids = enqueue_lines(jsonl(*({"command": 'echo "$QUEUECTL_JOB_ID"'} for _ in range(4))))

    burst("--count", "2", "--start-method", method)

    for job_id in ids:
        job = show(job_id)
        assert (job["state"], job["stdout"]) == ("completed", job_id + "\n")
