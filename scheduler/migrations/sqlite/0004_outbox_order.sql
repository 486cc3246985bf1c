-- The dispatcher takes the oldest unsent outbox rows in id order. The outbox keeps every row it
-- ever sent, so without this index each take either walks the sent history from the start or
-- sorts every unsent row: with a large backlog, each take of 512 cost a scan of all of it.
CREATE INDEX outbox_unsent_id ON outbox (id) WHERE sent_ms IS NULL;
