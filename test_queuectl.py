"""Tests for queuectl.py, driven through its command line as a user would.

`cli(...)` calls queuectl.main() in this process (fast, for the commands that
only touch the database); `run(...)` and `start_workers(...)` run real
processes for the pool, signals, exit statuses and the demo. Time is driven
with millisecond backoffs and short poll intervals, and every wait polls to a
deadline instead of sleeping blindly.
"""

import calendar
import collections
import contextlib
import http.client
import itertools
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

import pytest

import queuectl

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "queuectl.py")

# The backend under test. Unset: SQLite files. A PostgreSQL URL (`make test`
# passes QUEUECTL_TEST_PG through): the same tests on that server, each in a
# schema of its own; the tests about the SQLite file itself are skipped there.
PG_URL = os.environ.get("QUEUECTL_TEST_PG") or None
sqlite_only = pytest.mark.skipif(PG_URL is not None, reason="about the SQLite file itself")


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------

@pytest.fixture
def db(tmp_path, monkeypatch):
    """A fresh database, made the default for every cli() and run() call: a path, or PG_URL.

    On SQLite it checks afterwards that status's kept counts equal a real
    count, so every test also tests the job_counts triggers. On PostgreSQL
    the test's schema is dropped afterwards.
    """
    monkeypatch.chdir(tmp_path)
    if PG_URL:
        schema = f"test_{os.getpid()}_{time.monotonic_ns()}"
        monkeypatch.setenv("QUEUECTL_PG_SCHEMA", schema)
        monkeypatch.setenv("QUEUECTL_DB", PG_URL)
        yield PG_URL
        disagreeing, kept, counted = pg_checks_then_drop(schema)
        assert disagreeing == []
        assert kept == counted
        return
    path = str(tmp_path / "q.db")
    monkeypatch.setenv("QUEUECTL_DB", path)
    yield path
    kept, counted = counts_kept_and_counted(path)
    assert kept == counted
    assert jobs_whose_runs_disagree(path) == []


# A job and its runs never disagree. A job that holds no lease token numbers
# its latest run row and has none running. One that holds a token
# (processing, or canceled and being stopped) has a run going: its row is
# the latest and the only one running, or it has no row yet (it gets one
# when it ends or first flushes its output) and the job numbers it next.
RUNNING = "sum(CASE WHEN runs.outcome = 'running' THEN 1 ELSE 0 END)"
DISAGREEING_RUNS_SQL = f"""
SELECT jobs.id, jobs.state, jobs.last_run, max(runs.run), {RUNNING}
FROM jobs LEFT JOIN runs ON runs.job_seq = jobs.seq
GROUP BY jobs.seq
HAVING NOT (
       (jobs.lease_token IS NULL AND jobs.last_run = coalesce(max(runs.run), 0) AND {RUNNING} = 0)
    OR (jobs.lease_token IS NOT NULL AND jobs.last_run = max(runs.run) AND {RUNNING} = 1
        AND max(CASE WHEN runs.outcome = 'running' THEN runs.run END) = jobs.last_run)
    OR (jobs.lease_token IS NOT NULL AND jobs.last_run = coalesce(max(runs.run), 0) + 1 AND {RUNNING} = 0))
"""


