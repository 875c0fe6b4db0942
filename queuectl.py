#!/usr/bin/env python3
"""queuectl: a background job queue in one file (Python 3.10+, stdlib only).

    python3 queuectl.py enqueue -c 'make test' --priority 5
    python3 queuectl.py worker start --count 4
    python3 queuectl.py status

Jobs are shell commands kept in one SQLite file (WAL mode), so nothing is lost
when any process or the machine crashes; or, for workers on many hosts, in a
PostgreSQL database (--db postgresql://..., needs psycopg). One storage seam
(SqliteEngine, PostgresEngine) holds all that differs between the two.

States
    pending -> processing -> completed
                          -> failed -> processing -> ... -> dead   (retries spent)
    pending | failed | processing -> canceled                      (by the user,
                                                  or a dependency ended badly)
    End states: completed, dead, canceled.

The claim
    Jobs whose run_at has come are marked due (is_due = 1, found through the
    jobs_by_run_at index, a thousand to a short transaction). Then, in one
    transaction (SQLite: BEGIN IMMEDIATE; PostgreSQL: FOR UPDATE SKIP LOCKED),
    select the best due job through the jobs_ready index (priority desc, then
    creation order) and mark it processing with attempts + 1, a fresh lease
    token and lease_until = now + lease_timeout. No lock is held while the
    command runs, and jobs that are finished or not yet due are never walked.
    On PostgreSQL the claim, and a run's end, are one statement each (one
    round trip), the marking folded into the claim's ranking.

Invariants
    * Every state change is one transaction: after a crash each job is where
      it was or where it went.
    * A running job's lease is renewed by its worker. A job whose lease ran out
      goes back to the retry rules, the lost run counted: at least once, so a
      lost worker's job runs again.
    * Results are written only while the lease token still matches (fencing):
      a worker that lost its lease never overwrites the run that replaced it.
    * An accepted enqueue is fsynced (synchronous=FULL) before its id is printed.
    * A failed run's or a dead job's hook (on_failure, on_dead) is written as an
      event with the run's end, and run by one supervisor of all, once.

Exit codes: 0 done, 1 could not be done, 2 bad input, 124 `wait` timed out.
"""

import argparse
import codecs
import collections
import datetime
import functools
import heapq
import itertools
import json
import math
import os
import re
import signal
import sqlite3
import sys
import time
from contextlib import closing, contextmanager, suppress

__version__ = "1.0.0"


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

STATES = ("pending", "processing", "completed", "failed", "dead", "canceled")
END_STATES = ("completed", "dead", "canceled")
RETRYABLE_STATES = ("dead", "canceled")
CANCELABLE_STATES = ("pending", "failed", "processing")

JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
QUEUE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
JOB_FIELDS = ("id", "command", "max_retries", "timeout", "priority", "queue",
              "run_at", "delay", "env", "cwd", "depends_on")

# A config key's default and the values it accepts: kind is int or float,
# values from low (excluded if low_excluded) up to high (None: no limit); or
# DURATION (text like 7d, 0 for forever) or COMMAND (a shell command, '' for none).
ConfigRule = collections.namedtuple("ConfigRule", "default kind low low_excluded high",
                                    defaults=(None, False, None))
DURATION, COMMAND = "duration", "command"


CONFIG_RULES = {
    "max_retries": ConfigRule(3, int, low=0, high=1000),
    "backoff_base": ConfigRule(2, float, low=0),
    "backoff_max": ConfigRule(3600, float, low=0),
    "job_timeout": ConfigRule(3600, float, low=0),
    "lease_timeout": ConfigRule(30, float, low=1),
    "poll_interval": ConfigRule(0.5, float, low=0, low_excluded=True),
    "output_limit": ConfigRule(65536, int, low=0),
    "keep_completed": ConfigRule("7d", DURATION),  # then running supervisors delete them (see apply_retention)
    "keep_dead": ConfigRule("30d", DURATION),
    "on_failure": ConfigRule("", COMMAND),  # run by a supervisor after each failed run (see Hooks)
    "on_dead": ConfigRule("", COMMAND),  # ... and when a job dies
    "hook_timeout": ConfigRule(30, float, low=0, low_excluded=True),  # then a hook is killed
}
HOOKS = ("on_failure", "on_dead")
MIN_KEEP_S = 60  # the shortest keep_* other than 0

# Linux refuses one exec argument longer than this (MAX_ARG_STRLEN less the NUL).
MAX_COMMAND_BYTES = 128 * 1024 - 1
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL this much later (timeout, cancel)
ABORT_GRACE_S = 1.0  # the same on a forced shutdown (second signal)
FORCED_SHUTDOWN = "interrupted by a forced shutdown"  # a stop reason that is not counted
FENCE_KILL = "killed: its lease could not be renewed in time"
TAKEN_OVER = "its lease was taken over"
LEASE_LOST_REASONS = (FENCE_KILL, TAKEN_OVER)  # stop reasons of a run whose worker lost the job
OUTPUT_GRACE_S = 0.2  # read output this long after the job's main process exited
OUTPUT_FLUSH_S = 0.5  # a running job's new output reaches the database at most this often
FOLLOW_POLL_S = 0.2  # how often `logs -f` looks for new output
MAX_QUEUE_LIMIT = 1_000_000
# How a run ended (`show`'s runs); a run that is still going is 'running'.
RUN_OUTCOMES = ("running", "completed", "failed", "timed_out", "lost", "canceled", "interrupted")
SUPERVISOR_TICK_S = 0.2  # how often the supervisor looks at its pool and the db
DEFAULT_BUSY_TIMEOUT_S = 5.0
LATEST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: times must print as ISO-8601
WORKER_EXIT_CORRUPT = 3  # a worker found the database corrupt: the supervisor stops


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class QueueError(Exception):
    """The operation could not be done (exit 1); the message says what and why."""

    exit_code = 1


class StorageError(QueueError):
    """A database error, already one line for the user; kind says what it means to the caller.

    kind: 'busy' (another holds a lock: worth retrying), 'lost' (the connection
    dropped: reconnect, then retry), 'duplicate', 'corrupt', 'readonly', 'other'.
    """

    def __init__(self, message, kind="other"):
        super().__init__(message)
        self.kind = kind


class NotFound(QueueError):
    """No job or schedule of that name (exit 1; the dashboard's 404)."""


class WrongState(QueueError):
    """The job is not in a state the operation takes (exit 1; the dashboard's 409)."""


class UsageError(QueueError):
    """The user's input is wrong: usage, JSON, a field, a config key (exit 2)."""

    exit_code = 2


class WaitTimeout(QueueError):
    """`wait --timeout` ran out (exit 124)."""

    exit_code = 124


# ---------------------------------------------------------------------------
# Small helpers: clock, formatting, validation
# ---------------------------------------------------------------------------

def iso(ts):
    """Epoch seconds as ISO-8601 UTC with milliseconds, or None."""
    if ts is None:
        return None
    whole = math.floor(min(max(ts, 0.0), LATEST_TIME))
    millis = min(int((ts - whole) * 1000), 999)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def plain_number(value):
    """A float that is a whole number as an int, so JSON shows 2, not 2.0."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def seconds_text(seconds):
    """A duration for people: '0.2 s', '2 s', '1.5 s'."""
    return f"{plain_number(round(seconds, 3))} s"


def rough_duration(seconds):
    """A wait for people, as precise as it needs to be: '0.5 s', '42 s', '17 min', '3 h 5 min', '12 days'."""
    if seconds < 90:
        return seconds_text(seconds if seconds < 10 else round(seconds))
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    if seconds < 2 * 86400:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"{hours} h {minutes} min"
    return f"{round(seconds / 86400)} days"


def printable(text):
    """Text with its control characters escaped (\\x1b, \\n): it cannot move a terminal's cursor."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def one_line(text, width=80):
    """Text squeezed onto one line of at most width characters, for logs and tables."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


_last_id_us = 0
_id_stamp = (None, "")  # (second, its text): strftime once a second, not once an id
_id_suffix = os.urandom(4).hex()  # this process's: ids from two processes differ here


def _draw_id_suffix():
    """A new random suffix for this process's ids."""
    global _id_suffix
    _id_suffix = os.urandom(4).hex()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_draw_id_suffix)  # a forked child is another process


