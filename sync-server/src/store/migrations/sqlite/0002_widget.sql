-- Web-widget customer sessions: a customer's browser holds the token (only its hash is here) and
-- may only read and write its own conversation.
CREATE TABLE widget_sessions (
    token_hash TEXT PRIMARY KEY,
    doc_id     TEXT NOT NULL REFERENCES documents (id),
    location   TEXT,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
