-- The projection skips a job whose row the statement's events leave as it is. A new job's row is
-- written as `queued` with its first event's time, so the `queued` event that comes with it
-- rewrote the row with the values it already had: the first of the three updates each rendered
-- job's row took (at submit, dispatch and result), a new row version and its WAL record. The row
-- is still the projection of its events (0004's rules); only the UPDATE's WHERE is new.

CREATE OR REPLACE FUNCTION job_events_project() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE jobs j SET
        state       = e.state,
        attempt     = e.attempt,
        asset       = COALESCE(e.asset, j.asset),
        error       = COALESCE(e.error, j.error),
        updated_ms  = e.at_ms,
        started_ms  = COALESCE(e.started_ms, j.started_ms),
        finished_ms = COALESCE(e.finished_ms, j.finished_ms)
    FROM (
        SELECT job_id,
            (array_agg(state ORDER BY seq DESC))[1] AS state,
            (array_agg(attempt ORDER BY seq DESC))[1] AS attempt,
            (array_agg(at_ms ORDER BY seq DESC))[1] AS at_ms,
            (array_agg(asset ORDER BY seq DESC) FILTER (WHERE asset IS NOT NULL))[1] AS asset,
            (array_agg(error ORDER BY seq DESC) FILTER (WHERE error IS NOT NULL))[1] AS error,
            (array_agg(at_ms ORDER BY seq DESC) FILTER (WHERE state = 'running'))[1] AS started_ms,
            (array_agg(at_ms ORDER BY seq DESC)
                FILTER (WHERE state IN ('succeeded', 'failed', 'cancelled', 'cached')))[1] AS finished_ms
        FROM new_events
        GROUP BY job_id
    ) e
    WHERE j.id = e.job_id
      AND (j.state, j.attempt, j.updated_ms, j.asset, j.error, j.started_ms, j.finished_ms)
          IS DISTINCT FROM (e.state, e.attempt, e.at_ms, COALESCE(e.asset, j.asset), COALESCE(e.error, j.error),
                            COALESCE(e.started_ms, j.started_ms), COALESCE(e.finished_ms, j.finished_ms));
    RETURN NULL;
END
$$;