def new_job_id():
    """A fresh job id, unique and sortable by creation time: 20261122-093229-123456-3fa2c41b.

    The microseconds strictly increase within a process, and the random suffix
    tells processes apart, so two ids collide only if two processes draw the
    same 32 random bits and create a job in the same microsecond.
    """
    global _last_id_us, _id_stamp
    micros = max(time.time_ns() // 1000, _last_id_us + 1)
    _last_id_us = micros
    seconds, micros_part = divmod(micros, 1_000_000)
    if _id_stamp[0] != seconds:
        _id_stamp = (seconds, time.strftime("%Y%m%d-%H%M%S", time.gmtime(seconds)))
    return f"{_id_stamp[1]}-{micros_part:06d}-{_id_suffix}"


def check_number(field, value, kind, low, low_excluded=False, high=None):
    """Validate value as an int (kind=int) or a finite number in range; return it.

    Python compares huge ints exactly, so the range check comes before any
    conversion; a float field's value is returned as a float.
    """
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or (kind is int and not isinstance(value, int)) or (
            isinstance(value, float) and not math.isfinite(value)):
        wanted = "a whole number" if kind is int else "a number"
        raise UsageError(f"{field} must be {wanted}, got {one_line(json.dumps(value), 40)}")
    too_low = value <= low if low_excluded else value < low
    if too_low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else (
            f"greater than {low}" if low_excluded else f"at least {low}")
        raise UsageError(f"{field} must be {bounds}, got {one_line(json.dumps(value), 40)}")
    if kind is float:
        try:
            return float(value)
        except OverflowError:
            raise UsageError(f"{field} must be a number a float can hold, got {one_line(json.dumps(value), 40)}") from None
    return value


def check_id(field, value):
    """Validate a job id: 1-128 of A-Z a-z 0-9 . _ : @ -, starting alphanumeric."""
    if not isinstance(value, str) or not JOB_ID_RE.fullmatch(value):
        raise UsageError(
            f"{field} must be 1-128 characters of A-Z a-z 0-9 . _ : @ - starting with a "
            f"letter or digit, got {json.dumps(value)}")
    return value


def check_time(field, epoch_s):
    """An epoch time that ISO-8601 can show: from 1970 to the end of 9999."""
    if not (isinstance(epoch_s, (int, float)) and 0 <= epoch_s <= LATEST_TIME):
        raise UsageError(f"{field} must be a time from 1970-01-01 to 9999-12-31, got "
                         f"{one_line(json.dumps(epoch_s), 40)}")
    return float(epoch_s)


# The ISO-8601 forms run_at takes, read the same on every Python (3.10's
# fromisoformat() refuses 'Z', one-digit fractions and more): a date, or a date
# and time (T, t or space) to the hour, minute, second or fraction, then Z,
# +HH:MM, +HHMM, +HH or nothing (local time). ASCII digits only.
ISO_TIME_RE = re.compile(r"""
    (\d{4})-(\d{2})-(\d{2})
    (?: [Tt ] (\d{2}) (?: :(\d{2}) (?: :(\d{2}) (?: [.,](\d{1,9}) )? )? )?
        ( [Zz] | [+-]\d{2}(?: :?\d{2} )? )?
    )?
    """, re.VERBOSE | re.ASCII)


def parse_iso_time(text):
    """ISO-8601 text as epoch seconds; ValueError if it is not one of ISO_TIME_RE's forms."""
    from datetime import datetime, timedelta, timezone  # lazily: few commands need it
    match = ISO_TIME_RE.fullmatch(text)
    if not match:
        raise ValueError(text)
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    moment = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0))
    if offset is None:
        epoch_s = moment.timestamp()  # local time, daylight saving included
    else:
        sign, digits = (-1 if offset[0] == "-" else 1), offset[1:].replace(":", "")
        if offset in ("Z", "z"):
            digits = "0000"
        hours, minutes = int(digits[:2]), int(digits[2:] or 0)
        if hours > 23 or minutes > 59:
            raise ValueError(text)
        zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
        epoch_s = moment.replace(tzinfo=zone).timestamp()
    return epoch_s + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def parse_time(field, value):
    """ISO-8601 text (no offset: local time) or epoch seconds, as epoch seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return check_time(field, value)
    if not isinstance(value, str):
        raise UsageError(f"{field} must be an ISO-8601 time or epoch seconds, got {json.dumps(value)}")
    text = value.strip()
    try:
        return check_time(field, float(text))
    except ValueError:
        pass
    try:
        return check_time(field, parse_iso_time(text))
    except (ValueError, OverflowError, OSError):
        raise UsageError(f"{field} must be an ISO-8601 time like 2026-11-22T09:30:00Z or epoch "
                         f"seconds, got {json.dumps(value)}") from None


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", re.ASCII)


def parse_duration(text):
    """'90s', '15m', '12h', '7d' or plain seconds, as seconds."""
    match = DURATION_RE.fullmatch(text)
    if not match:
        raise UsageError(f"duration must look like 90s, 15m, 12h or 7d, got '{text}'")
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


def parse_states(text):
    """A comma-separated list of state names, each checked."""
    states = [s.strip() for s in text.split(",") if s.strip()]
    for state in states:
        if state not in STATES:
            raise UsageError(f"unknown state '{state}' (choose from {', '.join(STATES)})")
    if not states:
        raise UsageError("--state needs at least one state")
    return states


def pid_exists(pid):
    """Whether a live process with this pid exists on this machine (a zombie is not alive)."""
    if os.name == "nt":  # kill(pid, 0) there sends CTRL_C_EVENT: the heartbeat alone decides
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # a killed process stays signalable until its parent reaps it
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) is all we can know


def log(message):
    """One stamped line on stderr, in one write so lines of workers never interleave."""
    line = f"{iso(time.time())} {message}\n"
    try:
        os.write(2, line.encode("utf-8", "replace"))
    except OSError:
        pass  # a closed stderr must not stop a worker


# ---------------------------------------------------------------------------
# Storage: connection, schema and migrations, transactions
# ---------------------------------------------------------------------------

SCHEMA_V1 = [
    """
    CREATE TABLE jobs (
        seq          INTEGER PRIMARY KEY,  -- creation order: FIFO within a priority
        id           TEXT NOT NULL UNIQUE,
        command      TEXT NOT NULL,
        queue        TEXT NOT NULL,
        priority     INTEGER NOT NULL,
        max_retries  INTEGER NOT NULL,
        timeout_s    REAL NOT NULL,        -- 0: no limit
        delay_s      REAL NOT NULL,
        env          TEXT NOT NULL,        -- JSON object
        cwd          TEXT,
        depends_on   TEXT NOT NULL,        -- JSON list, as given
        deps_left    INTEGER NOT NULL,     -- dependencies not yet completed
        state        TEXT NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        run_at       REAL NOT NULL,        -- not before this; the retry time once failed
        worker_id    TEXT,
        lease_token  TEXT,
        lease_until  REAL,
        exit_code    INTEGER,
        last_error   TEXT,
        stdout       TEXT NOT NULL DEFAULT '',
        stdout_cut   INTEGER NOT NULL DEFAULT 0,  -- bytes dropped before the kept tail
        stderr       TEXT NOT NULL DEFAULT '',
        stderr_cut   INTEGER NOT NULL DEFAULT 0,
        created_at   REAL NOT NULL,
        updated_at   REAL NOT NULL,
        started_at   REAL,
        finished_at  REAL
    )
    """,
    # The claim's index: its columns follow the claim's ORDER BY, and it holds
    # only pending and failed jobs whose dependencies are met, so finished jobs
    # never slow the claim down. (Jobs not yet due are in it too and are skipped.)
    """
    CREATE INDEX jobs_due ON jobs (priority DESC, seq, run_at, queue)
    WHERE state IN ('pending', 'failed') AND deps_left = 0
    """,
    "CREATE INDEX jobs_by_state ON jobs (state, seq)",
    "CREATE INDEX jobs_leased ON jobs (lease_until) WHERE state = 'processing'",
    """
    CREATE TABLE deps (
        depends_on  TEXT NOT NULL,
        job_id      TEXT NOT NULL,
        PRIMARY KEY (depends_on, job_id)
    ) WITHOUT ROWID
    """,
    "CREATE TABLE config (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    """
    CREATE TABLE workers (
        id              TEXT PRIMARY KEY,   -- unique per process start
        kind            TEXT NOT NULL,      -- 'supervisor' or 'worker'
        supervisor_id   TEXT,
        host            TEXT NOT NULL,
        pid             INTEGER NOT NULL,
        queues          TEXT NOT NULL,      -- JSON list; empty: all
        started_at      REAL NOT NULL,
        heartbeat_at    REAL NOT NULL,
        wake_addr       TEXT,               -- abstract unix socket that wakes it (Linux)
        stop_requested  INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID
    """,
]

# Version 2: `status` reads counts kept here instead of counting every job (a
# million finished jobs took 150 ms to count). The triggers keep them exact on
# every state change and delete, in the same transaction; enqueue_rows() adds
# each batch itself, since an INSERT trigger would slow a bulk enqueue by half.
SCHEMA_V2 = [
    "CREATE TABLE job_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID",
    "INSERT INTO job_counts (state, n) VALUES " + ", ".join(f"('{state}', 0)" for state in STATES),
    "UPDATE job_counts SET n = (SELECT count(*) FROM jobs WHERE jobs.state = job_counts.state)",
    """
    CREATE TRIGGER job_counts_on_update AFTER UPDATE OF state ON jobs
    WHEN OLD.state <> NEW.state
    BEGIN
        UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
        UPDATE job_counts SET n = n + 1 WHERE state = NEW.state;
    END
    """,
    """
    CREATE TRIGGER job_counts_on_delete AFTER DELETE ON jobs
    BEGIN
        UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
    END
    """,
]

# Version 3: nothing waits behind jobs that are not due yet.
# * is_due: a pending or failed job is due once its run_at has passed. The
#   claim first promotes the jobs that became due (is_due = 1, found through
#   jobs_by_run_at from the oldest run_at up to now), then takes the best one
#   from jobs_ready, which holds only due jobs: a claim never walks jobs
#   scheduled for later or backing off, however many there are.
# * jobs_by_run_at also gives status its oldest runnable job in one step.
# * job_counts counts per queue and state: status adds up the queues, and
#   `--burst --queue` asks the counts instead of looking for jobs.
# * jobs_by_queue: `list --queue` reads one queue's jobs, not all.
SCHEMA_V3 = [
    "ALTER TABLE jobs ADD COLUMN is_due INTEGER NOT NULL DEFAULT 0",  # the first claim promotes
    "DROP INDEX jobs_due",
    """
    CREATE INDEX jobs_ready ON jobs (priority DESC, seq, queue)
    WHERE state IN ('pending', 'failed') AND deps_left = 0 AND is_due = 1
    """,
    """
    CREATE INDEX jobs_by_run_at ON jobs (is_due, run_at)
    WHERE state IN ('pending', 'failed') AND deps_left = 0
    """,
    "CREATE INDEX jobs_by_queue ON jobs (queue, seq)",
    "CREATE INDEX deps_by_job ON deps (job_id)",  # purge drops a job's own edges by job_id
    "DROP TRIGGER job_counts_on_update",
    "DROP TRIGGER job_counts_on_delete",
    "DROP TABLE job_counts",
    """
    CREATE TABLE job_counts (
        queue  TEXT NOT NULL,
        state  TEXT NOT NULL,
        n      INTEGER NOT NULL,
        PRIMARY KEY (queue, state)
    ) WITHOUT ROWID
    """,
    # Every queue has a row for every state, so the triggers only ever update.
    "INSERT INTO job_counts (queue, state, n) SELECT queue, state, 0 FROM (SELECT DISTINCT queue FROM jobs), ("
    + " UNION ALL ".join(f"SELECT '{state}' AS state" for state in STATES) + ")",
    """
    UPDATE job_counts
    SET n = (SELECT count(*) FROM jobs WHERE jobs.queue = job_counts.queue AND jobs.state = job_counts.state)
    """,
    """
    CREATE TRIGGER job_counts_on_update AFTER UPDATE OF state ON jobs
    WHEN OLD.state <> NEW.state
    BEGIN
        UPDATE job_counts SET n = n - 1 WHERE queue = OLD.queue AND state = OLD.state;
        UPDATE job_counts SET n = n + 1 WHERE queue = NEW.queue AND state = NEW.state;
    END
    """,
    """
    CREATE TRIGGER job_counts_on_delete AFTER DELETE ON jobs
    BEGIN
        UPDATE job_counts SET n = n - 1 WHERE queue = OLD.queue AND state = OLD.state;
    END
    """,
]

# Version 4: every run kept, and queues that can be paused and limited.
# * runs: one row per run that started, numbered per job by jobs.last_run
#   (never reused, not even after a retry). It keeps the run's own tail of
#   stdout and stderr as bytes, and how many bytes it wrote in all; a running
#   job's worker flushes them there, so `logs -f` can follow from any host.
#   Keyed by the job's seq: a purged job's id may come back as a new job.
# * queues: a queue's settings (paused, max_running; 0: no limit). A queue
#   without a row has none. jobs_running finds the runs going in a queue (the
#   jobs holding a lease token: few, one per busy worker at most) for its limit.
# Runs of jobs that ran before version 4 were not kept; their jobs still show
# their last output.
SCHEMA_V4 = [
    "ALTER TABLE jobs ADD COLUMN last_run INTEGER NOT NULL DEFAULT 0",
    """
    CREATE TABLE runs (
        job_seq       INTEGER NOT NULL,
        run           INTEGER NOT NULL,   -- 1, 2, ... over the job's whole life
        attempt       INTEGER NOT NULL,   -- its QUEUECTL_ATTEMPT
        worker_id     TEXT,
        host          TEXT,
        started_at    REAL NOT NULL,
        finished_at   REAL,               -- NULL while it runs
        exit_code     INTEGER,
        error         TEXT,
        outcome       TEXT NOT NULL,      -- RUN_OUTCOMES
        stdout        BLOB NOT NULL DEFAULT x'',  -- the last output_limit bytes
        stdout_bytes  INTEGER NOT NULL DEFAULT 0, -- every byte written
        stderr        BLOB NOT NULL DEFAULT x'',
        stderr_bytes  INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_seq, run)
    )
    """,
    """
    CREATE TABLE queues (
        queue        TEXT PRIMARY KEY,
        paused       INTEGER NOT NULL DEFAULT 0,
        max_running  INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID
    """,
    "CREATE INDEX jobs_running ON jobs (queue, lease_until) WHERE lease_token IS NOT NULL",
    # A run going while the database is upgraded (its job holds a lease token) gets its row.
    """
    INSERT INTO runs (job_seq, run, attempt, worker_id, started_at, outcome)
    SELECT seq, 1, attempts, worker_id, coalesce(started_at, updated_at), 'running'
    FROM jobs WHERE lease_token IS NOT NULL
    """,
    "UPDATE jobs SET last_run = 1 WHERE lease_token IS NOT NULL",
]

# Version 5: recurring schedules (see "Schedules" below). handled_until is
# the watermark: every tick up to it was fired or skipped.
SCHEMA_V5 = [
    """
    CREATE TABLE schedules (
        name           TEXT PRIMARY KEY,
        cron           TEXT NOT NULL,
        tz             TEXT NOT NULL,
        job            TEXT NOT NULL,     -- the template: a job object without id, run_at, delay, depends_on
        paused         INTEGER NOT NULL DEFAULT 0,
        catch_up       TEXT NOT NULL,     -- latest, all or none
        no_overlap     INTEGER NOT NULL,
        created_at     REAL NOT NULL,
        anchor         REAL NOT NULL,     -- @every counts from here (the whole second after created_at)
        handled_until  REAL NOT NULL,
        last_tick_at   REAL,
        last_job_id    TEXT
    ) WITHOUT ROWID
    """,
]

# Version 6:
# * The run going lives in its job's row until it ends (see FINISH_RUN_SQL):
#   run_host says where it runs.
# * Lost leases are found through jobs_by_state (processing jobs are few):
#   jobs_leased, one index more to keep on every claim and result, goes.
# * A job made by a schedule names it (schedule), and jobs_of_schedules finds
#   a schedule's jobs not yet ended (--no-overlap) without walking its past.
# * A supervisor says whether it fires schedules (not --burst, not stopping):
#   a tick that came while one did was not missed.
def schema_v6(text_type):
    return [
        f"ALTER TABLE jobs ADD COLUMN run_host {text_type}",
        """
        UPDATE jobs SET run_host = (SELECT host FROM runs WHERE job_seq = jobs.seq AND run = jobs.last_run),
                        started_at = coalesce(started_at, updated_at)
        WHERE lease_token IS NOT NULL
        """,
        "DROP INDEX jobs_leased",
        f"ALTER TABLE jobs ADD COLUMN schedule {text_type}",
        """
        CREATE INDEX jobs_of_schedules ON jobs (schedule)
        WHERE schedule IS NOT NULL AND state IN ('pending', 'failed', 'processing')
        """,
        "ALTER TABLE workers ADD COLUMN fires_schedules INTEGER NOT NULL DEFAULT 0",
    ]


SCHEMA_V6 = schema_v6("TEXT")

# Version 8, the same on both engines: has_dependents says that a job may
# have dependents. It is set before any dependent of the job is added
# (mark_dependencies; on PostgreSQL committed first, one statement each), and
# never cleared. A worker that finds it unset when it records the job's end
# (in the same statement) knows no dependent can be waiting: it records the
# end in one statement, without holding the job as a dependency (see
# record_run).
SCHEMA_V8 = [
    "ALTER TABLE jobs ADD COLUMN has_dependents INTEGER NOT NULL DEFAULT 0",
    "UPDATE jobs SET has_dependents = 1 WHERE id IN (SELECT depends_on FROM deps)",
]

# Version 9, months on a server:
# * jobs_finished: the completed and dead jobs by when they finished, so the
#   supervisors' retention (keep_completed, keep_dead) finds the ones to
#   delete without walking the rest, or any live job.
# * runs_by_finish: the runs by when they finished, for the dashboard's
#   chart and /metrics (what finished in the last hour, or since the last
#   scrape): no read walks older runs.
# * hook_events: a run that failed or a job that died, waiting for its hook
#   (on_failure, on_dead) to be run by one supervisor (taken_by), then
#   deleted; worker_id is the run's, so a stopping supervisor takes its own.
# * A database that already holds jobs keeps them forever until keep_* is
#   set: an upgrade never starts deleting history by itself.
def schema_v9(serial_key, time_type):
    return [
        "CREATE INDEX jobs_finished ON jobs (state, finished_at) WHERE state IN ('completed', 'dead')",
        "CREATE INDEX runs_by_finish ON runs (finished_at, outcome) WHERE finished_at IS NOT NULL",
        f"""
        CREATE TABLE hook_events (
            seq          {serial_key},
            hook         TEXT NOT NULL,
            job_id       TEXT NOT NULL,
            queue        TEXT NOT NULL,
            attempt      INTEGER NOT NULL,
            exit_code    INTEGER,
            error        TEXT,
            worker_id    TEXT,
            created_at   {time_type} NOT NULL,
            taken_by     TEXT
        )
        """,
        "INSERT INTO config (key, value) SELECT 'keep_completed', '\"0\"' WHERE EXISTS (SELECT 1 FROM jobs)",
        "INSERT INTO config (key, value) SELECT 'keep_dead', '\"0\"' WHERE EXISTS (SELECT 1 FROM jobs)",
    ]


# An engine's MIGRATIONS[v] brings its database at version v - 1 to version v.
# A release that changes the schema adds a step to both engines and raises
# SCHEMA_VERSION; the engine records which steps are done.
SCHEMA_VERSION = 9
# Version 7 is PostgreSQL's job_counts (SQLite has kept its own since version 2).
SQLITE_MIGRATIONS = {1: SCHEMA_V1, 2: SCHEMA_V2, 3: SCHEMA_V3, 4: SCHEMA_V4, 5: SCHEMA_V5, 6: SCHEMA_V6, 7: [],
                     8: SCHEMA_V8, 9: schema_v9("INTEGER PRIMARY KEY", "REAL")}
OUR_TABLES = {"jobs", "deps", "config", "workers", "job_counts", "runs", "queues", "schedules", "job_count_changes",
              "hook_events"}


# ---------------------------------------------------------------------------
# Storage: the seam between the queue and its database
# ---------------------------------------------------------------------------
#
# The queue operations, the workers and the commands talk to an engine, never
# to a database driver, and never ask which engine they have. SqliteEngine and
# PostgresEngine below have the same small surface:
#
#   execute(sql, params), executemany(sql, rows)  SQL of the common subset with
#       :named (or ?) parameters; rows read by name or by position
#   transaction()        one change, all or nothing
#   now()                the clock every lease and schedule is measured on
#   waiting_at_most(s), set_lock_wait(s), lock_wait_s: how long a statement
#       may wait for another's lock (for a block, from now on, said last)
#   claim_query(queues), BECOME_DUE_SQL, PROMOTE_DUE_SQL, OLDEST_RUN_AT_SQL:
#       the claim's SQL; ONE_STATEMENT_WRITES: whether a claim and a run's end
#       are one statement each (a WITH that writes); MINUTE_OF_FINISH
#   count_jobs(), add_to_counts(counts), fold_counts(), has_work(queues): the
#       job counts
#   listen(worker_id), wake_source(), drain_wakeups(source), wake_workers():
#       waking idle workers
#   schema_version(), set_schema_version(v), foreign_tables(), MIGRATIONS
#   reconnect(), close()
#
# A driver error leaves an engine as a StorageError, one line for the user,
# whose kind tells the caller what it means: 'busy' (another holds a lock:
# worth retrying), 'lost' (the connection dropped: reconnect, then retry),
# 'duplicate', 'corrupt', 'readonly' or 'other'.

MAX_BUSY_TIMEOUT_S = 86400.0  # SQLite takes the busy timeout as an int of milliseconds


def busy_timeout_s():
    """How long to wait for another process's write lock ($QUEUECTL_BUSY_TIMEOUT), checked."""
    text = os.environ.get("QUEUECTL_BUSY_TIMEOUT", "")
    if not text:
        return DEFAULT_BUSY_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= MAX_BUSY_TIMEOUT_S:  # written so that NaN fails too
        raise UsageError(f"QUEUECTL_BUSY_TIMEOUT must be a number of seconds from 0 to "
                         f"{MAX_BUSY_TIMEOUT_S:.0f}, got '{text}'")
    return seconds


def resolve_db_path(arg):
    """--db, else $QUEUECTL_DB (empty counts as unset), else ./queuectl.db."""
    if arg == "":
        raise UsageError("--db must name a database file, got ''")
    return arg or os.environ.get("QUEUECTL_DB") or "queuectl.db"


def is_postgres_url(target):
    """Whether --db names a PostgreSQL database rather than a SQLite file."""
    return target.startswith(("postgresql://", "postgres://"))


def connect(target, durable=True):
    """The engine for --db: a PostgreSQL URL or a SQLite file path, created and migrated as needed.

    durable=True makes every commit survive power loss before it returns
    (commands); workers pass False where the engine can trade that for speed
    (SQLite's synchronous=NORMAL): a power cut may undo their last claims and
    results, which then run again (at least once).
    """
    if is_postgres_url(target):
        return PostgresEngine(target, durable)
    return SqliteEngine(target, durable)


def db_for_children(target):
    """$QUEUECTL_DB for a job, so it can call queuectl on this database from any directory."""
    return target if is_postgres_url(target) else os.path.abspath(target)


def log_path_for(target):
    """Where `worker start --detach` logs: <db>.log, or ./queuectl-<schema>.log for PostgreSQL."""
    return f"queuectl-{pg_schema_name()}.log" if is_postgres_url(target) else target + ".log"


def check_schema(engine):
    """Refuse a database of a newer queuectl, or one that belongs to something else."""
    version = engine.schema_version()
    if version > SCHEMA_VERSION:
        raise QueueError(f"the database has schema version {version}, newer than this queuectl "
                         f"{__version__} knows ({SCHEMA_VERSION}); use a newer queuectl")
    if version == 0:
        foreign = engine.foreign_tables()
        if foreign:
            raise QueueError(engine.foreign_tables_message(foreign))
    return version


def migrate(engine):
    """Bring the schema to SCHEMA_VERSION in one transaction, step by step."""
    if engine.schema_version() == SCHEMA_VERSION:
        return
    with engine.transaction():
        engine.lock_schema()
        version = check_schema(engine)  # again under the lock: another process may have migrated
        if version == SCHEMA_VERSION:
            return
        refuse_while_older_workers_run(engine, version)
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in engine.MIGRATIONS.get(step, ()):
                engine.execute(statement)
        engine.set_schema_version(SCHEMA_VERSION)


def refuse_while_older_workers_run(engine, version):
    """Refuse to upgrade under live workers of an older queuectl: the new schema would break them."""
    if version == 0:
        return
    lease_s = load_config(engine)["lease_timeout"]
    alive = engine.execute("SELECT count(*) FROM workers WHERE heartbeat_at >= :since",
                           {"since": engine.now() - lease_s}).fetchone()[0]
    if alive:
        raise QueueError(f"the database is at schema version {version} and {alive} process(es) of that older "
                         "queuectl are running on it; stop them first (SIGTERM, or `worker stop` with the "
                         "queuectl that started them), then use this one")


def is_busy(error):
    """Whether an error is another process's lock: worth waiting for and trying again."""
    return getattr(error, "kind", None) == "busy"


def is_transient(error):
    """Whether an error will likely pass: a lock held elsewhere, or a connection to open again."""
    return getattr(error, "kind", None) in ("busy", "lost")


def is_corrupt(error):
    """Whether an error says the database is damaged or not a database at all."""
    return getattr(error, "kind", None) == "corrupt"


def retry_busy(operation, conn, *args, give_up_s=None, is_wanted=None):
    """operation(conn, *args), retrying a busy database with backoff for up to give_up_s.

    give_up_s defaults to the busy timeout; with give_up_s=math.inf it retries
    for as long as is_wanted() (default: always) says the result is still wanted.
    A lost connection is reconnected and retried the same way.

    SQLite's own busy handler already waits; this also covers the SQLITE_BUSY
    it returns at once (e.g. while a checkpoint or a WAL recovery runs), so a
    heartbeat, a claim or a finish never fails on a momentary lock.
    """
    delay_s = 0.001
    give_up_at = time.monotonic() + (busy_timeout_s() if give_up_s is None else give_up_s)
    while True:
        try:
            return operation(conn, *args)
        except StorageError as e:
            if not is_transient(e) or time.monotonic() >= give_up_at or (is_wanted and not is_wanted()):
                raise
            if e.kind == "lost":
                try_to_reconnect(conn)
        time.sleep(delay_s)
        delay_s = min(delay_s * 2, 0.25)


def try_to_reconnect(conn):
    """Open the engine's connection again; a server still away is tried again by the caller."""
    try:
        conn.reconnect()
    except StorageError as e:
        if e.kind != "lost":
            raise


def if_possible(conn, operation, *args):
    """operation(conn, *args) if the database lets us write at once, else nothing (None).

    For a reader's tidying up (reaping leases, pruning dead workers): it never
    waits for another process's lock, and a read-only database is no error.
    """
    try:
        with conn.waiting_at_most(0):
            return operation(conn, *args)
    except StorageError as e:
        if e.kind not in ("busy", "readonly"):
            raise
        return None


def fold_counts(conn):
    """Keep the counts' pending changes few (PostgreSQL; see PG_SCHEMA_V7)."""
    conn.fold_counts()


# Whether a queue's jobs are not claimed now: it is paused, or has as many runs
# going as its limit (see running_in). A queue without settings has no row.
BLOCKED_QUEUE_SQL = """
    SELECT 1 FROM queues
    WHERE queues.queue = jobs.queue
      AND (paused = 1
           OR (max_running > 0
               AND max_running <= (SELECT count(*) FROM jobs AS running
                                   WHERE running.lease_token IS NOT NULL AND running.queue = queues.queue
                                     AND running.lease_until >= :now)))
"""


# A pending or failed job whose run_at has come but that is not marked due
# yet. A job whose canceled run is still being stopped (its lease token kept by
# cancel_jobs) waits until that run is gone or its lease has run out: a job
# never runs twice at once, not even after cancel + retry.
BECAME_DUE_SQL = """is_due = 0
      AND run_at <= :now
      AND (lease_token IS NULL OR lease_until < :now)"""


def claim_update_sql(seq):
    """The claim's write: the job whose seq is `seq` (a parameter or a subquery) becomes processing."""
    return f"""
    UPDATE jobs
    SET state = 'processing',
        attempts = attempts + 1,
        last_run = last_run + 1,
        worker_id = :worker_id,
        lease_token = :lease_token,
        lease_until = :lease_until,
        run_host = :host,
        started_at = :now,
        updated_at = :now
    WHERE seq = {seq}
      AND state IN ('pending', 'failed')
    """


CLAIM_UPDATE_SQL = claim_update_sql(":seq")


def claim_statements(ready, by_run_at, skip_locked):
    """The claim's SQL, written once; each engine gives its index hints and row locking.

    BECOME_DUE_SQL finds, oldest first, jobs whose run_at has come, through
    jobs_by_run_at: never the jobs still scheduled for later. PROMOTE_DUE_SQL
    marks them due. CLAIM_SELECT_SQL takes the best due job through
    jobs_ready, whose order is its ORDER BY ({due} is is_due = 1 there; the
    one-statement claim also asks it of the jobs that became due, through
    jobs_by_run_at). OLDEST_RUN_AT_SQL is one step into jobs_by_run_at.
    """
    become_due = f"""
    SELECT seq
    FROM jobs {by_run_at}
    WHERE state IN ('pending', 'failed')
      AND deps_left = 0
      AND {BECAME_DUE_SQL}
    ORDER BY run_at
    LIMIT :batch
    """
    promote_due = f"UPDATE jobs SET is_due = 1 WHERE seq IN ({become_due} {skip_locked})"
    claim_select = f"""
    SELECT seq, id, command, env, cwd, timeout_s, attempts, max_retries, queue, last_run, priority, is_due,
           state AS state_before, last_error AS last_error_before, started_at AS started_at_before,
           updated_at AS updated_at_before, lease_token AS token_before,
           (SELECT max_running FROM queues WHERE queues.queue = jobs.queue) AS queue_limit
    FROM jobs {ready}
    WHERE state IN ('pending', 'failed')
      AND deps_left = 0
      AND {{due}}
      AND NOT EXISTS ({BLOCKED_QUEUE_SQL})
      {{queue_filter}}
    ORDER BY priority DESC, seq
    LIMIT 1
    {{locking}}
    """
    oldest_run_at = f"""
    SELECT min(run_at)
    FROM jobs {by_run_at}
    WHERE state IN ('pending', 'failed')
      AND deps_left = 0
      AND is_due = :is_due
    """
    return become_due, promote_due, claim_select, oldest_run_at


# The whole claim as one statement (PostgreSQL: one round trip, its own
# transaction). `waiting` is the oldest :batch jobs whose time came since the
# last promotion (through jobs_by_run_at). The best of them and the best job
# marked due (through jobs_ready) are each locked, or skipped if another
# claimer holds them, and the better of the two is taken, unless it is of a
# limited queue, has a canceled run to end first, or :batch or more jobs are
# waiting (the best of all of them is then found the long way, after they
# are marked due): claim() takes those as on any engine.
ONE_STATEMENT_CLAIM_SQL = """
WITH waiting AS ({waiting}),
     ready AS ({ready}),
     became_due AS ({became_due}),
     chosen AS (
         SELECT *
         FROM (SELECT * FROM ready UNION ALL SELECT * FROM became_due) AS candidates
         ORDER BY priority DESC, seq
         LIMIT 1),
     claimed AS ({claim_update} RETURNING seq)
SELECT chosen.*,
       claimed.seq IS NOT NULL AS is_claimed,
       (SELECT count(*) FROM waiting) AS became_due_left
FROM (SELECT 1) AS one
LEFT JOIN chosen ON true
LEFT JOIN claimed ON true
"""
WAITING_IN_ONE_STATEMENT = f"{BECAME_DUE_SQL}\n      AND seq IN (SELECT seq FROM waiting)"
TAKEN_IN_ONE_STATEMENT = """(
        SELECT seq FROM chosen
        WHERE coalesce(queue_limit, 0) = 0
          AND token_before IS NULL
          AND (SELECT count(*) FROM waiting) < :batch)"""
ONE_STATEMENT_BATCH = 100  # jobs whose time came that one claim ranks; more are marked due first


ClaimQuery = collections.namedtuple("ClaimQuery", "sql params queues full one_statement")


class Result:
    """A statement's rows, all read inside the engine (so a bad page fails there), and its rowcount."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows, rowcount):
        self.rows, self.rowcount = rows, rowcount

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def fetchall(self):
        return self.rows

    def __iter__(self):
        return iter(self.rows)


class Engine:
    """What both engines share; each defines the rest of the seam (see above)."""

    LOCK_FOR_UPDATE = ""  # ends a read of rows the transaction goes on to change
    SKIP_LOCKED = ""  # ends the claim's read: rows another claimer holds are passed over
    location = None  # where the queue is, for people (`init`)
    CALLS_CAN_HANG = False  # whether a statement can block past the fence (a network that went silent)
    MINUTE_OF_FINISH = "CAST(finished_at AS INTEGER) / 60"  # the whole minute a run finished in (SQLite truncates)
    # Whether a claim, and the end of a run, can each be one statement (a WITH
    # that writes): one round trip each where the database is far away.
    ONE_STATEMENT_WRITES = False

    def hold_dependency(self, job_id):
        """Keep job_id from settling its dependents until we commit (SQLite's write lock does it)."""

    def hold_dependents(self, job_id):
        """Wait for transactions holding job_id as a dependency (SQLite's write lock does it)."""

    def claim_query(self, queues, full=(), only=None):
        """The claim's SELECT for queues (all when empty) but not those full, with its parameters.

        only: the SELECT of one limited queue, whose row the caller holds: it
        waits for a job another claimer is looking at instead of skipping it.
        """
        names = {f"q{i}": queue for i, queue in enumerate(queues)}
        queue_filter = f"AND queue IN ({', '.join(':' + n for n in names)})" if names else ""
        skipped = {f"full{i}": queue for i, queue in enumerate(full)}
        if skipped:
            queue_filter += f" AND queue NOT IN ({', '.join(':' + n for n in skipped)})"
        if only is not None:
            queue_filter += " AND queue = :only"
            skipped["only"] = only
        sql = self.CLAIM_SELECT_SQL.format(queue_filter=queue_filter, due="is_due = 1",
                                           locking=self.SKIP_LOCKED if only is None else self.LOCK_FOR_UPDATE)
        one_statement = None
        if self.ONE_STATEMENT_WRITES and only is None:
            one_statement = ONE_STATEMENT_CLAIM_SQL.format(
                waiting=self.BECOME_DUE_SQL,
                ready=sql,
                became_due=self.CLAIM_SELECT_SQL.format(queue_filter=queue_filter, due=WAITING_IN_ONE_STATEMENT,
                                                        locking=self.SKIP_LOCKED),
                claim_update=claim_update_sql(TAKEN_IN_ONE_STATEMENT))
        return ClaimQuery(sql, {**names, **skipped}, tuple(queues), tuple(full), one_statement)

    @contextmanager
    def waiting_at_most(self, seconds):
        """Statements inside wait at most this long for another's lock, then fail busy."""
        try:
            self.set_lock_wait(seconds)  # inside: a connection lost here is still set back below
            yield self
        finally:
            self.set_lock_wait(busy_timeout_s())


# ---------------------------------------------------------------------------
# Storage: SQLite, one file on one host
# ---------------------------------------------------------------------------

def prepare_db_file(path):
    """Refuse paths that cannot hold a database; create a missing file owner-only.

    Checked before SQLite opens anything, so a refused database gets no -wal or
    -shm file that would outlive the fix.
    """
    if os.path.isdir(path):
        raise QueueError(f"cannot use database '{path}': it is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise QueueError(f"cannot create database '{path}': directory '{parent}' does not exist")
    for name in (path, path + "-wal", path + "-shm"):
        if is_refused(name):
            raise QueueError(f"cannot use database '{path}': this user cannot read and write '{name}'; "
                             "check its permissions")
    sidecars_exist = os.path.exists(path + "-wal") and os.path.exists(path + "-shm")
    if not sidecars_exist and not os.access(parent, os.W_OK | os.X_OK):
        raise QueueError(f"cannot use database '{path}': directory '{parent}' is read-only, and SQLite "
                         "needs to create its -wal and -shm files there")
    try:
        # 0600 from the start: the jobs it holds run as shell commands. SQLite
        # gives the -wal and -shm files the same mode.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as e:
        raise QueueError(f"cannot create database '{path}': {e.strerror}") from None


def is_refused(name):
    """Whether a file exists and this user may not read and write it.

    The -wal and -shm files come and go with the last connection of any
    process (SQLite deletes them on close and makes them again, with the
    database's mode, on open), so a failed access() is asked again: only a
    file that stays there and stays refused is a permission problem.
    (access(), not open(): closing an fd of a file drops this process's
    POSIX locks on it, which another connection of ours may hold.)
    """
    for _ in range(3):
        if os.access(name, os.R_OK | os.W_OK) or not os.path.exists(name):
            return False
    return True


class SqliteEngine(Engine):
    """The queue in one SQLite file in WAL mode: any number of processes on one host.

    The connection is in autocommit mode; transaction() is BEGIN IMMEDIATE,
    which takes the write lock up front, so two claimers queue on the busy
    timeout instead of both reading the same job and one failing to upgrade.
    Job counts are kept in job_counts by triggers (see SCHEMA_V2 and V3).
    """

    MIGRATIONS = SQLITE_MIGRATIONS

    # The claim's statements (see claim_statements), with SQLite's index hints:
    # its planner would sort every pending job rather than trust a partial index.
    BECOME_DUE_SQL, PROMOTE_DUE_SQL, CLAIM_SELECT_SQL, OLDEST_RUN_AT_SQL = claim_statements(
        ready="INDEXED BY jobs_ready", by_run_at="INDEXED BY jobs_by_run_at", skip_locked="")

    def __init__(self, path, durable=True):
        prepare_db_file(path)
        self.path = path
        self.location = os.path.abspath(path)
        self.wake_sock = None
        self.lock_wait_s = busy_timeout_s()  # what set_lock_wait() said last
        try:
            self.conn = sqlite3.connect(path, timeout=self.lock_wait_s, isolation_level=None,
                                        check_same_thread=False)
        except sqlite3.Error as e:
            raise self.error(e) from e
        try:
            self.conn.row_factory = sqlite3.Row
            check_schema(self)  # refuse a newer or foreign database before changing anything
            if self.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self.execute("PRAGMA journal_mode = WAL")
            self.execute("PRAGMA synchronous = " + ("FULL" if durable else "NORMAL"))
            if durable and sys.platform == "darwin":  # macOS fsync() stops at the drive's cache
                self.execute("PRAGMA fullfsync = ON")
            migrate(self)
        except BaseException:
            self.close()
            raise

    # -- statements and transactions ---------------------------------------

    def execute(self, sql, params=()):
        """Run one statement; its Result (rows are sqlite3.Row: by name or position)."""
        try:
            cursor = self.conn.execute(sql, params)
            return Result(cursor.fetchall(), cursor.rowcount)  # SQLite may fail on any row it reads
        except sqlite3.Error as e:
            raise self.error(e) from e

    def executemany(self, sql, rows):
        """Run one statement for each of rows."""
        try:
            return Result([], self.conn.executemany(sql, rows).rowcount)
        except sqlite3.Error as e:
            raise self.error(e) from e

    @contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error: one change, all or nothing."""
        self.execute("BEGIN IMMEDIATE")
        try:
            yield self
            self.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:  # SQLite may have rolled back already (disk full)
                self.execute("ROLLBACK")
            raise

    def lock_schema(self):
        """Nothing to do: BEGIN IMMEDIATE already holds the only write lock."""

    def set_lock_wait(self, seconds):
        """How long a statement may wait for another process's write lock (the busy timeout)."""
        self.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")
        self.lock_wait_s = seconds

    def now(self):
        """Epoch seconds: every process of the one host shares the clock."""
        return time.time()

    def reconnect(self):
        """A file does not go away like a server: nothing to do."""

    def close(self):
        """Close the connection and any wake-up socket."""
        if self.wake_sock is not None:
            self.wake_sock.close()
        self.conn.close()

    # -- schema --------------------------------------------------------------

    def schema_version(self):
        """The schema version written by the last migration (0: none yet)."""
        return self.execute("PRAGMA user_version").fetchone()[0]

    def set_schema_version(self, version):
        """Record the schema version (inside the migration's transaction)."""
        self.execute(f"PRAGMA user_version = {int(version)}")

    def foreign_tables(self):
        """Tables of a database at version 0 that are not queuectl's."""
        tables = {r[0] for r in self.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return sorted(tables) if tables - OUR_TABLES else []

    def foreign_tables_message(self, tables):
        """Why a database with other tables is refused."""
        return f"not a queuectl database: it has other tables ({', '.join(tables)})"

    # -- the claim and the counts ----------------------------------------------

    def count_jobs(self):
        """{(queue, state): count}, read from job_counts, not counted."""
        return {(row[0], row[1]): row[2] for row in self.execute("SELECT queue, state, n FROM job_counts")}

    def add_to_counts(self, counts):
        """job_counts += counts ({(queue, state): n}) for new jobs; a new queue gets its rows first."""
        self.executemany("INSERT OR IGNORE INTO job_counts (queue, state, n) VALUES (?, ?, 0)",
                         [(queue, state) for queue in {queue for queue, _ in counts} for state in STATES])
        self.executemany("UPDATE job_counts SET n = n + ? WHERE queue = ? AND state = ?",
                         [(n, queue, state) for (queue, state), n in counts.items()])

    def fold_counts(self):
        """Nothing to do: the triggers keep job_counts itself exact."""

    def has_work(self, queues, paused=()):
        """Whether a job of queues (all when empty) is processing, or pending or failed and not paused."""
        queue_filter = f"AND queue IN ({', '.join('?' for _ in queues)})" if queues else ""
        return self.execute(f"""
            SELECT 1
            FROM job_counts
            WHERE n > 0
              AND (state = 'processing'
                   OR (state IN ('pending', 'failed') AND queue NOT IN ({', '.join('?' for _ in paused)})))
              {queue_filter}
            LIMIT 1
            """, [*paused, *queues]).fetchone() is not None

    # -- waking idle workers: an abstract unix datagram socket each (Linux) ------

    def listen(self, worker_id):
        """Listen for nudges; the address for the registry, or None off Linux."""
        import socket
        if not sys.platform.startswith("linux"):
            return None
        address = f"queuectl/{worker_id}"
        self.wake_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.wake_sock.bind("\0" + address)
        self.wake_sock.setblocking(False)
        return address

    def wake_source(self):
        """What to select on for nudges (None: poll only)."""
        return self.wake_sock

    def drain_wakeups(self, source):
        """Forget the nudges that arrived."""
        drain(source)

    def wake_workers(self):
        """Nudge idle workers so a new job starts now, not at their next poll.

        A lost or refused nudge is harmless: every worker still polls every
        poll_interval.
        """
        addresses = [r[0] for r in self.execute("SELECT wake_addr FROM workers WHERE wake_addr IS NOT NULL")]
        if not addresses:
            return
        import socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            for address in addresses:
                try:
                    sock.sendto(b"!", "\0" + address)
                except OSError:
                    pass  # gone, or its buffer is full: it is awake anyway

    # -- errors ----------------------------------------------------------------

    def error(self, error):
        """A sqlite3 error as a StorageError: one line that names the database and what to do."""
        path, text = self.path, str(error)
        if isinstance(error, sqlite3.IntegrityError):
            return StorageError(f"database '{path}': {text}", "duplicate")
        if "locked" in text or "busy" in text:
            return StorageError(f"database '{path}' is locked: another process held its write lock for "
                                f"more than {seconds_text(busy_timeout_s())} ({text})", "busy")
        if "readonly" in text:
            return StorageError(f"database '{path}' is read-only ({text}); check the file's and its "
                                "directory's permissions", "readonly")
        if "full" in text:
            return StorageError(f"database '{path}': the disk is full or the file is too large ({text}); "
                                "nothing was changed")
        if "not a database" in text:
            return StorageError(f"'{path}' is not a SQLite database ({text})", "corrupt")
        if "malformed" in text or "corrupt" in text:
            return StorageError(f"database '{path}' is corrupt ({text}); restore it from a backup", "corrupt")
        if "unable to open" in text:
            return StorageError(f"cannot open database '{path}' ({text}); check the permissions of it and "
                                "its directory")
        if "disk I/O" in text:
            return StorageError(f"database '{path}': {text}: the disk may be full, a file size limit "
                                "reached, or the disk failing; nothing was changed")
        return StorageError(f"database '{path}': {text}")


# ---------------------------------------------------------------------------
# Storage: PostgreSQL, one queue for many hosts
# ---------------------------------------------------------------------------

PG_SCHEMA_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
PG_PARAM_RE = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)|\?")  # :name or ?, never a ::cast

# Version 3, the first on PostgreSQL: the same tables, columns and partial
# indexes as on SQLite (see SCHEMA_V1 to V3), in a schema of their own. Job
# counts are counted when asked (no counter rows every worker would queue on).
PG_SCHEMA_V3 = [
    """
    CREATE TABLE jobs (
        seq          bigserial PRIMARY KEY,
        id           text NOT NULL UNIQUE,
        command      text NOT NULL,
        queue        text NOT NULL,
        priority     integer NOT NULL,
        max_retries  integer NOT NULL,
        timeout_s    double precision NOT NULL,
        delay_s      double precision NOT NULL,
        env          text NOT NULL,
        cwd          text,
        depends_on   text NOT NULL,
        deps_left    integer NOT NULL,
        state        text NOT NULL,
        attempts     integer NOT NULL DEFAULT 0,
        run_at       double precision NOT NULL,
        is_due       integer NOT NULL DEFAULT 0,
        worker_id    text,
        lease_token  text,
        lease_until  double precision,
        exit_code    integer,
        last_error   text,
        stdout       text NOT NULL DEFAULT '',
        stdout_cut   bigint NOT NULL DEFAULT 0,
        stderr       text NOT NULL DEFAULT '',
        stderr_cut   bigint NOT NULL DEFAULT 0,
        created_at   double precision NOT NULL,
        updated_at   double precision NOT NULL,
        started_at   double precision,
        finished_at  double precision
    )
    """,
    """
    CREATE INDEX jobs_ready ON jobs (priority DESC, seq)
    WHERE state IN ('pending', 'failed') AND deps_left = 0 AND is_due = 1
    """,
    """
    CREATE INDEX jobs_by_run_at ON jobs (is_due, run_at)
    WHERE state IN ('pending', 'failed') AND deps_left = 0
    """,
    "CREATE INDEX jobs_by_state ON jobs (state, seq)",
    "CREATE INDEX jobs_by_queue ON jobs (queue, seq)",
    "CREATE INDEX jobs_leased ON jobs (lease_until) WHERE state = 'processing'",
    """
    CREATE TABLE deps (
        depends_on  text NOT NULL,
        job_id      text NOT NULL,
        PRIMARY KEY (depends_on, job_id)
    )
    """,
    "CREATE INDEX deps_by_job ON deps (job_id)",
    "CREATE TABLE config (key text PRIMARY KEY, value text NOT NULL)",
    """
    CREATE TABLE workers (
        id              text PRIMARY KEY,
        kind            text NOT NULL,
        supervisor_id   text,
        host            text NOT NULL,
        pid             integer NOT NULL,
        queues          text NOT NULL,
        started_at      double precision NOT NULL,
        heartbeat_at    double precision NOT NULL,
        wake_addr       text,
        stop_requested  integer NOT NULL DEFAULT 0
    )
    """,
    "CREATE TABLE meta (version integer NOT NULL)",
]


# Version 4: runs and queues, as SCHEMA_V4.
PG_SCHEMA_V4 = [
    "ALTER TABLE jobs ADD COLUMN last_run integer NOT NULL DEFAULT 0",
    """
    CREATE TABLE runs (
        job_seq       bigint NOT NULL,
        run           integer NOT NULL,
        attempt       integer NOT NULL,
        worker_id     text,
        host          text,
        started_at    double precision NOT NULL,
        finished_at   double precision,
        exit_code     integer,
        error         text,
        outcome       text NOT NULL,
        stdout        bytea NOT NULL DEFAULT '',
        stdout_bytes  bigint NOT NULL DEFAULT 0,
        stderr        bytea NOT NULL DEFAULT '',
        stderr_bytes  bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (job_seq, run)
    )
    """,
    """
    CREATE TABLE queues (
        queue        text PRIMARY KEY,
        paused       integer NOT NULL DEFAULT 0,
        max_running  integer NOT NULL DEFAULT 0
    )
    """,
    "CREATE INDEX jobs_running ON jobs (queue, lease_until) WHERE lease_token IS NOT NULL",
    # A run going while the database is upgraded (its job holds a lease token) gets its row.
    """
    INSERT INTO runs (job_seq, run, attempt, worker_id, started_at, outcome)
    SELECT seq, 1, attempts, worker_id, coalesce(started_at, updated_at), 'running'
    FROM jobs WHERE lease_token IS NOT NULL
    """,
    "UPDATE jobs SET last_run = 1 WHERE lease_token IS NOT NULL",
]

# Version 5: schedules, as SCHEMA_V5.
PG_SCHEMA_V5 = [
    """
    CREATE TABLE schedules (
        name           text PRIMARY KEY,
        cron           text NOT NULL,
        tz             text NOT NULL,
        job            text NOT NULL,
        paused         integer NOT NULL DEFAULT 0,
        catch_up       text NOT NULL,
        no_overlap     integer NOT NULL,
        created_at     double precision NOT NULL,
        anchor         double precision NOT NULL,
        handled_until  double precision NOT NULL,
        last_tick_at   double precision,
        last_job_id    text
    )
    """,
]

# Version 7: `status`, `queue list` and the dashboard read counts instead of
# counting every job (100,000 jobs took 75 ms). One row per (queue, state)
# changed by every worker of every host would be the hottest row in the
# database, so changes are appended instead, never updated: two rows in
# job_count_changes per state change (the old state's -1, the new one's +1)
# and one per queue and state of a DELETE statement (triggers), and of a
# batch of new jobs (add_to_counts: a trigger would fire for each row of an
# executemany). fold_counts() moves them into
# job_counts now and then. job_counts plus its changes is the count, in any
# snapshot.
PG_SCHEMA_V7 = [
    "LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE",  # no job changes state between the count and the triggers
    "CREATE TABLE job_counts (queue text NOT NULL, state text NOT NULL, n bigint NOT NULL, PRIMARY KEY (queue, state))",
    "CREATE TABLE job_count_changes (queue text NOT NULL, state text NOT NULL, n bigint NOT NULL)",
    "INSERT INTO job_counts (queue, state, n) SELECT queue, state, count(*) FROM jobs GROUP BY queue, state",
    """
    CREATE FUNCTION count_state_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO job_count_changes (queue, state, n) VALUES (OLD.queue, OLD.state, -1), (NEW.queue, NEW.state, 1);
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER job_counts_on_update AFTER UPDATE OF state ON jobs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION count_state_change()
    """,
    """
    CREATE FUNCTION count_deleted_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO job_count_changes (queue, state, n) SELECT queue, state, -count(*) FROM old_jobs GROUP BY queue, state;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER job_counts_on_delete AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS old_jobs FOR EACH STATEMENT EXECUTE FUNCTION count_deleted_jobs()
    """,
]

# PostgreSQL came with version 3: its first step is the whole schema.
PG_MIGRATIONS = {3: PG_SCHEMA_V3, 4: PG_SCHEMA_V4, 5: PG_SCHEMA_V5, 6: schema_v6("text"), 7: PG_SCHEMA_V7,
                 8: SCHEMA_V8, 9: schema_v9("bigserial PRIMARY KEY", "double precision")}
CLOCK_ANCHOR_S = 600.0  # how long a PostgreSQL connection trusts its reading of the server's clock


class PgRow:
    """A result row readable by column name or by position, like sqlite3.Row."""

    __slots__ = ("_index", "_values")

    def __init__(self, index, values):
        self._index, self._values = index, values

    def __getitem__(self, key):
        return self._values[self._index[key]] if isinstance(key, str) else self._values[key]

    def keys(self):
        return list(self._index)

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)


def pg_row_factory(cursor):
    """psycopg row factory for PgRow."""
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: PgRow(index, values)


@functools.lru_cache(maxsize=256)
def pg_sql(sql):
    """The common subset's SQL in psycopg's spelling: %(name)s and %s, a literal % doubled."""
    return PG_PARAM_RE.sub(lambda m: f"%({m.group(1)})s" if m.group(1) else "%s", sql.replace("%", "%%"))


def pg_schema_name():
    """The schema that holds the queue's tables: $QUEUECTL_PG_SCHEMA, else queuectl."""
    name = os.environ.get("QUEUECTL_PG_SCHEMA") or "queuectl"
    if not PG_SCHEMA_NAME_RE.fullmatch(name) or name.lower().startswith("pg_"):
        raise UsageError(f"QUEUECTL_PG_SCHEMA must be 1-63 letters, digits or _ starting with a letter "
                         f"or _ (not pg_), got '{name}'")
    return name


def url_parts(url):
    """The URL as libpq reads it ({user, password, host, port, dbname, ...}), or None if it cannot."""
    try:
        from psycopg import Error as DriverError
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        return None
    try:
        return conninfo_to_dict(url)
    except DriverError:  # a URL libpq cannot read: nothing of it is shown
        return None


def redacted_url(url):
    """A PostgreSQL URL without its password or parameters, as libpq reads it: fit to print."""
    parts = url_parts(url)
    if parts is None:
        return "postgresql://(a URL that cannot be read)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


class PostgresEngine(Engine):
    """The queue in a PostgreSQL database: any number of processes on any number of hosts.

    The connection is in autocommit mode; transaction() is BEGIN ... COMMIT at
    READ COMMITTED. The claim takes its job with FOR UPDATE SKIP LOCKED, so
    claimers never wait for each other; a command that reads a job to change
    it locks that row (FOR UPDATE), which SQLite's single write lock did for
    them, and holds the dependencies
    it counts (hold_dependency). Leases are measured on the server's clock, so hosts whose clocks differ still agree on them. Idle
    workers LISTEN on a channel that enqueue NOTIFYs.
    """

    MIGRATIONS = PG_MIGRATIONS
    LOCK_FOR_UPDATE = "FOR UPDATE"
    SKIP_LOCKED = "FOR UPDATE SKIP LOCKED"
    CALLS_CAN_HANG = True
    MINUTE_OF_FINISH = "floor(finished_at / 60)"  # a cast would round to the nearest
    ONE_STATEMENT_WRITES = True

    # The claim's statements (see claim_statements): claimers skip the rows others hold.
    BECOME_DUE_SQL, PROMOTE_DUE_SQL, CLAIM_SELECT_SQL, OLDEST_RUN_AT_SQL = claim_statements(
        ready="", by_run_at="", skip_locked="FOR UPDATE SKIP LOCKED")

    def __init__(self, url, durable=True):
        try:
            import psycopg
        except ImportError:
            raise QueueError('a postgresql database needs the psycopg package: '
                             'python3 -m pip install "psycopg[binary]"') from None
        self.psycopg = psycopg
        if url.split("/", 3)[2].count("@") > 1:  # libpq would read the rest of the password as the host
            raise UsageError("the PostgreSQL URL has more than one '@' before the host; write an '@' in the "
                             "user name or password as %40")
        self.url, self.schema = url, pg_schema_name()
        self.path = redacted_url(url)
        self.location = f"{self.path} (schema {self.schema})"
        self.wake_channel = f"{self.schema}_wake"
        self.conn = None
        self.durable, self.lock_wait_s = durable, busy_timeout_s()
        self.open()
        try:
            check_schema(self)
            migrate(self)
        except BaseException:
            self.close()
            raise

    def open(self):
        """Connect, put our schema first on the search path, and learn the server's clock."""
        try:
            # Keepalives and a TCP user timeout: a silent network ends a call
            # in seconds instead of hanging it (the fence watchdog covers the rest).
            self.conn = self.psycopg.connect(
                self.url, autocommit=True, row_factory=pg_row_factory, connect_timeout=10,
                application_name=f"queuectl {self.schema}", client_encoding="utf8", keepalives=1,
                keepalives_idle=5, keepalives_interval=2, keepalives_count=3, tcp_user_timeout=10000)
        except self.psycopg.Error as e:
            raise StorageError(f"cannot connect to {self.path}: {self.one_line(e)}", "lost") from e
        self.execute(f'SET search_path TO "{self.schema}"')
        self.execute(f"SET synchronous_commit = {'on' if self.durable else 'local'}")
        self.set_lock_wait(self.lock_wait_s)
        self.learn_the_clock()

    def learn_the_clock(self):
        """Anchor now() on the server's clock and our monotonic one: local wall-clock steps never count."""
        asked_at = time.monotonic()
        server_s = float(self.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()[0])
        self.clock_anchor = (server_s, (asked_at + time.monotonic()) / 2)

    # -- statements and transactions ---------------------------------------

    def execute(self, sql, params=()):
        """Run one statement; its Result (rows are PgRow: by name or position)."""
        try:
            cursor = self.conn.execute(pg_sql(sql), params) if params else self.conn.execute(sql)
            return Result(cursor.fetchall() if cursor.description else [], cursor.rowcount)
        except self.psycopg.Error as e:
            raise self.error(e) from e

    def executemany(self, sql, rows):
        """Run one statement for each of rows."""
        rows = list(rows)
        if not rows:
            return Result([], 0)
        try:
            with self.conn.cursor() as cursor:
                cursor.executemany(pg_sql(sql), rows)
                return Result([], cursor.rowcount)
        except self.psycopg.Error as e:
            raise self.error(e) from e

    @contextmanager
    def transaction(self):
        """BEGIN ... COMMIT, rolled back on any error: one change, all or nothing."""
        try:
            with self.conn.transaction():
                yield self
        except self.psycopg.Error as e:  # raised by the COMMIT itself
            raise self.error(e) from e

    def lock_schema(self):
        """Serialize migrations across hosts, and create the schema if it is new."""
        self.execute("SELECT pg_advisory_xact_lock(hashtext(:name))", {"name": f"queuectl:{self.schema}"})
        if not self.execute("SELECT 1 FROM pg_namespace WHERE nspname = :schema", {"schema": self.schema}).rows:
            self.execute(f'CREATE SCHEMA "{self.schema}"')  # needs CREATE on the database: only when missing

    def hold_dependency(self, job_id):
        """A shared advisory lock on job_id as a dependency, to our commit.

        Advisory, not FOR SHARE on the row: the dependency's worker keeps
        renewing its lease while a long enqueue of its dependents runs.
        """
        self.execute("SELECT pg_advisory_xact_lock_shared(hashtext(:key))", {"key": f"{self.schema}:{job_id}"})

    def hold_dependents(self, job_id):
        """The exclusive side of hold_dependency, taken before job_id settles its dependents."""
        self.execute("SELECT pg_advisory_xact_lock(hashtext(:key))", {"key": f"{self.schema}:{job_id}"})

    def set_lock_wait(self, seconds):
        """How long a statement may wait for a row another transaction holds (lock_timeout)."""
        self.lock_wait_s = seconds  # kept: a reconnect sets it again
        self.execute(f"SET lock_timeout = {max(int(seconds * 1000), 1)}")  # 0 would mean forever

    def now(self):
        """Epoch seconds on the server's clock: every host measures leases alike."""
        server_s, at = self.clock_anchor
        if time.monotonic() - at > CLOCK_ANCHOR_S:
            self.learn_the_clock()
            server_s, at = self.clock_anchor
        return server_s + (time.monotonic() - at)

    def reconnect(self):
        """Open a new connection after the old one was lost."""
        self.close()
        self.open()
        if self.listening:
            self.listen(None)

    def close(self):
        """Close the connection."""
        if self.conn is not None:
            self.conn.close()

    # -- schema --------------------------------------------------------------

    def schema_version(self):
        """The schema version written by the last migration (0: none yet)."""
        if self.execute("SELECT to_regclass(:name)", {"name": f'"{self.schema}".meta'}).fetchone()[0] is None:
            return 0
        row = self.execute("SELECT version FROM meta").fetchone()
        return row[0] if row else 0

    def set_schema_version(self, version):
        """Record the schema version (inside the migration's transaction)."""
        self.execute("DELETE FROM meta")
        self.execute("INSERT INTO meta (version) VALUES (:version)", {"version": version})

    def foreign_tables(self):
        """Tables in our schema, before it is at any version, that are not queuectl's."""
        tables = {r[0] for r in self.execute("SELECT tablename FROM pg_tables WHERE schemaname = :schema",
                                             {"schema": self.schema})}
        return sorted(tables) if tables - OUR_TABLES - {"meta"} else []

    def foreign_tables_message(self, tables):
        """Why a schema with other tables is refused."""
        return (f"schema '{self.schema}' of {self.path} holds other tables ({', '.join(tables)}); "
                "name another one with $QUEUECTL_PG_SCHEMA")

    # -- the counts ----------------------------------------------------------------

    def count_jobs(self):
        """{(queue, state): count}: job_counts and the changes not folded into it yet, in one snapshot."""
        return {(row[0], row[1]): int(row[2]) for row in self.execute("""
            SELECT queue, state, sum(n)
            FROM (SELECT queue, state, n FROM job_counts UNION ALL SELECT queue, state, n FROM job_count_changes) AS c
            GROUP BY queue, state
            """)}

    def add_to_counts(self, counts):
        """Count a batch of new jobs ({(queue, state): n}), appended to job_count_changes (see PG_SCHEMA_V7)."""
        self.executemany("INSERT INTO job_count_changes (queue, state, n) VALUES (?, ?, ?)",
                         [(queue, state, n) for (queue, state), n in counts.items()])

    def fold_counts(self):
        """Move the counted changes into job_counts: each change is moved once, even by two hosts at a time."""
        with self.transaction():
            self.execute("""
                WITH moved AS (DELETE FROM job_count_changes RETURNING queue, state, n)
                INSERT INTO job_counts (queue, state, n)
                SELECT queue, state, sum(n) FROM moved GROUP BY queue, state
                ON CONFLICT (queue, state) DO UPDATE SET n = job_counts.n + excluded.n
                """)

    def has_work(self, queues, paused=()):
        """Whether a job of queues (all when empty) is processing, or pending or failed and not paused."""
        queue_filter = f"AND queue IN ({', '.join('?' for _ in queues)})" if queues else ""
        for state in ("processing", "pending", "failed"):  # one walk of jobs_by_state each, never the table
            skip = paused if state != "processing" else ()
            skip_filter = f"AND queue NOT IN ({', '.join('?' for _ in skip)})" if skip else ""
            if self.execute(f"SELECT 1 FROM jobs WHERE state = ? {queue_filter} {skip_filter} "
                            "ORDER BY state, seq LIMIT 1", [state, *queues, *skip]).rows:
                return True
        return False

    # -- waking idle workers: LISTEN / NOTIFY, on every host -------------------------

    listening = False

    def listen(self, worker_id):
        """LISTEN for nudges on this connection (no registry address: NOTIFY reaches every host)."""
        self.execute(f'LISTEN "{self.wake_channel}"')
        self.conn.add_notify_handler(lambda notify: None)  # else psycopg keeps every one it reads
        self.listening = True

    def wake_source(self):
        """The connection's socket, readable when a notification arrives (it changes on reconnect)."""
        return self.conn.fileno() if self.listening and self.conn is not None and not self.conn.closed else None

    def drain_wakeups(self, source):
        """Read and forget the notifications that arrived; False if source is a lost connection's."""
        if source != self.wake_source():
            return False
        try:
            self.conn.pgconn.consume_input()
            while self.conn.pgconn.notifies() is not None:
                pass
        except self.psycopg.Error:
            pass  # a lost connection shows itself at the next statement

    def wake_workers(self):
        """NOTIFY every listening worker, on every host; best effort, as they poll anyway."""
        try:
            self.execute(f'NOTIFY "{self.wake_channel}"')
        except StorageError:
            pass  # what was committed stays committed; the workers find it at their next poll

    # -- errors ----------------------------------------------------------------

    def one_line(self, error):
        """A driver error's text on one line, the password never in it."""
        text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        text = text.replace(self.url, self.path)  # libpq may echo a URL it cannot read
        password = (url_parts(self.url) or {}).get("password")
        if password:
            text = text.replace(f":{password}@", ":***@")
            if len(password) >= 8:  # a short one would blot out ordinary words
                text = text.replace(password, "***")
        return text

    def error(self, error):
        """A psycopg error as a StorageError: one line that names the database."""
        state, text = getattr(error, "sqlstate", None) or "", self.one_line(error)
        if self.conn is None or self.conn.closed or self.conn.broken:
            return StorageError(f"lost the connection to {self.path}: {text}", "lost")
        if state in ("55P03", "40P01", "40001"):  # lock_not_available, deadlock, serialization
            return StorageError(f"database {self.path} is busy: another transaction held a lock for more "
                                f"than {seconds_text(busy_timeout_s())} ({text})", "busy")
        if state == "23505":
            return StorageError(f"database {self.path}: {text}", "duplicate")
        if state in ("25006", "42501"):  # read-only transaction, insufficient privilege
            return StorageError(f"database {self.path} is read-only ({text})", "readonly")
        return StorageError(f"database {self.path}: {text}")


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

def load_config(conn):
    """Every config key with its value: the stored one, else the default."""
    config = {key: rule.default for key, rule in CONFIG_RULES.items()}
    for row in conn.execute("SELECT key, value FROM config"):
        if row["key"] in config:
            config[row["key"]] = json.loads(row["value"])
    return config


def check_config_key(key):
    """Refuse an unknown config key, listing the known ones."""
    if key not in CONFIG_RULES:
        raise UsageError(f"unknown config key '{key}' (known: {', '.join(CONFIG_RULES)})")


def parse_config_value(key, text):
    """The value for key parsed from text and checked against its rule."""
    check_config_key(key)
    rule = CONFIG_RULES[key]
    if rule.kind == DURATION:
        if not DURATION_RE.fullmatch(text):
            raise UsageError(f"config {key} must be a duration like 90s, 15m, 12h or 7d, or 0 to keep them "
                             f"forever, got '{text}'")
        if 0 < parse_duration(text) < MIN_KEEP_S:  # a job's on_dead hook must still find it
            raise UsageError(f"config {key} must be 0 (forever) or at least 1m, got '{text.strip()}'")
        return text.strip()
    if rule.kind == COMMAND:
        return check_hook_command(key, text)
    try:
        value = int(text) if rule.kind is int else float(text)
    except ValueError:
        kind_name = "a whole number" if rule.kind is int else "a number"
        raise UsageError(f"config {key} must be {kind_name}, got '{text}'") from None
    return plain_number(check_number(f"config {key}", value, rule.kind, rule.low,
                                     low_excluded=rule.low_excluded, high=rule.high))


def check_hook_command(key, text):
    """A hook's shell command, or '' for none: text that /bin/sh -c can take."""
    if "\0" in text:
        raise UsageError(f"config {key} must not contain a NUL byte")
    if len(check_text(f"config {key}", text).encode("utf-8")) > MAX_COMMAND_BYTES:
        raise UsageError(f"config {key} is longer than {MAX_COMMAND_BYTES} bytes; put a long hook in a script")
    return text if text.strip() else ""


def kept_s(config, key):
    """Seconds a keep_* setting keeps finished jobs; math.inf for 0 (forever)."""
    return parse_duration(config[key]) or math.inf


def set_config(conn, key, value):
    """Store one config value (already checked)."""
    with conn.transaction():
        conn.execute("""
            INSERT INTO config (key, value) VALUES (:key, :value)
            ON CONFLICT (key) DO UPDATE SET value = excluded.value
            """, {"key": key, "value": json.dumps(value)})


# ---------------------------------------------------------------------------
# Queue operations: enqueue
# ---------------------------------------------------------------------------

INSERT_JOB_SQL = """
INSERT INTO jobs (id, command, queue, priority, max_retries, timeout_s, delay_s, env, cwd,
                  depends_on, deps_left, has_dependents, state, run_at, is_due, last_error,
                  created_at, updated_at, finished_at)
VALUES (:id, :command, :queue, :priority, :max_retries, :timeout_s, :delay_s, :env, :cwd,
        :depends_on, :deps_left, :has_dependents, :state, :run_at, :is_due, :last_error,
        :created_at, :updated_at, :finished_at)
"""


def check_text(field, value):
    """A string that is valid Unicode (JSON can carry lone surrogates, SQLite cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{field} is not valid Unicode text (lone surrogate)") from None
    return value


def check_command(value):
    """A command: non-empty text that exec can pass to /bin/sh."""
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"command must be a non-empty string, got {json.dumps(value)}")
    if "\0" in value:
        raise UsageError("command must not contain a NUL byte")
    size = len(check_text("command", value).encode("utf-8"))
    if size > MAX_COMMAND_BYTES:
        raise UsageError(f"command is {size} bytes; the limit is {MAX_COMMAND_BYTES} "
                         "(one exec argument); put a long script in a file and run that")
    return value


def check_env(value):
    """env: an object of string to string, each usable in an environment."""
    if not isinstance(value, dict):
        raise UsageError(f"env must be an object of string values, got {json.dumps(value)}")
    for name, text in value.items():
        if not name or "=" in name or "\0" in name:
            raise UsageError(f"env has a bad variable name {json.dumps(name)}")
        check_text("env", name)
        if not isinstance(text, str):
            raise UsageError(f"env {json.dumps(name)} must be a string, got {one_line(json.dumps(text), 40)}")
        if "\0" in text:
            raise UsageError(f"env {json.dumps(name)} must not contain a NUL byte")
        check_text(f"env {name}", text)
    return value


def check_depends_on(value):
    """depends_on: a list of job ids, duplicates dropped."""
    if not isinstance(value, list):
        raise UsageError(f"depends_on must be a list of job ids, got {json.dumps(value)}")
    return list(dict.fromkeys(check_id("depends_on", dep) for dep in value))


def job_row(spec, config, now):
    """A job object (contract section 2) checked and turned into a row to insert."""
    if not isinstance(spec, dict):
        raise UsageError(f"a job must be a JSON object, got {type(spec).__name__} {one_line(json.dumps(spec), 40)}")
    unknown = [field for field in spec if field not in JOB_FIELDS]
    if unknown:
        raise UsageError(f"unknown field '{unknown[0]}' (known: {', '.join(JOB_FIELDS)})")
    if "command" not in spec:
        raise UsageError("command is required")
    if "run_at" in spec and "delay" in spec:
        raise UsageError("give run_at or delay, not both")
    cwd = spec.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not cwd or "\0" in cwd):
        raise UsageError(f"cwd must be a directory path, got {json.dumps(cwd)}")
    if cwd is not None:
        check_text("cwd", cwd)
    delay_s = check_number("delay", spec["delay"], float, 0) if "delay" in spec else 0.0
    run_at = parse_time("run_at", spec["run_at"]) if "run_at" in spec else now + delay_s
    if run_at > LATEST_TIME:
        raise UsageError(f"delay must be small enough to end before the year 10000, got {one_line(json.dumps(spec['delay']), 40)}")
    job_id = check_id("id", spec["id"]) if "id" in spec else new_job_id()
    queue = spec.get("queue", "default")
    if not isinstance(queue, str) or not QUEUE_RE.fullmatch(queue):
        raise UsageError(f"queue must be 1-64 characters of A-Z a-z 0-9 . _ -, got {json.dumps(queue)}")
    return {
        "id": job_id,
        "command": check_command(spec["command"]),
        "queue": queue,
        # Defaults are checked already (config set checks them): only given fields are.
        "priority": check_number("priority", spec["priority"], int, -1000, high=1000) if "priority" in spec else 0,
        "max_retries": check_number("max_retries", spec["max_retries"], int, 0, high=1000)
        if "max_retries" in spec else config["max_retries"],
        "timeout_s": check_number("timeout", spec["timeout"], float, 0)
        if "timeout" in spec else float(config["job_timeout"]),
        "delay_s": delay_s,
        "env": json.dumps(check_env(spec["env"])) if "env" in spec else "{}",
        "cwd": cwd,
        "depends_on": check_depends_on(spec["depends_on"]) if "depends_on" in spec else [],
        "deps_left": 0, "has_dependents": 0, "state": "pending", "run_at": run_at, "is_due": int(run_at <= now),
        "last_error": None, "created_at": now, "updated_at": now, "finished_at": None,
    }


def link_dependencies(conn, rows, line_of):
    """Count each row's unmet dependencies; cancel a row whose dependency ended badly.

    A dependency must already exist or come earlier in the same batch, which
    also makes cycles impossible.
    """
    earlier, stored = {}, {}
    for row in rows:
        for dep in row["depends_on"]:
            if dep == row["id"]:
                raise UsageError(f"{line_of(row)}depends_on: job '{dep}' cannot depend on itself")
            if dep not in earlier and dep not in stored:  # each dependency held and read once
                stored[dep] = dependency_state(conn, dep)
            if dep in earlier:
                earlier[dep]["has_dependents"] = 1
            state = earlier[dep]["state"] if dep in earlier else stored[dep]
            if state is None:
                raise QueueError(f"{line_of(row)}depends_on: job '{dep}' not found")
            if state in ("dead", "canceled") and row["state"] != "canceled":
                row.update(state="canceled", finished_at=row["created_at"],
                           last_error=f"canceled: dependency '{dep}' is {state}")
            elif state != "completed":
                row["deps_left"] += 1
        earlier[row["id"]] = row


def job_state(conn, job_id):
    """The state of one job, or None if there is no such job."""
    row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row[0] if row else None


def dependency_state(conn, job_id):
    """The state of a job the caller's transaction counts on as a dependency.

    Held (conn.hold_dependency) before it is read, so that the job cannot end
    and settle its dependents (settle_dependents holds it too) until we commit:
    a new dependent is then either counted as waiting and released by that
    end, or sees the end already.
    """
    conn.hold_dependency(job_id)
    return job_state(conn, job_id)


def enqueue_rows(conn, rows, if_absent=False, lines=None):
    """Insert checked job rows in one transaction: all of them or none. Return the new ids.

    A duplicate id (in the batch or in the database) fails the whole batch,
    unless if_absent, which skips the jobs whose id exists.
    """
    line_of = (lambda row: f"line {lines[id(row)]}: ") if lines else (lambda row: "")
    dependencies = {dep for row in rows for dep in row["depends_on"]}
    if conn.ONE_STATEMENT_WRITES:
        mark_dependencies(conn, dependencies)  # committed before the enqueue's transaction
    try:
        with conn.transaction():
            if not conn.ONE_STATEMENT_WRITES:
                mark_dependencies(conn, dependencies)  # only kept right: ends are recorded the long way
            rows = insert_job_rows(conn, rows, if_absent, line_of)
    except StorageError as e:
        if e.kind != "duplicate":
            raise
        # Rolled back by now, so the ids that exist are the ones that clashed.
        clash = next((row for row in rows if job_state(conn, row["id"]) is not None), None)
        if clash is None:
            raise
        raise QueueError(f"{line_of(clash)}job '{clash['id']}' already exists "
                         "(--if-absent skips existing ids)") from None
    return [row["id"] for row in rows]


def mark_dependencies(conn, job_ids):
    """Set has_dependents on the jobs that new jobs will depend on.

    Where a job's end can be recorded in one statement (ONE_STATEMENT_WRITES),
    each is committed before the enqueue's transaction starts: a worker
    recording one of these jobs' end then either sees the flag and settles
    dependents the long way, or changed the job first, and the enqueue sees
    its end (see SCHEMA_V8). One statement each, so a mark holds one row lock
    for a moment: it never keeps the job's worker from renewing its lease,
    and never deadlocks with a command that locks the same jobs in another
    order. A flag set for an enqueue that then fails costs only the long way
    at that job's end.
    """
    for job_id in sorted(job_ids):
        conn.execute("UPDATE jobs SET has_dependents = 1 WHERE id = ? AND has_dependents = 0", (job_id,))


def insert_job_rows(conn, rows, if_absent=False, line_of=lambda row: ""):
    """enqueue_rows' writes, inside a transaction the caller holds; the rows inserted."""
    rows = drop_duplicates(conn, rows, if_absent, line_of)
    link_dependencies(conn, rows, line_of)
    conn.executemany(INSERT_JOB_SQL, [dict(row, depends_on=json.dumps(row["depends_on"]))
                                      if row["depends_on"] else dict(row, depends_on="[]")
                                      for row in rows])
    conn.executemany("INSERT INTO deps (depends_on, job_id) VALUES (?, ?)",
                     [(dep, row["id"]) for row in rows for dep in row["depends_on"]])
    count_new_jobs(conn, rows)  # in the same transaction: jobs and counts, or neither
    return rows


def count_new_jobs(conn, rows):
    """Add a batch of new jobs to job_counts, inside the caller's transaction (see SCHEMA_V3).

    Every INSERT into jobs must do this: here, and the benchmark's fill_finished_jobs().
    """
    conn.add_to_counts(collections.Counter((row["queue"], row["state"]) for row in rows))


def drop_duplicates(conn, rows, if_absent, line_of):
    """Rows whose id is new; a repeated id is an error unless if_absent skips it."""
    seen = set()
    kept = []
    for row in rows:
        clash = row["id"] in seen or (if_absent and job_state(conn, row["id"]) is not None)
        if clash and not if_absent:
            raise QueueError(f"{line_of(row)}job id '{row['id']}' appears twice in the input")
        if not clash:
            kept.append(row)
        seen.add(row["id"])
    return kept


# ---------------------------------------------------------------------------
# Queue operations: claim, finish, retry rules
# ---------------------------------------------------------------------------

# Used for every end of a run. The lease token fences it: a worker that lost
# its lease (paused, resumed late) matches no row and changes nothing.
RECORD_RUN_SQL = """
UPDATE jobs
SET state = :state,
    exit_code = :exit_code,
    last_error = :last_error,
    stdout = :stdout_text,
    stdout_cut = :stdout_cut,
    stderr = :stderr_text,
    stderr_cut = :stderr_cut,
    run_at = coalesce(:retry_at, run_at),
    is_due = 0,
    finished_at = :now,
    updated_at = :now,
    worker_id = NULL,
    lease_token = NULL,
    lease_until = NULL
WHERE seq = :seq
  AND state = 'processing'
  AND lease_token = :lease_token
"""

# A run that is going lives in its job's row (last_run, attempts, worker_id,
# run_host, started_at: set by the claim), and gets a row in runs when it
# ends, in the same transaction as its job's change, or earlier when its
# worker flushes its output. So a claim writes nothing more than the job.
# Output given as NULL keeps what was flushed last (a lost worker's run).
def finish_run_sql(source=""):
    """The run's row, inserted or completed: for each row of `source` (a FROM clause), or once."""
    return f"""
    INSERT INTO runs (job_seq, run, attempt, worker_id, host, started_at, finished_at, outcome, exit_code, error,
                      stdout, stdout_bytes, stderr, stderr_bytes)
    SELECT :seq, :run, :attempt, :worker_id, :host, :started_at, :now, :outcome, :exit_code, :error,
           :stdout_or_none, :stdout_bytes_or_0, :stderr_or_none, :stderr_bytes_or_0
    {source}
    WHERE true  -- SQLite: without a WHERE, ON CONFLICT would be read as a join's ON
    ON CONFLICT (job_seq, run) DO UPDATE
    SET outcome = excluded.outcome,
        exit_code = excluded.exit_code,
        error = excluded.error,
        finished_at = excluded.finished_at,
        stdout = coalesce(:stdout, runs.stdout),
        stdout_bytes = coalesce(:stdout_bytes, runs.stdout_bytes),
        stderr = coalesce(:stderr, runs.stderr),
        stderr_bytes = coalesce(:stderr_bytes, runs.stderr_bytes)
    """


FINISH_RUN_SQL = finish_run_sql()


def hook_events_sql(source=""):
    """The hooks' events of a run's end (none, on_failure, on_dead: see record_params), for each row of source."""
    return f"""
    INSERT INTO hook_events (hook, job_id, queue, attempt, exit_code, error, worker_id, created_at)
    SELECT hook, :job_id, :queue, :attempt, :exit_code, :last_error, :worker_id, :now
    FROM (SELECT 'on_failure' AS hook WHERE :on_failure = 1
          UNION ALL
          SELECT 'on_dead' AS hook WHERE :on_dead = 1) AS hooks
    {source}
    """


HOOK_EVENTS_SQL = hook_events_sql()

# The end of a run in one statement (engines with ONE_STATEMENT_WRITES): the
# job's change, its run's row and its hooks' events, for a job with no
# dependents. The flag is read on the row being changed, its newest version:
# a dependent being added has set it first (mark_dependencies), so this
# matches nothing then, and the end is recorded the long way, holding the
# job as a dependency.
ONE_STATEMENT_RECORD_SQL = f"""
WITH recorded AS ({RECORD_RUN_SQL}  AND has_dependents = 0
                  RETURNING seq),
     kept AS ({finish_run_sql("FROM recorded")}),
     events AS ({hook_events_sql("CROSS JOIN recorded")})
SELECT count(*) FROM recorded
"""

# A running job's output so far (flush_output), fenced by the lease token like
# every write of a run: a run already finished, or no longer ours, is left alone.
FLUSH_OUTPUT_SQL = """
INSERT INTO runs (job_seq, run, attempt, worker_id, host, started_at, outcome,
                  stdout, stdout_bytes, stderr, stderr_bytes)
SELECT :seq, :run, :attempt, :worker_id, :host, :started_at, 'running',
       :stdout, :stdout_bytes, :stderr, :stderr_bytes
WHERE EXISTS (SELECT 1 FROM jobs WHERE jobs.seq = :seq AND jobs.lease_token = :lease_token)
ON CONFLICT (job_seq, run) DO UPDATE
SET stdout = excluded.stdout, stdout_bytes = excluded.stdout_bytes,
    stderr = excluded.stderr, stderr_bytes = excluded.stderr_bytes
WHERE runs.finished_at IS NULL
"""

# The row of a run still going, written before its job's row forgets it (a
# retry of a canceled job whose run is being stopped resets attempts).
OPEN_RUN_SQL = """
INSERT INTO runs (job_seq, run, attempt, worker_id, host, started_at, outcome)
VALUES (:seq, :run, :attempt, :worker_id, :host, :started_at, 'running')
ON CONFLICT (job_seq, run) DO NOTHING
"""

# A canceled job keeps its run's lease token until the run is over (see
# BECOME_DUE_SQL); its worker clears it here once the process group is gone.
RELEASE_STOPPED_RUN_SQL = """
UPDATE jobs
SET worker_id = NULL,
    lease_token = NULL,
    lease_until = NULL
WHERE seq = :seq
  AND state <> 'processing'
  AND lease_token = :lease_token
"""

RELEASE_DEPENDENTS_SQL = """
UPDATE jobs
SET deps_left = deps_left - 1,
    updated_at = :now
WHERE id IN (SELECT job_id FROM deps WHERE depends_on = :id)
  AND state || '' IN ('pending', 'failed')  -- "|| ''": find dependents by id, never scan by state
"""

CANCEL_DEPENDENTS_SQL = """
WITH RECURSIVE doomed(id) AS (
    SELECT job_id FROM deps WHERE depends_on = :id
    UNION
    SELECT deps.job_id FROM deps JOIN doomed ON deps.depends_on = doomed.id
)
UPDATE jobs
SET state = 'canceled',
    last_error = :reason,
    finished_at = :now,
    updated_at = :now
WHERE id IN (SELECT id FROM doomed)
  AND state || '' IN ('pending', 'failed')  -- as above
"""


def claim(conn, worker_id, claim_query, lease_s, now=None):
    """Take the best due job: highest priority, then oldest. Return it, or None.

    First the jobs that became due are marked so (promote_due_jobs). Then one
    transaction selects the best due job through the jobs_ready index and
    marks it processing, guarded by its state, and starts its run. The job
    gets a new lease token; only that token can record its result. A job of
    a limited queue is taken in a transaction of its own, under the queue's
    lock (best_job_of_limited_queue); a queue found full is passed over for
    the next best job, never waited on.
    """
    claimed_at = time.monotonic()  # before any lock wait: the lease runs from here at the latest
    now = conn.now() if now is None else now
    if claim_query.one_statement is not None:
        job = claim_in_one_statement(conn, worker_id, claim_query, lease_s, now, claimed_at)
        if job is not TAKE_THE_LONG_WAY:
            return job
    promote_due_jobs(conn, now)
    while True:
        with conn.transaction():
            job = conn.execute(claim_query.sql, {**claim_query.params, "now": now}).fetchone()
            if job is None:
                return None
            if not job["queue_limit"]:
                return take_job(conn, job, worker_id, lease_s, now, claimed_at)
        # Its queue has a limit. This transaction is over, and the job let
        # go: the queue's lock decides who takes its next job.
        queue = job["queue"]
        with conn.transaction():
            job = best_job_of_limited_queue(conn, claim_query, queue, now)
            if job is not None:
                return take_job(conn, job, worker_id, lease_s, now, claimed_at)
        claim_query = conn.claim_query(claim_query.queues, claim_query.full + (queue,))  # full: the next best


TAKE_THE_LONG_WAY = object()  # what claim_in_one_statement returns for a job it chose but may not take


def claim_in_one_statement(conn, worker_id, claim_query, lease_s, now, claimed_at):
    """claim() in one statement, one round trip (see ONE_STATEMENT_CLAIM_SQL): the job, None, or TAKE_THE_LONG_WAY.

    The best job is chosen among those marked due and those whose time came
    since, so none waits to be marked first. TAKE_THE_LONG_WAY: the caller
    claims as on any engine, because the best job is of a limited queue or
    has a canceled run to end, because many jobs came due at once, or because
    none was chosen while some came due (another claimer held them for a
    moment: marking them due and looking again is worth it).
    """
    token = os.urandom(8).hex()
    row = conn.execute(claim_query.one_statement, {
        **claim_query.params, "now": now, "batch": ONE_STATEMENT_BATCH, "worker_id": worker_id,
        "lease_token": token, "lease_until": now + lease_s, "host": HOST}).fetchone()
    if row["seq"] is None and not row["became_due_left"]:
        return None
    if not row["is_claimed"]:
        return TAKE_THE_LONG_WAY
    if row["became_due_left"] > (row["is_due"] == 0):  # others came due: mark them for the next claims
        with suppress(StorageError):  # a speed-up only, and the job is ours now: a failure must not lose it
            promote_due_jobs(conn, now)
    return dict(row, attempts=row["attempts"] + 1, last_run=row["last_run"] + 1, lease_token=token,
                claimed_at=claimed_at, worker_id=worker_id, run_host=HOST, started_at=now)


def take_job(conn, job, worker_id, lease_s, now, claimed_at):
    """Mark a selected job processing under a new lease token and start its run; the claimed job."""
    token = os.urandom(8).hex()
    if job["token_before"] is not None:  # a canceled run whose worker was lost: it ends here
        release_stopped_run(conn, dict(job, lease_token=job["token_before"], worker_id=None, run_host=None,
                                       started_at=job["started_at_before"]), RunResult(), now)
    conn.execute(CLAIM_UPDATE_SQL, {"seq": job["seq"], "worker_id": worker_id, "lease_token": token,
                                    "lease_until": now + lease_s, "host": HOST, "now": now})
    return dict(job, attempts=job["attempts"] + 1, last_run=job["last_run"] + 1, lease_token=token,
                claimed_at=claimed_at, worker_id=worker_id, run_host=HOST, started_at=now)


def best_job_of_limited_queue(conn, claim_query, queue, now):
    """The best due job of a limited queue if it has room, holding the queue's row to our commit.

    The claim's SELECT already passes over full queues (BLOCKED_QUEUE_SQL),
    but two claimers on PostgreSQL may both see its last free place. So the
    queue's row is locked first, then its runs going are counted again, then
    its best job is read, waiting for (not skipping) one another claimer is
    looking at: claimers of a limited queue take its jobs one after the
    other, by priority and age. (On SQLite the write lock did all of it.)
    """
    if not queue_has_room(conn, queue, now):
        return None
    only = conn.claim_query(claim_query.queues, claim_query.full, only=queue)
    return conn.execute(only.sql, {**only.params, "now": now}).fetchone()


def queue_has_room(conn, queue, now):
    """Whether a limited queue has fewer processing jobs than its limit; locks its row to our commit."""
    row = conn.execute(f"SELECT max_running FROM queues WHERE queue = ? {conn.LOCK_FOR_UPDATE}",
                       (queue,)).fetchone()
    return row is None or not row[0] or running_in(conn, queue, now) < row[0]


PROMOTE_BATCH = 1000  # jobs marked due per transaction: many due at once never hold the lock long


def promote_due_jobs(conn, now):
    """Mark due the jobs whose run_at has come, PROMOTE_BATCH to a short transaction.

    Nothing to do costs one read that takes no lock. All of them are marked
    before the claim selects, so the highest priority among due jobs wins.
    """
    if conn.execute(conn.BECOME_DUE_SQL, {"now": now, "batch": 1}).fetchone() is None:
        return
    while True:
        with conn.transaction():
            promoted = conn.execute(conn.PROMOTE_DUE_SQL, {"now": now, "batch": PROMOTE_BATCH}).rowcount
        if promoted < PROMOTE_BATCH:
            return


def backoff_s(attempts, config):
    """Seconds before the next run: min(backoff_base ** attempts, backoff_max)."""
    try:
        delay_s = float(config["backoff_base"]) ** attempts
    except OverflowError:
        delay_s = math.inf
    return min(delay_s, float(config["backoff_max"]))


def state_after_failure(attempts, max_retries, config, now):
    """(state, retry_at) after a failed run: failed with a backoff, or dead (retry_at None)."""
    if attempts <= max_retries:
        return "failed", min(now + backoff_s(attempts, config), LATEST_TIME)
    return "dead", None


def record_run(conn, job, result, config, now=None):
    """Record the end of one run of a claimed job, fenced by its lease token.

    Returns the job's new state, or None when the lease was lost (the job was
    canceled, or reclaimed after its lease ran out) and nothing was written.
    Completion releases the job's dependents; death cancels them.
    """
    now = conn.now() if now is None else now
    if conn.ONE_STATEMENT_WRITES:  # one round trip for a job with no dependents, still ours
        params = record_params(job, result, config, now)
        if conn.execute(ONE_STATEMENT_RECORD_SQL, {**params, **run_params(job, result, now)}).fetchone()[0]:
            return params["state"]
    with conn.transaction():
        state = write_run(conn, job, result, config, now)
        if state is None:
            release_stopped_run(conn, job, result, now)
        return state


def release_stopped_run(conn, job, result, now):
    """Our run of a job canceled meanwhile is over: clear its lease token, keep its end and output.

    Nothing happens when the token is not ours any more: the run was lost
    (reaped, its lease run out) and recorded so by whoever took it over.
    """
    if conn.execute(RELEASE_STOPPED_RUN_SQL, {"seq": job["seq"], "lease_token": job["lease_token"]}).rowcount:
        conn.execute(FINISH_RUN_SQL, run_params(job, result, now, outcome="canceled", error="canceled by the user"))


def run_identity(job):
    """Which run of which job is going, from the job's row (or a claimed job): the key and start of its row."""
    return {"seq": job["seq"], "run": job["last_run"], "attempt": job["attempts"], "worker_id": job["worker_id"],
            "host": job["run_host"], "started_at": job["started_at"]}


def run_params(job, result, now, outcome=None, error=None):
    """FINISH_RUN_SQL's parameters for job's current run, ended with result."""
    params = dict(run_identity(job), outcome=outcome or result.outcome, exit_code=result.exit_code,
                  error=error or result.error, now=now)
    for stream in ("stdout", "stderr"):
        tail = getattr(result, stream + "_tail")
        params[stream] = bytes(tail.data) if tail is not None else None
        params[stream + "_bytes"] = tail.total if tail is not None else None
        params[stream + "_or_none"] = params[stream] if tail is not None else b""
        params[stream + "_bytes_or_0"] = params[stream + "_bytes"] or 0
    return params


def record_params(job, result, config, now):
    """RECORD_RUN_SQL's parameters: the job's state after this run, and the run's end."""
    if result.is_success:
        state, retry_at = "completed", None
    else:
        state, retry_at = state_after_failure(job["attempts"], job["max_retries"], config, now)
    return {"seq": job["seq"], "lease_token": job["lease_token"], "state": state,
            "exit_code": result.exit_code, "last_error": result.error,
            "stdout_text": result.stdout, "stdout_cut": result.stdout_cut,
            "stderr_text": result.stderr, "stderr_cut": result.stderr_cut,
            "retry_at": retry_at, "now": now,
            # HOOK_EVENTS_SQL's: an event only for a hook set now (the worker's config, at most a poll old)
            "job_id": job["id"], "queue": job["queue"], "attempt": job["attempts"], "worker_id": job["worker_id"],
            "on_failure": int(state != "completed" and bool(config.get("on_failure"))),
            "on_dead": int(state == "dead" and bool(config.get("on_dead")))}


def write_run(conn, job, result, config, now):
    """record_run's writes, inside a transaction the caller holds."""
    params = record_params(job, result, config, now)
    if not conn.execute(RECORD_RUN_SQL, params).rowcount:
        return None
    conn.execute(FINISH_RUN_SQL, run_params(job, result, now))
    if params["on_failure"] or params["on_dead"]:
        conn.execute(HOOK_EVENTS_SQL, params)
    settle_dependents(conn, job["id"], params["state"], now)
    return params["state"]


def settle_dependents(conn, job_id, state, now):
    """After job_id reached state: release its dependents, or cancel them all the way down."""
    conn.hold_dependents(job_id)  # waits for transactions adding dependents of it (dependency_state)
    if state == "completed":
        conn.execute(RELEASE_DEPENDENTS_SQL, {"id": job_id, "now": now})
    elif state in ("dead", "canceled"):
        conn.execute(CANCEL_DEPENDENTS_SQL,
                     {"id": job_id, "now": now, "reason": f"canceled: dependency '{job_id}' is {state}"})


class RunResult:
    """How one run ended: exit code (None if it never exited), error line, output tails.

    stdout and stderr are the kept tails as text (the job's fields);
    stdout_tail and stderr_tail the OutputTails themselves (the run's bytes),
    None when the output is not known (a lost worker's run).
    """

    def __init__(self, exit_code=None, error=None, stdout="", stderr="", stdout_cut=0, stderr_cut=0,
                 stop_reason=None, duration_s=0.0, lost=False, stdout_tail=None, stderr_tail=None):
        self.exit_code = exit_code
        self.error = error
        self.stdout, self.stderr = stdout, stderr
        self.stdout_cut, self.stderr_cut = stdout_cut, stderr_cut
        self.stdout_tail, self.stderr_tail = stdout_tail, stderr_tail
        self.stop_reason = stop_reason
        self.duration_s = duration_s
        self.lost = lost

    @property
    def is_success(self):
        """Exit status 0 and not stopped by queuectl."""
        return self.exit_code == 0 and self.error is None

    @property
    def outcome(self):
        """The run's outcome (RUN_OUTCOMES) as `show` tells it."""
        if self.is_success:
            return "completed"
        if self.lost or self.stop_reason in LEASE_LOST_REASONS:
            return "lost"
        if self.stop_reason is not None and self.stop_reason.startswith("timed out"):
            return "timed_out"
        return "failed"


def fail_lost_jobs(conn, where_sql, params, reason, now=None):
    """Return processing jobs whose worker is gone to the retry rules, the lost run counted.

    where_sql selects the jobs (expired leases, or one dead worker's). Returns
    [(id, new_state)].
    """
    now = conn.now() if now is None else now
    config = load_config(conn)
    settled = []
    with conn.transaction():
        for job in conn.execute(f"SELECT * FROM jobs WHERE state = 'processing' AND {where_sql}",
                                params).fetchall():
            state = write_run(conn, dict(job), RunResult(error=reason, lost=True), config, now)
            if state is not None:  # None: its worker recorded it meanwhile
                settled.append((job["id"], state))
    return settled


def reap_expired_leases(conn, now=None):
    """Fail every processing job whose lease ran out: its worker stopped renewing it.

    Cheap when there is nothing to do (one read of a small index), so any
    command may call it; this is how a job comes back even with no worker alive.
    """
    now = conn.now() if now is None else now
    release_abandoned_runs(conn, now)
    if conn.execute("SELECT 1 FROM jobs WHERE state = 'processing' AND lease_until < ? LIMIT 1",
                    (now,)).fetchone() is None:
        return []
    return fail_lost_jobs(conn, "lease_until < :now", {"now": now},
                          "worker lost: its lease ran out with no heartbeat", now)


ABANDONED_RUNS_SQL = """
SELECT seq, last_run, lease_token, attempts, worker_id, run_host, started_at
FROM jobs
WHERE lease_token IS NOT NULL
  AND state <> 'processing'
  AND lease_until < :now
"""


def release_abandoned_runs(conn, now):
    """End the runs of canceled jobs whose worker was lost while stopping them (their lease ran out).

    The run ends canceled, with the output last flushed; the job's lease token
    goes, so a retry of it may start. One read of jobs_running when there are none.
    """
    for job in conn.execute(ABANDONED_RUNS_SQL, {"now": now}).fetchall():
        with conn.transaction():
            release_stopped_run(conn, job, RunResult(), now)


def return_job_uncounted(conn, job, result=None, reason=FORCED_SHUTDOWN + "; this run was not counted",
                         now=None):
    """Put an interrupted job back to pending without counting the run (forced shutdown).

    The run is kept, as interrupted, with its output (result; None: what was
    flushed last).
    """
    now = conn.now() if now is None else now
    result = result or RunResult(error=reason)
    with conn.transaction():
        returned = conn.execute("""
            UPDATE jobs
            SET state = 'pending', attempts = attempts - 1, last_error = :reason,
                worker_id = NULL, lease_token = NULL, lease_until = NULL, updated_at = :now
            WHERE seq = :seq
              AND state = 'processing'
              AND lease_token = :lease_token
            """, {"seq": job["seq"], "lease_token": job["lease_token"], "reason": reason,
                  "now": now}).rowcount == 1
        if returned:
            conn.execute(FINISH_RUN_SQL, run_params(job, result, now, outcome="interrupted", error=reason))
        else:  # canceled meanwhile: its run is over now
            release_stopped_run(conn, job, result, now)
        return returned


GIVE_BACK_SQL = """
UPDATE jobs
SET state = :state_before,
    attempts = attempts - 1,
    last_run = last_run - 1,
    last_error = :last_error_before,
    started_at = :started_at_before,
    updated_at = :updated_at_before,
    worker_id = NULL,
    lease_token = NULL,
    lease_until = NULL
WHERE seq = :seq
  AND state = 'processing'
  AND lease_token = :lease_token
"""


def give_back(conn, job):
    """Undo a claim whose job never started: the job is exactly as it was before, its run unmade."""
    with conn.transaction():
        if not conn.execute(GIVE_BACK_SQL, {key: job[key] for key in (
                "seq", "lease_token", "state_before", "last_error_before", "started_at_before",
                "updated_at_before")}).rowcount:  # canceled meanwhile: its run ends canceled, never started
            release_stopped_run(conn, job, RunResult(), conn.now())


def flush_output(conn, job, stdout, stderr):
    """Keep a running job's output tails (OutputTail) in its run, where followers read them."""
    conn.execute(FLUSH_OUTPUT_SQL, {**run_identity(job), "lease_token": job["lease_token"],
                                    "stdout": bytes(stdout.data), "stdout_bytes": stdout.total,
                                    "stderr": bytes(stderr.data), "stderr_bytes": stderr.total})


def renew_lease(conn, job, lease_s, now=None):
    """Extend our run's lease; False once another run holds the job (or it is gone).

    Fenced by the lease token alone: a job canceled (and maybe retried) while
    our run is being stopped keeps our token, and so its lease, until the run
    is gone (RELEASE_STOPPED_RUN_SQL): no other run can start before that.
    """
    now = conn.now() if now is None else now
    return conn.execute("""
        UPDATE jobs
        SET lease_until = :lease_until
        WHERE seq = :seq
          AND lease_token = :lease_token
        """, {"seq": job["seq"], "lease_token": job["lease_token"],
              "lease_until": now + lease_s}).rowcount == 1


def run_standing(conn, job):
    """Where our run of a claimed job stands.

    'ours': the job is processing under our lease token. 'stopping': it was
    canceled meanwhile (the token is still ours). 'lost': another run holds
    the job, or it was purged.
    """
    row = conn.execute("SELECT state, lease_token FROM jobs WHERE seq = ?", (job["seq"],)).fetchone()
    if row is None or row["lease_token"] != job["lease_token"]:
        return "lost"
    return "ours" if row["state"] == "processing" else "stopping"


# ---------------------------------------------------------------------------
# Queue operations: cancel, retry, purge, reading
# ---------------------------------------------------------------------------

def fetch_jobs(conn, ids, lock=""):
    """The rows of the named jobs, in the order named; an unknown id is an error.

    lock is conn.LOCK_FOR_UPDATE when the caller's transaction changes them.
    """
    jobs = []
    for job_id in dict.fromkeys(ids):
        row = conn.execute(f"SELECT * FROM jobs WHERE id = ? {lock}", (job_id,)).fetchone() if JOB_ID_RE.fullmatch(
            job_id) else None  # an id that breaks the rules cannot exist (and may not even encode)
        if row is None:
            raise NotFound(f"job '{job_id}' not found")
        jobs.append(row)
    return jobs


def cancel_jobs(conn, ids, now=None):
    """Cancel pending, failed or processing jobs (and their dependents). All or none.

    A processing job is marked canceled here; its worker sees that within
    poll_interval and ends the job's process group (SIGTERM, then SIGKILL).
    Retried meanwhile, it starts again only once that run is gone.
    Returns the canceled rows as they were before.
    """
    now = conn.now() if now is None else now
    with conn.transaction():
        jobs = fetch_jobs(conn, ids, conn.LOCK_FOR_UPDATE)
        for job in jobs:
            if job["state"] not in CANCELABLE_STATES:
                raise WrongState(f"job '{job['id']}' is {job['state']}; only pending, failed or "
                                 "processing jobs can be canceled")
        for job in jobs:
            # The lease token stays: the run is stopping, and until its worker
            # says it is gone (RELEASE_STOPPED_RUN_SQL) a retry cannot start it again.
            conn.execute("""
                UPDATE jobs
                SET state = 'canceled', last_error = 'canceled by the user',
                    finished_at = :now, updated_at = :now
                WHERE seq = :seq
                """, {"seq": job["seq"], "now": now})
            settle_dependents(conn, job["id"], "canceled", now)
    return jobs


def retry_jobs(conn, ids=None, states=RETRYABLE_STATES, now=None):
    """Put dead or canceled jobs back to pending with attempts 0 (ids=None: every dead job).

    A job whose dependency is dead or canceled is refused: retry that one first.
    Returns the ids retried.
    """
    now = conn.now() if now is None else now
    with conn.transaction():
        if ids is None:
            jobs = conn.execute(f"SELECT * FROM jobs WHERE state = 'dead' ORDER BY seq {conn.LOCK_FOR_UPDATE}").fetchall()
        else:
            jobs = fetch_jobs(conn, ids, conn.LOCK_FOR_UPDATE)
        for job in jobs:
            if job["state"] not in states:
                raise WrongState(f"job '{job['id']}' is {job['state']}; only {' or '.join(states)} jobs "
                                 "can be retried")
            if job["lease_token"] is not None:  # its canceled run is still being stopped: keep it
                conn.execute(OPEN_RUN_SQL, run_identity(job))
            conn.execute("""
                UPDATE jobs
                SET state = 'pending', attempts = 0, deps_left = :deps_left,
                    run_at = :now, is_due = 0, finished_at = NULL, updated_at = :now
                WHERE seq = :seq
                """, {"seq": job["seq"], "deps_left": unmet_dependencies(conn, job), "now": now})
    return [job["id"] for job in jobs]


def unmet_dependencies(conn, job):
    """How many of the job's dependencies are not completed; refuse dead or canceled ones.

    A dependency that was purged counts as met: only an ended job can be purged.
    """
    unmet = 0
    for dep in json.loads(job["depends_on"]):
        state = dependency_state(conn, dep)
        if state in ("dead", "canceled"):
            raise WrongState(f"job '{job['id']}' depends on '{dep}', which is {state}; retry '{dep}' first")
        if state not in (None, "completed"):
            unmet += 1
    return unmet


def purge_jobs(conn, states=("completed",), older_than_s=None, now=None):
    """Delete jobs in the given end states, finished before now - older_than_s. Return how many."""
    now = conn.now() if now is None else now
    for state in states:
        if state not in END_STATES:
            raise UsageError(f"purge deletes only jobs in end states ({', '.join(END_STATES)}), not '{state}'")
    marks = ", ".join("?" for _ in states)
    select = f"""
        SELECT id, seq FROM jobs
        WHERE state IN ({marks}) AND coalesce(finished_at, updated_at) < ?
        LIMIT {PURGE_BATCH} {conn.LOCK_FOR_UPDATE}
        """
    params = [*states, now - older_than_s if older_than_s is not None else math.inf]
    purged = 0
    while True:
        deleted = delete_batch(conn, select, params)
        purged += deleted
        if deleted < PURGE_BATCH:
            return purged


PURGE_BATCH = 500  # jobs deleted per transaction (a statement binds at most 999 values in older SQLite)


def delete_batch(conn, select, params):
    """Delete the jobs `select` names (id, seq; at most PURGE_BATCH, locked), their edges and runs; how many.

    A batch to a short transaction: deleting millions never holds the lock
    for long, and the rows deleted are locked first (a retry cannot take one
    back half way).
    """
    with conn.transaction():
        rows = conn.execute(select, params).fetchall()
        ids, seqs = [row[0] for row in rows], [row[1] for row in rows]
        if ids:
            id_marks = ", ".join("?" for _ in ids)
            # Both ends: an ended job's edges are settled, and a later job may reuse its id.
            conn.execute(f"DELETE FROM deps WHERE job_id IN ({id_marks})", ids)
            conn.execute(f"DELETE FROM deps WHERE depends_on IN ({id_marks})", ids)
            conn.execute(f"DELETE FROM runs WHERE job_seq IN ({id_marks})", seqs)
            conn.execute(f"DELETE FROM jobs WHERE id IN ({id_marks})", ids)
    return len(ids)


def count_by_state(conn):
    """{state: count} for every state, zeros included."""
    counts = dict.fromkeys(STATES, 0)
    for (_, state), n in conn.count_jobs().items():
        counts[state] += n
    return counts


def oldest_runnable_age_s(conn, now=None):
    """Seconds the longest-waiting due job has been runnable, or None."""
    now = conn.now() if now is None else now
    # One step into jobs_by_run_at for each value of is_due: the due jobs, and
    # those whose time came since the last claim promoted any.
    oldest = [conn.execute(conn.OLDEST_RUN_AT_SQL, {"is_due": is_due}).fetchone()[0] for is_due in (1, 0)]
    oldest = [run_at for run_at in oldest if run_at is not None and run_at <= now]
    return round(now - min(oldest), 3) if oldest else None



def list_jobs(conn, states=None, queue=None, limit=100):
    """Jobs newest first, optionally filtered by states and queue; limit 0: all."""
    where, params = [], []
    if states:
        where.append(f"state IN ({', '.join('?' for _ in states)})")
        params.extend(states)
    if queue:
        # With states too, read them through jobs_by_state: "|| ''" keeps the
        # planner off jobs_by_queue, which would filter a whole queue by state.
        where.append("queue || '' = ?" if states else "queue = ?")
        params.append(queue)
    sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY seq DESC" + (" LIMIT ?" if limit else "")
    return conn.execute(sql, params + ([limit] if limit else [])).fetchall()


def get_job(conn, job_id):
    """One job's row; an unknown id is an error."""
    return fetch_jobs(conn, [job_id])[0]


def cut_marker(cut_bytes):
    """The line that starts a kept output tail whose beginning was cut."""
    return f"[queuectl: {cut_bytes} earlier bytes cut]\n"


def job_json(row):
    """A job row as the contract's JSON object."""
    return {
        "id": row["id"], "command": row["command"], "max_retries": row["max_retries"],
        "timeout": plain_number(row["timeout_s"]), "priority": row["priority"],
        "queue": row["queue"], "run_at": iso(row["run_at"]), "delay": plain_number(row["delay_s"]),
        "env": json.loads(row["env"]), "cwd": row["cwd"], "depends_on": json.loads(row["depends_on"]),
        "state": row["state"], "attempts": row["attempts"], "exit_code": row["exit_code"],
        "last_error": row["last_error"],
        "stdout": (cut_marker(row["stdout_cut"]) if row["stdout_cut"] else "") + row["stdout"],
        "stderr": (cut_marker(row["stderr_cut"]) if row["stderr_cut"] else "") + row["stderr"],
        "created_at": iso(row["created_at"]), "updated_at": iso(row["updated_at"]),
        "started_at": iso(row["started_at"]), "finished_at": iso(row["finished_at"]),
    }


def runs_of(conn, job):
    """The job's runs, oldest first, without their output; the one going, from its job if it has no row yet."""
    runs = [dict(row) for row in conn.execute("""
        SELECT run, attempt, worker_id, host, started_at, finished_at, exit_code, error, outcome,
               stdout_bytes, stderr_bytes
        FROM runs
        WHERE job_seq = ?
        ORDER BY run
        """, (job["seq"],))]
    if job["lease_token"] is not None and (not runs or runs[-1]["run"] < job["last_run"]):
        runs.append({"run": job["last_run"], "attempt": job["attempts"], "worker_id": job["worker_id"],
                     "host": job["run_host"], "started_at": job["started_at"], "finished_at": None,
                     "exit_code": None, "error": None, "outcome": "running", "stdout_bytes": 0, "stderr_bytes": 0})
    return runs


def run_json(row):
    """A run row as the contract's JSON object."""
    return {
        "run": row["run"], "attempt": row["attempt"], "worker": row["worker_id"], "host": row["host"],
        "started_at": iso(row["started_at"]), "finished_at": iso(row["finished_at"]),
        "exit_code": row["exit_code"], "error": row["error"], "outcome": row["outcome"],
        "stdout_bytes": row["stdout_bytes"], "stderr_bytes": row["stderr_bytes"],
    }


def run_output(conn, job, run, stream):
    """(kept bytes, bytes written in all, finished) of one run's stream; None if there is no such run."""
    row = conn.execute(f"SELECT {stream}, {stream}_bytes, finished_at FROM runs WHERE job_seq = ? AND run = ?",
                       (job["seq"], run)).fetchone()
    if row is None:  # the run going has no row until its first output is flushed
        return (b"", 0, False) if job["lease_token"] is not None and run == job["last_run"] else None
    return bytes(row[0]), row[1], row[2] is not None


# ---------------------------------------------------------------------------
# Queue operations: queues paused and limited
# ---------------------------------------------------------------------------

def check_queue_name(name):
    """A queue name as section 2 allows it."""
    if not QUEUE_RE.fullmatch(name):
        raise UsageError(f"queue must be 1-64 characters of A-Z a-z 0-9 . _ -, got {json.dumps(name)}")
    return name


def set_queues(conn, names, column, value):
    """Set paused or max_running for queues (they need no jobs); a queue back at the defaults has no row."""
    assert column in ("paused", "max_running")
    with conn.transaction():
        for name in dict.fromkeys(names):
            conn.execute(f"""
                INSERT INTO queues (queue, {column}) VALUES (:queue, :value)
                ON CONFLICT (queue) DO UPDATE SET {column} = excluded.{column}
                """, {"queue": name, "value": value})
            conn.execute("DELETE FROM queues WHERE queue = ? AND paused = 0 AND max_running = 0", (name,))


def queue_settings(conn):
    """{queue: (paused, limit)} of the queues that have settings."""
    return {row[0]: (bool(row[1]), row[2]) for row in conn.execute("SELECT queue, paused, max_running FROM queues")}


def list_queues(conn, also=()):
    """Every queue that has jobs or settings (or is named in also), by name, with its counts in every state."""
    counts, settings = conn.count_jobs(), queue_settings(conn)
    names = {queue for (queue, _), n in counts.items() if n} | set(settings) | set(also)
    queues = []
    for name in sorted(names):
        jobs = {state: counts.get((name, state), 0) for state in STATES}
        paused, limit = settings.get(name, (False, 0))
        queues.append({"queue": name, "paused": paused, "limit": limit, "jobs": jobs, **jobs})
    return queues


# ---------------------------------------------------------------------------
# Queue operations: why a job is where it is
# ---------------------------------------------------------------------------
#
# Only reads: asking never changes anything, nor waits for a writer.

def explain_job(conn, job_id, now=None):
    """{id, state, reasons: [{code, text}]}: every reason that holds (contract section 7)."""
    job = get_job(conn, job_id)
    now = conn.now() if now is None else now
    if job["state"] == "processing":
        reasons = [("running", running_text(conn, job))]
    elif job["state"] in END_STATES:
        reasons = [("ended", ended_text(job))]
    else:
        reasons = waiting_reasons(conn, job, now)
    return {"id": job["id"], "state": job["state"],
            "reasons": [{"code": code, "text": text} for code, text in reasons]}


def running_text(conn, job):
    """Who runs the job, where, since when, and until when its lease holds."""
    return (f"running on worker {job['worker_id']} on host {job['run_host'] or '?'} since {iso(job['started_at'])} (attempt "
            f"{job['attempts']} of {job['max_retries'] + 1}); its lease runs until {iso(job['lease_until'])}")


def ended_text(job):
    """Which end state, and why."""
    if job["state"] == "completed":
        return f"completed at {iso(job['finished_at'])} after {job['attempts']} attempt(s)"
    if job["state"] == "dead":
        return f"dead after {job['attempts']} attempt(s): {job['last_error']}"
    error = job["last_error"] or "canceled"
    return error if error.startswith("canceled") else f"canceled: {error}"


def waiting_reasons(conn, job, now):
    """Why a pending or failed job has not run yet: every reason that holds."""
    reasons = []
    if job["run_at"] > now:
        wait = f"{iso(job['run_at'])} (in {rough_duration(job['run_at'] - now)})"
        if job["state"] == "failed":
            text = f"retry {job['attempts']} of {job['max_retries']} after '{job['last_error']}' is due at {wait}"
            reasons.append(("not_due", text))
        else:
            reasons.append(("not_due", f"scheduled: not due until {wait}"))
    for dep in json.loads(job["depends_on"]):
        state = job_state(conn, dep)  # a purged dependency had ended: it counts as met
        if state not in (None, "completed"):
            reasons.append(("waiting_on_dependency", f"waits for its dependency '{dep}', which is {state}"))
    paused, limit = queue_settings(conn).get(job["queue"], (False, 0))
    if paused:
        reasons.append(("queue_paused", f"queue '{job['queue']}' is paused (queuectl queue resume {job['queue']})"))
    running = running_in(conn, job["queue"], now) if limit else 0
    if limit and running >= limit:
        reasons.append(("queue_at_limit", f"queue '{job['queue']}' is at its limit: {running} of {limit} running"))
    if job["run_at"] <= now:
        reasons += worker_reasons(conn, job, now, held_back=bool(reasons))
    return reasons


def running_in(conn, queue, now):
    """How many runs of queue's jobs are going: processing ones, and canceled ones still being stopped.

    Both hold their run's lease token, and its lease while their worker
    lives (jobs_running): a canceled job's command keeps its place in the
    limit until its process group is gone.
    """
    return conn.execute("""
        SELECT count(*) FROM jobs WHERE lease_token IS NOT NULL AND queue = :queue AND lease_until >= :now
        """, {"queue": queue, "now": now}).fetchone()[0]


AHEAD_COUNTED = 1000  # why counts the due jobs ahead up to this many


def worker_reasons(conn, job, now, held_back):
    """A due job: no live worker takes its queue; or, if nothing else holds it back, they are busy."""
    workers = [p for p in live_processes(conn, now, tidy=False)
               if p["kind"] == "worker" and (not p["queues"] or job["queue"] in p["queues"])]
    if not workers:
        text = f"due, but no live worker takes jobs of queue '{job['queue']}' (queuectl worker start --queue ...)"
        return [("no_worker_for_queue", text)]
    if held_back:
        return []
    served = set() if any(not p["queues"] for p in workers) else {q for p in workers for q in p["queues"]}
    names = {f"q{i}": queue for i, queue in enumerate(sorted(served))}
    queue_filter = f"AND queue IN ({', '.join(':' + n for n in names)})" if names else ""
    # Through jobs_ready, in claim order, and at most AHEAD_COUNTED: a read that stays cheap.
    ahead = conn.execute(f"""
        SELECT count(*) FROM (
            SELECT 1 FROM jobs
            WHERE state IN ('pending', 'failed') AND deps_left = 0 AND is_due = 1
              AND (priority > :priority OR (priority = :priority AND seq < :seq))
              AND NOT EXISTS ({BLOCKED_QUEUE_SQL})
              {queue_filter}
            LIMIT {AHEAD_COUNTED}) AS ahead
        """, {"now": now, "priority": job["priority"], "seq": job["seq"], **names}).fetchone()[0]
    busy = sum(1 for p in workers if p["current_job"])
    ahead_text = f"{ahead}" if ahead < AHEAD_COUNTED else f"{AHEAD_COUNTED} or more"
    text = (f"due; {busy} of {len(workers)} worker(s) for queue '{job['queue']}' are busy, "
            f"{ahead_text} due job(s) ahead of it")
    return [("waiting_for_worker", text)]


# ---------------------------------------------------------------------------
# Schedules: cron expressions and their ticks
# ---------------------------------------------------------------------------
#
# A schedule's ticks are computed, never stored: Cron reads the five fields
# (or an @alias, or @every), and next_tick(after) gives the first tick
# strictly after an instant, in the schedule's zone, by the contract's
# daylight-saving rules (see wall_time_instants).

CRON_FIELDS = (  # name, lowest, highest, names for the values (counted from lowest)
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day-of-month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    ("day-of-week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
CRON_ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
MAX_SHIFT_S = 4 * 3600  # more than any zone's offset ever changed at once: wall times this far apart keep order
CRON_HORIZON_DAYS = 366 * 28  # the calendar (dates and weekdays) repeats within 28 years in this range


class Cron:
    """A parsed CRON: the sets of minutes, hours, days, months and weekdays it matches, or an @every interval."""

    def __init__(self, text):
        self.text = text
        self.every_s = None
        words = text.split()
        if words and words[0].lower() == "@every":
            if len(words) != 2:
                raise UsageError(f"@every takes one duration (30s, 15m, 2h, 1d or seconds), got {text!r}")
            self.every_s = parse_every(words[1])
            return
        if len(words) == 1 and words[0].lower() in CRON_ALIASES:
            words = CRON_ALIASES[words[0].lower()].split()
        elif len(words) == 1 and words[0].startswith("@"):
            raise UsageError(f"unknown schedule alias {words[0]!r} (known: {', '.join(CRON_ALIASES)}, @every)")
        if len(words) != 5:
            raise UsageError(f"a cron expression has 5 fields (minute hour day-of-month month day-of-week), "
                             f"got {len(words)} in {text!r}")
        sets = [parse_cron_field(word, *rule) for word, rule in zip(words, CRON_FIELDS)]
        minutes, hours, self.days, self.months, weekdays = sets
        self.minutes, self.hours = sorted(minutes), sorted(hours)
        self.weekdays = {day % 7 for day in weekdays}  # 7 is Sunday too
        self.hour_is_any = words[1] == "*"
        # Classic cron: with both day fields restricted, a day matches either.
        self.day_is_any, self.weekday_is_any = words[2].startswith("*"), words[4].startswith("*")
        if self.next_date(datetime.date(2000, 1, 1)) is None:
            raise UsageError(f"{text!r} matches no date (day-of-month and month never meet)")

    def matches_date(self, date):
        """Whether the day fields and the month match this date."""
        if date.month not in self.months:
            return False
        day_ok, weekday_ok = date.day in self.days, (date.isoweekday() % 7) in self.weekdays
        if self.day_is_any or self.weekday_is_any:
            return day_ok and weekday_ok
        return day_ok or weekday_ok

    def next_date(self, date):
        """The first matching date on or after date, or None within CRON_HORIZON_DAYS."""
        for _ in range(CRON_HORIZON_DAYS):
            if self.matches_date(date):
                return date
            if date.month not in self.months:  # skip the rest of a month that cannot match
                date = (date.replace(day=1) + datetime.timedelta(days=32)).replace(day=1)
            else:
                date += datetime.timedelta(days=1)
        return None

    def wall_times(self, start):
        """Matching naive wall-clock times from start (inclusive, to the minute), in order, forever."""
        start = start.replace(second=0, microsecond=0) + (datetime.timedelta(minutes=1)
                                                           if start.second or start.microsecond else datetime.timedelta())
        date, first_day = start.date(), True
        while True:
            date = self.next_date(date)
            if date is None:
                return
            if date != start.date():
                first_day = False
            for hour in self.hours:
                if first_day and hour < start.hour:
                    continue
                for minute in self.minutes:
                    if first_day and hour == start.hour and minute < start.minute:
                        continue
                    yield datetime.datetime.combine(date, datetime.time(hour, minute))
            date += datetime.timedelta(days=1)
            first_day = False

    def next_tick(self, after, zone, anchor=None):
        """The first tick strictly after the instant `after` (epoch s) in zone; anchor counts @every.

        Wall times are walked in order from the wall time of `after`. Near a
        change of the zone's offset (within MAX_SHIFT_S), wall-time order and
        instant order part: there the walk starts MAX_SHIFT_S earlier and goes
        on MAX_SHIFT_S past its best, so no earlier instant is missed.
        """
        if self.every_s is not None:
            return anchor + max(math.floor((after - anchor) / self.every_s) + 1, 1) * self.every_s
        start = datetime.datetime.fromtimestamp(after, zone).replace(tzinfo=None)
        if offset_changes_near(after, zone):
            start -= datetime.timedelta(seconds=MAX_SHIFT_S)
        best = best_wall = None
        for wall in self.wall_times(start):
            if best is not None and wall > best_wall + datetime.timedelta(seconds=MAX_SHIFT_S):
                break
            for instant in wall_time_instants(wall, zone, both_folds=self.hour_is_any):
                if instant > after and (best is None or instant < best):
                    best, best_wall = instant, wall
            if best is not None and not offset_changes_near(best, zone):
                break
        return best


def offset_changes_near(instant, zone):
    """Whether zone's UTC offset changes within MAX_SHIFT_S of instant (zones change it months apart)."""
    before, after = (datetime.datetime.fromtimestamp(instant + d, zone).utcoffset() for d in (-MAX_SHIFT_S, MAX_SHIFT_S))
    return before != after


def parse_cron_field(word, name, low, high, names):
    """One cron field as the set of values it matches: *, n, a-b, */n, a-b/n, lists, names."""
    values = set()
    for part in word.lower().split(","):
        match = re.fullmatch(r"(\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/([0-9]+))?", part)
        if not match:
            raise UsageError(f"bad {name} field {word!r}")
        span, step = match.group(1), int(match.group(2)) if match.group(2) else 1
        if span == "*":
            first, last = low, (6 if name == "day-of-week" else high)
        else:
            ends = [cron_value(end, name, low, high, names, word) for end in span.split("-")]
            first, last = ends[0], ends[-1]
            if match.group(2) and len(ends) == 1:
                last = high
        if step < 1 or first > last:
            raise UsageError(f"bad {name} field {word!r}: an empty range or a zero step")
        values.update(range(first, last + 1, step))
    return values


def cron_value(text, name, low, high, names, word):
    """A number or a name of one cron field, checked against its range."""
    if text in names:
        return names.index(text) + (low if name == "month" else 0)
    if not text.isdigit() or not low <= int(text) <= high:
        raise UsageError(f"bad {name} field {word!r}: {text!r} is not {low}-{high}"
                         + (f" or {names[0]}-{names[-1]}" if names else ""))
    return int(text)


def parse_every(text):
    """@every's interval: 30s, 15m, 2h, 1d, or a number of seconds >= 1."""
    try:
        seconds = float(text) if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text) else parse_duration(text)
    except UsageError:
        seconds = None
    if seconds is None or not 1 <= seconds <= 10 * 366 * 86400:
        raise UsageError(f"@every takes a duration of at least 1 s (30s, 15m, 2h, 1d or seconds), got {text!r}")
    return seconds


def wall_time_instants(wall, zone, both_folds):
    """The instants (epoch s) at which a matching wall-clock time fires in zone.

    A time that happens once fires then. One skipped by a spring-forward gap
    fires at the first instant after the gap. One that happens twice (the
    hour repeated in autumn) fires at its first occurrence, or at both when
    both_folds (the hour field is *).
    """
    first = wall.replace(tzinfo=zone, fold=0).timestamp()
    second = wall.replace(tzinfo=zone, fold=1).timestamp()
    if first == second:
        return (first,)
    if first < second:  # repeated
        return (first, second) if both_folds else (first,)
    return (gap_end(second, first, zone),)  # skipped: fold=1 reads it with the offset after the gap


def gap_end(low, high, zone):
    """The instant a spring-forward gap ends: the second at which zone's offset changes, in (low, high]."""
    offset_after = datetime.datetime.fromtimestamp(high, zone).utcoffset()
    low, high = math.floor(low), math.ceil(high)
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.datetime.fromtimestamp(middle, zone).utcoffset() == offset_after:
            high = middle
        else:
            low = middle
    return float(high)


# ---------------------------------------------------------------------------
# Schedules: recurring jobs, fired exactly once per tick
# ---------------------------------------------------------------------------
#
# A schedule is a row: its CRON, zone, job template and a watermark,
# handled_until: every tick up to it was fired or skipped. Every supervisor
# (not --burst) looks every tick for schedules whose next tick after the
# watermark has come, and fires them in one transaction that locks the
# schedule's row, makes the jobs and moves the watermark. Each job's id is
# NAME@<tick in UTC>, so even two firings that both saw the old watermark
# make one job per tick; the watermark, not the jobs, says what was fired, so
# purging a schedule's jobs never fires a tick again.

SCHEDULE_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
CATCH_UP_POLICIES = ("latest", "all", "none")
MAX_CATCH_UP = 1000  # catch-up all: at most this many missed ticks, the latest ones
TEMPLATE_REFUSED = ("id", "run_at", "delay", "depends_on")  # each job gets its own


def resolve_zone(name):
    """The tzinfo of an IANA zone name; UTC needs no zone data."""
    if name.upper() == "UTC":
        return datetime.timezone.utc
    import zoneinfo
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        if not zoneinfo.available_timezones():
            raise UsageError(f"time zone '{name}' needs zone data, and this machine has none (no "
                             "/usr/share/zoneinfo, no tzdata package: python3 -m pip install tzdata); "
                             "only UTC works") from None
        raise UsageError(f"unknown time zone '{name}' (an IANA name such as Europe/Berlin, or UTC)") from None


def local_zone_name():
    """This machine's zone by name: $TZ, else where /etc/localtime points, else UTC."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        candidates.append(os.readlink("/etc/localtime").partition("zoneinfo/")[2])
    except OSError:
        pass
    for name in candidates:
        if name:
            try:
                resolve_zone(name)
                return "UTC" if name.upper() == "UTC" else name
            except UsageError:
                continue
    return "UTC"


def tick_id(name, tick):
    """The id of the job a tick makes: NAME@YYYYMMDDTHHMMSSZ."""
    return f"{name}@{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(tick))}"


def check_schedule_name(name):
    """A schedule name: 1-64 of A-Z a-z 0-9 . _ -."""
    if not SCHEDULE_NAME_RE.fullmatch(name):
        raise UsageError(f"a schedule name must be 1-64 characters of A-Z a-z 0-9 . _ -, got {json.dumps(name)}")
    return name


def check_template(spec, config, now):
    """A schedule's job template: a job object (section 2) without the fields each job gets itself."""
    if isinstance(spec, dict):
        refused = [field for field in TEMPLATE_REFUSED if field in spec]
        if refused:
            raise UsageError(f"a schedule's job takes no '{refused[0]}': each job gets its own")
    job_row(spec, config, now)  # every other rule of a job
    return spec


class Schedule:
    """A schedules row with its parsed CRON and zone."""

    def __init__(self, row):
        self.row = row
        self.name = row["name"]
        self.cron = Cron(row["cron"])
        self.zone = resolve_zone(row["tz"])

    def next_tick(self, after):
        return self.cron.next_tick(after, self.zone, self.row["anchor"])

    def ticks_between(self, low, high, limit):
        """Up to `limit` ticks in (low, high], oldest first."""
        ticks, tick = [], self.next_tick(low)
        while tick is not None and tick <= high and len(ticks) < limit:
            ticks.append(tick)
            tick = self.next_tick(tick)
        return ticks

    def last_ticks(self, low, high, count):
        """The last `count` ticks in (low, high), oldest first, looking back from high in growing windows."""
        window = 3600.0
        while True:
            start = max(low, high - window)
            ticks = [tick for tick in self.ticks_between(start, high, math.inf) if tick < high]
            if len(ticks) >= count or start == low:
                return ticks[-count:] if count else []
            window *= 8


def add_schedule(conn, name, cron, tz, template, catch_up, no_overlap, now=None):
    """Add a schedule; its first tick comes strictly after now. A name that exists is an error."""
    now = conn.now() if now is None else now
    try:
        with conn.transaction():
            conn.execute("""
                INSERT INTO schedules (name, cron, tz, job, paused, catch_up, no_overlap, created_at, anchor,
                                       handled_until)
                VALUES (:name, :cron, :tz, :job, 0, :catch_up, :no_overlap, :now, :anchor, :now)
                """, {"name": name, "cron": cron, "tz": tz, "job": json.dumps(template), "catch_up": catch_up,
                      "no_overlap": int(no_overlap), "now": now, "anchor": float(math.ceil(now))})
    except StorageError as e:
        if e.kind != "duplicate":
            raise
        raise QueueError(f"schedule '{name}' already exists") from None


def get_schedules(conn, names=None, lock=""):
    """Schedule rows by name (all when names is None); an unknown name is an error."""
    if names is None:
        return conn.execute("SELECT * FROM schedules ORDER BY name").fetchall()
    rows = []
    for name in dict.fromkeys(names):
        row = conn.execute(f"SELECT * FROM schedules WHERE name = ? {lock}", (name,)).fetchone() \
            if SCHEDULE_NAME_RE.fullmatch(name) else None
        if row is None:
            raise NotFound(f"schedule '{name}' not found")
        rows.append(row)
    return rows


PAUSE_SCHEDULE_SQL = "UPDATE schedules SET paused = 1 WHERE name = :name"
# From now: the ticks missed while paused are not fired, and the watermark never goes back.
RESUME_SCHEDULE_SQL = """
    UPDATE schedules
    SET paused = 0,
        handled_until = CASE WHEN paused = 1 AND handled_until < :now THEN :now ELSE handled_until END
    WHERE name = :name
    """


def change_schedules(conn, names, sql, now=None):
    """One UPDATE or DELETE (with :name, :now) for each named schedule, all or none."""
    now = conn.now() if now is None else now
    with conn.transaction():
        for row in get_schedules(conn, names, conn.LOCK_FOR_UPDATE):
            conn.execute(sql, {"name": row["name"], "now": now})


def schedule_json(row):
    """A schedules row as the contract's JSON object; next_tick_at is null while paused.

    next_tick_at is the first tick after the watermark: the next one to fire,
    in the past while it waits for a supervisor.
    """
    next_tick = None
    if not row["paused"]:
        try:
            next_tick = Schedule(row).next_tick(row["handled_until"])  # the next to fire: maybe due already
        except UsageError:  # zone data gone since it was added
            next_tick = None
    return {
        "name": row["name"], "cron": row["cron"], "tz": row["tz"], "job": json.loads(row["job"]),
        "paused": bool(row["paused"]), "catch_up": row["catch_up"], "no_overlap": bool(row["no_overlap"]),
        "created_at": iso(row["created_at"]), "last_tick_at": iso(row["last_tick_at"]),
        "last_job_id": row["last_job_id"], "next_tick_at": iso(next_tick),
    }


def schedule_job_row(row, job_id, tick, config, now):
    """The job row a tick (or `schedule run`) makes from the template."""
    spec = json.loads(row["job"])
    spec["id"] = job_id
    spec["env"] = {**spec.get("env", {}), "QUEUECTL_SCHEDULE": row["name"], "QUEUECTL_SCHEDULED_AT": iso(tick)}
    return job_row(spec, config, now)


def run_schedule_now(conn, name, now=None):
    """`schedule run`: one job now from the template; its id."""
    now = conn.now() if now is None else now
    config = load_config(conn)
    with conn.transaction():
        row = get_schedules(conn, [name], conn.LOCK_FOR_UPDATE)[0]
        job_id = f"{row['name']}@run.{new_job_id()}"
        insert_schedule_job(conn, row, job_id, now, config, now)
        conn.execute("UPDATE schedules SET last_job_id = ? WHERE name = ?", (job_id, row["name"]))
    return job_id


def fire_due_schedules(conn, running_since, now=None):
    """Fire every schedule whose next tick has come; the ids of the jobs made.

    running_since: when this supervisor started firing. Ticks that came
    while no supervisor fired were missed and follow the schedule's catch-up
    policy (see supervised_since); later ones all fire. Cheap when nothing
    is due: one read of the schedules, no lock, each next tick computed once.
    """
    now = conn.now() if now is None else now
    made = []
    for row in conn.execute("SELECT * FROM schedules WHERE paused = 0").fetchall():
        key = tuple(row[column] for column in ("name", "cron", "tz", "anchor", "handled_until"))
        if key not in NEXT_TICKS:
            try:
                NEXT_TICKS[key] = Schedule(row).next_tick(row["handled_until"])
            except UsageError as e:
                log(f"schedule {row['name']} cannot fire: {e}")
                NEXT_TICKS[key] = None
        if NEXT_TICKS[key] is not None and NEXT_TICKS[key] <= now:
            made += fire_schedule(conn, row, running_since, now)
    if len(NEXT_TICKS) > 10_000:  # keys of watermarks long gone
        NEXT_TICKS.clear()
    return made


NEXT_TICKS = {}  # (name, cron, tz, anchor, handled_until) -> the next tick: a supervisor asks 5 times a second


def supervised_since(conn, running_since, now):
    """Since when schedules have been fired without a break, as far as the registry knows.

    Ours, or an older live supervisor's that fires them (not --burst, not
    stopping): a tick that came while one fired was not missed, even if
    the supervisor that makes its job started after it. (A supervisor that
    died counts until its heartbeat is lease_timeout old.)
    """
    lease_s = load_config(conn)["lease_timeout"]
    rows = conn.execute("SELECT * FROM workers WHERE kind = 'supervisor' AND fires_schedules = 1").fetchall()
    return min([running_since, *(row["started_at"] for row in rows if is_alive(row, lease_s, now))])


def has_unended_job(conn, name):
    """Whether a job of the schedule (a tick's, or `schedule run`'s) is not in an end state (jobs_of_schedules)."""
    return conn.execute("""
        SELECT 1 FROM jobs
        WHERE schedule IS NOT NULL AND state IN ('pending', 'failed', 'processing') AND schedule = ?
        LIMIT 1
        """, (name,)).fetchone() is not None


def due_ticks(row, since, now):
    """(missed, on_time): the ticks of a schedule row after its watermark up to now, split at since."""
    schedule, low = Schedule(row), row["handled_until"]
    missed = schedule.last_ticks(low, min(since, now), {
        "latest": 1, "all": MAX_CATCH_UP, "none": 0}[row["catch_up"]]) if low < since else []
    # A tick within a millisecond of `since` may be in both: its second job is the same id, skipped.
    on_time = schedule.ticks_between(max(low, since - 0.001), now, MAX_CATCH_UP)
    return missed, on_time


def fire_schedule(conn, seen, running_since, now):
    """Make the jobs of one schedule's due ticks and move its watermark, in one transaction.

    The ticks are worked out before the transaction (near a clock change
    that takes milliseconds) from the row as seen; under the row's lock they
    are worked out again only if another supervisor moved the watermark.
    """
    config = load_config(conn)
    planned = due_ticks(seen, supervised_since(conn, running_since, now), now)
    with conn.transaction():
        row = conn.execute(f"SELECT * FROM schedules WHERE name = ? AND paused = 0 {conn.LOCK_FOR_UPDATE}",
                           (seen["name"],)).fetchone()
        if row is None:  # removed or paused meanwhile
            return []
        name, low = row["name"], row["handled_until"]
        if low != seen["handled_until"] or row["cron"] != seen["cron"] or row["tz"] != seen["tz"]:
            planned = due_ticks(row, supervised_since(conn, running_since, now), now)
        missed, on_time = planned
        last_job_id, last_tick, made = row["last_job_id"], row["last_tick_at"], []
        for tick in missed + on_time:
            if row["no_overlap"] and has_unended_job(conn, name):
                continue  # an earlier job of the schedule has not ended: this tick is skipped
            job_id = tick_id(name, tick)
            if insert_schedule_job(conn, row, job_id, tick, config, now, if_absent=True):
                made.append(job_id)
                last_job_id, last_tick = job_id, tick
        handled = on_time[-1] if len(on_time) == MAX_CATCH_UP else max(low, now)  # the rest: next time
        conn.execute("""
            UPDATE schedules SET handled_until = :handled, last_tick_at = :last_tick, last_job_id = :last_job_id
            WHERE name = :name
            """, {"handled": handled, "last_tick": last_tick, "last_job_id": last_job_id, "name": name})
    return made


def insert_schedule_job(conn, row, job_id, tick, config, now, if_absent=False):
    """Insert the job a tick (or `schedule run`) makes, marked as the schedule's; whether it was new."""
    if not insert_job_rows(conn, [schedule_job_row(row, job_id, tick, config, now)], if_absent=if_absent):
        return False
    conn.execute("UPDATE jobs SET schedule = ? WHERE id = ?", (row["name"], job_id))
    return True


# ---------------------------------------------------------------------------
# Worker registry and wake-ups
# ---------------------------------------------------------------------------

HOST = os.uname().nodename if hasattr(os, "uname") else "localhost"


def register_process(conn, proc_id, kind, supervisor_id, queues, wake_addr=None, now=None, fires_schedules=False):
    """Add this process to the registry that `worker list` and `worker stop` read."""
    now = conn.now() if now is None else now
    with conn.transaction():
        conn.execute("""
            INSERT INTO workers (id, kind, supervisor_id, host, pid, queues, started_at, heartbeat_at, wake_addr,
                                 fires_schedules)
            VALUES (:id, :kind, :supervisor_id, :host, :pid, :queues, :now, :now, :wake_addr, :fires)
            ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, wake_addr = excluded.wake_addr,
                                           fires_schedules = excluded.fires_schedules
            """, {"id": proc_id, "kind": kind, "supervisor_id": supervisor_id, "host": HOST, "pid": os.getpid(),
                  "queues": json.dumps(list(queues)), "now": now, "wake_addr": wake_addr,
                  "fires": int(fires_schedules)})


def heartbeat(conn, proc_id, now=None):
    """Say this process is alive; return whether a stop was requested, or None if our row is gone.

    A row is pruned when its process missed beats for lease_timeout (paused,
    say); the caller then registers again, so a live process always comes back.
    """
    now = conn.now() if now is None else now
    if not conn.execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?", (now, proc_id)).rowcount:
        return None
    return bool(conn.execute("SELECT stop_requested FROM workers WHERE id = ?", (proc_id,)).fetchone()[0])


def unregister_process(conn, proc_id):
    """Remove a process from the registry."""
    conn.execute("DELETE FROM workers WHERE id = ?", (proc_id,))


def forget_processes(conn, proc_ids):
    """Remove the registry rows of processes that are gone."""
    with conn.transaction():
        conn.executemany("DELETE FROM workers WHERE id = ?", [(proc_id,) for proc_id in proc_ids])


def is_alive(row, lease_s, now):
    """A registry row whose process still beats (and exists, when it is on this host)."""
    if row["heartbeat_at"] < now - lease_s:
        return False
    return row["host"] != HOST or pid_exists(row["pid"])


def live_processes(conn, now=None, tidy=True):
    """The registry's live supervisors and workers, each with its current job.

    Rows of processes that are gone are never shown as alive, and are deleted
    on the way (if tidy) when the database lets us at once: a reader never
    waits to tidy up.
    """
    now = conn.now() if now is None else now
    lease_s = load_config(conn)["lease_timeout"]
    rows = conn.execute("SELECT * FROM workers ORDER BY started_at, id").fetchall()
    dead = [row["id"] for row in rows if not is_alive(row, lease_s, now)]
    if dead and tidy:
        if_possible(conn, forget_processes, dead)
    current = {r["worker_id"]: r["id"] for r in
               conn.execute("SELECT id, worker_id FROM jobs WHERE state = 'processing'")}
    return [process_json(row, current.get(row["id"])) for row in rows if row["id"] not in dead]


def process_json(row, current_job):
    """A registry row as the JSON object `worker list` prints."""
    return {
        "id": row["id"], "kind": row["kind"], "pid": row["pid"], "host": row["host"],
        "supervisor_id": row["supervisor_id"], "queues": json.loads(row["queues"]),
        "started_at": iso(row["started_at"]), "heartbeat_at": iso(row["heartbeat_at"]),
        "current_job": current_job,
    }


# ---------------------------------------------------------------------------
# Execution: one command, its timeout, and the tail of its output
# ---------------------------------------------------------------------------

class OutputTail:
    """The last `limit` bytes of a stream, and how many bytes before them were dropped."""

    def __init__(self, limit):
        self.limit = limit
        self.data = bytearray()
        self.cut = 0

    def add(self, chunk):
        """Keep chunk, dropping the oldest bytes beyond the limit: memory stays bounded."""
        self.data += chunk
        excess = len(self.data) - self.limit
        if excess > 0:
            del self.data[:excess]
            self.cut += excess

    @property
    def total(self):
        """Every byte the stream carried, the dropped ones included."""
        return self.cut + len(self.data)

    def text(self):
        """The kept bytes as text, bad UTF-8 and NUL bytes replaced (PostgreSQL text holds no NUL)."""
        return self.data.decode("utf-8", "replace").replace("\0", "\ufffd")


def signal_name(number):
    """SIGKILL for 9, or the number when it has no name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def exit_error(returncode):
    """The last_error line for a finished process, or None for exit status 0."""
    if returncode < 0:
        return f"killed by signal {signal_name(-returncode)}"
    hints = {126: " (command not executable)", 127: " (command not found)"}
    return f"exit status {returncode}{hints.get(returncode, '')}" if returncode else None


def kill_group(pgid, signum):
    """Signal a whole process group; a group that is already gone is fine."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


class CommandRun:
    """One run of a shell command: /bin/sh -c in its own session, output read as it comes.

    The job's stdout and stderr are read while it runs and only their last
    output_limit bytes are kept, so a job printing gigabytes costs no memory.
    """

    def __init__(self, command, env, cwd, timeout_s, output_limit):
        self.command, self.env, self.cwd = command, env, cwd
        self.timeout_s = timeout_s
        self.stdout, self.stderr = OutputTail(output_limit), OutputTail(output_limit)
        self.proc = None
        self.started_at = None
        self.stop_reason = None
        self.kill_at = math.inf
        self.fence_at = math.inf  # the worker's lease deadline: past it the job is killed at once
        self.fence_watch_done = None  # set when watch_the_fence() runs, to end its thread

    def start(self):
        """Spawn the command; return an error line if it could not start, else None."""
        if self.cwd is not None and not os.path.isdir(self.cwd):
            return f"cannot start: cwd '{self.cwd}' is not a directory"
        try:
            self.proc = ShellProcess(self.command, self.env, self.cwd)
        except OSError as e:
            return f"cannot start: {e.strerror or e}"
        self.started_at = time.monotonic()
        return None

    def stop(self, reason, grace_s):
        """Ask the job's process group to end: SIGTERM now, SIGKILL after grace_s.

        Each request escalates on its own clock: a later one with a shorter
        grace (a lease taken over after a timeout) brings the SIGKILL forward,
        and none ever puts it off. The first reason is the one recorded.
        """
        if self.stop_reason is None:
            self.stop_reason = reason
            kill_group(self.proc.pid, signal.SIGTERM)
        self.kill_at = min(self.kill_at, time.monotonic() + grace_s)

    def watch_the_fence(self):
        """Kill the job at fence_at from a thread of its own, even while the loop is stuck in a call.

        For engines whose calls can block past the fence (a PostgreSQL server
        behind a network that went silent): the loop's own check runs only
        between calls.
        """
        import threading
        self.fence_watch_done = threading.Event()

        def watch():
            while not self.fence_watch_done.wait(min(max(self.fence_at - time.monotonic(), 0.01), 0.5)):
                if time.monotonic() >= self.fence_at:
                    self.stop_reason = self.stop_reason or FENCE_KILL
                    kill_group(self.proc.pid, signal.SIGKILL)
                    return

        threading.Thread(target=watch, name="queuectl-fence", daemon=True).start()

    def wait(self, tick_s, on_tick, wake_sources=(), on_output=None):
        """Read output until the command exits; return its RunResult.

        on_tick() runs tick_s seconds after the start, then as often as its
        return value (seconds) says, and at once when one of wake_sources, a
        list of (selectable, empty), is readable (empty(selectable) reads what
        woke it); it may call stop(). The timeout stops the job the same way.
        on_output(stdout, stderr) gets the tails when there is new output, at
        most every OUTPUT_FLUSH_S and never in the first (a short job's output
        is recorded with its result). If anything here raises, the job's
        process group is killed first: a job never outlives the worker's
        interest in it.
        """
        import selectors
        self.selector = selectors.PollSelector() if hasattr(selectors, "PollSelector") else selectors.DefaultSelector()
        self.selector.register(self.proc.stdout_fd, selectors.EVENT_READ, self.stdout)
        self.selector.register(self.proc.stderr_fd, selectors.EVENT_READ, self.stderr)
        for source, empty in wake_sources:
            self.selector.register(source, selectors.EVENT_READ, empty)
        self.pidfd = open_pidfd(self.proc.pid)
        if self.pidfd is not None:  # readable when the process exits: no polling needed
            self.selector.register(self.pidfd, selectors.EVENT_READ, "exit")
        self.deadline = self.started_at + self.timeout_s if self.timeout_s else math.inf
        self.next_tick = self.started_at + tick_s
        self.on_output, self.flush_at, self.flushed = on_output, self.started_at + OUTPUT_FLUSH_S, (0, 0)
        self.exited_at = None
        try:
            while not self.is_finished(time.monotonic()):
                self.act_on_time(time.monotonic(), on_tick)
                self.read_ready(self.selector.select(self.wait_s(time.monotonic())))
        except BaseException:
            kill_group(self.proc.pid, signal.SIGKILL)
            raise
        finally:
            self.close()
        return self.result(self.proc.wait())

    def is_finished(self, now):
        """Whether the command exited and its output is read (or its grace is over)."""
        if self.exited_at is None and self.proc.poll() is not None:
            self.exited_at = now
            if self.stop_reason is not None:  # stragglers of a stopped job go too
                kill_group(self.proc.pid, signal.SIGKILL)
        if self.exited_at is None:
            return False
        if self.open_streams() and now < self.exited_at + OUTPUT_GRACE_S:
            return False
        self.drain_streams()  # what is already in the pipes; a background child may keep them open
        return True

    def act_on_time(self, now, on_tick):
        """The timeout, the SIGKILL after a stop's grace, and the periodic tick."""
        if now >= self.deadline:
            self.stop(f"timed out after {seconds_text(self.timeout_s)}", KILL_GRACE_S)
            self.deadline = math.inf
        if now >= self.fence_at:  # our lease could go to another worker: never two runs at once
            self.stop(FENCE_KILL, 0)
            self.fence_at = math.inf
        if now >= self.kill_at:
            kill_group(self.proc.pid, signal.SIGKILL)
            self.kill_at = math.inf
        if now >= self.next_tick:
            self.next_tick = now + on_tick()
        if now >= self.flush_at and self.has_new_output():
            self.flush_at = now + OUTPUT_FLUSH_S
            if self.on_output(self.stdout, self.stderr):  # False: not written, try again at the next
                self.flushed = (self.stdout.total, self.stderr.total)

    def has_new_output(self):
        """Whether the job wrote anything since the last flush (and anyone wants it)."""
        return self.on_output is not None and self.flushed != (self.stdout.total, self.stderr.total)

    def wait_s(self, now):
        """How long select() may sleep before the next thing there is to do."""
        output_grace_at = self.exited_at + OUTPUT_GRACE_S if self.exited_at is not None else math.inf
        flush_at = self.flush_at if self.has_new_output() else math.inf
        wait_s = min(self.deadline, self.kill_at, self.fence_at, self.next_tick, output_grace_at, flush_at) - now
        if self.pidfd is None and self.exited_at is None:
            wait_s = min(wait_s, 0.05)  # no pidfd: poll for the exit
        return max(wait_s, 0)

    def read_ready(self, events):
        """Read every ready pipe; note an exit; run the tick now if a wake source fired."""
        for key, _ in events:
            if key.data == "exit":
                self.selector.unregister(key.fileobj)
            elif callable(key.data):  # a wake source: empty it (False: it is gone, forget it)
                if key.data(key.fileobj) is False:
                    self.selector.unregister(key.fileobj)
                self.next_tick = time.monotonic()
            elif not self.read_chunk(key):
                self.selector.unregister(key.fileobj)

    def read_chunk(self, key):
        """Read one chunk from a ready pipe into its tail; False at end of file."""
        chunk = os.read(key.fd, 65536)
        if chunk:
            key.data.add(chunk)
        return bool(chunk)

    def open_streams(self):
        """The selector keys of the pipes still open."""
        return [key for key in self.selector.get_map().values() if isinstance(key.data, OutputTail)]

    def drain_streams(self):
        """Read what the pipes hold right now, without waiting for a writer that may never close.

        Bounded: a background child that writes without pause cannot keep us here.
        """
        for key in self.open_streams():
            os.set_blocking(key.fd, False)
            try:
                for _ in range(16):  # 16 x 64 KiB: more than a full pipe holds
                    if not self.read_chunk(key):
                        break
            except BlockingIOError:
                pass

    def close(self):
        """Stop watching the fence; close the selector, the pipes and the pidfd."""
        if self.fence_watch_done is not None:
            self.fence_watch_done.set()
        self.selector.close()
        self.proc.close_pipes()
        if self.pidfd is not None:
            os.close(self.pidfd)

    def result(self, returncode):
        """The RunResult for a process that ended with returncode."""
        error = exit_error(returncode)
        if self.stop_reason is not None:
            error = self.stop_reason + (f" ({error})" if error and returncode < 0 else "")
        return RunResult(
            exit_code=returncode if returncode >= 0 else None, error=error,
            stdout=self.stdout.text(), stderr=self.stderr.text(),
            stdout_cut=self.stdout.cut, stderr_cut=self.stderr.cut, stop_reason=self.stop_reason,
            duration_s=time.monotonic() - self.started_at, stdout_tail=self.stdout, stderr_tail=self.stderr)


class ShellProcess:
    """`/bin/sh -c command` in a session of its own: stdin /dev/null, stdout and stderr to pipes.

    A session of its own makes the job its own process group, so a terminal's
    Ctrl-C never reaches it and killpg() ends all of it. posix_spawn (vfork and
    exec, in C) costs a third of subprocess.Popen per job; Popen stays for jobs
    with a cwd (posix_spawn cannot change directory) and where posix_spawn cannot
    start a session. Either way the job gets SIGPIPE and SIGXFSZ back at their
    defaults, as Popen gives them, and no fd of the worker's (see mark_fds_cloexec).
    (Under posix_spawn glibc leaves its two internal real-time signals ignored;
    programs that use them set their own handlers.)
    """

    def __init__(self, command, env, cwd):
        argv = ["/bin/sh", "-c", command]
        self.stdout_fd = self.stderr_fd = out_w = err_w = None
        self.popen = None
        self.returncode = None
        try:
            self.stdout_fd, out_w = os.pipe()
            self.stderr_fd, err_w = os.pipe()
            self.pid = spawn_session(argv, env, out_w, err_w) if cwd is None else None
            if self.pid is None:
                import subprocess
                self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                                              env=env, cwd=cwd, start_new_session=True)
                self.pid = self.popen.pid
        except BaseException:
            self.close_pipes()
            raise
        finally:
            for fd in (out_w, err_w):  # the child has its copies
                if fd is not None:
                    os.close(fd)

    def poll(self):
        """The exit status once the process ended (-N: killed by signal N), else None."""
        if self.returncode is None:
            if self.popen is not None:
                self.returncode = self.popen.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self):
        """Block until the process ends; its exit status."""
        if self.returncode is None:
            if self.popen is not None:
                self.returncode = self.popen.wait()
            else:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def close_pipes(self):
        """Close our ends of the output pipes (once)."""
        for fd in (self.stdout_fd, self.stderr_fd):
            if fd is not None:
                os.close(fd)
        self.stdout_fd = self.stderr_fd = None


def spawn_session(argv, env, stdout_fd, stderr_fd):
    """posix_spawn argv in a new session with stdin /dev/null; its pid, or None where unsupported."""
    if not hasattr(os, "posix_spawn"):
        return None
    null_fd = os.open(os.devnull, os.O_RDONLY)
    try:
        return os.posix_spawn(argv[0], argv, env, setsid=True, setsigmask=(),
                              setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                              file_actions=[(os.POSIX_SPAWN_DUP2, null_fd, 0),
                                            (os.POSIX_SPAWN_DUP2, stdout_fd, 1),
                                            (os.POSIX_SPAWN_DUP2, stderr_fd, 2)])
    except NotImplementedError:  # no POSIX_SPAWN_SETSID in this libc
        return None
    finally:
        os.close(null_fd)


def mark_fds_cloexec():
    """Mark every fd above 2 close-on-exec, so jobs started by posix_spawn inherit none of ours.

    Python and SQLite open their own fds close-on-exec already; this catches
    any the worker inherited (from a shell, or from the supervisor under fork).
    """
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = range(3, 256)
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # closed meanwhile (the listing's own fd)


def open_pidfd(pid):
    """A pidfd for pid (Linux 5.3+), or None where there is none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def drain(sock_or_fd):
    """Read and discard whatever is waiting on a non-blocking socket or fd."""
    fd = sock_or_fd if isinstance(sock_or_fd, int) else sock_or_fd.fileno()
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, InterruptedError, OSError):
        pass


# ---------------------------------------------------------------------------
# Workers: the loop in each worker process
# ---------------------------------------------------------------------------

class Worker:
    """One worker process: claim a due job, run it, record the result, repeat.

    Signals only set flags (the loop does the work): SIGTERM drains (finish the
    current job, then exit), SIGUSR1 aborts (stop the job, return it to pending
    uncounted, exit). SIGINT is the supervisor's business: a Ctrl-C at the
    terminal reaches the whole foreground group, and the supervisor decides.
    """

    def __init__(self, db_path, worker_id, supervisor_id, label, queues, job_pids, slot):
        self.db_path, self.worker_id, self.supervisor_id = db_path, worker_id, supervisor_id
        self.label, self.queues = label, list(queues)
        self.job_pids, self.slot = job_pids, slot
        self.is_draining = False
        self.is_aborting = False
        self.parent_pid = os.getppid()
        self.job = None

    # -- setup -------------------------------------------------------------

    def install_signals(self):
        """Flags for SIGTERM and SIGUSR1, a no-op SIGINT, and a wake-up fd for all of them."""
        import socket
        self.signal_r, signal_w = socket.socketpair()
        self.signal_r.setblocking(False)
        signal_w.setblocking(False)
        self._signal_w = signal_w  # keep it open for set_wakeup_fd
        signal.set_wakeup_fd(signal_w.fileno(), warn_on_full_buffer=False)
        # A Python handler, not SIG_IGN: ignored signals stay ignored in the
        # jobs we exec, handlers do not.
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        signal.signal(signal.SIGTERM, self._on_drain)
        signal.signal(signal.SIGHUP, lambda signum, frame: None)  # the supervisor decides
        signal.signal(signal.SIGUSR1, self._on_abort)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())  # the supervisor blocked them for the fork

    def _on_drain(self, signum, frame):
        self.is_draining = True

    def _on_abort(self, signum, frame):
        self.is_aborting = True

    # -- the loop ----------------------------------------------------------

    def run(self):
        """Work until drained, aborted or orphaned; return the process exit code."""
        import selectors
        self.install_signals()
        mark_fds_cloexec()
        self.conn = connect(self.db_path, durable=False)
        self.patience_s = busy_timeout_s()
        self.config = load_config(self.conn)
        self.wake_addr = self.conn.listen(self.worker_id)
        self.register(give_up_s=math.inf)  # a locked database at start is waited out too
        # What wakes us, each with what empties it: signals, and enqueue nudges.
        self.idle = selectors.PollSelector() if hasattr(selectors, "PollSelector") else selectors.DefaultSelector()
        self.idle.register(self.signal_r, selectors.EVENT_READ, drain)
        self.watched_wake = None
        self.watch_wake_source()
        self.claim_query = self.conn.claim_query(self.queues)
        # QUEUECTL_DB: so a job can call queuectl on this database itself.
        self.base_env = {**os.environ, "QUEUECTL_DB": db_for_children(self.db_path)}
        self.config_read_at = self.beat_at = time.monotonic()
        try:
            while not self.should_stop():
                job = self.next_job()
                if job is None:
                    self.wait_idle()
                elif self.should_stop():  # a stop signal landed during the claim: give it back
                    self.insist(give_back, job)
                else:
                    self.process(job)
        finally:
            try:
                self.db(unregister_process, self.worker_id)
            except StorageError as e:
                if not is_transient(e):
                    raise  # a stale row is pruned by the next reader
            self.conn.close()
        return 0

    def next_job(self):
        """Keep up, then claim a job; None if none is due, or the database stayed locked (we try again)."""
        try:
            self.keep_up()
            return self.db(claim, self.worker_id, self.claim_query, self.config["lease_timeout"])
        except StorageError as e:
            if not is_transient(e):
                raise
            log(f"{self.label} is waiting: {e}")
            return None

    def register(self, give_up_s=None):
        """Add (or add again) this worker to the registry, patient for give_up_s (default: self.patience_s)."""
        self.apply_patience()
        retry_busy(register_process, self.conn, self.worker_id, "worker", self.supervisor_id, self.queues,
                   self.wake_addr, give_up_s=self.patience_s if give_up_s is None else give_up_s,
                   is_wanted=lambda: not self.should_stop())

    def db(self, operation, *args):
        """operation(self.conn, *args), patient with a locked database for self.patience_s."""
        self.apply_patience()
        return retry_busy(operation, self.conn, *args, give_up_s=self.patience_s)

    def insist(self, operation, *args):
        """operation(self.conn, *args), retried past any lock for as long as it takes.

        For the writes that end a run we hold the lease of (its result, its
        return to pending): a lock held longer than the busy timeout (a huge
        enqueue, a purge of millions) is waited out, never a reason to lose a
        result and run the job again. A write that comes after the lease ran
        out is safe: the lease token fences it.
        """
        try:
            return self.db(operation, *args)
        except StorageError as e:
            if not is_transient(e):
                raise
            log(f"{self.label} is waiting to write job {self.job['id'] if self.job else '?'}: {e}")
        self.apply_patience()
        result = retry_busy(operation, self.conn, *args, give_up_s=math.inf)
        log(f"{self.label} could write again")
        return result

    def set_patience(self, seconds):
        """How long a database call may wait for a lock: short while a job runs (see watch).

        The connection is told at its next call (see db), not now: a job that
        ends before its first tick then costs no statement for it (two fewer
        per job, round trips on PostgreSQL).
        """
        self.patience_s = seconds

    def apply_patience(self):
        """Give the connection the lock wait set last, if it has another."""
        if self.conn.lock_wait_s != self.patience_s:
            self.conn.set_lock_wait(self.patience_s)

    def should_stop(self):
        """Stop claiming when told to, or when the supervisor is gone (we were orphaned)."""
        return self.is_draining or self.is_aborting or os.getppid() != self.parent_pid

    def keep_up(self):
        """Refresh config every poll_interval and beat every lease_timeout / 3, as they are set now."""
        now = time.monotonic()
        if now >= self.config_read_at + self.config["poll_interval"]:
            self.config = self.db(load_config)
            self.config_read_at = now
        if now >= self.beat_at + self.config["lease_timeout"] / 3:
            if self.db(heartbeat, self.worker_id) is None:
                self.register()
            self.beat_at = now

    def tick_s(self):
        """How often to look after a running job: every poll_interval, and thrice a lease at least."""
        return min(self.config["poll_interval"], self.config["lease_timeout"] / 3)

    def wait_idle(self):
        """Sleep up to poll_interval (and never past a heartbeat), or until an enqueue or a signal."""
        self.watch_wake_source()
        for key, _ in self.idle.select(self.tick_s()):
            if key.data(key.fileobj) is False:  # empty what woke us; False: a lost connection's
                self.idle.unregister(key.fileobj)
                self.watched_wake = None

    def watch_wake_source(self):
        """Select on the engine's current wake source (a PostgreSQL reconnect brings a new one)."""
        import selectors
        current = self.conn.wake_source()
        if current == self.watched_wake:
            return
        if self.watched_wake is not None:
            self.idle.unregister(self.watched_wake)
        if current is not None:
            self.idle.register(current, selectors.EVENT_READ, self.conn.drain_wakeups)
        self.watched_wake = current

    def wake_sources(self):
        """(selectable, empty) pairs that wake a running job's loop: signals, enqueue nudges."""
        sources = [(self.signal_r, drain)]
        if self.watched_wake is not None:
            sources.append((self.watched_wake, self.conn.drain_wakeups))
        return sources

    # -- one job -----------------------------------------------------------

    def process(self, job):
        """Run one claimed job and record how it ended."""
        self.job = job
        log(f"{self.label} job {job['id']} started (attempt {job['attempts']} of "
            f"{job['max_retries'] + 1}): {one_line(job['command'])}")
        run = CommandRun(job["command"], self.job_env(job), job["cwd"], job["timeout_s"],
                         self.config["output_limit"])
        spawn_error = run.start()
        if spawn_error:
            result = RunResult(error=spawn_error)
        else:
            self.job_pids[self.slot] = run.proc.pid  # so the supervisor can end it if we die
            self.lease_renewed_at = job["claimed_at"]
            run.fence_at = self.fence_at(job["claimed_at"])
            self.set_patience(min(0.2, self.config["lease_timeout"] / 10))  # a tick never blocks past the fence
            if self.conn.CALLS_CAN_HANG:
                run.watch_the_fence()
            try:
                result = run.wait(self.tick_s(), lambda: self.watch(run), self.wake_sources(), self.flush_output)
            finally:
                self.set_patience(busy_timeout_s())
            self.job_pids[self.slot] = 0
        self.record(job, result)
        self.job = None

    def job_env(self, job):
        """The worker's environment, the job's env, and QUEUECTL_JOB_ID / _ATTEMPT / _DB."""
        env = dict(self.base_env)  # a copy of a plain dict: far cheaper than os.environ per job
        if job["env"] != "{}":
            env.update(json.loads(job["env"]))
        env["QUEUECTL_JOB_ID"] = job["id"]
        env["QUEUECTL_ATTEMPT"] = str(job["attempts"])
        return env

    def watch(self, run):
        """Each tick of a running job: obey signals, renew the lease, notice a cancel.

        Returns the seconds to the next tick, from the config as it is now:
        a lease_timeout lowered while the job runs is renewed in time.
        """
        if self.is_aborting:
            run.stop(FORCED_SHUTDOWN, ABORT_GRACE_S)
        else:
            self.look_after(run)
        return self.tick_s()

    def look_after(self, run):
        """Renew the lease when it is due, see where the run stands, and stop it if it must end."""
        try:
            self.keep_up()
            self.renew_when_due(run)
            standing = self.db(run_standing, self.job)
        except StorageError as e:
            if not is_transient(e):
                raise
            # The lease still has time (run.fence_at kills the job before it
            # runs out); the next tick tries again.
            log(f"{self.label} could not reach the database for job {self.job['id']}: {e}; will try again")
            return
        if standing == "stopping":  # canceled: SIGTERM, SIGKILL 5 s later
            run.stop("canceled", KILL_GRACE_S)
        elif standing == "lost":  # another run may have started: this one ends now
            run.stop(TAKEN_OVER, 0)

    def flush_output(self, stdout, stderr):
        """Write the running job's output so far, for `logs -f`; False if the database said not now."""
        try:
            self.db(flush_output, self.job, stdout, stderr)
            return True
        except StorageError as e:
            if not is_transient(e):
                raise
            return False  # the next flush, or the result, writes it

    def renew_when_due(self, run):
        """Renew the lease every lease_timeout / 3; the fence moves only with a lease granted."""
        lease_s = self.config["lease_timeout"]
        if time.monotonic() - self.lease_renewed_at < lease_s / 3:
            return
        asked_at = time.monotonic()  # the new lease counts from the asking, not the answer
        if self.db(renew_lease, self.job, lease_s):
            self.lease_renewed_at = asked_at
            run.fence_at = self.fence_at(asked_at)

    def fence_at(self, leased_at):
        """When to kill our job: before a lease taken at leased_at (monotonic) can pass to another worker."""
        lease_s = self.config["lease_timeout"]
        return leased_at + lease_s - min(1.0, lease_s / 4)

    def record(self, job, result):
        """Write the result (fenced by the lease token) and log it."""
        if result.stop_reason == FORCED_SHUTDOWN:
            if self.insist(return_job_uncounted, job, result):
                log(f"{self.label} job {job['id']} interrupted; returned to pending uncounted")
            return
        state = self.insist(record_run, job, result, self.config)
        log(f"{self.label} job {job['id']} " + describe_outcome(job, result, state, self.config))


def describe_outcome(job, result, state, config):
    """The log line's tail for a finished run."""
    took = f"{result.duration_s:.3f} s"
    if state is None:
        return f"stopped ({result.error}); nothing recorded: the job is no longer ours"
    if state == "completed":
        return f"completed in {took}"
    if state == "failed":
        wait = seconds_text(backoff_s(job["attempts"], config))
        return f"failed after {took}: {result.error}; retry {job['attempts']} of {job['max_retries']} in {wait}"
    return f"dead after {job['attempts']} attempt(s): {result.error}"


def worker_main(db_path, worker_id, supervisor_id, label, queues, job_pids, slot):
    """Worker process entry point: plain arguments, so fork, spawn and forkserver all work."""
    try:
        code = Worker(db_path, worker_id, supervisor_id, label, queues, job_pids, slot).run()
    except Exception as e:  # one log line, never a traceback; the supervisor decides what next
        if os.environ.get("QUEUECTL_DEBUG") == "1":
            raise
        if isinstance(e, StorageError):
            log(f"{label} stopped: {e}")
        else:
            log(f"{label} crashed: {e!r}")
        # Replacing a worker of a corrupt database would only run jobs whose results cannot be kept.
        code = WORKER_EXIT_CORRUPT if is_corrupt(e) else 1
    sys.exit(code)


# ---------------------------------------------------------------------------
# Supervisors' upkeep: retention and hooks
# ---------------------------------------------------------------------------
#
# Every running supervisor, on every host, deletes finished jobs past their
# keep_* time a batch at a time, and runs the hooks of failed runs and dead
# jobs, each event's hook exactly once whatever the number of supervisors.

RETENTION_EVERY_S = 10.0  # how often a supervisor looks for jobs past their keep_* time (sooner while it finds many)
RETENTION_LOCK_S = 0.1  # the longest a retention batch should hold the lock; slower batches are halved
HOOK_SLOTS = 4  # hooks one supervisor runs at once

# The oldest jobs of one end state finished before a time, through
# jobs_finished (its WHERE written out whole: SQLite uses a partial index only
# for a query that repeats its terms); rows another supervisor is deleting
# are passed over.
EXPIRED_JOBS_SQL = """
SELECT id, seq FROM jobs
WHERE state IN ('completed', 'dead')
  AND state = '{state}'
  AND finished_at < ?
ORDER BY state, finished_at
LIMIT {batch}
{locking}
"""


def apply_retention(conn, config, batch=PURGE_BATCH, now=None):
    """Delete a batch of the completed and of the dead jobs kept past keep_completed and keep_dead.

    Returns {state: jobs deleted}. One short transaction per state, through
    jobs_finished: jobs still kept and live jobs are never walked. Waiting
    hook events of hooks no longer set are dropped too.
    """
    now = conn.now() if now is None else now
    deleted = {}
    for state, key in (("completed", "keep_completed"), ("dead", "keep_dead")):
        keep_s = kept_s(config, key)
        if keep_s != math.inf:
            select = EXPIRED_JOBS_SQL.format(state=state, batch=batch, locking=conn.SKIP_LOCKED)
            deleted[state] = delete_batch(conn, select, [now - keep_s])
    unset = [hook for hook in HOOKS if not config[hook]]
    if unset:
        conn.execute(f"DELETE FROM hook_events WHERE taken_by IS NULL AND hook IN ({', '.join('?' for _ in unset)})",
                     unset)
    # Events taken by a supervisor that is gone (killed): never taken again, so nobody else deletes them.
    conn.execute("DELETE FROM hook_events WHERE taken_by IS NOT NULL AND taken_by NOT IN (SELECT id FROM workers)")
    return deleted


NEXT_HOOK_EVENT_SQL = """
SELECT seq, hook, job_id, queue, attempt, exit_code, error
FROM hook_events
WHERE taken_by IS NULL
  {only_ours}
ORDER BY seq
LIMIT 1
"""
OUR_WORKERS_SQL = "AND substr(worker_id, 1, :prefix_length) = :prefix"  # a worker's id starts with its supervisor's


def take_hook_event(conn, owner, only_ours=False):
    """The oldest hook event no supervisor has taken, now ours; None if there is none.

    Taken in a transaction of its own (another claimer's row is passed over),
    so one supervisor of all runs each event's hook. only_ours: just the
    events of runs of owner's own workers (a supervisor that is stopping).
    Nothing to take costs one read that takes no lock.
    """
    select = NEXT_HOOK_EVENT_SQL.format(only_ours=OUR_WORKERS_SQL if only_ours else "")
    params = {"owner": owner, "prefix": owner + ".", "prefix_length": len(owner) + 1}
    if conn.execute(select, params).fetchone() is None:
        return None
    with conn.transaction():
        event = conn.execute(select + conn.SKIP_LOCKED, params).fetchone()
        if event is not None:
            conn.execute("UPDATE hook_events SET taken_by = :owner WHERE seq = :seq", {**params, "seq": event["seq"]})
        return event


class Hooks:
    """The hooks one supervisor runs: on_failure after a failed run, on_dead when a job dies.

    Each is `/bin/sh -c HOOK` in a session of its own, with the event in its
    environment and its output in the supervisor's log, killed (its whole
    group) after hook_timeout. The supervisor's loop only starts and polls
    them (a hook's exit wakes it: waitables), so a hook that hangs or fails
    holds up nothing but its own slot. Exactly once: an event is taken by
    one supervisor (take_hook_event) and deleted when its hook has ended,
    however it ended, and never taken again. A supervisor killed while a hook
    runs leaves the hook running (its own session) and the event taken; one
    killed between taking an event and starting its hook loses that event's
    hook (a window of a few statements).
    """

    def __init__(self, owner, db_path):
        self.owner = owner
        self.base_env = {**os.environ, "QUEUECTL_DB": db_for_children(db_path)}
        self.running = {}  # event seq -> (process, its pidfd or None, deadline (monotonic), what, for the log)
        self.ended = []  # event seqs whose hooks ended, their rows still to delete

    def waitables(self):
        """The running hooks' pidfds: readable when a hook exits (Linux; elsewhere the tick finds it)."""
        return [pidfd for _, pidfd, _, _ in self.running.values() if pidfd is not None]

    def poll(self):
        """End the hooks that exited, and kill those past their deadline; no database needed."""
        for seq, (process, _, deadline, _) in list(self.running.items()):
            code = process.poll()
            if code is None and time.monotonic() < deadline:
                continue
            if code is None:
                self.end(seq, "did not end in time: killed")
            else:
                self.end(seq, f"failed: {exit_error(code)}" if code else "done")

    def end(self, seq, how):
        """A hook is over (killed first if it still runs): log how, and mark its event to be deleted."""
        process, pidfd, _, what = self.running.pop(seq)
        if process.poll() is None:
            kill_group(process.pid, signal.SIGKILL)
            process.wait()
        if pidfd is not None:
            os.close(pidfd)
        log(f"{what} {how}")
        self.ended.append(seq)

    def forget_ended(self, conn):
        """Delete the events of the hooks that ended."""
        while self.ended:
            conn.execute("DELETE FROM hook_events WHERE seq = ? AND taken_by = ?", (self.ended[0], self.owner))
            self.ended.pop(0)

    def take_and_start(self, conn, config, only_ours=False):
        """Forget the ended hooks' events, then start hooks for new events while there are free slots."""
        self.forget_ended(conn)
        if not any(config[hook] for hook in HOOKS):
            return
        while len(self.running) < HOOK_SLOTS:
            event = take_hook_event(conn, self.owner, only_ours)
            if event is None or not self.start(conn, event, config):
                return

    def start(self, conn, event, config):
        """Start the hook of one taken event; False if it could not start (the event is given back)."""
        import subprocess
        command = config[event["hook"]] or load_config(conn)[event["hook"]]  # set since our last read?
        what = f"hook {event['hook']} of job {event['job_id']} (attempt {event['attempt']})"
        if not command:  # unset since the event: dropped
            self.ended.append(event["seq"])
            return True
        env = dict(self.base_env, QUEUECTL_HOOK=event["hook"], QUEUECTL_JOB_ID=event["job_id"],
                   QUEUECTL_QUEUE=event["queue"], QUEUECTL_ATTEMPT=str(event["attempt"]),
                   QUEUECTL_EXIT_CODE="" if event["exit_code"] is None else str(event["exit_code"]),
                   QUEUECTL_ERROR=event["error"] or "")
        try:
            process = subprocess.Popen(["/bin/sh", "-c", command], env=env, stdin=subprocess.DEVNULL,
                                       stdout=2, start_new_session=True)
        except OSError as e:  # EAGAIN, say: given back, for the next tick or another supervisor
            log(f"{what} could not start: {e.strerror or e}; will try again")
            conn.execute("UPDATE hook_events SET taken_by = NULL WHERE seq = ?", (event["seq"],))
            return False
        self.running[event["seq"]] = (process, open_pidfd(process.pid),
                                      time.monotonic() + config["hook_timeout"], what)
        return True

    def kill_all(self):
        """A forced shutdown: kill the hooks still running (their events are not run again)."""
        for seq in list(self.running):
            self.end(seq, "killed: forced shutdown")


# ---------------------------------------------------------------------------
# Workers: the supervisor
# ---------------------------------------------------------------------------

class Supervisor:
    """Starts N worker processes, replaces any that die, and owns the signals.

    First SIGTERM/SIGINT (or `worker stop`): stop claiming, let running jobs
    finish and be recorded, exit 0. Second: abort the running jobs, return them
    to pending uncounted, exit 128 + the signal at once.
    """

    def __init__(self, db_path, count, queues, is_burst, start_method=None):
        import multiprocessing
        self.db_path, self.count, self.queues, self.is_burst = db_path, count, list(queues), is_burst
        self.mp = multiprocessing.get_context(start_method)
        self.job_pids = self.mp.RawArray("q", count)  # each slot's running job pid, or 0
        self.supervisor_id = f"{HOST}:{os.getpid()}:{os.urandom(3).hex()}"
        self.workers = {}  # slot -> (process, worker_id)
        self.started = 0
        self.signals_seen = 0
        self.is_stopping = False
        self.exit_code = 0
        self.restart_at = [0.0] * count
        self.stop_requested = False
        self.pending_signal = None
        self.fatal_error = None  # set when the database turned out corrupt
        self.config = None  # as read at the last beat
        self.hooks = Hooks(self.supervisor_id, db_path)
        self.retention_at = 0.0  # when to look for jobs past their keep_* time next (monotonic)
        self.retention_batch = PURGE_BATCH  # jobs a retention transaction deletes (smaller while they are slow)

    def run(self):
        """Supervise until stopped; return the exit code."""
        import multiprocessing.connection
        self.conn = connect(self.db_path, durable=False)
        self.install_signals()
        self.register()
        self.running_since = self.conn.now()  # schedules' ticks before this were missed (see fire_due_schedules)
        scope = ", ".join(self.queues) or "all queues"
        log(f"supervisor {os.getpid()} started {self.count} worker(s) on {scope}, db {self.conn.path}")
        self.next_beat = 0.0
        try:
            while self.workers or self.hooks.running or not self.is_stopping:
                if not self.is_stopping:
                    self.fill_pool()
                waitables = [p.sentinel for p, _ in self.workers.values()] + [self.signal_r, *self.hooks.waitables()]
                multiprocessing.connection.wait(waitables, timeout=SUPERVISOR_TICK_S)
                drain(self.signal_r)
                self.hooks.poll()  # before upkeep: a hook past its time is killed even while the database fails
                self.upkeep()
        except BaseException:
            self.stop_workers_now()  # never leave workers behind us
            raise
        finally:
            if self.conn is not None:  # None only while reopening it after a fork fails
                with suppress(StorageError):  # if not now, apply_retention deletes the events of a gone supervisor
                    retry_busy(self.hooks.forget_ended, self.conn)
                with suppress(StorageError):  # a stale row is pruned by the next reader
                    retry_busy(unregister_process, self.conn, self.supervisor_id)
                self.conn.close()
        log(f"supervisor {os.getpid()} stopped")
        if self.fatal_error:
            raise QueueError(self.fatal_error)
        return self.exit_code

    def register(self):
        """Add (or add again) this supervisor to the registry."""
        retry_busy(functools.partial(register_process, fires_schedules=not self.is_burst and not self.is_stopping),
                   self.conn, self.supervisor_id, "supervisor", None, self.queues)

    # -- signals -----------------------------------------------------------

    def install_signals(self):
        """SIGTERM/SIGINT count toward stop and abort; SIGUSR1 (from `worker stop`) just stops."""
        import socket
        self.signal_r, self._signal_w = socket.socketpair()
        self.signal_r.setblocking(False)
        self._signal_w.setblocking(False)
        signal.set_wakeup_fd(self._signal_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # under nohup it stays ignored
            signal.signal(signal.SIGHUP, self._on_signal)  # the terminal closed: like SIGTERM
        signal.signal(signal.SIGUSR1, self._on_stop_request)

    def _on_signal(self, signum, frame):
        # Handlers only record; the loop acts (signal safety).
        self.pending_signal = signum
        self.signals_seen += 1

    def _on_stop_request(self, signum, frame):
        self.stop_requested = True

    # -- the pool ----------------------------------------------------------

    def fill_pool(self):
        """Start a worker in every empty slot (a slot whose worker died waits a moment).

        Our connection is closed across the forks: a forked child must not
        inherit SQLite's in-process lock records, or it would never take file
        locks of its own, and the next process to open the database could
        think itself the last one and delete the WAL under the worker.
        """
        now = time.monotonic()
        empty = [slot for slot in range(self.count) if slot not in self.workers and now >= self.restart_at[slot]]
        if not empty:
            return
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        try:
            for slot in empty:
                self.start_worker(slot)
                self.restart_at[slot] = now + 1.0  # a worker that dies at once is not restarted in a loop
        finally:
            self.reopen()

    def reopen(self):
        """Open our connection again; if that fails (EMFILE, say), log it: upkeep tries again."""
        try:
            self.conn = connect(self.db_path, durable=False)
        except QueueError as e:
            log(f"supervisor could not reopen the database: {e}; will try again")

    def start_worker(self, slot):
        """Start the worker process of one slot; one that cannot start (EAGAIN) is tried again later."""
        self.started += 1
        worker_id = f"{self.supervisor_id}.{self.started}"
        label = f"worker {slot + 1}"
        process = self.mp.Process(
            target=worker_main, name=f"queuectl-{label.replace(' ', '-')}",
            args=(self.db_path, worker_id, self.supervisor_id, label, self.queues, self.job_pids, slot))
        # Block the stop signals across the fork: the child must not run our
        # handlers before it installs its own (it unblocks them then).
        blocked = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            process.start()
        except OSError as e:  # the other workers and their jobs go on
            log(f"could not start {label}: {e.strerror or e}; trying again in 1 s")
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.workers[slot] = (process, worker_id)

    def collect_exited(self):
        """Forget workers that exited; a death while not stopping is logged and its job recovered."""
        for slot, (process, worker_id) in list(self.workers.items()):
            if process.exitcode is None:
                continue
            process.join()
            del self.workers[slot]
            if process.exitcode == WORKER_EXIT_CORRUPT:
                job_pid, self.job_pids[slot] = self.job_pids[slot], 0
                if job_pid:
                    kill_group(job_pid, signal.SIGKILL)
                self.fatal_error = f"database '{self.db_path}' is corrupt; restore it from a backup"
                self.begin_stop("the database is corrupt")
            elif process.exitcode != 0 or not self.is_stopping:
                self.recover(slot, process, worker_id)

    def recover(self, slot, process, worker_id):
        """A worker died: end its orphaned job, return that job to the retry rules, drop its row."""
        how = f"signal {signal_name(-process.exitcode)}" if process.exitcode < 0 else f"exit {process.exitcode}"
        job_pid, self.job_pids[slot] = self.job_pids[slot], 0
        if job_pid:
            kill_group(job_pid, signal.SIGKILL)
        settled = retry_busy(fail_lost_jobs, self.conn, "worker_id = :worker_id", {"worker_id": worker_id},
                             f"worker lost: process {process.pid} died ({how})")
        for job in self.conn.execute(JOBS_OF_WORKER_SQL, {"worker_id": worker_id}).fetchall():
            retry_busy(release_run_of_killed_worker, self.conn, job)  # canceled runs it was stopping
        retry_busy(unregister_process, self.conn, worker_id)
        jobs = ", ".join(f"job {job_id} is now {state}" for job_id, state in settled)
        log(f"worker {slot + 1} (pid {process.pid}) died ({how})" + (f"; {jobs}" if jobs else "")
            + ("" if self.is_stopping else "; starting a replacement"))

    # -- upkeep ------------------------------------------------------------

    def upkeep(self):
        """Collect exited workers, then maintain(); a locked database only postpones it.

        Workers keep their own leases, so the supervisor has no reason to die on
        a lock: a dead worker's job it could not return yet is reaped when its
        lease runs out.
        """
        if self.conn is None:
            self.reopen()
            if self.conn is None:
                return
        try:
            self.collect_exited()
            self.maintain()
        except StorageError as e:
            if not is_transient(e):
                raise
            log(f"supervisor: {e}; will try again")

    def maintain(self):
        """Each tick: act on signals and stop requests, beat, reap lost leases, end a burst."""
        self.act_on_signals()
        now = time.monotonic()
        if now >= self.next_beat:
            config = retry_busy(load_config, self.conn)
            stop_requested = retry_busy(heartbeat, self.conn, self.supervisor_id)
            if stop_requested is None:
                self.register()
            self.stop_requested = self.stop_requested or bool(stop_requested)
            for job_id, state in retry_busy(reap_expired_leases, self.conn):
                log(f"job {job_id} lost its worker (lease expired); it is now {state}")
            retry_busy(fold_counts, self.conn)
            self.next_beat = now + min(config["lease_timeout"] / 3, 1.0)
            self.config = config
            if now >= self.retention_at:
                self.apply_retention(config)
        if self.config is not None:  # stopping, it takes only its own workers' events: a backlog is others'
            retry_busy(self.hooks.take_and_start, self.conn, self.config, self.is_stopping)
        if self.stop_requested:
            self.stop_requested = False
            self.begin_stop("asked to stop")
        if self.is_burst and not self.is_stopping and self.queue_is_empty():
            self.begin_stop("burst done: no pending, failed or processing jobs left")
        if not self.is_burst and not self.is_stopping:
            self.fire_schedules()

    def apply_retention(self, config):
        """Delete a batch of jobs past their keep_* time; look again at once while batches come full.

        A batch that held the lock longer than RETENTION_LOCK_S (jobs with
        many runs of large output) halves the next one; quick ones let it
        grow back to PURGE_BATCH.
        """
        started = time.monotonic()
        deleted = retry_busy(apply_retention, self.conn, config, self.retention_batch)
        took_s = time.monotonic() - started
        for state, count in deleted.items():
            if count:
                log(f"retention: deleted {count} {state} job(s) finished more than {config['keep_' + state]} ago")
        is_more = any(count == self.retention_batch for count in deleted.values())
        if took_s > RETENTION_LOCK_S:
            self.retention_batch = max(self.retention_batch // 2, 1)
        elif took_s < RETENTION_LOCK_S / 4:
            self.retention_batch = min(self.retention_batch * 2, PURGE_BATCH)
        self.retention_at = time.monotonic() + (0 if is_more else RETENTION_EVERY_S)

    def fire_schedules(self):
        """Make the jobs of the schedules' ticks that came, and wake the workers for them."""
        made = fire_due_schedules(self.conn, self.running_since)
        for job_id in made:
            log(f"schedule fired job {job_id}")
        if made:
            self.conn.wake_workers()

    def act_on_signals(self):
        """First stop signal: drain. Second: abort."""
        if self.signals_seen == 1 and not self.is_stopping:
            self.begin_stop(f"received {signal_name(self.pending_signal)}")
        elif self.signals_seen >= 2 and self.exit_code == 0:
            self.abort(self.pending_signal)

    def queue_is_empty(self):
        """Whether no job of our queues is processing, or pending or failed outside a paused queue."""
        paused = [queue for queue, (is_paused, _) in queue_settings(self.conn).items() if is_paused]
        return not self.conn.has_work(self.queues, paused)

    def begin_stop(self, why):
        """Stop claiming: each worker finishes its job, records it and exits."""
        if self.is_stopping:
            return
        self.is_stopping = True
        if self.conn is not None:
            try:  # it fires schedules no more: their ticks from now on may be missed ones
                self.conn.execute("UPDATE workers SET fires_schedules = 0 WHERE id = ?", (self.supervisor_id,))
            except StorageError as e:
                log(f"supervisor: {e}; others may count it as firing schedules until it exits")
        busy = sum(1 for pid in self.job_pids if pid)
        log(f"supervisor stopping ({why}); waiting for {busy} running job(s); "
            "a second Ctrl-C or SIGTERM aborts them")
        for process, _ in self.workers.values():
            kill_process(process.pid, signal.SIGTERM)

    def abort(self, signum):
        """Stop running jobs now, return them to pending uncounted, and exit."""
        self.is_stopping = True
        self.exit_code = 128 + signum
        log("supervisor aborting: stopping running jobs and returning them to pending")
        self.stop_workers_now()
        self.hooks.kill_all()

    def stop_workers_now(self):
        """Abort the workers (SIGUSR1); kill any still there after the grace, and their jobs."""
        for process, _ in self.workers.values():
            kill_process(process.pid, signal.SIGUSR1)
        deadline = time.monotonic() + ABORT_GRACE_S + 2.0
        for process, _ in self.workers.values():
            process.join(max(deadline - time.monotonic(), 0))
        for slot, (process, worker_id) in list(self.workers.items()):
            if process.exitcode is None:  # stuck: finish it off and return its job ourselves
                process.kill()
                process.join()
                self.return_jobs_of(slot, worker_id)
            del self.workers[slot]

    def return_jobs_of(self, slot, worker_id):
        """Kill a killed worker's job group and put its job back to pending uncounted (if the db lets us)."""
        if self.job_pids[slot]:
            kill_group(self.job_pids[slot], signal.SIGKILL)
        if self.conn is None:  # reopening it after a fork failed: its lease expires instead
            return
        try:
            for job in self.conn.execute(JOBS_OF_WORKER_SQL, {"worker_id": worker_id}).fetchall():
                if job["state"] == "processing":
                    retry_busy(return_job_uncounted, self.conn, job)
                else:  # canceled, its run being stopped: the run is over now
                    retry_busy(release_run_of_killed_worker, self.conn, job)
        except StorageError as e:  # its lease expires instead
            log(f"could not return the job of a killed worker: {e}")

# The jobs whose runs a worker held: processing, or canceled and being stopped.
JOBS_OF_WORKER_SQL = """
SELECT seq, state, lease_token, last_run, attempts, worker_id, run_host, started_at
FROM jobs
WHERE lease_token IS NOT NULL
  AND worker_id = :worker_id
"""


def release_run_of_killed_worker(conn, job):
    """End the canceled run a killed worker was stopping, so a retry need not wait for its lease."""
    with conn.transaction():
        release_stopped_run(conn, job, RunResult(), conn.now())


def kill_process(pid, signum):
    """Signal one process that may already be gone."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------
# CLI: output helpers
# ---------------------------------------------------------------------------

def print_json(document):
    """Exactly one JSON document on stdout."""
    print(json.dumps(document, indent=2))


def print_table(headers, rows):
    """Rows as aligned columns under headers."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    for row in (headers, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def write_raw(data):
    """Bytes (or text, as UTF-8) to stdout whatever the locale: what a job printed, for piping."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text-only stream (the demo's, the tests')
        return sys.stdout.write(data if isinstance(data, str) else data.decode("utf-8", "replace"))
    sys.stdout.flush()
    buffer.write(data.encode("utf-8") if isinstance(data, str) else data)
    buffer.flush()


def short_time(ts):
    """A timestamp for tables: ISO-8601 UTC to the second, or '-'."""
    return iso(ts)[:19] + "Z" if ts is not None else "-"


def open_db(args):
    """The connection for a command that changes or reads jobs (enqueues are fsynced)."""
    return connect(args.db_path)


def open_db_reaped(args):
    """A connection for a reading command, after returning jobs of lost workers to the retry rules."""
    conn = open_db(args)
    reap_if_possible(conn)
    return conn


def reap_if_possible(conn):
    """Reap expired leases, unless the database is busy or read-only: reading must still work, at once."""
    if_possible(conn, reap_expired_leases)


# ---------------------------------------------------------------------------
# CLI: commands
# ---------------------------------------------------------------------------

def cmd_init(args):
    """Create the database if missing and say where it is."""
    with closing(open_db(args)) as conn:
        print(f"database {conn.location} is ready (schema {SCHEMA_VERSION})")


def read_jobs_input(args):
    """The jobs to enqueue as [(line number or None, object)] from JSON, -c or -f."""
    given = [args.job is not None, args.command is not None, args.file is not None]
    if sum(given) != 1:
        raise UsageError("give exactly one job source: a JSON argument, -c COMMAND or -f FILE")
    flags = {"--id": args.id, "--max-retries": args.max_retries, "--timeout": args.timeout,
             "--priority": args.priority, "--queue": args.queue, "--run-at": args.run_at,
             "--delay": args.delay, "--after": args.after}
    stray = [flag for flag, value in flags.items() if value is not None]
    if stray and args.command is None:
        raise UsageError(f"{stray[0]} goes with -c COMMAND; put the field in the JSON instead")
    if args.command is not None:
        return [(None, job_from_flags(args))]
    if args.job is not None:
        return [(None, parse_json_text(args.job, "the job"))]
    return parse_json_lines(read_input_file(args.file))


def job_from_flags(args):
    """The job object that `enqueue -c COMMAND [flags]` describes."""
    spec = {"command": args.command}
    for field, value in (("id", args.id), ("max_retries", args.max_retries), ("timeout", args.timeout),
                         ("priority", args.priority), ("queue", args.queue), ("delay", args.delay),
                         ("depends_on", args.after), ("run_at", args.run_at)):
        if value is not None:
            spec[field] = value
    return spec


def parse_json_text(text, what):
    """json.loads with a one-line error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} is not valid JSON: {e.msg} at column {e.colno}") from None
    except ValueError:  # an integer of more than 4300 digits
        raise UsageError(f"{what} has a number too long to read") from None
    except RecursionError:
        raise UsageError(f"{what} is nested too deeply") from None


def read_input_file(path):
    """The bytes of a JSON Lines file, or of stdin for '-'."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"cannot read '{path}': {e.strerror}") from None


def parse_json_lines(data):
    """[(line number, object)] for the non-blank lines of a JSON Lines file."""
    jobs = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"line {number}: not UTF-8 text") from None
        if line.strip():
            jobs.append((number, parse_json_text(line, f"line {number}")))
    return jobs


def cmd_enqueue(args):
    """Add jobs; print each new id on its own line."""
    specs = read_jobs_input(args)
    with closing(open_db(args)) as conn:
        config = load_config(conn)
        now = conn.now()
        rows, lines = [], {}
        for number, spec in specs:
            try:
                row = job_row(spec, config, now)
            except QueueError as e:
                raise type(e)(f"line {number}: {e}" if number else str(e)) from None
            rows.append(row)
            lines[id(row)] = number
        ids = enqueue_rows(conn, rows, if_absent=args.if_absent,
                           lines=lines if specs and specs[0][0] is not None else None)
        if ids:
            conn.wake_workers()
    if ids:
        sys.stdout.write("\n".join(ids) + "\n")


def cmd_worker_start(args):
    """Run a supervisor and its workers in the foreground (or detached)."""
    if not 1 <= args.count <= 256:
        raise UsageError(f"--count must be from 1 to 256, got {args.count}")
    for queue in args.queue or []:
        if not QUEUE_RE.fullmatch(queue):
            raise UsageError(f"--queue must be 1-64 characters of A-Z a-z 0-9 . _ -, got '{queue}'")
    if not hasattr(signal, "SIGUSR1"):
        raise QueueError("worker start needs Linux or macOS: workers and jobs are run with POSIX "
                         "signals and process groups")
    with closing(open_db(args)):
        pass  # create and migrate once here, not in every worker at the same time
    if not is_postgres_url(args.db_path):
        refuse_unsafe_db(args.db_path)
    if args.detach:
        return detach(args)
    return Supervisor(args.db_path, args.count, args.queue or [], args.burst, args.start_method).run()


def refuse_unsafe_db(path):
    """A database others can write could make us run their commands: refuse it."""
    import stat
    if os.name == "nt":  # no POSIX mode bits: the file's ACL is the user's to set
        return
    mode = os.stat(path).st_mode
    if mode & stat.S_IWOTH:
        raise QueueError(f"database '{path}' is writable by other users (mode {stat.filemode(mode)}); "
                         f"its jobs run as shell commands, so fix it first: chmod 600 '{path}'")


def detach(args):
    """Start the same supervisor in its own session, logging to <db>.log; print its pid."""
    import subprocess
    log_path = log_path_for(args.db_path)
    # The database goes in the environment, not argv: a PostgreSQL URL's password
    # would show in every user's `ps`.
    env = {**os.environ, "QUEUECTL_DB": args.db_path}
    argv = [sys.executable, os.path.abspath(__file__), "worker", "start", "--count", str(args.count)]
    for queue in args.queue or []:
        argv += ["--queue", queue]
    argv += ["--burst"] if args.burst else []
    argv += ["--start-method", args.start_method] if args.start_method else []
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                start_new_session=True, env=env)
    finally:
        os.close(log_fd)
    with closing(open_db(args)) as conn:
        wait_for_supervisor(conn, proc, log_path)
    print(proc.pid)


def wait_for_supervisor(conn, proc, log_path, timeout_s=10.0):
    """Wait until a detached supervisor has registered; fail if it exited first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if conn.execute("SELECT 1 FROM workers WHERE kind = 'supervisor' AND pid = ? AND host = ?",
                        (proc.pid, HOST)).fetchone():
            return
        if proc.poll() is not None:
            raise QueueError(f"the detached worker exited at once (status {proc.returncode}); see {log_path}")
        time.sleep(0.02)
    raise QueueError(f"the detached worker (pid {proc.pid}) did not start within {seconds_text(timeout_s)}; "
                     f"see {log_path}")


def cmd_worker_stop(args):
    """Ask every live supervisor of this database to stop gracefully, and wait for them."""
    if not args.timeout >= 0:  # written so that NaN fails too
        raise UsageError(f"--timeout must be 0 or more, got {args.timeout}")
    with closing(open_db(args)) as conn:
        supervisors = [p for p in live_processes(conn) if p["kind"] == "supervisor"]
        if not supervisors:
            print("no supervisor is running")
            return 0
        with conn.transaction():
            conn.executemany("UPDATE workers SET stop_requested = 1 WHERE id = ?",
                             [(p["id"],) for p in supervisors])
        for p in supervisors:
            if p["host"] == HOST and hasattr(signal, "SIGUSR1"):
                kill_process(p["pid"], signal.SIGUSR1)  # wakes it now; the flag works across hosts
        remaining = wait_for_exit(conn, supervisors, args.timeout)
    stopped = len(supervisors) - len(remaining)
    print(f"stopped {stopped} supervisor(s)")
    if remaining:
        pids = ", ".join(str(p["pid"]) for p in remaining)
        raise QueueError(f"{len(remaining)} supervisor(s) still running after {seconds_text(args.timeout)} "
                         f"(pid {pids}); their jobs are still finishing")
    return 0


def wait_for_exit(conn, supervisors, timeout_s):
    """Poll until the supervisors' registry rows are gone; return those still there."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive_ids = {p["id"] for p in live_processes(conn)}
        remaining = [p for p in supervisors if p["id"] in alive_ids]
        if not remaining or time.monotonic() >= deadline:
            return remaining
        time.sleep(0.05)


def cmd_worker_list(args):
    """The live supervisors and workers, with pid, start time and current job."""
    with closing(open_db(args)) as conn:
        processes = live_processes(conn)
    if args.json:
        return print_json(processes)
    if not processes:
        return print("no workers are running")
    print_table(("KIND", "PID", "HOST", "STARTED", "CURRENT JOB", "ID"),
                [(p["kind"], p["pid"], p["host"], p["started_at"][:19] + "Z", p["current_job"] or "-", p["id"])
                 for p in processes])


def cmd_status(args):
    """Counts per state, live workers, and the oldest runnable job's age."""
    with closing(open_db_reaped(args)) as conn:
        processes = live_processes(conn)
        status = status_json(conn, processes)
    supervisors = sum(1 for p in processes if p["kind"] == "supervisor")
    if args.json:
        return print_json(status)
    counts, workers, age_s = status["jobs"], status["workers"], status["oldest_runnable_age_s"]
    print_table(("STATE", "JOBS"), list(counts.items()))
    busy = sum(1 for w in workers if w["current_job"])
    print(f"\nworkers: {len(workers)} alive ({busy} busy) under {supervisors} supervisor(s)")
    print("oldest runnable job: " + ("none waiting" if age_s is None else f"waiting {seconds_text(age_s)}"))
    kept = [f"{state} jobs {text if parse_duration(text) else 'forever'}" for state, text in status["kept"].items()]
    print(f"kept: {', '.join(kept)} after they finish (then running supervisors delete them)")


def cmd_list(args):
    """Jobs, newest first."""
    check_limit(args.limit)
    states = parse_states(args.state) if args.state else None
    with closing(open_db_reaped(args)) as conn:
        rows = list_jobs(conn, states, args.queue, args.limit)
    print_jobs(rows, args.json)


def check_limit(limit):
    """--limit: 0 for no limit, else a count SQLite can take."""
    if not 0 <= limit <= 2**62:
        raise UsageError(f"--limit must be 0 (no limit) or a positive count, got {limit}")


def print_jobs(rows, as_json):
    """A list of jobs as a JSON array or a table."""
    if as_json:
        return print_json([job_json(row) for row in rows])
    if not rows:
        return print("no jobs")
    print_table(("ID", "STATE", "ATTEMPTS", "PRIORITY", "QUEUE", "UPDATED", "COMMAND"),
                [(r["id"], r["state"], r["attempts"], r["priority"], r["queue"], short_time(r["updated_at"]),
                  one_line(r["command"], 50)) for r in rows])


def cmd_show(args):
    """Every field of one job, its runs, its output."""
    with closing(open_db_reaped(args)) as conn:
        job = show_json(conn, args.id)
    if args.json:
        return print_json(job)
    for field, value in job.items():
        if field in ("stdout", "stderr", "runs"):
            continue
        shown = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value
        print(f"{field + ':':<13} {'-' if value is None else shown}")
    print_runs(job["runs"])
    for stream in ("stdout", "stderr"):
        print(f"--- {stream} ---")
        print(job[stream], end="" if job[stream].endswith("\n") or not job[stream] else "\n")


def print_runs(runs):
    """A job's runs as a table under `runs:`."""
    if not runs:
        return print(f"{'runs:':<13} none")
    print("runs:")
    print_table(("RUN", "ATTEMPT", "OUTCOME", "EXIT", "STARTED", "FINISHED", "WORKER", "HOST", "ERROR"),
                [(r["run"], r["attempt"], r["outcome"], "-" if r["exit_code"] is None else r["exit_code"],
                  short_iso(r["started_at"]), short_iso(r["finished_at"]), r["worker"] or "-", r["host"] or "-",
                  one_line(r["error"] or "-", 60)) for r in runs])


def short_iso(text):
    """An ISO-8601 UTC time to the second, '-' for none."""
    return text[:19] + "Z" if text else "-"


def cmd_logs(args):
    """A run's kept output, raw, for piping (a note on stderr if its start was cut); or follow it."""
    stream = "stderr" if args.stderr else "stdout"
    if args.run is not None and args.run < 1:
        raise UsageError(f"--run must be a run number from 1, got {args.run}")
    if args.follow:
        if args.run is not None:
            raise UsageError("--follow follows the current run; it takes no --run")
        return follow_logs(args, stream)
    with closing(open_db(args)) as conn:
        job = get_job(conn, args.id)
        run = args.run or job["last_run"]
        output = run_output(conn, job, run, stream) if run else None
    if output is None and args.run is not None:
        have = f"its runs are 1 to {job['last_run']}" if job["last_run"] else "it has not run yet"
        raise QueueError(f"job '{job['id']}' has no run {args.run} ({have})")
    if output is None:  # never run, or last run before runs were kept (schema 4): the job's own tail
        if job[stream + "_cut"]:
            print(f"queuectl: note: {cut_marker(job[stream + '_cut']).strip()}", file=sys.stderr)
        return write_raw(job[stream])
    data, written, _ = output
    if written > len(data):
        print(f"queuectl: note: {cut_marker(written - len(data)).strip()}", file=sys.stderr)
    write_raw(data)


def follow_logs(args, stream):
    """Print the job's current run as it is written, then each later run, until the job ends.

    Reads, every FOLLOW_POLL_S: the worker flushes a running job's output to
    its run at most every OUTPUT_FLUSH_S, and the run keeps the last
    output_limit bytes. A follower further behind than that is told how many
    bytes it missed and goes on from the kept tail. Its only write is to
    return the job to the retry rules once its lease has run out, as `wait`
    does, so that a job whose worker vanished still ends. Exit as `wait`: 0
    if the job ended completed.
    """
    with closing(open_db(args)) as conn:
        job = get_job(conn, args.id)
        if job["last_run"] == 0 and job["state"] in END_STATES:  # ended unrun, or ran before runs were kept
            write_raw(job[stream])
        run, printed = max(job["last_run"], 1), 0  # the run followed, and how much of it is printed
        while True:
            progress = conn.execute(f"SELECT {stream}_bytes, finished_at FROM runs WHERE job_seq = ? AND run = ?",
                                    (job["seq"], run)).fetchone()
            if progress is not None and progress[0] != printed:
                printed = print_new_output(run_output(conn, job, run, stream), printed)
            job = get_job(conn, args.id)
            finished = progress is not None and progress[1] is not None
            if finished and job["last_run"] > run:  # a later run began
                run, printed = run + 1, 0
            elif job["state"] in END_STATES and (finished or job["last_run"] < run):
                if progress is None or printed == progress[0]:
                    break
            else:
                if job["lease_token"] is not None and job["lease_until"] < conn.now():
                    reap_if_possible(conn)  # its worker is gone: nothing else may come to end it
                time.sleep(FOLLOW_POLL_S)
    if job["state"] != "completed":
        raise QueueError(f"job '{job['id']}' ended {job['state']}")


def print_new_output(output, printed):
    """Print what a follower has not printed yet of a run's output; return the bytes printed so far."""
    data, written, _ = output
    if written == printed:
        return printed
    kept_from = written - len(data)  # the stream offset of the tail's first byte
    if printed < kept_from:
        write_raw(f"[queuectl: {kept_from - printed} bytes skipped]\n".encode())
        printed = kept_from
    write_raw(data[printed - kept_from:])
    sys.stdout.flush()
    return written


def cmd_cancel(args):
    """Cancel jobs; a running one has its process group ended by its worker."""
    with closing(open_db(args)) as conn:
        jobs = cancel_jobs(conn, args.ids)
        if any(job["state"] == "processing" for job in jobs):
            conn.wake_workers()  # its worker notices at once instead of at the next tick
    for job in jobs:
        note = " (its process group is being stopped)" if job["state"] == "processing" else ""
        print(f"canceled {job['id']}{note}")


def cmd_retry(args):
    """Put dead or canceled jobs back to pending."""
    retry_and_report(args, args.ids)


def retry_and_report(args, ids, states=RETRYABLE_STATES):
    """Retry jobs (ids None: every dead one), wake the workers, and say what was retried."""
    with closing(open_db(args)) as conn:
        retried = retry_jobs(conn, ids, states)
        if retried:
            conn.wake_workers()
    for job_id in retried:
        print(f"retried {job_id}")
    if ids is None:
        print(f"retried {len(retried)} job(s)")


def cmd_dlq_list(args):
    """The dead letter queue: every dead job."""
    check_limit(args.limit)
    with closing(open_db_reaped(args)) as conn:
        rows = list_jobs(conn, ["dead"], None, args.limit)
    print_jobs(rows, args.json)


def cmd_dlq_retry(args):
    """Retry dead jobs by id, or all of them."""
    if bool(args.ids) == args.all:
        raise UsageError("give job ids or --all, not both or neither")
    retry_and_report(args, None if args.all else args.ids, states=("dead",))


def cmd_dlq_purge(args):
    """Delete every dead job."""
    with closing(open_db(args)) as conn:
        print(f"purged {purge_jobs(conn, ['dead'])} dead job(s)")


def cmd_purge(args):
    """Delete jobs in end states, optionally only those finished long enough ago."""
    states = parse_states(args.state) if args.state else ["completed"]
    older_than_s = parse_duration(args.older_than) if args.older_than else None
    with closing(open_db(args)) as conn:
        print(f"purged {purge_jobs(conn, states, older_than_s)} job(s)")


def cmd_wait(args):
    """Block until every named job ends: 0 if all completed, 1 if not, 124 on timeout."""
    if args.timeout is not None and not args.timeout >= 0:  # written so that NaN fails too
        raise UsageError(f"--timeout must be 0 or more, got {args.timeout}")
    deadline = math.inf if args.timeout is None else time.monotonic() + args.timeout
    with closing(open_db(args)) as conn:
        fetch_jobs(conn, args.ids)  # unknown ids fail now, not after the wait
        while True:
            reap_if_possible(conn)
            states = {row["id"]: row["state"] for row in fetch_jobs(conn, args.ids)}
            if all(state in END_STATES for state in states.values()):
                break
            if time.monotonic() >= deadline:
                waiting = [job_id for job_id, state in states.items() if state not in END_STATES]
                raise WaitTimeout(f"timed out after {seconds_text(args.timeout)}; still waiting for "
                                  f"{', '.join(waiting)}")
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
    for job_id, state in states.items():
        print(f"{job_id} {state}")
    bad = [f"{job_id} is {state}" for job_id, state in states.items() if state != "completed"]
    if bad:
        raise QueueError("not every job completed: " + ", ".join(bad))


def cmd_queue_list(args):
    """Every queue with jobs or settings: paused, limit, counts."""
    with closing(open_db_reaped(args)) as conn:
        queues = list_queues(conn)
    if args.json:
        return print_json(queues)
    if not queues:
        return print("no queues")
    print_table(("QUEUE", "PAUSED", "LIMIT", *(state.upper() for state in STATES)),
                [(q["queue"], "yes" if q["paused"] else "no", q["limit"] or "-", *q["jobs"].values())
                 for q in queues])


def cmd_queue_pause(args):
    """Stop claiming jobs of queues; running ones go on."""
    change_queues(args, "paused", 1, "paused queue {}")


def cmd_queue_resume(args):
    """Claim jobs of queues again."""
    change_queues(args, "paused", 0, "resumed queue {}")


def cmd_queue_limit(args):
    """At most N jobs of a queue processing at once; 0: no limit."""
    if not 0 <= args.limit <= MAX_QUEUE_LIMIT:
        raise UsageError(f"a queue limit must be 0 (none) to {MAX_QUEUE_LIMIT:,}, got {args.limit}")
    args.queues = [args.queue]
    change_queues(args, "max_running", args.limit,
                  f"queue {{}}: at most {args.limit} processing" if args.limit else "queue {}: no limit")


def change_queues(args, column, value, message):
    """Check the names, change them all in one transaction, wake the workers, say what was done."""
    names = [check_queue_name(name) for name in args.queues]
    with closing(open_db(args)) as conn:
        set_queues(conn, names, column, value)
        conn.wake_workers()  # a resumed or widened queue starts now, not at the next poll
    for name in dict.fromkeys(names):
        print(message.format(name))


def cmd_why(args):
    """Why a job is where it is: every reason that holds."""
    with closing(open_db(args)) as conn:
        answer = explain_job(conn, args.id)
    if args.json:
        return print_json(answer)
    print(f"{answer['id']} is {answer['state']}")
    for reason in answer["reasons"]:
        print(f"  - {reason['text']}")


def cmd_schedule_add(args):
    """Add a recurring schedule: CRON, zone, and the job template of every tick."""
    name = check_schedule_name(args.name)
    Cron(args.cron)  # a bad CRON is exit 2 before anything else
    tz = args.tz or local_zone_name()
    resolve_zone(tz)
    if (args.job is None) == (args.command is None):
        raise UsageError("give the job as JSON or as -c COMMAND, not both or neither")
    spec = parse_json_text(args.job, "the job") if args.job is not None else schedule_flags_job(args)
    with closing(open_db(args)) as conn:
        check_template(spec, load_config(conn), conn.now())
        add_schedule(conn, name, args.cron, tz, spec, args.catch_up, args.no_overlap)
        row = get_schedules(conn, [name])[0]
        print(f"added schedule {name}: next tick {schedule_json(row)['next_tick_at']}")


def schedule_flags_job(args):
    """The job template of `schedule add -c COMMAND` and its flags."""
    spec = {"command": args.command}
    for field, value in (("max_retries", args.max_retries), ("timeout", args.timeout),
                         ("priority", args.priority), ("queue", args.queue)):
        if value is not None:
            spec[field] = value
    return spec


def cmd_schedule_list(args):
    """Every schedule, with its next tick."""
    with closing(open_db(args)) as conn:
        schedules = [schedule_json(row) for row in get_schedules(conn)]
    if args.json:
        return print_json(schedules)
    if not schedules:
        return print("no schedules")
    print_table(("NAME", "CRON", "TZ", "NEXT TICK", "PAUSED", "LAST JOB", "COMMAND"),
                [(s["name"], s["cron"], s["tz"], short_iso(s["next_tick_at"]), "yes" if s["paused"] else "no",
                  s["last_job_id"] or "-", one_line(s["job"].get("command", ""), 40)) for s in schedules])


def cmd_schedule_show(args):
    """One schedule, every field."""
    with closing(open_db(args)) as conn:
        schedule = schedule_json(get_schedules(conn, [args.name])[0])
    if args.json:
        return print_json(schedule)
    for field, value in schedule.items():
        shown = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value
        print(f"{field + ':':<14} {'-' if value is None else shown}")


def cmd_schedule_remove(args):
    """Remove schedules; their jobs stay."""
    with closing(open_db(args)) as conn:
        change_schedules(conn, args.names, "DELETE FROM schedules WHERE name = :name")
    for name in dict.fromkeys(args.names):
        print(f"removed schedule {name}")


def cmd_schedule_pause(args):
    """Stop firing schedules."""
    with closing(open_db(args)) as conn:
        change_schedules(conn, args.names, PAUSE_SCHEDULE_SQL)
    for name in dict.fromkeys(args.names):
        print(f"paused schedule {name}")


def cmd_schedule_resume(args):
    """Fire schedules again, from now: the ticks missed while paused are not fired."""
    with closing(open_db(args)) as conn:
        change_schedules(conn, args.names, RESUME_SCHEDULE_SQL)
    for name in dict.fromkeys(args.names):
        print(f"resumed schedule {name}")


def cmd_schedule_run(args):
    """One job from a schedule's template, now."""
    with closing(open_db(args)) as conn:
        job_id = run_schedule_now(conn, args.name)
        conn.wake_workers()
    print(job_id)


def cmd_schedule_next(args):
    """The next ticks of a CRON, without a database: to check an expression before trusting it."""
    cron = Cron(args.cron)
    zone_name = args.tz or local_zone_name()
    zone = resolve_zone(zone_name)
    if not 1 <= args.count <= 1000:
        raise UsageError(f"--count must be 1 to 1000, got {args.count}")
    tick = parse_time("--from", args.from_time) if args.from_time is not None else time.time()
    ticks, anchor = [], tick
    for _ in range(args.count):
        tick = cron.next_tick(tick, zone, anchor)
        if tick is None or tick > LATEST_TIME:
            break
        ticks.append(tick)
    if args.json:
        return print_json([iso(tick) for tick in ticks])
    for tick in ticks:
        local = datetime.datetime.fromtimestamp(tick, zone)
        print(f"{iso(tick)}  {local.strftime('%Y-%m-%d %H:%M:%S')} {local.tzname()} ({zone_name})")


def cmd_config_get(args):
    """One config value."""
    check_config_key(args.key)
    with closing(open_db(args)) as conn:
        value = load_config(conn)[args.key]
    print_json({args.key: value}) if args.json else print(value)


def cmd_config_set(args):
    """Change one config value."""
    value = parse_config_value(args.key, args.value)
    with closing(open_db(args)) as conn:
        set_config(conn, args.key, value)
    print(f"{args.key} = {value}")


def cmd_config_list(args):
    """Every config value."""
    with closing(open_db(args)) as conn:
        config = load_config(conn)
    if args.json:
        return print_json(config)
    print_table(("KEY", "VALUE"), list(config.items()))


# ---------------------------------------------------------------------------
# Dashboard: the JSON API
# ---------------------------------------------------------------------------
#
# `dashboard` serves one page (see "Dashboard: the page" below) and the JSON
# API it is built on, the same shapes as the commands' --json. Each route is
# a function of (conn, the path's parts, the query); the changes are the
# very operations the commands call, so the CLI sees them at once.

JOBS_PAGE = 50  # jobs a page of the job list has by default
JOBS_PAGE_MAX = 500
JOBS_WALKED = 5000  # a filtered page looks at most this many jobs a walk, then says where it stopped
LATEST_SEQ = 2**63 - 1  # above every job's seq


def status_json(conn, processes=None):
    """`status --json`: counts per state, live workers, the oldest runnable job's age."""
    processes = live_processes(conn) if processes is None else processes
    config = load_config(conn)
    return {"jobs": count_by_state(conn), "workers": [p for p in processes if p["kind"] == "worker"],
            "oldest_runnable_age_s": oldest_runnable_age_s(conn),
            "kept": {"completed": config["keep_completed"], "dead": config["keep_dead"]}}


def show_json(conn, job_id):
    """`show --json`: every field of the job and its runs."""
    row = get_job(conn, job_id)
    return dict(job_json(row), runs=[run_json(run) for run in runs_of(conn, row)])


def page_of_jobs(conn, states=None, queue=None, text=None, limit=JOBS_PAGE, before=None):
    """(rows, id to page on or None): jobs newest first, filtered, before the job `before`.

    Every filter reads an index, newest first: one walk of jobs_by_state per
    state (merged), or of jobs_by_queue, or of the primary key. A filter the
    walked index does not hold (a queue beside states, the text) is applied
    to at most JOBS_WALKED jobs a page; a page cut there has fewer jobs and
    names where to go on, so no request ever reads the whole table.
    """
    below = get_job(conn, before)["seq"] if before is not None else LATEST_SEQ
    if states:
        walks = [("state = ?", [state]) for state in states]  # jobs_by_state, once per state
    elif queue:
        walks = [("queue = ?", [queue])]  # jobs_by_queue
    else:
        walks = [("1 = 1", [])]  # the primary key
    checks, check_params = [], []
    if states and queue:
        checks.append("queue = ?")
        check_params.append(queue)
    if text:
        pattern = "%" + re.sub(r"([!%_])", r"!\1", text.lower()) + "%"
        checks.append("(lower(id) LIKE ? ESCAPE '!' OR lower(command) LIKE ? ESCAPE '!')")
        check_params += [pattern, pattern]
    walked_at_most = JOBS_WALKED if checks else limit + 1  # each walk's, and the merged walk's
    matches = f"({' AND '.join(checks)})" if checks else "1 = 1"
    walked = heapq.merge(*(conn.execute(f"""
        SELECT seq, id, {matches} AS matches
        FROM jobs
        WHERE {where} AND seq < ?
        ORDER BY seq DESC
        LIMIT {walked_at_most}
        """, [*check_params, *params, below]).fetchall() for where, params in walks), key=lambda row: -row[0])
    walked = list(itertools.islice(walked, walked_at_most))
    found = [row for row in walked if row[2]]
    if len(found) > limit:
        found, next_id = found[:limit], found[limit - 1][1]
    else:
        next_id = walked[-1][1] if checks and len(walked) == walked_at_most else None
    rows = fetch_by_seq(conn, [row[0] for row in found])
    return rows, next_id


def fetch_by_seq(conn, seqs):
    """The job rows of seqs, in that order."""
    if not seqs:
        return []
    rows = {row["seq"]: row for row in conn.execute(
        f"SELECT * FROM jobs WHERE seq IN ({', '.join('?' for _ in seqs)})", seqs)}
    return [rows[seq] for seq in seqs if seq in rows]


def output_since(conn, job_id, run=None, stream="stdout", start=0):
    """What a run printed on stream from byte start on, for the page's live tail (as `logs -f` reads it).

    The kept tail is the last output_limit bytes: asked for bytes before
    it, the answer starts at the tail and says how many were skipped. It
    ends at a whole UTF-8 character unless the run has finished.
    """
    job = get_job(conn, job_id)
    run = run or job["last_run"]
    output = run_output(conn, job, run, stream) if run else (b"", 0, False)
    if output is None:
        raise NotFound(f"job '{job['id']}' has no run {run}")
    data, written, finished = output
    kept_from = written - len(data)
    begin = min(max(start, kept_from), written)
    chunk = data[begin - kept_from:]
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    text = decoder.decode(chunk, final=finished)
    end = written - len(decoder.getstate()[0])
    return {"run": run, "stream": stream, "from": begin, "to": end, "data": text, "written": written,
            "skipped": max(kept_from - start, 0), "finished": finished, "state": job["state"],
            "last_run": job["last_run"]}


def api_jobs(conn, query):
    """GET /api/jobs?state=S&queue=Q&q=TEXT&limit=N&before=ID[&brief=1]

    brief=1 (the page's list) leaves out each job's stdout and stderr: fifty
    output tails at every refresh would be megabytes.
    """
    states = list(dict.fromkeys(parse_states(query["state"]))) if query.get("state") else None
    queue = check_queue_name(query["queue"]) if query.get("queue") else None
    limit = query_int(query, "limit", JOBS_PAGE, 1, JOBS_PAGE_MAX)
    text = query.get("q") or None
    if text is not None and ("\0" in text or len(text) > 1000):
        raise UsageError("q must be at most 1,000 characters, without NUL")
    rows, next_id = page_of_jobs(conn, states, queue, text, limit, query.get("before") or None)
    jobs = [job_json(row) for row in rows]
    if query.get("brief") == "1":
        jobs = [{key: value for key, value in job.items() if key not in ("stdout", "stderr")} for job in jobs]
    return {"jobs": jobs, "next": next_id}


def api_output(conn, query, job_id):
    """GET /api/jobs/ID/output?run=N&stream=stdout|stderr&from=B"""
    stream = query.get("stream", "stdout")
    if stream not in ("stdout", "stderr"):
        raise UsageError(f"stream must be stdout or stderr, got {json.dumps(stream)}")
    run = query_int(query, "run", None, 1, 2**62)
    return output_since(conn, job_id, run, stream, query_int(query, "from", 0, 0, 2**62))


def query_int(query, name, default, low, high):
    """An integer query parameter from low to high, or default when absent."""
    if name not in query:
        return default
    text = query[name]
    if not re.fullmatch(r"[0-9]{1,19}", text) or not low <= int(text) <= high:
        raise UsageError(f"{name} must be a whole number from {low} to {high}, got {json.dumps(text)}")
    return int(text)


def api_cancel(conn, job_id):
    """POST /api/jobs/ID/cancel: as `cancel`."""
    (job,) = cancel_jobs(conn, [job_id])
    if job["state"] == "processing":
        conn.wake_workers()
    return show_json(conn, job_id)


def api_retry(conn, job_id):
    """POST /api/jobs/ID/retry: as `retry`."""
    retry_jobs(conn, [job_id])
    conn.wake_workers()
    return show_json(conn, job_id)


def api_dlq_retry(conn):
    """POST /api/dlq/retry: every dead job back to pending."""
    retried = retry_jobs(conn, None, ("dead",))
    if retried:
        conn.wake_workers()
    return {"count": len(retried)}


def api_queue(conn, name, paused):
    """POST /api/queues/Q/pause and /resume: the queue as `queue list --json` shows it."""
    set_queues(conn, [check_queue_name(name)], "paused", int(paused))
    conn.wake_workers()
    return next(q for q in list_queues(conn, also=[name]) if q["queue"] == name)


def api_schedule(conn, name, sql):
    """POST /api/schedules/NAME/pause and /resume: the schedule as `schedule show --json`."""
    change_schedules(conn, [name], sql)
    return schedule_json(get_schedules(conn, [name])[0])


def api_schedule_run(conn, name):
    """POST /api/schedules/NAME/run: the job made, as `show --json`."""
    job_id = run_schedule_now(conn, name)
    conn.wake_workers()
    return show_json(conn, job_id)


ACTIVITY_MINUTES = 60  # the chart's span
FAILED_OUTCOMES = ("failed", "timed_out", "lost")  # the chart's failed runs

# Runs per whole minute and outcome since a time, through runs_by_finish.
# {minute} is the engine's MINUTE_OF_FINISH: the two round a fraction apart.
RUNS_PER_MINUTE_SQL = """
SELECT {minute} AS minute, outcome, count(*) AS runs
FROM runs
WHERE finished_at >= :since
  AND finished_at IS NOT NULL
GROUP BY {minute}, outcome
"""


def runs_per_minute(conn, now=None):
    """GET /api/activity: completed and failed runs in each of the last ACTIVITY_MINUTES minutes, oldest first."""
    now = conn.now() if now is None else now
    first = int(now // 60) - ACTIVITY_MINUTES + 1
    counts = collections.Counter()
    for row in conn.execute(RUNS_PER_MINUTE_SQL.format(minute=conn.MINUTE_OF_FINISH), {"since": first * 60}):
        if row["outcome"] == "completed" or row["outcome"] in FAILED_OUTCOMES:
            counts[int(row["minute"]), row["outcome"] == "completed"] += row["runs"]
    return {"minutes": [{"minute": iso(minute * 60), "completed": counts[minute, True],
                         "failed": counts[minute, False]} for minute in range(first, first + ACTIVITY_MINUTES)]}


# (method, path pattern, handler(conn, query, *path parts)). A part is one
# path segment, percent-decoded: job ids may hold '@' and ':'.
API_ROUTES = [
    ("GET", r"/api/status", lambda conn, query: status_json(conn)),
    ("GET", r"/api/jobs", api_jobs),
    ("GET", r"/api/jobs/([^/]+)", lambda conn, query, job_id: show_json(conn, job_id)),
    ("GET", r"/api/jobs/([^/]+)/why", lambda conn, query, job_id: explain_job(conn, job_id)),
    ("GET", r"/api/jobs/([^/]+)/output", api_output),
    ("GET", r"/api/queues", lambda conn, query: list_queues(conn)),
    ("GET", r"/api/schedules", lambda conn, query: [schedule_json(row) for row in get_schedules(conn)]),
    ("GET", r"/api/workers", lambda conn, query: live_processes(conn)),
    ("GET", r"/api/activity", lambda conn, query: runs_per_minute(conn)),
    ("POST", r"/api/jobs/([^/]+)/cancel", lambda conn, query, job_id: api_cancel(conn, job_id)),
    ("POST", r"/api/jobs/([^/]+)/retry", lambda conn, query, job_id: api_retry(conn, job_id)),
    ("POST", r"/api/dlq/retry", lambda conn, query: api_dlq_retry(conn)),
    ("POST", r"/api/dlq/purge", lambda conn, query: {"count": purge_jobs(conn, ["dead"])}),
    ("POST", r"/api/queues/([^/]+)/pause", lambda conn, query, name: api_queue(conn, name, True)),
    ("POST", r"/api/queues/([^/]+)/resume", lambda conn, query, name: api_queue(conn, name, False)),
    ("POST", r"/api/schedules/([^/]+)/pause", lambda conn, query, name: api_schedule(conn, name, PAUSE_SCHEDULE_SQL)),
    ("POST", r"/api/schedules/([^/]+)/resume",
     lambda conn, query, name: api_schedule(conn, name, RESUME_SCHEDULE_SQL)),
    ("POST", r"/api/schedules/([^/]+)/run", lambda conn, query, name: api_schedule_run(conn, name)),
]


# ---------------------------------------------------------------------------
# Dashboard: /metrics for Prometheus
# ---------------------------------------------------------------------------
#
# The text format (version 0.0.4). Gauges are read as the page reads them
# (kept counts, one index step); the counters count the runs that finished
# since this dashboard's first scrape, as any exporter's counters count from
# its start: Prometheus' rate() and increase() take a restart in their stride.

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RUN_DURATION_BUCKETS_S = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)
FINISHED_OUTCOMES = tuple(outcome for outcome in RUN_OUTCOMES if outcome != "running")

# The runs that finished since a time: their key, outcome and duration.
RUNS_FINISHED_SINCE_SQL = """
SELECT job_seq, run, outcome, finished_at - started_at AS took_s, finished_at
FROM runs
WHERE finished_at >= :since
  AND finished_at IS NOT NULL
"""


class RunTally:
    """The runs that finished since `since`, by outcome, and a histogram of how long they took.

    Each update reads, through runs_by_finish, the runs that finished since
    the one before, and those of the LATE_S before that: a run's row is
    written when it ends, by any host, so one may land a little in the past.
    A run is counted once: its key is remembered while it is that recent.
    """

    LATE_S = 10.0

    def __init__(self, since):
        self.since = self.read_from = since
        self.by_outcome = dict.fromkeys(FINISHED_OUTCOMES, 0)
        self.buckets = [0] * len(RUN_DURATION_BUCKETS_S)  # runs that took at most each bound
        self.count, self.total_s = 0, 0.0
        self.recent = {}  # (job seq, run) -> finished_at, for the runs counted in the last LATE_S

    def update(self, conn):
        """Count the runs that finished since the last update."""
        now = conn.now()
        for row in conn.execute(RUNS_FINISHED_SINCE_SQL, {"since": max(self.read_from - self.LATE_S, self.since)}):
            key = (row["job_seq"], row["run"])
            if key in self.recent or row["outcome"] not in self.by_outcome:
                continue
            self.recent[key] = row["finished_at"]
            self.by_outcome[row["outcome"]] += 1
            took_s = max(row["took_s"], 0.0)
            self.count, self.total_s = self.count + 1, self.total_s + took_s
            for i, bound in enumerate(RUN_DURATION_BUCKETS_S):
                self.buckets[i] += took_s <= bound
        self.read_from = now
        self.recent = {key: at for key, at in self.recent.items() if at >= now - 2 * self.LATE_S}


def metric_labels(**labels):
    """{name="value",...} with the text format's escapes."""
    def escaped(value):
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{name}="{escaped(value)}"' for name, value in labels.items()) + "}" if labels else ""


def metric(lines, name, kind, text, samples):
    """One family: its HELP and TYPE lines, then each (suffix, labels, value) sample."""
    lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{suffix}{metric_labels(**labels)} {value!r}" for suffix, labels, value in samples]


def metrics_text(conn, tally):
    """GET /metrics: the queue now, and the runs finished since the first scrape (tally)."""
    tally.update(conn)
    counts = conn.count_jobs()
    queues = sorted({queue for queue, _ in counts})
    workers = [p for p in live_processes(conn) if p["kind"] == "worker"]
    lines = []
    metric(lines, "queuectl_jobs", "gauge", "Jobs in each state, per queue.",
           [("", {"queue": queue, "state": state}, counts.get((queue, state), 0))
            for queue in queues for state in STATES])
    metric(lines, "queuectl_jobs_processing", "gauge", "Jobs running now, in every queue.",
           [("", {}, sum(n for (_, state), n in counts.items() if state == "processing"))])
    metric(lines, "queuectl_oldest_runnable_age_seconds", "gauge",
           "How long the longest-waiting due job has waited (0: none waits).",
           [("", {}, float(oldest_runnable_age_s(conn) or 0))])
    metric(lines, "queuectl_runs_finished_total", "counter",
           "Runs that finished since this dashboard's first scrape, by outcome.",
           [("", {"outcome": outcome}, n) for outcome, n in tally.by_outcome.items()])
    buckets = [("_bucket", {"le": f"{bound:g}"}, n) for bound, n in zip(RUN_DURATION_BUCKETS_S, tally.buckets)]
    metric(lines, "queuectl_run_duration_seconds", "histogram",
           "How long the runs that finished since this dashboard's first scrape took.",
           [*buckets, ("_bucket", {"le": "+Inf"}, tally.count), ("_sum", {}, float(tally.total_s)),
            ("_count", {}, tally.count)])
    metric(lines, "queuectl_workers_alive", "gauge", "Worker processes alive, on every host.", [("", {}, len(workers))])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Dashboard: safety, snapshots and the server
# ---------------------------------------------------------------------------
#
# Every request passes, in order: its Host must be one this server answers
# to (a DNS-rebinding page's Host is its own name); it must carry the token
# (query, cookie or bearer); a change must be a POST, from this very origin
# when a browser sends it, and the dashboard not --read-only. GET answers are
# snapshots shared by every client for DASHBOARD_SNAPSHOT_S, so a hundred
# open pages read the database as often as one does.

DASHBOARD_SNAPSHOT_S = 1.0
DASHBOARD_PORT = 8765
# Only the server itself; no inline script or style, no frames, no plugins.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SAFETY_HEADERS = [("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
                  ("Referrer-Policy", "no-referrer"), ("X-Frame-Options", "DENY"), ("Cache-Control", "no-store")]


class HttpError(Exception):
    """A refusal: the status, and the one line its JSON body says."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# The HTTP status of each error the queue operations raise.
ERROR_STATUS = [(UsageError, 400), (NotFound, 404), (WrongState, 409), (StorageError, 503), (QueueError, 409)]


class Dashboard:
    """The requests of one `dashboard`: checked, routed, answered; one database connection, one at a time."""

    def __init__(self, db_path, token, host, read_only):
        import threading
        self.db_path, self.token, self.host, self.read_only = db_path, token, host, read_only
        self.port = None  # known once the server listens (--port 0)
        self.lock = threading.Lock()  # one request at a time reaches the database
        self.conn = None
        self.snapshots = {}  # (path, query) -> (expires at, status, body)
        self.tally = None  # /metrics' counters, from the first scrape on

    def answer(self, method, target, headers):
        """(status, [(header, value)], body bytes) for one request."""
        import urllib.parse
        url = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        extra = []
        try:
            self.check_host(headers.get("Host"))
            via = self.check_token(query, headers)
            if via == "query":
                extra.append(("Set-Cookie", f"{self.cookie_name}={self.token}; HttpOnly; SameSite=Strict; Path=/"))
            query.pop("token", None)
            if url.path == "/metrics":
                return self.metrics(method, extra)
            if not url.path.startswith("/api/"):
                return self.page(method, url.path, extra)
            route_method, handler, parts = self.route(url.path)
            if route_method != method:
                raise HttpError(405, f"{url.path} takes {route_method} only")
            if method == "POST":
                self.check_change(headers, via)
                status, body = self.change(handler, query, parts)
            else:
                status, body = self.snapshot((url.path, tuple(sorted(query.items()))), handler, query, parts)
        except HttpError as e:
            status, body = e.status, json_body({"error": str(e)})
        except Exception as e:  # a bug: one line for the client and the log, and the server goes on
            if os.environ.get("QUEUECTL_DEBUG") == "1":
                raise
            print(f"queuectl: error: internal error: {e!r}", file=sys.stderr, flush=True)
            status, body = 500, json_body({"error": f"internal error: {e!r}"})
        return status, [("Content-Type", "application/json"), *extra], body

    def check_host(self, host):
        """Refuse a Host this server does not answer to: a DNS-rebinding page names its own."""
        match = re.fullmatch(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::([0-9]{1,5}))?", (host or "").lower())
        if not match or int(match[2] or 80) != self.port or not self.answers_to(match[1].strip("[]")):
            raise HttpError(403, "the Host header does not name this dashboard")

    def answers_to(self, name):
        """Whether a Host's name is this server: its address; localhost or a loopback address if bound to
        one; any address or this machine's name if bound to all."""
        import socket
        bound = self.host.lower().strip("[]")
        if name == bound:
            return True
        if bound in ("0.0.0.0", "::"):
            return name == "localhost" or is_ip_literal(name) or name in (socket.gethostname().lower(),
                                                                           socket.getfqdn().lower())
        return is_loopback(bound) and (name == "localhost" or is_ip_literal(name) and is_loopback(name))

    @property
    def cookie_name(self):
        return f"queuectl_token_{self.port}"  # cookies ignore ports: one name per dashboard

    def check_token(self, query, headers):
        """How the request carried the token ('query', 'cookie', 'bearer'); 401 without it."""
        import hmac
        given = {"query": query.get("token")}
        scheme, _, credentials = (headers.get("Authorization") or "").partition(" ")
        given["bearer"] = credentials.strip() if scheme.lower() == "bearer" else None
        # By hand: http.cookies drops the whole header over one cookie it dislikes (another site's on localhost).
        cookies = (part.strip().partition("=") for part in (headers.get("Cookie") or "").split(";"))
        given["cookie"] = next((value for name, _, value in cookies if name == self.cookie_name), None)
        for via, token in given.items():
            if token is not None and hmac.compare_digest(token.encode(), self.token.encode()):
                return via
        raise HttpError(401, "the dashboard's token is needed: open the address `queuectl dashboard` printed")

    def check_change(self, headers, via):
        """A change: refused when read-only, or from another origin (a cookie-borne POST must say its origin)."""
        if self.read_only:
            raise HttpError(403, "the dashboard is read-only")
        origin = headers.get("Origin")
        if origin is None and via == "cookie":
            raise HttpError(403, "a change from a browser must carry its Origin")
        if origin is not None and origin.lower() != "http://" + headers["Host"].lower():
            raise HttpError(403, f"a change from another origin ({one_line(origin, 80)}) is refused")

    def route(self, path):
        """(method, handler, decoded path parts) of an API path; 404 if none."""
        import urllib.parse
        for method, pattern, handler in API_ROUTES:
            match = re.fullmatch(pattern, path)
            if match:
                return method, handler, [urllib.parse.unquote(part) for part in match.groups()]
        raise HttpError(404, f"no such route: {one_line(path, 80)}")

    def metrics(self, method, extra):
        """GET /metrics: the text format, or a JSON error."""
        if method != "GET":
            raise HttpError(405, "/metrics takes GET only")
        status, body = self.snapshot(("/metrics", ()), self.scrape, {}, [], render=str.encode)
        return status, [("Content-Type", METRICS_CONTENT_TYPE if status == 200 else "application/json"), *extra], body

    def scrape(self, conn, query):
        """The metrics text; the counters start at the first scrape, so none reads the runs of days."""
        if self.tally is None:
            self.tally = RunTally(conn.now())
        return metrics_text(conn, self.tally)

    def snapshot(self, key, handler, query, parts, render=None):
        """A GET's (status, body), computed at most once per DASHBOARD_SNAPSHOT_S for every client."""
        with self.lock:
            now = time.monotonic()
            hit = self.snapshots.get(key)
            if hit is not None and hit[0] > now:
                return hit[1:]
            status, body = self.call(handler, query, parts, render=render)
            if len(self.snapshots) > 1000:  # forget the stale ones now and then
                self.snapshots = {k: v for k, v in self.snapshots.items() if v[0] > now}
            self.snapshots[key] = (time.monotonic() + DASHBOARD_SNAPSHOT_S, status, body)
            return status, body

    def change(self, handler, query, parts):
        """A POST's (status, body); every snapshot is stale after it."""
        with self.lock:
            self.snapshots.clear()
            return self.call(handler, query, parts)

    def call(self, handler, query, parts, tries=2, render=None):
        """Run a route's handler on the connection; a dropped one is opened again and the route run again."""
        try:
            if self.conn is None:
                self.conn = connect(self.db_path)
                self.last_reap = 0.0
            if time.monotonic() - self.last_reap >= DASHBOARD_SNAPSHOT_S:
                reap_if_possible(self.conn)  # jobs of a vanished worker show as what they are now
                if_possible(self.conn, fold_counts)
                self.last_reap = time.monotonic()
            return 200, (render or json_body)(handler(self.conn, query, *parts))
        except QueueError as e:
            if isinstance(e, StorageError) and e.kind in ("lost", "corrupt"):
                self.close()
                if e.kind == "lost" and tries > 1:  # a POST's transaction either committed or not: both safe
                    return self.call(handler, query, parts, tries - 1, render)
            status = next(status for kind, status in ERROR_STATUS if isinstance(e, kind))
            return status, json_body({"error": str(e)})

    def page(self, method, path, extra):
        """The page and its two files; GET only."""
        files = {"/": ("text/html; charset=utf-8", PAGE_HTML), "/app.js": ("text/javascript; charset=utf-8", PAGE_JS),
                 "/app.css": ("text/css; charset=utf-8", PAGE_CSS)}
        if path not in files:
            raise HttpError(404, f"no such page: {one_line(path, 80)}")
        if method != "GET":
            raise HttpError(405, f"{path} takes GET only")
        content_type, text = files[path]
        return 200, [("Content-Type", content_type), *extra], text.encode()

    def close(self):
        """Let go of the database connection (a later request opens another)."""
        if self.conn is not None:
            with suppress(Exception):
                self.conn.close()
            self.conn = None


def json_body(document):
    """JSON bytes with <, > and & escaped: a body never holds markup, whatever a job printed."""
    text = json.dumps(document, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def is_ip_literal(name):
    """Whether name is an IPv4 or IPv6 address rather than a host name."""
    import ipaddress
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def is_loopback(host):
    """Whether host is localhost or a loopback address (127.0.0.0/8, ::1)."""
    import ipaddress
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def log_line(text):
    """One line on stderr in one write (request threads never interleave), control characters escaped."""
    os.write(2, (printable(text)[:2000] + "\n").encode("utf-8", "backslashreplace"))


def redact_token(path):
    """A request's path without the token's value, however its name is spelled (%74oken)."""
    import urllib.parse
    base, _, query = path.partition("?")
    if not query:
        return path
    pairs = [(name, "***" if name == "token" else value)
             for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True)]
    return base + "?" + urllib.parse.urlencode(pairs, safe=",:@*")


def serve_dashboard(dashboard, host, port):
    """The listening server: a thread per request, each answered by dashboard."""
    import http.server
    import socket

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "queuectl"
        sys_version = ""
        timeout = 30  # a client that sends nothing lets go of its thread

        def do_GET(self):
            self.respond("GET")

        def do_POST(self):
            length = self.headers.get("Content-Length") or "0"
            if not length.isdigit() or int(length) > 65536:  # no route takes a body
                return self.send_answer(413 if length.isdigit() else 400, [("Content-Type", "application/json")],
                                        json_body({"error": "a request body must be at most 64 KiB"}))
            self.rfile.read(int(length))  # read, so that the client is not cut off
            self.respond("POST")

        def respond(self, method):
            self.send_answer(*dashboard.answer(method, self.path, self.headers))

        def send_answer(self, status, headers, body):
            self.send_response(status)
            for name, value in [*headers, *SAFETY_HEADERS, ("Content-Length", str(len(body)))]:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_request(self, code="-", size="-"):
            path = getattr(self, "path", None)  # none when the request line itself was bad
            log_line(f"{self.command or '-'} {redact_token(path) if path else '-'} {code}")

        def log_message(self, format, *args):  # errors of http.server itself (bad request lines)
            log_line(redact_token(format % args))

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

        def handle_error(self, request, client_address):
            """One line, never a traceback; a client that left is no error."""
            error = sys.exc_info()[1]
            if not isinstance(error, (ConnectionError, TimeoutError)):
                log_line(f"queuectl: error: internal error: {error!r}")

    try:
        return Server((host.strip("[]"), port), Handler)
    except OSError as e:
        raise QueueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_dashboard(args):
    """Serve the page and its API on this database until SIGINT or SIGTERM."""
    import secrets
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0 (any free port) to 65535, got {args.port}")
    token = os.environ.get("QUEUECTL_DASHBOARD_TOKEN") or secrets.token_urlsafe(24)
    if not re.fullmatch(r"[A-Za-z0-9._~-]{1,256}", token):  # as it is in a URL and in a cookie
        raise UsageError("$QUEUECTL_DASHBOARD_TOKEN must be 1-256 characters of A-Z a-z 0-9 . _ ~ -")
    with closing(open_db(args)):
        pass  # a database that cannot be opened fails now, not at the first request
    dashboard = Dashboard(args.db_path, token, args.host, args.read_only)
    server = serve_dashboard(dashboard, args.host, args.port)
    dashboard.port = server.server_address[1]
    address = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    if not is_loopback(args.host):
        reach = "read every job's command and output" if args.read_only else "read, cancel, retry and purge jobs"
        print(f"queuectl: warning: the dashboard listens beyond this machine ({address}:{dashboard.port}); "
              f"anyone who can reach it with the token can {reach}", file=sys.stderr, flush=True)
    print(f"http://{address}:{dashboard.port}/?token={token}", flush=True)

    def stop(signum, frame):
        raise DashboardStopped(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        server.serve_forever(poll_interval=0.5)
    except DashboardStopped:
        pass
    finally:
        server.server_close()
        dashboard.close()
    return 0


class DashboardStopped(BaseException):
    """SIGINT or SIGTERM: leaves serve_forever in the main thread (not an Exception, which socketserver
    would catch and log when the signal lands while it starts a request's thread)."""


# ---------------------------------------------------------------------------
# Dashboard: the page (HTML, CSS, JavaScript)
# ---------------------------------------------------------------------------
#
# Plain text, served as it is: no framework, nothing fetched from elsewhere.
# The script builds every piece of job text with textContent, never as
# markup, and reads only the JSON API above. Routes are the URL's hash:
# #/ the overview and job list, #/jobs/ID one job.

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>queuectl</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/app.css">
<script src="/app.js" defer></script>
</head>
<body>
<header>
  <h1><a href="#/">queuectl</a></h1>
  <span id="updated" class="muted"></span>
</header>
<p id="error" role="alert" hidden></p>

<main id="overview">
  <ul id="counts"></ul>

  <section>
    <h2>Runs per minute, the last hour</h2>
    <svg id="activity" viewBox="0 0 600 100" preserveAspectRatio="none" role="img"
      aria-label="completed and failed runs per minute over the last hour"></svg>
    <p class="muted legend"><span class="key completed"></span> completed
      <span class="key failed"></span> failed (timed out and lost included)
      <span id="activity-total"></span></p>
  </section>

  <section>
    <h2>Queues</h2>
    <div class="scroll"><table id="queues">
      <thead><tr><th>Queue</th><th>Paused</th><th class="num">Limit</th><th class="num">Pending</th>
        <th class="num">Processing</th><th class="num">Failed</th><th class="num">Dead</th>
        <th class="num">Completed</th><th class="num">Canceled</th><th></th></tr></thead>
      <tbody></tbody>
    </table></div>
  </section>

  <section>
    <h2>Workers</h2>
    <div class="scroll"><table id="workers">
      <thead><tr><th>Worker</th><th>Host</th><th class="num">Pid</th><th>Queues</th><th>Started</th>
        <th>Current job</th></tr></thead>
      <tbody></tbody>
    </table></div>
  </section>

  <section>
    <h2>Schedules</h2>
    <div class="scroll"><table id="schedules">
      <thead><tr><th>Name</th><th>Cron</th><th>Zone</th><th>Next tick</th><th>Last job</th><th>Command</th>
        <th></th></tr></thead>
      <tbody></tbody>
    </table></div>
  </section>

  <section>
    <h2>Jobs</h2>
    <form id="filter">
      <select name="state" aria-label="state">
        <option value="">every state</option>
        <option>pending</option><option>processing</option><option>failed</option>
        <option>dead</option><option>completed</option><option>canceled</option>
      </select>
      <input name="queue" placeholder="queue" aria-label="queue" autocomplete="off">
      <input name="q" type="search" placeholder="id or command" aria-label="search" autocomplete="off">
      <button type="submit">Filter</button>
      <span class="spacer"></span>
      <button type="button" id="dlq-retry">Retry every dead job</button>
      <button type="button" id="dlq-purge" class="danger">Purge every dead job</button>
    </form>
    <div class="scroll"><table id="jobs">
      <thead><tr><th>Id</th><th>State</th><th>Queue</th><th class="num wide">Attempts</th><th class="wide">Updated</th>
        <th>Command</th></tr></thead>
      <tbody></tbody>
    </table></div>
    <p class="pager"><button type="button" id="newest" hidden>Newest</button>
      <button type="button" id="older" hidden>Older</button></p>
  </section>
</main>

<main id="job" hidden>
  <p><a href="#/">All jobs</a></p>
  <h2 id="job-title"></h2>
  <p class="actions">
    <button type="button" id="job-cancel" class="danger">Cancel</button>
    <button type="button" id="job-retry">Retry</button>
  </p>
  <ul id="job-why"></ul>
  <div class="scroll"><table id="job-fields" class="fields"><tbody></tbody></table></div>
  <h3>Runs</h3>
  <div class="scroll"><table id="job-runs">
    <thead><tr><th class="num">Run</th><th class="num">Attempt</th><th>Outcome</th><th class="num">Exit</th>
      <th>Started</th><th>Finished</th>
      <th>Worker</th><th>Host</th><th>Error</th></tr></thead>
    <tbody></tbody>
  </table></div>
  <h3>Output <select id="job-run" aria-label="run"></select></h3>
  <pre id="job-output"></pre>
  <h3>Errors (stderr)</h3>
  <pre id="job-stderr"></pre>
</main>
</body>
</html>
"""

PAGE_CSS = """
:root {
  --bg: #fff; --fg: #1d2027; --muted: #6a707c; --line: #e3e5e9; --panel: #f6f7f9; --accent: #2458d6;
  --pending: #8a6d00; --processing: #2458d6; --completed: #1c7c3c; --failed: #b3541e; --dead: #b4232a;
  --canceled: #6a707c;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #15171c; --fg: #e4e6eb; --muted: #9aa0ab; --line: #2c3038; --panel: #1d2026; --accent: #7ea6ff;
    --pending: #e0b93c; --processing: #7ea6ff; --completed: #5cc27e; --failed: #f08c54; --dead: #ff6b70;
    --canceled: #9aa0ab;
  }
}
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1200px; padding: 0 16px 32px; background: var(--bg); color: var(--fg); }
a { color: var(--accent); }
header { display: flex; align-items: baseline; gap: 16px; padding: 12px 0; border-bottom: 1px solid var(--line); }
h1 { font-size: 20px; margin: 0; } h1 a { color: inherit; text-decoration: none; }
h2 { font-size: 16px; margin: 24px 0 8px; } h3 { font-size: 14px; margin: 20px 0 6px; }
.muted { color: var(--muted); font-size: 12px; }
#error { background: var(--dead); color: #fff; padding: 8px 12px; border-radius: 6px; }
#counts { display: grid; grid-template-columns: repeat(auto-fit, minmax(120px, 1fr)); gap: 8px;
  list-style: none; padding: 0; margin: 16px 0 0; }
