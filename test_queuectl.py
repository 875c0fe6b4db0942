"""Tests for queuectl.py, driven through its command line as a user would.

`cli(...)` calls queuectl.main() in this process (fast, for the commands that
only touch the database); `run(...)` and `start_workers(...)` run real
processes for the pool, signals, exit statuses and the demo. Time is driven
with millisecond backoffs and short poll intervals, and every wait polls to a
deadline instead of sleeping blindly.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import queuectl

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "queuectl.py")


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------

@pytest.fixture
def db(tmp_path, monkeypatch):
    """A fresh database path, made the default for every cli() and run() call."""
    path = str(tmp_path / "q.db")
    monkeypatch.setenv("QUEUECTL_DB", path)
    monkeypatch.chdir(tmp_path)
    return path


@pytest.fixture
def fast(db):
    """Config for quick tests: tiny backoff, short polls."""
    for key, value in (("backoff_base", "0"), ("poll_interval", "0.05")):
        assert cli("config", "set", key, value)[0] == 0
    return db


def cli(*argv, stdin=None, monkeypatch=None):
    """Run queuectl.main(argv) in-process; return (exit code, stdout, stderr)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode() if isinstance(stdin, str) else stdin))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = queuectl.main([str(a) for a in argv])
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def run(*argv, timeout=60, input=None, env=None):
    """Run queuectl.py as a real process; return the CompletedProcess (text)."""
    return subprocess.run([sys.executable, SCRIPT, *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, input=input, env=env, check=False)


def start_workers(*argv, **popen_args):
    """Start `worker start ARGV` as a real process in its own process group."""
    return subprocess.Popen([sys.executable, SCRIPT, "worker", "start", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen_args)


def burst(*argv, timeout=60):
    """Run `worker start --burst` until the queue is drained; return the CompletedProcess."""
    result = run("worker", "start", "--burst", *argv, timeout=timeout)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def enqueue(*argv):
    """Enqueue with the CLI; return the printed ids."""
    code, out, err = cli("enqueue", *argv)
    assert code == 0, err
    return out.split()


def show(job_id):
    """`show ID --json` as a dict."""
    code, out, err = cli("show", job_id, "--json")
    assert code == 0, err
    return json.loads(out)


def status():
    """`status --json` as a dict."""
    code, out, err = cli("status", "--json")
    assert code == 0, err
    return json.loads(out)


def wait_until(predicate, timeout=10.0, interval=0.02):
    """Poll predicate until it is truthy or timeout passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def error_line(err):
    """The single error line a failed command printed."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("queuectl: error: "), err
    assert "Traceback" not in err
    return lines[0]


def job_count(db_path):
    """How many jobs the database holds, read directly."""
    with sqlite3.connect(db_path) as conn:
        return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]


# ---------------------------------------------------------------------------
# Running it: version, help, errors
# ---------------------------------------------------------------------------

def test_version_prints_name_and_number():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"queuectl {queuectl.__version__}"


def test_unknown_command_is_one_usage_line_and_exit_2(db):
    code, _, err = cli("frobnicate")
    assert code == 2
    assert "invalid choice: 'frobnicate'" in error_line(err)


def test_missing_argument_is_exit_2(db):
    code, _, err = cli("show")
    assert code == 2
    assert "required: id" in error_line(err)


def test_unknown_job_is_exit_1_naming_the_id(db):
    code, _, err = cli("show", "nope")
    assert (code, error_line(err)) == (1, "queuectl: error: job 'nope' not found")


def test_errors_from_a_real_process_have_no_traceback(db):
    result = run("enqueue", "{not json")
    assert result.returncode == 2
    assert error_line(result.stderr).startswith("queuectl: error: the job is not valid JSON")


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------

def test_init_creates_an_owner_only_wal_database_at_the_current_schema(db):
    code, out, _ = cli("init")
    assert code == 0 and db in out
    assert os.stat(db).st_mode & 0o777 == 0o600
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == queuectl.SCHEMA_VERSION


def test_db_flag_beats_the_environment(db, tmp_path):
    other = str(tmp_path / "other.db")
    assert cli("--db", other, "enqueue", "-c", "true", "--id", "x")[0] == 0
    assert job_count(other) == 1
    assert not os.path.exists(db)


def test_a_database_of_an_older_schema_is_upgraded_in_place(db):
    with sqlite3.connect(db) as conn:  # a version-0 database: the file exists, nothing in it
        conn.execute("PRAGMA user_version = 0")
    assert cli("enqueue", "-c", "true", "--id", "x")[0] == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == queuectl.SCHEMA_VERSION


def test_claim_query_uses_the_due_index_with_and_without_queues(db):
    cli("init")
    conn = queuectl.connect(db)
    try:
        for queues in ([], ["a", "b"]):
            sql, params = queuectl.claim_sql(queues)
            plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, {"now": 0, **params}))
            assert "USING INDEX jobs_due" in plan, plan
            assert "TEMP B-TREE" not in plan, plan
    finally:
        conn.close()


