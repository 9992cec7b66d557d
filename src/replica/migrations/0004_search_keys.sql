-- Search, faster to keep: customer rows get a fixed (negative) rowid per conversation, so editing a
-- customer replaces one row by rowid instead of scanning the index; prefix indexes speed up the
-- search box's prefix queries.
DROP TABLE search;
CREATE VIRTUAL TABLE search USING fts5(
    doc_id UNINDEXED,
    kind UNINDEXED,
    text,
    prefix = '2 3',
    tokenize = 'unicode61 remove_diacritics 2'
);
CREATE TABLE search_keys (
    doc_id TEXT PRIMARY KEY,
    key    INTEGER NOT NULL UNIQUE
);
INSERT INTO search_keys (doc_id, key) SELECT id, row_number() OVER (ORDER BY id) FROM conversations;
INSERT INTO search (doc_id, kind, text)
    SELECT conversation_id, 'message', coalesce(json_extract(body, '$.body.text'), json_extract(body, '$.body.file_name'), '')
    FROM messages;
INSERT INTO search (rowid, doc_id, kind, text)
    SELECT -k.key, c.id, 'customer', concat_ws(' ', json_extract(c.summary, '$.customer.name'),
                                               json_extract(c.summary, '$.customer.email'),
                                               json_extract(c.summary, '$.customer.phone'))
    FROM conversations c JOIN search_keys k ON k.doc_id = c.id;