#activity { display: block; width: 100%; height: 100px; background: var(--panel); border: 1px solid var(--line);
  border-radius: 8px; }
#activity .completed, .key.completed { fill: var(--completed); background: var(--completed); }
#activity .failed, .key.failed { fill: var(--failed); background: var(--failed); }
.key { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-left: 8px; }
#counts a { display: block; padding: 10px 12px; border: 1px solid var(--line); border-radius: 8px;
  background: var(--panel); color: var(--fg); text-decoration: none; }
#counts .n { display: block; font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
#counts li[aria-current] a { outline: 2px solid var(--accent); }
.scroll { overflow-x: auto; border: 1px solid var(--line); border-radius: 8px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); white-space: nowrap;
  vertical-align: top; }
tbody tr:last-child td { border-bottom: 0; }
th { font-weight: 600; color: var(--muted); background: var(--panel); font-size: 12px; }
.num { font-variant-numeric: tabular-nums; text-align: right; }
td.command, td.text { white-space: pre-wrap; overflow-wrap: anywhere; max-width: 480px;
  font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
.fields th { width: 1%; }
td.empty { color: var(--muted); text-align: center; }
.state { font-weight: 600; }
.state.pending { color: var(--pending); } .state.processing { color: var(--processing); }
.state.completed { color: var(--completed); } .state.failed { color: var(--failed); }
.state.dead { color: var(--dead); } .state.canceled { color: var(--canceled); }
form { display: flex; flex-wrap: wrap; gap: 8px; margin-bottom: 8px; align-items: center; }
.spacer { flex: 1; }
input, select, button { font: inherit; color: inherit; background: var(--bg); border: 1px solid var(--line);
  border-radius: 6px; padding: 5px 9px; }
button { cursor: pointer; background: var(--panel); }
button:hover { border-color: var(--accent); }
button.danger { color: var(--dead); }
button[disabled] { opacity: .5; cursor: default; }
td button { padding: 2px 8px; font-size: 12px; }
pre { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 10px;
  max-height: 480px; overflow: auto; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 12px; }
.pager { display: flex; gap: 8px; }
#job-why { padding-left: 18px; }
@media (max-width: 640px) {
  body { padding: 0 10px 24px; }
  #counts { grid-template-columns: repeat(3, 1fr); }
  .spacer { display: none; }
  .wide { display: none; }
  td.command { max-width: 180px; min-width: 120px; }
  th, td { padding: 6px 6px; }
}
"""

PAGE_JS = r"""
"use strict";
const STATES = ["pending", "processing", "failed", "dead", "completed", "canceled"];
const $ = (selector) => document.querySelector(selector);
const view = { filter: { state: "", queue: "", q: "" }, before: null, next: null, job: null, run: null, tails: {} };
let timer = null;  // the next refresh
const TAIL_KEPT = 262144;  // characters of a live tail the page keeps: a job may print for days

// One element, its children given as nodes or text (text is never parsed as markup).
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key.startsWith("data-") || key.startsWith("aria-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

async function api(path, method = "GET") {
  const response = await fetch(path, { method, credentials: "same-origin", headers: { Accept: "application/json" } });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

const q = encodeURIComponent;
const time = (iso) => (iso ? `${iso.slice(0, 19).replace("T", " ")}Z` : "-");  // UTC, as the CLI shows it
const stateCell = (state) => el("td", { className: `state ${state}` }, state);

function fill(tbody, rows, columns, empty) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { className: "empty", colSpan: columns }, empty))]));
}