def test_claim_takes_highest_priority_then_oldest_and_skips_jobs_not_yet_due(db):
    enqueue("-c", "true", "--id", "old-low")
    enqueue("-c", "true", "--id", "future-high", "--priority", "9", "--delay", "3600")
    enqueue("-c", "true", "--id", "mid-1", "--priority", "5")
    enqueue("-c", "true", "--id", "mid-2", "--priority", "5")
    conn = queuectl.connect(db)
    try:
        query = queuectl.claim_sql([])
        order = [queuectl.claim(conn, "w", query, 30)["id"] for _ in range(3)]
        assert order == ["mid-1", "mid-2", "old-low"]
        assert queuectl.claim(conn, "w", query, 30) is None
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# Enqueue
# ---------------------------------------------------------------------------

def test_enqueue_json_prints_the_id_and_stores_every_field(db):
    spec = {"id": "build-1", "command": "make", "max_retries": 5, "timeout": 2.5, "priority": 7,
            "queue": "ci", "delay": 60, "env": {"A": "1"}, "cwd": "/tmp", "depends_on": []}
    code, out, _ = cli("enqueue", json.dumps(spec))
    assert (code, out) == (0, "build-1\n")
    job = show("build-1")
    for field, value in spec.items():
        assert job[field] == value, field
    assert job["state"] == "pending" and job["attempts"] == 0
    assert job["exit_code"] is None and job["last_error"] is None


def test_enqueue_defaults_come_from_config(db):
    cli("config", "set", "max_retries", "7")
    cli("config", "set", "job_timeout", "9")
    job = show(enqueue("-c", "true")[0])
    assert (job["max_retries"], job["timeout"], job["priority"], job["queue"]) == (7, 9, 0, "default")
    assert job["env"] == {} and job["cwd"] is None and job["depends_on"] == []


def test_generated_ids_are_unique_and_sort_by_creation(db):
    ids = [enqueue("-c", "true")[0] for _ in range(20)]
    assert len(set(ids)) == 20
    assert ids == sorted(ids)
    assert all(queuectl.JOB_ID_RE.fullmatch(job_id) for job_id in ids)


def test_enqueue_command_flags_fill_the_fields(db):
    enqueue("-c", "true", "--id", "p")
    enqueue("-c", "echo hi", "--id", "x", "--max-retries", "2", "--timeout", "5", "--priority", "-3",
            "--queue", "q1", "--run-at", "2030-01-01T00:00:00Z", "--after", "p")
    job = show("x")
    assert (job["command"], job["max_retries"], job["timeout"], job["priority"], job["queue"]) == (
        "echo hi", 2, 5, -3, "q1")
    assert job["run_at"] == "2030-01-01T00:00:00.000Z"
    assert job["depends_on"] == ["p"]


def test_enqueue_file_adds_every_line_and_prints_ids_in_order(db, tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"id": "a", "command": "true"}\n\n{"id": "b", "command": "true"}\n')
    code, out, _ = cli("enqueue", "-f", path)
    assert (code, out) == (0, "a\nb\n")


def test_enqueue_file_from_stdin(db):
    code, out, _ = cli("enqueue", "-f", "-", stdin='{"id": "s", "command": "true"}\n')
    assert (code, out) == (0, "s\n")


