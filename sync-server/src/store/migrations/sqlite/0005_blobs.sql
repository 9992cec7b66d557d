-- Attachments: content-addressed files under <data_dir>/blobs (fsynced before the row is written).
CREATE TABLE blobs (
    hash       TEXT PRIMARY KEY,      -- sha256, hex
    size       INTEGER NOT NULL,
    mime       TEXT NOT NULL,
    thumbnail  INTEGER NOT NULL,      -- 1 when <data_dir>/blobs/thumbs/<hash>.png exists
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
-- Which conversations a blob was sent in: downloads are authorized like those conversations.
CREATE TABLE blob_refs (
    hash   TEXT NOT NULL REFERENCES blobs (hash),
    doc_id TEXT NOT NULL,
    PRIMARY KEY (hash, doc_id)
) WITHOUT ROWID;
