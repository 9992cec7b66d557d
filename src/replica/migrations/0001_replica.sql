-- Crewdesk replica, first schema. Migrations are append-only: never edit a released file.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- Teams as the relay reports them (membership and roles are the relay's truth).
CREATE TABLE teams (
    id   TEXT PRIMARY KEY,
    body TEXT NOT NULL
) WITHOUT ROWID;

-- Each conversation's automerge document as a full save followed by incremental chunks.
CREATE TABLE doc_chunks (
    doc_id TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    bytes  BLOB NOT NULL,
    PRIMARY KEY (doc_id, seq)
) WITHOUT ROWID;

-- The conversation index: one summary row per conversation, written in the same transaction as
-- the document change it derives from.
CREATE TABLE conversations (
    id            TEXT PRIMARY KEY,
    team          TEXT NOT NULL,
    channel       TEXT NOT NULL,
    last_activity INTEGER NOT NULL,
    waiting_since INTEGER,
    summary       TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX conversations_by_team ON conversations (team, last_activity);

-- Materialized messages, so opening a conversation never loads its document.
CREATE TABLE messages (
    conversation_id TEXT NOT NULL,
    at              INTEGER NOT NULL,
    id              TEXT NOT NULL,
    author_kind     TEXT NOT NULL,
    body            TEXT NOT NULL,
    PRIMARY KEY (conversation_id, at, id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_by_id ON messages (conversation_id, id);
CREATE INDEX messages_by_author ON messages (conversation_id, author_kind, at);

-- Web-widget presence: ephemeral, reported by the relay, not part of any document.
CREATE TABLE presence (
    conversation_id TEXT PRIMARY KEY,
    body            TEXT NOT NULL
) WITHOUT ROWID;