def test_a_bad_line_rejects_the_whole_file_naming_the_line(db):
    lines = '{"id": "a", "command": "true"}\n{"id": "b", "command": "true", "priority": "high"}\n'
    code, _, err = cli("enqueue", "-f", "-", stdin=lines)
    assert code == 2
    assert error_line(err) == 'queuectl: error: line 2: priority must be a whole number, got "high"'
    assert job_count(db) == 0


def test_a_duplicate_id_rejects_the_whole_file_with_exit_1(db):
    enqueue("-c", "true", "--id", "taken")
    lines = '{"id": "new", "command": "true"}\n{"id": "taken", "command": "true"}\n'
    code, _, err = cli("enqueue", "-f", "-", stdin=lines)
    assert code == 1
    assert "line 2: job 'taken' already exists" in error_line(err)
    assert job_count(db) == 1


def test_if_absent_skips_existing_ids_and_prints_only_new_ones(db):
    enqueue("-c", "true", "--id", "taken")
    lines = '{"id": "taken", "command": "false"}\n{"id": "new", "command": "true"}\n'
    code, out, _ = cli("enqueue", "-f", "-", "--if-absent", stdin=lines)
    assert (code, out) == (0, "new\n")
    assert show("taken")["command"] == "true"
    code, out, _ = cli("enqueue", "-c", "true", "--id", "taken", "--if-absent")
    assert (code, out) == (0, "")


@pytest.mark.parametrize("spec, message", [
    ({"command": "true", "bogus": 1}, "unknown field 'bogus'"),
    ({}, "command is required"),
    ({"command": ""}, "command must be a non-empty string"),
    ({"command": "true", "max_retries": 1001}, "max_retries must be from 0 to 1000, got 1001"),
    ({"command": "true", "timeout": -1}, "timeout must be at least 0, got -1"),
    ({"command": "true", "priority": 1.5}, "priority must be a whole number, got 1.5"),
    ({"command": "true", "queue": "a b"}, 'queue must be 1-64 characters'),
    ({"command": "true", "run_at": "tomorrow"}, "run_at must be an ISO-8601 time"),
    ({"command": "true", "delay": -2}, "delay must be at least 0, got -2"),
    ({"command": "true", "delay": 1, "run_at": 0}, "give run_at or delay, not both"),
    ({"command": "true", "env": {"A": 1}}, "env A must be a string"),
    ({"command": "true", "cwd": 3}, "cwd must be a directory path, got 3"),
    ({"command": "true", "depends_on": "x"}, 'depends_on must be a list of job ids, got "x"'),
    ({"command": "true", "id": "has space"}, 'id must be 1-128 characters'),
])
def test_every_bad_field_is_exit_2_naming_the_field(db, spec, message):
    code, _, err = cli("enqueue", json.dumps(spec))
    assert code == 2
    assert message in error_line(err)
    assert job_count(db) == 0


def test_a_dependency_on_an_unknown_job_is_exit_1(db):
    code, _, err = cli("enqueue", "-c", "true", "--after", "ghost")
    assert (code, error_line(err)) == (1, "queuectl: error: depends_on: job 'ghost' not found")


def test_only_one_job_source_is_accepted(db):
    code, _, err = cli("enqueue", '{"command": "true"}', "-c", "true")
    assert code == 2 and "exactly one job source" in error_line(err)
    code, _, err = cli("enqueue", '{"command": "true"}', "--priority", "3")
    assert code == 2 and "--priority goes with -c" in error_line(err)


# ---------------------------------------------------------------------------
# Retry rules and backoff
# ---------------------------------------------------------------------------

def test_backoff_is_base_to_the_attempts_capped_at_max():
    config = {"backoff_base": 2, "backoff_max": 3600}
    assert [queuectl.backoff_s(n, config) for n in (1, 2, 3)] == [2, 4, 8]
    assert queuectl.backoff_s(5000, config) == 3600  # no overflow
    assert queuectl.backoff_s(3, {"backoff_base": 0, "backoff_max": 10}) == 0


