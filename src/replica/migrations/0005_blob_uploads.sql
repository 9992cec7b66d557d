-- Attachments picked on this replica that the relay's blob store does not have yet (picked
-- offline, or the upload failed): uploaded when the relay is reachable, then removed.
CREATE TABLE blob_uploads (
    doc_id    TEXT NOT NULL,
    hash      TEXT NOT NULL,     -- sha256, hex; the file is in the app's local blob store
    mime      TEXT NOT NULL,
    queued_at INTEGER NOT NULL,
    PRIMARY KEY (doc_id, hash)
) WITHOUT ROWID;
