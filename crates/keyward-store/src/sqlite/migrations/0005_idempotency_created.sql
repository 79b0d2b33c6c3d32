-- Idempotency records are honoured for 24 hours; a sweep deletes older ones by creation time.
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
