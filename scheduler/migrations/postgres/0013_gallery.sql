-- The console's gallery reads the assets newest first, a page at a time.
CREATE INDEX assets_created ON assets (created_ms, hash);
