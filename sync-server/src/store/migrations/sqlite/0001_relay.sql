-- Crewdesk relay, first schema. Migrations are append-only: never edit a released file.
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;

-- Accounts: the relay is the truth for teams, membership and roles.
CREATE TABLE teams (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    mode       TEXT NOT NULL CHECK (mode IN ('open', 'grab')),
    body       TEXT NOT NULL          -- the whole Team as JSON (thresholds, templates)
) WITHOUT ROWID;
CREATE TABLE agents (id TEXT PRIMARY KEY, name TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE memberships (
    team  TEXT NOT NULL REFERENCES teams (id),
    agent TEXT NOT NULL REFERENCES agents (id),
    role  TEXT NOT NULL CHECK (role IN ('representative', 'admin')),
    PRIMARY KEY (team, agent)
) WITHOUT ROWID;
-- Tokens are stored as SHA-256 hashes; the token itself is shown once, when issued.
CREATE TABLE tokens (
    hash       TEXT PRIMARY KEY,
    agent      TEXT NOT NULL REFERENCES agents (id),
    label      TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
) WITHOUT ROWID;

-- Conversation documents: a full save followed by incremental chunks, fsynced before their heads
-- are ever advertised to a peer.
CREATE TABLE documents (
    id   TEXT PRIMARY KEY,
    team TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE doc_chunks (
    doc_id TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    bytes  BLOB NOT NULL,
    PRIMARY KEY (doc_id, seq)
) WITHOUT ROWID;
-- Grab requests in the order the relay received them (the arbitration's evidence).
CREATE TABLE grab_log (
    doc_id      TEXT NOT NULL,
    agent       TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    UNIQUE (doc_id, agent)
);
