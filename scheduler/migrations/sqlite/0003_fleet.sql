-- Kiln scheduler schema, version 3 (SQLite; the same as PostgreSQL's): the edge fleet. Devices as
-- their agents last announced them (retained status over MQTT) with their latest telemetry, and
-- the physical tasks sent to them with every state each went through.

CREATE TABLE devices (
    id            TEXT   PRIMARY KEY,
    kind          TEXT   NOT NULL,
    state         TEXT   NOT NULL,           -- online | degraded | offline
    detail        TEXT,                      -- why, for degraded and offline
    boot_id       TEXT   NOT NULL,
    version       TEXT   NOT NULL,
    capabilities  TEXT   NOT NULL,           -- JSON array
    status_ms     BIGINT NOT NULL,           -- when the agent said it (its clock)
    last_seen_ms  BIGINT NOT NULL,           -- when the scheduler last heard from it (its clock)
    telemetry     TEXT,                      -- JSON object: the latest readings
    telemetry_seq BIGINT NOT NULL DEFAULT 0,
    telemetry_ms  BIGINT,                    -- when the scheduler got the latest telemetry
    spool_dropped BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE device_tasks (
    id           TEXT   PRIMARY KEY,
    device_id    TEXT   NOT NULL,
    kind         TEXT   NOT NULL,            -- print | capture | display | lights
    asset        TEXT,
    params       TEXT   NOT NULL,            -- JSON object
    state        TEXT   NOT NULL,            -- queued | sent | accepted | running | succeeded | failed | timed_out | expired
    sends        BIGINT NOT NULL DEFAULT 0,
    next_send_ms BIGINT NOT NULL DEFAULT 0,  -- when an unanswered send is sent again
    deadline_ms  BIGINT NOT NULL,
    created_by   TEXT   NOT NULL,
    created_ms   BIGINT NOT NULL,
    updated_ms   BIGINT NOT NULL,
    detail       TEXT,
    output_asset TEXT
);
CREATE INDEX device_tasks_state ON device_tasks (state, next_send_ms);
CREATE INDEX device_tasks_device ON device_tasks (device_id, created_ms);

CREATE TABLE device_task_events (
    task_id TEXT   NOT NULL REFERENCES device_tasks (id),
    n       BIGINT NOT NULL,                 -- 1, 2, ... per task
    state   TEXT   NOT NULL,
    at_ms   BIGINT NOT NULL,
    detail  TEXT,
    PRIMARY KEY (task_id, n)
);
