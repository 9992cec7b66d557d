-- WhatsApp Cloud API channel.
-- Inbound messages already turned into conversation changes (webhooks are retried by WhatsApp).
CREATE TABLE whatsapp_inbound (
    wamid       TEXT PRIMARY KEY,
    doc_id      TEXT NOT NULL,
    received_at INTEGER NOT NULL
) WITHOUT ROWID;
-- The conversation of each WhatsApp contact, per team.
CREATE TABLE whatsapp_contacts (
    team   TEXT NOT NULL,
    wa_id  TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    PRIMARY KEY (team, wa_id)
) WITHOUT ROWID;
-- Crew messages to hand to the Graph API, one row per message so each is sent once.
-- `refused` is set when the 24 h rule forbids sending; `failed` when WhatsApp refused it.
CREATE TABLE whatsapp_outbox (
    message_id      TEXT PRIMARY KEY,
    doc_id          TEXT NOT NULL,
    payload         TEXT NOT NULL,
    refused         TEXT,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    sent_at         INTEGER,
    wamid           TEXT,
    failed          TEXT
) WITHOUT ROWID;
CREATE INDEX whatsapp_outbox_due ON whatsapp_outbox (sent_at, next_attempt_at);