function button(label, action, onClick, className = "") {
  return el("button", { type: "button", className, "data-action": action, onclick: onClick }, label);
}

// A change, asked for once more when it destroys; the page refreshes after it.
async function change(path, question) {
  if (question && !window.confirm(question)) return;
  try {
    await api(path, "POST");
    showError("");
  } catch (error) {
    showError(error.message);
  }
  refresh();
}

// An error stays until the next change, or, if a refresh failed, until one succeeds.
let errorFromRefresh = false;
function showError(text, fromRefresh = false) {
  $("#error").textContent = text;
  $("#error").hidden = !text;
  errorFromRefresh = fromRefresh && Boolean(text);
}

// --- the overview -----------------------------------------------------------

function renderCounts(status) {
  $("#counts").replaceChildren(...STATES.map((state) => {
    const item = el("li", { "data-state": state },
      el("a", { href: "#/", onclick: (event) => { event.preventDefault(); filterBy({ state: view.filter.state === state ? "" : state }); } },
        el("span", { className: "n" }, status.jobs[state]), el("span", { className: `state ${state}` }, state)));
    if (view.filter.state === state) item.setAttribute("aria-current", "true");
    return item;
  }));
}

function renderQueues(queues) {
  fill($("#queues tbody"), queues.map((queue) => el("tr", { "data-queue": queue.queue },
    el("td", {}, el("a", { href: "#/", onclick: (event) => { event.preventDefault(); filterBy({ queue: queue.queue }); } }, queue.queue)),
    el("td", {}, queue.paused ? "paused" : "no"), el("td", { className: "num" }, queue.limit || "-"),
    ...["pending", "processing", "failed", "dead", "completed", "canceled"].map((state) => el("td", { className: "num" }, queue.jobs[state])),
    el("td", {}, queue.paused
      ? button("Resume", "resume", () => change(`/api/queues/${q(queue.queue)}/resume`))
      : button("Pause", "pause", () => change(`/api/queues/${q(queue.queue)}/pause`))))), 10, "no queues");
}