def jobs_whose_runs_disagree(path):
    """The jobs whose runs say otherwise than the job (see DISAGREEING_RUNS_SQL); [] without a sound database."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            return conn.execute(DISAGREEING_RUNS_SQL).fetchall()
    except sqlite3.Error:  # no file, a broken one on purpose, or an older schema
        return []


def pg_checks_then_drop(schema):
    """(DISAGREEING_RUNS_SQL's rows, counts kept, counts counted) of a test's schema, read in one snapshot,
    then the schema dropped: one connection (a login costs CPU on both sides, and every test makes one)."""
    import psycopg
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        try:
            def has(table):
                return conn.execute("SELECT to_regclass(%s)", (f'"{schema}".{table}',)).fetchone()[0] is not None

            has_runs, has_counts = has("runs"), has("job_count_changes")  # none before its version
            conn.execute(f'SET search_path TO "{schema}"')
            disagreeing, kept, counted = [], {}, {}
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                if has_runs:
                    disagreeing = conn.execute(DISAGREEING_RUNS_SQL).fetchall()
                if has_counts:
                    kept = {(queue, state): n for queue, state, n in conn.execute(
                        "SELECT queue, state, sum(n) FROM (SELECT * FROM job_counts UNION ALL "
                        "SELECT * FROM job_count_changes) c GROUP BY queue, state") if n}
                    counted = {(queue, state): n for queue, state, n in conn.execute(
                        "SELECT queue, state, count(*) FROM jobs GROUP BY queue, state")}
            return disagreeing, kept, counted
        finally:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def drop_pg_schema(schema):
    """Drop a test's PostgreSQL schema and everything in it."""
    import psycopg
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def counts_kept_and_counted(path):
    """(job_counts, a GROUP BY count) read in one snapshot; ({}, {}) if there is no sound database."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            conn.execute("BEGIN")
            kept = {state: n for state, n in conn.execute("SELECT state, sum(n) FROM job_counts GROUP BY state") if n}
            counted = dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
            return kept, counted
    except sqlite3.Error:  # no file, a broken one on purpose, or another schema
        return {}, {}


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
    if PG_URL and db_path == PG_URL:
        return sum(sql_rows("SELECT count(*) FROM jobs")[0])
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]


def sql_rows(sql, params=()):
    """Rows of one statement on the test's database, through queuectl's own engine."""
    with contextlib.closing(queuectl.connect(os.environ["QUEUECTL_DB"])) as conn:
        return [tuple(row) for row in conn.execute(sql, params)]


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

@sqlite_only
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


@sqlite_only
def test_a_database_of_an_older_schema_is_upgraded_in_place(db):
    with sqlite3.connect(db) as conn:  # a version-0 database: the file exists, nothing in it
        conn.execute("PRAGMA user_version = 0")
    assert cli("enqueue", "-c", "true", "--id", "x")[0] == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == queuectl.SCHEMA_VERSION


@sqlite_only
def test_a_version_1_database_is_upgraded_with_its_counts(db):
    with contextlib.closing(sqlite3.connect(db)) as conn:  # what queuectl 1.0 wrote
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in queuectl.SCHEMA_V1:
            conn.execute(statement)
        for seq, state in enumerate(("pending", "completed", "completed", "dead"), 1):
            conn.execute("INSERT INTO jobs (id, command, queue, priority, max_retries, timeout_s, delay_s, env, "
                         "depends_on, deps_left, state, run_at, created_at, updated_at) "
                         "VALUES (?, 'true', 'default', 0, 3, 0, 0, '{}', '[]', 0, ?, 0, 0, 0)", (f"j{seq}", state))
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    assert status()["jobs"] == {"pending": 1, "processing": 0, "completed": 2, "failed": 0, "dead": 1,
                                "canceled": 0}
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == queuectl.SCHEMA_VERSION == 9
    assert cli("purge", "--state", "completed,dead") == (0, "purged 3 job(s)\n", "")
    assert status()["jobs"]["completed"] == 0


@sqlite_only
def test_claim_query_uses_the_ready_index_with_and_without_queues(db):
    cli("init")
    conn = queuectl.connect(db)
    try:
        for queues in ([], ["a", "b"]):
            query = conn.claim_query(queues)
            plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + query.sql,
                                                           {**query.params, "now": 0}))
            assert "USING INDEX jobs_ready" in plan, plan
            assert "TEMP B-TREE" not in plan, plan
        plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + conn.BECOME_DUE_SQL,
                                                       {"now": 0, "batch": 1}))
        assert plan == "SEARCH jobs USING INDEX jobs_by_run_at (is_due=? AND run_at<?)", plan
        plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + conn.PROMOTE_DUE_SQL,
                                                       {"now": 0, "batch": 1}))
        assert "SEARCH jobs USING INDEX jobs_by_run_at (is_due=? AND run_at<?)" in plan, plan
        assert "SCAN" not in plan, plan
    finally:
        conn.close()


@sqlite_only
def test_finishing_a_job_finds_its_dependents_by_id_never_by_scanning_waiting_jobs(db):
    cli("init")
    conn = queuectl.connect(db)
    try:
        for sql in (queuectl.RELEASE_DEPENDENTS_SQL, queuectl.CANCEL_DEPENDENTS_SQL):
            plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, {"id": "x", "now": 0, "reason": ""})]
            assert plan[0].startswith("SEARCH jobs USING INDEX sqlite_autoindex_jobs_1 (id=?)"), plan
    finally:
        conn.close()


def test_claim_takes_highest_priority_then_oldest_and_skips_jobs_not_yet_due(db):
    enqueue("-c", "true", "--id", "old-low")
    enqueue("-c", "true", "--id", "future-high", "--priority", "9", "--delay", "3600")
    enqueue("-c", "true", "--id", "mid-1", "--priority", "5")
    enqueue("-c", "true", "--id", "mid-2", "--priority", "5")
    conn = queuectl.connect(db)
    try:
        query = conn.claim_query([])
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
    assert queuectl.state_after_failure(3, 2, config, 100.0) == ("dead", None)


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
    enqueue("-c", "true", "--id", "later", "--delay", "3", "--priority", "10")  # 3 s: room for a slow start
    enqueue("-c", "true", "--id", "now")
    started = time.time()
    burst()
    later, now = show("later"), show("now")
    assert later["state"] == now["state"] == "completed"
    assert queuectl.parse_time("t", later["started_at"]) >= queuectl.parse_time("t", later["run_at"]) >= started
    assert now["started_at"] < later["run_at"]  # the due job never waited for the one not yet due


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
    assert code == 1 and "job 'ok' is completed; only dead jobs can be retried" in error_line(err)
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
                               "lease_timeout": 30, "poll_interval": 0.5, "output_limit": 65536,
                               "keep_completed": "7d", "keep_dead": "30d", "on_failure": "", "on_dead": "",
                               "hook_timeout": 30}


def test_config_set_then_get(db):
    assert cli("config", "set", "backoff_base", "1.5") == (0, "backoff_base = 1.5\n", "")
    assert cli("config", "get", "backoff_base") == (0, "1.5\n", "")
    assert json.loads(cli("config", "get", "backoff_base", "--json")[1]) == {"backoff_base": 1.5}


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


# ---------------------------------------------------------------------------
# Workers: helpers for real supervisors, their processes and their jobs
# ---------------------------------------------------------------------------

@pytest.fixture
def pool(tmp_path):
    """start(*argv): `worker start ARGV` in a process group of its own, logging to a file.

    The log goes to a file, not a pipe, so a busy pool never blocks on a full
    pipe. At teardown every group started is killed, then every job still
    running in tmp_path (jobs run in the worker's directory, each in a session
    of its own, so they outlive a killed pool): nothing leaks, even when a
    test fails half-way.
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
    for pid in processes_in(tmp_path):
        with contextlib.suppress(ProcessLookupError):  # it may end between the listing and this
            kill_group(os.getpgid(pid))


def processes_in(directory):
    """Pids of other processes whose working directory is directory (Linux /proc), groups apart from ours."""
    directory, own_group = os.path.realpath(directory), os.getpgid(0)
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            if entry.isdigit() and os.readlink(f"/proc/{entry}/cwd") == directory \
                    and os.getpgid(int(entry)) != own_group:
                pids.append(int(entry))
        except OSError:
            pass  # gone meanwhile, or not ours to look at
    return pids


def kill_group(pgid, signum=signal.SIGKILL):
    """Signal a process group that may already be gone."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def log_text(proc):
    """What a pool() supervisor and its workers logged so far."""
    return proc.log_path.read_text(errors="replace")


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
    return process_state(pid) not in (None, "Z", "X")


def read_pid(path):
    """The pid a job wrote to path, or None while the file is missing or not yet written."""
    try:
        with open(path) as f:
            text = f.read().strip()
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


def process_state(pid):
    """A process's state letter from /proc (R, S, T, Z...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between open and read
        return None


def pause_group(pgid, pids, db_path):
    """SIGSTOP a process group at a moment none of it holds the database's write lock.

    A process paused inside a write transaction would block every other
    writer (SQLite's nature, not a queuectl bug); such a pause is undone and
    tried again, so the tests that pause a pool never depend on that luck.
    """
    for _ in range(50):
        os.killpg(pgid, signal.SIGSTOP)
        assert wait_until(lambda: all(process_state(pid) == "T" for pid in pids), timeout=5)
        if holds_no_lock(db_path):
            return
        os.killpg(pgid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the paused group always held the database's write lock")


def holds_no_lock(db_path):
    """Whether nobody holds SQLite's write lock, or (PostgreSQL) a lock on any row of ours."""
    if PG_URL and db_path == PG_URL:
        try:
            with contextlib.closing(queuectl.connect(db_path)) as conn, conn.waiting_at_most(0.05), \
                    conn.transaction():
                conn.execute("SELECT 1 FROM jobs FOR UPDATE NOWAIT")
                conn.execute("SELECT 1 FROM workers FOR UPDATE NOWAIT")
            return True
        except queuectl.StorageError:
            return False
    conn = sqlite3.connect(db_path, timeout=0.05, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


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


def test_a_worker_paused_past_its_lease_never_records_over_the_run_that_replaced_it(fast, pool, tmp_path):
    config_set("lease_timeout", "1")
    # Run 1 ends (exit 0) while its worker is paused; run 2 waits for the test's go.
    command = ('echo "attempt $QUEUECTL_ATTEMPT"; if [ "$QUEUECTL_ATTEMPT" = 1 ]; then touch first; sleep 1; '
               'else touch second; while [ ! -e release ]; do sleep 0.02; done; fi')
    (job_id,) = enqueue("-c", command)
    paused = pool("--count", "1")
    assert wait_until(lambda: (tmp_path / "first").exists()), log_text(paused)
    pids = [p["pid"] for p in worker_list()]

    pause_group(paused.pid, pids, fast)  # supervisor and worker freeze; their lease runs out
    try:
        assert wait_until(lambda: show(job_id)["state"] == "failed", timeout=5)
        replacing = pool("--count", "1", "--burst")
        assert wait_until(lambda: (tmp_path / "second").exists()), log_text(replacing)
    finally:
        os.killpg(paused.pid, signal.SIGCONT)
    # The paused worker wakes up with run 1 finished, tries to record it and logs how that went.
    assert wait_until(lambda: log_text(paused).count(f"job {job_id} ") == 2, timeout=5), log_text(paused)
    job = show(job_id)
    assert (job["state"], job["attempts"]) == ("processing", 2), job
    assert "attempt 1" not in job["stdout"], job
    (tmp_path / "release").touch()

    assert replacing.wait(timeout=15) == 0, log_text(replacing)
    job = show(job_id)
    assert (job["state"], job["attempts"], job["stdout"]) == ("completed", 2, "attempt 2\n"), job
    os.kill(paused.pid, signal.SIGTERM)
    assert paused.wait(timeout=15) == 0, log_text(paused)


def test_a_supervisor_paused_past_lease_timeout_is_listed_and_stoppable_again_once_it_resumes(fast, pool):
    config_set("lease_timeout", "1")
    proc = pool("--count", "1")
    assert wait_until(lambda: len(worker_list()) == 2), log_text(proc)
    pids = [p["pid"] for p in worker_list()]

    pause_group(proc.pid, pids, fast)  # e.g. a suspended laptop, a paused VM, `kill -STOP`
    try:
        assert wait_until(lambda: worker_list() == [], timeout=5)  # silent too long: shown as gone
    finally:
        os.killpg(proc.pid, signal.SIGCONT)

    assert wait_until(lambda: len(worker_list()) == 2, timeout=3), "alive again, but not listed"
    stopped = run("worker", "stop", "--timeout", "10")
    assert (stopped.returncode, stopped.stdout) == (0, "stopped 1 supervisor(s)\n"), stopped.stderr
    assert proc.wait(timeout=5) == 0


def test_an_idle_worker_stays_listed_when_poll_interval_exceeds_lease_timeout(fast, pool):
    config_set("lease_timeout", "1")
    config_set("poll_interval", "3")
    proc = pool("--count", "1")
    assert wait_until(lambda: len(pids_of("worker")) == 1), log_text(proc)

    vanished = wait_until(lambda: not pids_of("worker"), timeout=2.5)

    assert not vanished, "a live idle worker dropped out of `worker list`"
    assert proc.poll() is None


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

def test_detach_prints_the_pid_logs_to_db_log_and_worker_stop_stops_it(fast):
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

        log_path = queuectl.log_path_for(fast)
        assert os.stat(log_path).st_mode & 0o777 == 0o600
        with open(log_path) as f:
            log = f.read()
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

# ---------------------------------------------------------------------------
# Bad input and bad days (every row of the README's failure table)
# ---------------------------------------------------------------------------
#
# Each refusal is checked three ways: the exit code, the whole error line (it
# names the problem and the value), and a snapshot of every table before and
# after. The environment tests break the database file on purpose (truncated,
# overwritten, read-only, locked, full, from the future); the permission tests
# run the CLI as user nobody, since root ignores file modes.

KNOWN_FIELDS = "id, command, max_retries, timeout, priority, queue, run_at, delay, env, cwd, depends_on"
KNOWN_KEYS = ("max_retries, backoff_base, backoff_max, job_timeout, lease_timeout, poll_interval, output_limit, "
              "keep_completed, keep_dead, on_failure, on_dead, hook_timeout")
INJECTION = "x'); DROP TABLE jobs;--"


# ---------------------------------------------------------------------------
# Helpers: snapshots, refusals, foreign users
# ---------------------------------------------------------------------------

def snapshot(db_path):
    """Every row of every table, read directly: what "nothing changed" compares."""
    if PG_URL and db_path == PG_URL:
        tables = [r[0] for r in sql_rows("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                                         "ORDER BY tablename")]
        return {table: sorted(sql_rows(f"SELECT * FROM {table}"), key=repr) for table in tables}
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall() for table in tables}


def integrity(db_path):
    """PRAGMA integrity_check's first line ('ok' when the file is sound); on PostgreSQL,
    'ok' when every row of every table reads back (the server guards its own pages)."""
    if PG_URL and db_path == PG_URL:
        snapshot(db_path)
        return "ok"
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


@pytest.fixture
def seeded(db):
    """A database holding one pending job 'seed' and a changed config value."""
    assert cli("enqueue", "-c", "echo seed", "--id", "seed")[0] == 0
    assert cli("config", "set", "max_retries", "2")[0] == 0
    return db


def refused(*argv, code, stdin=None):
    """Run a command that must fail: check exit code, one error line, nothing printed,
    and every table unchanged. Return the error line."""
    db_path = os.environ["QUEUECTL_DB"]
    before = snapshot(db_path)
    got, out, err = cli(*argv, stdin=stdin)
    line = error_line(err)
    assert (got, out) == (code, ""), err
    assert "internal error" not in line
    assert snapshot(db_path) == before
    return line


def burst_show(job_id, *argv):
    """Drain the queue with real workers; return the job as `show --json` has it, and the log."""
    result = burst(*argv)
    return show(job_id), result.stderr


def _can_run_as_nobody(python):
    try:
        return subprocess.run([python, "-c", "import sqlite3"], user=65534, group=65534, extra_groups=[],
                              capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture
def nobody_dir():
    """A directory user nobody can enter, with a copy of queuectl.py nobody can read.

    Yields (directory, python): a Python interpreter nobody may run (root's pyenv
    under /root is closed to it, /usr/bin/python3 usually is not).
    """
    if os.geteuid() != 0:
        pytest.skip("the permission tests switch to user nobody, which needs root")
    python = next((p for p in (sys.executable, "/usr/bin/python3", shutil.which("python3") or "")
                   if p and _can_run_as_nobody(p)), None)
    if python is None:
        pytest.skip("no Python interpreter that user nobody may run")
    path = tempfile.mkdtemp(prefix="queuectl-nobody-")
    os.chmod(path, 0o755)
    shutil.copy(SCRIPT, os.path.join(path, "queuectl.py"))
    os.chmod(os.path.join(path, "queuectl.py"), 0o644)
    try:
        yield path, python
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(where, *argv):
    """Run queuectl.py in `where` as user nobody; return the CompletedProcess."""
    path, python = where
    env = {"PATH": "/usr/bin:/bin", "HOME": path, "LANG": "C.UTF-8"}
    return subprocess.run([python, "queuectl.py", *argv], cwd=path, user=65534, group=65534, extra_groups=[],
                          env=env, capture_output=True, text=True, timeout=60, check=False)


def dir_listing(path):
    """{name: (mode, owner uid, size)} for every file in a directory."""
    return {name: (stat.S_IMODE(st.st_mode), st.st_uid, st.st_size)
            for name in os.listdir(path) for st in [os.stat(os.path.join(path, name))]}


# ---------------------------------------------------------------------------
# Input: JSON that is not a job
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("{not json", "the job is not valid JSON: Expecting property name enclosed in double quotes at column 2"),
    ("{'command': 'true'}", "the job is not valid JSON: Expecting property name enclosed in double quotes"),
    ('{"command": "true",}', "the job is not valid JSON"),
    ('{"command": "true"} {"command": "x"}', "the job is not valid JSON: Extra data at column 21"),
    ("", "the job is not valid JSON: Expecting value at column 1"),
    ("[" * 100_000, "the job is nested too deeply"),
])
def test_malformed_json_is_exit_2_and_says_where(seeded, text, message):
    line = refused("enqueue", text, code=2)
    assert line.startswith("queuectl: error: " + message)


@pytest.mark.parametrize("text, kind", [
    ("[]", "list []"), ('["true"]', 'list ["true"]'), ('"echo hi"', 'str "echo hi"'), ("5", "int 5"),
    ("null", "NoneType null"), ("true", "bool true"),
])
def test_json_that_is_not_an_object_is_exit_2_naming_what_it_is(seeded, text, kind):
    line = refused("enqueue", text, code=2)
    assert line == f"queuectl: error: a job must be a JSON object, got {kind}"


def test_a_huge_integer_literal_is_exit_2_not_an_internal_error(seeded):
    # Python 3.11 refuses to parse int literals of more than 4300 digits with a
    # ValueError that is not a JSONDecodeError.
    huge = "9" * 5000
    line = refused("enqueue", '{"command": "true", "priority": ' + huge + "}", code=2)
    assert "priority" in line or "number" in line
    line = refused("enqueue", "-f", "-", stdin='{"command": "true"}\n{"command": "true", "timeout": ' + huge + "}\n",
                   code=2)
    assert "line 2" in line


# ---------------------------------------------------------------------------
# Input: every field, wrong type and out of range
# ---------------------------------------------------------------------------

ID_RULE = "id must be 1-128 characters of A-Z a-z 0-9 . _ : @ - starting with a letter or digit, got "
QUEUE_RULE = "queue must be 1-64 characters of A-Z a-z 0-9 . _ -, got "
RUN_AT_RULE = "run_at must be an ISO-8601 time like 2026-11-22T09:30:00Z or epoch seconds, got "

BAD_FIELDS = [
    # id: type, empty, spaces, slashes, non-ASCII, first char, length, boolean
    ("id", 5, ID_RULE + "5"),
    ("id", None, ID_RULE + "null"),
    ("id", True, ID_RULE + "true"),
    ("id", "", ID_RULE + '""'),
    ("id", "has space", ID_RULE + '"has space"'),
    ("id", "a/b", ID_RULE + '"a/b"'),
    ("id", "../etc", ID_RULE + '"../etc"'),
    ("id", "caf\u00e9", ID_RULE + '"caf\\u00e9"'),
    ("id", "\u0662\u0663", ID_RULE + '"\\u0662\\u0663"'),  # Arabic-Indic digits are not 0-9
    ("id", "job\n", ID_RULE + '"job\\n"'),
    ("id", "-leading-dash", ID_RULE + '"-leading-dash"'),
    ("id", "x" * 129, ID_RULE + '"' + "x" * 129 + '"'),
    # command
    ("command", 5, "command must be a non-empty string, got 5"),
    ("command", None, "command must be a non-empty string, got null"),
    ("command", True, "command must be a non-empty string, got true"),
    ("command", ["ls", "-l"], 'command must be a non-empty string, got ["ls", "-l"]'),
    ("command", "", 'command must be a non-empty string, got ""'),
    ("command", " \t\n", 'command must be a non-empty string, got " \\t\\n"'),
    # max_retries: int 0-1000
    ("max_retries", "3", 'max_retries must be a whole number, got "3"'),
    ("max_retries", 1.5, "max_retries must be a whole number, got 1.5"),
    ("max_retries", True, "max_retries must be a whole number, got true"),
    ("max_retries", None, "max_retries must be a whole number, got null"),
    ("max_retries", -1, "max_retries must be from 0 to 1000, got -1"),
    ("max_retries", 1001, "max_retries must be from 0 to 1000, got 1001"),
    ("max_retries", 10 ** 30, f"max_retries must be from 0 to 1000, got {10 ** 30}"),
    # timeout: number >= 0
    ("timeout", "10", 'timeout must be a number, got "10"'),
    ("timeout", True, "timeout must be a number, got true"),
    ("timeout", False, "timeout must be a number, got false"),
    ("timeout", None, "timeout must be a number, got null"),
    ("timeout", -0.5, "timeout must be at least 0, got -0.5"),
    ("timeout", float("nan"), "timeout must be a number, got NaN"),
    ("timeout", float("inf"), "timeout must be a number, got Infinity"),
    # priority: int -1000..1000
    ("priority", "1", 'priority must be a whole number, got "1"'),
    ("priority", 0.5, "priority must be a whole number, got 0.5"),
    ("priority", False, "priority must be a whole number, got false"),
    ("priority", 1001, "priority must be from -1000 to 1000, got 1001"),
    ("priority", -1001, "priority must be from -1000 to 1000, got -1001"),
    # queue
    ("queue", "", QUEUE_RULE + '""'),
    ("queue", "a b", QUEUE_RULE + '"a b"'),
    ("queue", "a/b", QUEUE_RULE + '"a/b"'),
    ("queue", "q" * 65, QUEUE_RULE + '"' + "q" * 65 + '"'),
    ("queue", 7, QUEUE_RULE + "7"),
    ("queue", None, QUEUE_RULE + "null"),
    ("queue", True, QUEUE_RULE + "true"),
    # run_at: ISO-8601 or epoch >= 0
    ("run_at", "tomorrow", RUN_AT_RULE + '"tomorrow"'),
    ("run_at", "", RUN_AT_RULE + '""'),
    ("run_at", "2026-13-01T00:00:00", RUN_AT_RULE + '"2026-13-01T00:00:00"'),
    ("run_at", True, "run_at must be an ISO-8601 time or epoch seconds, got true"),
    ("run_at", None, "run_at must be an ISO-8601 time or epoch seconds, got null"),
    ("run_at", [2026, 11, 22], "run_at must be an ISO-8601 time or epoch seconds, got [2026, 11, 22]"),
    ("run_at", -1, "run_at must be a time from 1970-01-01 to 9999-12-31, got -1"),
    ("run_at", float("nan"), "run_at must be a time from 1970-01-01 to 9999-12-31, got NaN"),
    # delay: number >= 0
    ("delay", "5", 'delay must be a number, got "5"'),
    ("delay", True, "delay must be a number, got true"),
    ("delay", None, "delay must be a number, got null"),
    ("delay", -1, "delay must be at least 0, got -1"),
    ("delay", float("-inf"), "delay must be a number, got -Infinity"),
    # env: object string -> string
    ("env", [], "env must be an object of string values, got []"),
    ("env", "A=1", 'env must be an object of string values, got "A=1"'),
    ("env", None, "env must be an object of string values, got null"),
    ("env", {"A": 1}, 'env "A" must be a string, got 1'),
    ("env", {"A": None}, 'env "A" must be a string, got null'),
    ("env", {"A": True}, 'env "A" must be a string, got true'),
    ("env", {"A=B": "x"}, 'env has a bad variable name "A=B"'),
    ("env", {"": "x"}, 'env has a bad variable name ""'),
    ("env", {"A": "x\u0000y"}, 'env "A" must not contain a NUL byte'),
    # cwd: a path string
    ("cwd", 5, "cwd must be a directory path, got 5"),
    ("cwd", "", 'cwd must be a directory path, got ""'),
    ("cwd", True, "cwd must be a directory path, got true"),
    ("cwd", ["/tmp"], 'cwd must be a directory path, got ["/tmp"]'),
    ("cwd", "/tmp\u0000x", 'cwd must be a directory path, got "/tmp\\u0000x"'),
    # depends_on: list of ids
    ("depends_on", "seed", 'depends_on must be a list of job ids, got "seed"'),
    ("depends_on", {"seed": 1}, 'depends_on must be a list of job ids, got {"seed": 1}'),
    ("depends_on", None, "depends_on must be a list of job ids, got null"),
    ("depends_on", [1], "depends_on must be 1-128 characters"),
    ("depends_on", ["has space"], "depends_on must be 1-128 characters"),
    ("depends_on", [True], "depends_on must be 1-128 characters"),
]


@pytest.mark.parametrize("field, value, message", BAD_FIELDS,
                         ids=[f"{f}={json.dumps(v)[:24]}" for f, v, _ in BAD_FIELDS])
def test_a_bad_field_is_exit_2_naming_field_and_value(seeded, field, value, message):
    job = {"command": "true", field: value}
    line = refused("enqueue", json.dumps(job), code=2)
    assert line.startswith("queuectl: error: " + message), line


@pytest.mark.parametrize("field, value, message", BAD_FIELDS[::3],
                         ids=[f"{f}={json.dumps(v)[:24]}" for f, v, _ in BAD_FIELDS[::3]])
def test_a_bad_field_in_a_file_names_its_line_and_adds_no_job_of_the_file(seeded, field, value, message):
    lines = [{"id": "ok1", "command": "true"}, {"id": "ok2", "command": "true"},
             {"command": "true", field: value}, {"id": "ok4", "command": "true"}]
    text = "".join(json.dumps(job) + "\n" for job in lines)
    line = refused("enqueue", "-f", "-", stdin=text, code=2)
    assert line.startswith("queuectl: error: line 3: " + message), line


@pytest.mark.parametrize("job, message", [
    ({"command": "true", "retries": 3}, f"unknown field 'retries' (known: {KNOWN_FIELDS})"),
    ({"command": "true", "Command": "x"}, f"unknown field 'Command' (known: {KNOWN_FIELDS})"),
    ({"command": "true", "state": "completed"}, f"unknown field 'state' (known: {KNOWN_FIELDS})"),
    ({"command": "true", "": 1}, f"unknown field '' (known: {KNOWN_FIELDS})"),
    ({"id": "no-command"}, "command is required"),
    ({}, "command is required"),
    ({"command": "true", "delay": 1, "run_at": 0}, "give run_at or delay, not both"),
])
def test_unknown_fields_and_missing_or_clashing_ones_are_exit_2(seeded, job, message):
    assert refused("enqueue", json.dumps(job), code=2) == "queuectl: error: " + message


def test_an_empty_command_from_the_flag_is_exit_2(seeded):
    assert refused("enqueue", "-c", "", code=2) == 'queuectl: error: command must be a non-empty string, got ""'


def test_a_command_with_a_nul_byte_is_exit_2(seeded):
    line = refused("enqueue", json.dumps({"command": "echo a\u0000b"}), code=2)
    assert line == "queuectl: error: command must not contain a NUL byte"


def test_a_one_megabyte_command_is_refused_clearly_with_exit_2(seeded):
    command = "echo " + "x" * (1024 * 1024)
    size = len(command)
    limit = queuectl.MAX_COMMAND_BYTES
    expected = (f"queuectl: error: command is {size} bytes; the limit is {limit} (one exec argument); "
                "put a long script in a file and run that")
    assert refused("enqueue", json.dumps({"command": command}), code=2) == expected
    assert refused("enqueue", "-f", "-", stdin=json.dumps({"command": command}) + "\n",
                   code=2) == expected.replace("error: ", "error: line 1: ")


def test_a_one_megabyte_command_file_through_a_real_process_is_exit_2(seeded, tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"command": "echo " + "x" * (1024 * 1024)}) + "\n")
    before = snapshot(seeded)
    result = run("enqueue", "-f", path)
    assert result.returncode == 2
    assert "line 1: command is 1048581 bytes; the limit is" in error_line(result.stderr)
    assert snapshot(seeded) == before


@pytest.mark.parametrize("field, value", [("command", "echo \ud800"), ("env", {"\udc80": "x"}),
                                          ("env", {"A": "\ud83d"}), ("cwd", "/tmp/\udfff")])
def test_lone_surrogates_are_exit_2_naming_the_field(seeded, field, value):
    line = refused("enqueue", json.dumps({"command": "true", field: value}), code=2)
    assert field in line and "Unicode" in line


def test_ids_with_quotes_are_refused_and_the_tables_survive(seeded):
    line = refused("enqueue", json.dumps({"id": INJECTION, "command": "true"}), code=2)
    assert line == "queuectl: error: " + ID_RULE + json.dumps(INJECTION)
    assert refused("show", INJECTION, code=1) == f"queuectl: error: job '{INJECTION}' not found"
    assert refused("cancel", INJECTION, code=1) == f"queuectl: error: job '{INJECTION}' not found"
    assert refused("config", "get", INJECTION, code=2).startswith(f"queuectl: error: unknown config key '{INJECTION}'")
    assert refused("list", "--state", "completed') OR 1=1 --", code=2).startswith("queuectl: error: unknown state")
    code, out, _ = cli("list", "--queue", INJECTION)
    assert (code, out.strip()) == (0, "no jobs")
    assert job_count(seeded) == 1


# ---------------------------------------------------------------------------
# Input: files, duplicates, times
# ---------------------------------------------------------------------------

def test_a_bad_json_line_in_the_middle_of_a_file_adds_nothing(seeded, tmp_path):
    text = jsonl({"id": "a", "command": "true"}, {"id": "b", "command": "true"}) + \
        '{"id": "c", "command": \n' + jsonl({"id": "d", "command": "true"})
    (tmp_path / "jobs.jsonl").write_text(text)
    line = refused("enqueue", "-f", "jobs.jsonl", code=2)
    assert line == "queuectl: error: line 3 is not valid JSON: Expecting value at column 24"


def test_line_numbers_count_blank_lines(seeded):
    text = "\n" + jsonl({"command": "true"}) + "   \n\n" + jsonl({"command": "true", "priority": "high"})
    line = refused("enqueue", "-f", "-", stdin=text, code=2)
    assert line == 'queuectl: error: line 5: priority must be a whole number, got "high"'


def test_a_line_that_is_not_utf8_is_exit_2_naming_it(seeded):
    data = jsonl({"command": "true"}).encode() + b'{"command": "echo \xff\xfe"}\n'
    assert refused("enqueue", "-f", "-", stdin=data, code=2) == "queuectl: error: line 2: not UTF-8 text"


def test_a_file_that_cannot_be_read_is_exit_2_naming_it(seeded, tmp_path):
    assert refused("enqueue", "-f", "missing.jsonl", code=2) == \
        "queuectl: error: cannot read 'missing.jsonl': No such file or directory"
    assert refused("enqueue", "-f", str(tmp_path), code=2) == f"queuectl: error: cannot read '{tmp_path}': Is a directory"


def test_a_duplicate_id_inside_one_file_is_exit_1_naming_the_line(seeded):
    text = jsonl({"id": "a", "command": "true"}, {"id": "b", "command": "true"}, {"id": "a", "command": "false"})
    assert refused("enqueue", "-f", "-", stdin=text, code=1) == \
        "queuectl: error: line 3: job id 'a' appears twice in the input"


def test_a_duplicate_of_a_stored_id_is_exit_1_naming_the_line(seeded):
    text = jsonl({"id": "a", "command": "true"}, {"id": "seed", "command": "false"}, {"id": "c", "command": "true"})
    assert refused("enqueue", "-f", "-", stdin=text, code=1) == \
        "queuectl: error: line 2: job 'seed' already exists (--if-absent skips existing ids)"
    assert refused("enqueue", json.dumps({"id": "seed", "command": "false"}), code=1) == \
        "queuectl: error: job 'seed' already exists (--if-absent skips existing ids)"
    assert refused("enqueue", "-c", "false", "--id", "seed", code=1) == \
        "queuectl: error: job 'seed' already exists (--if-absent skips existing ids)"
    assert show("seed")["command"] == "echo seed"


def test_if_absent_skips_duplicates_and_prints_nothing_for_them(seeded):
    text = jsonl({"id": "seed", "command": "false"}, {"id": "new", "command": "true"},
                 {"id": "new", "command": "false"}, {"id": "new2", "command": "true"})
    code, out, err = cli("enqueue", "-f", "-", "--if-absent", stdin=text)
    assert (code, out, err) == (0, "new\nnew2\n", "")
    assert show("seed")["command"] == "echo seed"
    assert show("new")["command"] == "true"  # the first of the file wins
    assert job_count(seeded) == 3
    code, out, err = cli("enqueue", "-f", "-", "--if-absent", stdin=text)
    assert (code, out, err) == (0, "", "")
    assert job_count(seeded) == 3


def test_if_absent_still_refuses_a_bad_line(seeded):
    text = jsonl({"id": "new", "command": "true"}, {"id": "seed", "command": 5})
    assert refused("enqueue", "-f", "-", "--if-absent", stdin=text, code=2) == \
        "queuectl: error: line 2: command must be a non-empty string, got 5"


@pytest.fixture
def odd_timezone():
    """Local time three hours behind UTC (TZ as a POSIX rule: no tz database needed)."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "QQQ+03"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


@pytest.mark.parametrize("text, expected", [
    ("2031-06-01T12:00:00", time.mktime),  # naive: local time
    ("2031-06-01 12:00", time.mktime),
    ("2031-06-01T12:00:00+05:30", calendar.timegm((2031, 6, 1, 6, 30, 0)) * 1.0),
    ("2031-06-01T12:00:00Z", calendar.timegm((2031, 6, 1, 12, 0, 0)) * 1.0),
    ("2031-06-01T12:00:00.250z", calendar.timegm((2031, 6, 1, 12, 0, 0)) + 0.25),
    ("1938000000", 1938000000.0),
])
def test_run_at_reads_naive_as_local_and_honours_offsets_and_z(seeded, odd_timezone, text, expected):
    if expected is time.mktime:
        expected = time.mktime((2031, 6, 1, 12, 0, 0, 0, 0, -1))
        assert expected == calendar.timegm((2031, 6, 1, 15, 0, 0))  # the zone is really in force
    [job_id] = enqueue(json.dumps({"command": "true", "run_at": text}))
    assert show(job_id)["run_at"] == queuectl.iso(expected)
    [job_id] = enqueue("-c", "true", "--run-at", text)
    assert show(job_id)["run_at"] == queuectl.iso(expected)


@pytest.mark.parametrize("text", ["next tuesday", "2031-02-30T00:00:00", "12:00", "2031-06-01T25:00:00",
                                  "2031-06-01T12:00:00+25:00", "nan", "-5", "1e999"])
def test_an_unparseable_run_at_is_exit_2(seeded, text):
    line = refused("enqueue", "-c", "true", "--run-at", text, code=2)
    assert line.startswith("queuectl: error: run_at must be"), line
    assert text in line or text == "1e999" or text == "nan"


@pytest.mark.parametrize("value", [1e300, "9999-12-31T23:59:59Z", 253402300800])
def test_a_far_future_run_at_is_refused_or_shown_never_an_internal_error(seeded, value):
    code, _, err = cli("enqueue", json.dumps({"id": "far", "command": "true", "run_at": value}))
    if code == 2:
        assert "run_at" in error_line(err)
        assert job_count(seeded) == 1
        return
    assert (code, err) == (0, ""), err
    for argv in (("show", "far", "--json"), ("show", "far"), ("list", "--json"), ("list",), ("status",)):
        code, _, err = cli(*argv)
        assert (code, err) == (0, ""), f"{argv}: {err}"


@pytest.mark.parametrize("field", ["timeout", "delay", "run_at", "priority", "max_retries"])
@pytest.mark.parametrize("value", [2 ** 63, 10 ** 20, 10 ** 400, -(10 ** 400)], ids=["2^63", "1e20", "1e400", "-1e400"])
def test_huge_integers_in_number_fields_are_refused_or_stored_never_an_internal_error(seeded, field, value):
    code, out, err = cli("enqueue", json.dumps({"id": "huge", "command": "true", field: value}))
    if code == 2:
        assert error_line(err).startswith(f"queuectl: error: {field} must be"), err
        assert job_count(seeded) == 1
        return
    assert (code, out, err) == (0, "huge\n", ""), err
    for argv in (("show", "huge", "--json"), ("list", "--json")):
        code, _, err = cli(*argv)
        assert (code, err) == (0, ""), f"{argv}: {err}"


@pytest.mark.parametrize("delay", [1e308, 1e20])
def test_a_huge_delay_is_refused_or_shown_never_an_internal_error(seeded, delay):
    code, _, err = cli("enqueue", json.dumps({"id": "late", "command": "true", "delay": delay}))
    if code == 2:
        assert "delay" in error_line(err)
        return
    assert code == 0, err
    for argv in (("show", "late", "--json"), ("list", "--json")):
        code, _, err = cli(*argv)
        assert (code, err) == (0, ""), f"{argv}: {err}"


# ---------------------------------------------------------------------------
# Input: config, subcommands, arguments
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [("config", "set", "colour", "red"), ("config", "get", "colour"),
                                  ("config", "set", "MAX_RETRIES", "1"), ("config", "set", "", "1")])
def test_an_unknown_config_key_is_exit_2_listing_the_known_ones(seeded, argv):
    assert refused(*argv, code=2) == f"queuectl: error: unknown config key '{argv[2]}' (known: {KNOWN_KEYS})"


@pytest.mark.parametrize("key, value, message", [
    ("max_retries", "1.5", "config max_retries must be a whole number, got '1.5'"),
    ("max_retries", "1001", "config max_retries must be from 0 to 1000, got 1001"),
    ("lease_timeout", "0.5", "config lease_timeout must be at least 1, got 0.5"),
    ("poll_interval", "0", "config poll_interval must be greater than 0, got 0"),
    ("backoff_base", "nan", "config backoff_base must be a number, got NaN"),
    ("output_limit", "-1", "config output_limit must be at least 0, got -1"),
    ("max_retries", "three", "config max_retries must be a whole number, got 'three'"),
    ("max_retries", "", "config max_retries must be a whole number, got ''"),
    ("max_retries", "-1", "config max_retries must be from 0 to 1000, got -1"),
    ("max_retries", "1e3", "config max_retries must be a whole number, got '1e3'"),
    ("backoff_base", "-0.5", "config backoff_base must be at least 0, got -0.5"),
    ("backoff_base", "inf", "config backoff_base must be a number, got Infinity"),
    ("backoff_max", "-1", "config backoff_max must be at least 0, got -1"),
    ("backoff_max", "soon", "config backoff_max must be a number, got 'soon'"),
    ("job_timeout", "-1", "config job_timeout must be at least 0, got -1"),
    ("job_timeout", "nan", "config job_timeout must be a number, got NaN"),
    ("lease_timeout", "0", "config lease_timeout must be at least 1, got 0"),
    ("poll_interval", "-1", "config poll_interval must be greater than 0, got -1"),
    ("output_limit", "1.5", "config output_limit must be a whole number, got '1.5'"),
    ("output_limit", "64k", "config output_limit must be a whole number, got '64k'"),
])
def test_a_bad_config_value_is_exit_2_naming_key_and_value_and_changes_nothing(seeded, key, value, message):
    line = refused("config", "set", key, value, code=2)
    assert line.startswith("queuectl: error: " + message), line


@pytest.mark.parametrize("argv, message", [
    ((), "the following arguments are required: COMMAND"),
    (("frobnicate",), "argument COMMAND: invalid choice: 'frobnicate'"),
    (("worker",), "the following arguments are required: ACTION"),
    (("worker", "begin"), "argument ACTION: invalid choice: 'begin'"),
    (("dlq",), "the following arguments are required: ACTION"),
    (("config",), "the following arguments are required: ACTION"),
    (("config", "set", "max_retries"), "the following arguments are required: value"),
    (("show",), "the following arguments are required: id"),
    (("logs",), "the following arguments are required: id"),
    (("cancel",), "the following arguments are required: ID"),
    (("retry",), "the following arguments are required: ID"),
    (("wait",), "the following arguments are required: ID"),
    (("enqueue",), "give exactly one job source: a JSON argument, -c COMMAND or -f FILE"),
    (("enqueue", "-c"), "argument -c/--command: expected one argument"),
    (("enqueue", "-f"), "argument -f/--file: expected one argument"),
    (("enqueue", "-c", "true", "-f", "x.jsonl"), "give exactly one job source"),
    (("enqueue", "-c", "true", "--max-retries", "many"), "argument --max-retries: invalid int value: 'many'"),
    (("enqueue", "-c", "true", "--timeout", "soon"), "argument --timeout: invalid float value: 'soon'"),
    (("enqueue", "-c", "true", "--delay", "1", "--run-at", "0"), "argument --run-at: not allowed with argument --delay"),
    (("enqueue", '{"command": "true"}', "--queue", "q"), "--queue goes with -c COMMAND"),
    (("enqueue", "-c", "true", "--bogus"), "unrecognized arguments: --bogus"),
    (("--bogus", "status"), "unrecognized arguments: --bogus"),
    (("status", "extra"), "unrecognized arguments: extra"),
    (("list", "--limit", "ten"), "argument --limit: invalid int value: 'ten'"),
    (("list", "--limit", "-1"), "--limit must be 0 (no limit) or a positive count, got -1"),
    (("list", "--state", "running"), "unknown state 'running'"),
    (("purge", "--older-than", "soon"), "duration must look like 90s, 15m, 12h or 7d, got 'soon'"),
    (("purge", "--state", "pending"), "purge deletes only jobs in end states"),
    (("worker", "start", "--count", "0"), "--count must be from 1 to 256, got 0"),
    (("worker", "start", "--queue", "a b"), "--queue must be 1-64 characters"),
    (("wait", "seed", "--timeout", "-1"), "--timeout must be 0 or more, got -1"),
    (("dlq", "retry"), "give job ids or --all, not both or neither"),
])
def test_unknown_subcommands_and_missing_arguments_are_one_line_exit_2(seeded, argv, message):
    line = refused(*argv, code=2)
    assert message in line, line


@pytest.mark.parametrize("argv, code", [
    (("enqueue", '{"command": "true", "a\\nb": 1}'), 2),
    (("enqueue", '{"command": "true", "env": {"A\\nB": 1}}'), 2),
    (("enqueue", '{"command": "true", "env": {"A\\rB": 5}}'), 2),
    (("show", "a\nb"), 1),
    (("cancel", "a\nb"), 1),
    (("wait", "a\nb"), 1),
    (("config", "get", "a\nb"), 2),
    (("config", "set", "max_retries", "1\n2"), 2),
    (("list", "--state", "a\nb"), 2),
    (("purge", "--older-than", "1\nx"), 2),
    (("enqueue", "-f", "no\nfile"), 2),
    (("worker", "start", "--queue", "a\nb"), 2),
    (("--db", "/no\nwhere/q.db", "status"), 1),
], ids=["unknown-field", "env-name", "env-name-cr", "show", "cancel", "wait", "config-get", "config-set", "list-state",
        "purge-older-than", "enqueue-file", "worker-queue", "db-path"])
def test_a_newline_in_the_bad_value_still_makes_one_error_line(seeded, argv, code):
    # The terminal and `2>&1 | tail -1` both need the value escaped, as the JSON errors already do.
    before = snapshot(seeded)
    got, out, err = cli(*argv)
    assert (got, out) == (code, "")
    assert len(err.splitlines()) == 1 and err.startswith("queuectl: error: "), repr(err)
    assert snapshot(seeded) == before


@pytest.mark.parametrize("value", ["nan"])
def test_wait_with_a_nonsense_timeout_is_exit_2_not_a_hang(seeded, value):
    before = snapshot(seeded)
    try:
        result = run("wait", "seed", "--timeout", value, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`wait seed --timeout {value}` neither refused the value nor timed out (still waiting after 5 s)")
    assert result.returncode == 2, result.stderr
    assert "--timeout" in error_line(result.stderr)
    assert snapshot(seeded) == before


# ---------------------------------------------------------------------------
# Environment: files that cannot hold a database
# ---------------------------------------------------------------------------

def test_a_db_in_a_missing_directory_is_exit_1_and_creates_nothing(db, tmp_path):
    path = tmp_path / "no" / "such" / "q.db"
    code, out, err = cli("--db", path, "enqueue", "-c", "true")
    assert (code, out) == (1, "")
    assert error_line(err) == (f"queuectl: error: cannot create database '{path}': directory "
                               f"'{path.parent}' does not exist")
    assert not (tmp_path / "no").exists()


def test_a_directory_as_db_is_exit_1(db, tmp_path):
    code, out, err = cli("--db", tmp_path, "status")
    assert (code, out) == (1, "")
    assert error_line(err) == f"queuectl: error: cannot use database '{tmp_path}': it is a directory"


@pytest.mark.parametrize("content", [b"hello, I am a text file\n" * 200, bytes(range(256)) * 64])
def test_a_file_that_is_not_sqlite_is_exit_1_and_left_byte_for_byte(db, tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    for argv in (("status",), ("enqueue", "-c", "true"), ("worker", "start", "--burst")):
        code, out, err = cli("--db", path, *argv)
        assert (code, out) == (1, "")
        assert error_line(err) == f"queuectl: error: '{path}' is not a SQLite database (file is not a database)"
    assert path.read_bytes() == content
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def make_foreign_db(path):
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('keep me')")
        conn.commit()


def make_newer_rollback_db(path):
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE jobs (id TEXT, future_column TEXT)")
        conn.execute("PRAGMA user_version = 99")
        conn.commit()


@pytest.mark.parametrize("make, message", [
    (make_foreign_db, "not a queuectl database: it has other tables (notes)"),
    (make_newer_rollback_db, "the database has schema version 99, newer than this queuectl"),
], ids=["another-programs-db", "newer-schema-rollback-journal"])
def test_a_refused_sqlite_database_is_left_byte_for_byte(db, tmp_path, make, message):
    path = str(tmp_path / "other.db")
    make(path)
    with open(path, "rb") as f:
        content = f.read()
    code, out, err = cli("--db", path, "status")
    assert (code, out) == (1, "")
    assert message in error_line(err)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "delete", f"the refused database was switched to journal_mode {mode}"
    with open(path, "rb") as f:
        assert f.read() == content


@sqlite_only
def test_a_database_with_a_newer_schema_is_refused_and_keeps_its_version(seeded):
    with contextlib.closing(sqlite3.connect(seeded)) as conn:
        conn.execute("PRAGMA user_version = 99")
    before = snapshot(seeded)
    expected = (f"queuectl: error: the database has schema version 99, newer than this queuectl "
                f"{queuectl.__version__} knows ({queuectl.SCHEMA_VERSION}); use a newer queuectl")
    for argv in (("status",), ("enqueue", "-c", "true"), ("init",), ("config", "set", "max_retries", "1")):
        code, out, err = cli(*argv)
        assert (code, out, error_line(err)) == (1, "", expected)
    result = run("worker", "start", "--burst", timeout=30)
    assert (result.returncode, error_line(result.stderr)) == (1, expected)
    with contextlib.closing(sqlite3.connect(seeded)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 99
    assert snapshot(seeded) == before


def make_db_with_jobs(path, count=300):
    """A real database with `count` jobs of about 500 bytes, checkpointed into the main file."""
    text = "".join(json.dumps({"id": f"j{i}", "command": "echo " + "x" * 500}) + "\n" for i in range(count))
    result = subprocess.run([sys.executable, SCRIPT, "--db", path, "enqueue", "-f", "-"], input=text,
                            capture_output=True, text=True, timeout=60, check=True)
    assert len(result.stdout.split()) == count
    assert not os.path.exists(path + "-wal")  # the last connection checkpointed and removed it


def test_a_truncated_database_is_exit_1_one_line_for_every_command(db, tmp_path):
    path = str(tmp_path / "t.db")
    make_db_with_jobs(path)
    os.truncate(path, os.path.getsize(path) // 2)
    expected = f"queuectl: error: database '{path}' is corrupt (database disk image is malformed); restore it from a backup"
    for argv in (("status",), ("list",), ("show", "j5"), ("enqueue", "-c", "true"), ("config", "list")):
        result = run("--db", path, *argv)
        assert (result.returncode, result.stdout) == (1, ""), (argv, result.stderr)
        assert error_line(result.stderr) == expected, argv
    result = run("--db", path, "worker", "start", "--burst", timeout=30)
    assert (result.returncode, error_line(result.stderr)) == (1, expected)


def overwrite_middle(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff" * 8192)


def test_a_database_overwritten_in_the_middle_is_reported_corrupt_never_a_traceback(db, tmp_path):
    path = str(tmp_path / "c.db")
    make_db_with_jobs(path)
    overwrite_middle(path)
    corrupt = f"queuectl: error: database '{path}' is corrupt (database disk image is malformed); restore it from a backup"
    for argv in (("list", "--limit", "0"),):  # this reads every job
        result = run("--db", path, *argv)
        assert (result.returncode, result.stdout) == (1, ""), (argv, result.stderr)
        assert error_line(result.stderr) == corrupt
    for argv in (("status",), ("show", "j5"), ("show", "j150"), ("list",), ("enqueue", "-c", "true"),
                 ("cancel", "j150")):
        result = run("--db", path, *argv)  # may work when it never touches a broken page
        assert result.returncode in (0, 1), (argv, result.stderr)
        if result.returncode:
            assert error_line(result.stderr) == corrupt


def test_workers_on_a_corrupt_database_stop_with_exit_1_instead_of_rerunning_jobs(db, tmp_path):
    path = str(tmp_path / "c.db")
    make_db_with_jobs(path)
    overwrite_middle(path)
    try:
        result = subprocess.run([sys.executable, SCRIPT, "--db", path, "worker", "start", "--burst"],
                                capture_output=True, text=True, timeout=30, check=False)
        log = result.stderr
    except subprocess.TimeoutExpired as e:
        log = (e.stderr or b"").decode(errors="replace")
        pytest.fail(f"worker start --burst on a corrupt database still ran after 30 s: {log[-500:]}")
    starts = {}
    for job_id in re.findall(r"job (\S+) started", log):
        starts[job_id] = starts.get(job_id, 0) + 1
    crashes = [line for line in log.splitlines() if "crashed" in line]
    assert max(starts.values(), default=0) <= 1 and len(crashes) <= 1, (
        f"{len(crashes)} worker crashes; runs per job {starts}; e.g. {crashes[:2]}")
    assert result.returncode == 1
    assert log.strip().splitlines()[-1].startswith(f"queuectl: error: database '{path}' is corrupt")
    assert "Traceback" not in log


# ---------------------------------------------------------------------------
# Environment: permissions (as user nobody), locks, a full disk
# ---------------------------------------------------------------------------

def make_nobody_db(where, sub, jobs=("one",)):
    """<where>/<sub>/q.db with jobs, made by root; return its path relative to the directory."""
    path, _ = where
    os.makedirs(os.path.join(path, sub))
    rel = os.path.join(sub, "q.db")
    for job_id in jobs:
        result = subprocess.run([sys.executable, SCRIPT, "--db", os.path.join(path, rel), "enqueue", "-c",
                                 "echo hi", "--id", job_id], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
    return rel


def test_a_read_only_database_file_is_refused_before_anything_is_touched(nobody_dir):
    path, _ = nobody_dir
    rel = make_nobody_db(nobody_dir, "ro-file")
    full = os.path.join(path, rel)
    os.chown(os.path.dirname(full), 65534, 65534)  # nobody may write the directory...
    os.chown(full, 65534, 65534)
    os.chmod(full, 0o400)                           # ...but not the file
    before, files = snapshot(full), dir_listing(os.path.dirname(full))
    for argv in (("enqueue", "-c", "echo 2", "--id", "two"), ("status", "--json")):
        result = as_nobody(nobody_dir, "--db", rel, *argv)
        assert (result.returncode, result.stdout) == (1, "")
        assert error_line(result.stderr) == (f"queuectl: error: cannot use database '{rel}': this user cannot "
                                             f"read and write '{rel}'; check its permissions")
    assert snapshot(full) == before
    assert dir_listing(os.path.dirname(full)) == files  # no -wal or -shm left to outlive a fix


def test_a_failed_enqueue_on_a_read_only_file_leaves_nothing_that_outlives_the_fix(nobody_dir):
    path, _ = nobody_dir
    rel = make_nobody_db(nobody_dir, "ro-fix")
    full = os.path.join(path, rel)
    os.chown(os.path.dirname(full), 65534, 65534)
    os.chown(full, 65534, 65534)
    os.chmod(full, 0o400)
    files_before = sorted(os.listdir(os.path.dirname(full)))
    assert as_nobody(nobody_dir, "--db", rel, "enqueue", "-c", "echo 2").returncode == 1
    left = dir_listing(os.path.dirname(full))
    os.chmod(full, 0o600)  # the user fixes the mode, as the error told them to
    result = as_nobody(nobody_dir, "--db", rel, "enqueue", "-c", "echo 2", "--id", "two")
    assert result.returncode == 0, (f"after chmod 600 the enqueue still fails: {result.stderr.strip()}; "
                                    f"files before {files_before}, after the failed enqueue "
                                    f"{ {n: oct(m) for n, (m, _, _) in left.items()} }")
    assert job_count(full) == 2


def test_a_read_only_directory_is_refused_clearly_and_nothing_changes(nobody_dir):
    path, _ = nobody_dir
    rel = make_nobody_db(nobody_dir, "ro-dir")
    full = os.path.join(path, rel)
    os.chown(full, 65534, 65534)  # nobody owns the file (0600) but not the directory (root, 0755)
    before, files = snapshot(full), dir_listing(os.path.dirname(full))
    for argv in (("enqueue", "-c", "echo 2"), ("status", "--json")):
        result = as_nobody(nobody_dir, "--db", rel, *argv)
        assert (result.returncode, result.stdout) == (1, "")
        assert error_line(result.stderr) == (
            f"queuectl: error: cannot use database '{rel}': directory '{os.path.dirname(full)}' is read-only, "
            "and SQLite needs to create its -wal and -shm files there")
    assert snapshot(full) == before
    assert dir_listing(os.path.dirname(full)) == files


def test_a_database_nobody_may_read_is_exit_1_one_line(nobody_dir):
    rel = make_nobody_db(nobody_dir, "closed")  # root's, 0600: nobody cannot even read it
    for argv in (("status",), ("enqueue", "-c", "true")):
        result = as_nobody(nobody_dir, "--db", rel, *argv)
        assert (result.returncode, result.stdout) == (1, ""), result.stderr
        line = error_line(result.stderr)
        assert rel in line and ("permission" in line.lower() or "cannot open" in line or "read-only" in line)


@sqlite_only
def test_a_write_lock_held_elsewhere_is_exit_1_locked_after_the_busy_timeout(seeded):
    before = snapshot(seeded)
    holder = sqlite3.connect(seeded, isolation_level=None)
    env = dict(os.environ, QUEUECTL_BUSY_TIMEOUT="0.5")
    try:
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("UPDATE config SET value = '7' WHERE key = 'max_retries'")
        for argv in (("enqueue", "-f", "-"), ("config", "set", "backoff_max", "9"), ("cancel", "seed")):
            started = time.monotonic()
            result = run(*argv, env=env, input=jsonl({"id": "a", "command": "true"}, {"id": "b", "command": "true"}))
            took = time.monotonic() - started
            assert (result.returncode, result.stdout) == (1, ""), (argv, result.stderr)
            assert error_line(result.stderr) == (
                f"queuectl: error: database '{seeded}' is locked: another process held its write lock for "
                "more than 0.5 s (database is locked)")
            assert 0.5 <= took < 4.0, f"{argv} gave up after {took:.2f} s"
        result = run("status", "--json", env=env)  # readers are not blocked (WAL)
        assert result.returncode == 0, result.stderr
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    assert snapshot(seeded) == before
    assert integrity(seeded) == "ok"


@sqlite_only
def test_a_full_disk_during_an_enqueue_is_exit_1_and_adds_nothing(seeded, tmp_path):
    text = "".join(json.dumps({"id": f"b{i}", "command": "echo " + "y" * 2000}) + "\n" for i in range(3000))
    (tmp_path / "big.jsonl").write_text(text)
    before = snapshot(seeded)
    limit = os.path.getsize(seeded) + 256 * 1024  # room for the -shm, not for 6 MB of jobs

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, SCRIPT, "enqueue", "-f", "big.jsonl"], capture_output=True,
                            text=True, timeout=60, preexec_fn=small_files, check=False)
    assert (result.returncode, result.stdout) == (1, ""), result.stderr
    line = error_line(result.stderr)
    assert line.startswith(f"queuectl: error: database '{seeded}'") and "disk" in line, line
    assert snapshot(seeded) == before
    assert integrity(seeded) == "ok"
    assert enqueue("-c", "true", "--id", "after")  # the database still works
    assert job_count(seeded) == 2


# ---------------------------------------------------------------------------
# Jobs that misbehave (real workers)
# ---------------------------------------------------------------------------

def test_output_that_is_not_utf8_is_kept_with_replacement_characters(fast):
    enqueue(json.dumps({"id": "bytes", "command": r"printf 'ok \377\376 done'; printf '\300\n' >&2"}))
    job, _ = burst_show("bytes")
    assert job["state"] == "completed"
    assert job["stdout"] == "ok \ufffd\ufffd done"
    assert job["stderr"] == "\ufffd\n"
    code, out, _ = cli("logs", "bytes")
    assert (code, out) == (0, "ok \ufffd\ufffd done")


def test_a_background_child_holding_stdout_does_not_keep_the_job_running(fast, tmp_path):
    pid_file = tmp_path / "bg.pid"
    enqueue(json.dumps({"id": "bg", "command": f"echo hi; sleep 30 & echo $! > {pid_file}"}))
    started = time.monotonic()
    try:
        job, _ = burst_show("bg")
        took = time.monotonic() - started
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert (job["state"], job["exit_code"], job["stdout"]) == ("completed", 0, "hi\n")
    assert took < 10, f"the burst took {took:.1f} s"


def test_a_job_ignoring_sigterm_is_killed_after_the_grace_and_recorded_as_timed_out(fast):
    enqueue(json.dumps({"id": "stubborn", "command": "trap '' TERM; sleep 30", "timeout": 0.3,
                        "max_retries": 0}))
    started = time.monotonic()
    job, log = burst_show("stubborn")
    took = time.monotonic() - started
    assert job["state"] == "dead"
    assert job["exit_code"] is None
    assert job["last_error"] == "timed out after 0.3 s (killed by signal SIGKILL)"
    assert queuectl.KILL_GRACE_S <= took < queuectl.KILL_GRACE_S + 8
    assert "timed out after 0.3 s" in log


def test_a_job_killed_by_a_signal_has_no_exit_code_and_names_the_signal(fast):
    enqueue(json.dumps({"id": "killed", "command": "kill -9 $$", "max_retries": 1}))
    job, log = burst_show("killed")
    assert (job["state"], job["attempts"], job["exit_code"]) == ("dead", 2, None)
    assert job["last_error"] == "killed by signal SIGKILL"
    assert "killed by signal SIGKILL" in log


def test_a_command_not_found_records_127(fast):
    enqueue(json.dumps({"id": "typo", "command": "no-such-command-xyz --flag", "max_retries": 0}))
    job, _ = burst_show("typo")
    assert (job["state"], job["exit_code"]) == ("dead", 127)
    assert job["last_error"] == "exit status 127 (command not found)"
    assert "no-such-command-xyz" in job["stderr"] and "not found" in job["stderr"]


def test_a_cwd_that_does_not_exist_is_a_failed_attempt_with_a_clear_error(fast, tmp_path):
    missing = str(tmp_path / "gone")
    enqueue(json.dumps({"id": "nowhere", "command": "true", "cwd": missing, "max_retries": 1}))
    job, log = burst_show("nowhere")
    assert (job["state"], job["attempts"], job["exit_code"]) == ("dead", 2, None)
    assert job["last_error"] == f"cannot start: cwd '{missing}' is not a directory"
    assert "not a directory" in log


def test_output_beyond_the_limit_keeps_the_last_bytes_and_is_marked(fast):
    assert cli("config", "set", "output_limit", "100")[0] == 0
    enqueue(json.dumps({"id": "chatty", "command": "seq 1 400; seq 1 400 >&2"}))
    job, _ = burst_show("chatty")
    full = "".join(f"{i}\n" for i in range(1, 401))
    cut = len(full) - 100
    marker = f"[queuectl: {cut} earlier bytes cut]\n"
    assert job["stdout"] == marker + full[-100:]
    assert job["stderr"] == marker + full[-100:]
    code, out, err = cli("logs", "chatty")
    assert (code, out) == (0, full[-100:])
    assert err == f"queuectl: note: {marker.strip()}\n"


# ---------------------------------------------------------------------------
# Security
# ---------------------------------------------------------------------------

@sqlite_only
def test_database_wal_shm_and_log_files_are_owner_only_even_with_umask_0(db):
    env = dict(os.environ)
    result = subprocess.run([sys.executable, SCRIPT, "worker", "start", "--detach"], capture_output=True, text=True,
                            timeout=30, env=env, preexec_fn=lambda: os.umask(0), check=False)
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.strip())
    try:
        assert wait_until(lambda: os.path.exists(db + "-wal") and os.path.exists(db + "-shm"), timeout=5)
        modes = {suffix: stat.S_IMODE(os.stat(db + suffix).st_mode) for suffix in ("", "-wal", "-shm", ".log")}
        assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600, ".log": 0o600}, {k: oct(v) for k, v in modes.items()}
    finally:
        stop = run("worker", "stop", "--timeout", "10")
        if stop.returncode != 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    assert stop.returncode == 0, stop.stderr


@sqlite_only
def test_worker_start_refuses_a_database_others_can_write(seeded):
    os.chmod(seeded, 0o666)
    before = snapshot(seeded)
    result = run("worker", "start", "--burst", timeout=30)
    assert (result.returncode, result.stdout) == (1, "")
    assert error_line(result.stderr) == (
        f"queuectl: error: database '{seeded}' is writable by other users (mode -rw-rw-rw-); its jobs run as "
        f"shell commands, so fix it first: chmod 600 '{seeded}'")
    assert snapshot(seeded) == before
    assert show("seed")["state"] == "pending"  # it ran nothing


def test_env_values_never_appear_in_the_worker_log(fast):
    secret = "s3cr3t-Value-4711"
    enqueue(json.dumps({"id": "ok", "command": 'test -n "$TOKEN"', "env": {"TOKEN": secret}}))
    enqueue(json.dumps({"id": "bad", "command": 'test -z "$TOKEN"', "env": {"TOKEN": secret}, "max_retries": 1}))
    result = burst()
    assert "job ok completed" in result.stderr and "job bad dead" in result.stderr
    assert secret not in result.stderr and secret not in result.stdout
    assert show("ok")["env"] == {"TOKEN": secret}  # stored for the job, shown only on request


def test_quotes_and_sql_in_commands_and_env_round_trip_unchanged(fast):
    command = f"printf '%s|%s' \"$PAYLOAD\" '{INJECTION.replace(chr(39), chr(39) + chr(92) + chr(39) + chr(39))}'"
    job = {"id": "inject", "command": command, "env": {"PAYLOAD": INJECTION, "Q'uote": '"; --'}}
    enqueue(json.dumps(job))
    stored = show("inject")
    assert (stored["command"], stored["env"]) == (command, job["env"])
    stored, _ = burst_show("inject")
    assert stored["state"] == "completed", stored["last_error"]
    assert stored["stdout"] == f"{INJECTION}|{INJECTION}"
    assert {"jobs", "deps", "config", "workers"} <= set(snapshot(fast))
    assert integrity(fast) == "ok"


# ---------------------------------------------------------------------------
# Fuzz: mutated jobs and files, in-process
# ---------------------------------------------------------------------------

WEIRD_VALUES = [None, True, False, 0, -1, 1.5, -0.0, 10 ** 30, -10 ** 30, 1e308, -1e308, 5e-324,
                float("nan"), float("inf"), float("-inf"), "", " ", "x", "9" * 40, "NaN", "2026-11-22T09:30:00Z",
                [], [1], ["x"], {}, {"a": 1}, {"A": "b"}, "\u0000", "caf\u00e9", "\U0001F600"]
HUGE_LITERAL = "<a 5000-digit number>"
FIELD_POOL = list(queuectl.JOB_FIELDS) + ["bogus", "Command", "state", ""]


def random_text(rng, length=None):
    """Random text from ASCII, Latin, CJK, emoji, controls and lone surrogates."""
    ranges = [(0x20, 0x7E), (0x0, 0x1F), (0xA0, 0x24F), (0x4E00, 0x4E80), (0x1F600, 0x1F64F), (0xD800, 0xDFFF)]
    length = rng.randint(0, 12) if length is None else length
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


def valid_job(rng, known_ids, serial):
    job = {"command": rng.choice(["true", "echo hi", "exit 3", "printf '%s' x"])}
    if rng.random() < 0.6:
        job["id"] = f"f{serial}"
    if rng.random() < 0.3:
        job["max_retries"] = rng.randint(0, 1000)
    if rng.random() < 0.3:
        job["timeout"] = rng.choice([0, 0.5, 30, rng.uniform(0, 1e6)])
    if rng.random() < 0.3:
        job["priority"] = rng.randint(-1000, 1000)
    if rng.random() < 0.3:
        job["queue"] = rng.choice(["default", "emails", "a.b_c-9", "Q" * 64])
    if rng.random() < 0.2:
        job["run_at"] = rng.choice(["2030-01-01T00:00:00", "2020-05-05T05:05:05+05:30", "2031-01-01T00:00:00Z",
                                    1_900_000_000, 0, "1700000000"])
    elif rng.random() < 0.2:
        job["delay"] = rng.choice([0, 0.001, 3600])
    if rng.random() < 0.2:
        job["env"] = {"A": "1", "LONG_NAME": random_text(rng).replace("\0", "")}
    if rng.random() < 0.1:
        job["cwd"] = "/tmp"
    if rng.random() < 0.2 and known_ids:
        job["depends_on"] = rng.sample(known_ids, min(len(known_ids), rng.randint(1, 3)))
    return job


def mutate(rng, job, known_ids):
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        action = rng.randrange(7)
        if action == 0 and job:
            del job[rng.choice(list(job))]
        elif action == 1:
            job[rng.choice(FIELD_POOL)] = rng.choice(WEIRD_VALUES)
        elif action == 2:
            job[rng.choice(["id", "command", "queue", "cwd", "run_at"])] = random_text(rng)
        elif action == 3 and known_ids:
            job["id"] = rng.choice(known_ids)  # a duplicate of a stored id
        elif action == 4:
            job[rng.choice(["priority", "max_retries", "timeout", "delay", "run_at"])] = rng.choice(
                [10 ** rng.randint(3, 400), -(10 ** rng.randint(3, 400)), 1e300, -1e300, 2 ** 63, -(2 ** 63)]
                if rng.random() < 0.85 else [HUGE_LITERAL])
        elif action == 5:
            job["env"] = {random_text(rng, 3): rng.choice([random_text(rng), 1, None])}
        else:
            job["depends_on"] = rng.choice([[random_text(rng)], ["ghost"], [job.get("id", "x")], "x"])
    return job


def job_text(rng, known_ids, serial):
    """One line of JSON: usually a (mutated) job object, sometimes something broken."""
    roll = rng.random()
    if roll < 0.05:
        return json.dumps(rng.choice([[], 5, "str", None, [{"command": "true"}]]))
    job = mutate(rng, valid_job(rng, known_ids, serial), known_ids)
    text = json.dumps(job, ensure_ascii=rng.random() < 0.7)
    text = text.replace(json.dumps(HUGE_LITERAL), "9" * 5000)  # more digits than Python 3.11 parses
    if roll > 0.9:
        cut = rng.randrange(len(text) + 1)
        text = rng.choice([text[:cut], text[:cut] + rng.choice('{}[]",:\\') + text[cut:], text.replace('"', "'", 1)])
    return text


def test_fuzzed_jobs_and_files_never_crash_never_half_apply(db):
    rng = random.Random(1234)
    assert cli("init")[0] == 0
    known_ids, problems, count = [], [], 0
    started = time.monotonic()
    # Fewer on PostgreSQL: the input is checked before either backend sees it,
    # and every case there costs a few connections (a login each).
    for case in range(200 if PG_URL is None else 60):
        if rng.random() < 0.4:
            texts = [job_text(rng, known_ids, f"{case}")]
            argv, stdin = ["enqueue", texts[0]], None
        else:
            texts = [job_text(rng, known_ids, f"{case}-{n}") for n in range(rng.randint(1, 6))]
            if rng.random() < 0.2:  # an id twice in one file
                texts.append(texts[0])
            lines = [t.encode("utf-8", "surrogatepass") for t in texts]
            if rng.random() < 0.1:
                lines.insert(rng.randrange(len(lines) + 1), rng.choice([b"", b"   ", b"\t"]))
            if rng.random() < 0.05:
                lines.insert(rng.randrange(len(lines) + 1), b'{"command": "\xff"}')
            argv, stdin = ["enqueue", "-f", "-"], b"\n".join(lines) + rng.choice([b"", b"\n", b"\r\n"])
        if_absent = rng.random() < 0.15
        argv += ["--if-absent"] if if_absent else []
        code, out, err = cli(*argv, stdin=stdin)
        new_ids = out.split()
        now_count = job_count(db)

        given = f"{' '.join(argv[:2])} {(stdin or argv[1])!r:.120}"
        outcome = f"exit {code}, stderr {err.strip()!r:.220}"

        def problem(kind, detail="", case=case, outcome=outcome, given=given):
            problems.append((kind, f"case {case}: {kind}{detail}: {outcome}; {given}"))

        if code not in (0, 1, 2):
            problem("exit code not 0/1/2")
        if "Traceback" in err or "internal error" in err:
            problem("traceback or internal error")
        if code != 0:
            lines_err = err.strip().splitlines()
            if len(lines_err) != 1 or not lines_err[0].startswith("queuectl: error: "):
                problem("not exactly one error line")
            if out:
                problem("printed ids but failed")
            if now_count != count:
                problem("failed but the job count changed", f" {count} -> {now_count}")
        else:
            if now_count != count + len(new_ids):
                problem("ids printed and job count disagree", f": {len(new_ids)} ids, {count} -> {now_count}")
            expected_lines = 1 if stdin is None else sum(1 for ln in stdin.split(b"\n") if ln.strip())
            if not if_absent and len(new_ids) != expected_lines:
                problem("not one id per job", f": {expected_lines} jobs, {len(new_ids)} ids")
            for job_id in new_ids[:2]:
                show_code, _, show_err = cli("show", job_id, "--json")
                if show_code != 0:
                    problem("show of a new job failed", f" ({job_id}: {show_err.strip()!r:.160})")
        if integrity(db) != "ok":
            problem("integrity_check failed")
        count = now_count
        known_ids.extend(new_ids)
    took = time.monotonic() - started
    for argv in (("list", "--json", "--limit", "0"), ("status", "--json")):
        code, _, err = cli(*argv)
        if code != 0:
            problems.append(("command failed after the fuzz", f"after the fuzz, {argv} failed: {err.strip()!r:.200}"))
    assert count > 5 and len(known_ids) == count  # the fuzz did enqueue things
    kinds = {}
    for kind, text in problems:
        kinds.setdefault(kind, []).append(text)
    assert not problems, (f"{len(problems)} problems in {took:.1f} s, of {len(kinds)} kinds:\n" + "\n".join(
        f"- {kind} ({len(texts)}x), e.g.\n    " + "\n    ".join(texts[:3]) for kind, texts in kinds.items()))


# ---------------------------------------------------------------------------
# Review fixes: each pinned by a test
# ---------------------------------------------------------------------------

def test_a_completed_job_keeps_the_run_at_it_was_scheduled_for(fast):
    enqueue(json.dumps({"id": "sched", "command": "true", "run_at": 1_000_000_000}))
    burst()
    job = show("sched")
    assert job["state"] == "completed"
    assert job["run_at"] == "2001-09-09T01:46:40.000Z"
    assert job["started_at"] >= job["run_at"]


def test_status_json_lists_workers_not_supervisors(fast):
    workers = start_workers("--count", "2")
    try:
        assert wait_until(lambda: len(status()["workers"]) == 2)
        assert {w["kind"] for w in status()["workers"]} == {"worker"}
    finally:
        os.killpg(workers.pid, signal.SIGTERM)
        workers.wait(10)


def test_worker_queue_flag_takes_several_queues(fast):
    for queue in ("a", "b", "c"):
        enqueue("-c", "true", "--id", f"in-{queue}", "--queue", queue)
    burst("--queue", "a", "b")
    assert [show(f"in-{q}")["state"] for q in "abc"] == ["completed", "completed", "pending"]


def test_purge_forgets_edges_so_a_reused_id_cannot_release_old_dependents(fast):
    enqueue("-c", "true", "--id", "a")
    enqueue("-c", "true", "--id", "d", "--delay", "3600")
    enqueue(json.dumps({"id": "c", "command": "true", "depends_on": ["a", "d"]}))
    conn = queuectl.connect(os.environ["QUEUECTL_DB"])
    try:
        job = queuectl.claim(conn, "w", conn.claim_query([]), 30)
        assert job["id"] == "a"
        assert queuectl.record_run(conn, job, queuectl.RunResult(exit_code=0), queuectl.load_config(conn))
    finally:
        conn.close()
    assert cli("purge", "--state", "completed") == (0, "purged 1 job(s)\n", "")
    enqueue("-c", "true", "--id", "a")  # the same id again
    assert sql_rows("SELECT count(*) FROM deps WHERE depends_on = 'a'") == [(0,)]
    assert sql_rows("SELECT deps_left FROM jobs WHERE id = 'c'") == [(1,)]


def test_an_id_that_breaks_the_rules_is_simply_not_found(db):
    code, _, err = cli("show", "bad id\udc80")
    assert code == 1 and "not found" in error_line(err)


def test_a_reader_that_leaves_early_gets_no_noise(db):
    lines = "".join('{"command": "true"}\n' for _ in range(300))
    assert cli("enqueue", "-f", "-", stdin=lines.encode())[0] == 0
    result = subprocess.run(f"{sys.executable} {SCRIPT} list --json --limit 0 | head -1", shell=True,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.stdout == "[\n"
    assert result.stderr == ""


@pytest.mark.parametrize("cwd", [None, "/"])  # posix_spawn, and Popen for a job with a cwd
def test_a_job_inherits_no_fd_of_its_worker(fast, cwd, tmp_path):
    spec = {"id": "fds", "command": "ls /proc/$$/fd"}  # no pipeline: the shell opens no fd of its own
    if cwd:
        spec["cwd"] = cwd
    enqueue(json.dumps(spec))
    with open(tmp_path / "inherited", "w") as stray:  # an fd the worker gets from its parent
        result = subprocess.run([sys.executable, SCRIPT, "worker", "start", "--burst"], capture_output=True,
                                text=True, timeout=60, pass_fds=(stray.fileno(),), check=False)
    assert result.returncode == 0, result.stderr
    assert show("fds")["stdout"].split() == ["0", "1", "2"]


# ---------------------------------------------------------------------------
# Scale: nothing walks the jobs that wait for a later time
# ---------------------------------------------------------------------------
#
# Costs are counted in SQLite virtual machine steps, which do not drift with
# the machine's load: the same work beside 20,000 jobs scheduled for later
# must take about the same number of steps as beside none.

def vm_steps(conn, operation):
    """How many SQLite VM steps operation() takes on conn."""
    steps = [0]

    def count():
        steps[0] += 1
        return 0

    conn.conn.set_progress_handler(count, 1)
    try:
        operation()
    finally:
        conn.conn.set_progress_handler(None, 1)
    return steps[0]


def add_jobs(conn, specs):
    """Enqueue job objects in-process, all in one transaction (fast for thousands)."""
    config, now = queuectl.load_config(conn), time.time()
    return queuectl.enqueue_rows(conn, [queuectl.job_row(spec, config, now) for spec in specs])


def costs_of_claim_and_reads(conn):
    """VM steps of: a claim of the one due job, status's reads, `list --queue rare`, a burst check of 'rare'."""
    add_jobs(conn, [{"command": "true", "queue": "rare"}])
    supervisor = queuectl.Supervisor(conn_path(conn), 1, ["rare"], True)
    supervisor.conn = conn
    costs = {
        "status": vm_steps(conn, lambda: (queuectl.count_by_state(conn), queuectl.oldest_runnable_age_s(conn))),
        "list --queue": vm_steps(conn, lambda: queuectl.list_jobs(conn, None, "rare", 100)),
        "burst check": vm_steps(conn, supervisor.queue_is_empty),
        "claim": vm_steps(conn, lambda: queuectl.claim(conn, "w", conn.claim_query([]), 30)),
    }
    conn.execute("DELETE FROM runs WHERE job_seq IN (SELECT seq FROM jobs WHERE queue = 'rare')")
    conn.execute("DELETE FROM jobs WHERE queue = 'rare'")
    return costs


def conn_path(conn):
    """The file a connection has open."""
    return conn.execute("PRAGMA database_list").fetchone()[2]


@sqlite_only
def test_a_claim_and_status_cost_the_same_beside_20000_jobs_not_yet_due(db):
    cli("init")
    conn = queuectl.connect(db)
    try:
        empty = costs_of_claim_and_reads(conn)
        add_jobs(conn, [{"command": "true", "delay": 3600, "priority": 5} for _ in range(20_000)])
        backlog = costs_of_claim_and_reads(conn)
    finally:
        conn.close()
    for name, steps in empty.items():
        assert backlog[name] <= steps * 1.5 + 100, (name, empty, backlog)


def test_jobs_whose_time_came_are_claimed_by_priority_then_age(db):
    cli("init")
    conn = queuectl.connect(db)
    try:
        now = time.time()
        add_jobs(conn, [{"command": "true", "id": "due-later-low", "run_at": now + 0.2},
                        {"command": "true", "id": "due-later-high", "run_at": now + 0.3, "priority": 5},
                        {"command": "true", "id": "due-now"},
                        {"command": "true", "id": "far-off-high", "delay": 3600, "priority": 9}])
        query = conn.claim_query([])
        assert queuectl.claim(conn, "w", query, 30, now=now)["id"] == "due-now"
        assert queuectl.claim(conn, "w", query, 30, now=now + 0.1) is None
        order = [queuectl.claim(conn, "w", query, 30, now=now + 1)["id"] for _ in range(2)]
        assert order == ["due-later-high", "due-later-low"]
        assert queuectl.claim(conn, "w", query, 30, now=now + 1) is None
    finally:
        conn.close()


@sqlite_only
def test_a_version_2_database_is_upgraded_with_counts_per_queue_and_its_due_jobs_claimable(db):
    with contextlib.closing(sqlite3.connect(db)) as conn:  # what queuectl 1.0 with schema 2 wrote
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in queuectl.SCHEMA_V1 + queuectl.SCHEMA_V2:
            conn.execute(statement)
        for seq, (state, queue, run_at) in enumerate((("pending", "a", 0), ("pending", "b", 4e9),
                                                      ("completed", "a", 0), ("failed", "b", 0)), 1):
            conn.execute("INSERT INTO jobs (id, command, queue, priority, max_retries, timeout_s, delay_s, env, "
                         "depends_on, deps_left, state, run_at, created_at, updated_at) "
                         "VALUES (?, 'true', ?, 0, 3, 0, 0, '{}', '[]', 0, ?, ?, 0, 0)",
                         (f"j{seq}", queue, state, run_at))
        conn.execute("UPDATE job_counts SET n = (SELECT count(*) FROM jobs WHERE jobs.state = job_counts.state)")
        conn.execute("PRAGMA user_version = 2")
        conn.commit()
    assert status()["jobs"] == {"pending": 2, "processing": 0, "completed": 1, "failed": 1, "dead": 0,
                                "canceled": 0}
    code, out, _ = cli("list", "--queue", "b", "--json")
    assert code == 0 and sorted(job["id"] for job in json.loads(out)) == ["j2", "j4"]
    conn = queuectl.connect(db)
    try:
        query = conn.claim_query([])
        claimed = [queuectl.claim(conn, "w", query, 30)["id"] for _ in range(2)]
        assert (claimed, queuectl.claim(conn, "w", query, 30)) == (["j1", "j4"], None)
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# Faults: cancel + retry, ISO times on every Python, a worker that cannot start
# ---------------------------------------------------------------------------

@contextmanager
def running_then_canceled_and_retried(db, job_id="j"):
    """A job claimed by worker 'w' (30 s lease), then canceled and retried from the CLI:
    yields (conn, the claim's query, the claimed job) while its canceled run still counts as alive."""
    enqueue("-c", "true", "--id", job_id)
    with contextlib.closing(queuectl.connect(db)) as conn:
        query = conn.claim_query([])
        job = queuectl.claim(conn, "w", query, 30)
        assert cli("cancel", job_id)[0] == 0 and cli("retry", job_id)[0] == 0
        assert show(job_id)["state"] == "pending"
        yield conn, query, job


def test_a_retried_job_waits_until_its_canceled_run_is_gone(db):
    with running_then_canceled_and_retried(db) as (conn, query, job):
        assert queuectl.claim(conn, "w", query, 30) is None  # the canceled run has not ended yet
        stopped = queuectl.RunResult(exit_code=None, error="canceled")
        assert queuectl.record_run(conn, job, stopped, queuectl.load_config(conn)) is None  # its worker: gone
        assert queuectl.claim(conn, "w", query, 30)["id"] == "j"


def test_a_retried_job_whose_canceled_run_lost_its_worker_runs_once_the_lease_is_over(db):
    with running_then_canceled_and_retried(db) as (conn, query, _):
        assert queuectl.claim(conn, "w", query, 30, now=conn.now() + 10) is None
        assert queuectl.claim(conn, "w", query, 30, now=conn.now() + 31)["id"] == "j"


@pytest.mark.parametrize("text, expected", [
    ("2026-11-22T09:30:00.5Z", calendar.timegm((2026, 11, 22, 9, 30, 0)) + 0.5),
    ("2026-11-22T09:30:00.123456789Z", calendar.timegm((2026, 11, 22, 9, 30, 0)) + 0.123456789),
    ("2026-11-22T09:30:00,25+01:00", calendar.timegm((2026, 11, 22, 8, 30, 0)) + 0.25),
    ("2026-11-22 09:30Z", calendar.timegm((2026, 11, 22, 9, 30, 0))),
    ("2026-11-22T09:30:00+0530", calendar.timegm((2026, 11, 22, 4, 0, 0))),
    ("2026-11-22T09:30:00-08", calendar.timegm((2026, 11, 22, 17, 30, 0))),
    ("2026-11-22t09:30:00z", calendar.timegm((2026, 11, 22, 9, 30, 0))),
    ("2026-11-22T09Z", calendar.timegm((2026, 11, 22, 9, 0, 0))),
])
def test_iso_times_read_the_same_on_every_supported_python(text, expected):
    assert queuectl.parse_time("run_at", text) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("text", ["2026-11-22T09:30:00.Z", "2026-11-22T9:30Z", "2026-11-22T09:30:00+2400",
                                  "2026-11-22T09:30:00+01:60", "20261122T093000Z", "2026-11-22X09:30Z",
                                  "\u0662\u0660\u0662\u0666-11-22"])
def test_iso_times_outside_the_documented_forms_are_refused(text):
    with pytest.raises(queuectl.UsageError, match="run_at must be an ISO-8601 time"):
        queuectl.parse_time("run_at", text)


def test_a_worker_that_cannot_be_started_is_tried_again_while_the_others_go_on(db, capfd):
    import errno
    cli("init")

    class RefusedProcess:
        def __init__(self, **kwargs):
            pass

        def start(self):
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    supervisor = queuectl.Supervisor(db, 2, [], False)
    supervisor.conn = queuectl.connect(db, durable=False)
    supervisor.mp = type("RefusingContext", (), {"Process": RefusedProcess})()
    try:
        supervisor.fill_pool()  # raised before: the supervisor aborted every running job
        assert supervisor.workers == {}
        assert supervisor.conn.execute("SELECT 1").fetchone()[0] == 1  # connection open again
    finally:
        supervisor.conn.close()
    log = capfd.readouterr().err
    assert "could not start worker 1: Resource temporarily unavailable; trying again in 1 s" in log
    assert "could not start worker 2" in log


# ---------------------------------------------------------------------------
# The benchmark's own parts (it asserts no times, and neither do these)
# ---------------------------------------------------------------------------

@sqlite_only
def test_the_benchmark_fills_finished_jobs_that_status_counts(db):
    cli("init")
    queuectl.fill_finished_jobs(db, 1000)
    assert status()["jobs"]["completed"] == 1000
    code, out, _ = cli("list", "--json", "--limit", "2")
    assert code == 0 and [job["state"] for job in json.loads(out)] == ["completed", "completed"]


def test_the_benchmark_statistics():
    assert queuectl.median([3, 1, 2]) == 2
    assert queuectl.median([4, 1, 2, 3]) == 2.5
    assert queuectl.percentile(list(range(1, 101)), 0.95) == 95
    assert queuectl.bench_row("a", "m", "r", "t", None)[-1] == "-"
    assert queuectl.machine_description().startswith(f"machine: {os.cpu_count()} cores")


@sqlite_only
def test_an_enqueue_that_fails_while_counting_leaves_neither_job_nor_count(db, monkeypatch):
    cli("init")

    def fail_to_count(conn, rows):
        conn.execute("UPDATE job_counts SET n = n + 1 WHERE state = 'pending'")  # half done...
        raise queuectl.StorageError("database 'q.db': disk I/O error")  # ...then the disk fails

    monkeypatch.setattr(queuectl, "count_new_jobs", fail_to_count)
    code, out, err = cli("enqueue", "-c", "true", "--id", "x")
    assert (code, out) == (1, "")
    assert "disk I/O error" in error_line(err)
    assert job_count(db) == 0
    assert status()["jobs"]["pending"] == 0


@sqlite_only
def test_a_worker_that_cannot_renew_its_lease_kills_its_job_before_the_lease_runs_out(db, tmp_path):
    for key, value in (("lease_timeout", "1"), ("poll_interval", "0.05"), ("backoff_base", "0")):
        cli("config", "set", key, value)
    pid_file = tmp_path / "job.pid"
    enqueue("-c", f"echo $$ > {pid_file}; exec sleep 30", "--id", "long", "--max-retries", "0")
    workers = start_workers()
    try:
        assert wait_until(lambda: pid_file.exists() and pid_file.read_text().strip())
        job_pid = int(pid_file.read_text())
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as holder:
            holder.execute("BEGIN IMMEDIATE")  # no renewal can get through now
            locked_at = time.monotonic()
            assert wait_until(lambda: not queuectl.pid_exists(job_pid), timeout=3)
            died_after_s = time.monotonic() - locked_at
            holder.execute("ROLLBACK")
        assert died_after_s < 1.0  # before a lease of 1 s taken before the lock could run out
        assert wait_until(lambda: show("long")["state"] == "dead")
        assert "lease" in show("long")["last_error"]
    finally:
        os.killpg(workers.pid, signal.SIGTERM)
        workers.wait(10)


def test_a_claim_given_back_leaves_the_job_exactly_as_it_was(fast):
    enqueue("-c", "exit 3", "--id", "f", "--max-retries", "5")
    conn = queuectl.connect(os.environ["QUEUECTL_DB"])
    try:
        query, config = conn.claim_query([]), queuectl.load_config(conn)
        queuectl.record_run(conn, queuectl.claim(conn, "w", query, 30),
                            queuectl.RunResult(exit_code=3, error="exit status 3"), config)
        before = show("f")
        job = queuectl.claim(conn, "w", query, 30)
        assert show("f")["state"] == "processing"
        queuectl.give_back(conn, job)
    finally:
        conn.close()
    assert show("f") == before  # state failed, attempts 1, last_error, started_at: as they were


def test_a_supervisor_started_under_nohup_ignores_sighup(fast):
    workers = subprocess.Popen(["nohup", sys.executable, SCRIPT, "worker", "start"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_until(lambda: len(status()["workers"]) == 1)
        os.kill(workers.pid, signal.SIGHUP)
        enqueue("-c", "true", "--id", "after-hup")
        assert wait_until(lambda: show("after-hup")["state"] == "completed")
        assert workers.poll() is None
    finally:
        os.killpg(workers.pid, signal.SIGTERM)
        assert workers.wait(10) == 0


def test_a_supervisor_stops_gracefully_on_sighup(fast):
    workers = start_workers()
    assert wait_until(lambda: len(status()["workers"]) == 1)
    os.kill(workers.pid, signal.SIGHUP)
    assert workers.wait(10) == 0


@sqlite_only
def test_readers_do_not_wait_out_a_lock_to_reap_leases(db, monkeypatch):
    enqueue("-c", "true", "--id", "x")
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as holder:
        holder.execute("UPDATE jobs SET state = 'processing', lease_until = 1, lease_token = 't', last_run = 1")
        holder.execute("INSERT INTO runs (job_seq, run, attempt, started_at, outcome) SELECT seq, 1, 1, 0, 'running' "
                       "FROM jobs")
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        result = run("status", "--json", env={**os.environ, "QUEUECTL_BUSY_TIMEOUT": "5"})
        took_s = time.monotonic() - started
        holder.execute("ROLLBACK")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["jobs"]["processing"] == 1  # shown as it is; reaped next time
    assert took_s < 4  # it did not sit out the 5 s busy timeout


# ---------------------------------------------------------------------------
# Faults: each pinned by a test that failed before its fix
# ---------------------------------------------------------------------------

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/locks and forks workers the Linux way (start method fork)")


def posix_lock_holders(path, byte):
    """The pids holding a POSIX lock on one byte of the file at path, read from /proc/locks."""
    st = os.stat(path)
    holders = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if fields[1] == "->":  # a waiter: "1: -> POSIX ADVISORY ..."
                continue
            if fields[1] == "POSIX" and int(fields[5].rsplit(":", 1)[1]) == st.st_ino \
                    and fields[6:8] == [str(byte), str(byte)]:
                holders.add(int(fields[4]))
    return holders


def lines_of(path):
    """The lines of a file a job appends to; [] while it is missing."""
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


@linux_only
@sqlite_only
def test_a_forked_worker_holds_its_own_posix_lock_on_the_shm_file(fast, pool):
    proc = pool("--count", "1")
    assert wait_until(lambda: pids_of("worker")), log_text(proc)
    (worker_pid,) = pids_of("worker")

    # In WAL mode every connection read-locks the -shm file's dead-man-switch
    # byte (128) for as long as it is open; a worker that inherited its parent's
    # connection state never takes it. (The read-mark bytes below it are locked
    # only during a read, by either.)
    assert wait_until(lambda: worker_pid in posix_lock_holders(fast + "-shm", 128), timeout=5), \
        (worker_pid, posix_lock_holders(fast + "-shm", 128), log_text(proc))


@linux_only
@sqlite_only
def test_a_job_whose_supervisor_was_sigkilled_is_still_recorded_after_a_reader_came_and_went(fast, pool):
    (job_id,) = enqueue("-c", "sleep 3; echo done", "--id", "orphaned")
    proc = pool("--count", "1")
    assert wait_until(lambda: show(job_id)["state"] == "processing"), log_text(proc)

    os.kill(proc.pid, signal.SIGKILL)  # the supervisor only: its worker lives on and finishes the job
    proc.wait(timeout=10)
    reader = run("status")  # were it the only lock holder, closing it would delete q.db-wal and -shm
    assert reader.returncode == 0, reader.stderr

    assert wait_until(lambda: show(job_id)["state"] != "processing", timeout=15), log_text(proc)
    job = show(job_id)
    assert (job["state"], job["attempts"], job["stdout"]) == ("completed", 1, "done\n"), job


def test_a_canceled_then_retried_job_starts_again_only_after_its_first_run_is_gone(fast, pool, tmp_path):
    pids, overlaps = tmp_path / "pids", tmp_path / "overlaps"
    command = ('if [ -s pids ] && kill -0 "$(head -n1 pids)" 2>/dev/null; then echo overlap >> overlaps; fi; '
               "echo $$ >> pids; trap '' TERM; exec sleep 8")  # exec: one process, that ignores SIGTERM
    (job_id,) = enqueue("-c", command, "--id", "twice")
    proc = pool("--count", "2")
    assert wait_until(lambda: show(job_id)["state"] == "processing" and len(lines_of(pids)) == 1), log_text(proc)

    assert cli("cancel", job_id)[0] == 0
    assert cli("retry", job_id)[0] == 0  # the first run ignores SIGTERM: only a SIGKILL ends it

    assert wait_until(lambda: len(lines_of(pids)) == 2, timeout=20), log_text(proc)
    assert not overlaps.exists(), f"the second run started while the first ({lines_of(pids)[0]}) was alive"
    cli("cancel", job_id)


def test_a_later_stop_with_a_shorter_grace_is_not_silenced_by_an_earlier_one():
    run = queuectl.CommandRun("trap '' TERM; sleep 30", dict(os.environ), None, 0, 65536)
    assert run.start() is None
    ticks = []

    def on_tick():  # returns when to tick next
        ticks.append(len(ticks))
        if len(ticks) == 1:
            run.stop("timed out", 30.0)
        elif len(ticks) == 3:
            run.stop("its lease was taken over", 0)
        return 0.05

    gave_up = threading.Event()

    def give_up():  # so a failure takes 10 s, not the 30 s grace
        gave_up.set()
        kill_group(run.proc.pid)

    rescue = threading.Timer(10.0, give_up)
    rescue.start()
    try:
        result = run.wait(0.05, on_tick)
    finally:
        rescue.cancel()
        kill_group(run.proc.pid)
    assert not gave_up.is_set(), "the second stop (grace 0) waited for the first one's 30 s grace"
    assert "SIGKILL" in result.error, result.error


@sqlite_only
def test_a_finished_result_is_recorded_after_a_lock_longer_than_the_busy_timeout(fast, pool, monkeypatch):
    monkeypatch.setenv("QUEUECTL_BUSY_TIMEOUT", "0.3")  # the pool inherits it
    (job_id,) = enqueue("-c", "sleep 1; echo ok", "--id", "held")
    proc = pool("--count", "1")
    assert wait_until(lambda: show(job_id)["state"] == "processing"), log_text(proc)
    workers_before = pids_of("worker")

    with contextlib.closing(sqlite3.connect(fast, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")
        time.sleep(3)  # the fault: the job ends and its result waits for this lock, 10 busy timeouts long
        holder.execute("ROLLBACK")

    assert wait_until(lambda: show(job_id)["state"] != "processing", timeout=10), log_text(proc)
    job = show(job_id)
    assert (job["state"], job["attempts"], job["stdout"]) == ("completed", 1, "ok\n"), (job, log_text(proc))
    log = log_text(proc)
    assert not any(word in log for word in ("stopped:", "died", "crashed")), log
    assert pids_of("worker") == workers_before, log


def test_renewals_follow_a_lease_timeout_shortened_while_the_job_runs(db, pool):
    config_set("backoff_base", "0")
    config_set("poll_interval", "3")
    (job_id,) = enqueue("-c", "sleep 6", "--id", "long", "--max-retries", "0")
    proc = pool("--count", "1")
    assert wait_until(lambda: show(job_id)["state"] == "processing"), log_text(proc)

    config_set("lease_timeout", "2")

    assert wait_until(lambda: show(job_id)["state"] != "processing", timeout=15), log_text(proc)
    job = show(job_id)
    assert (job["state"], job["attempts"], job["last_error"]) == ("completed", 1, None), job["last_error"]


@sqlite_only
def test_readers_answer_at_once_while_a_stale_worker_row_waits_behind_a_lock(db):
    assert cli("init")[0] == 0
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as holder:
        holder.execute("""INSERT INTO workers (id, kind, supervisor_id, host, pid, queues, started_at, heartbeat_at)
                          VALUES ('stale', 'worker', NULL, ?, ?, '[]', 1000, 1000)""",
                       (queuectl.HOST, 2**22 + 12345))  # above any pid_max: no such process
        holder.execute("BEGIN IMMEDIATE")
        env = {**os.environ, "QUEUECTL_BUSY_TIMEOUT": "30"}
        try:
            status_run = run("status", "--json", env=env, timeout=10)
            list_run = run("worker", "list", "--json", env=env, timeout=10)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"{e.cmd[2:]} waited for the lock to drop the stale row")
        finally:
            holder.execute("ROLLBACK")
    assert (status_run.returncode, status_run.stderr) == (0, "")
    assert json.loads(status_run.stdout)["workers"] == []
    assert (list_run.returncode, list_run.stderr) == (0, "")
    assert json.loads(list_run.stdout) == []


def test_text_the_terminal_cannot_encode_is_no_internal_error(fast):
    (job_id,) = enqueue("-c", "echo 'café …'", "--id", "cafe")
    burst()
    env = {**os.environ, "PYTHONIOENCODING": "latin-1"}  # '…' is not in latin-1

    for argv in (["list"], ["show", job_id], ["logs", job_id]):
        result = subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, env=env, timeout=60,
                                check=False)
        assert result.returncode == 0, (argv, result.stderr)
        assert b"Traceback" not in result.stderr and b"queuectl: error" not in result.stderr, (argv, result.stderr)
        if argv[0] == "logs":
            assert result.stdout == "café …\n".encode(), result.stdout  # the job's raw UTF-8 output


@pytest.mark.parametrize("value", ["nan", "1e400", "-1", "abc"])
def test_a_busy_timeout_that_is_not_a_number_of_seconds_is_refused(db, monkeypatch, value):
    monkeypatch.setenv("QUEUECTL_BUSY_TIMEOUT", value)
    code, _, err = cli("status")
    assert (code, err) == (
        2, f"queuectl: error: QUEUECTL_BUSY_TIMEOUT must be a number of seconds from 0 to 86400, got '{value}'\n")


@pytest.mark.parametrize("environment", ["set", "unset"])
def test_an_empty_db_flag_is_refused_and_creates_nothing(db, tmp_path, monkeypatch, environment):
    if environment == "unset":
        monkeypatch.delenv("QUEUECTL_DB")
    code, _, err = cli("--db", "", "status")
    assert (code, err) == (2, "queuectl: error: --db must name a database file, got ''\n")
    assert not (tmp_path / "queuectl.db").exists()


OPEN_CLOSE_LOOP = """
import sys
sys.path.insert(0, sys.argv[1])
import queuectl
for _ in range(int(sys.argv[3])):
    try:
        conn = queuectl.connect(sys.argv[2])
        conn.execute("SELECT 1")
        conn.close()
    except Exception as e:
        print(repr(e), flush=True)
"""


@sqlite_only
def test_opening_the_database_never_fails_because_another_connection_just_closed(db):
    assert cli("init")[0] == 0
    # Measured on the old check: 1 to 9 of these 9,000 opens failed, in each of 12 runs.
    threads_n, processes_n, iterations = 2, 4, 1500
    processes = [subprocess.Popen([sys.executable, "-c", OPEN_CLOSE_LOOP, str(HERE), db, str(iterations)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(processes_n)]
    errors = []

    def open_and_close():
        for _ in range(iterations):
            try:
                conn = queuectl.connect(db)
                conn.execute("SELECT 1")
                conn.close()
            except queuectl.QueueError as e:
                errors.append(repr(e))

    threads = [threading.Thread(target=open_and_close) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for process in processes:
        out, _ = process.communicate(timeout=60)
        errors.extend(out.splitlines())
        assert process.returncode == 0, out
    assert errors == [], f"{len(errors)} of {(threads_n + processes_n) * iterations} opens failed: {errors[:3]}"


# ---------------------------------------------------------------------------
# Many hosts (PostgreSQL): supervisors that see different host names
# ---------------------------------------------------------------------------
#
# Each "host" is a supervisor in a UTS namespace of its own (`unshare --uts`,
# root only), so its HOST differs while the process table is shared: liveness
# across hosts can then only come from heartbeats, as on real machines.

many_hosts = pytest.mark.skipif(
    PG_URL is None or shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs PostgreSQL (QUEUECTL_TEST_PG), unshare and root")


def on_host(host, *argv, log_path, env=None):
    """Start `queuectl ARGV` as if on another machine named host; its process group leader."""
    command = f"hostname {shlex.quote(host)} && exec {shlex.quote(sys.executable)} {shlex.quote(SCRIPT)} " \
              + " ".join(shlex.quote(str(a)) for a in argv)
    with open(log_path, "w") as log_file:
        return subprocess.Popen(["unshare", "--uts", "sh", "-c", command], stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env)


@many_hosts
def test_two_hosts_share_400_jobs_and_run_each_exactly_once(fast, tmp_path):
    runs = tmp_path / "runs.log"
    enqueue_lines(jsonl(*({"id": f"j{i}", "command": f'echo "$QUEUECTL_JOB_ID $(hostname)" >> {runs}'}
                          for i in range(400))))
    hosts = [on_host(host, "worker", "start", "--count", 2, "--burst", log_path=tmp_path / f"{host}.log")
             for host in ("host-a", "host-b")]
    try:
        for proc in hosts:
            assert proc.wait(timeout=120) == 0, (tmp_path / "host-a.log").read_text()
    finally:
        for proc in hosts:
            kill_group(proc.pid)
    lines = runs.read_text().split("\n")[:-1]
    ran = collections.Counter(line.split()[0] for line in lines)
    assert ran == {f"j{i}": 1 for i in range(400)}
    assert {line.split()[1] for line in lines} == {"host-a", "host-b"}  # both took their share
    assert job_states()["completed"] == 400


@many_hosts
def test_a_host_killed_whole_is_recovered_by_the_other_within_the_lease(fast, tmp_path):
    config_set("lease_timeout", "2")
    pid_file = tmp_path / "first.pid"
    enqueue("-c", f'if [ "$QUEUECTL_ATTEMPT" = 1 ]; then echo $$ > {pid_file}; exec sleep 60; fi',
            "--id", "j", "--max-retries", "1")
    host_a = on_host("host-a", "worker", "start", log_path=tmp_path / "host-a.log")
    host_b = None
    try:
        assert wait_until(lambda: read_pid(pid_file), timeout=20)
        host_b = on_host("host-b", "worker", "start", log_path=tmp_path / "host-b.log")
        assert wait_until(lambda: {p["host"] for p in worker_list()} >= {"host-a", "host-b"}, timeout=20)
        kill_group(host_a.pid)  # the whole host: supervisor and worker, no goodbye
        killed_at = time.monotonic()
        kill_group(read_pid(pid_file))  # its orphaned job too (jobs run in sessions of their own)
        assert wait_until(lambda: show("j")["state"] == "completed", timeout=20)
        took_s = time.monotonic() - killed_at
        assert took_s <= 2 + 2.5, f"host-b took {took_s:.1f} s to recover the job (lease_timeout 2)"
        assert show("j")["attempts"] == 2  # the lost run counted, then the retry on host-b
        assert wait_until(lambda: {p["host"] for p in worker_list()} == {"host-b"}, timeout=5)  # once its beat is old
    finally:
        kill_group(host_a.pid)
        if host_b is not None:
            kill_group(host_b.pid)


@many_hosts
def test_worker_stop_on_one_host_stops_the_supervisors_of_every_host(fast, tmp_path):
    hosts = [on_host(host, "worker", "start", log_path=tmp_path / f"{host}.log") for host in ("host-a", "host-b")]
    try:
        assert wait_until(lambda: {p["host"] for p in worker_list() if p["kind"] == "supervisor"}
                          == {"host-a", "host-b"}, timeout=20)
        stopper = on_host("host-a", "worker", "stop", "--timeout", 20, log_path=tmp_path / "stop.log")
        assert stopper.wait(timeout=30) == 0, (tmp_path / "stop.log").read_text()
        assert "stopped 2 supervisor(s)" in (tmp_path / "stop.log").read_text()
        for proc in hosts:
            assert proc.wait(timeout=10) == 0
    finally:
        for proc in hosts:
            kill_group(proc.pid)


# ---------------------------------------------------------------------------
# PostgreSQL: connecting, refusing, reconnecting
# ---------------------------------------------------------------------------

needs_pg = pytest.mark.skipif(PG_URL is None, reason="needs PostgreSQL (QUEUECTL_TEST_PG)")


def test_sqlite_never_imports_psycopg(db):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import queuectl; "
            "assert queuectl.main(['--db', sys.argv[2], 'enqueue', '-c', 'true']) == 0; "
            "assert queuectl.main(['--db', sys.argv[2], 'status']) == 0; "
            "assert 'psycopg' not in sys.modules, 'psycopg was imported'")
    result = subprocess.run([sys.executable, "-c", code, str(HERE), "plain.db"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_a_postgresql_url_without_psycopg_is_one_line_exit_1(db, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "psycopg", None)  # as if it were not installed
        code, out, err = cli("--db", "postgresql://someone@127.0.0.1:5432/queue", "status")
    assert (code, out) == (1, "")
    assert error_line(err) == ('queuectl: error: a postgresql database needs the psycopg package: '
                               'python3 -m pip install "psycopg[binary]"')


def test_an_unreachable_server_is_one_line_exit_1_and_never_shows_the_password(db):
    pytest.importorskip("psycopg")
    result = run("--db", "postgresql://alice:s3cret-pw@127.0.0.1:1/queue", "status")
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert line.startswith("queuectl: error: cannot connect to postgresql://alice@127.0.0.1:1/queue: "), line
    assert "s3cret-pw" not in result.stderr + result.stdout


@needs_pg
def test_a_refused_login_and_a_missing_database_are_one_line_exit_1(db):
    from urllib.parse import urlsplit
    parts = urlsplit(PG_URL)
    wrong_password = PG_URL.replace(f":{parts.password}@", ":not-the-password@")
    result = run("--db", wrong_password, "status")
    assert result.returncode == 1
    assert "password authentication failed" in error_line(result.stderr)
    assert "not-the-password" not in result.stderr
    missing = PG_URL.rsplit("/", 1)[0] + "/no_such_database_here"
    result = run("--db", missing, "status")
    assert result.returncode == 1
    assert 'database "no_such_database_here" does not exist' in error_line(result.stderr)
    assert f":{parts.password}@" not in result.stderr


@needs_pg
def test_status_reads_kept_counts_on_postgresql_and_a_version_6_database_gets_them(fast):
    for command in ("true", "true", "false"):
        enqueue("-c", command, "--max-retries", "0")
    assert cli("queue", "pause", "later")[0] == 0
    enqueue("-c", "true", "--queue", "later")
    burst()
    import psycopg
    with psycopg.connect(PG_URL, autocommit=True) as conn:  # back to version 6: counted, not kept
        conn.execute(f'SET search_path TO "{os.environ["QUEUECTL_PG_SCHEMA"]}"')
        conn.execute("DROP TABLE job_counts, job_count_changes")
        conn.execute("DROP TRIGGER job_counts_on_update ON jobs")
        conn.execute("DROP TRIGGER job_counts_on_delete ON jobs")
        conn.execute("DROP FUNCTION count_state_change, count_deleted_jobs")
        conn.execute("ALTER TABLE jobs DROP COLUMN has_dependents")  # version 8's
        conn.execute("DROP INDEX jobs_finished, runs_by_finish")  # version 9's
        conn.execute("DROP TABLE hook_events")
        conn.execute("UPDATE meta SET version = 6")
    assert status()["jobs"] == {"pending": 1, "processing": 0, "completed": 2, "failed": 0, "dead": 1, "canceled": 0}
    assert sql_rows("SELECT version FROM meta") == [(queuectl.SCHEMA_VERSION,)]
    # Every way a count changes, each checked against a real count by the db fixture at the end:
    assert cli("dlq", "retry", "--all")[0] == 0
    assert cli("cancel", enqueue("-c", "true", "--queue", "later")[0])[0] == 0
    burst()
    assert cli("purge", "--state", "completed,canceled")[0] == 0
    assert status()["jobs"] == {"pending": 1, "processing": 0, "completed": 0, "failed": 0, "dead": 1, "canceled": 0}


@needs_pg
def test_folding_the_counts_from_two_connections_at_once_moves_each_change_once(fast):
    for _ in range(3):
        enqueue("-c", "true")
    burst()
    conns = [queuectl.connect(PG_URL) for _ in range(2)]
    try:
        start = threading.Barrier(2)

        def fold(conn):
            start.wait()
            for _ in range(20):
                conn.fold_counts()

        threads = [threading.Thread(target=fold, args=(conn,)) for conn in conns]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for conn in conns:
            conn.close()
    assert sql_rows("SELECT count(*) FROM job_count_changes") == [(0,)]
    assert status()["jobs"]["completed"] == 3


@needs_pg
def test_the_tables_live_in_their_own_schema_and_a_foreign_one_is_refused(db, monkeypatch):
    assert cli("init")[0] == 0
    schema = os.environ["QUEUECTL_PG_SCHEMA"]
    assert {r[0] for r in sql_rows("SELECT tablename FROM pg_tables WHERE schemaname = :s", {"s": schema})} \
        >= {"jobs", "deps", "config", "workers", "meta"}
    assert sql_rows("SELECT version FROM meta") == [(queuectl.SCHEMA_VERSION,)]
    import psycopg
    other = f"{schema}_app"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{other}"')
        conn.execute(f'CREATE TABLE "{other}".invoices (id int)')
    try:
        monkeypatch.setenv("QUEUECTL_PG_SCHEMA", other)
        code, _, err = cli("status")
        assert code == 1
        assert error_line(err).endswith(f"schema '{other}' of {queuectl.redacted_url(PG_URL)} holds other tables "
                                        "(invoices); name another one with $QUEUECTL_PG_SCHEMA")
    finally:
        drop_pg_schema(other)


@needs_pg
def test_a_schema_name_that_is_not_an_identifier_is_exit_2(db, monkeypatch):
    monkeypatch.setenv("QUEUECTL_PG_SCHEMA", 'x"; DROP TABLE jobs; --')
    code, _, err = cli("status")
    assert code == 2
    assert "QUEUECTL_PG_SCHEMA must be 1-63 letters, digits or _" in error_line(err)


@needs_pg
def test_a_worker_whose_connection_is_cut_reconnects_and_records_its_job(fast, pool):
    import psycopg
    enqueue("-c", "sleep 1.5; echo done", "--id", "j")
    workers = pool()
    assert wait_until(lambda: show("j")["state"] == "processing", timeout=20)
    app = f"queuectl {os.environ['QUEUECTL_PG_SCHEMA']}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        cut = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE application_name = %s AND pid <> pg_backend_pid()", (app,)).fetchone()[0]
    assert cut >= 2  # the supervisor's and the worker's connections
    assert wait_until(lambda: show("j")["state"] == "completed", timeout=20), log_text(workers)
    assert show("j")["attempts"] == 1 and show("j")["stdout"] == "done\n"
    enqueue("-c", "echo after", "--id", "after")  # the pool goes on working
    assert wait_until(lambda: show("after")["state"] == "completed", timeout=20), log_text(workers)
    assert workers.poll() is None


def test_the_fence_watch_kills_a_job_while_the_worker_is_stuck_in_a_call():
    run = queuectl.CommandRun("exec sleep 30", dict(os.environ), None, 0, 65536)
    assert run.start() is None
    try:
        run.fence_at = time.monotonic() + 0.2
        run.watch_the_fence()
        # The worker's loop is stuck (a database call that hangs): nobody reads the pipes or the clock.
        assert wait_until(lambda: run.proc.poll() is not None, timeout=10)
        assert run.proc.poll() == -signal.SIGKILL
        assert run.stop_reason == "killed: its lease could not be renewed in time"
    finally:
        queuectl.kill_group(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
        run.fence_watch_done.set()
        run.proc.close_pipes()


def test_a_postgresql_url_with_an_unencoded_at_in_the_password_is_exit_2_and_shows_none_of_it(db):
    pytest.importorskip("psycopg")
    code, out, err = cli("--db", "postgresql://alice:p@ssW0rdX@127.0.0.1:1/queue", "status")
    assert (code, out) == (2, "")
    assert error_line(err) == ("queuectl: error: the PostgreSQL URL has more than one '@' before the host; "
                               "write an '@' in the user name or password as %40")
    assert "ssW0rdX" not in err


@needs_pg
def test_a_schema_name_of_postgresqls_own_is_exit_2(db, monkeypatch):
    monkeypatch.setenv("QUEUECTL_PG_SCHEMA", "pg_mine")
    code, _, err = cli("status")
    assert code == 2
    assert "(not pg_), got 'pg_mine'" in error_line(err)


# ---------------------------------------------------------------------------
# Round trips: a claim, and the end of a job, in one statement each
# ---------------------------------------------------------------------------

def counting_round_trips(conn, monkeypatch):
    """A list that grows by an entry for each round trip conn makes: a statement, a BEGIN, a COMMIT."""
    trips = []

    def counting(method):
        def counted(*args, **kwargs):
            trips.append(" ".join(args[0].split())[:60])
            return method(*args, **kwargs)
        return counted

    for name in ("execute", "executemany"):
        monkeypatch.setattr(conn, name, counting(getattr(conn, name)))
    transaction = conn.transaction

    @contextmanager
    def counted_transaction():
        trips.append("BEGIN")
        with transaction():
            yield conn
        trips.append("COMMIT")

    monkeypatch.setattr(conn, "transaction", counted_transaction)
    return trips


def dependency_flags(conn):
    """{job id: has_dependents}."""
    return {row[0]: row[1] for row in conn.execute("SELECT id, has_dependents FROM jobs")}


@needs_pg
def test_on_postgresql_a_claim_and_the_end_of_a_job_without_dependents_are_one_round_trip_each(db, monkeypatch):
    cli("init")
    conn = queuectl.connect(db)
    try:
        now = time.time()
        add_jobs(conn, [{"command": "true", "id": "due"}, {"command": "false", "id": "fails", "priority": -1},
                        {"command": "true", "id": "came-due", "run_at": now + 0.5, "priority": 1}])
        query, config = conn.claim_query([]), queuectl.load_config(conn)
        trips = counting_round_trips(conn, monkeypatch)
        ends = {"due": "completed", "fails": "failed", "came-due": "completed"}
        for expected in ("came-due", "due", "fails"):  # the one whose time came was never marked due
            job = queuectl.claim(conn, "w", query, 30, now=now + 1)
            assert (job["id"], trips) == (expected, [trips[0]])
            trips.clear()
            result = queuectl.RunResult(exit_code=0) if ends[expected] == "completed" else \
                queuectl.RunResult(exit_code=1, error="exit status 1")
            assert queuectl.record_run(conn, job, result, config) == ends[expected]
            assert len(trips) == 1, trips
            trips.clear()
    finally:
        conn.close()
    assert {job_id: show(job_id)["state"] for job_id in ends} == ends
    assert [run["outcome"] for run in show("fails")["runs"]] == ["failed"]


@needs_pg
def test_a_dependent_added_while_its_dependencys_end_is_recorded_is_released_by_that_end(db):
    import psycopg
    cli("init")
    worker_conn, enqueuer = queuectl.connect(db), queuectl.connect(db)
    try:
        add_jobs(worker_conn, [{"command": "true", "id": "dep"}])
        job = queuectl.claim(worker_conn, "w", worker_conn.claim_query([]), 30)
        config, ended = queuectl.load_config(worker_conn), []
        recorder = threading.Thread(target=lambda: ended.append(
            queuectl.record_run(worker_conn, job, queuectl.RunResult(exit_code=0), config)))
        queuectl.mark_dependencies(enqueuer, {"dep"})
        with enqueuer.transaction(), psycopg.connect(PG_URL, autocommit=True) as observer:
            child = queuectl.job_row({"command": "true", "id": "child", "depends_on": ["dep"]}, config, time.time())
            queuectl.insert_job_rows(enqueuer, [child])  # counts dep as running: deps_left 1
            recorder.start()
            # The end waits for this enqueue to commit, instead of completing dep past it.
            assert wait_until(lambda: observer.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()[0] == 1)
        recorder.join(10)
        assert ended == ["completed"]
        assert worker_conn.execute("SELECT deps_left FROM jobs WHERE id = 'child'").fetchone()[0] == 0
    finally:
        worker_conn.close()
        enqueuer.close()
    code, out, _ = cli("why", "child", "--json")
    assert code == 0 and "waiting_on_dependency" not in out


def test_an_enqueue_marks_the_jobs_its_jobs_depend_on_and_only_those(db, tmp_path):
    enqueue("-c", "true", "--id", "stored")
    enqueue("-c", "true", "--id", "other")
    lines = [{"id": "first", "command": "true"}, {"id": "second", "command": "true", "depends_on": ["first", "stored"]}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli("enqueue", "-f", str(tmp_path / "jobs.jsonl"))[0] == 0
    with contextlib.closing(queuectl.connect(db)) as conn:
        assert dependency_flags(conn) == {"stored": 1, "other": 0, "first": 1, "second": 0}


def test_a_version_7_database_is_upgraded_with_the_jobs_that_have_dependents_marked(db, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(queuectl, "SCHEMA_VERSION", 7)
        with contextlib.closing(queuectl.connect(db)) as conn, conn.transaction():
            for job_id, deps_left in (("parent", 0), ("child", 1), ("lone", 0)):
                conn.execute("INSERT INTO jobs (id, command, queue, priority, max_retries, timeout_s, delay_s, env, "
                             "depends_on, deps_left, state, run_at, is_due, created_at, updated_at) "
                             "VALUES (?, 'true', 'default', 0, 3, 0, 0, '{}', '[]', ?, 'pending', 0, 1, 0, 0)",
                             (job_id, deps_left))
            conn.execute("INSERT INTO deps (depends_on, job_id) VALUES ('parent', 'child')")
            queuectl.count_new_jobs(conn, [{"queue": "default", "state": "pending"}] * 3)
    with contextlib.closing(queuectl.connect(db)) as conn:
        assert dependency_flags(conn) == {"parent": 1, "child": 0, "lone": 0}
        job = queuectl.claim(conn, "w", conn.claim_query([]), 30)
        assert queuectl.record_run(conn, job, queuectl.RunResult(exit_code=0), queuectl.load_config(conn)) == "completed"
        assert conn.execute("SELECT deps_left FROM jobs WHERE id = 'child'").fetchone()[0] == 0


def test_jobs_whose_time_came_and_were_not_taken_are_marked_due_after_the_claim(db):
    cli("init")
    with contextlib.closing(queuectl.connect(db)) as conn:
        now = time.time()
        add_jobs(conn, [{"command": "true", "id": f"later-{i}", "run_at": now + 0.5, "priority": i} for i in range(3)])
        assert queuectl.claim(conn, "w", conn.claim_query([]), 30, now=now + 1)["id"] == "later-2"
        assert {row[0]: row[1] for row in conn.execute("SELECT id, is_due FROM jobs WHERE state = 'pending'")} == {
            "later-0": 1, "later-1": 1}


def test_a_claim_ranks_every_job_whose_time_came_even_more_than_one_statement_looks_at(db):
    cli("init")
    with contextlib.closing(queuectl.connect(db)) as conn:
        now, many = time.time(), queuectl.ONE_STATEMENT_BATCH + 20
        add_jobs(conn, [{"command": "true", "id": f"came-{i}", "run_at": now + 0.1 + i / 1000,
                         "priority": 5 if i == many - 1 else 0} for i in range(many)])
        assert queuectl.claim(conn, "w", conn.claim_query([]), 30, now=now + 1)["id"] == f"came-{many - 1}"
        assert queuectl.claim(conn, "w", conn.claim_query([]), 30, now=now + 1)["id"] == "came-0"


@needs_pg
def test_a_claimed_job_is_kept_when_marking_the_others_due_fails_after_the_claim(db, monkeypatch):
    cli("init")
    with contextlib.closing(queuectl.connect(db)) as conn:
        now = time.time()
        add_jobs(conn, [{"command": "true", "id": f"came-{i}", "run_at": now + 0.1, "priority": i} for i in range(3)])

        def connection_lost(conn, now):
            raise queuectl.StorageError("lost the connection to the database", "lost")

        monkeypatch.setattr(queuectl, "promote_due_jobs", connection_lost)
        job = queuectl.claim(conn, "w", conn.claim_query([]), 30, now=now + 1)
    assert job["id"] == "came-2"
    assert show("came-2")["state"] == "processing"
    assert sql_rows("SELECT lease_token FROM jobs WHERE id = 'came-2'") == [(job["lease_token"],)]


@needs_pg
def test_a_claimer_that_finds_the_jobs_whose_time_came_held_by_another_looks_again_the_long_way(db, monkeypatch):
    cli("init")
    first, second = queuectl.connect(db), queuectl.connect(db)
    try:
        now = time.time()
        add_jobs(first, [{"command": "true", "id": "ready-low"},
                         {"command": "true", "id": "came-high", "run_at": now + 0.1, "priority": 5}])
        held = first.transaction()  # the first claimer's statement, its locks held until we say
        held.__enter__()
        assert queuectl.claim(first, "w1", first.claim_query([]), 30, now=now + 1)["id"] == "came-high"
        real_promote = queuectl.promote_due_jobs

        def first_claimer_commits_then_promote(conn, now):
            if held is not None:
                held.__exit__(None, None, None)
            real_promote(conn, now)

        monkeypatch.setattr(queuectl, "promote_due_jobs", first_claimer_commits_then_promote)
        # Both rows were held when the second claimer looked: it looks again, not idles.
        assert queuectl.claim(second, "w2", second.claim_query([]), 30, now=now + 1)["id"] == "ready-low"
        held = None
    finally:
        first.close()
        second.close()


@needs_pg
def test_an_enqueue_of_dependents_never_deadlocks_with_a_command_locking_them_in_another_order(db):
    import psycopg
    enqueue("-c", "true", "--id", "a")
    enqueue("-c", "true", "--id", "b")
    with psycopg.connect(PG_URL, autocommit=True) as other, psycopg.connect(PG_URL, autocommit=True) as observer:
        other.execute(f'SET search_path TO "{os.environ["QUEUECTL_PG_SCHEMA"]}"')
        with other.transaction():  # as `cancel b a` does: b locked, then a
            other.execute("SELECT 1 FROM jobs WHERE id = 'b' FOR UPDATE")
            enqueuer = subprocess.Popen([sys.executable, SCRIPT, "enqueue", "-c", "true", "--id", "d",
                                         "--after", "a", "--after", "b"], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
            assert wait_until(lambda: observer.execute(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'").fetchone()[0] >= 1)
            other.execute("SELECT 1 FROM jobs WHERE id = 'a' FOR UPDATE")  # a's mark is not held meanwhile
        out, err = enqueuer.communicate(timeout=30)
    assert (enqueuer.returncode, out, err) == (0, "d\n", "")
    with contextlib.closing(queuectl.connect(db)) as conn:
        assert dependency_flags(conn) == {"a": 1, "b": 1, "d": 0}


@needs_pg
def test_the_benchmarks_delay_proxy_carries_a_session_and_holds_each_answer_back(db):
    import psycopg
    cli("init")
    with queuectl.DelayProxy(PG_URL, 0.05) as far_url:
        assert "127.0.0.1" in far_url and far_url != PG_URL
        with psycopg.connect(far_url, autocommit=True) as conn:
            started = time.monotonic()
            assert conn.execute("SELECT 41 + 1").fetchone()[0] == 42
            assert time.monotonic() - started >= 0.05  # the delay is a floor, not a speed
        assert cli("--db", far_url, "enqueue", "-c", "true", "--id", "through")[0] == 0
    assert show("through")["state"] == "pending"


# ---------------------------------------------------------------------------
# Runs: every run kept, with its outcome and its own output
# ---------------------------------------------------------------------------

RUN_FIELDS = {"run", "attempt", "worker", "host", "started_at", "finished_at", "exit_code", "error", "outcome",
              "stdout_bytes", "stderr_bytes"}


def runs_of(job_id):
    """The `runs` array of `show ID --json`."""
    return show(job_id)["runs"]


def gate(name="go"):
    """A shell loop that waits until the file name exists (in the job's directory)."""
    return f"while [ ! -e {name} ]; do sleep 0.02; done"


def test_each_run_is_kept_with_every_field_its_attempt_outcome_exit_code_and_byte_counts(fast):
    command = 'echo "attempt $QUEUECTL_ATTEMPT"; printf ab >&2; [ "$QUEUECTL_ATTEMPT" -ge 3 ] || exit 4'
    enqueue("-c", command, "--id", "j", "--max-retries", "3")
    burst()
    job = show("j")
    assert (job["state"], job["attempts"]) == ("completed", 3)
    runs = job["runs"]
    assert [set(run) >= RUN_FIELDS for run in runs] == [True] * 3, runs
    assert [(r["run"], r["attempt"], r["outcome"], r["exit_code"], r["error"]) for r in runs] == [
        (1, 1, "failed", 4, "exit status 4"), (2, 2, "failed", 4, "exit status 4"), (3, 3, "completed", 0, None)]
    assert [(r["stdout_bytes"], r["stderr_bytes"]) for r in runs] == [(len("attempt 1\n"), 2)] * 3
    for run in runs:
        assert run["host"] == queuectl.HOST
        assert isinstance(run["worker"], str) and run["worker"]
        assert run["started_at"].endswith("Z") and len(run["started_at"]) == 24
        assert run["started_at"] <= run["finished_at"]
    assert runs[0]["finished_at"] <= runs[1]["started_at"] and runs[1]["finished_at"] <= runs[2]["started_at"]


def test_human_show_prints_the_runs_as_a_table(fast):
    enqueue("-c", '[ "$QUEUECTL_ATTEMPT" -ge 2 ] || exit 4', "--id", "j", "--max-retries", "1")
    burst()
    enqueue("-c", "true", "--id", "never", "--delay", "3600")
    code, out, err = cli("show", "j")
    assert code == 0, err
    lines = out.splitlines()
    at = [line.split() for line in lines].index(["runs:"])
    assert lines[at + 1].split() == ["RUN", "ATTEMPT", "OUTCOME", "EXIT", "STARTED", "FINISHED", "WORKER", "HOST",
                                     "ERROR"]
    assert lines[at + 2].split()[:4] == ["1", "1", "failed", "4"] and lines[at + 2].endswith("exit status 4")
    assert lines[at + 3].split()[:4] == ["2", "2", "completed", "0"]
    assert at < lines.index("--- stdout ---")
    code, out, _ = cli("show", "never")
    assert code == 0 and ["runs:", "none"] in [line.split() for line in out.splitlines()]


def test_a_run_that_ran_out_of_time_has_outcome_timed_out(fast):
    enqueue(json.dumps({"id": "slow", "command": "exec sleep 30", "timeout": 0.3, "max_retries": 0}))
    burst()
    job = show("slow")
    (run,) = job["runs"]
    assert (job["state"], run["outcome"], run["attempt"]) == ("dead", "timed_out", 1)
    assert run["error"] == job["last_error"] and run["error"].startswith("timed out after 0.3 s")
    assert run["exit_code"] == job["exit_code"] and run["finished_at"] is not None


def test_the_run_of_a_canceled_processing_job_has_outcome_canceled(fast, pool, tmp_path):
    (job_id,) = enqueue("-c", "echo $$ > job.pid; exec sleep 30")
    proc = pool("--count", "1")
    assert wait_until(lambda: read_pid(tmp_path / "job.pid")), log_text(proc)
    assert [r["outcome"] for r in runs_of(job_id)] == ["running"]
    assert runs_of(job_id)[0]["finished_at"] is None

    assert cli("cancel", job_id)[0] == 0

    # Once the worker moved on (the next job ran), the run is still the canceled one.
    (next_id,) = enqueue("-c", "true")
    assert wait_until(lambda: show(next_id)["state"] == "completed"), log_text(proc)
    job = show(job_id)
    (run,) = job["runs"]
    assert (job["state"], run["outcome"], run["run"], run["attempt"]) == ("canceled", "canceled", 1, 1), job
    assert run["finished_at"] is not None


def test_a_run_whose_workers_were_sigkilled_is_lost_once_its_lease_ran_out(fast, pool, tmp_path):
    config_set("lease_timeout", "1")
    command = 'if [ "$QUEUECTL_ATTEMPT" = 1 ]; then echo $$ > job.pid; exec sleep 30; fi; echo second'
    (job_id,) = enqueue("-c", command, "--max-retries", "1")
    proc = pool("--count", "1")
    assert wait_until(lambda: read_pid(tmp_path / "job.pid")), log_text(proc)

    os.killpg(proc.pid, signal.SIGKILL)  # supervisor and worker; the job, in a session of its own, lives on
    proc.wait(timeout=10)
    assert wait_until(lambda: status()["jobs"]["processing"] == 0, timeout=6)  # status reaps the lease
    kill_group(read_pid(tmp_path / "job.pid"))

    (run,) = runs_of(job_id)
    assert (run["run"], run["attempt"], run["outcome"], run["exit_code"]) == (1, 1, "lost", None), run
    assert "worker lost" in run["error"] and run["finished_at"] is not None
    burst()
    job = show(job_id)
    assert (job["state"], job["attempts"]) == ("completed", 2)
    assert [(r["run"], r["attempt"], r["outcome"]) for r in job["runs"]] == [(1, 1, "lost"), (2, 2, "completed")]


def test_a_run_undone_by_a_forced_shutdown_is_kept_as_interrupted_and_not_counted(fast, pool, tmp_path):
    command = '[ -e job.pid ] || { echo $$ > job.pid; exec sleep 30; }; echo "attempt $QUEUECTL_ATTEMPT"'
    (job_id,) = enqueue("-c", command)
    proc = pool("--count", "1")
    assert wait_until(lambda: read_pid(tmp_path / "job.pid")), log_text(proc)

    os.kill(proc.pid, signal.SIGINT)
    assert wait_until(lambda: "supervisor stopping" in log_text(proc)), log_text(proc)
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=15) == 128 + signal.SIGINT, log_text(proc)

    job = show(job_id)
    assert (job["state"], job["attempts"]) == ("pending", 0), job
    (run,) = job["runs"]
    assert (run["run"], run["attempt"], run["outcome"]) == (1, 1, "interrupted"), run
    assert run["finished_at"] is not None
    burst()
    job = show(job_id)
    assert (job["state"], job["attempts"], job["stdout"]) == ("completed", 1, "attempt 1\n")
    assert [(r["run"], r["attempt"], r["outcome"]) for r in job["runs"]] == [(1, 1, "interrupted"),
                                                                              (2, 1, "completed")]


@pytest.mark.parametrize("how", [("retry",), ("dlq", "retry")], ids=["retry", "dlq-retry"])
def test_a_retry_keeps_the_earlier_runs_and_the_next_run_is_attempt_1_with_the_next_number(fast, tmp_path, how):
    enqueue("-c", "test -e ok", "--id", "j", "--max-retries", "1")
    burst()
    assert show("j")["state"] == "dead"
    assert cli(*how, "j")[0] == 0
    assert [(r["run"], r["attempt"], r["outcome"]) for r in runs_of("j")] == [(1, 1, "failed"), (2, 2, "failed")]
    (tmp_path / "ok").touch()
    burst()
    job = show("j")
    assert (job["state"], job["attempts"]) == ("completed", 1)
    assert [(r["run"], r["attempt"], r["outcome"]) for r in job["runs"]] == [
        (1, 1, "failed"), (2, 2, "failed"), (3, 1, "completed")]


def test_purge_deletes_the_runs_and_a_new_job_with_the_same_id_starts_at_run_1(fast):
    enqueue("-c", '[ "$QUEUECTL_ATTEMPT" -ge 2 ] || exit 1', "--id", "j")
    burst()
    assert len(runs_of("j")) == 2
    assert cli("purge")[0] == 0
    assert sql_rows("SELECT count(*) FROM runs") == [(0,)]
    enqueue("-c", "echo again", "--id", "j")
    assert runs_of("j") == []
    burst()
    assert [(r["run"], r["attempt"], r["outcome"]) for r in runs_of("j")] == [(1, 1, "completed")]
    assert cli("logs", "j", "--run", "1") == (0, "again\n", "")


def test_logs_run_n_prints_that_runs_output_and_a_missing_run_is_exit_1_and_0_is_exit_2(fast):
    command = 'echo "out $QUEUECTL_ATTEMPT"; echo "err $QUEUECTL_ATTEMPT" >&2; [ "$QUEUECTL_ATTEMPT" -ge 2 ]'
    enqueue("-c", command, "--id", "j", "--max-retries", "1")
    burst()
    enqueue("-c", "true", "--id", "unstarted", "--delay", "3600")
    assert cli("logs", "j", "--run", "1") == (0, "out 1\n", "")
    assert cli("logs", "j", "--run", "2") == (0, "out 2\n", "")
    assert cli("logs", "j") == (0, "out 2\n", "")  # the latest run
    assert cli("logs", "j", "--run", "1", "--stderr") == (0, "err 1\n", "")
    assert cli("logs", "unstarted") == (0, "", "")
    code, out, err = cli("logs", "j", "--run", "9")
    assert (code, out) == (1, "")
    assert error_line(err).startswith("queuectl: error: job 'j' has no run 9")
    for argv in (("--run", "0"), ("--run", "-1"), ("--follow", "--run", "1")):
        code, out, err = cli("logs", "j", *argv)
        assert (code, out) == (2, ""), argv
        error_line(err)


def test_each_run_keeps_the_last_output_limit_bytes_of_its_own_output(fast):
    config_set("output_limit", "10")
    enqueue("-c", 'seq 1 1000; echo "end $QUEUECTL_ATTEMPT"; [ "$QUEUECTL_ATTEMPT" -ge 2 ]', "--id", "j",
            "--max-retries", "1")
    burst()
    numbers = "".join(f"{n}\n" for n in range(1, 1001))
    for run in (1, 2):
        full = numbers + f"end {run}\n"
        code, out, err = cli("logs", "j", "--run", run)
        assert (code, out) == (0, full[-10:])
        assert f"{len(full) - 10} earlier bytes cut" in err
        assert runs_of("j")[run - 1]["stdout_bytes"] == len(full)


# ---------------------------------------------------------------------------
# logs -f: output as it happens
# ---------------------------------------------------------------------------

class Follower:
    """`logs -f ARGV` as a real process; its stdout read as it comes, without blocking."""

    def __init__(self, *argv):
        self.proc = subprocess.Popen([sys.executable, SCRIPT, "logs", "-f", *map(str, argv)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.data = b""

    def read(self):
        """Everything printed so far."""
        while True:
            try:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.data += chunk
        return self.data.decode(errors="replace")

    def shows(self, text, timeout=10):
        """Whether text appears in the output within timeout."""
        return wait_until(lambda: text in self.read(), timeout=timeout)

    def wait(self, timeout=20):
        """(exit code, all of stdout, all of stderr) once it exits."""
        code = self.proc.wait(timeout)
        os.set_blocking(self.proc.stdout.fileno(), True)
        self.data += self.proc.stdout.read()
        return code, self.data.decode(errors="replace"), self.proc.stderr.read().decode(errors="replace")

    def close(self):
        """Kill it if it still runs; close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
        self.proc.stderr.close()


@contextmanager
def following(*argv):
    """A Follower of `logs -f ARGV`, killed at the end whatever happened."""
    follower = Follower(*argv)
    try:
        yield follower
    finally:
        follower.close()


def has_opened_the_database(pid, db_target):
    """Whether process pid has the test's database open: the SQLite file (Linux), or a PostgreSQL session."""
    if PG_URL and db_target == PG_URL:
        app = f"queuectl {os.environ['QUEUECTL_PG_SCHEMA']}"
        return sql_rows("SELECT count(*) FROM pg_stat_activity WHERE application_name = :app "
                        "AND pid <> pg_backend_pid()", {"app": app})[0][0] > 0
    if not os.path.isdir(f"/proc/{pid}/fd"):
        return True
    target = os.path.realpath(db_target)
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def test_logs_follow_prints_lines_while_the_job_runs_then_exits_0(fast, pool, tmp_path):
    (job_id,) = enqueue("-c", f"echo one; {gate()}; echo two")
    proc = pool("--count", "1")
    assert wait_until(lambda: show(job_id)["state"] == "processing"), log_text(proc)
    with following(job_id) as follower:
        assert follower.shows("one\n"), follower.read()
        assert show(job_id)["state"] == "processing"  # printed while the job runs, not after it
        assert follower.proc.poll() is None
        (tmp_path / "go").touch()
        assert follower.wait() == (0, "one\ntwo\n", "")
    assert show(job_id)["state"] == "completed"


def test_logs_follow_waits_for_a_job_not_yet_started(fast, db):
    (job_id,) = enqueue("-c", "echo hello")
    with following(job_id) as follower:
        assert wait_until(lambda: has_opened_the_database(follower.proc.pid, db)), follower.read()
        assert follower.proc.poll() is None
        burst()
        assert follower.wait() == (0, "hello\n", "")


def test_logs_follow_goes_on_through_the_retries_until_the_job_completes(fast, db):
    (job_id,) = enqueue("-c", 'echo "attempt $QUEUECTL_ATTEMPT"; [ "$QUEUECTL_ATTEMPT" -ge 2 ]', "--max-retries", 1)
    with following(job_id) as follower:
        assert wait_until(lambda: has_opened_the_database(follower.proc.pid, db)), follower.read()
        burst()
        assert follower.wait() == (0, "attempt 1\nattempt 2\n", "")


def test_logs_follow_exits_1_when_the_job_ends_dead(fast, pool, db):
    (job_id,) = enqueue("-c", 'echo "attempt $QUEUECTL_ATTEMPT"; exit 3', "--max-retries", 1)
    with following(job_id) as follower:
        assert wait_until(lambda: has_opened_the_database(follower.proc.pid, db)), follower.read()
        pool("--count", "1")
        code, out, err = follower.wait()
    assert (code, out) == (1, "attempt 1\nattempt 2\n")
    assert "dead" in error_line(err)  # one line, as `wait` says it
    assert show(job_id)["state"] == "dead"


def test_logs_follow_of_a_canceled_job_prints_its_run_to_the_end(fast, pool):
    job = "trap 'echo got-term; sleep 0.3; echo bye; exit 3' TERM; echo hello; while :; do sleep 0.1; done"
    (job_id,) = enqueue("-c", job)
    proc = pool("--count", "1")
    with following(job_id) as follower:
        assert follower.shows("hello\n"), (follower.read(), log_text(proc))
        assert cli("cancel", job_id)[0] == 0
        code, out, _ = follower.wait()
    assert (code, out) == (1, "hello\ngot-term\nbye\n")  # what the run wrote while it was being stopped too
    (run,) = show(job_id)["runs"]
    assert (run["outcome"], run["exit_code"]) == ("canceled", 3)


def test_logs_follow_ends_when_the_jobs_worker_vanished(fast, pool, tmp_path):
    config_set("lease_timeout", "1")
    (job_id,) = enqueue("-c", "echo hi; echo $$ > job.pid; exec sleep 30", "--max-retries", "0")
    proc = pool("--count", "1")
    assert wait_until(lambda: cli("logs", job_id)[1] == "hi\n"), log_text(proc)  # flushed while it runs
    os.killpg(proc.pid, signal.SIGKILL)  # supervisor and worker: nothing is left to reap the lease
    proc.wait(timeout=10)
    kill_group(read_pid(tmp_path / "job.pid"))
    with following(job_id) as follower:
        code, out, err = follower.wait()
    assert (code, out) == (1, "hi\n") and "dead" in error_line(err)
    assert [r["outcome"] for r in show(job_id)["runs"]] == ["lost"]


def test_logs_follow_of_an_ended_job_prints_its_latest_run_and_exits_at_once(fast):
    enqueue("-c", 'echo "attempt $QUEUECTL_ATTEMPT"; [ "$QUEUECTL_ATTEMPT" -ge 2 ]', "--id", "ok", "--max-retries", 1)
    enqueue("-c", 'echo "attempt $QUEUECTL_ATTEMPT"; exit 1', "--id", "bad", "--max-retries", 0)
    burst()
    result = run("logs", "-f", "ok", timeout=10)
    assert (result.returncode, result.stdout, result.stderr) == (0, "attempt 2\n", "")
    result = run("logs", "--follow", "bad", timeout=10)
    assert (result.returncode, result.stdout) == (1, "attempt 1\n")
    assert "dead" in error_line(result.stderr)


def test_logs_follow_stderr_follows_stderr(fast, pool, tmp_path):
    (job_id,) = enqueue("-c", f"echo out; echo err1 >&2; {gate()}; echo err2 >&2; echo out2")
    proc = pool("--count", "1")
    assert wait_until(lambda: show(job_id)["state"] == "processing"), log_text(proc)
    with following(job_id, "--stderr") as follower:
        assert follower.shows("err1\n"), follower.read()
        assert show(job_id)["state"] == "processing"
        (tmp_path / "go").touch()
        assert follower.wait() == (0, "err1\nerr2\n", "")


def test_logs_follow_of_an_unknown_job_is_exit_1(db):
    result = run("logs", "-f", "nope", timeout=10)
    assert result.returncode == 1 and result.stdout == ""
    assert error_line(result.stderr) == "queuectl: error: job 'nope' not found"


def test_a_follower_far_behind_says_how_many_bytes_it_skipped_and_prints_only_the_kept_tail(fast, pool, tmp_path):
    config_set("output_limit", "1000")
    numbers = "".join(f"{n}\n" for n in range(1, 100001))
    (job_id,) = enqueue("-c", f"seq 1 100000; {gate()}; echo last")
    proc = pool("--count", "1")
    # The job wrote all of it and is still running when the follower starts.
    assert wait_until(lambda: (runs_of(job_id) or [{}])[-1].get("stdout_bytes") == len(numbers)), log_text(proc)
    assert show(job_id)["state"] == "processing"
    with following(job_id) as follower:
        assert follower.shows(" bytes skipped]\n"), follower.read()
        (tmp_path / "go").touch()
        code, out, err = follower.wait()
    assert (code, err) == (0, "")
    match = re.fullmatch(r"\[queuectl: (\d+) bytes skipped\]\n(.*)", out, re.DOTALL)
    assert match, out[:200]
    skipped = int(match[1])
    assert match[2] == numbers[skipped:] + "last\n"
    assert len(numbers) - skipped <= 1000  # only the kept tail was printed
    code, out, _ = cli("logs", job_id)
    assert code == 0 and out == (numbers + "last\n")[-1000:]  # and the worker kept no more than that


# ---------------------------------------------------------------------------
# Queues: list, pause, limit
# ---------------------------------------------------------------------------

def queue_list():
    """`queue list --json` as a list."""
    code, out, err = cli("queue", "list", "--json")
    assert code == 0, err
    return json.loads(out)


def counts(**nonzero):
    """{state: count} for every state, zeros included."""
    return {state: nonzero.get(state, 0) for state in queuectl.STATES}


def test_queue_list_shows_queues_with_jobs_and_queues_with_only_settings_with_counts_per_state(db):
    assert cli("queue", "list") == (0, "no queues\n", "")
    assert queue_list() == []
    enqueue("-c", "true", "--queue", "a")
    enqueue("-c", "true", "--queue", "a")
    enqueue("-c", "true", "--queue", "a", "--id", "gone")
    enqueue("-c", "true", "--queue", "b")
    assert cli("cancel", "gone")[0] == 0
    assert cli("queue", "pause", "c") == (0, "paused queue c\n", "")
    assert cli("queue", "limit", "d", "3") == (0, "queue d: at most 3 processing\n", "")
    rows = queue_list()
    assert [row["queue"] for row in rows] == ["a", "b", "c", "d"]
    expected = {"a": (False, 0, counts(pending=2, canceled=1)), "b": (False, 0, counts(pending=1)),
                "c": (True, 0, counts()), "d": (False, 3, counts())}
    for row in rows:
        paused, limit, jobs = expected[row["queue"]]
        assert (row["paused"], row["limit"], row["jobs"]) == (paused, limit, jobs), row
        assert {state: row[state] for state in queuectl.STATES} == jobs, row
    code, out, _ = cli("queue", "list")
    assert code == 0
    header, *lines = out.splitlines()
    assert [word.lower() for word in header.split()[:3]] == ["queue", "paused", "limit"]
    assert sorted(word.lower() for word in header.split()[3:]) == sorted(queuectl.STATES)
    assert [line.split()[0] for line in lines] == ["a", "b", "c", "d"]
    columns = [word.lower() for word in header.split()]
    row_a = dict(zip(columns, lines[0].split()))
    assert (row_a["pending"], row_a["canceled"], row_a["completed"]) == ("2", "1", "0")


def test_a_paused_queues_jobs_are_not_claimed_while_other_queues_run_and_resume_lets_them_run(fast):
    enqueue("-c", "true", "--id", "held", "--queue", "p", "--priority", "9")
    enqueue("-c", "true", "--id", "free")
    assert cli("queue", "pause", "p") == (0, "paused queue p\n", "")
    burst()  # returns: a burst worker does not wait for a paused queue's jobs
    assert (show("held")["state"], show("free")["state"]) == ("pending", "completed")
    assert show("held")["runs"] == []
    assert [(row["queue"], row["paused"]) for row in queue_list()] == [("default", False), ("p", True)]
    assert cli("queue", "resume", "p") == (0, "resumed queue p\n", "")
    burst()
    assert show("held")["state"] == "completed"


def test_pausing_a_queue_that_has_no_jobs_yet_is_remembered(fast):
    assert cli("queue", "pause", "later")[0] == 0
    assert [(row["queue"], row["paused"]) for row in queue_list()] == [("later", True)]
    enqueue("-c", "true", "--id", "j", "--queue", "later")
    burst()
    assert show("j")["state"] == "pending"
    assert cli("queue", "resume", "later")[0] == 0
    burst()
    assert show("j")["state"] == "completed"


def test_pausing_a_queue_lets_its_running_job_finish_and_be_recorded(fast, pool, tmp_path):
    (job_id,) = enqueue("-c", f"{gate()}; echo done", "--queue", "q")
    (waiting,) = enqueue("-c", "true", "--queue", "q")
    proc = pool("--count", "1")
    assert wait_until(lambda: show(job_id)["state"] == "processing"), log_text(proc)
    assert cli("queue", "pause", "q")[0] == 0
    (tmp_path / "go").touch()
    assert wait_until(lambda: show(job_id)["state"] == "completed"), log_text(proc)
    assert show(job_id)["stdout"] == "done\n"
    assert [r["outcome"] for r in runs_of(job_id)] == ["completed"]
    (other,) = enqueue("-c", "true", "--queue", "other")  # the worker goes on, and skips the paused queue
    assert wait_until(lambda: show(other)["state"] == "completed"), log_text(proc)
    assert show(waiting)["state"] == "pending"


@pytest.mark.parametrize("argv, value", [
    (("queue", "pause", "bad name"), "bad name"),
    (("queue", "pause", "fine", "no/slash"), "no/slash"),
    (("queue", "resume", "fine", "x" * 65), "x" * 65),
    (("queue", "pause", ""), None),
    (("queue", "limit", "bad name", "2"), "bad name"),
    (("queue", "limit", "q", "-1"), "-1"),
    (("queue", "limit", "q", "abc"), "abc"),
    (("queue", "limit", "q", "1.5"), "1.5"),
    (("queue", "limit", "q", "1000001"), "1000001"),
], ids=["space", "slash-among-good", "too-long", "empty", "limit-bad-name", "negative", "word", "fraction",
        "too-big"])
def test_a_bad_queue_name_or_limit_is_exit_2_naming_it_and_changes_nothing(db, argv, value):
    enqueue("-c", "true", "--queue", "fine")
    before = queue_list()
    code, out, err = cli(*argv)
    assert (code, out) == (2, "")
    line = error_line(err)
    assert value is None or value in line, line
    assert queue_list() == before


def stamp(name):
    """A shell command writing the wall clock in nanoseconds to the file name (in the job's directory)."""
    return f"date +%s%N > {name}"


def stamp_of(path):
    """The nanoseconds a stamp() wrote."""
    return int(path.read_text())


def start_end_intervals(path):
    """[(start_ns, end_ns)] from lines 'START END' that jobs appended to path."""
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]


def most_at_once(intervals):
    """The largest number of intervals that overlap at one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    now = most = 0
    for _, step in events:  # at a tie, an end (-1) sorts before a start
        now += step
        most = max(most, now)
    return most


def test_a_queue_limit_is_never_exceeded_yet_lets_that_many_run_at_once(fast, tmp_path):
    spans = tmp_path / "spans"
    assert cli("queue", "limit", "q", "2")[0] == 0
    command = f's=$(date +%s%N); sleep 0.2; echo "$s $(date +%s%N)" >> {shlex.quote(str(spans))}'
    enqueue_lines(jsonl(*({"command": command, "queue": "q"} for _ in range(12))))
    burst("--count", "4")
    intervals = start_end_intervals(spans)
    assert len(intervals) == 12
    assert most_at_once(intervals) == 2  # never 3 or 4, and not one at a time either
    assert {(job["state"], job["attempts"]) for job in all_jobs()} == {("completed", 1)}


def test_a_queue_at_its_limit_never_blocks_the_due_jobs_of_other_queues(fast, pool, tmp_path):
    assert cli("queue", "limit", "a", "1")[0] == 0
    enqueue("-c", f"{gate()}; {stamp('a1.end')}", "--id", "a1", "--queue", "a", "--priority", "10")
    proc = pool("--count", "2")
    assert wait_until(lambda: show("a1")["state"] == "processing"), log_text(proc)
    # Queue a is at its limit: its next job, first by priority, must not hold up queue b's.
    enqueue("-c", stamp("a2.start"), "--id", "a2", "--queue", "a", "--priority", "10")
    enqueue("-c", "true", "--id", "b1", "--queue", "b", "--priority", "-5")
    assert wait_until(lambda: show("b1")["state"] == "completed"), log_text(proc)
    assert (show("a1")["state"], show("a2")["state"]) == ("processing", "pending")
    (tmp_path / "go").touch()
    assert wait_until(lambda: show("a2")["state"] == "completed"), log_text(proc)
    assert stamp_of(tmp_path / "a2.start") >= stamp_of(tmp_path / "a1.end")  # a2 waited for a1's place


def test_a_lower_limit_never_stops_running_jobs(fast, pool, tmp_path):
    assert cli("queue", "limit", "q", "2")[0] == 0
    for job_id in ("r1", "r2"):
        enqueue("-c", f"{gate()}; {stamp(job_id + '.end')}", "--id", job_id, "--queue", "q")
    proc = pool("--count", "3")
    assert wait_until(lambda: show("r1")["state"] == show("r2")["state"] == "processing"), log_text(proc)
    enqueue("-c", stamp("next.start"), "--id", "next", "--queue", "q")  # held by the limit 2
    assert cli("queue", "limit", "q", "1") == (0, "queue q: at most 1 processing\n", "")
    assert [row["limit"] for row in queue_list()] == [1]
    (tmp_path / "go").touch()
    assert wait_until(lambda: show("next")["state"] == "completed"), log_text(proc)
    for job_id in ("r1", "r2"):
        job = show(job_id)
        assert (job["state"], job["attempts"]) == ("completed", 1)
        assert [r["outcome"] for r in job["runs"]] == ["completed"]
        # Both ran on, over the new limit 1; so next waited until neither ran.
        assert stamp_of(tmp_path / "next.start") >= stamp_of(tmp_path / f"{job_id}.end")
    assert cli("queue", "limit", "q", "0") == (0, "queue q: no limit\n", "")
    assert [row["limit"] for row in queue_list()] == [0]


@needs_pg
def test_claimers_of_a_limited_queue_take_its_jobs_by_age_even_while_another_looks_at_one(db):
    # A claimer on PostgreSQL passes over rows other claimers hold (SKIP
    # LOCKED). For a limited queue that once let a younger job take the last
    # place while a claimer looked at the older one: here a connection holds
    # the older job's row, as such a claimer does, while we claim.

    import psycopg
    cli("queue", "limit", "q", "1")
    for job_id in ("older", "younger"):
        enqueue("-c", "true", "--id", job_id, "--queue", "q")
    holder = psycopg.connect(PG_URL)
    holder.execute(f'SET search_path TO "{os.environ["QUEUECTL_PG_SCHEMA"]}"')
    holder.execute("SELECT 1 FROM jobs WHERE id = 'older' FOR UPDATE")
    release = threading.Timer(0.5, holder.rollback)
    release.start()
    conn = queuectl.connect(db)
    try:
        job = queuectl.claim(conn, "w", conn.claim_query([]), 30)
        assert job["id"] == "older"
        assert queuectl.claim(conn, "w", conn.claim_query([]), 30) is None  # the queue is full now
    finally:
        release.join()
        holder.close()
        conn.close()


# ---------------------------------------------------------------------------
# why: what a job waits for
# ---------------------------------------------------------------------------

def why(job_id):
    """`why ID --json` as a dict."""
    code, out, err = cli("why", job_id, "--json")
    assert code == 0, err
    return json.loads(out)


def reasons(job_id):
    """[(code, text)] of `why ID --json`."""
    return [(reason["code"], reason["text"]) for reason in why(job_id)["reasons"]]


def codes(job_id):
    """The reason codes of `why ID --json`, in order."""
    return [code for code, _ in reasons(job_id)]


def test_why_json_is_exactly_id_state_and_reasons_and_the_human_form_lists_them(db):
    enqueue("-c", "true", "--id", "j", "--delay", "3600")
    doc = why("j")
    assert set(doc) == {"id", "state", "reasons"}
    assert (doc["id"], doc["state"]) == ("j", "pending")
    assert doc["reasons"] and all(set(reason) == {"code", "text"} for reason in doc["reasons"])
    assert all(isinstance(reason["text"], str) and reason["text"] for reason in doc["reasons"])
    code, out, err = cli("why", "j")
    assert (code, err) == (0, "")
    def steady(text):  # the text may say how long from now: that moves between two calls
        return re.sub(r"\d+(\.\d+)? s\b", "N s", text)
    assert [steady(line) for line in out.splitlines()] == \
        ["j is pending"] + [steady(f"  - {reason['text']}") for reason in doc["reasons"]]


def test_why_of_an_unknown_job_is_exit_1(db):
    code, out, err = cli("why", "nope")
    assert (code, out) == (1, "")
    assert error_line(err) == "queuectl: error: job 'nope' not found"


def test_why_a_job_scheduled_for_later_is_not_due_and_says_when(db):
    enqueue("-c", "true", "--id", "j", "--delay", "3600")
    ((code, text),) = reasons("j")
    assert code == "not_due"
    assert show("j")["run_at"][:19] in text
    assert "retry" not in text


def test_why_a_failed_job_waiting_out_its_backoff_is_not_due_for_a_retry(db):
    config_set("backoff_base", "1000")
    config_set("poll_interval", "0.05")
    enqueue("-c", "exit 1", "--id", "f", "--max-retries", "1")
    workers = start_workers()
    try:
        assert wait_until(lambda: show("f")["state"] == "failed")
    finally:
        os.killpg(workers.pid, signal.SIGTERM)
        workers.wait(10)
    ((code, text),) = reasons("f")
    assert code == "not_due"
    assert "retry" in text and show("f")["run_at"][:19] in text
    assert why("f")["state"] == "failed"


def test_why_names_each_dependency_not_completed_and_its_state(fast):
    enqueue("-c", "true", "--id", "done-dep")
    burst()
    enqueue("-c", "true", "--id", "later-1", "--delay", "3600")
    enqueue("-c", "true", "--id", "later-2", "--delay", "3600")
    enqueue("-c", "true", "--id", "j", "--after", "done-dep", "later-1", "later-2")
    found = reasons("j")
    # Due, and no worker runs: that holds too, and resolving the dependencies alone would not run it.
    assert [code for code, _ in found] == ["waiting_on_dependency"] * 2 + ["no_worker_for_queue"], found
    texts = sorted(text for code, text in found if code == "waiting_on_dependency")
    assert "later-1" in texts[0] and "pending" in texts[0] and "later-2" not in texts[0]
    assert "later-2" in texts[1] and "pending" in texts[1]
    assert not any("done-dep" in text for text in texts)


def test_why_a_job_of_a_paused_queue_says_queue_paused(db):
    assert cli("queue", "pause", "held-q")[0] == 0
    enqueue("-c", "true", "--id", "j", "--queue", "held-q")
    (code, text), (also, _) = reasons("j")
    assert code == "queue_paused" and "held-q" in text
    assert also == "no_worker_for_queue"  # every reason that holds: resuming alone would not run it


def test_why_a_job_of_a_queue_at_its_limit_gives_the_limit_and_how_many_run(fast, pool, tmp_path):
    assert cli("queue", "limit", "q", "1")[0] == 0
    enqueue("-c", gate(), "--id", "running", "--queue", "q")
    proc = pool("--count", "2")
    assert wait_until(lambda: show("running")["state"] == "processing"), log_text(proc)
    enqueue("-c", "true", "--id", "j", "--queue", "q")
    ((code, text),) = reasons("j")
    assert code == "queue_at_limit"
    assert "limit" in text and re.search(r"\b1 running", text), text
    (tmp_path / "go").touch()
    assert wait_until(lambda: show("j")["state"] == "completed"), log_text(proc)


def test_why_a_due_job_no_live_worker_takes_says_no_worker_for_queue(fast, pool):
    enqueue("-c", "true", "--id", "j")
    assert codes("j") == ["no_worker_for_queue"]
    proc = pool("--count", "1", "--queue", "other")  # alive, but for another queue
    assert wait_until(lambda: pids_of("worker")), log_text(proc)
    assert codes("j") == ["no_worker_for_queue"]


def test_why_a_due_job_whose_workers_are_busy_says_how_many_due_jobs_are_ahead(fast, pool, tmp_path):
    enqueue("-c", gate(), "--id", "busy")
    proc = pool("--count", "1")
    assert wait_until(lambda: show("busy")["state"] == "processing"), log_text(proc)
    enqueue("-c", "true", "--id", "first", "--priority", "5")
    enqueue("-c", "true", "--id", "second", "--priority", "5")
    enqueue("-c", "true", "--id", "j")
    ((code, text),) = reasons("j")
    assert code == "waiting_for_worker"
    assert re.search(r"\b2 due jobs?(\(s\))? ahead", text), text
    ((code, text),) = reasons("first")
    assert code == "waiting_for_worker" and re.search(r"\b0 due jobs?(\(s\))? ahead", text), text
    (tmp_path / "go").touch()


def test_why_a_processing_job_is_running_and_names_its_worker_and_host(fast, pool, tmp_path):
    enqueue("-c", gate(), "--id", "j")
    proc = pool("--count", "1")
    assert wait_until(lambda: show("j")["state"] == "processing"), log_text(proc)
    (worker,) = [p for p in worker_list() if p["current_job"] == "j"]
    doc = why("j")
    assert doc["state"] == "processing"
    ((code, text),) = [(r["code"], r["text"]) for r in doc["reasons"]]
    assert code == "running"
    assert worker["id"] in text and worker["host"] in text
    (tmp_path / "go").touch()


def test_why_a_job_in_an_end_state_says_ended_and_why(fast):
    enqueue("-c", "true", "--id", "ok")
    enqueue("-c", "exit 3", "--id", "bad", "--max-retries", "0")
    enqueue("-c", "true", "--id", "child", "--after", "bad")
    enqueue("-c", "true", "--id", "stopped", "--delay", "3600")
    assert cli("cancel", "stopped")[0] == 0
    burst()
    expected = {"ok": ["completed"], "bad": ["dead", "exit status 3"], "child": ["canceled", "bad"],
                "stopped": ["canceled", "by the user"]}
    for job_id, words in expected.items():
        ((code, text),) = reasons(job_id)
        assert code == "ended", (job_id, text)
        assert all(word in text for word in words), (job_id, text)


@sqlite_only
def test_why_answers_while_another_process_holds_the_write_lock(db):
    enqueue("-c", "true", "--id", "j")
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")
        env = {**os.environ, "QUEUECTL_BUSY_TIMEOUT": "0.2"}
        result = run("why", "j", "--json", env=env)
        writer = run("cancel", "j", env=env)  # the lock is real: a writer gives up
        holder.execute("ROLLBACK")
    assert writer.returncode == 1 and "locked" in error_line(writer.stderr), writer.stderr
    assert result.returncode == 0, result.stderr
    assert [r["code"] for r in json.loads(result.stdout)["reasons"]] == ["no_worker_for_queue"]


# ---------------------------------------------------------------------------
# Recurring schedules
# ---------------------------------------------------------------------------
#
# `schedule next` is checked against instants worked out by hand from each
# zone's rules (written literally below), then against a deliberately simple
# reference that walks every minute in UTC. Firing is checked with real
# supervisors and `@every 1s`: each tick a job NAME@<tick>, consecutive, none
# twice, whatever the number of supervisors.

def iso_epoch(text):
    """Epoch seconds of an ISO-8601 UTC string as queuectl prints them (2026-11-22T09:32:29.123Z)."""
    whole, _, millis = text.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis or 0) / 1000


def schedule_next(cron, *argv):
    """`schedule next CRON ARGV --json` as a list of ISO strings."""
    code, out, err = cli("schedule", "next", cron, *argv, "--json")
    assert (code, err) == (0, ""), err
    return json.loads(out)


def next_ticks(cron, tz, start, count):
    """The next `count` ticks of cron in tz strictly after the ISO instant start."""
    return schedule_next(cron, "--tz", tz, "--from", start, "--count", count)


@pytest.mark.parametrize("cron, tz, start, expected", [
    # America/New_York: 2026-03-08 02:00 EST -> 03:00 EDT (07:00Z); 2026-11-01 02:00 EDT -> 01:00 EST (06:00Z).
    ("30 2 * * *", "America/New_York", "2026-03-07T12:00:00Z",  # 02:30 is skipped: once, at 03:00 EDT
     ["2026-03-08T07:00:00.000Z", "2026-03-09T06:30:00.000Z", "2026-03-10T06:30:00.000Z"]),
    ("*/15 2 * * *", "America/New_York", "2026-03-07T12:00:00Z",  # four skipped times, one instant
     ["2026-03-08T07:00:00.000Z", "2026-03-09T06:00:00.000Z", "2026-03-09T06:15:00.000Z"]),
    ("0,30 * * * *", "America/New_York", "2026-03-08T05:00:00Z",  # 02:00, 02:30 and 03:00 are one instant
     ["2026-03-08T05:30:00.000Z", "2026-03-08T06:00:00.000Z", "2026-03-08T06:30:00.000Z",
      "2026-03-08T07:00:00.000Z", "2026-03-08T07:30:00.000Z"]),
    ("30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z",  # 01:30 twice: the first (EDT) only
     ["2026-11-01T05:30:00.000Z", "2026-11-02T06:30:00.000Z", "2026-11-03T06:30:00.000Z"]),
    ("30 * * * *", "America/New_York", "2026-11-01T04:00:00Z",  # hour *: 01:30 EDT and 01:30 EST
     ["2026-11-01T04:30:00.000Z", "2026-11-01T05:30:00.000Z", "2026-11-01T06:30:00.000Z",
      "2026-11-01T07:30:00.000Z"]),
    # 2027-03-14 and 2027-11-07, at the same local times.
    ("0 2 * * *", "America/New_York", "2027-03-13T12:00:00Z", ["2027-03-14T07:00:00.000Z", "2027-03-15T06:00:00.000Z"]),
    ("0 1 * * *", "America/New_York", "2027-11-06T12:00:00Z", ["2027-11-07T05:00:00.000Z", "2027-11-08T06:00:00.000Z"]),
    # Europe/Berlin: 2026-03-29 02:00 CET -> 03:00 CEST (01:00Z); 2026-10-25 03:00 CEST -> 02:00 CET (01:00Z).
    ("30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", ["2026-03-29T01:00:00.000Z", "2026-03-30T00:30:00.000Z"]),
    ("30 2 * * *", "Europe/Berlin", "2026-10-24T12:00:00Z", ["2026-10-25T00:30:00.000Z", "2026-10-26T01:30:00.000Z"]),
    ("15 * * * *", "Europe/Berlin", "2026-10-25T00:00:00Z",  # hour *: 02:15 CEST, 02:15 CET, 03:15 CET
     ["2026-10-25T00:15:00.000Z", "2026-10-25T01:15:00.000Z", "2026-10-25T02:15:00.000Z"]),
    ("*/15 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z",
     ["2026-03-29T01:00:00.000Z", "2026-03-30T00:00:00.000Z", "2026-03-30T00:15:00.000Z"]),
    ("0 2 * * *", "Europe/Berlin", "2027-03-27T12:00:00Z", ["2027-03-28T01:00:00.000Z", "2027-03-29T00:00:00.000Z"]),
    ("0 2 * * *", "Europe/Berlin", "2027-10-30T12:00:00Z", ["2027-10-31T00:00:00.000Z", "2027-11-01T01:00:00.000Z"]),
    # Australia/Lord_Howe (+10:30, +11 in summer): 2026-04-05 02:00 -> 01:30 (15:00Z the day before);
    # 2026-10-04 02:00 -> 02:30 (15:30Z the day before). Only half an hour is skipped or repeated.
    ("45 1 * * *", "Australia/Lord_Howe", "2026-04-04T00:00:00Z",  # 01:45 twice: the first (+11) only
     ["2026-04-04T14:45:00.000Z", "2026-04-05T15:15:00.000Z", "2026-04-06T15:15:00.000Z"]),
    ("15,45 * * * *", "Australia/Lord_Howe", "2026-04-04T14:00:00Z",  # hour *: 01:15 once, 01:45 twice
     ["2026-04-04T14:15:00.000Z", "2026-04-04T14:45:00.000Z", "2026-04-04T15:15:00.000Z",
      "2026-04-04T15:45:00.000Z"]),
    ("15 2 * * *", "Australia/Lord_Howe", "2026-10-03T00:00:00Z",  # 02:15 is skipped: once, at 02:30
     ["2026-10-03T15:30:00.000Z", "2026-10-04T15:15:00.000Z"]),
    ("*/15 2 * * *", "Australia/Lord_Howe", "2026-10-03T00:00:00Z",  # 02:00, 02:15 skipped; 02:30 the same instant
     ["2026-10-03T15:30:00.000Z", "2026-10-03T15:45:00.000Z", "2026-10-04T15:00:00.000Z"]),
    # 2027-04-04 and 2027-10-03.
    ("30 1 * * *", "Australia/Lord_Howe", "2027-04-03T00:00:00Z",
     ["2027-04-03T14:30:00.000Z", "2027-04-04T15:00:00.000Z"]),
    ("0 2 * * *", "Australia/Lord_Howe", "2027-10-02T00:00:00Z",
     ["2027-10-02T15:30:00.000Z", "2027-10-03T15:00:00.000Z"]),
], ids=["ny-skipped", "ny-every-15-in-the-gap", "ny-hour-any-gap", "ny-repeated", "ny-repeated-hour-any",
        "ny-2027-skipped", "ny-2027-repeated", "berlin-skipped", "berlin-repeated", "berlin-repeated-hour-any",
        "berlin-every-15-in-the-gap", "berlin-2027-skipped", "berlin-2027-repeated", "lord-howe-repeated",
        "lord-howe-repeated-hour-any", "lord-howe-skipped", "lord-howe-every-15-in-the-gap",
        "lord-howe-2027-repeated", "lord-howe-2027-skipped"])
def test_schedule_next_fires_a_skipped_time_once_after_the_gap_and_a_repeated_one_once_unless_hour_is_any(
        cron, tz, start, expected):
    got = next_ticks(cron, tz, start, len(expected))
    assert got == expected
    assert len(set(got)) == len(got)  # no instant twice


@pytest.mark.parametrize("cron, start, expected", [
    ("0 0 29 2 *", "2026-01-01T00:00:00Z", ["2028-02-29T00:00:00.000Z", "2032-02-29T00:00:00.000Z"]),
    # Both day fields restricted: the 1st OR a Monday (2026-02-01 is a Sunday).
    ("0 12 1 * mon", "2026-02-01T00:00:00Z",
     ["2026-02-01T12:00:00.000Z", "2026-02-02T12:00:00.000Z", "2026-02-09T12:00:00.000Z",
      "2026-02-16T12:00:00.000Z", "2026-02-23T12:00:00.000Z", "2026-03-01T12:00:00.000Z"]),
    ("0 12 1-7 * mon", "2026-02-01T00:00:00Z",
     ["2026-02-01T12:00:00.000Z", "2026-02-02T12:00:00.000Z", "2026-02-03T12:00:00.000Z",
      "2026-02-04T12:00:00.000Z", "2026-02-05T12:00:00.000Z", "2026-02-06T12:00:00.000Z",
      "2026-02-07T12:00:00.000Z", "2026-02-09T12:00:00.000Z"]),
    # One day field *: only the other one counts.
    ("0 12 * * mon", "2026-02-01T00:00:00Z", ["2026-02-02T12:00:00.000Z", "2026-02-09T12:00:00.000Z"]),
    ("0 12 1 * *", "2026-02-01T00:00:00Z", ["2026-02-01T12:00:00.000Z", "2026-03-01T12:00:00.000Z"]),
    ("0 12 1-3 * *", "2026-02-01T00:00:00Z",
     ["2026-02-01T12:00:00.000Z", "2026-02-02T12:00:00.000Z", "2026-02-03T12:00:00.000Z",
      "2026-03-01T12:00:00.000Z"]),
    # Names in either case; 0, 7 and sun are Sunday.
    ("0 9 * jan MON", "2026-01-01T00:00:00Z",
     ["2026-01-05T09:00:00.000Z", "2026-01-12T09:00:00.000Z", "2026-01-19T09:00:00.000Z",
      "2026-01-26T09:00:00.000Z", "2027-01-04T09:00:00.000Z"]),
    ("0 9 * JAN mon", "2026-01-01T00:00:00Z", ["2026-01-05T09:00:00.000Z", "2026-01-12T09:00:00.000Z"]),
    ("0 0 * * 7", "2026-01-01T00:00:00Z", ["2026-01-04T00:00:00.000Z", "2026-01-11T00:00:00.000Z"]),
    ("0 0 * * 0", "2026-01-01T00:00:00Z", ["2026-01-04T00:00:00.000Z", "2026-01-11T00:00:00.000Z"]),
    ("0 0 * * Sun", "2026-01-01T00:00:00Z", ["2026-01-04T00:00:00.000Z", "2026-01-11T00:00:00.000Z"]),
    ("0 0 * * 5-7", "2026-01-01T00:00:00Z",
     ["2026-01-02T00:00:00.000Z", "2026-01-03T00:00:00.000Z", "2026-01-04T00:00:00.000Z",
      "2026-01-09T00:00:00.000Z"]),
    ("0 0 * mar-apr/1 *", "2026-03-30T12:00:00Z",
     ["2026-03-31T00:00:00.000Z", "2026-04-01T00:00:00.000Z"]),
    # Steps, ranges and lists.
    ("10-40/15 8-10/2 * * *", "2026-01-01T00:00:00Z",
     ["2026-01-01T08:10:00.000Z", "2026-01-01T08:25:00.000Z", "2026-01-01T08:40:00.000Z",
      "2026-01-01T10:10:00.000Z", "2026-01-01T10:25:00.000Z", "2026-01-01T10:40:00.000Z",
      "2026-01-02T08:10:00.000Z"]),
    ("*/20 */12 * * *", "2026-01-01T00:00:00Z",
     ["2026-01-01T00:20:00.000Z", "2026-01-01T00:40:00.000Z", "2026-01-01T12:00:00.000Z",
      "2026-01-01T12:20:00.000Z"]),
    ("5,50-52 23 31 dec *", "2026-01-01T00:00:00Z",
     ["2026-12-31T23:05:00.000Z", "2026-12-31T23:50:00.000Z", "2026-12-31T23:51:00.000Z",
      "2026-12-31T23:52:00.000Z", "2027-12-31T23:05:00.000Z"]),
    # Aliases, strictly after --from (itself a tick of each of them).
    ("@yearly", "2026-01-01T00:00:00Z", ["2027-01-01T00:00:00.000Z", "2028-01-01T00:00:00.000Z"]),
    ("@annually", "2026-01-01T00:00:00Z", ["2027-01-01T00:00:00.000Z", "2028-01-01T00:00:00.000Z"]),
    ("@monthly", "2026-01-01T00:00:00Z", ["2026-02-01T00:00:00.000Z", "2026-03-01T00:00:00.000Z"]),
    ("@weekly", "2026-01-01T00:00:00Z", ["2026-01-04T00:00:00.000Z", "2026-01-11T00:00:00.000Z"]),
    ("@daily", "2026-01-01T00:00:00Z", ["2026-01-02T00:00:00.000Z", "2026-01-03T00:00:00.000Z"]),
    ("@midnight", "2026-01-01T00:00:00Z", ["2026-01-02T00:00:00.000Z", "2026-01-03T00:00:00.000Z"]),
    ("@hourly", "2026-01-01T00:00:00Z", ["2026-01-01T01:00:00.000Z", "2026-01-01T02:00:00.000Z"]),
    ("@DAILY", "2026-01-01T00:00:00Z", ["2026-01-02T00:00:00.000Z", "2026-01-03T00:00:00.000Z"]),
    # @every counts real seconds from --from, to the millisecond, in any zone.
    ("@every 90s", "2026-01-01T00:00:00Z",
     ["2026-01-01T00:01:30.000Z", "2026-01-01T00:03:00.000Z", "2026-01-01T00:04:30.000Z"]),
    ("@every 15m", "2026-01-01T00:00:00.250Z", ["2026-01-01T00:15:00.250Z", "2026-01-01T00:30:00.250Z"]),
    ("@every 2h", "1767225600", ["2026-01-01T02:00:00.000Z", "2026-01-01T04:00:00.000Z"]),
    ("@every 1d", "2026-01-01T00:00:00Z", ["2026-01-02T00:00:00.000Z", "2026-01-03T00:00:00.000Z"]),
    ("@every 45", "2026-01-01T00:00:00Z", ["2026-01-01T00:00:45.000Z", "2026-01-01T00:01:30.000Z"]),
], ids=lambda value: value if isinstance(value, str) else None)
def test_schedule_next_follows_the_cron_rules_for_days_names_steps_aliases_and_every(cron, start, expected):
    assert next_ticks(cron, "UTC", start, len(expected)) == expected


def test_every_ignores_daylight_saving_and_counts_real_seconds():
    # Across New York's spring-forward hour: every 30 minutes of real time, whatever the wall clock does.
    assert next_ticks("@every 30m", "America/New_York", "2026-03-08T06:00:00Z", 4) == [
        "2026-03-08T06:30:00.000Z", "2026-03-08T07:00:00.000Z", "2026-03-08T07:30:00.000Z",
        "2026-03-08T08:00:00.000Z"]


def test_schedule_next_prints_iso_utc_with_the_local_time_or_a_json_array_and_opens_no_database(db):
    got = next_ticks("30 2 * * *", "America/New_York", "2026-03-07T12:00:00Z", 2)
    assert got == ["2026-03-08T07:00:00.000Z", "2026-03-09T06:30:00.000Z"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", tick) for tick in got)
    code, out, err = cli("schedule", "next", "30 2 * * *", "--tz", "America/New_York", "--from",
                         "2026-03-07T12:00:00Z", "--count", "2")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "2026-03-08T07:00:00.000Z  2026-03-08 03:00:00 EDT (America/New_York)",
        "2026-03-09T06:30:00.000Z  2026-03-09 02:30:00 EDT (America/New_York)"]
    # The default is five ticks from now.
    before = time.time()
    ticks = schedule_next("* * * * *", "--tz", "UTC")
    assert len(ticks) == 5
    assert iso_epoch(ticks[0]) > before - 1 and iso_epoch(ticks[0]) <= time.time() + 60
    assert [iso_epoch(ticks[n + 1]) - iso_epoch(ticks[n]) for n in range(4)] == [60] * 4
    if not PG_URL:
        assert not Path(db).exists()  # it reads no database, nor makes one


@pytest.mark.parametrize("count, ok", [("1", True), ("1000", True), ("0", False), ("1001", False), ("-1", False)])
def test_schedule_next_count_is_1_to_1000(count, ok):
    code, out, err = cli("schedule", "next", "* * * * *", "--tz", "UTC", "--from", "2026-01-01T00:00:00Z",
                         "--count", count, "--json")
    if ok:
        assert (code, err) == (0, "")
        ticks = json.loads(out)
        assert len(ticks) == int(count)
        assert ticks[-1] == time.strftime("%Y-%m-%dT%H:%M:00.000Z", time.gmtime(1767225600 + 60 * int(count)))
    else:
        assert (code, out) == (2, "")
        assert count in error_line(err) and "--count" in error_line(err)


@pytest.mark.parametrize("cron, field, value", [
    ("60 * * * *", "minute", "60"),
    ("*/0 * * * *", "minute", "*/0"),
    ("5-1 * * * *", "minute", "5-1"),
    ("1-2-3 * * * *", "minute", "1-2-3"),
    ("jan * * * *", "minute", "jan"),
    ("* 24 * * *", "hour", "24"),
    ("* -1 * * *", "hour", "-1"),
    ("* * 0 * *", "day-of-month", "0"),
    ("* * 32 * *", "day-of-month", "32"),
    ("* * * 13 *", "month", "13"),
    ("* * * foo *", "month", "foo"),
    ("* * * * 8", "day-of-week", "8"),
    ("* * * * mon/0", "day-of-week", "mon/0"),
    ("* * * *", "5 fields", "* * * *"),
    ("* * * * * *", "5 fields", "* * * * * *"),
    ("@fortnightly", "alias", "@fortnightly"),
    ("@every 0s", "@every", "0s"),
    ("@every 5x", "@every", "5x"),
    ("@every", "@every", "@every"),
    ("0 0 30 2 *", "no date", "0 0 30 2 *"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_a_bad_cron_expression_is_exit_2_naming_the_bad_field(cron, field, value):
    code, out, err = cli("schedule", "next", cron, "--tz", "UTC")
    assert (code, out) == (2, "")
    line = error_line(err)
    assert field in line and value in line, line
    if field == "month":
        assert "day-of-month" not in line, line


def test_an_unknown_zone_or_a_bad_from_is_exit_2_and_a_real_process_prints_no_traceback(db):
    code, out, err = cli("schedule", "next", "* * * * *", "--tz", "Mars/Olympus_Mons")
    assert (code, out) == (2, "")
    assert "Mars/Olympus_Mons" in error_line(err)
    code, out, err = cli("schedule", "next", "* * * * *", "--tz", "UTC", "--from", "yesterday")
    assert (code, out) == (2, "")
    assert "yesterday" in error_line(err) and "--from" in error_line(err)
    result = run("schedule", "next", "* 99 * * *", "--tz", "UTC")
    assert (result.returncode, result.stdout) == (2, "")
    assert "hour" in error_line(result.stderr)


# The reference for the property test below: every minute in UTC, one at a
# time, judged by the contract's words alone. Deliberately slow and simple.

CRON_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def reference_field(word, low, high, names=(), first_name=0):
    """The values one cron field matches: *, n, a-b, */n, a-b/n, a/n, lists, names."""
    def number(text):
        return names.index(text) + first_name if text in names else int(text)

    values = set()
    for part in word.lower().split(","):
        span, slash, step = part.partition("/")
        a, dash, b = span.partition("-")
        first, last = (low, high) if span == "*" else (number(a), number(b) if dash else high if slash else number(a))
        values.update(range(first, last + 1, int(step) if slash else 1))
    return values


class ReferenceCron:
    """Five cron fields as sets, and whether a naive wall-clock time matches them."""

    def __init__(self, text):
        minute, hour, day, month, weekday = text.split()
        self.minutes, self.hours = reference_field(minute, 0, 59), reference_field(hour, 0, 23)
        self.days, self.months = reference_field(day, 1, 31), reference_field(month, 1, 12, CRON_MONTHS, 1)
        self.weekdays = {d % 7 for d in reference_field(weekday, 0, 7, CRON_DAYS)}  # 7 is Sunday too
        self.hour_is_any = hour == "*"
        self.both_days_restricted = day != "*" and weekday != "*"

    def matches(self, wall):
        day, weekday = wall.day in self.days, wall.isoweekday() % 7 in self.weekdays
        return (wall.minute in self.minutes and wall.hour in self.hours and wall.month in self.months
                and ((day or weekday) if self.both_days_restricted else (day and weekday)))


def reference_ticks(cron, zone, start, horizon_s, seen=None):
    """The ticks (epoch s) of cron in zone in (start, start + horizon_s], walking every minute in UTC.

    An instant is a tick if its wall time matches (only its first occurrence,
    fold 0, unless the hour field is *), or if the clock jumped over wall times
    to reach it and one of those matches. seen counts the kinds of tick found.
    """
    import datetime
    ticks, minute = [], datetime.timedelta(minutes=1)
    instant = (int(start) // 60 + 1) * 60
    while instant <= start + horizon_s:
        local = datetime.datetime.fromtimestamp(instant, zone)
        wall = local.replace(tzinfo=None, fold=0)
        skipped = datetime.datetime.fromtimestamp(instant - 60, zone).replace(tzinfo=None, fold=0) + minute
        in_gap = False
        while skipped < wall:  # the wall times the clock jumped over to get here
            in_gap = in_gap or cron.matches(skipped)
            skipped += minute
        on_time = cron.matches(wall) and (local.fold == 0 or cron.hour_is_any)
        if on_time or in_gap:
            ticks.append(instant)
        if seen is not None:
            seen["after a gap"] += in_gap
            seen["second of a repeated time"] += on_time and local.fold == 1
            seen["repeated time not fired twice"] += cron.matches(wall) and local.fold == 1 and not on_time
        instant += 60
    return ticks


# The instants (UTC) the three zones change their offset in 2026 and 2027, by hand from their rules.
DST_CHANGES = {
    "America/New_York": ("2026-03-08T07:00:00Z", "2026-11-01T06:00:00Z", "2027-03-14T07:00:00Z",
                         "2027-11-07T06:00:00Z"),
    "Europe/Berlin": ("2026-03-29T01:00:00Z", "2026-10-25T01:00:00Z", "2027-03-28T01:00:00Z",
                      "2027-10-31T01:00:00Z"),
    "Australia/Lord_Howe": ("2026-04-04T15:00:00Z", "2026-10-03T15:30:00Z", "2027-04-03T15:00:00Z",
                            "2027-10-02T15:30:00Z"),
}


def random_cron(rng, change_day, change_month):
    """A random five-field CRON dense enough to tick within days, aimed at the hours clocks change."""
    def minutes():
        def minute_part():
            a = rng.randrange(45)
            return rng.choice([
                f"*/{rng.choice([5, 10, 15, 20, 30])}",
                str(rng.randrange(60)),
                ",".join(str(m) for m in sorted(rng.sample(range(60), rng.randint(2, 4)))),
                f"{a}-{a + rng.randint(1, 9)}",
                f"{a}-{min(a + rng.randint(10, 40), 59)}/{rng.randint(5, 20)}",
                f"{a % 30}/{rng.choice([15, 20, 30])}",
            ])
        return ",".join(minute_part() for _ in range(rng.choice([1, 1, 2])))

    def hours():
        return rng.choice([
            lambda: "*",
            lambda: str(rng.choice([0, 1, 2, 3, rng.randrange(24)])),
            lambda: ",".join(str(h) for h in sorted(rng.sample(range(5), rng.randint(2, 3)))),
            lambda: f"{rng.randint(0, 2)}-{rng.randint(2, 4)}",
            lambda: f"*/{rng.choice([2, 3])}",
            lambda: f"0-{rng.randint(3, 23)}/{rng.choice([1, 2])}",
            lambda: f"22-23,0-{rng.randint(1, 3)}",
        ])()

    day = rng.choice(["*"] * 6 + [str(change_day), f"{max(change_day - 1, 1)}-{min(change_day + 1, 31)}", f"1-{change_day}",
                                  f"{change_day},{change_day % 28 + 3}"])
    month = rng.choice(["*"] * 7 + [CRON_MONTHS[change_month - 1], f"{change_month}", "mar-apr,oct-nov"])
    weekday = rng.choice(["*"] * 6 + ["0", "7", "sun", "SAT,Sun", "1-5", "mon-fri", "5-7", "0-6/2"])
    return f"{minutes()} {hours()} {day} {month} {weekday}"


def test_schedule_next_agrees_with_a_minute_by_minute_reference_around_daylight_saving_changes():
    import datetime
    import zoneinfo
    rng = random.Random(11)
    horizon_s = 3 * 86400
    seen = collections.Counter()
    cases = 0
    while cases < 42:
        zone_name = rng.choice(sorted(DST_CHANGES))
        zone = zoneinfo.ZoneInfo(zone_name)
        change = iso_epoch(rng.choice(DST_CHANGES[zone_name]).replace("Z", ".000Z"))
        start = change - rng.uniform(0, 2 * 86400)
        start = round(start / 60) * 60 if rng.random() < 0.3 else round(start, 3)  # on a minute, or not
        change_date = datetime.datetime.fromtimestamp(change, zone).date()
        cron = random_cron(rng, change_date.day, change_date.month)
        case_seen = collections.Counter()
        expected = reference_ticks(ReferenceCron(cron), zone, start, horizon_s, case_seen)
        if not expected or len(expected) >= 1000:
            continue  # not dense enough to say something within the horizon, or too dense to list
        cases += 1
        seen.update(case_seen)
        got = schedule_next(cron, "--tz", zone_name, "--from", repr(start), "--count", len(expected) + 1)
        context = (cron, zone_name, start)
        assert got[:-1] == [time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t)) for t in expected], context
        assert iso_epoch(got[-1]) > start + horizon_s, context
    # The seed reaches every rule that daylight saving brings.
    assert all(seen[kind] for kind in ("after a gap", "second of a repeated time",
                                       "repeated time not fired twice")), seen


# Firing, with real supervisors. Ticks of `@every 1s` are whole seconds (the
# anchor is the whole second after the schedule was added), so a schedule's
# jobs NAME@<tick> are checked as a run of consecutive seconds.

TICK_ID_RE = re.compile(r"(?P<name>[A-Za-z0-9._-]+)@(?P<tick>\d{8}T\d{6}Z)")


def schedule_add(name, cron, *argv):
    """`schedule add NAME CRON ARGV`, which must succeed; the first tick it announces (epoch s)."""
    code, out, err = cli("schedule", "add", name, cron, *argv)
    assert code == 0, err
    match = re.fullmatch(rf"added schedule {re.escape(name)}: next tick (\S+)\n", out)
    assert match, out
    return iso_epoch(match.group(1))


def schedule_show(name):
    """`schedule show NAME --json` as a dict."""
    code, out, err = cli("schedule", "show", name, "--json")
    assert code == 0, err
    return json.loads(out)


def schedule_list():
    """`schedule list --json` as a list."""
    code, out, err = cli("schedule", "list", "--json")
    assert code == 0, err
    return json.loads(out)


def iso_z(epoch):
    """A whole second as queuectl prints it: 2026-03-08T07:00:00.000Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(epoch))


def tick_of(job_id):
    """The tick (epoch s) in a job id NAME@YYYYMMDDTHHMMSSZ."""
    return calendar.timegm(time.strptime(TICK_ID_RE.fullmatch(job_id)["tick"], "%Y%m%dT%H%M%SZ"))


def tick_jobs(name):
    """The jobs a schedule's ticks made (not those of `schedule run`), oldest tick first."""
    jobs = [job for job in all_jobs() if (m := TICK_ID_RE.fullmatch(job["id"])) and m["name"] == name]
    return sorted(jobs, key=lambda job: tick_of(job["id"]))


def fired_ticks(name):
    """The ticks (epoch s) a schedule made jobs for, oldest first."""
    return [tick_of(job["id"]) for job in tick_jobs(name)]


def all_ended(name):
    """A schedule's tick jobs once every one of them ended, else None."""
    jobs = tick_jobs(name)
    return jobs if all(job["state"] in queuectl.END_STATES for job in jobs) else None


def supervisor_started_at(proc):
    """The time stamp of a pool() supervisor's "supervisor PID started" log line, or None before it.

    The supervisor logs it just after it took the time it started at: ticks
    before that were missed, the later ones it fires on time.
    """
    match = re.search(r"^(\S+) supervisor \d+ started", log_text(proc), re.MULTILINE)
    return iso_epoch(match.group(1)) if match else None


def state_of(job_id):
    """A job's state, or None while there is no such job."""
    code, out, _ = cli("show", job_id, "--json")
    return json.loads(out)["state"] if code == 0 else None


def second_before(instant):
    """The latest whole second before an instant (epoch s)."""
    return int(instant) - 1 if instant == int(instant) else int(instant)


def pause_schedule(name):
    """`schedule pause NAME`: nothing fires after it returns."""
    assert cli("schedule", "pause", name) == (0, f"paused schedule {name}\n", "")


def assert_consecutive(ticks):
    """Every second from the first tick to the last, each once."""
    assert ticks == list(range(ticks[0], ticks[-1] + 1)), ticks


@pytest.mark.parametrize("supervisors", [1, 2])
def test_every_tick_makes_exactly_one_job_consecutive_and_run_once_under_one_or_two_supervisors(
        fast, pool, supervisors):
    procs = [pool("--count", "1") for _ in range(supervisors)]
    assert wait_until(lambda: all(supervisor_started_at(proc) for proc in procs)), [log_text(p) for p in procs]
    first = schedule_add("beat", "@every 1s", "--tz", "UTC", "-c", 'echo "$QUEUECTL_SCHEDULED_AT"')
    assert wait_until(lambda: len(fired_ticks("beat")) >= 5, timeout=20), [log_text(proc) for proc in procs]
    pause_schedule("beat")
    jobs = wait_until(lambda: all_ended("beat"))
    assert jobs, [log_text(proc) for proc in procs]
    ticks = [tick_of(job["id"]) for job in jobs]
    assert ticks[0] == first  # every tick from the first, each once: the ids are unique by construction
    assert_consecutive(ticks)
    for job in jobs:
        assert (job["state"], job["attempts"]) == ("completed", 1), job
        assert job["stdout"] == iso_z(tick_of(job["id"])) + "\n", job
        assert [run["outcome"] for run in runs_of(job["id"])] == ["completed"]
    if supervisors == 2:  # both fired: each logs the jobs it made, and neither made one twice
        made = [re.findall(r"schedule fired job (\S+)", log_text(proc)) for proc in procs]
        assert sorted(made[0] + made[1]) == [job["id"] for job in jobs]


@pytest.mark.parametrize("policy", ["latest", "all", "none"])
def test_ticks_missed_while_no_supervisor_ran_follow_the_catch_up_policy_and_later_ticks_all_fire(
        fast, pool, policy):
    first = schedule_add("late", "@every 1s", "--tz", "UTC", "--catch-up", policy, "-c", "true")
    assert wait_until(lambda: time.time() > first + 2.5)  # first, first + 1 and first + 2 went by unfired
    assert fired_ticks("late") == []
    started = time.time()
    proc = pool("--count", "1")
    assert wait_until(lambda: supervisor_started_at(proc)), log_text(proc)
    logged = supervisor_started_at(proc)  # the supervisor counts its start between started and logged
    assert wait_until(lambda: any(tick > logged + 2 for tick in fired_ticks("late")), timeout=20), log_text(proc)
    pause_schedule("late")
    ticks = fired_ticks("late")
    assert_consecutive(ticks)  # the ticks after the start all fire, and follow any missed one at once
    last_missed = second_before(started)  # the latest tick surely before the start (ticks are whole seconds)
    assert last_missed >= first + 2
    if policy == "all":
        assert ticks[0] == first
    elif policy == "latest":  # the latest missed tick only: last_missed, or a later one if the start was slow
        assert last_missed <= ticks[0] < logged, (ticks, started, logged)  # the start came between those two
    else:
        assert ticks[0] > started - 0.001, (ticks, started)
        assert ticks[0] <= logged + 1, (ticks, logged)  # the first tick after the start fired


def test_no_overlap_skips_ticks_while_the_last_job_runs_and_fires_again_once_it_ended(fast, pool, tmp_path):
    proc = pool("--count", "2")  # a free worker: an overlapping job would run at once
    assert wait_until(lambda: supervisor_started_at(proc)), log_text(proc)
    spans = shlex.quote(str(tmp_path / "spans"))
    first = schedule_add("solo", "@every 1s", "--tz", "UTC", "--no-overlap", "-c",
                         f's=$(date +%s%N); {gate()}; echo "$s $(date +%s%N)" >> {spans}')
    first_id = f"solo@{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(first))}"
    assert wait_until(lambda: state_of(first_id) == "processing"), log_text(proc)
    running_since = time.time()
    assert wait_until(lambda: time.time() > running_since + 3.5)  # three ticks or more came while it ran
    assert [job["id"] for job in tick_jobs("solo")] == [first_id]
    assert show(first_id)["state"] == "processing"
    (tmp_path / "go").touch()
    assert wait_until(lambda: len(fired_ticks("solo")) >= 3, timeout=20), log_text(proc)
    pause_schedule("solo")
    jobs = wait_until(lambda: all_ended("solo"))
    assert jobs and all(job["state"] == "completed" for job in jobs), log_text(proc)
    ticks = [tick_of(job["id"]) for job in jobs]
    assert ticks[1] > first + 3, ticks  # the ticks that came while the first job ran were skipped, not put off
    assert most_at_once(start_end_intervals(tmp_path / "spans")) == 1
    for before, after in ((jobs[n - 1], jobs[n]) for n in range(1, len(jobs))):  # each made once the one before ended
        assert runs_of(after["id"])[0]["started_at"] >= before["finished_at"], (before, after)


def test_a_paused_schedule_fires_nothing_and_resuming_fires_only_the_ticks_after_it(fast, pool):
    proc = pool("--count", "1")
    assert wait_until(lambda: supervisor_started_at(proc)), log_text(proc)
    schedule_add("nap", "@every 1s", "--tz", "UTC", "-c", "true")
    assert wait_until(lambda: len(fired_ticks("nap")) >= 2, timeout=20), log_text(proc)
    pause_schedule("nap")
    paused_at, before = time.time(), fired_ticks("nap")
    shown = schedule_show("nap")
    assert (shown["paused"], shown["next_tick_at"]) == (True, None)
    assert [(s["name"], s["paused"], s["next_tick_at"]) for s in schedule_list()] == [("nap", True, None)]
    assert wait_until(lambda: time.time() > paused_at + 3.5)  # three ticks or more while paused
    assert fired_ticks("nap") == before
    resumed_at = time.time()
    assert cli("schedule", "resume", "nap") == (0, "resumed schedule nap\n", "")
    resumed_by = time.time()
    shown = schedule_show("nap")
    assert shown["paused"] is False and iso_epoch(shown["next_tick_at"]) > resumed_at
    assert wait_until(lambda: len(fired_ticks("nap")) >= len(before) + 2, timeout=20), log_text(proc)
    pause_schedule("nap")
    after = fired_ticks("nap")[len(before):]
    assert after[0] > resumed_at, (after, resumed_at)  # none of the ticks missed while paused fired
    assert after[0] <= int(resumed_by) + 1, (after, resumed_by)  # nor was one after the resume skipped
    assert_consecutive(after)


def test_schedule_run_makes_one_job_now_with_the_schedule_in_its_environment(fast):
    schedule_add("nightly", "0 3 * * *", "--tz", "UTC", json.dumps(
        {"command": 'echo "$QUEUECTL_SCHEDULE $QUEUECTL_SCHEDULED_AT $QUEUECTL_JOB_ID"', "queue": "q"}))
    before = time.time()
    code, out, err = cli("schedule", "run", "nightly")
    after = time.time()
    assert (code, err) == (0, "")
    job_id = out.strip()
    assert out == job_id + "\n" and job_id.startswith("nightly@run.")
    job = show(job_id)
    assert (job["state"], job["queue"]) == ("pending", "q")
    at = job["env"]["QUEUECTL_SCHEDULED_AT"]
    assert job["env"]["QUEUECTL_SCHEDULE"] == "nightly"
    assert before - 0.001 <= iso_epoch(at) <= after, (before, at, after)  # now, to the millisecond
    assert schedule_show("nightly")["last_job_id"] == job_id
    code, again, _ = cli("schedule", "run", "nightly")
    assert code == 0 and again.strip() != job_id
    burst()
    job = show(job_id)
    assert (job["state"], job["stdout"]) == ("completed", f"nightly {at} {job_id}\n")
    assert tick_jobs("nightly") == []  # neither run was a tick
    code, out, err = cli("schedule", "run", "nope")
    assert (code, out) == (1, "")
    assert error_line(err) == "queuectl: error: schedule 'nope' not found"


def test_removing_a_schedule_keeps_its_jobs_and_fires_no_more(fast, pool):
    proc = pool("--count", "1")
    assert wait_until(lambda: supervisor_started_at(proc)), log_text(proc)
    schedule_add("gone", "@every 1s", "--tz", "UTC", "-c", "true")
    assert wait_until(lambda: len(fired_ticks("gone")) >= 2, timeout=20), log_text(proc)
    assert cli("schedule", "remove", "gone") == (0, "removed schedule gone\n", "")
    removed_at, kept = time.time(), fired_ticks("gone")
    code, out, err = cli("schedule", "show", "gone")
    assert (code, out, error_line(err)) == (1, "", "queuectl: error: schedule 'gone' not found")
    assert wait_until(lambda: time.time() > removed_at + 2.5)
    assert fired_ticks("gone") == kept
    assert wait_until(lambda: all_ended("gone")), log_text(proc)
    assert {job["state"] for job in tick_jobs("gone")} == {"completed"}


def test_purging_a_schedules_jobs_never_fires_their_ticks_again(fast, pool):
    proc = pool("--count", "1")
    assert wait_until(lambda: supervisor_started_at(proc)), log_text(proc)
    schedule_add("tidy", "@every 1s", "--tz", "UTC", "-c", "true")
    purged = set()
    for _ in range(3):  # purge while the supervisor fires on
        assert wait_until(lambda: any(job["state"] == "completed" for job in tick_jobs("tidy")), timeout=20), \
            log_text(proc)
        seen = {job["id"] for job in tick_jobs("tidy")}
        code, out, err = cli("purge", "--state", "completed")
        assert code == 0 and out.startswith("purged "), err
        purged |= seen - {job["id"] for job in all_jobs()}
        assert not purged & {job["id"] for job in all_jobs()}
    last_purge = time.time()
    assert wait_until(lambda: any(tick > last_purge + 2 for tick in fired_ticks("tidy")), timeout=20), \
        log_text(proc)
    pause_schedule("tidy")
    left = {job["id"] for job in tick_jobs("tidy")}
    assert len(purged) >= 3 and left
    assert not purged & left, purged & left


def test_a_fired_job_sees_its_schedule_tick_and_id_and_carries_the_templates_fields(fast, pool):
    template = {"command": 'echo "$QUEUECTL_SCHEDULE|$QUEUECTL_SCHEDULED_AT|$QUEUECTL_JOB_ID|$COLOR"',
                "env": {"COLOR": "blue"}, "queue": "paint", "priority": 7, "max_retries": 4, "timeout": 30}
    proc = pool("--count", "1", "--queue", "paint")
    assert wait_until(lambda: supervisor_started_at(proc)), log_text(proc)
    schedule_add("paint", "@every 1s", "--tz", "UTC", json.dumps(template))
    assert schedule_show("paint")["job"] == template
    assert wait_until(lambda: any(job["state"] == "completed" for job in tick_jobs("paint")), timeout=20), \
        log_text(proc)
    pause_schedule("paint")
    job = next(job for job in tick_jobs("paint") if job["state"] == "completed")
    tick = iso_z(tick_of(job["id"]))
    assert job["stdout"] == f"paint|{tick}|{job['id']}|blue\n"
    assert (job["command"], job["queue"], job["priority"], job["max_retries"], job["timeout"]) == (
        template["command"], "paint", 7, 4, 30)
    assert job["env"]["COLOR"] == "blue"
    assert schedule_show("paint")["last_tick_at"] >= tick


def test_schedule_add_takes_the_job_flags_of_enqueue_and_json_after_the_options(db):
    schedule_add("flags", "*/5 * * * *", "--tz", "Europe/Berlin", "-c", "make", "--max-retries", "4",
                 "--timeout", "9", "--priority", "-2", "--queue", "ci", "--catch-up", "all", "--no-overlap")
    shown = schedule_show("flags")
    assert shown["job"] == {"command": "make", "max_retries": 4, "timeout": 9, "priority": -2, "queue": "ci"}
    assert (shown["cron"], shown["tz"], shown["catch_up"], shown["no_overlap"], shown["paused"]) == (
        "*/5 * * * *", "Europe/Berlin", "all", True, False)
    assert (shown["last_tick_at"], shown["last_job_id"]) == (None, None)
    next_tick = iso_epoch(shown["next_tick_at"])
    assert next_tick % 300 == 0 and iso_epoch(shown["created_at"]) < next_tick <= iso_epoch(shown["created_at"]) + 300
    schedule_add("late-json", "@daily", "--tz", "UTC", "--catch-up", "none", '{"command": "true"}')
    shown = schedule_show("late-json")
    assert (shown["job"], shown["catch_up"], shown["no_overlap"]) == ({"command": "true"}, "none", False)
    assert set(shown) == {"name", "cron", "tz", "job", "paused", "catch_up", "no_overlap", "created_at",
                          "last_tick_at", "last_job_id", "next_tick_at"}
    assert [s["name"] for s in schedule_list()] == ["flags", "late-json"]
    assert schedule_list()[1] == shown


@pytest.mark.parametrize("argv, code, words", [
    (("s", "@hourly", '{"command": "true", "id": "x"}'), 2, ["'id'"]),
    (("s", "@hourly", '{"command": "true", "run_at": "2030-01-01T00:00:00Z"}'), 2, ["'run_at'"]),
    (("s", "@hourly", '{"command": "true", "delay": 5}'), 2, ["'delay'"]),
    (("s", "@hourly", '{"command": "true", "depends_on": []}'), 2, ["'depends_on'"]),
    (("s", "@hourly", '{"command": "true", "priority": "high"}'), 2, ["priority"]),
    (("s", "@hourly", '{"command": '), 2, ["JSON"]),
    (("s", "@hourly"), 2, ["-c"]),
    (("s", "@hourly", '{"command": "true"}', "-c", "true"), 2, ["-c"]),
    (("taken", "@hourly", "-c", "true"), 1, ["'taken'", "exists"]),
    (("bad name", "@hourly", "-c", "true"), 2, ["bad name"]),
    (("a/b", "@hourly", "-c", "true"), 2, ["a/b"]),
    (("x" * 65, "@hourly", "-c", "true"), 2, ["x" * 65]),
    (("", "@hourly", "-c", "true"), 2, ["name"]),
    (("s", "61 * * * *", "-c", "true"), 2, ["minute", "61"]),
    (("s", "@hourly", "--tz", "Nowhere/Atlantis", "-c", "true"), 2, ["Nowhere/Atlantis"]),
], ids=["id", "run_at", "delay", "depends_on", "bad-field", "bad-json", "no-job", "two-jobs", "name-exists",
        "space-in-name", "slash-in-name", "name-too-long", "empty-name", "bad-cron", "unknown-zone"])
def test_a_refused_schedule_add_is_one_error_line_and_adds_nothing(db, argv, code, words):
    schedule_add("taken", "@hourly", "--tz", "UTC", "-c", "true")
    line = refused("schedule", "add", *argv, *(() if "--tz" in argv else ("--tz", "UTC")), code=code)
    assert all(word in line for word in words), line


def test_unknown_names_are_exit_1_for_every_schedule_command_and_change_nothing(db):
    schedule_add("real", "@hourly", "--tz", "UTC", "-c", "true")
    for action in ("show", "run", "remove", "pause", "resume"):
        names = ("nope",) if action in ("show", "run") else ("real", "nope")
        line = refused("schedule", action, *names, code=1)
        assert line == "queuectl: error: schedule 'nope' not found"
    assert schedule_show("real")["paused"] is False


def test_without_zone_data_a_named_zone_is_one_error_line_exit_2_and_utc_still_works(db):
    import importlib.util
    if importlib.util.find_spec("tzdata") is not None:
        pytest.skip("the tzdata package provides zone data whatever PYTHONTZPATH says")
    env = {**os.environ, "PYTHONTZPATH": "/nonexistent"}
    result = run("schedule", "next", "0 3 * * *", "--tz", "Europe/Berlin", env=env)
    assert (result.returncode, result.stdout) == (2, "")
    assert "zone data" in error_line(result.stderr)
    result = run("schedule", "add", "berlin", "0 3 * * *", "--tz", "Europe/Berlin", "-c", "true", env=env)
    assert (result.returncode, result.stdout) == (2, "")
    assert "zone data" in error_line(result.stderr)
    result = run("schedule", "next", "0 3 * * *", "--tz", "UTC", "--from", "2026-01-01T00:00:00Z", "--count", "2",
                 "--json", env=env)
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout) == ["2026-01-01T03:00:00.000Z", "2026-01-02T03:00:00.000Z"]
    result = run("schedule", "add", "utc", "0 3 * * *", "--tz", "UTC", "-c", "true", env=env)
    assert result.returncode == 0, result.stderr
    assert [s["name"] for s in schedule_list()] == ["utc"]


def test_a_burst_worker_fires_no_schedule(fast, pool, tmp_path):
    first = schedule_add("beat", "@every 1s", "--tz", "UTC", "-c", "true")
    enqueue("-c", gate(), "--id", "hold")  # keeps the burst worker going
    proc = pool("--burst", "--count", "1")
    assert wait_until(lambda: state_of("hold") == "processing"), log_text(proc)
    since = max(time.time(), first)
    assert wait_until(lambda: time.time() > since + 2.5)  # two ticks or more came while it ran
    (tmp_path / "go").touch()
    assert proc.wait(timeout=30) == 0, log_text(proc)
    assert fired_ticks("beat") == []
    assert show("hold")["state"] == "completed"


def test_no_overlap_skips_ticks_while_an_earlier_job_runs_even_after_a_later_run_job_ended(fast, pool, tmp_path):
    proc = pool("--count", "2")
    assert wait_until(lambda: supervisor_started_at(proc)), log_text(proc)
    first = schedule_add("solo", "@every 1s", "--tz", "UTC", "--no-overlap", "-c", gate())
    first_id = f"solo@{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(first))}"
    assert wait_until(lambda: state_of(first_id) == "processing"), log_text(proc)
    code, out, err = cli("schedule", "run", "solo")
    assert code == 0, err
    assert cli("cancel", out.strip())[0] == 0  # the later job ended; the earlier one still runs
    canceled_at = time.time()
    assert wait_until(lambda: time.time() > canceled_at + 2.5)  # two ticks or more
    assert state_of(first_id) == "processing"
    assert [job["id"] for job in tick_jobs("solo")] == [first_id]


def test_a_tick_that_came_while_a_supervisor_ran_is_not_missed_when_another_supervisor_starts_just_after_it(db):
    # In-process, with the clock given: supervisor A runs from 999 and looks
    # every 0.2 s; B starts at 1001.1, just after the tick 1001, and looks
    # before A does. The tick came while A ran: with --catch-up none too it
    # must fire, once.
    cli("init")
    conn = queuectl.connect(db)
    try:
        queuectl.register_process(conn, "A", "supervisor", None, [], now=999.0, fires_schedules=True)  # A, in the registry
        queuectl.add_schedule(conn, "s", "@every 1s", "UTC", {"command": "true"}, "none", False, now=1000.0)
        assert queuectl.fire_due_schedules(conn, running_since=999.0, now=1000.9) == []  # A: nothing due yet
        queuectl.fire_due_schedules(conn, running_since=1001.1, now=1001.15)  # B, just started
        queuectl.fire_due_schedules(conn, running_since=999.0, now=1001.2)  # A, on time
        assert [row[0] for row in conn.execute("SELECT id FROM jobs ORDER BY id")] == [queuectl.tick_id("s", 1001)]
    finally:
        conn.close()


def test_ticks_that_came_while_only_a_burst_supervisor_ran_were_missed(db):
    # A --burst supervisor never fires schedules: its being alive must not
    # make the ticks of its time count as on time.
    cli("init")
    conn = queuectl.connect(db)
    try:
        queuectl.register_process(conn, "B", "supervisor", None, [], now=999.0, fires_schedules=False)
        queuectl.add_schedule(conn, "s", "@every 1s", "UTC", {"command": "true"}, "none", False, now=1000.0)
        assert queuectl.fire_due_schedules(conn, running_since=1005.5, now=1005.6) == []
    finally:
        conn.close()


def test_a_job_merely_named_like_a_schedules_does_not_hold_back_its_no_overlap(fast, pool):
    enqueue("-c", "sleep 30", "--id", "solo@manual", "--queue", "elsewhere")  # pending: no worker takes it
    first = schedule_add("solo", "@every 1s", "--tz", "UTC", "--no-overlap", "-c", "true")
    proc = pool("--count", "1", "--queue", "default")
    assert wait_until(lambda: len(tick_jobs("solo")) >= 2), log_text(proc)
    assert first > 0


@sqlite_only
def test_a_version_5_database_is_upgraded_and_its_jobs_run(db):
    with contextlib.closing(sqlite3.connect(db)) as conn:  # what queuectl wrote at schema 5
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in (queuectl.SCHEMA_V1 + queuectl.SCHEMA_V2 + queuectl.SCHEMA_V3 + queuectl.SCHEMA_V4
                          + queuectl.SCHEMA_V5):
            conn.execute(statement)
        conn.execute("INSERT INTO jobs (id, command, queue, priority, max_retries, timeout_s, delay_s, env, "
                     "depends_on, deps_left, state, run_at, is_due, created_at, updated_at) "
                     "VALUES ('old', 'echo old', 'default', 0, 3, 0, 0, '{}', '[]', 0, 'pending', 0, 1, 0, 0)")
        conn.executemany("INSERT INTO job_counts (queue, state, n) VALUES ('default', ?, ?)",
                         [(state, int(state == "pending")) for state in queuectl.STATES])
        conn.execute("PRAGMA user_version = 5")
        conn.commit()
    burst()
    job = show("old")
    assert (job["state"], job["stdout"], [r["outcome"] for r in job["runs"]]) == ("completed", "old\n", ["completed"])
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == queuectl.SCHEMA_VERSION == 9

# ---------------------------------------------------------------------------
# The dashboard: its API and its safety (http.client)
# ---------------------------------------------------------------------------

DASHBOARD_URL_RE = re.compile(r"http://(?P<host>127\.0\.0\.1):(?P<port>\d+)/\?token=(?P<token>\S+)\n")
LOCAL_SOURCES = {"'self'", "'none'", "data:"}  # what a CSP may allow: nothing from another origin
SAFETY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                  "X-Frame-Options": "DENY", "Cache-Control": "no-store"}


class Dashboard:
    """A running `dashboard` process: its address and token, its request log, and requests to it."""

    def __init__(self, proc, log_path, url, host, port, token):
        self.proc, self.log_path, self.url = proc, log_path, url
        self.host, self.port, self.token = host, port, token
        self.address = f"{host}:{port}"

    def log(self):
        """What the dashboard wrote on stderr so far."""
        return self.log_path.read_text(errors="replace")

    def raw(self, method, path, headers=None, token=True, body=None):
        """One request; (status, headers, body bytes).

        Host is this server's unless headers give another (None: no Host at
        all). token True sends `Authorization: Bearer TOKEN`, a string sends
        that as the bearer, False sends none. A dict or list body goes as JSON.
        """
        sent = {"Host": self.address}
        if token:
            sent["Authorization"] = f"Bearer {self.token if token is True else token}"
        if isinstance(body, (dict, list)):
            body, sent["Content-Type"] = json.dumps(body).encode(), "application/json"
        elif isinstance(body, str):
            body = body.encode()
        if body is not None or method == "POST":
            sent["Content-Length"] = str(len(body or b""))
        sent.update(headers or {})
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in sent.items():
                if value is not None:
                    conn.putheader(name, value)
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def request(self, method, path, headers=None, token=True, body=None):
        """One request; (status, headers, the body parsed as JSON if it is JSON, else its text)."""
        code, response_headers, data = self.raw(method, path, headers, token, body)
        if "json" in (response_headers.get("Content-Type") or ""):
            return code, response_headers, json.loads(data)
        return code, response_headers, data.decode(errors="replace")

    def ok(self, method, path, **kwargs):
        """The parsed body of a request that must answer 200."""
        code, _, doc = self.request(method, path, **kwargs)
        assert code == 200, (method, path, code, doc)
        return doc

    def get(self, path, **kwargs):
        """GET path, which must answer 200; its parsed body."""
        return self.ok("GET", path, **kwargs)

    def post(self, path, **kwargs):
        """POST path, which must answer 200; its parsed body."""
        return self.ok("POST", path, **kwargs)

    def refused(self, method, path, code, **kwargs):
        """A request that must answer code with exactly {"error": one line}; that line."""
        got, _, doc = self.request(method, path, **kwargs)
        assert got == code, (method, path, got, doc)
        assert isinstance(doc, dict) and list(doc) == ["error"], doc
        assert isinstance(doc["error"], str) and doc["error"] and "\n" not in doc["error"], doc
        return doc["error"]

    def agrees(self, path, expected):
        """Whether GET path comes to answer what expected() says, within the snapshot interval and then some."""
        return wait_until(lambda: self.get(path) == expected(), timeout=10, interval=0.1)


def first_stdout_line(proc, timeout=30):
    """The first line a process prints on stdout, or "" if it printed none before it ended or the deadline."""
    lines = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


@pytest.fixture
def dashboard_server(db, tmp_path):
    """start(*argv, env=None): `dashboard --port 0 ARGV` as a real process on the test's database.

    env adds variables to the test's environment. Its stderr goes to a file
    (a busy log never blocks on a pipe). At teardown each one gets SIGTERM
    and must exit 0, having printed nothing after its address line and never
    its token on stderr.
    """
    started = []

    def start(*argv, env=None):
        log_path = tmp_path / f"dashboard-{len(started) + 1}.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen([sys.executable, SCRIPT, "dashboard", "--port", "0", *map(str, argv)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                    env=None if env is None else {**os.environ, **env})
        entry = {"proc": proc, "log_path": log_path, "token": None}
        started.append(entry)
        line = first_stdout_line(proc)
        match = DASHBOARD_URL_RE.fullmatch(line)
        assert match, (line, log_path.read_text(errors="replace"))
        entry["token"] = match["token"]
        return Dashboard(proc, log_path, line.strip(), match["host"], int(match["port"]), match["token"])

    yield start
    problems = []
    for entry in started:
        proc = entry["proc"]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            problems.append(f"pid {proc.pid} did not exit on SIGTERM")
        rest = proc.stdout.read()
        proc.stdout.close()
        log = entry["log_path"].read_text(errors="replace")
        if proc.returncode != 0:
            problems.append(f"pid {proc.pid} exited {proc.returncode}")
        if "Traceback" in log:
            problems.append(f"pid {proc.pid} logged a traceback: {log[log.index('Traceback'):][:3000]}")
        if entry["token"] and entry["token"] in log:
            problems.append(f"pid {proc.pid} wrote its token on stderr")
        if rest:
            problems.append(f"pid {proc.pid} printed more than its address line: {rest!r}")
    assert problems == [], "\n".join(problems)


@pytest.fixture
def dashboard(dashboard_server):
    """A dashboard with the defaults (but a free port) on the test's database."""
    return dashboard_server()


def api_jobs(dash, **params):
    """Every job GET /api/jobs gives for params, following "next" until it is null; (jobs, page sizes)."""
    jobs, sizes, before = [], [], None
    for _ in range(1000):
        query = dict(params, **({"before": before} if before else {}))
        page = dash.get("/api/jobs" + ("?" + urllib.parse.urlencode(query) if query else ""))
        assert set(page) == {"jobs", "next"}, page
        jobs += page["jobs"]
        sizes.append(len(page["jobs"]))
        before = page["next"]
        if before is None:
            return jobs, sizes
    raise AssertionError("the pages never ended")


OUTPUT_FIELDS = ("run", "stream", "from", "data", "written", "skipped", "finished", "state", "last_run")


def output_fields(doc):
    """The fields spec'd for GET /api/jobs/ID/output (it may carry more, such as where the data ends)."""
    assert set(OUTPUT_FIELDS) <= set(doc), doc
    return {field: doc[field] for field in OUTPUT_FIELDS}


def logged_requests(log):
    """(METHOD, PATH without any token parameter, STATUS) of each request line a dashboard logged."""
    requests = []
    for line in log.splitlines():
        match = re.fullmatch(r"(?:.*\s)?([A-Z]+) (/\S*) (\d{3})", line)
        if match:
            parts = urllib.parse.urlsplit(match[2])
            query = "&".join(pair for pair in parts.query.split("&") if pair and not pair.startswith("token="))
            requests.append((match[1], parts.path + ("?" + query if query else ""), int(match[3])))
    return requests


def listed(*argv):
    """`list --json --limit 0 ARGV` as a list."""
    code, out, err = cli("list", "--json", "--limit", "0", *argv)
    assert code == 0, err
    return json.loads(out)


def queue_of(name):
    """One queue's object in `queue list --json`."""
    return next(queue for queue in queue_list() if queue["queue"] == name)


def without_heartbeats(processes):
    """Worker list entries without heartbeat_at, which moves on while they live."""
    return [{key: value for key, value in process.items() if key != "heartbeat_at"} for process in processes]


def everything():
    """All a dashboard could change: every job with its fields, the queues, the schedules."""
    return all_jobs(), queue_list(), schedule_list()


def dead_job(job_id):
    """A job that failed its only run and is dead."""
    enqueue("-c", "exit 3", "--id", job_id, "--max-retries", "0")
    burst()
    assert show(job_id)["state"] == "dead"


# The API answers what the commands' --json print

def test_api_status_answers_what_status_json_prints(fast, dashboard_server):
    enqueue("-c", "true", "--id", "ok")
    enqueue("-c", "exit 1", "--id", "bad", "--max-retries", "0")
    burst()
    enqueue("-c", "true", "--id", "later", "--delay", "3600")
    enqueue("-c", "true", "--id", "gone", "--delay", "3600")
    assert cli("cancel", "gone")[0] == 0
    dash = dashboard_server()
    doc = dash.get("/api/status")
    assert doc == status()
    assert doc["jobs"] == {"pending": 1, "processing": 0, "completed": 1, "failed": 0, "dead": 1, "canceled": 1}
    enqueue("-c", "true", "--delay", "3600")  # the CLI's changes reach the API within the snapshot interval
    assert dash.agrees("/api/status", status)
    assert dash.get("/api/status")["jobs"]["pending"] == 2


def test_api_jobs_pages_newest_first_50_by_default_and_next_pages_by_before(db, dashboard):
    enqueue_lines(jsonl(*({"id": f"p{n:03d}", "command": f"echo {n}"} for n in range(120))))
    jobs, sizes = api_jobs(dashboard)
    assert sizes == [50, 50, 20]
    assert jobs == all_jobs()
    assert [job["id"] for job in jobs] == [f"p{n:03d}" for n in range(119, -1, -1)]
    page = dashboard.get("/api/jobs?limit=7")
    assert [job["id"] for job in page["jobs"]] == [f"p{n:03d}" for n in range(119, 112, -1)]
    assert page["next"] is not None
    jobs, sizes = api_jobs(dashboard, limit=500)
    assert (sizes, jobs) == ([120], all_jobs())
    dashboard.refused("GET", "/api/jobs?before=nope", 404)


def test_api_jobs_filter_by_state_queue_and_text_as_list_does(fast, dashboard_server):
    enqueue("-c", "echo one", "--id", "alpha-1", "--queue", "a")
    enqueue("-c", "exit 1", "--id", "broken", "--queue", "a", "--max-retries", "0")
    burst()
    enqueue_lines(jsonl(*({"id": f"filler-{n}", "command": "true", "queue": "b", "delay": 3600}
                          for n in range(150))))
    enqueue("-c", "echo alpha", "--id", "beta-2", "--queue", "b", "--delay", "3600")
    enqueue("-c", "echo Alpha", "--id", "gamma", "--queue", "a", "--delay", "3600")
    dash = dashboard_server()
    for params, argv in (({"state": "pending"}, ("--state", "pending")),
                         ({"state": "completed,dead"}, ("--state", "completed,dead")),
                         ({"queue": "a"}, ("--queue", "a")),
                         ({"state": "pending", "queue": "a"}, ("--state", "pending", "--queue", "a")),
                         ({"queue": "nowhere"}, ("--queue", "nowhere"))):
        assert api_jobs(dash, **params)[0] == listed(*argv), params
    every = all_jobs()
    for text in ("alpha", "ALPHA", "filler-14", "echo", "nothing-like-it"):  # in id or command, any case
        expected = [job for job in every if text.lower() in job["id"].lower() or text.lower() in job["command"].lower()]
        assert api_jobs(dash, q=text)[0] == expected, text
    assert [job["id"] for job in api_jobs(dash, q="alpha")[0]] == ["gamma", "beta-2", "alpha-1"]
    assert [job["id"] for job in api_jobs(dash, q="alpha", queue="a", state="completed")[0]] == ["alpha-1"]


def test_api_job_and_why_answer_what_show_and_why_print(fast, dashboard_server):
    enqueue("-c", "echo hi", "--id", "done")
    burst()
    assert cli("queue", "pause", "held")[0] == 0
    enqueue("-c", "true", "--id", "waiting", "--queue", "held", "--after", "done", "--priority", "3")
    dash = dashboard_server()
    for job_id in ("done", "waiting"):
        assert dash.get(f"/api/jobs/{job_id}") == show(job_id)
        assert dash.get(f"/api/jobs/{job_id}/why") == why(job_id)
    assert "queue_paused" in [reason["code"] for reason in dash.get("/api/jobs/waiting/why")["reasons"]]
    assert dash.get("/api/jobs/done")["runs"][0]["outcome"] == "completed"


def test_api_output_gives_each_runs_kept_stdout_or_stderr_from_an_offset(fast, dashboard):
    command = 'echo "attempt $QUEUECTL_ATTEMPT"; printf "err $QUEUECTL_ATTEMPT" >&2; [ "$QUEUECTL_ATTEMPT" -ge 2 ]'
    enqueue("-c", command, "--id", "j", "--max-retries", "1")
    burst()
    assert show("j")["state"] == "completed"

    def output(stream, run, data, start=0):
        return {"run": run, "stream": stream, "from": start, "data": data, "written": len(data) + start,
                "skipped": 0, "finished": True, "state": "completed", "last_run": 2}

    assert output_fields(dashboard.get("/api/jobs/j/output")) == output("stdout", 2, "attempt 2\n")
    assert output_fields(dashboard.get("/api/jobs/j/output?run=1")) == output("stdout", 1, "attempt 1\n")
    assert output_fields(dashboard.get("/api/jobs/j/output?run=1&stream=stderr")) == output("stderr", 1, "err 1")
    assert output_fields(dashboard.get("/api/jobs/j/output?stream=stdout&from=8")) == output("stdout", 2, "2\n", 8)
    assert cli("logs", "j", "--run", "1") == (0, dashboard.get("/api/jobs/j/output?run=1")["data"], "")
    dashboard.refused("GET", "/api/jobs/j/output?run=3", 404)
    dashboard.refused("GET", "/api/jobs/j/output?stream=both", 400)
    dashboard.refused("GET", "/api/jobs/nope/output", 404)

    config_set("output_limit", "10")
    enqueue("-c", "printf abcdefghijklmnopqrstuvwxyz0123", "--id", "long")
    burst()
    doc = output_fields(dashboard.get("/api/jobs/long/output"))
    assert doc == {"run": 1, "stream": "stdout", "from": 20, "data": "uvwxyz0123", "written": 30, "skipped": 20,
                   "finished": True, "state": "completed", "last_run": 1}
    assert dashboard.get("/api/jobs/long/output?from=25")["data"] == "z0123"


def test_api_queues_and_schedules_answer_what_their_list_json_prints(db, dashboard_server):
    enqueue("-c", "true", "--queue", "a")
    enqueue("-c", "true", "--queue", "b", "--delay", "3600")
    assert cli("queue", "pause", "b")[0] == 0
    assert cli("queue", "limit", "c", "2")[0] == 0
    schedule_add("nightly", "0 0 * * *", "-c", "true")
    schedule_add("hourly", "@hourly", "--tz", "UTC", "-c", "echo hi", "--queue", "a")
    assert cli("schedule", "pause", "hourly")[0] == 0
    dash = dashboard_server()
    assert dash.get("/api/queues") == queue_list()
    assert [queue["queue"] for queue in dash.get("/api/queues")] == ["a", "b", "c"]
    assert dash.get("/api/schedules") == schedule_list()
    assert len(dash.get("/api/schedules")) == 2
    assert cli("queue", "resume", "b")[0] == 0  # the CLI's changes reach the API within the snapshot interval
    assert cli("schedule", "resume", "hourly")[0] == 0
    assert dash.agrees("/api/queues", queue_list)
    assert dash.agrees("/api/schedules", schedule_list)


def test_api_workers_and_status_show_a_running_pool_and_its_current_job(fast, pool, dashboard, tmp_path):
    pool("--count", "2")
    assert wait_until(lambda: len([p for p in worker_list() if p["kind"] == "worker"]) == 2)
    enqueue("-c", gate(), "--id", "busy")
    assert wait_until(lambda: show("busy")["state"] == "processing")
    assert wait_until(lambda: without_heartbeats(dashboard.get("/api/workers")) == without_heartbeats(worker_list()),
                      interval=0.1)
    workers = dashboard.get("/api/workers")
    assert sorted(p["kind"] for p in workers) == ["supervisor", "worker", "worker"]
    assert [p["current_job"] for p in workers if p["current_job"]] == ["busy"]
    assert wait_until(lambda: without_heartbeats(dashboard.get("/api/status")["workers"])
                      == without_heartbeats(status()["workers"]), interval=0.1)
    assert dashboard.get("/api/status")["jobs"]["processing"] == 1
    (tmp_path / "go").touch()
    assert wait_until(lambda: show("busy")["state"] == "completed")


# Every POST does what the command does, and the CLI sees it

def test_post_cancel_cancels_a_pending_job_as_cancel_does_and_the_next_get_sees_it(db, dashboard):
    enqueue("-c", "true", "--id", "j")
    assert dashboard.get("/api/jobs/j")["state"] == "pending"  # now in the snapshot
    doc = dashboard.post("/api/jobs/j/cancel")
    assert doc == show("j")
    assert doc["state"] == "canceled"
    assert dashboard.get("/api/jobs/j")["state"] == "canceled"  # a POST clears the snapshot


def test_post_retry_puts_a_dead_job_back_to_pending_with_attempts_0(fast, dashboard):
    dead_job("d")
    doc = dashboard.post("/api/jobs/d/retry")
    assert doc == show("d")
    assert (doc["state"], doc["attempts"], [run["run"] for run in doc["runs"]]) == ("pending", 0, [1])
    burst()
    assert show("d")["state"] == "dead" and len(show("d")["runs"]) == 2


def test_post_dlq_retry_and_purge_take_every_dead_job_and_say_how_many(fast, dashboard):
    for job_id in ("d1", "d2", "d3"):
        enqueue("-c", "exit 1", "--id", job_id, "--max-retries", "0")
    enqueue("-c", "true", "--id", "ok")
    enqueue("-c", "true", "--id", "gone", "--delay", "3600")
    assert cli("cancel", "gone")[0] == 0
    burst()
    assert dashboard.post("/api/dlq/retry") == {"count": 3}
    assert [(job["id"], job["attempts"]) for job in listed("--state", "pending")] == [
        ("d3", 0), ("d2", 0), ("d1", 0)]
    assert dashboard.post("/api/dlq/retry") == {"count": 0}
    burst()
    assert [job["id"] for job in listed("--state", "dead")] == ["d3", "d2", "d1"]
    assert dashboard.post("/api/dlq/purge") == {"count": 3}
    assert listed("--state", "dead") == []
    assert [(job["id"], job["state"]) for job in all_jobs()] == [("gone", "canceled"), ("ok", "completed")]
    assert dashboard.post("/api/dlq/purge") == {"count": 0}


def test_post_queue_pause_and_resume_answer_the_queue_and_queue_list_agrees(db, dashboard):
    enqueue("-c", "true", "--queue", "q1")
    doc = dashboard.post("/api/queues/q1/pause")
    assert doc == queue_of("q1")
    assert doc["paused"] is True
    doc = dashboard.post("/api/queues/q1/resume")
    assert doc == queue_of("q1")
    assert doc["paused"] is False
    assert dashboard.post("/api/queues/empty/pause") == queue_of("empty")  # a queue with no jobs yet
    assert queue_of("empty")["paused"] is True
    assert dashboard.get("/api/queues") == queue_list()


def test_post_schedule_pause_resume_and_run_answer_the_schedule_or_its_job(db, dashboard):
    schedule_add("nightly", "0 0 * * *", "-c", "true")
    doc = dashboard.post("/api/schedules/nightly/pause")
    assert doc == schedule_show("nightly")
    assert (doc["paused"], doc["next_tick_at"]) == (True, None)
    doc = dashboard.post("/api/schedules/nightly/resume")
    assert doc == schedule_show("nightly")
    assert doc["paused"] is False and doc["next_tick_at"] is not None
    job = dashboard.post("/api/schedules/nightly/run")
    assert job == show(job["id"])
    assert job["id"].startswith("nightly@run.") and job["state"] == "pending" and job["command"] == "true"
    assert schedule_show("nightly")["last_job_id"] == job["id"]
    assert dashboard.get("/api/schedules") == schedule_list()


# Errors: {"error": one line} with 404, 409, 400, 405

def test_unknown_jobs_schedules_and_routes_are_404_and_change_nothing(db, dashboard):
    enqueue("-c", "true", "--id", "j")
    schedule_add("s", "0 0 * * *", "-c", "true")
    before = everything()
    for method, path in (("GET", "/api/jobs/nope"), ("GET", "/api/jobs/nope/why"), ("GET", "/api/jobs/nope/output"),
                         ("POST", "/api/jobs/nope/cancel"), ("POST", "/api/jobs/nope/retry"),
                         ("POST", "/api/schedules/nope/pause"), ("POST", "/api/schedules/nope/resume"),
                         ("POST", "/api/schedules/nope/run"), ("GET", "/api/nope"), ("GET", "/nope"),
                         ("POST", "/api/nope"), ("GET", "/api/jobs/j/nope"), ("POST", "/api/queues/q1/nope"),
                         ("GET", "/api/status/extra")):
        dashboard.refused(method, path, 404)
    assert everything() == before


def test_a_job_in_the_wrong_state_is_409_and_unchanged(fast, dashboard):
    enqueue("-c", "true", "--id", "done")
    burst()
    enqueue("-c", "true", "--id", "waiting", "--delay", "3600")
    before = everything()
    dashboard.refused("POST", "/api/jobs/done/cancel", 409)
    dashboard.refused("POST", "/api/jobs/done/retry", 409)
    dashboard.refused("POST", "/api/jobs/waiting/retry", 409)
    assert everything() == before


@pytest.mark.parametrize("path", [
    "/api/jobs?limit=0", "/api/jobs?limit=501", "/api/jobs?limit=-1", "/api/jobs?limit=ten",
    "/api/jobs?state=bogus", "/api/jobs?state=pending,bogus", "/api/jobs?queue=bad%20name",
    "/api/jobs?queue=" + "q" * 65])
def test_bad_input_to_the_job_list_is_400(db, dashboard, path):
    enqueue("-c", "true", "--id", "j")
    dashboard.refused("GET", path, 400)


def test_a_bad_queue_name_to_pause_or_resume_is_400_and_changes_nothing(db, dashboard):
    enqueue("-c", "true", "--queue", "q1")
    before = everything()
    for action in ("pause", "resume"):
        dashboard.refused("POST", f"/api/queues/{'q' * 65}/{action}", 400)
        dashboard.refused("POST", f"/api/queues/bad%20name/{action}", 400)
    assert everything() == before


def test_get_on_a_post_route_is_405_and_changes_nothing(fast, dashboard):
    dead_job("d")
    enqueue("-c", "true", "--id", "j")
    schedule_add("s", "0 0 * * *", "-c", "true")
    before = everything()
    for path in ("/api/jobs/j/cancel", "/api/jobs/d/retry", "/api/dlq/retry", "/api/dlq/purge",
                 "/api/queues/default/pause", "/api/schedules/s/pause", "/api/schedules/s/run"):
        dashboard.refused("GET", path, 405)
    for path in ("/api/status", "/api/jobs", "/api/jobs/j", "/api/queues", "/api/schedules", "/api/workers"):
        dashboard.refused("POST", path, 405)
    assert everything() == before


# Refusals: the token, the Host, the Origin, --read-only

def test_without_the_right_token_every_route_is_401_and_shows_no_job_data(db, dashboard):
    enqueue("-c", "echo secret-command-text", "--id", "secret-job-id")
    for token in (False, "wrong", dashboard.token[:-1], dashboard.token + "x"):
        for method, path in (("GET", "/"), ("GET", "/app.js"), ("GET", "/api/status"), ("GET", "/api/jobs"),
                             ("GET", "/api/jobs/secret-job-id"), ("POST", "/api/jobs/secret-job-id/cancel"),
                             ("GET", "/nope")):
            code, headers, data = dashboard.raw(method, path, token=token)
            assert code == 401, (token, method, path, code, data)
            assert list(json.loads(data)) == ["error"], data
            assert b"secret" not in data and not headers.get("Set-Cookie")
    code, _, data = dashboard.raw("GET", f"/api/jobs?token=wrong{dashboard.token}", token=False)
    assert code == 401 and b"secret" not in data
    code, _, data = dashboard.raw("GET", "/api/jobs", token=False,
                                  headers={"Cookie": f"queuectl_token_{dashboard.port}=wrong"})
    assert code == 401 and b"secret" not in data
    assert show("secret-job-id")["state"] == "pending"


def test_the_token_in_the_query_sets_an_httponly_strict_cookie_that_then_works_alone(db, dashboard):
    enqueue("-c", "true", "--id", "j")
    code, headers, _ = dashboard.raw("GET", f"/?token={dashboard.token}", token=False)
    assert code == 200
    cookies = [value for value in headers.get_all("Set-Cookie") or [] if value.startswith("queuectl_token_")]
    assert len(cookies) == 1, cookies
    pair, *attributes = [part.strip() for part in cookies[0].split(";")]
    assert pair == f"queuectl_token_{dashboard.port}={dashboard.token}"
    assert {"httponly", "samesite=strict", "path=/"} <= {attribute.lower() for attribute in attributes}
    cookie = {"Cookie": pair}
    assert dashboard.get("/api/jobs/j", token=False, headers=cookie) == show("j")
    code, _, _ = dashboard.raw("GET", "/api/status", token=False,
                               headers={"Cookie": f"queuectl_token_{dashboard.port + 1}={dashboard.token}"})
    assert code == 401  # the cookie of another port's dashboard is not this one's
    assert dashboard.get(f"/api/jobs/j?token={dashboard.token}", token=False) == show("j")


def test_a_bearer_token_works_on_every_get_route(db, dashboard):
    enqueue("-c", "true", "--id", "j")
    for path in ("/", "/app.js", "/app.css", "/api/status", "/api/jobs", "/api/jobs/j", "/api/jobs/j/why",
                 "/api/queues", "/api/schedules", "/api/workers"):
        code, _, _ = dashboard.raw("GET", path)
        assert code == 200, path


@pytest.mark.parametrize("host", ["evil.example:{port}", "127.0.0.1:{other}", "localhost:{other}",
                                  "127.0.0.1", "evil.example", "127.0.0.1.evil.example:{port}", None])
def test_a_foreign_or_missing_host_header_is_403_even_with_the_token(db, dashboard, host):
    enqueue("-c", "echo secret-command-text", "--id", "j")
    headers = {"Host": None if host is None else host.format(port=dashboard.port, other=dashboard.port + 1)}
    for method, path in (("GET", "/api/jobs/j"), ("GET", "/"), ("POST", "/api/jobs/j/cancel")):
        assert "secret" not in dashboard.refused(method, path, 403, headers=headers)
        code, _, data = dashboard.raw(method, path, token=False, headers=headers)
        assert code == 403 and b"secret" not in data
    assert show("j")["state"] == "pending"


def test_localhost_with_the_right_port_is_this_servers_name_too(db, dashboard):
    enqueue("-c", "true", "--id", "j")
    host = f"localhost:{dashboard.port}"
    assert dashboard.get("/api/jobs/j", headers={"Host": host}) == show("j")
    doc = dashboard.post("/api/jobs/j/cancel", headers={"Host": host, "Origin": f"http://{host}"})
    assert doc["state"] == "canceled"


@pytest.mark.parametrize("origin", ["http://evil.example", "http://evil.example:{port}", "http://127.0.0.1:{other}",
                                    "https://127.0.0.1:{port}", "http://localhost:{port}", "null"])
def test_a_post_with_a_foreign_origin_is_403_and_changes_nothing(fast, dashboard, origin):
    dead_job("d")
    enqueue("-c", "true", "--id", "j")
    before = everything()
    headers = {"Origin": origin.format(port=dashboard.port, other=dashboard.port + 1)}
    for path in ("/api/jobs/j/cancel", "/api/jobs/d/retry", "/api/dlq/purge", "/api/queues/default/pause"):
        dashboard.refused("POST", path, 403, headers=headers)
        dashboard.refused("POST", f"{path}?token={dashboard.token}", 403, headers=headers, token=False)
    assert everything() == before


def test_a_post_with_its_own_origin_or_a_script_without_one_is_done(db, dashboard):
    for job_id in ("a", "b", "c"):
        enqueue("-c", "true", "--id", job_id)
    assert dashboard.post("/api/jobs/a/cancel", headers={"Origin": f"http://{dashboard.address}"})["state"] == "canceled"
    assert dashboard.post("/api/jobs/b/cancel")["state"] == "canceled"  # a Bearer script needs no Origin
    assert dashboard.post(f"/api/jobs/c/cancel?token={dashboard.token}", token=False)["state"] == "canceled"
    assert [show(job_id)["state"] for job_id in ("a", "b", "c")] == ["canceled"] * 3


def test_a_post_by_the_cookie_alone_needs_the_origin(db, dashboard):
    enqueue("-c", "true", "--id", "j")
    cookie = f"queuectl_token_{dashboard.port}={dashboard.token}"
    before = everything()
    dashboard.refused("POST", "/api/jobs/j/cancel", 403, token=False, headers={"Cookie": cookie})
    dashboard.refused("POST", "/api/dlq/purge", 403, token=False, headers={"Cookie": cookie})
    assert everything() == before
    doc = dashboard.post("/api/jobs/j/cancel", token=False,
                         headers={"Cookie": cookie, "Origin": f"http://{dashboard.address}"})
    assert doc == show("j") and doc["state"] == "canceled"


def test_read_only_refuses_every_post_with_403_and_changes_nothing_while_gets_work(fast, dashboard_server):
    dead_job("d")
    enqueue("-c", "true", "--id", "j", "--queue", "q1", "--delay", "3600")  # not due: status stays still
    schedule_add("s", "0 0 * * *", "-c", "true")
    assert cli("schedule", "pause", "s")[0] == 0
    before = everything()
    dash = dashboard_server("--read-only")
    origin = {"Origin": f"http://{dash.address}"}
    for path in ("/api/jobs/j/cancel", "/api/jobs/d/retry", "/api/dlq/retry", "/api/dlq/purge",
                 "/api/queues/q1/pause", "/api/queues/q1/resume", "/api/schedules/s/pause",
                 "/api/schedules/s/resume", "/api/schedules/s/run"):
        assert dash.refused("POST", path, 403) == "the dashboard is read-only"
        assert dash.refused("POST", path, 403, headers=origin) == "the dashboard is read-only"
    assert everything() == before
    assert dash.get("/api/status") == status()
    assert dash.get("/api/jobs/d") == show("d")
    assert dash.get("/api/queues") == queue_list()
    assert dash.get("/api/schedules") == schedule_list()
    assert dash.raw("GET", "/")[0] == 200


# Job text is escaped; the page loads nothing from outside and holds no job text

def test_script_in_job_text_comes_back_intact_as_json_yet_no_body_holds_a_raw_script_tag(fast, dashboard):
    evil = "<script>alert(1)</script>"
    enqueue(json.dumps({"id": "x", "command": f"echo '{evil}' && echo '{evil}' >&2 && exit 1 # &amp;",
                        "max_retries": 0, "env": {"E": evil}}))
    burst()
    job = dashboard.get("/api/jobs/x")
    assert job == show("x")
    assert (job["command"], job["stdout"], job["stderr"], job["env"]) == (
        f"echo '{evil}' && echo '{evil}' >&2 && exit 1 # &amp;", evil + "\n", evil + "\n", {"E": evil})
    assert dashboard.get("/api/jobs/x/output")["data"] == evil + "\n"
    for path in ("/api/jobs/x", "/api/jobs", "/api/jobs?q=" + urllib.parse.quote(evil), "/api/jobs/x/why",
                 "/api/jobs/x/output", "/api/jobs/x/output?stream=stderr", "/api/status",
                 "/api/jobs/" + urllib.parse.quote(evil), "/api/jobs?queue=" + urllib.parse.quote(evil),
                 "/" + urllib.parse.quote(evil)):
        for token in (True, False):
            _, headers, data = dashboard.raw("GET", path, token=token)
            assert b"<" not in data and b">" not in data and b"&" not in data, (path, data)
            assert headers.get("Content-Type", "").startswith("application/json"), path
    code, _, data = dashboard.raw("POST", "/api/jobs/x/retry")
    assert code == 200 and b"<" not in data and json.loads(data)["command"] == job["command"]


def test_every_response_carries_the_safety_headers_and_a_csp_with_no_foreign_source(db, dashboard):
    foreign = {"Host": f"evil.example:{dashboard.port}"}
    for method, path, token, headers in (
            ("GET", "/", True, None), ("GET", "/app.js", True, None), ("GET", "/app.css", True, None),
            ("GET", "/api/status", True, None), ("GET", "/api/nope", True, None), ("GET", "/", False, None),
            ("POST", "/api/status", True, None), ("GET", "/api/jobs?limit=0", True, None),
            ("GET", "/api/status", True, foreign)):
        _, headers, _ = dashboard.raw(method, path, token=token, headers=headers)
        for name, value in SAFETY_HEADERS.items():
            assert headers.get(name) == value, (path, name, headers.get(name))
        csp = headers.get("Content-Security-Policy") or ""
        directives = {name: sources for name, *sources in (part.split() for part in csp.split(";") if part.strip())}
        assert directives.get("default-src") in (["'self'"], ["'none'"]), (path, csp)
        assert {source for sources in directives.values() for source in sources} <= LOCAL_SOURCES, (path, csp)


def test_the_page_and_its_assets_hold_no_job_text_and_load_nothing_from_outside(db, dashboard):
    enqueue("-c", "echo cmd-marker-91b2", "--id", "job-marker-7f3a")
    code, headers, data = dashboard.raw("GET", "/")
    assert code == 200 and headers.get("Content-Type", "").startswith("text/html")
    page = data.decode()
    assert "<html" in page.lower()
    for path in ("/", "/app.js", "/app.css"):
        code, _, data = dashboard.raw("GET", path)
        assert code == 200, path
        assert b"marker-7f3a" not in data and b"marker-91b2" not in data, path
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.IGNORECASE), page
    assert not re.search(r"""@import|url\(\s*["']?(https?:)?//""", dashboard.raw("GET", "/app.css")[2].decode())


# The token: given or random, never on stderr

def test_queuectl_dashboard_token_is_the_token_and_otherwise_each_start_draws_a_new_one(db, dashboard_server):
    given = dashboard_server(env={"QUEUECTL_DASHBOARD_TOKEN": "given-Token_42"})
    assert given.token == "given-Token_42"
    assert given.url == f"http://127.0.0.1:{given.port}/?token=given-Token_42"
    assert given.raw("GET", "/api/status")[0] == 200
    assert given.raw("GET", "/api/status", token="other")[0] == 401
    first, second = dashboard_server(), dashboard_server()
    assert first.token != second.token and len(first.token) >= 16 and first.port != second.port
    assert "given-Token_42" not in (first.token, second.token)
    assert first.raw("GET", "/api/status", token=second.token)[0] == 401


def test_requests_are_logged_one_line_each_on_stderr_without_the_token(db, dashboard_server):
    dash = dashboard_server(env={"QUEUECTL_DASHBOARD_TOKEN": "logged-never-42"})
    assert dash.raw("GET", "/?token=logged-never-42", token=False)[0] == 200
    assert dash.raw("GET", "/api/jobs?limit=5&token=logged-never-42", token=False)[0] == 200
    assert dash.raw("GET", "/api/jobs?token=logged-never-42&limit=6", token=False)[0] == 200
    assert dash.raw("GET", "/api/status?token=logged-never-4", token=False)[0] == 401
    assert dash.raw("GET", "/api/workers")[0] == 200
    assert dash.raw("POST", "/api/dlq/purge?token=logged-never-42", token=False)[0] == 200
    expected = [("GET", "/", 200), ("GET", "/api/jobs?limit=5", 200), ("GET", "/api/jobs?limit=6", 200),
                ("GET", "/api/status", 401), ("GET", "/api/workers", 200), ("POST", "/api/dlq/purge", 200)]
    assert wait_until(lambda: logged_requests(dash.log()) == expected), dash.log()
    assert "logged-never-4" not in dash.log()


# Running it: the port, the signals

@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_port_outside_0_to_65535_is_exit_2_with_one_error_line(db, port):
    result = run("dashboard", "--port", port, timeout=30)
    assert result.returncode == 2, result
    assert result.stdout == ""
    error_line(result.stderr)


def test_a_port_in_use_is_exit_1_with_one_error_line(db):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("dashboard", "--port", port, timeout=30)
    assert (result.returncode, result.stdout) == (1, "")
    assert error_line(result.stderr).startswith(f"queuectl: error: cannot listen on 127.0.0.1:{port}: ")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_stop_the_dashboard_with_exit_0_and_no_traceback_even_amid_requests(
        db, dashboard_server, signum):
    dash = dashboard_server()
    stopped, served = threading.Event(), []

    def client():
        while not stopped.is_set():
            try:
                served.append(dash.raw("GET", "/api/status")[0])
            except (OSError, http.client.HTTPException):  # the server is gone
                return

    clients = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        assert wait_until(lambda: len(served) >= 20)
        dash.proc.send_signal(signum)
        assert dash.proc.wait(timeout=15) == 0
    finally:
        stopped.set()
        for thread in clients:
            thread.join(timeout=30)
    assert set(served) == {200}
    assert "Traceback" not in dash.log()


# Many clients, one snapshot

def test_many_clients_at_once_share_one_snapshot_of_a_get(db, dashboard):
    """20 concurrent GET /api/status. Its oldest_runnable_age_s moves on every millisecond, so two bodies
    computed apart differ; bodies that differ must come from snapshots a whole interval (1 s) apart."""
    enqueue("-c", "true", "--id", "due")  # due, and no worker: its age grows while we look
    barrier, bodies, errors = threading.Barrier(20), [], []

    def client():
        try:
            barrier.wait(timeout=30)
            code, _, data = dashboard.raw("GET", "/api/status")
            assert code == 200, data
            bodies.append(data)
        except (AssertionError, OSError, threading.BrokenBarrierError) as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and len(bodies) == 20
    ages = sorted({json.loads(body)["oldest_runnable_age_s"] for body in set(bodies)})
    assert len(ages) == len(set(bodies))  # bodies that differ differ in the age
    assert all(later - earlier >= 0.9 for earlier, later in itertools.pairwise(ages)), ages


# Faults a review found, each with the test that failed before its fix

def test_another_sites_odd_cookie_on_localhost_does_not_hide_the_dashboards(dashboard):
    cookie = f"queuectl_token_{dashboard.port}={dashboard.token}"
    for other in ("x=a b", 'x={"a": 1}', 'x="u', "x=\u00e9"):
        code, _, doc = dashboard.request("GET", "/api/status", token=False,
                                         headers={"Cookie": f"{other}; {cookie}".encode().decode("latin-1")})
        assert code == 200, (other, doc)


def test_bad_request_lines_and_bodies_are_answered_without_a_traceback_and_the_server_goes_on(dashboard):
    for raw in (b"GARBAGE\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.0\r\n\r\n",
                f"POST /api/dlq/retry HTTP/1.0\r\nHost: {dashboard.address}\r\nContent-Length: abc\r\n\r\n".encode()):
        with socket.create_connection((dashboard.host, dashboard.port), timeout=10) as sock:
            sock.sendall(raw)
            answer = sock.recv(100)  # a request line without a version is HTTP/0.9: an error page, no status line
            assert answer.startswith((b"HTTP/1.0 4", b"<!DOCTYPE")), (raw[:40], answer)
    socket.create_connection((dashboard.host, dashboard.port), timeout=10).close()  # a client that leaves at once
    assert dashboard.get("/api/status")["jobs"]["pending"] == 0
    assert "Traceback" not in dashboard.log()  # and the fixture checks it once more at the end


def test_the_request_log_escapes_control_characters_and_redacts_the_token_however_it_is_spelled(dashboard):
    with socket.create_connection((dashboard.host, dashboard.port), timeout=10) as sock:
        sock.sendall(b"GET /\x1b]0;pwned\x07 HTTP/1.0\r\n\r\n")
        sock.recv(100)
    assert dashboard.request("GET", f"/api/status?%74oken={dashboard.token}", token=False)[0] == 200
    assert wait_until(lambda: "/api/status?token=*** 200" in dashboard.log())
    log = dashboard.log()
    assert "\x1b" not in log and "\x07" not in log and "/\\x1b]0;pwned\\x07 " in log


def test_the_job_list_can_leave_out_output_and_names_each_job_once(fast, dashboard):
    enqueue("-c", "echo loud", "--id", "loud")
    burst()
    full = dashboard.get("/api/jobs?state=completed,completed")
    assert [job["id"] for job in full["jobs"]] == ["loud"] and full["jobs"][0]["stdout"] == "loud\n"
    brief = dashboard.get("/api/jobs?state=completed&brief=1")["jobs"]
    assert brief == [{key: value for key, value in full["jobs"][0].items() if key not in ("stdout", "stderr")}]


# ---------------------------------------------------------------------------
# Months on a server: retention, hooks, /metrics, the chart
# ---------------------------------------------------------------------------

def age_jobs(job_ids, seconds):
    """Make jobs look as if they finished `seconds` earlier than they did."""
    with contextlib.closing(queuectl.connect(os.environ["QUEUECTL_DB"])) as conn, conn.transaction():
        for job_id in job_ids:
            conn.execute("UPDATE jobs SET finished_at = finished_at - ? WHERE id = ?", (seconds, job_id))


def job_ids():
    """The ids of every job, sorted."""
    return sorted(job["id"] for job in all_jobs())


def test_retention_deletes_completed_and_dead_jobs_kept_past_their_time_and_nothing_else(fast):
    enqueue("-c", "true", "--id", "old-done")
    enqueue("-c", "true", "--id", "new-done")
    enqueue("-c", "false", "--id", "old-dead", "--max-retries", "0")
    enqueue("-c", "true", "--id", "old-canceled")
    assert cli("cancel", "old-canceled")[0] == 0
    burst()
    assert cli("queue", "pause", "held")[0] == 0  # its job waits, and no burst waits for it
    enqueue("-c", "true", "--id", "waiting", "--queue", "held")
    age_jobs(["old-done", "old-dead", "old-canceled"], 8 * 86400)
    burst()  # a supervisor: its first beat applies retention
    assert job_ids() == ["new-done", "old-canceled", "old-dead", "waiting"]  # keep_dead is 30d
    config_set("keep_dead", "7d")
    config_set("keep_completed", "0")  # forever
    age_jobs(["new-done"], 365 * 86400)
    burst()
    assert job_ids() == ["new-done", "old-canceled", "waiting"]
    assert show("waiting")["state"] == "pending"


def test_retention_while_workers_run_deletes_old_jobs_and_leaves_running_and_new_ones_alone(fast, pool, tmp_path):
    enqueue("-c", "true", "--id", "old")
    burst()
    age_jobs(["old"], 8 * 86400)
    enqueue("-c", f"touch {tmp_path}/started; while [ ! -e {tmp_path}/stop ]; do sleep 0.05; done", "--id", "running")
    supervisor = pool("--count", "2")
    assert wait_until(lambda: (tmp_path / "started").exists())
    assert wait_until(lambda: "retention: deleted 1 completed job(s) finished more than 7d ago" in log_text(supervisor))
    enqueue("-c", "true", "--id", "new")
    assert wait_until(lambda: show("new")["state"] == "completed")
    assert job_ids() == ["new", "running"] and show("running")["state"] == "processing"
    (tmp_path / "stop").touch()
    assert wait_until(lambda: show("running")["state"] == "completed")


def test_retention_deletes_a_bounded_batch_at_a_time_through_jobs_finished(db):
    cli("init")
    with contextlib.closing(queuectl.connect(db)) as conn:
        add_jobs(conn, [{"command": "true", "id": f"done-{i}"} for i in range(1100)] +
                 [{"command": "true", "id": f"live-{i}"} for i in range(50)])
        with conn.transaction():
            conn.execute("UPDATE jobs SET state = 'completed', finished_at = 1000 WHERE id LIKE 'done-%'")
        config = queuectl.load_config(conn)
        deleted = [queuectl.apply_retention(conn, config)["completed"] for _ in range(4)]
        assert deleted == [queuectl.PURGE_BATCH, queuectl.PURGE_BATCH, 100, 0]
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 50
        select = queuectl.EXPIRED_JOBS_SQL.format(state="completed", batch=500, locking="")
        plan = " ".join(str(tuple(row)) for row in conn.execute(
            ("EXPLAIN " if PG_URL else "EXPLAIN QUERY PLAN ") + select.replace("?", "1000")))
        assert "jobs_finished" in plan, plan


def test_status_says_how_long_finished_jobs_are_kept(db):
    assert status()["kept"] == {"completed": "7d", "dead": "30d"}
    config_set("keep_completed", "12h")
    config_set("keep_dead", "0")
    assert status()["kept"] == {"completed": "12h", "dead": "0"}
    code, out, _ = cli("status")
    assert code == 0
    assert "kept: completed jobs 12h, dead jobs forever after they finish" in out


DURATION_RULE = "must be a duration like 90s, 15m, 12h or 7d, or 0 to keep them forever"


@pytest.mark.parametrize("key, value, error", [
    ("keep_completed", "soon", f"config keep_completed {DURATION_RULE}, got 'soon'"),
    ("keep_dead", "2w", f"config keep_dead {DURATION_RULE}, got '2w'"),
    ("keep_dead", "30s", "config keep_dead must be 0 (forever) or at least 1m, got '30s'"),
    ("hook_timeout", "0", "config hook_timeout must be greater than 0, got 0.0"),
])
def test_a_bad_retention_or_hook_setting_is_one_line_exit_2_and_changes_nothing(db, key, value, error):
    before = cli("config", "list", "--json")[1]
    assert cli("config", "set", key, value) == (2, "", f"queuectl: error: {error}\n")
    assert cli("config", "list", "--json")[1] == before


def hook_lines(path):
    """The lines hooks appended to a file, sorted."""
    return sorted(path.read_text().splitlines()) if path.exists() else []


def test_hooks_run_once_for_each_failed_run_and_once_when_a_job_dies_with_the_event_in_their_environment(
        fast, tmp_path):
    record = tmp_path / "hooks.txt"
    config_set("on_failure", f'echo "failure $QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT $QUEUECTL_EXIT_CODE '
                             f'$QUEUECTL_ERROR $QUEUECTL_QUEUE" >> {record}')
    config_set("on_dead", f'echo "dead $QUEUECTL_JOB_ID $QUEUECTL_HOOK" >> {record}')
    enqueue("-c", "exit 3", "--id", "flaky", "--max-retries", "1", "--queue", "mail")
    enqueue("-c", "true", "--id", "fine")
    enqueue("-c", "sleep 5", "--id", "slow", "--max-retries", "0", "--timeout", "0.2")
    burst()
    assert hook_lines(record) == ["dead flaky on_dead", "dead slow on_dead",
                                  "failure flaky 1 3 exit status 3 mail", "failure flaky 2 3 exit status 3 mail",
                                  "failure slow 1  timed out after 0.2 s (killed by signal SIGTERM) default"]
    assert sql_rows("SELECT count(*) FROM hook_events") == [(0,)]


def test_each_hook_event_runs_exactly_once_with_two_supervisors(fast, pool, tmp_path):
    record = tmp_path / "hooks.txt"
    config_set("on_failure", f'echo "failure $QUEUECTL_JOB_ID" >> {record}')
    config_set("on_dead", f'echo "dead $QUEUECTL_JOB_ID" >> {record}')
    enqueue_lines(jsonl(*({"command": "exit 1", "id": f"j{i}", "max_retries": 0} for i in range(30))))
    supervisors = [pool("--count", "2"), pool("--count", "2")]
    assert wait_until(lambda: len(hook_lines(record)) >= 60, timeout=60)
    for supervisor in supervisors:
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 0
    expected = sorted([f"failure j{i}" for i in range(30)] + [f"dead j{i}" for i in range(30)])
    assert hook_lines(record) == expected
    logs = "".join(log_text(supervisor) for supervisor in supervisors)
    assert (logs.count(" done\n"), logs.count("hook on_dead of job")) == (60, 30)


def test_a_hook_that_hangs_is_killed_at_hook_timeout_and_never_holds_up_the_workers(fast, pool, tmp_path):
    config_set("hook_timeout", "0.5")
    config_set("on_dead", f"echo $$ > {tmp_path}/hook.pid; exec sleep 30")
    enqueue("-c", "false", "--id", "doomed", "--max-retries", "0")
    supervisor = pool("--count", "1")
    assert wait_until(lambda: read_pid(tmp_path / "hook.pid"))
    hook_pid = read_pid(tmp_path / "hook.pid")
    enqueue("-c", "true", "--id", "after")  # runs while the hook hangs
    assert wait_until(lambda: show("after")["state"] == "completed")
    assert wait_until(lambda: not is_running(hook_pid))
    assert wait_until(lambda: "hook on_dead of job doomed (attempt 1) did not end in time: killed" in log_text(supervisor))
    assert wait_until(lambda: sql_rows("SELECT count(*) FROM hook_events") == [(0,)])


def test_a_hook_that_fails_is_logged_and_not_run_again(fast, pool, tmp_path):
    record = tmp_path / "hooks.txt"
    config_set("on_dead", f"echo ran >> {record}; exit 1")
    enqueue("-c", "false", "--id", "doomed", "--max-retries", "0")
    supervisor = pool("--count", "1")
    assert wait_until(lambda: "hook on_dead of job doomed (attempt 1) failed: exit status 1" in log_text(supervisor))
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0
    assert hook_lines(record) == ["ran"]
    assert sql_rows("SELECT count(*) FROM hook_events") == [(0,)]


def test_a_supervisor_stopped_while_a_job_runs_runs_the_hook_of_that_jobs_end_before_it_exits(fast, pool, tmp_path):
    record = tmp_path / "hooks.txt"
    config_set("on_dead", f"echo $QUEUECTL_JOB_ID >> {record}")
    enqueue("-c", f"touch {tmp_path}/started; sleep 0.5; exit 1", "--id", "last", "--max-retries", "0")
    supervisor = pool("--count", "1")
    assert wait_until(lambda: (tmp_path / "started").exists())
    supervisor.send_signal(signal.SIGTERM)  # it drains: the job ends dead after the stop began
    assert supervisor.wait(timeout=30) == 0
    assert show("last")["state"] == "dead"
    assert hook_lines(record) == ["last"]


def add_hook_event(conn, hook, job_id, worker_id):
    """A hook event as a worker writes it."""
    conn.execute(queuectl.HOOK_EVENTS_SQL, {"job_id": job_id, "queue": "default", "attempt": 1, "exit_code": 1,
                                            "last_error": "exit status 1", "worker_id": worker_id, "now": time.time(),
                                            "on_failure": int(hook == "on_failure"), "on_dead": int(hook == "on_dead")})


def test_a_stopping_supervisor_takes_only_the_hook_events_of_its_own_workers(db):
    cli("init")
    with contextlib.closing(queuectl.connect(db)) as conn:
        add_hook_event(conn, "on_dead", "theirs", "host:2:bb.1")
        add_hook_event(conn, "on_dead", "ours", "host:1:aa.3")
        add_hook_event(conn, "on_dead", "look-alike", "host:1:aa3.1")
        assert queuectl.take_hook_event(conn, "host:1:aa", only_ours=True)["job_id"] == "ours"
        assert queuectl.take_hook_event(conn, "host:1:aa", only_ours=True) is None
        assert queuectl.take_hook_event(conn, "host:1:aa")["job_id"] == "theirs"


def test_a_burst_leaves_a_backlog_of_other_supervisors_hook_events_to_them(fast, tmp_path):
    config_set("on_dead", "sleep 0.3")
    with contextlib.closing(queuectl.connect(os.environ["QUEUECTL_DB"])) as conn:
        for i in range(40):
            add_hook_event(conn, "on_dead", f"j{i}", "elsewhere:1:cc.1")
    started = time.monotonic()
    burst()  # nothing of its own to do: it takes one round of four at most, then stops
    assert time.monotonic() - started < 10
    assert sql_rows("SELECT count(*) FROM hook_events WHERE taken_by IS NULL")[0][0] >= 36


def test_a_hook_event_whose_hook_cannot_start_is_given_back_and_one_set_meanwhile_is_run(db, monkeypatch, tmp_path):
    import subprocess as subprocess_module
    cli("init")
    config_set("on_dead", f"echo $QUEUECTL_JOB_ID >> {tmp_path}/hooks.txt")
    with contextlib.closing(queuectl.connect(db)) as conn:
        add_hook_event(conn, "on_dead", "doomed", "s.1")
        hooks = queuectl.Hooks("s", db)
        stale = dict(queuectl.load_config(conn), on_dead="", on_failure="true")  # read before on_dead was set
        real_popen = subprocess_module.Popen

        def no_more_processes(*args, **kwargs):
            raise OSError(11, "Resource temporarily unavailable")

        monkeypatch.setattr(subprocess_module, "Popen", no_more_processes)
        hooks.take_and_start(conn, stale)
        assert conn.execute("SELECT taken_by FROM hook_events").fetchall()[0][0] is None  # given back
        monkeypatch.setattr(subprocess_module, "Popen", real_popen)
        hooks.take_and_start(conn, stale)
        assert wait_until(lambda: hooks.poll() or not hooks.running)
        hooks.forget_ended(conn)
        assert conn.execute("SELECT count(*) FROM hook_events").fetchone()[0] == 0
    assert hook_lines(tmp_path / "hooks.txt") == ["doomed"]


@sqlite_only
def test_a_hook_past_its_time_is_killed_even_while_the_database_stays_locked(fast, pool, tmp_path):
    config_set("hook_timeout", "0.5")
    config_set("on_dead", f"echo $$ > {tmp_path}/hook.pid; exec sleep 30")
    enqueue("-c", "false", "--id", "doomed", "--max-retries", "0")
    pool("--count", "1")
    assert wait_until(lambda: read_pid(tmp_path / "hook.pid"))
    hook_pid = read_pid(tmp_path / "hook.pid")
    with contextlib.closing(sqlite3.connect(os.environ["QUEUECTL_DB"], isolation_level=None)) as holder:
        holder.execute("BEGIN EXCLUSIVE")  # every statement of the supervisor waits, then fails busy
        killed = wait_until(lambda: not is_running(hook_pid), timeout=12)
        holder.execute("ROLLBACK")
    assert killed


def test_a_supervisors_retention_batch_halves_while_batches_are_slow_and_grows_back(db, monkeypatch):
    cli("init")
    supervisor = queuectl.Supervisor(db, 1, [], True)
    supervisor.conn = queuectl.connect(db)
    try:
        config = queuectl.load_config(supervisor.conn)

        def slow_batch(conn, config, batch):
            time.sleep(queuectl.RETENTION_LOCK_S * 1.5)
            return {"completed": batch}

        monkeypatch.setattr(queuectl, "apply_retention", slow_batch)
        sizes = []
        for _ in range(3):
            supervisor.apply_retention(config)
            sizes.append(supervisor.retention_batch)
        monkeypatch.setattr(queuectl, "apply_retention", lambda conn, config, batch: {"completed": 0})
        supervisor.apply_retention(config)
        sizes.append(supervisor.retention_batch)
    finally:
        supervisor.conn.close()
    assert sizes == [250, 125, 62, 124]


def test_an_upgraded_database_with_jobs_keeps_them_forever_until_retention_is_set(db, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(queuectl, "SCHEMA_VERSION", 8)
        with contextlib.closing(queuectl.connect(db)) as conn:
            add_jobs(conn, [{"command": "true", "id": "old"}])
    assert status()["kept"] == {"completed": "0", "dead": "0"}


def test_a_run_is_charted_in_the_minute_it_finished_in(db):
    cli("init")
    with contextlib.closing(queuectl.connect(db)) as conn:
        now = conn.now()
        minute = int(now // 60) - 1
        conn.execute("INSERT INTO runs (job_seq, run, attempt, started_at, finished_at, outcome) "
                     "VALUES (1, 1, 1, ?, ?, 'completed')", (minute * 60 + 59, minute * 60 + 59.7))
        minutes = queuectl.runs_per_minute(conn, now)["minutes"]
    assert [m["completed"] for m in minutes[-2:]] == [1, 0]
    assert minutes[-2]["minute"] == queuectl.iso(minute * 60)


def test_no_hook_set_writes_no_hook_events(fast):
    enqueue("-c", "false", "--id", "doomed", "--max-retries", "1")
    burst()
    assert show("doomed")["state"] == "dead"
    assert sql_rows("SELECT count(*) FROM hook_events") == [(0,)]


def prometheus_families(text):
    """{name: family} as prometheus_client's own parser reads the text (it raises on a malformed line)."""
    parser = pytest.importorskip("prometheus_client.parser")
    return {family.name: family for family in parser.text_string_to_metric_families(text)}


def sample_values(family):
    """{(suffix, frozenset of labels): value} of a parsed family."""
    return {(sample.name[len(family.name):], frozenset(sample.labels.items())): sample.value
            for sample in family.samples}


def test_metrics_are_prometheus_text_with_the_queue_the_runs_and_the_workers(fast, dashboard):
    code, headers, _ = dashboard.raw("GET", "/metrics")
    assert code == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    enqueue("-c", "true", "--id", "ok", "--queue", "mail")
    enqueue("-c", "exit 2", "--id", "bad", "--max-retries", "0")
    burst()
    enqueue("-c", "true", "--id", "later", "--delay", "3600")
    assert wait_until(lambda: "queuectl_run_duration_seconds_count 2" in dashboard.raw("GET", "/metrics")[2].decode())
    families = prometheus_families(dashboard.raw("GET", "/metrics")[2].decode())
    jobs = sample_values(families["queuectl_jobs"])
    assert jobs[("", frozenset({"queue": "mail", "state": "completed"}.items()))] == 1
    assert jobs[("", frozenset({"queue": "default", "state": "dead"}.items()))] == 1
    assert jobs[("", frozenset({"queue": "default", "state": "pending"}.items()))] == 1
    assert families["queuectl_runs_finished"].type == "counter"
    runs = sample_values(families["queuectl_runs_finished"])
    assert runs[("_total", frozenset({"outcome": "completed"}.items()))] == 1
    assert runs[("_total", frozenset({"outcome": "failed"}.items()))] == 1
    durations = sample_values(families["queuectl_run_duration_seconds"])
    assert families["queuectl_run_duration_seconds"].type == "histogram"
    assert durations[("_count", frozenset())] == 2
    assert durations[("_bucket", frozenset({"le": "+Inf"}.items()))] == 2
    assert sample_values(families["queuectl_jobs_processing"]) == {("", frozenset()): 0}
    assert sample_values(families["queuectl_workers_alive"]) == {("", frozenset()): 0}
    assert sample_values(families["queuectl_oldest_runnable_age_seconds"]) == {("", frozenset()): 0}


def test_metrics_need_the_token_like_the_api(dashboard):
    assert dashboard.raw("GET", "/metrics", token=False)[0] == 401
    assert dashboard.raw("GET", "/metrics", token="wrong")[0] == 401
    assert dashboard.raw("GET", f"/metrics?token={dashboard.token}", token=False)[0] == 200
    assert dashboard.raw("POST", "/metrics")[0] == 405
    assert dashboard.raw("GET", "/metrics", headers={"Host": "evil.example:80"})[0] == 403


def test_metrics_count_only_the_runs_that_finished_since_the_first_scrape(fast, dashboard_server):
    enqueue("-c", "true", "--id", "before")
    burst()
    dashboard = dashboard_server()
    assert 'queuectl_runs_finished_total{outcome="completed"} 0\n' in dashboard.raw("GET", "/metrics")[2].decode()
    enqueue("-c", "true", "--id", "after")
    burst()
    assert wait_until(lambda: 'queuectl_runs_finished_total{outcome="completed"} 1\n'
                      in dashboard.raw("GET", "/metrics")[2].decode())
    assert 'queuectl_jobs{queue="default",state="completed"} 2\n' in dashboard.raw("GET", "/metrics")[2].decode()


def test_the_activity_counts_completed_and_failed_runs_per_minute_for_the_last_hour(fast, dashboard):
    enqueue("-c", "true", "--id", "ok")
    enqueue("-c", "exit 1", "--id", "bad", "--max-retries", "1")
    burst()

    def all_three_runs_in():
        minutes = dashboard.get("/api/activity")["minutes"]
        return minutes if sum(m["completed"] + m["failed"] for m in minutes) == 3 else None

    minutes = wait_until(all_three_runs_in)
    assert minutes and len(minutes) == queuectl.ACTIVITY_MINUTES
    assert (sum(m["completed"] for m in minutes), sum(m["failed"] for m in minutes)) == (1, 2)
    assert minutes == sorted(minutes, key=lambda m: m["minute"])
    with contextlib.closing(queuectl.connect(os.environ["QUEUECTL_DB"])) as conn:
        if PG_URL:  # a handful of runs is read fastest whole: ask whether the index can serve
            conn.execute("SET enable_seqscan = off")
        since = str(time.time() - 3600)
        plan = " ".join(str(tuple(row)) for row in conn.execute(
            ("EXPLAIN " if PG_URL else "EXPLAIN QUERY PLAN ") + queuectl.RUNS_PER_MINUTE_SQL.format(minute=conn.MINUTE_OF_FINISH).replace(":since", since)))
    assert "runs_by_finish" in plan, plan


# ---------------------------------------------------------------------------
# The dashboard in a real browser (Playwright, Debian's Chromium)
# ---------------------------------------------------------------------------

# Playwright drives the machine's own Chromium (never a downloaded one);
# without either, these tests skip with one line. One browser serves the
# module, each test gets a fresh context (no cookies, no storage) and a
# dashboard of its own on a free port, over the test's database.

BROWSER_WAIT_MS = 10_000  # how long an expectation on the page waits (the page refreshes every 2 s)


def chromium_path():
    """Chromium for the browser tests: $QUEUECTL_TEST_CHROMIUM, else chromium or chromium-browser on PATH; or None."""
    path = os.environ.get("QUEUECTL_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return path if path and os.access(path, os.X_OK) else None


@pytest.fixture(scope="module")
def browser_chromium():
    """One headless Chromium for the module, driven by Playwright's sync API; skips without either."""
    executable = chromium_path()
    if executable is None:
        pytest.skip("browser tests: no Chromium (apt-get install chromium, or set QUEUECTL_TEST_CHROMIUM)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("browser tests: no playwright (make venv installs it)")
    expect.set_options(timeout=BROWSER_WAIT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=["--no-sandbox"] if os.geteuid() == 0 else [])
        yield browser
        browser.close()


def on_page(target):
    """Playwright's expect(target): assertions that wait up to BROWSER_WAIT_MS for the page to agree."""
    from playwright.sync_api import expect
    return expect(target)


@pytest.fixture
def browser_dashboard(db, tmp_path):
    """`dashboard --port 0` on the test's database as a real process; yields the URL it printed (with ?token=).

    Its output goes to files (a pipe nobody reads would block its request
    log). It shares our process group, so pool()'s teardown leaves it alone;
    at teardown SIGTERM must stop it with exit 0, no traceback, and its log
    must never have shown the token.
    """
    out_path, log_path = tmp_path / "dashboard.out", tmp_path / "dashboard.log"
    with open(out_path, "w") as out_file, open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, SCRIPT, "dashboard", "--port", "0"],
                                stdin=subprocess.DEVNULL, stdout=out_file, stderr=log_file)
    try:
        printed = wait_until(lambda: out_path.read_text().endswith("\n") or proc.poll() is not None, timeout=30)
        url = out_path.read_text().strip()
        assert printed and url.startswith("http://127.0.0.1:") and "/?token=" in url, (url, log_path.read_text())
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = log_path.read_text(errors="replace")
    assert code == 0, log
    assert "Traceback" not in log, log
    assert url.split("?token=", 1)[1] not in log


@pytest.fixture
def browser_page(browser_chromium):
    """A page in a fresh browser context (1280x900), closed afterwards."""
    context = browser_chromium.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(BROWSER_WAIT_MS)
    page = context.new_page()
    yield page
    context.close()


def open_dashboard(page, url, route=""):
    """Load the dashboard at its printed URL (plus a #route) and wait for its first refresh."""
    page.goto(url + route)
    on_page(page.locator("#updated")).to_have_text(re.compile(r"\S"))


def wait_for_a_refresh(page):
    """Wait until the page refreshed once more (#updated, the time of the last refresh, changes)."""
    shown = page.locator("#updated").text_content()
    page.wait_for_function("shown => document.querySelector('#updated').textContent !== shown", arg=shown)


def job_row(page, job_id):
    """The job list's row of a job."""
    return page.locator(f'#jobs tbody tr[data-job="{job_id}"]')


def job_field(page, field):
    """The value cell of one field on the job page."""
    return page.locator(f'#job-fields tr[data-field="{field}"] td')


def dlq_list():
    """`dlq list --json` as a list."""
    code, out, err = cli("dlq", "list", "--json")
    assert code == 0, err
    return json.loads(out)


def test_dashboard_page_loads_from_its_printed_url_with_no_errors_nothing_from_elsewhere_and_the_counts(
        db, browser_dashboard, browser_page):
    enqueue("-c", "true", "--id", "a")
    enqueue("-c", "true", "--id", "b")
    assert cli("cancel", "b")[0] == 0
    origin = browser_dashboard.split("/?", 1)[0]
    requests, problems = [], []
    browser_page.on("request", lambda request: requests.append(request.url))
    browser_page.on("console", lambda message: message.type in ("error", "warning") and problems.append(message.text))
    browser_page.on("pageerror", lambda error: problems.append(str(error)))
    open_dashboard(browser_page, browser_dashboard)
    expected = {"pending": "1", "processing": "0", "completed": "0", "failed": "0", "dead": "0", "canceled": "1"}
    for state, n in expected.items():
        on_page(browser_page.locator(f'#counts [data-state="{state}"] .n')).to_have_text(n)
    on_page(job_row(browser_page, "a")).to_be_visible()
    wait_for_a_refresh(browser_page)  # what the browser does after the load (a favicon?) is in by then
    assert problems == []
    assert requests and [url for url in requests if not url.startswith(origin + "/")] == []


def test_dashboard_shows_a_job_enqueued_after_the_page_loaded_without_a_reload(db, browser_dashboard, browser_page):
    open_dashboard(browser_page, browser_dashboard)
    on_page(job_row(browser_page, "late")).to_have_count(0)
    browser_page.evaluate("window.loadedOnce = true")
    enqueue("-c", "echo late", "--id", "late")
    on_page(job_row(browser_page, "late").locator(".state")).to_have_text("pending")
    on_page(browser_page.locator('#counts [data-state="pending"] .n')).to_have_text("1")
    assert browser_page.evaluate("window.loadedOnce") is True  # the same document: no reload


def test_dashboard_retries_a_dead_job_from_its_page_and_the_cli_sees_it_pending(fast, browser_dashboard, browser_page):
    enqueue("-c", "false", "--id", "doomed", "--max-retries", "0")
    burst()
    assert show("doomed")["state"] == "dead"
    open_dashboard(browser_page, browser_dashboard)
    job_row(browser_page, "doomed").locator('a[href="#/jobs/doomed"]').click()
    on_page(browser_page.locator("#job")).to_be_visible()
    on_page(job_field(browser_page, "state")).to_have_text("dead")
    browser_page.locator("#job-retry").click()
    assert wait_until(lambda: show("doomed")["state"] == "pending")
    on_page(job_field(browser_page, "state")).to_have_text("pending")


def test_dashboard_job_page_shows_the_output_and_job_text_only_as_text(fast, browser_dashboard, browser_page):
    markup = "<script>window.pwned=1</script><img src=x onerror=window.pwned=2>"
    enqueue("-c", "echo hello-from-job", "--id", "hello")
    enqueue("-c", f"echo {shlex.quote(markup)}", "--id", "markup")
    burst()
    assert show("markup")["stdout"] == markup + "\n"
    open_dashboard(browser_page, browser_dashboard)
    on_page(job_row(browser_page, "markup").locator(".command")).to_contain_text(markup)
    browser_page.goto(browser_dashboard + "#/jobs/hello")
    on_page(browser_page.locator("#job-output")).to_contain_text("hello-from-job")
    browser_page.goto(browser_dashboard + "#/jobs/markup")
    on_page(job_field(browser_page, "command")).to_contain_text(markup)
    on_page(browser_page.locator("#job-output")).to_contain_text(markup)
    assert browser_page.locator("#jobs script, #jobs img, #job script, #job img").count() == 0
    assert browser_page.evaluate("typeof window.pwned") == "undefined"


def test_dashboard_dlq_purge_asks_first_and_does_nothing_when_dismissed(fast, browser_dashboard, browser_page):
    for job_id in ("d1", "d2"):
        enqueue("-c", "false", "--id", job_id, "--max-retries", "0")
    burst()
    assert len(dlq_list()) == 2
    posts = []
    browser_page.on("request", lambda request: request.method == "POST" and posts.append(request.url))
    open_dashboard(browser_page, browser_dashboard)
    on_page(browser_page.locator('#counts [data-state="dead"] .n')).to_have_text("2")

    browser_page.once("dialog", lambda dialog: dialog.dismiss())
    with browser_page.expect_event("dialog") as dialog:
        browser_page.locator("#dlq-purge").click()
    assert dialog.value.type == "confirm"
    wait_for_a_refresh(browser_page)
    assert posts == [] and len(dlq_list()) == 2
    on_page(browser_page.locator('#counts [data-state="dead"] .n')).to_have_text("2")

    browser_page.once("dialog", lambda dialog: dialog.accept())
    with browser_page.expect_event("dialog") as dialog:
        browser_page.locator("#dlq-purge").click()
    assert dialog.value.type == "confirm"
    assert wait_until(lambda: dlq_list() == [])
    assert [url.split("?")[0].endswith("/api/dlq/purge") for url in posts] == [True]
    on_page(browser_page.locator('#counts [data-state="dead"] .n')).to_have_text("0")


def test_dashboard_pauses_a_queue_with_a_click_and_the_cli_sees_it_paused(db, browser_dashboard, browser_page):
    enqueue("-c", "true", "--queue", "mail")
    open_dashboard(browser_page, browser_dashboard)
    row = browser_page.locator('#queues tbody tr[data-queue="mail"]')
    on_page(row).to_be_visible()
    row.locator('button[data-action="pause"]').click()
    assert wait_until(lambda: [(q["queue"], q["paused"]) for q in queue_list()] == [("mail", True)])
    on_page(row).to_contain_text("paused")
    on_page(row.locator('button[data-action="resume"]')).to_be_visible()


def test_dashboard_job_page_tails_the_output_of_a_running_job(fast, pool, tmp_path, browser_dashboard, browser_page):
    enqueue("-c", "i=0; while [ ! -e stop ]; do i=$((i+1)); echo tick-$i; sleep 0.2; done; echo tail-done",
            "--id", "tail")
    pool("--count", "1")
    assert wait_until(lambda: show("tail")["state"] == "processing")
    open_dashboard(browser_page, browser_dashboard, "#/jobs/tail")
    output = browser_page.locator("#job-output")
    on_page(output).to_contain_text("tick-")
    on_page(job_field(browser_page, "state")).to_have_text("processing")
    seen = output.text_content().count("tick-")
    browser_page.wait_for_function("n => document.querySelector('#job-output').textContent.split('tick-').length - 1 > n",
                                arg=seen)
    assert show("tail")["state"] == "processing"  # it runs until the file stop exists
    (tmp_path / "stop").touch()
    assert wait_until(lambda: show("tail")["state"] == "completed")
    on_page(output).to_contain_text("tail-done")
    on_page(job_field(browser_page, "state")).to_have_text("completed")


def test_dashboard_charts_completed_and_failed_runs_per_minute(fast, browser_dashboard, browser_page):
    enqueue("-c", "true", "--id", "fine")
    enqueue("-c", "false", "--id", "broken", "--max-retries", "0")
    burst()
    open_dashboard(browser_page, browser_dashboard)
    on_page(browser_page.locator("#activity rect.completed")).to_have_count(1)
    on_page(browser_page.locator("#activity rect.failed")).to_have_count(1)
    on_page(browser_page.locator("#activity-total")).to_have_text(  # 1 if a minute began between the two
        re.compile(r"· this hour: 1 completed, 1 failed; the busiest minute: [12]"))
    title = browser_page.locator("#activity rect.completed title").text_content()
    assert re.fullmatch(r"\d\d:\d\d UTC: 1 completed, [01] failed", title), title
