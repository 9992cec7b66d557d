-- A crew message that is a file: the file goes with its fallback email (JSON: blob hash, file name,
-- type, size). NULL for text messages and for rows queued before this migration.
ALTER TABLE email_outbox ADD COLUMN attachment TEXT;
