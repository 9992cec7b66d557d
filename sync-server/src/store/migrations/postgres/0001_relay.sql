-- Crewdesk relay on PostgreSQL, first schema: the same data as the SQLite store (its migrations
-- 0001-0006), for several relay instances sharing one database. Append-only: never edit a
-- released file; add the next one.
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

-- Accounts: the relay is the truth for teams, membership and roles.
CREATE TABLE teams (
    id   TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    mode TEXT NOT NULL CHECK (mode IN ('open', 'grab')),
    body TEXT NOT NULL                   -- the whole Team as JSON (thresholds, templates)
);
CREATE TABLE agents (id TEXT PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE memberships (
    team  TEXT NOT NULL REFERENCES teams (id),
    agent TEXT NOT NULL REFERENCES agents (id),
    role  TEXT NOT NULL CHECK (role IN ('representative', 'admin')),
    PRIMARY KEY (team, agent)
);
CREATE INDEX memberships_agent ON memberships (agent);
-- Tokens are stored as SHA-256 hashes; the token itself is shown once, when issued.
CREATE TABLE tokens (
    hash       TEXT PRIMARY KEY,
    agent      TEXT NOT NULL REFERENCES agents (id),
    label      TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

-- Conversation documents: chunks committed before any instance advertises their heads.
CREATE TABLE documents (
    id         TEXT PRIMARY KEY,
    team       TEXT NOT NULL,
    created_at BIGINT NOT NULL           -- milliseconds; other instances catch up new ones by it
);
CREATE INDEX documents_team ON documents (team);
CREATE INDEX documents_created ON documents (created_at);
-- `seq` orders all chunks; chunks of one document are written under that document's advisory
-- lock, so their `seq` order is their commit order and "chunks after seq N" misses none.
CREATE TABLE doc_chunks (
    seq    BIGSERIAL PRIMARY KEY,
    doc_id TEXT NOT NULL,
    origin TEXT NOT NULL,                -- the instance that wrote it
    bytes  BYTEA NOT NULL
);
CREATE INDEX doc_chunks_doc ON doc_chunks (doc_id, seq);
-- Grab requests in the order the relay received them (the arbitration's evidence), written and
-- read under the document's grab lock.
CREATE TABLE grab_log (
    seq         BIGSERIAL PRIMARY KEY,
    doc_id      TEXT NOT NULL,
    agent       TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    UNIQUE (doc_id, agent)
);
-- Web-widget customer sessions (token hashes).
CREATE TABLE widget_sessions (
    token_hash TEXT PRIMARY KEY,
    doc_id     TEXT NOT NULL REFERENCES documents (id),
    location   TEXT,
    created_at BIGINT NOT NULL
);
-- Email fallback outbox: one row per crew message; instances claim due rows with SKIP LOCKED.
CREATE TABLE email_outbox (
    message_id      TEXT PRIMARY KEY,
    doc_id          TEXT NOT NULL,
    to_addr         TEXT NOT NULL,
    customer        TEXT NOT NULL,
    agent           TEXT NOT NULL,
    text            TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    sent_at         BIGINT
);
CREATE INDEX email_outbox_due ON email_outbox (next_attempt_at) WHERE sent_at IS NULL;
-- WhatsApp Cloud API channel.
CREATE TABLE whatsapp_inbound (
    wamid       TEXT PRIMARY KEY,
    doc_id      TEXT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE TABLE whatsapp_contacts (
    team   TEXT NOT NULL,
    wa_id  TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    PRIMARY KEY (team, wa_id)
);
CREATE TABLE whatsapp_outbox (
    message_id      TEXT PRIMARY KEY,
    doc_id          TEXT NOT NULL,
    payload         TEXT NOT NULL,
    refused         TEXT,
    created_at      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    sent_at         BIGINT,
    wamid           TEXT,
    failed          TEXT
);
CREATE INDEX whatsapp_outbox_due ON whatsapp_outbox (next_attempt_at) WHERE sent_at IS NULL AND failed IS NULL;
-- Attachments' metadata (the bytes are files under each instance's data directory).
CREATE TABLE blobs (
    hash       TEXT PRIMARY KEY,
    size       BIGINT NOT NULL,
    mime       TEXT NOT NULL,
    thumbnail  BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE blob_refs (
    hash   TEXT NOT NULL REFERENCES blobs (hash),
    doc_id TEXT NOT NULL,
    PRIMARY KEY (hash, doc_id)
);
