-- Attachment bytes in the database, so every instance can serve every file (each instance also
-- keeps a copy under its data directory as a cache).
CREATE TABLE blob_bytes (
    hash      TEXT PRIMARY KEY,
    bytes     BYTEA NOT NULL,
    thumbnail BYTEA
);
