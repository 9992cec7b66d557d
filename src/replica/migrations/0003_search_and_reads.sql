-- Full-text search over message text and customer details, kept in the same transactions as the
-- rows it indexes; and, per conversation, how many messages this agent has seen (unread markers).
CREATE VIRTUAL TABLE search USING fts5(
    doc_id UNINDEXED,
    kind UNINDEXED,
    text,
    tokenize = 'unicode61 remove_diacritics 2'
);
INSERT INTO search (doc_id, kind, text)
    SELECT conversation_id, 'message', coalesce(json_extract(body, '$.body.text'), json_extract(body, '$.body.file_name'), '')
    FROM messages;
INSERT INTO search (doc_id, kind, text)
    SELECT id, 'customer', concat_ws(' ', json_extract(summary, '$.customer.name'), json_extract(summary, '$.customer.email'),
                                     json_extract(summary, '$.customer.phone'))
    FROM conversations;

CREATE TABLE reads (
    doc_id TEXT PRIMARY KEY,
    seen   INTEGER NOT NULL
) WITHOUT ROWID;