def test_a_job_runs_at_most_max_retries_plus_one_times_then_is_dead():
    config = {"backoff_base": 2, "backoff_max": 3600}
    assert queuectl.state_after_failure(1, 2, config, 100.0) == ("failed", 102.0)
    assert queuectl.state_after_failure(2, 2, config, 100.0) == ("failed", 104.0)
    assert queuectl.state_after_failure(3, 2, config, 100.0) == ("dead", 100.0)


def test_a_failing_job_is_retried_then_dead_with_its_error(fast):
    enqueue("-c", "echo try $QUEUECTL_ATTEMPT; exit 3", "--id", "bad", "--max-retries", "2")
    burst()
    job = show("bad")
    assert (job["state"], job["attempts"], job["exit_code"]) == ("dead", 3, 3)
    assert job["last_error"] == "exit status 3"
    assert job["stdout"] == "try 3\n"


def test_a_failed_run_schedules_the_retry_after_the_backoff(db):
    cli("config", "set", "backoff_base", "30")
    cli("config", "set", "poll_interval", "0.05")
    enqueue("-c", "exit 1", "--id", "f", "--max-retries", "1")
    workers = start_workers()
    try:
        assert wait_until(lambda: show("f")["state"] == "failed")
    finally:
        os.killpg(workers.pid, signal.SIGTERM)
        workers.wait(10)
    job = show("f")
    finished = queuectl.parse_time("t", job["finished_at"])
    assert queuectl.parse_time("t", job["run_at"]) - finished == pytest.approx(30, abs=0.01)


# ---------------------------------------------------------------------------
# Workers running jobs
# ---------------------------------------------------------------------------

def test_a_job_sees_its_env_cwd_id_and_attempt(fast, tmp_path):
    spec = {"id": "envy", "command": 'echo "$GREETING $QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT $(pwd)"',
            "env": {"GREETING": "hi"}, "cwd": str(tmp_path)}
    enqueue(json.dumps(spec))
    burst()
    job = show("envy")
    assert job["state"] == "completed" and job["exit_code"] == 0
    assert job["stdout"] == f"hi envy 1 {tmp_path}\n"
    assert job["started_at"] and job["finished_at"] and job["created_at"] and job["updated_at"]


def test_stdout_and_stderr_are_kept_separately_and_logs_prints_them_raw(fast):
    enqueue("-c", "printf 'out'; printf 'err' >&2", "--id", "o")
    burst()
    assert cli("logs", "o") == (0, "out", "")
    assert cli("logs", "o", "--stderr") == (0, "err", "")


def test_only_the_last_output_limit_bytes_are_kept_and_the_cut_is_marked(fast):
    cli("config", "set", "output_limit", "10")
    enqueue("-c", "seq 1 1000", "--id", "big")
    burst()
    job = show("big")
    assert job["stdout"] == "[queuectl: 3883 earlier bytes cut]\n" + "\n998\n999\n1000\n"[-10:]
    code, out, err = cli("logs", "big")
    assert code == 0
    assert out == "\n998\n999\n1000\n"[-10:]
    assert "3883 earlier bytes cut" in err


def test_the_timeout_ends_the_whole_process_group(fast, tmp_path):
    pid_file = tmp_path / "child.pid"
    enqueue(json.dumps({"id": "slow", "command": f"sleep 30 & echo $! > {pid_file}; wait",
                        "timeout": 0.3, "max_retries": 0}))
    started = time.monotonic()
    burst()
    assert time.monotonic() - started < 10
    job = show("slow")
    assert job["state"] == "dead"
    assert job["last_error"].startswith("timed out after 0.3 s")
    child = int(pid_file.read_text())
    assert wait_until(lambda: not queuectl.pid_exists(child), timeout=5)


