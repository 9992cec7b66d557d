-- Messages the relay refused (the rules changed while this replica was offline: a grab lost, a
-- conversation closed, an agent removed). Their changes were taken back out of the document; each
-- message is sent again once the replica is in sync ('retry', then 'resent'), and shown as not
-- delivered with the reason when that is not allowed or refused again ('failed').
CREATE TABLE undelivered (
    conversation_id TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    message         TEXT NOT NULL,
    reason          TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('retry', 'resent', 'failed')),
    PRIMARY KEY (conversation_id, message_id)
) WITHOUT ROWID;