function renderWorkers(workers) {
  fill($("#workers tbody"), workers.filter((w) => w.kind === "worker").map((worker) => el("tr", { "data-worker": worker.id },
    el("td", {}, worker.id), el("td", {}, worker.host), el("td", { className: "num" }, worker.pid),
    el("td", {}, worker.queues.length ? worker.queues.join(", ") : "all"), el("td", {}, time(worker.started_at)),
    el("td", {}, worker.current_job ? el("a", { href: `#/jobs/${q(worker.current_job)}` }, worker.current_job) : "idle"))),
  6, "no workers are running");
}

function renderSchedules(schedules) {
  fill($("#schedules tbody"), schedules.map((s) => el("tr", { "data-schedule": s.name },
    el("td", {}, s.name), el("td", {}, s.cron), el("td", {}, s.tz),
    el("td", {}, s.paused ? "paused" : time(s.next_tick_at)),
    el("td", {}, s.last_job_id ? el("a", { href: `#/jobs/${q(s.last_job_id)}` }, s.last_job_id) : "-"),
    el("td", { className: "command" }, s.job.command || ""),
    el("td", {},
      s.paused ? button("Resume", "resume", () => change(`/api/schedules/${q(s.name)}/resume`))
               : button("Pause", "pause", () => change(`/api/schedules/${q(s.name)}/pause`)),
      " ", button("Run now", "run", () => change(`/api/schedules/${q(s.name)}/run`))))), 7, "no schedules");
}