def test_priorities_run_highest_first_then_in_creation_order(fast, tmp_path):
    order = tmp_path / "order"
    for name, priority in (("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1)):
        enqueue("-c", f"echo {name} >> {order}", "--id", name, "--priority", priority)
    burst("--count", "1")
    assert order.read_text().split() == ["b", "d", "a", "c", "e"]


def test_a_worker_with_queues_runs_only_those(fast):
    enqueue("-c", "true", "--id", "in-a", "--queue", "a")
    enqueue("-c", "true", "--id", "in-b", "--queue", "b")
    burst("--queue", "a")
    assert show("in-a")["state"] == "completed"
    assert show("in-b")["state"] == "pending"


def test_a_scheduled_job_waits_for_its_time_and_never_blocks_due_ones(fast):
    enqueue("-c", "true", "--id", "later", "--delay", "1", "--priority", "10")
    enqueue("-c", "true", "--id", "now")
    started = time.time()
    burst()
    later, now = show("later"), show("now")
    assert later["state"] == now["state"] == "completed"
    assert queuectl.parse_time("t", later["started_at"]) >= started + 0.9
    assert now["started_at"] < later["started_at"]


def test_run_at_in_the_past_runs_at_once(fast):
    enqueue(json.dumps({"id": "past", "command": "true", "run_at": 1}))
    burst()
    assert show("past")["state"] == "completed"


def test_a_dependent_runs_only_after_its_dependency_completed(fast, tmp_path):
    order = tmp_path / "order"
    enqueue("-c", f"sleep 0.2; echo parent >> {order}", "--id", "parent")
    enqueue("-c", f"echo child >> {order}", "--id", "child", "--after", "parent", "--priority", "9")
    burst("--count", "2")
    assert order.read_text().split() == ["parent", "child"]


def test_dependents_are_canceled_all_the_way_down_when_a_dependency_dies(fast):
    enqueue("-c", "exit 1", "--id", "root", "--max-retries", "0")
    enqueue("-c", "true", "--id", "mid", "--after", "root")
    enqueue("-c", "true", "--id", "leaf", "--after", "mid")
    burst()
    assert show("root")["state"] == "dead"
    for job_id in ("mid", "leaf"):
        job = show(job_id)
        assert job["state"] == "canceled"
        assert "dependency" in job["last_error"]


def test_a_job_depending_on_a_dead_job_is_canceled_at_enqueue(fast):
    enqueue("-c", "exit 1", "--id", "root", "--max-retries", "0")
    burst()
    enqueue("-c", "true", "--id", "late", "--after", "root")
    assert show("late")["state"] == "canceled"
    assert show("late")["last_error"] == "canceled: dependency 'root' is dead"


def test_a_command_that_cannot_start_is_a_failed_attempt(fast, tmp_path):
    enqueue(json.dumps({"id": "nowhere", "command": "true", "cwd": str(tmp_path / "missing"),
                        "max_retries": 0}))
    burst()
    job = show("nowhere")
    assert (job["state"], job["attempts"], job["exit_code"]) == ("dead", 1, None)
    assert job["last_error"] == f"cannot start: cwd '{tmp_path / 'missing'}' is not a directory"


# ---------------------------------------------------------------------------
# Reading: status, list, show
# ---------------------------------------------------------------------------

def test_status_counts_every_state_with_zeros(db):
    enqueue("-c", "true")
    doc = status()
    assert doc["jobs"] == {"pending": 1, "processing": 0, "completed": 0, "failed": 0, "dead": 0,
                           "canceled": 0}
    assert doc["workers"] == []
    assert isinstance(doc["oldest_runnable_age_s"], (int, float))


def test_status_has_no_oldest_age_when_nothing_is_due(db):
    enqueue("-c", "true", "--delay", "600")
    assert status()["oldest_runnable_age_s"] is None
    code, out, _ = cli("status")
    assert code == 0 and "pending     1" in out


def test_list_is_newest_first_and_filters_by_state_queue_and_limit(db):
    for name, queue in (("a", "x"), ("b", "y"), ("c", "x")):
        enqueue("-c", "true", "--id", name, "--queue", queue)
    cli("cancel", "b")

    def ids(*argv):
        code, out, err = cli("list", "--json", *argv)
        assert code == 0, err
        return [job["id"] for job in json.loads(out)]

    assert ids() == ["c", "b", "a"]
    assert ids("--state", "pending") == ["c", "a"]
    assert ids("--state", "canceled,completed") == ["b"]
    assert ids("--queue", "x") == ["c", "a"]
    assert ids("--limit", "1") == ["c"]
    code, _, err = cli("list", "--state", "done")
    assert code == 2 and "unknown state 'done'" in error_line(err)


def test_show_json_has_every_field_of_the_contract(db):
    enqueue("-c", "true", "--id", "x")
    expected = {"id", "command", "max_retries", "timeout", "priority", "queue", "run_at", "delay", "env",
                "cwd", "depends_on", "state", "attempts", "exit_code", "last_error", "stdout", "stderr",
                "created_at", "updated_at", "started_at", "finished_at"}
    job = show("x")
    assert expected <= set(job)
    assert job["created_at"].endswith("Z") and len(job["created_at"]) == 24


def test_human_output_of_list_and_show_is_readable(db):
    enqueue("-c", "echo hello", "--id", "x")
    code, out, _ = cli("list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["ID", "STATE", "ATTEMPTS"]
    code, out, _ = cli("show", "x")
    assert code == 0 and "command:      echo hello" in out


# ---------------------------------------------------------------------------
# Cancel, retry, the dead letter queue, purge
# ---------------------------------------------------------------------------

def test_cancel_a_pending_job_and_refuse_an_ended_one(db):
    enqueue("-c", "true", "--id", "x")
    assert cli("cancel", "x") == (0, "canceled x\n", "")
    assert show("x")["state"] == "canceled"
    code, _, err = cli("cancel", "x")
    assert code == 1
    assert error_line(err) == ("queuectl: error: job 'x' is canceled; only pending, failed or processing "
                               "jobs can be canceled")


def test_cancel_is_all_or_nothing(db):
    enqueue("-c", "true", "--id", "x")
    code, _, err = cli("cancel", "x", "ghost")
    assert code == 1 and "job 'ghost' not found" in err
    assert show("x")["state"] == "pending"


def test_retry_puts_dead_and_canceled_jobs_back_with_attempts_zero(fast):
    enqueue("-c", "exit 1", "--id", "d", "--max-retries", "0")
    enqueue("-c", "true", "--id", "c")
    cli("cancel", "c")
    burst()
    assert show("d")["state"] == "dead"
    assert cli("retry", "d", "c")[0] == 0
    for job_id in ("d", "c"):
        job = show(job_id)
        assert (job["state"], job["attempts"]) == ("pending", 0)
    code, _, err = cli("retry", "d")
    assert code == 1 and "only dead or canceled jobs can be retried" in error_line(err)


def test_retrying_a_dependent_needs_its_dependency_retried_first(fast):
    enqueue("-c", "exit 1", "--id", "root", "--max-retries", "0")
    enqueue("-c", "true", "--id", "child", "--after", "root")
    burst()
    code, _, err = cli("retry", "child")
    assert code == 1 and "retry 'root' first" in error_line(err)
    assert cli("retry", "root")[0] == 0
    assert cli("retry", "child")[0] == 0
    assert show("child")["state"] == "pending"


def test_dlq_lists_retries_and_purges_dead_jobs(fast):
    for name in ("d1", "d2"):
        enqueue("-c", "exit 1", "--id", name, "--max-retries", "0")
    enqueue("-c", "true", "--id", "ok")
    burst()
    code, out, _ = cli("dlq", "list", "--json")
    assert code == 0 and [job["id"] for job in json.loads(out)] == ["d2", "d1"]
    assert cli("dlq", "retry", "d1") == (0, "retried d1\n", "")
    code, _, err = cli("dlq", "retry", "ok")
    assert code == 1 and "not in the dead letter queue" in error_line(err)
    burst()
    assert cli("dlq", "retry", "--all") == (0, "retried d1\nretried d2\nretried 2 job(s)\n", "")
    burst()
    assert cli("dlq", "purge") == (0, "purged 2 dead job(s)\n", "")
    assert cli("dlq", "list", "--json")[1].strip() == "[]"
    assert show("ok")["state"] == "completed"


def test_purge_deletes_only_end_states_older_than_asked(fast):
    enqueue("-c", "true", "--id", "done")
    burst()
    enqueue("-c", "true", "--id", "waiting")
    assert cli("purge", "--older-than", "1h") == (0, "purged 0 job(s)\n", "")
    assert cli("purge", "--older-than", "0s") == (0, "purged 1 job(s)\n", "")
    assert show("waiting")["state"] == "pending"
    code, _, err = cli("purge", "--state", "pending")
    assert code == 2 and "only jobs in end states" in error_line(err)
    code, _, err = cli("purge", "--older-than", "soon")
    assert code == 2 and "duration must look like 90s" in error_line(err)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800),
                                           ("30", 30)])
