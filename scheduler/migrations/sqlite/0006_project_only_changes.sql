-- The projection skips an event that changes nothing in its job's row. A new job's row is
-- written as `queued` with its first event's time, so the `queued` event that comes with it
-- rewrote the row with the values it already had: one of the four updates every rendered job's
-- row took (queued, dispatched, running, succeeded). The row is still the projection of its
-- events: the same SET, under a WHERE that the row differs from the values the SET writes.

DROP TRIGGER job_events_project;

CREATE TRIGGER job_events_project AFTER INSERT ON job_events
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
    WHERE id = NEW.job_id
      AND (state, attempt, asset, error, updated_ms, started_ms, finished_ms)
          IS NOT (NEW.state, NEW.attempt, COALESCE(NEW.asset, asset), COALESCE(NEW.error, error), NEW.at_ms,
                  CASE WHEN NEW.state = 'running' THEN NEW.at_ms ELSE started_ms END,
                  CASE WHEN NEW.state IN ('succeeded', 'failed', 'cancelled', 'cached') THEN NEW.at_ms
                       ELSE finished_ms END);
END;