// Stacked bars, one a minute: completed below, failed on top, scaled to the busiest minute.
function renderActivity(activity) {
  const svg = "http://www.w3.org/2000/svg", width = 600 / activity.minutes.length, height = 96;
  const most = Math.max(1, ...activity.minutes.map((m) => m.completed + m.failed));
  const bars = [];
  activity.minutes.forEach((m, i) => {
    let top = height + 2;
    for (const [kind, n] of [["completed", m.completed], ["failed", m.failed]]) {
      if (!n) continue;
      const bar = document.createElementNS(svg, "rect"), tall = Math.max(1, (n / most) * height);
      top -= tall;
      for (const [name, value] of [["x", i * width + 1], ["y", top], ["width", width - 2], ["height", tall]]) bar.setAttribute(name, value);
      bar.setAttribute("class", kind);
      bar.setAttribute("data-minute", m.minute);
      const title = document.createElementNS(svg, "title");
      title.textContent = `${time(m.minute).slice(11, 16)} UTC: ${m.completed} completed, ${m.failed} failed`;
      bar.append(title);
      bars.push(bar);
    }
  });
  $("#activity").replaceChildren(...bars);
  const total = (kind) => activity.minutes.reduce((sum, m) => sum + m[kind], 0);
  $("#activity-total").textContent = `· this hour: ${total("completed")} completed, ${total("failed")} failed; ` +
    `the busiest minute: ${most}`;
}

