-- The email channel. A team's mailbox (`sync-server team TEAM --imap URL`): where it is, where its
-- password comes from (a file or an environment variable, never the database), the team's address
-- and how far the relay has read it (UIDVALIDITY and the last UID taken in, recorded in the
-- transaction that stores what the mail became).
CREATE TABLE mailboxes (
    team          TEXT PRIMARY KEY,
    url           TEXT NOT NULL,
    password_file TEXT,
    password_env  TEXT,
    address       TEXT NOT NULL,
    uidvalidity   INTEGER NOT NULL DEFAULT 0,
    last_uid      INTEGER NOT NULL DEFAULT 0
);
-- Every Message-ID of an Email conversation, the customer's and ours: a mail whose In-Reply-To or
-- References names one joins that conversation; a mail whose own Message-ID is here was taken in
-- already or is ours (never taken in).
CREATE TABLE email_ids (
    message_id TEXT PRIMARY KEY,
    doc_id     TEXT NOT NULL,
    team       TEXT NOT NULL,
    ours       INTEGER NOT NULL,
    -- When it was recorded: a thread's References are its latest Message-IDs.
    at         INTEGER NOT NULL
);
CREATE INDEX email_ids_thread ON email_ids (doc_id, at);
-- One row per Email conversation: the customer's address and the subject replies keep (its
-- Message-IDs for In-Reply-To and References are in email_ids).
CREATE TABLE email_threads (
    doc_id     TEXT PRIMARY KEY,
    team       TEXT NOT NULL,
    address    TEXT NOT NULL,
    subject    TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX email_threads_address ON email_threads (team, address, updated_at);
-- Crew replies in Email conversations share the outbox with the fallback: `team` is set for them;
-- `failed` says why one was given up (and the conversation says so too).
ALTER TABLE email_outbox ADD COLUMN team TEXT;
ALTER TABLE email_outbox ADD COLUMN failed TEXT;
