-- When each document was first stored (milliseconds); rows from before this migration read 0.
ALTER TABLE documents ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;
