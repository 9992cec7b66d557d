//! SQLite under the replica: connection settings (WAL, fsync on every commit), append-only
//! migrations, and the rows written in the same transaction as each document change.

use super::ReplicaError;
use crate::domain::status::{ConversationSummary, Handover, MessagePreview};
use crate::domain::{Author, ConversationId, Message, MessageBody, Timestamp};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use std::path::Path;

/// Append-only: a released migration is never edited; new ones are added at the end.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_replica.sql"),
    include_str!("migrations/0002_outbox.sql"),
    include_str!("migrations/0003_search_and_reads.sql"),
    include_str!("migrations/0004_search_keys.sql"),
    include_str!("migrations/0005_blob_uploads.sql"),
    include_str!("migrations/0006_undelivered.sql"),
    include_str!("migrations/0007_lost_grabs_shown.sql"),
    include_str!("migrations/0008_search_merges_apart.sql"),
];

pub fn schema_version() -> i64 {
    MIGRATIONS.len() as i64
}

pub fn open(path: &Path) -> Result<Connection, ReplicaError> {
    let conn = super::sqlite::open(path, MIGRATIONS).map_err(|e| match e {
        super::sqlite::OpenError::Sqlite(e) => ReplicaError::Storage(e),
        super::sqlite::OpenError::NewerSchema { found, supported } => ReplicaError::NewerSchema { found, supported },
    })?;
    // Checkpoint the WAL every ~32 MB instead of every 4 MB: a checkpoint runs inside the commit
    // that triggers it, so rarer checkpoints keep the durable send's tail short.
    conn.pragma_update(None, "wal_autocheckpoint", 8000)?;
    Ok(conn)
}

/// Leaf pages of full-text index merged per [`merge_search`] step (a few milliseconds).
const MERGE_PAGES: i64 = 200;

/// One bounded step of merging the full-text index's segments; true when it merged something.
pub fn merge_search(conn: &Connection) -> Result<bool, ReplicaError> {
    let before = conn.total_changes();
    conn.execute("INSERT INTO search (search, rank) VALUES ('merge', ?1)", [MERGE_PAGES])?;
    // SQLite's documented test: fewer than two changes means there was nothing left to merge.
    Ok(conn.total_changes() - before >= 2)
}

pub fn meta(conn: &Connection, key: &str) -> Result<Option<String>, ReplicaError> {
    Ok(conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?)
}

pub fn set_meta(conn: &Connection, key: &str, value: &str) -> Result<(), ReplicaError> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

/// All chunks of a document, in order; `None` if the replica has never seen it.
pub fn load_chunks(conn: &Connection, id: &ConversationId) -> Result<Option<(Vec<u8>, usize)>, ReplicaError> {
    let mut stmt = conn.prepare_cached("SELECT bytes FROM doc_chunks WHERE doc_id = ?1 ORDER BY seq")?;
    let mut rows = stmt.query([id.as_str()])?;
    let mut bytes = Vec::new();
    let mut count = 0;
    while let Some(row) = rows.next()? {
        let chunk: Vec<u8> = row.get(0)?;
        bytes.extend_from_slice(&chunk);
        count += 1;
    }
    Ok((count > 0).then_some((bytes, count)))
}

pub fn append_chunk(tx: &Transaction<'_>, id: &ConversationId, bytes: &[u8]) -> Result<(), ReplicaError> {
    tx.prepare_cached(
        "INSERT INTO doc_chunks (doc_id, seq, bytes)
         VALUES (?1, (SELECT coalesce(max(seq), 0) + 1 FROM doc_chunks WHERE doc_id = ?1), ?2)",
    )?
    .execute(params![id.as_str(), bytes])?;
    Ok(())
}

/// Replaces all chunks of a document by one full save (same content, fewer rows).
pub fn compact(tx: &Transaction<'_>, id: &ConversationId, full: &[u8]) -> Result<(), ReplicaError> {
    tx.execute("DELETE FROM doc_chunks WHERE doc_id = ?1", [id.as_str()])?;
    tx.execute("INSERT INTO doc_chunks (doc_id, seq, bytes) VALUES (?1, 1, ?2)", params![id.as_str(), full])?;
    Ok(())
}

