-- Who may read an asset is looked up by its hash: the clients whose jobs have it, the devices
-- whose tasks work on it.
CREATE INDEX jobs_asset ON jobs (asset) WHERE asset IS NOT NULL;
CREATE INDEX device_tasks_asset ON device_tasks (asset) WHERE asset IS NOT NULL;
-- Retention keeps an asset while a job or device task names it.
CREATE INDEX device_tasks_output ON device_tasks (output_asset) WHERE output_asset IS NOT NULL;