function renderJobs(page) {
  fill($("#jobs tbody"), page.jobs.map((job) => el("tr", { "data-job": job.id },
    el("td", {}, el("a", { href: `#/jobs/${q(job.id)}` }, job.id)), stateCell(job.state), el("td", {}, job.queue),
    el("td", { className: "num wide" }, job.attempts), el("td", { className: "wide" }, time(job.updated_at)),
    el("td", { className: "command" }, job.command))), 6, page.next ? "none here: look further with Older" : "no jobs");
  view.next = page.next;
  $("#older").hidden = !page.next;
  $("#newest").hidden = !view.before;
}

function jobsPath() {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(view.filter)) if (value) params.set(key, value);
  if (view.before) params.set("before", view.before);
  params.set("brief", "1");  // no output tails in the list
  return `/api/jobs?${params}`;
}

function filterBy(changes) {
  Object.assign(view.filter, changes);
  const form = $("#filter");
  for (const key of ["state", "queue", "q"]) form.elements[key].value = view.filter[key];
  view.before = null;
  refresh();
}

// Each part on its own: one failing (a page of jobs whose first job was
// purged) leaves the others live.
async function refreshOverview(generation) {
  const paths = ["/api/status", "/api/queues", "/api/workers", "/api/schedules", jobsPath(), "/api/activity"];
  const answers = await Promise.allSettled(paths.map((path) => api(path)));
  if (generation !== refreshes) return;
  [renderCounts, renderQueues, renderWorkers, renderSchedules, renderJobs, renderActivity].forEach((render, i) => {
    if (answers[i].status === "fulfilled") render(answers[i].value);
  });
  const failed = answers.find((answer) => answer.status === "rejected");
  if (answers[4].status === "rejected" && view.before) view.before = null;  // back to the newest next time
  if (failed) throw failed.reason;
}

// --- one job ----------------------------------------------------------------

function renderJob(job, why) {
  $("#job-title").textContent = job.id;
  $("#job-cancel").disabled = !["pending", "failed", "processing"].includes(job.state);
  $("#job-retry").disabled = !["dead", "canceled"].includes(job.state);
  $("#job-why").replaceChildren(...why.reasons.map((reason) => el("li", { "data-code": reason.code }, reason.text)));
  const fields = Object.entries(job).filter(([key]) => !["runs", "stdout", "stderr"].includes(key));
  $("#job-fields tbody").replaceChildren(...fields.map(([key, value]) => el("tr", { "data-field": key },
    el("th", {}, key),
    el("td", { className: key === "state" ? `text state ${value}` : "text" },
      value === null ? "-" : key.endsWith("_at") ? time(value) : typeof value === "object" ? JSON.stringify(value) : value))));
  fill($("#job-runs tbody"), job.runs.map((run) => el("tr", { "data-run": run.run },
    el("td", { className: "num" }, run.run), el("td", { className: "num" }, run.attempt),
    el("td", { className: `state ${run.outcome === "running" ? "processing" : run.outcome === "completed" ? "completed" : "failed"}` }, run.outcome),
    el("td", { className: "num" }, run.exit_code ?? "-"), el("td", {}, time(run.started_at)), el("td", {}, time(run.finished_at)),
    el("td", {}, run.worker || "-"), el("td", {}, run.host || "-"), el("td", { className: "text" }, run.error || "-"))),
  9, "not run yet");
  const picker = $("#job-run");
  const runs = job.runs.map((run) => String(run.run));
  if (picker.options.length !== runs.length) {
    picker.replaceChildren(...runs.map((run) => el("option", { value: run }, `run ${run}`)));
    picker.value = view.run ? String(view.run) : runs[runs.length - 1] || "";
  }
  picker.hidden = !runs.length;
}

// A run's output, read from where the page left off, as `logs -f` reads it.
async function tail(stream, target, generation) {
  const run = view.run || (view.job && view.job.runs.length ? view.job.runs[view.job.runs.length - 1].run : null);
  const key = `${view.job.id} ${run} ${stream}`;
  let seen = view.tails[stream];
  if (!seen || seen.key !== key) {
    seen = view.tails[stream] = { key, to: 0 };
    target.textContent = "";
  }
  if (!run) {
    target.textContent = view.job[stream] || "";  // never run: nothing, or what it kept from before runs were kept
    return;
  }
  const part = await api(`/api/jobs/${q(view.job.id)}/output?run=${run}&stream=${stream}&from=${seen.to}`);
  if (generation !== refreshes) return;  // a newer refresh reads it
  const atBottom = target.scrollTop + target.clientHeight >= target.scrollHeight - 4;
  if (part.skipped) target.append(`[${part.skipped} bytes skipped]\n`);
  if (part.data) target.append(part.data);
  if (target.textContent.length > TAIL_KEPT) target.textContent = target.textContent.slice(-TAIL_KEPT);
  if (atBottom) target.scrollTop = target.scrollHeight;  // follow the output unless the reader scrolled up
  seen.to = part.to;
}

async function refreshJob(id, generation) {
  const [job, why] = await Promise.all([api(`/api/jobs/${q(id)}`), api(`/api/jobs/${q(id)}/why`)]);
  if (generation !== refreshes) return;
  view.job = job;
  renderJob(job, why);
  await Promise.all([tail("stdout", $("#job-output"), generation), tail("stderr", $("#job-stderr"), generation)]);
}

// --- routing and the refresh loop -------------------------------------------

function route() {
  const match = location.hash.match(/^#\/jobs\/(.+)$/);
  let id = null;
  try {
    id = match ? decodeURIComponent(match[1]) : null;
  } catch {
    id = match[1];  // not percent-encoded text: the API answers 404 for it
  }
  $("#overview").hidden = Boolean(id);
  $("#job").hidden = !id;
  if (!view.job || view.job.id !== id) {
    view.job = id ? { id, runs: [] } : null;
    view.run = null;
    view.tails = {};
    $("#job-run").replaceChildren();
  }
  return id;
}

// Each refresh has a number; only the latest renders and sets the next timer,
// so a click during a refresh never starts a second loop.
let refreshes = 0;
async function refresh() {
  clearTimeout(timer);
  const generation = ++refreshes;
  const id = route();
  try {
    if (id) await refreshJob(id, generation);
    else await refreshOverview(generation);
    if (errorFromRefresh) showError("");
    $("#updated").textContent = `updated ${new Date().toISOString().slice(11, 19)}Z`;
  } catch (error) {
    if (generation === refreshes) showError(error.message, true);
  }
  if (generation !== refreshes) return;
  if (document.visibilityState === "visible") {
    const running = id && view.job && view.job.state === "processing";
    timer = setTimeout(refresh, running ? 1000 : 2000);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  if (location.search.includes("token=")) history.replaceState(null, "", "/" + location.hash);  // the cookie has it now
  $("#filter").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.target.elements;
    filterBy({ state: form.state.value, queue: form.queue.value.trim(), q: form.q.value.trim() });
  });
  $("#older").addEventListener("click", () => { view.before = view.next; refresh(); });
  $("#newest").addEventListener("click", () => { view.before = null; refresh(); });
  $("#dlq-retry").addEventListener("click", () => change("/api/dlq/retry"));
  $("#dlq-purge").addEventListener("click", () => change("/api/dlq/purge", "Delete every dead job for good?"));
  $("#job-cancel").addEventListener("click", () => change(`/api/jobs/${q(view.job.id)}/cancel`, `Cancel ${view.job.id}?`));
  $("#job-retry").addEventListener("click", () => change(`/api/jobs/${q(view.job.id)}/retry`));
  $("#job-run").addEventListener("change", (event) => { view.run = Number(event.target.value); refresh(); });
  window.addEventListener("hashchange", refresh);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") refresh();
    else clearTimeout(timer);
  });
  refresh();
});
"""


# ---------------------------------------------------------------------------
# CLI: the demo
# ---------------------------------------------------------------------------

def cmd_demo(args):
    """The whole life of a queue in a few seconds, on a fresh temporary database."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="queuectl-demo-") as tmp:
        db = args.db if args.db else os.path.join(tmp, "demo.db")
        Demo(db, tmp).run()


class Demo:
    """The README's first command: real commands on a real database, narrated."""

    def __init__(self, db, workdir):
        self.db, self.workdir = db, workdir

    def say(self, text):
        print(f"\n# {text}", flush=True)

    def queuectl(self, *argv):
        """Run one queuectl command in this process, echoing it like a shell session."""
        import io
        from contextlib import redirect_stdout
        print("$ queuectl " + " ".join(quote(a) for a in argv), flush=True)
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            code = main(["--db", self.db, *argv])
        print(buffer.getvalue(), end="", flush=True)
        if code != 0:
            raise QueueError(f"demo step failed: queuectl {' '.join(argv)} (exit {code})")
        return buffer.getvalue().split()

    def workers(self, count):
        """Run a burst of real worker processes; their log lines show each job event."""
        import subprocess
        argv = ["worker", "start", "--count", str(count), "--burst"]
        print("$ queuectl " + " ".join(argv), flush=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--db", self.db, *argv],
                       stdout=sys.stdout, stderr=sys.stdout, check=True)

    def run(self):
        """The story: enqueue, run, fail into the DLQ, retry from there, report."""
        print(f"queuectl {__version__} demo on {self.db}")
        with closing(connect(self.db)) as conn:
            if sum(count_by_state(conn).values()):
                raise QueueError(f"the demo needs an empty database; '{self.db}' has jobs")
        self.say("Fast retries for the demo: waits of 1.5 s, then 2.25 s.")
        self.queuectl("config", "set", "backoff_base", "1.5")
        self.say("Jobs: two priorities, a scheduled one, one that waits for another.")
        self.queuectl("enqueue", "-c", "echo hello from queuectl", "--id", "hello")
        self.queuectl("enqueue", "-c", "echo low priority", "--id", "low", "--priority", "-5")
        self.queuectl("enqueue", "-c", "echo high priority runs first", "--id", "high", "--priority", "10")
        self.queuectl("enqueue", "-c", "echo scheduled 2 s later", "--id", "later", "--delay", "2")
        self.queuectl("enqueue", "-c", "echo after hello", "--id", "child", "--after", "hello")
        self.say("One that times out, and one that fails until a file exists (JSON form).")
        self.queuectl("enqueue", "-c", "sleep 30", "--id", "slow", "--timeout", "1", "--max-retries", "0")
        self.queuectl("enqueue", json.dumps({
            "id": "flaky", "command": "test -f ready || { echo 'not ready' >&2; exit 3; }",
            "cwd": self.workdir, "max_retries": 2}))
        self.queuectl("status")
        self.say("Two workers drain the queue (--burst: stop when nothing is left to do).")
        self.workers(2)
        self.say("The failing job spent its retries and sits in the dead letter queue.")
        self.queuectl("dlq", "list")
        self.queuectl("logs", "flaky", "--stderr")
        self.say("Fix the cause, retry it from the DLQ, and run a worker again.")
        open(os.path.join(self.workdir, "ready"), "w").close()
        self.queuectl("dlq", "retry", "flaky")
        self.workers(1)
        self.queuectl("list")
        self.queuectl("status")


