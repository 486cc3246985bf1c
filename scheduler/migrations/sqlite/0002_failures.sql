-- Kiln scheduler schema, version 2 (SQLite; the same as PostgreSQL's): failed attempts by worker, and the
-- workers the scheduler drained. A job that fails on N distinct workers is quarantined; a worker
-- that fails M distinct jobs within a window is drained until the operator resumes it.

CREATE TABLE attempt_failures (
    job_id  TEXT   NOT NULL REFERENCES jobs (id),
    attempt BIGINT NOT NULL,
    worker  TEXT   NOT NULL,
    error   TEXT   NOT NULL,
    at_ms   BIGINT NOT NULL,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX attempt_failures_worker ON attempt_failures (worker, at_ms);

CREATE TABLE worker_controls (
    worker     TEXT   PRIMARY KEY,
    drained    TEXT,                      -- why it is drained; NULL once the operator resumed it
    changed_ms BIGINT NOT NULL            -- when it was drained or resumed
);
