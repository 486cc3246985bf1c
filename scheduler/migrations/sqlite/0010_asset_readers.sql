-- Who may read an asset is looked up by its hash: the clients whose jobs have it, the devices
-- whose tasks work on it.
CREATE INDEX jobs_asset ON jobs (asset) WHERE asset IS NOT NULL;
CREATE INDEX device_tasks_asset ON device_tasks (asset) WHERE asset IS NOT NULL;
