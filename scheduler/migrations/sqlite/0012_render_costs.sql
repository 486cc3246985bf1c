-- What each render cost: the device time it took on its worker, and that time weighed by its
-- tier ([scheduler.costs]). One row per job that rendered (a cache hit or an attached job has
-- none), written in the transaction that records the job's success.
CREATE TABLE render_costs (
    job_id    TEXT   PRIMARY KEY,
    client    TEXT   NOT NULL,
    tier      TEXT   NOT NULL,
    width     BIGINT NOT NULL,
    height    BIGINT NOT NULL,
    samples   BIGINT NOT NULL,
    device_ms BIGINT NOT NULL,
    cost_ms   BIGINT NOT NULL,            -- device_ms times the tier's weight when it ran
    at_ms     BIGINT NOT NULL
);
CREATE INDEX render_costs_client_at ON render_costs (client, at_ms);
CREATE INDEX render_costs_at ON render_costs (at_ms);
-- A token's budget, in weighted device-seconds per period (day, week or month, UTC); NULL for none.
ALTER TABLE api_tokens ADD COLUMN budget_seconds BIGINT;
ALTER TABLE api_tokens ADD COLUMN budget_period TEXT;
-- A budget counts what a client has in flight: its live jobs, by client.
CREATE INDEX jobs_client_live ON jobs (client) WHERE state IN ('queued', 'dispatched', 'running');
