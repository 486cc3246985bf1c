-- Each asset's provenance record (JSON: who asked, model and version, parameters, backend,
-- timings) is kept with the asset's row, written in the same transaction as the result that made
-- it, instead of in a file beside the PNG, which was one of the two files a small render made
-- (with the PNG). NULL for an asset whose provenance is a file in the store (recorded before this
-- version, or uploaded by a worker on its own), or that came without one.
ALTER TABLE assets ADD COLUMN provenance TEXT;
