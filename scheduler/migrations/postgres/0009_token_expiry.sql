-- When a token stops working (unix milliseconds); NULL for never. A revoked token has revoked_ms.
ALTER TABLE api_tokens ADD COLUMN expires_ms BIGINT;
