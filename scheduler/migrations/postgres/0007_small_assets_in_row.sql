-- A small asset's PNG (one a render held in memory: its own thumbnail, at most 256 px on its
-- long side, and at most 64 KiB) is kept with the asset's row, written in the same transaction as
-- the result that made it, instead of as a file in the asset store: a file cost its landing a
-- create, a write, a rename and a share of a sync, several times what the row's bytes cost.
-- NULL for an asset whose PNG is a file (larger ones, uploaded ones, and those stored before
-- this version).
ALTER TABLE assets ADD COLUMN png BYTEA;
