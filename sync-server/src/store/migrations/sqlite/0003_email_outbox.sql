-- Email fallback: crew messages to web-widget customers who are offline and have an email address,
-- queued durably (one row per message, so each is sent once) until the SMTP server accepts them.
CREATE TABLE email_outbox (
    message_id      TEXT PRIMARY KEY,
    doc_id          TEXT NOT NULL,
    to_addr         TEXT NOT NULL,
    customer        TEXT NOT NULL,
    agent           TEXT NOT NULL,
    text            TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    sent_at         INTEGER
) WITHOUT ROWID;
CREATE INDEX email_outbox_due ON email_outbox (sent_at, next_attempt_at);