def test_durations_read_as_seconds(text, seconds):
    assert queuectl.parse_duration(text) == seconds


# ---------------------------------------------------------------------------
# wait
# ---------------------------------------------------------------------------

def test_wait_exits_0_when_all_completed(fast):
    enqueue("-c", "true", "--id", "a")
    burst()
    assert cli("wait", "a") == (0, "a completed\n", "")


def test_wait_exits_1_when_a_job_ended_otherwise(fast):
    enqueue("-c", "exit 1", "--id", "bad", "--max-retries", "0")
    burst()
    code, out, err = cli("wait", "bad")
    assert (code, out) == (1, "bad dead\n")
    assert error_line(err) == "queuectl: error: not every job completed: bad is dead"


def test_wait_exits_124_on_timeout(db):
    enqueue("-c", "true", "--id", "never")
    started = time.monotonic()
    code, _, err = cli("wait", "never", "--timeout", "0.2")
    assert code == 124
    assert "timed out after 0.2 s" in error_line(err)
    assert time.monotonic() - started < 2


def test_wait_blocks_until_a_worker_finishes_the_job(fast):
    enqueue("-c", "sleep 0.3", "--id", "j")
    workers = start_workers()
    try:
        result = run("wait", "j", "--timeout", "20")
        assert (result.returncode, result.stdout) == (0, "j completed\n")
    finally:
        os.killpg(workers.pid, signal.SIGTERM)
        workers.wait(10)


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