def quote(text):
    """Shell-quote text for the demo's echo of a command line."""
    import shlex
    return shlex.quote(text)


# ---------------------------------------------------------------------------
# CLI: the benchmark
# ---------------------------------------------------------------------------
#
# Every measure runs the real command line (this file under sys.executable) on
# a temporary database; nothing here asserts a time, it only reports.

BENCH_JOBS = 2000  # (a): `true` jobs through the workers
BENCH_WORKERS = 2
BENCH_BARE_S = 3.0  # (a): how long each bare spawn loop runs
BENCH_BULK_LINES = 100_000  # (b)
BENCH_STARTS = 15  # (c): runs of each command; the median counts
BENCH_PICKUPS = 30  # (d)
BENCH_IDLE_S = 5.0  # (e)
BENCH_LARGE_JOBS = 1_000_000  # (f)
BENCH_LARGE_ROUNDS = 3  # (f): bursts on each database, alternately
BENCH_LARGE_OUTPUT = 1_000_000_000  # (g): bytes the job writes to stdout
BENCH_FUTURE_JOBS = 100_000  # (h): jobs due in a year, beside the ones being claimed
BENCH_FAR_JOBS = 500  # (k): jobs through PostgreSQL BENCH_DELAY_S away
BENCH_DELAY_S = 0.001  # (k): how far away: each round trip takes this much more

# W copies of this run side by side for (a)'s baseline: a process that only
# spawns `/bin/sh -c true` and waits, as fast as it can. argv: seconds, start time.
BARE_SPAWN_LOOP = """
import subprocess, sys, time
time.sleep(max(float(sys.argv[2]) - time.time(), 0))
start = time.monotonic()
end, count = start + float(sys.argv[1]), 0
while time.monotonic() < end:
    subprocess.run(["/bin/sh", "-c", "true"])
    count += 1
print(count / (time.monotonic() - start))
"""


def cmd_bench(args):
    """Measure throughput, enqueue, startup, pickup, idle CPU (and, with --large, scale and memory)."""
    import tempfile
    print(machine_description() + "\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="queuectl-bench-") as tmp:
        bench = Bench(tmp)
        measures = [("a", bench.throughput), ("b", bench.bulk_enqueue), ("c", bench.startup),
                    ("d, e", bench.pickup_and_idle), ("h", bench.future_backlog)]
        if args.pg:
            measures += [("i, j", lambda: bench.postgresql(args.pg))]
        if args.large:
            measures += [("f", bench.large_database), ("g", bench.large_output)]
        for keys, measure in measures:
            print(f"bench: measuring ({keys})", file=sys.stderr, flush=True)
            rows += measure()
    print_table(("", "MEASURE", "RESULT", "TARGET", "MET?"), rows)
    if not args.pg:
        print("\n(i) and (j) need --pg postgresql://... (a database whose role may create schemas)")
    if not args.large:
        print("(f) and (g) need --large (a few minutes)")


def machine_description():
    """One line: cores, CPU model, OS, Python and SQLite versions."""
    import platform
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return (f"machine: {os.cpu_count()} cores, {model}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; SQLite {sqlite3.sqlite_version}")


def bench_row(key, measure, result, target, met):
    """A table row; met is True, False or None (not measured here)."""
    return (key, measure, result, target, {True: "yes", False: "NO", None: "-"}[met])


def median(values):
    """The middle value (the mean of the two middle ones for an even count)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values, fraction):
    """The value below which `fraction` of values lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(max(math.ceil(fraction * len(ordered)) - 1, 0), len(ordered) - 1)]


class Bench:
    """The measures of `queuectl bench`, each on its own database in one temporary directory."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.script = os.path.abspath(__file__)

    # -- running the real command line --------------------------------------

    def db(self, name):
        """A fresh database path in the temporary directory."""
        return os.path.join(self.tmp, name + ".db")

    def cli(self, db, *argv, timeout=600):
        """Run `queuectl --db DB ARGV` as a real process; a failure or a hang is a QueueError."""
        import subprocess
        try:
            subprocess.run([sys.executable, self.script, "--db", db, *argv], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
        except subprocess.CalledProcessError as e:
            raise QueueError(f"bench: `queuectl {' '.join(argv)}` failed (exit {e.returncode}): "
                             f"{one_line(e.stderr.decode(errors='replace'))}") from None
        except subprocess.TimeoutExpired:
            raise QueueError(f"bench: `queuectl {' '.join(argv)}` still ran after {seconds_text(timeout)}") from None

    def enqueue_file(self, db, count, command="true", delay_s=0):
        """Enqueue `count` copies of one command through `enqueue -f`; the seconds it took."""
        path = os.path.join(self.tmp, f"jobs-{count}-{delay_s}.jsonl")
        if not os.path.exists(path):
            job = {"command": command, **({"delay": delay_s} if delay_s else {})}
            with open(path, "w") as f:
                f.write((json.dumps(job) + "\n") * count)
        started = time.perf_counter()
        self.cli(db, "enqueue", "-f", path)
        return time.perf_counter() - started

    def start_pool(self, db, count):
        """Start `worker start --count N` (not burst) and wait until its workers listen; the process."""
        import subprocess
        pool = subprocess.Popen([sys.executable, self.script, "--db", db, "worker", "start", "--count", str(count)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with closing(connect(db, durable=False)) as conn:
            deadline = time.monotonic() + 30
            while conn.execute("SELECT count(*) FROM workers WHERE kind = 'worker'").fetchone()[0] < count:
                if pool.poll() is not None or time.monotonic() > deadline:
                    raise QueueError(f"bench: the worker pool did not start (exit {pool.poll()})")
                time.sleep(0.02)
            pids = [row[0] for row in conn.execute("SELECT pid FROM workers WHERE kind = 'worker'")]
        return pool, pids

    def stop_pool(self, pool):
        """Stop a pool gracefully (SIGTERM drains) and wait for it; kill it if it hangs."""
        import subprocess
        pool.send_signal(signal.SIGTERM)
        try:
            pool.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pool.kill()
            pool.wait()

    # -- (a) throughput ------------------------------------------------------

    def throughput(self):
        """(a) BENCH_JOBS `true` jobs through W workers, next to W bare spawn loops."""
        bare_before = self.bare_spawn_rate(BENCH_WORKERS)
        rate = self.burst_rate(self.db("throughput"), BENCH_JOBS, BENCH_WORKERS)
        bare = (bare_before + self.bare_spawn_rate(BENCH_WORKERS)) / 2  # before and after: drift evens out
        ratio = rate / bare
        return [bench_row("a", f"{BENCH_JOBS} x `true`, {BENCH_WORKERS} workers, vs bare spawn loops",
                          f"{rate:.0f} vs {bare:.0f} jobs/s: {ratio:.2f}", "≥ 0.90", ratio >= 0.90)]

    def bare_spawn_rate(self, processes):
        """Spawns per second of `processes` loops of subprocess.run(['/bin/sh', '-c', 'true'])."""
        import subprocess
        start_at = str(time.time() + 0.5)  # all loops begin together, after their startup
        loops = [subprocess.Popen([sys.executable, "-c", BARE_SPAWN_LOOP, str(BENCH_BARE_S), start_at],
                                  stdout=subprocess.PIPE, text=True) for _ in range(processes)]
        return sum(float(loop.communicate(timeout=60)[0]) for loop in loops)

    def burst_rate(self, db, jobs, workers):
        """Enqueue `jobs` x `true`, run a burst; jobs/s from the first start to the last finish.

        Timed from the database, so the supervisor's and workers' startup is
        not counted, only the pool at work.
        """
        before = last_seq(db)
        self.enqueue_file(db, jobs)
        self.cli(db, "worker", "start", "--count", str(workers), "--burst")
        return completion_rate(db, before, jobs)

    def pool_rate(self, db, jobs, workers):
        """burst_rate through a standing pool, for a database where a burst would never end (jobs not yet due)."""
        before = last_seq(db)
        self.enqueue_file(db, jobs)
        pool, _ = self.start_pool(db, workers)
        try:
            with closing(connect(db, durable=False)) as conn:
                deadline = time.monotonic() + 600
                while conn.execute("SELECT count(*) FROM jobs WHERE seq > ? AND state = 'completed'",
                                   (before,)).fetchone()[0] < jobs and time.monotonic() < deadline:
                    time.sleep(0.05)
        finally:
            self.stop_pool(pool)
        return completion_rate(db, before, jobs)

    # -- (b) bulk enqueue ------------------------------------------------------

    def bulk_enqueue(self):
        """(b) BENCH_BULK_LINES lines through one `enqueue -f` process, startup included."""
        seconds = self.enqueue_file(self.db("bulk"), BENCH_BULK_LINES)
        rate = BENCH_BULK_LINES / seconds
        return [bench_row("b", f"enqueue -f, {BENCH_BULK_LINES:,} lines", f"{rate:,.0f} jobs/s ({seconds:.2f} s)",
                          "≥ 100,000 jobs/s", rate >= 100_000)]

    # -- (c) startup -----------------------------------------------------------

    def startup(self):
        """(c) wall time of one `enqueue -c true` next to `python3 -c pass`, medians of alternate runs."""
        import subprocess
        db = self.db("startup")
        self.cli(db, "init")
        commands = {"enqueue": [sys.executable, self.script, "--db", db, "enqueue", "-c", "true"],
                    "pass": [sys.executable, "-c", "pass"]}
        times = {name: [] for name in commands}
        for _ in range(BENCH_STARTS):
            for name, argv in commands.items():
                started = time.perf_counter()
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=60)
                times[name].append(time.perf_counter() - started)
        enqueue_s, pass_s = median(times["enqueue"]), median(times["pass"])
        ratio = enqueue_s / pass_s
        return [bench_row("c", "one `enqueue -c true` vs `python3 -c pass`",
                          f"{enqueue_s * 1000:.0f} vs {pass_s * 1000:.0f} ms: {ratio:.2f}x", "≤ 1.5x", ratio <= 1.5)]

    # -- (d) pickup latency and (e) idle CPU -------------------------------------

    def pickup_and_idle(self):
        """(d) and (e) on one idle pool of W workers."""
        db = self.db("pickup")
        self.cli(db, "init")
        pool, pids = self.start_pool(db, BENCH_WORKERS)
        try:
            time.sleep(0.5)  # let the workers settle into their idle wait
            latencies = self.pickup_latencies(db)
            idle = max(self.idle_cpu(pids))
        finally:
            self.stop_pool(pool)
        return [self.pickup_row(latencies), self.idle_row(idle)]

    def pickup_latencies(self, db):
        """Seconds from each enqueue's commit to its command reading the clock, BENCH_PICKUPS times."""
        import random
        if not clock_command_works():
            return None
        latencies = []
        stamps = os.path.join(self.tmp, f"pickup-{len(os.listdir(self.tmp))}")
        os.mkdir(stamps)  # a directory of its own for each measure: no stamp is read twice
        for i in range(BENCH_PICKUPS):
            stamp = os.path.join(stamps, str(i))
            committed = enqueue_like_the_cli(db, f"date +%s.%N > {stamp}")
            latencies.append(read_stamp(stamp) - committed)
            time.sleep(random.uniform(0.05, 0.2))  # the workers go back to their idle wait
        return latencies

    def pickup_row(self, latencies):
        """(d)'s row: p50 and p95 against 10 and 50 ms."""
        target = "p50 ≤ 10 ms, p95 ≤ 50 ms"
        if latencies is None:
            return bench_row("d", "pickup latency, idle workers", "n/a: no `date +%s.%N` here", target, None)
        p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
        return bench_row("d", f"pickup latency, commit -> command starts ({len(latencies)} jobs)",
                         f"p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms", target, p50 <= 0.010 and p95 <= 0.050)

    def idle_cpu(self, pids):
        """The share of a core each idle worker used over BENCH_IDLE_S seconds, or None off Linux."""
        before = [process_cpu_s(pid) for pid in pids]
        started = time.monotonic()
        time.sleep(BENCH_IDLE_S)
        elapsed = time.monotonic() - started
        after = [process_cpu_s(pid) for pid in pids]
        if None in before or None in after:
            return [None]
        return [(b - a) / elapsed for a, b in zip(before, after)]

    def idle_row(self, share):
        """(e)'s row: the busiest idle worker's CPU against 1% of a core."""
        if share is None:
            return bench_row("e", "CPU of an idle worker", "n/a: no /proc here", "≤ 1% of a core", None)
        return bench_row("e", f"CPU of an idle worker over {BENCH_IDLE_S:.0f} s", f"{share * 100:.2f}% of a core",
                         "≤ 1% of a core", share <= 0.01)

    # -- (f) a large database ----------------------------------------------------

    def large_database(self):
        """(f) status time, claim throughput and bytes per job with BENCH_LARGE_JOBS finished jobs."""
        large, empty = self.db("large"), self.db("small")
        self.cli(large, "init")
        self.cli(empty, "init")
        fill_finished_jobs(large, BENCH_LARGE_JOBS)
        bytes_per_job = sum(os.path.getsize(large + suffix) for suffix in ("", "-wal")
                            if os.path.exists(large + suffix)) / BENCH_LARGE_JOBS
        status_s = median([self.timed_cli(large, "status") for _ in range(3)])
        empty_status_s = median([self.timed_cli(empty, "status") for _ in range(3)])
        empty_rates, large_rates = [], []
        for _ in range(BENCH_LARGE_ROUNDS):  # alternate, so a busy moment hits both sides
            empty_rates.append(self.burst_rate(empty, BENCH_JOBS // 2, BENCH_WORKERS))
            large_rates.append(self.burst_rate(large, BENCH_JOBS // 2, BENCH_WORKERS))
        empty_rate, large_rate = median(empty_rates), median(large_rates)
        ratio = large_rate / empty_rate
        return [
            bench_row("f", f"`status` with {BENCH_LARGE_JOBS:,} finished jobs",
                      f"{status_s * 1000:.0f} ms (empty: {empty_status_s * 1000:.0f} ms)", "≤ 200 ms", status_s <= 0.200),
            bench_row("f", "claim throughput there vs an empty database",
                      f"{large_rate:.0f} vs {empty_rate:.0f} jobs/s: {ratio:.2f}", "≥ 0.8", ratio >= 0.8),
            bench_row("f", "bytes on disk per finished job", f"{bytes_per_job:.0f} B", "report", None),
        ]

    # -- (i), (j) PostgreSQL next to SQLite ------------------------------------------

    def postgresql(self, url):
        """(i) PostgreSQL at W=2 and W=8 next to bare spawn loops and SQLite; (b), (h) there; (j) pickup via NOTIFY."""
        rows = []
        for workers in (2, 8):
            bare_before = self.bare_spawn_rate(workers)
            with bench_schema(url, f"bench_drain_{workers}"):
                self.cli(url, "init")
                pg_rate = self.burst_rate(url, BENCH_JOBS, workers)
            bare = (bare_before + self.bare_spawn_rate(workers)) / 2
            sqlite_rate = self.burst_rate(self.db(f"drain-{workers}"), BENCH_JOBS, workers)
            rows.append(bench_row("i", f"{BENCH_JOBS} x `true`, {workers} workers on PostgreSQL, vs bare spawn loops",
                                  f"{pg_rate:.0f} vs {bare:.0f} jobs/s: {pg_rate / bare:.2f} "
                                  f"(SQLite {sqlite_rate:.0f})", "≥ 0.90" if workers == 2 else "report",
                                  pg_rate / bare >= 0.90 if workers == 2 else None))
        with bench_schema(url, "bench_bulk"):
            self.cli(url, "init")
            seconds = self.enqueue_file(url, BENCH_BULK_LINES)
        rows.append(bench_row("b", f"enqueue -f, {BENCH_BULK_LINES:,} lines, on PostgreSQL",
                              f"{BENCH_BULK_LINES / seconds:,.0f} jobs/s ({seconds:.2f} s)", "≥ 100,000 jobs/s",
                              BENCH_BULK_LINES / seconds >= 100_000))
        with bench_schema(url, "bench_empty"), bench_schema(url, "bench_backlog"):
            rows.append(self.future_backlog(pg_url=url)[0])
        with bench_schema(url, "bench_pickup"):
            self.cli(url, "init")
            pool, _ = self.start_pool(url, BENCH_WORKERS)
            try:
                time.sleep(0.5)
                latencies = self.pickup_latencies(url)
            finally:
                self.stop_pool(pool)
        row = self.pickup_row(latencies)
        rows.append(("j", row[1].replace("pickup latency", "PostgreSQL pickup latency (NOTIFY)"), *row[2:]))
        return rows + self.round_trips(url)

    # -- (k) PostgreSQL's round trips, and a server 1 ms away ----------------------------

    def round_trips(self, url):
        """(k) statements and transactions per job on PostgreSQL, and jobs/s per worker 1 ms away."""
        with bench_schema(url, "bench_round_trips"):
            self.enqueue_file(url, BENCH_JOBS)
            before = server_statement_counts(url)  # the workers' statements only, not the enqueue's
            self.cli(url, "worker", "start", "--count", str(BENCH_WORKERS), "--burst")
            after = server_statement_counts(url)
        per_job = {key: (after[key] - before[key]) / BENCH_JOBS if after[key] is not None else None
                   for key in after}
        statements = (f"{per_job['statements']:.2f} statements" if per_job["statements"] is not None
                      else "statements: load pg_stat_statements to count them")
        rows = [bench_row("k", f"{BENCH_JOBS} x `true`, {BENCH_WORKERS} workers on PostgreSQL: per job",
                          f"{statements}, {per_job['transactions']:.2f} transactions", "≤ 3 round trips",
                          per_job["statements"] <= 3 if per_job["statements"] is not None else None)]
        with DelayProxy(url, BENCH_DELAY_S) as far_url, bench_schema(url, "bench_far"):
            self.cli(far_url, "init")
            rate = self.burst_rate(far_url, BENCH_FAR_JOBS, BENCH_WORKERS)
        rows.append(bench_row("k", f"{BENCH_FAR_JOBS} x `true`, {BENCH_WORKERS} workers, PostgreSQL "
                                   f"{BENCH_DELAY_S * 1000:g} ms away", f"{rate / BENCH_WORKERS:.0f} jobs/s per worker",
                              "report", None))
        return rows

    # -- (h) a backlog of jobs not yet due ------------------------------------------

    def future_backlog(self, pg_url=None):
        """(h) claim throughput beside BENCH_FUTURE_JOBS jobs due in a year, against an empty database.

        On SQLite two files; on PostgreSQL (pg_url) two schemas of it, which
        the caller makes and drops.
        """
        if pg_url is None:
            empty, backlog = (self.db("no-backlog"), None), (self.db("backlog"), None)
        else:
            empty, backlog = (pg_url, "bench_empty"), (pg_url, "bench_backlog")
        with using_schema(empty[1]):
            self.cli(empty[0], "init")
        with using_schema(backlog[1]):
            self.enqueue_file(backlog[0], BENCH_FUTURE_JOBS, delay_s=365 * 86400)
        rates = {empty: [], backlog: []}
        for _ in range(BENCH_LARGE_ROUNDS):  # alternate, so a busy moment hits both sides
            for (db, schema), db_rates in rates.items():
                with using_schema(schema):
                    db_rates.append(self.pool_rate(db, BENCH_JOBS // 2, BENCH_WORKERS))
        empty_rate, backlog_rate = median(rates[empty]), median(rates[backlog])
        ratio = backlog_rate / empty_rate
        where = " on PostgreSQL" if pg_url else ""
        return [bench_row("h", f"claim throughput{where} beside {BENCH_FUTURE_JOBS:,} jobs not yet due vs none",
                          f"{backlog_rate:.0f} vs {empty_rate:.0f} jobs/s: {ratio:.2f}", "≥ 0.8", ratio >= 0.8)]

    def timed_cli(self, db, *argv):
        """Seconds one CLI command takes, startup included."""
        started = time.perf_counter()
        self.cli(db, *argv)
        return time.perf_counter() - started

    # -- (g) a job with a huge output ------------------------------------------------

    def large_output(self):
        """(g) peak RSS of the worker running a job that writes BENCH_LARGE_OUTPUT bytes to stdout."""
        db = self.db("output")
        self.cli(db, "enqueue", "-c", f"head -c {BENCH_LARGE_OUTPUT} /dev/zero")
        pool, pids = self.start_pool(db, 1)
        try:
            with closing(connect(db, durable=False)) as conn:
                while job_state_of_only_job(conn) in ("pending", "processing"):
                    time.sleep(0.1)
            peak = peak_rss_bytes(pids[0])  # the worker is still alive: read its high-water mark
        finally:
            self.stop_pool(pool)
        gigabytes = BENCH_LARGE_OUTPUT / 1e9
        if peak is None:
            return [bench_row("g", f"peak RSS, job writing {gigabytes:g} GB", "n/a: no /proc here", "≤ 64 MB", None)]
        return [bench_row("g", f"peak RSS of a worker whose job writes {gigabytes:g} GB",
                          f"{peak / 2**20:.1f} MB", "≤ 64 MB", peak <= 64 * 2**20)]


def server_statement_counts(url):
    """{'statements', 'transactions'} the server has run in this database so far.

    Transactions from pg_stat_database (a statement outside BEGIN counts as
    one); statements from pg_stat_statements, None where it is not loaded.
    Each statement the workers send is one round trip: they pipeline nothing.
    """
    import psycopg
    time.sleep(1.0)  # backends report their statistics at most once a second (and when they exit)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        transactions = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                                    "WHERE datname = current_database()").fetchone()[0]
        try:
            statements = conn.execute("SELECT sum(calls) FROM pg_stat_statements WHERE dbid = "
                                      "(SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()[0]
        except psycopg.Error:  # not installed, not loaded, or not ours to read
            statements = None
    return {"statements": statements, "transactions": transactions}


class DelayProxy:
    """A TCP relay on the loopback in front of a PostgreSQL server, whose answers it holds back delay_s.

    So a bench can put the server `delay_s` away, as another host would be,
    with no privileges and no kernel support (tc netem): every round trip
    takes delay_s more. One thread; `with` gives the URL through it.
    """

    def __init__(self, url, delay_s):
        import socket
        self.delay_s = delay_s
        parts = url_parts(url) or {}
        host, port = parts.get("host") or "/var/run/postgresql", int(parts.get("port") or 5432)
        self.server_address = ((socket.AF_UNIX, f"{host}/.s.PGSQL.{port}") if host.startswith("/")
                               else (socket.AF_INET, (host, port)))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.parts = parts

    def __enter__(self):
        import threading
        self.is_stopping = False
        self.thread = threading.Thread(target=self.relay, daemon=True)
        self.thread.start()
        from urllib.parse import quote
        user = quote(self.parts.get("user") or "", safe="")
        password = f":{quote(self.parts['password'], safe='')}" if self.parts.get("password") else ""
        port = self.listener.getsockname()[1]
        return f"postgresql://{user}{password}@127.0.0.1:{port}/{quote(self.parts.get('dbname') or '', safe='')}"

    def __exit__(self, *exc):
        self.is_stopping = True
        self.thread.join()
        self.listener.close()

    def relay(self):
        """Accept clients, pass what they send on at once, and what the server answers delay_s later."""
        import selectors
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.peer, self.servers = {}, set()  # each end's other end; the ends facing the server
        held = collections.deque()  # (when to send, to which end, bytes), in order
        while not self.is_stopping:
            for key, _ in self.selector.select(max(held[0][0] - time.monotonic(), 0) if held else 0.1):
                if key.fileobj is self.listener:
                    self.connect_a_client()
                elif key.fileobj in self.peer:  # not closed with its other end earlier in this round
                    self.pass_on(key.fileobj, held)
            while held and held[0][0] <= time.monotonic():
                _, to, data = held.popleft()
                with suppress(OSError):
                    to.sendall(data)
        for end in list(self.peer):
            end.close()

    def connect_a_client(self):
        """Accept a client and open its own connection to the server."""
        import selectors
        import socket
        client, _ = self.listener.accept()
        server = socket.socket(self.server_address[0], socket.SOCK_STREAM)
        server.connect(self.server_address[1])
        self.servers.add(server)
        for end in (client, server):  # as libpq does: no Nagle wait on top of the delay
            if end.family != socket.AF_UNIX:
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for one, other in ((client, server), (server, client)):
            self.peer[one] = other
            self.selector.register(one, selectors.EVENT_READ)

    def pass_on(self, end, held):
        """What one end sent: a client's at once, the server's into held; an end that closed closes its pair."""
        try:
            data = end.recv(65536)
        except OSError:
            data = b""
        if not data:
            for one in (end, self.peer[end]):
                if one in self.peer:
                    self.selector.unregister(one)
                    self.peer.pop(one)
                    self.servers.discard(one)
                    one.close()
        elif end in self.servers:
            held.append((time.monotonic() + self.delay_s, self.peer[end], data))
        else:
            with suppress(OSError):
                self.peer[end].sendall(data)


@contextmanager
def bench_schema(url, name):
    """Run a PostgreSQL measure in a fresh schema of its own ($QUEUECTL_PG_SCHEMA, inherited by
    the processes it starts), dropped afterwards."""
    import psycopg

    def drop():
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

    with using_schema(name):
        drop()
        try:
            yield
        finally:
            drop()


@contextmanager
def using_schema(name):
    """$QUEUECTL_PG_SCHEMA set to name (None: left as it is) for the connections and processes started within."""
    saved = os.environ.get("QUEUECTL_PG_SCHEMA")
    if name is not None:
        os.environ["QUEUECTL_PG_SCHEMA"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("QUEUECTL_PG_SCHEMA", None)
        else:
            os.environ["QUEUECTL_PG_SCHEMA"] = saved


def last_seq(db):
    """The newest job's seq (0 for none): jobs enqueued after this have a greater one."""
    with closing(connect(db)) as conn:
        return conn.execute("SELECT coalesce(max(seq), 0) FROM jobs").fetchone()[0]


def completion_rate(db, after_seq, jobs):
    """Jobs/s of the `jobs` jobs after after_seq, from the first start to the last finish (all must be done)."""
    with closing(connect(db)) as conn:
        first, last, done = conn.execute(
            "SELECT min(started_at), max(finished_at), count(*) FROM jobs WHERE seq > ? AND state = 'completed'",
            (after_seq,)).fetchone()
    if done != jobs:
        raise QueueError(f"bench: only {done} of {jobs} jobs completed")
    return done / (last - first)


def enqueue_like_the_cli(db, command):
    """Enqueue one job the way `enqueue -c` does, in this process; the time its commit returned."""
    with closing(connect(db)) as conn:
        enqueue_rows(conn, [job_row({"command": command}, load_config(conn), conn.now())])
        committed = time.time()
        conn.wake_workers()
    return committed


def clock_command_works():
    """Whether `date +%s.%N` prints epoch seconds with nanoseconds here (GNU date)."""
    import subprocess
    try:
        out = subprocess.run(["/bin/sh", "-c", "date +%s.%N"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
        return "." in out and out.strip().replace(".", "").isdigit()
    except (OSError, subprocess.SubprocessError):
        return False


def read_stamp(path, timeout_s=30.0):
    """The epoch seconds a job wrote to path, waiting for it to appear."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                text = f.read()
            if text.endswith("\n"):
                return float(text)
        except FileNotFoundError:
            pass
        time.sleep(0.001)
    raise QueueError(f"bench: no job wrote {path} within {seconds_text(timeout_s)}")


def process_cpu_s(pid):
    """CPU seconds (user + system) a process used so far, from /proc; None where there is none."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:  # nanoseconds on a CPU: finer than clock ticks
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes(pid):
    """A process's peak resident set size (VmHWM), or None where /proc has none."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def job_state_of_only_job(conn):
    """The state of the one job in a database that holds one."""
    return conn.execute("SELECT state FROM jobs").fetchone()[0]


def fill_finished_jobs(db, count):
    """Add `count` completed jobs, as a worker leaves a finished `true`, in one SQL statement.

    Running a million jobs would take an hour; what (f) measures is reading
    and claiming next to them, so they are written directly, ids and times
    shaped like real ones.
    """
    past = time.time() - 86400
    with closing(connect(db)) as conn:
        with conn.transaction():
            conn.execute("""
                WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)
                INSERT INTO jobs (id, command, queue, priority, max_retries, timeout_s, delay_s, env,
                                  depends_on, deps_left, state, attempts, run_at, exit_code,
                                  created_at, updated_at, started_at, finished_at)
                SELECT strftime('%Y%m%d-%H%M%S', :past + i * 0.01, 'unixepoch')
                       || printf('-%06d-%04x', i % 1000000, abs(random()) % 65536), 'true', 'default', 0, 3,
                       3600, 0, '{}', '[]', 0, 'completed', 1, :past + i * 0.01, 0,
                       :past + i * 0.01, :past + i * 0.01 + 0.002, :past + i * 0.01 + 0.001,
                       :past + i * 0.01 + 0.002
                FROM n
                """, {"count": count, "past": past})
            conn.add_to_counts({("default", "completed"): count})
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


# ---------------------------------------------------------------------------
# CLI: parser and main
# ---------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage."""

    def error(self, message):
        raise UsageError(message)


def build_parser():
    """The command line: one subcommand per operation, each with set_defaults(func=...)."""
    parser = ArgumentParser(prog="queuectl", description="A background job queue in one file.")
    parser.add_argument("--db", help="the SQLite file (default: $QUEUECTL_DB, else ./queuectl.db)")
    parser.add_argument("--version", action="version", version=f"queuectl {__version__}")
    as_json = ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print one JSON document")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, func, help_text, parents=(), subparsers=commands):
        sub = subparsers.add_parser(name, help=help_text, description=help_text, parents=list(parents))
        sub.set_defaults(func=func)
        return sub

    command("init", cmd_init, "create the database if missing")

    enqueue = command("enqueue", cmd_enqueue, "add jobs: JSON, -c COMMAND or -f FILE")
    enqueue.add_argument("job", nargs="?", help="one job as a JSON object")
    enqueue.add_argument("-c", "--command", help="the shell command of one job")
    enqueue.add_argument("-f", "--file", help="JSON Lines, one job a line ('-': stdin)")
    enqueue.add_argument("--id")
    enqueue.add_argument("--max-retries", type=int)
    enqueue.add_argument("--timeout", type=float, metavar="S")
    enqueue.add_argument("--priority", type=int)
    enqueue.add_argument("--queue")
    when = enqueue.add_mutually_exclusive_group()
    when.add_argument("--run-at", metavar="T", help="ISO-8601 time or epoch seconds")
    when.add_argument("--delay", type=float, metavar="S")
    enqueue.add_argument("--after", nargs="+", action="extend", metavar="ID", help="run after these jobs")
    enqueue.add_argument("--if-absent", action="store_true", help="skip jobs whose id exists")

    worker = command("worker", None, "start, stop or list workers")
    worker_commands = worker.add_subparsers(dest="worker_command", metavar="ACTION", required=True)
    start = command("start", cmd_worker_start, "run workers under a supervisor", subparsers=worker_commands)
    start.add_argument("--count", type=int, default=1)
    start.add_argument("--queue", nargs="+", action="extend", metavar="Q", help="only these queues")
    start.add_argument("--burst", action="store_true", help="exit once no job is left to run")
    start.add_argument("--detach", action="store_true", help="run in the background, log to <db>.log")
    start.add_argument("--start-method", choices=("fork", "spawn", "forkserver"),
                       help="multiprocessing start method (default: the platform's)")
    stop = command("stop", cmd_worker_stop, "stop every supervisor gracefully", subparsers=worker_commands)
    stop.add_argument("--timeout", type=float, default=30.0, metavar="S")
    command("list", cmd_worker_list, "live supervisors and workers", [as_json], worker_commands)

    command("status", cmd_status, "job counts, workers, oldest runnable job", [as_json])
    listing = command("list", cmd_list, "jobs, newest first", [as_json])
    listing.add_argument("--state", metavar="S[,S...]")
    listing.add_argument("--queue")
    listing.add_argument("--limit", type=int, default=100)
    command("show", cmd_show, "every field of one job", [as_json]).add_argument("id")
    logs = command("logs", cmd_logs, "a job's captured output, raw; -f follows it live")
    logs.add_argument("id")
    logs.add_argument("--stderr", action="store_true")
    logs.add_argument("--run", type=int, metavar="N", help="run N (default: the latest)")
    logs.add_argument("-f", "--follow", action="store_true", help="print the output as it is written, "
                      "run after run, until the job ends (exit as `wait`)")
    command("why", cmd_why, "why a job is where it is", [as_json]).add_argument("id")
    command("cancel", cmd_cancel, "cancel jobs").add_argument("ids", nargs="+", metavar="ID")
    command("retry", cmd_retry, "retry dead or canceled jobs").add_argument("ids", nargs="+", metavar="ID")

    dlq = command("dlq", None, "the dead letter queue")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    command("list", cmd_dlq_list, "dead jobs", [as_json], dlq_commands).add_argument(
        "--limit", type=int, default=100)
    dlq_retry = command("retry", cmd_dlq_retry, "retry dead jobs", subparsers=dlq_commands)
    dlq_retry.add_argument("ids", nargs="*", metavar="ID")
    dlq_retry.add_argument("--all", action="store_true")
    command("purge", cmd_dlq_purge, "delete dead jobs", subparsers=dlq_commands)

    purge = command("purge", cmd_purge, "delete ended jobs")
    purge.add_argument("--state", metavar="S[,S...]", help="end states (default: completed)")
    purge.add_argument("--older-than", metavar="DURATION", help="e.g. 90s, 15m, 12h, 7d")
    wait = command("wait", cmd_wait, "wait until jobs end")
    wait.add_argument("ids", nargs="+", metavar="ID")
    wait.add_argument("--timeout", type=float, metavar="S")

    queue = command("queue", None, "list, pause, resume or limit queues")
    queue_commands = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    command("list", cmd_queue_list, "queues with jobs or settings", [as_json], queue_commands)
    command("pause", cmd_queue_pause, "stop claiming jobs of queues", subparsers=queue_commands).add_argument(
        "queues", nargs="+", metavar="Q")
    command("resume", cmd_queue_resume, "claim jobs of queues again", subparsers=queue_commands).add_argument(
        "queues", nargs="+", metavar="Q")
    limit = command("limit", cmd_queue_limit, "at most N processing at once (0: no limit)",
                    subparsers=queue_commands)
    limit.add_argument("queue")
    limit.add_argument("limit", type=int, metavar="N")

    schedule = command("schedule", None, "recurring jobs: add, list, show, remove, pause, resume, run, next")
    schedule_commands = schedule.add_subparsers(dest="schedule_command", metavar="ACTION", required=True)
    add = command("add", cmd_schedule_add, "add a schedule: NAME CRON (JSON | -c COMMAND)",
                  subparsers=schedule_commands)
    add.add_argument("name")
    add.add_argument("cron", help="five fields, an @alias or '@every 15m' (quote it)")
    add.add_argument("job", nargs="?", help="the job template as a JSON object")
    add.add_argument("-c", "--command", help="the shell command of each job")
    add.add_argument("--max-retries", type=int)
    add.add_argument("--timeout", type=float, metavar="S")
    add.add_argument("--priority", type=int)
    add.add_argument("--queue")
    add.add_argument("--tz", metavar="ZONE", help="an IANA zone (default: this machine's)")
    add.add_argument("--catch-up", choices=CATCH_UP_POLICIES, default="latest",
                     help="ticks missed while no supervisor ran (default: latest)")
    add.add_argument("--no-overlap", action="store_true", help="skip a tick while the last job has not ended")
    command("list", cmd_schedule_list, "every schedule", [as_json], schedule_commands)
    command("show", cmd_schedule_show, "one schedule", [as_json], schedule_commands).add_argument("name")
    for name, func, help_text in (("remove", cmd_schedule_remove, "remove schedules (their jobs stay)"),
                                  ("pause", cmd_schedule_pause, "stop firing schedules"),
                                  ("resume", cmd_schedule_resume, "fire schedules again, from now")):
        command(name, func, help_text, subparsers=schedule_commands).add_argument("names", nargs="+", metavar="NAME")
    command("run", cmd_schedule_run, "one job from the template now", subparsers=schedule_commands).add_argument(
        "name")
    upcoming = command("next", cmd_schedule_next, "the next ticks of a CRON (reads no database)", [as_json],
                       schedule_commands)
    upcoming.add_argument("cron")
    upcoming.add_argument("--tz", metavar="ZONE")
    upcoming.add_argument("--from", dest="from_time", metavar="TIME", help="ISO-8601 or epoch (default: now)")
    upcoming.add_argument("--count", type=int, default=5)

    config = command("config", None, "read or change settings")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    command("get", cmd_config_get, "one setting", [as_json], config_commands).add_argument("key")
    config_set = command("set", cmd_config_set, "change a setting", subparsers=config_commands)
    config_set.add_argument("key")
    config_set.add_argument("value")
    command("list", cmd_config_list, "every setting", [as_json], config_commands)

    dashboard = command("dashboard", cmd_dashboard, "serve a web page and JSON API for this database")
    dashboard.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    dashboard.add_argument("--port", type=int, default=DASHBOARD_PORT, help="default 8765; 0 picks a free port")
    dashboard.add_argument("--read-only", action="store_true", help="refuse every change")

    command("demo", cmd_demo, "show the whole life of a queue in a few seconds")
    bench = command("bench", cmd_bench, "measure this machine against the performance targets")
    bench.add_argument("--large", action="store_true",
                       help="also 1,000,000 finished jobs and a 1 GB output (a few minutes)")
    bench.add_argument("--pg", metavar="URL", help="also PostgreSQL at URL: (i), (j), and (b), (h) there")
    return parser


def main(argv=None):
    """Run one command and return its exit code. Only here are errors printed."""
    parser = build_parser()
    for stream in (sys.stdout, sys.stderr):  # a job's text never fails to print in a narrow locale
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        args, extras = parser.parse_known_args(argv)
        if extras and getattr(args, "job", False) is None and len(extras) == 1 and not extras[0].startswith("-"):
            # `schedule add NAME CRON --tz Z JSON`: before 3.12 argparse takes a
            # command's positionals from their first run of words only.
            args.job = extras[0]
        elif extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.db_path = resolve_db_path(args.db)
        busy_timeout_s()  # a bad $QUEUECTL_BUSY_TIMEOUT is refused before anything starts
        code = args.func(args) or 0
        sys.stdout.flush()  # here, so a reader that left (| head) is handled below
        return code
    except QueueError as e:
        return fail(str(e), e.exit_code)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # reader left: no noise at exit
        return 1
    except KeyboardInterrupt:
        return 130
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else 0
    except Exception as e:  # a bug: one line, unless debugging
        if os.environ.get("QUEUECTL_DEBUG") == "1":
            raise
        return fail(f"internal error: {e!r} (set QUEUECTL_DEBUG=1 for the traceback)", 1)


def fail(message, exit_code):
    """Print one error line and return the exit code; control characters are escaped."""
    print(f"queuectl: error: {printable(message)}", file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
