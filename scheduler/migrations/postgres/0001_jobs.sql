-- Kiln scheduler schema, version 1 (PostgreSQL): the same tables and columns as the SQLite schema.
-- The job row is the projection of its events: the trigger below applies each event to its job
-- as it is appended, in the same transaction.

CREATE TABLE jobs (
    seq             BIGSERIAL PRIMARY KEY,             -- creation order; the list cursor
    id              TEXT      NOT NULL UNIQUE,
    state           TEXT      NOT NULL,
    tier            TEXT      NOT NULL,
    request         TEXT      NOT NULL,                -- the resolved RenderRequest, JSON
    cache_key       TEXT      NOT NULL,
    client          TEXT      NOT NULL,                -- the submitting token's name
    idempotency_key TEXT,
    follows         TEXT,                              -- the job whose render this one waits on
    attempt         BIGINT    NOT NULL DEFAULT 0,
    asset           TEXT,
    error           TEXT,
    created_ms      BIGINT    NOT NULL,
    updated_ms      BIGINT    NOT NULL,
    started_ms      BIGINT,
    finished_ms     BIGINT
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (client, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_state_tier ON jobs (state, tier);
CREATE INDEX jobs_created ON jobs (created_ms);
CREATE INDEX jobs_live_key ON jobs (cache_key) WHERE state IN ('queued', 'dispatched', 'running');
CREATE INDEX jobs_follows ON jobs (follows) WHERE follows IS NOT NULL;

CREATE TABLE job_events (
    seq     BIGSERIAL PRIMARY KEY,
    job_id  TEXT      NOT NULL REFERENCES jobs (id),
    at_ms   BIGINT    NOT NULL,
    state   TEXT      NOT NULL,
    attempt BIGINT    NOT NULL,
    detail  TEXT      NOT NULL DEFAULT '',
    asset   TEXT,
    error   TEXT
);
CREATE INDEX job_events_job ON job_events (job_id, seq);

CREATE FUNCTION job_events_project() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE jobs SET
        state       = NEW.state,
        attempt     = NEW.attempt,
        asset       = COALESCE(NEW.asset, asset),
        error       = COALESCE(NEW.error, error),
        updated_ms  = NEW.at_ms,
        started_ms  = CASE WHEN NEW.state = 'running' THEN NEW.at_ms ELSE started_ms END,
        finished_ms = CASE WHEN NEW.state IN ('succeeded', 'failed', 'cancelled', 'cached') THEN NEW.at_ms
                           ELSE finished_ms END
    WHERE id = NEW.job_id;
    RETURN NULL;
END
$$;
CREATE TRIGGER job_events_project AFTER INSERT ON job_events FOR EACH ROW EXECUTE FUNCTION job_events_project();

-- Jobs to hand to a worker queue; `sent_ms` is set once the broker has confirmed them.
CREATE TABLE outbox (
    id         BIGSERIAL PRIMARY KEY,
    job_id     TEXT      NOT NULL REFERENCES jobs (id),
    tier       TEXT      NOT NULL,
    client     TEXT      NOT NULL,
    attempt    BIGINT    NOT NULL,
    not_before BIGINT    NOT NULL,
    sent_ms    BIGINT
);
CREATE INDEX outbox_unsent ON outbox (not_before) WHERE sent_ms IS NULL;

-- Rendered assets by content hash, and the cache key that made each.
CREATE TABLE assets (
    hash       TEXT   PRIMARY KEY,
    cache_key  TEXT   NOT NULL,
    bytes      BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX assets_key ON assets (cache_key);

-- API tokens: only the BLAKE3 of each secret is kept.
CREATE TABLE api_tokens (
    token_hash TEXT   PRIMARY KEY,
    name       TEXT   NOT NULL UNIQUE,
    role       TEXT   NOT NULL,
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);
