-- The devices a device token's agent serves, comma-separated ('' for other tokens). The fleet
-- bridge signs a device's tasks with the key of the token that serves it, so an agent can tell
-- the scheduler's tasks from anyone else's on the broker.
ALTER TABLE api_tokens ADD COLUMN devices TEXT NOT NULL DEFAULT '';