def test_config_list_shows_every_key_with_defaults(db):
    code, out, _ = cli("config", "list", "--json")
    assert code == 0
    assert json.loads(out) == {"max_retries": 3, "backoff_base": 2, "backoff_max": 3600, "job_timeout": 3600,
                               "lease_timeout": 30, "poll_interval": 0.5, "output_limit": 65536}


def test_config_set_then_get(db):
    assert cli("config", "set", "backoff_base", "1.5") == (0, "backoff_base = 1.5\n", "")
    assert cli("config", "get", "backoff_base") == (0, "1.5\n", "")
    assert json.loads(cli("config", "get", "backoff_base", "--json")[1]) == {"backoff_base": 1.5}


@pytest.mark.parametrize("key, value, message", [
    ("max_retries", "1.5", "config max_retries must be a whole number, got '1.5'"),
    ("max_retries", "1001", "config max_retries must be from 0 to 1000, got 1001"),
    ("lease_timeout", "0.5", "config lease_timeout must be at least 1, got 0.5"),
    ("poll_interval", "0", "config poll_interval must be greater than 0, got 0"),
    ("backoff_base", "nan", "config backoff_base must be a number"),
    ("output_limit", "-1", "config output_limit must be at least 0, got -1"),
])
def test_bad_config_values_are_exit_2_and_change_nothing(db, key, value, message):
    code, _, err = cli("config", "set", key, value)
    assert code == 2
    assert message in error_line(err)
    assert json.loads(cli("config", "list", "--json")[1])[key] == queuectl.CONFIG_RULES[key][0]


def test_an_unknown_config_key_lists_the_known_ones(db):
    code, _, err = cli("config", "get", "colour")
    assert code == 2
    assert error_line(err) == ("queuectl: error: unknown config key 'colour' (known: max_retries, backoff_base, "
                               "backoff_max, job_timeout, lease_timeout, poll_interval, output_limit)")


# ---------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------

def test_the_demo_runs_the_whole_story_in_under_20_seconds(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "demo"], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for event in ("completed in", "timed out after 1 s", "dead after 3 attempt(s)", "retried flaky"):
        assert event in result.stdout
    assert "completed   6" in result.stdout and "dead        1" in result.stdout
    assert not list(tmp_path.iterdir())  # it left nothing behind
