-- Kiln scheduler schema, version 11: studio orders and incidents (the same on SQLite and
-- PostgreSQL). An order's row is the projection of its events: its steps, their checkpoints and
-- its approval live in `doc` (JSON, read and written only by the conductor), and `version`
-- makes each change a compare-and-set. An incident is what needs the operator, raised once per
-- `cause`.

CREATE TABLE orders (
    id         TEXT   PRIMARY KEY,
    plan       TEXT   NOT NULL,
    client     TEXT   NOT NULL,             -- the token that placed it
    state      TEXT   NOT NULL,             -- running | awaiting_approval | succeeded | failed | cancelled
    doc        TEXT   NOT NULL,             -- JSON: request, steps with checkpoints, approval, outputs
    version    BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX orders_state ON orders (state, created_ms);
CREATE INDEX orders_created ON orders (created_ms, id);

CREATE TABLE order_events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id TEXT   NOT NULL,
    at_ms    BIGINT NOT NULL,
    step     TEXT,                          -- the step's name, when the event is about one
    state    TEXT   NOT NULL,               -- the order's or the step's new state
    detail   TEXT   NOT NULL
);
CREATE INDEX order_events_order ON order_events (order_id, seq);

CREATE TABLE incidents (
    id          TEXT   PRIMARY KEY,
    cause       TEXT   NOT NULL UNIQUE,     -- raised once per cause, not once per retry
    kind        TEXT   NOT NULL,            -- order_step | approval_timeout | job_failed | task_failed | ...
    subject     TEXT   NOT NULL,            -- what it concerns: an order, job or task id
    state       TEXT   NOT NULL,            -- open | resolved
    summary     TEXT   NOT NULL,
    created_ms  BIGINT NOT NULL,
    updated_ms  BIGINT NOT NULL,
    resolved_by TEXT,
    note        TEXT
);
CREATE INDEX incidents_state ON incidents (state, created_ms);