/// Inserts messages not yet materialized; returns how many were new.
pub fn insert_messages(tx: &Transaction<'_>, id: &ConversationId, messages: &[Message]) -> Result<u32, ReplicaError> {
    let mut stmt = tx.prepare_cached(
        "INSERT OR IGNORE INTO messages (conversation_id, at, id, author_kind, body) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut search = tx.prepare_cached("INSERT INTO search (doc_id, kind, text) VALUES (?1, 'message', ?2)")?;
    let mut added = 0;
    for m in messages {
        let body = serde_json::to_string(m)?;
        // Internal notes are kept apart from crew replies: a note does not answer a waiting
        // customer (the statuses count `crew` rows only).
        // Hand-overs have a kind of their own, so the latest one is found by the index.
        let kind = match &m.body {
            MessageBody::Transfer { .. } => HANDOVER_KIND,
            b if b.is_internal() => "note",
            _ => m.author.kind().as_str(),
        };
        if stmt.execute(params![id.as_str(), m.at.0, m.id.as_str(), kind, body])? == 1 {
            added += 1;
            search.execute(params![id.as_str(), m.body.text_content()])?;
        }
    }
    Ok(added)
}

/// The message-derived part of the summary, computed from the materialized rows with the indexes.
pub struct MessageStats {
    pub last_message: Option<MessagePreview>,
    pub last_customer_message_at: Option<Timestamp>,
    pub last_crew_message_at: Option<Timestamp>,
    pub waiting_since: Option<Timestamp>,
    pub handover: Option<Handover>,
}

/// The `author_kind` of hand-over rows in `messages`.
const HANDOVER_KIND: &str = "handover";

pub fn message_stats(tx: &Connection, id: &ConversationId) -> Result<MessageStats, ReplicaError> {
    // One statement, each figure an indexed subquery (the latest hand-over is found through
    // `messages_by_author`, never by reading the conversation's rows): the durable send reads them all.
    let (last, last_customer, last_crew, waiting, handover) = tx
        .prepare_cached(
            "SELECT
               (SELECT body FROM messages WHERE conversation_id = ?1 ORDER BY at DESC, id DESC LIMIT 1),
               (SELECT max(at) FROM messages WHERE conversation_id = ?1 AND author_kind = 'customer'),
               (SELECT max(at) FROM messages WHERE conversation_id = ?1 AND author_kind = 'crew'),
               (SELECT min(at) FROM messages WHERE conversation_id = ?1 AND author_kind = 'customer'
                  AND at > coalesce((SELECT max(at) FROM messages WHERE conversation_id = ?1 AND author_kind = 'crew'),
                                    -9223372036854775808)),
               (SELECT body FROM messages WHERE conversation_id = ?1 AND author_kind = ?2
                  AND at = (SELECT max(at) FROM messages WHERE conversation_id = ?1 AND author_kind = ?2)
                  ORDER BY id DESC LIMIT 1)",
        )?
        .query_row(params![id.as_str(), HANDOVER_KIND], |r| {
            Ok((
                r.get::<_, Option<String>>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        })?;
    let last_message = last.map(|body| serde_json::from_str::<Message>(&body)).transpose()?.map(|m| MessagePreview {
        at: m.at,
        author: m.author.kind(),
        text: m.body.preview(),
    });
    let handover = handover.map(|body| serde_json::from_str::<Message>(&body)).transpose()?.and_then(|m| {
        match (m.author, m.body) {
            (Author::Crew { agent }, MessageBody::Transfer { to }) => Some(Handover { from: agent, to, at: m.at }),
            _ => None,
        }
    });
    Ok(MessageStats {
        last_message,
        last_customer_message_at: last_customer.map(Timestamp),
        last_crew_message_at: last_crew.map(Timestamp),
        waiting_since: waiting.map(Timestamp),
        handover,
    })
}

/// Writes the index row; re-indexes the customer for search only when `customer_changed`.
pub fn upsert_summary(
    tx: &Transaction<'_>,
    s: &ConversationSummary,
    customer_changed: bool,
) -> Result<(), ReplicaError> {
    // Presence is ephemeral and lives in its own table; the stored row is the document's view.
    let body = if s.presence == Default::default() {
        serde_json::to_string(s)?
    } else {
        serde_json::to_string(&ConversationSummary { presence: Default::default(), ..s.clone() })?
    };
    tx.prepare_cached(
        "INSERT INTO conversations (id, team, channel, last_activity, waiting_since, summary)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (id) DO UPDATE SET team = excluded.team, channel = excluded.channel,
           last_activity = excluded.last_activity, waiting_since = excluded.waiting_since,
           summary = excluded.summary",
    )?
    .execute(params![
        s.id.as_str(),
        s.team.as_str(),
        s.channel.as_str(),
        s.last_activity().0,
        s.waiting_since.map(|t| t.0),
        body
    ])?;
    if customer_changed {
        index_customer(tx, s)?;
    }
    Ok(())
}

/// Re-indexes a conversation's customer details for search: one row at a fixed negative rowid per
/// conversation, replaced by rowid (no scan of the index).
pub fn index_customer(tx: &Transaction<'_>, s: &ConversationSummary) -> Result<(), ReplicaError> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO search_keys (doc_id, key) VALUES (?1, (SELECT coalesce(max(key), 0) + 1 FROM search_keys))",
    )?
    .execute([s.id.as_str()])?;
    let key: i64 =
        tx.prepare_cached("SELECT key FROM search_keys WHERE doc_id = ?1")?.query_row([s.id.as_str()], |r| r.get(0))?;
    tx.prepare_cached("DELETE FROM search WHERE rowid = ?1")?.execute([-key])?;
    let c = &s.customer;
    let text = [Some(c.name.as_str()), c.email.as_deref(), c.phone.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    tx.prepare_cached("INSERT INTO search (rowid, doc_id, kind, text) VALUES (?1, ?2, 'customer', ?3)")?
        .execute(params![-key, s.id.as_str(), text])?;
    Ok(())
}

/// Conversations whose messages or customer details match every word of `query` (prefixes).
pub fn search(conn: &Connection, query: &str, limit: usize) -> Result<Vec<ConversationId>, ReplicaError> {
    // Each word becomes a quoted prefix term, so user input can never be FTS syntax.
    let terms: Vec<String> =
        query.split_whitespace().take(8).map(|w| format!("\"{}\"*", w.replace('"', "\"\""))).collect();
    if terms.is_empty() {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare_cached("SELECT DISTINCT doc_id FROM search WHERE search MATCH ?1 LIMIT ?2")?;
    let rows = stmt.query_map(params![terms.join(" AND "), limit as i64], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?.into_iter().map(ConversationId).collect())
}

pub fn seen_of(conn: &Connection, id: &ConversationId) -> Result<Option<u32>, ReplicaError> {
    let mut stmt = conn.prepare_cached("SELECT seen FROM reads WHERE doc_id = ?1")?;
    Ok(stmt.query_row([id.as_str()], |r| r.get::<_, u32>(0)).optional()?)
}

pub fn mark_seen(conn: &Connection, id: &ConversationId, count: u32) -> Result<(), ReplicaError> {
    conn.execute(
        "INSERT INTO reads (doc_id, seen) VALUES (?1, ?2) ON CONFLICT (doc_id) DO UPDATE SET seen = max(seen, excluded.seen)",
        params![id.as_str(), count],
    )?;
    Ok(())
}

pub fn load_summaries(conn: &Connection) -> Result<Vec<ConversationSummary>, ReplicaError> {
    let mut stmt =
        conn.prepare("SELECT c.summary, p.body FROM conversations c LEFT JOIN presence p ON p.conversation_id = c.id")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (summary, presence) = row?;
        let mut s: ConversationSummary = serde_json::from_str(&summary)?;
        if let Some(p) = presence {
            s.presence = serde_json::from_str(&p)?;
        }
        out.push(s);
    }
    Ok(out)
}

pub fn messages(conn: &Connection, id: &ConversationId) -> Result<Vec<Message>, ReplicaError> {
    let mut stmt = conn.prepare_cached("SELECT body FROM messages WHERE conversation_id = ?1 ORDER BY at, id")?;
    let rows = stmt.query_map([id.as_str()], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for body in rows {
        out.push(serde_json::from_str(&body?)?);
    }
    Ok(out)
}

pub fn set_presence(
    conn: &Connection,
    id: &ConversationId,
    presence: &crate::domain::Presence,
) -> Result<(), ReplicaError> {
    conn.execute(
        "INSERT INTO presence (conversation_id, body) VALUES (?1, ?2)
         ON CONFLICT (conversation_id) DO UPDATE SET body = excluded.body",
        params![id.as_str(), serde_json::to_string(presence)?],
    )?;
    Ok(())
}

/// Counts one more local change of a conversation as not yet durable on the relay.
pub fn outbox_add(tx: &Transaction<'_>, id: &ConversationId, heads: &str) -> Result<(), ReplicaError> {
    tx.prepare_cached(
        "INSERT INTO outbox (doc_id, changes, heads) VALUES (?1, 1, ?2)
         ON CONFLICT (doc_id) DO UPDATE SET changes = changes + 1, heads = excluded.heads",
    )?
    .execute(params![id.as_str(), heads])?;
    Ok(())
}

pub fn outbox_heads(conn: &Connection, id: &ConversationId) -> Result<Option<String>, ReplicaError> {
    Ok(conn
        .prepare_cached("SELECT heads FROM outbox WHERE doc_id = ?1")?
        .query_row([id.as_str()], |r| r.get(0))
        .optional()?)
}

pub fn outbox_remove(conn: &Connection, id: &ConversationId, heads: &str) -> Result<(), ReplicaError> {
    // Only if no newer local change arrived meanwhile.
    conn.prepare_cached("DELETE FROM outbox WHERE doc_id = ?1 AND heads = ?2")?.execute(params![id.as_str(), heads])?;
    Ok(())
}

/// Sets a conversation's outbox: `changes` local changes not yet durable on the relay, up to
/// `heads` (none: the row goes).
pub fn outbox_set(tx: &Transaction<'_>, id: &ConversationId, heads: &str, changes: i64) -> Result<(), ReplicaError> {
    tx.execute("DELETE FROM outbox WHERE doc_id = ?1", [id.as_str()])?;
    if changes > 0 {
        tx.execute(
            "INSERT INTO outbox (doc_id, changes, heads) VALUES (?1, ?2, ?3)",
            params![id.as_str(), changes, heads],
        )?;
    }
    Ok(())
}

pub fn outbox_changes(conn: &Connection, id: &ConversationId) -> Result<i64, ReplicaError> {
    Ok(conn
        .prepare_cached("SELECT changes FROM outbox WHERE doc_id = ?1")?
        .query_row([id.as_str()], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// Removes materialized messages (taken back out of their document).
pub fn delete_messages(tx: &Transaction<'_>, id: &ConversationId, ids: &[&str]) -> Result<(), ReplicaError> {
    let mut stmt = tx.prepare_cached("DELETE FROM messages WHERE conversation_id = ?1 AND id = ?2")?;
    for m in ids {
        stmt.execute(params![id.as_str(), m])?;
    }
    Ok(())
}

/// One message the relay refused, as kept in `undelivered`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UndeliveredRow {
    pub message: Message,
    pub reason: String,
    pub state: String,
}

pub fn undelivered(conn: &Connection, id: &ConversationId) -> Result<Vec<UndeliveredRow>, ReplicaError> {
    let mut stmt = conn.prepare_cached(
        "SELECT message, reason, state FROM undelivered WHERE conversation_id = ?1 ORDER BY message_id",
    )?;
    let rows = stmt
        .query_map([id.as_str()], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (message, reason, state) = row?;
        out.push(UndeliveredRow { message: serde_json::from_str(&message)?, reason, state });
    }
    out.sort_by_key(|r| r.message.at);
    Ok(out)
}

/// Conversations with messages waiting to be sent again (state 'retry').
pub fn undelivered_to_retry(conn: &Connection) -> Result<Vec<ConversationId>, ReplicaError> {
    let mut stmt = conn.prepare_cached("SELECT DISTINCT conversation_id FROM undelivered WHERE state = 'retry'")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?.into_iter().map(ConversationId).collect())
}

pub fn set_undelivered(
    tx: &Transaction<'_>,
    id: &ConversationId,
    message: &Message,
    reason: &str,
    state: &str,
) -> Result<(), ReplicaError> {
    tx.prepare_cached(
        "INSERT INTO undelivered (conversation_id, message_id, message, reason, state) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (conversation_id, message_id) DO UPDATE SET reason = excluded.reason, state = excluded.state",
    )?
    .execute(params![id.as_str(), message.id.as_str(), serde_json::to_string(message)?, reason, state])?;
    Ok(())
}

pub fn forget_undelivered(conn: &Connection, id: &ConversationId, message_id: &str) -> Result<(), ReplicaError> {
    conn.prepare_cached("DELETE FROM undelivered WHERE conversation_id = ?1 AND message_id = ?2")?
        .execute(params![id.as_str(), message_id])?;
    Ok(())
}

/// Messages sent again that the relay has now stored are delivered: their rows go.
pub fn undelivered_resent_done(conn: &Connection, id: &ConversationId) -> Result<(), ReplicaError> {
    conn.prepare_cached("DELETE FROM undelivered WHERE conversation_id = ?1 AND state = 'resent'")?
        .execute([id.as_str()])?;
    Ok(())
}

pub fn outbox_total(conn: &Connection) -> Result<(usize, Vec<ConversationId>), ReplicaError> {
    let mut stmt = conn.prepare_cached("SELECT doc_id, changes FROM outbox ORDER BY doc_id")?;
    let mut total = 0;
    let mut ids = Vec::new();
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (id, n) = row?;
        total += usize::try_from(n).unwrap_or(0);
        ids.push(ConversationId(id));
    }
    Ok((total, ids))
}
