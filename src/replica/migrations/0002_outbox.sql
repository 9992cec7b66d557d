-- Local changes the relay has not yet made durable, per conversation: how many, and the heads
-- right after the newest one. A row is deleted once the relay advertises heads covering them.
CREATE TABLE outbox (
    doc_id  TEXT PRIMARY KEY,
    changes INTEGER NOT NULL,
    heads   TEXT NOT NULL
) WITHOUT ROWID;
