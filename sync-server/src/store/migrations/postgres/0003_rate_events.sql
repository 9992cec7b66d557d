-- Customers' rate limits (widget starts per address, files per conversation), counted across all
-- relay instances of a deployment.
CREATE TABLE rate_events (
    key TEXT NOT NULL,
    at  BIGINT NOT NULL
);
CREATE INDEX rate_events_key ON rate_events (key, at);
CREATE INDEX rate_events_at ON rate_events (at);
