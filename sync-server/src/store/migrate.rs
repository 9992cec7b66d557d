//! `sync-server migrate --from sqlite://DIR --to postgres://URL`: copies a deployment's data from
//! its SQLite store into an empty PostgreSQL database, then checks that every table has the same
//! number of rows on both sides and every document the same heads.
//!
//! The SQLite side is read in one read transaction (a consistent snapshot even while that relay
//! keeps serving; WAL lets it write meanwhile). Changes it commits after the snapshot are not
//! copied: stop it before the copy, or copy again into a fresh database.

use super::*;
use rusqlite::types::Value;

/// Tables in copy order (parents first) with their columns and order. SQLite's values are
/// converted to the PostgreSQL column types (BIGINT, TEXT, BYTEA, BOOLEAN).
const TABLES: &[(&str, &[&str], &str)] = &[
    ("meta", &["key", "value"], "key"),
    ("teams", &["id", "name", "mode", "body"], "id"),
    ("agents", &["id", "name"], "id"),
    ("memberships", &["team", "agent", "role"], "team, agent"),
    ("widget_settings", &["team", "key", "greeting", "rotated_at"], "team"),
    ("widget_origins", &["team", "origin"], "team, origin"),
    ("tokens", &["hash", "agent", "label", "created_at", "revoked_at"], "hash"),
    ("documents", &["id", "team", "created_at"], "id"),
    ("grab_log", &["doc_id", "agent", "received_at"], "seq"),
    ("actors", &["actor", "agent", "first_seen"], "actor"),
    ("message_times", &["doc_id", "message_id", "at", "received_at"], "doc_id, message_id"),
    ("widget_sessions", &["token_hash", "doc_id", "location", "created_at"], "token_hash"),
    (
        "email_outbox",
        &[
            "message_id",
            "doc_id",
            "to_addr",
            "customer",
            "agent",
            "text",
            "created_at",
            "attempts",
            "next_attempt_at",
            "sent_at",
            "attachment",
            "team",
            "failed",
        ],
        "message_id",
    ),
    ("whatsapp_inbound", &["wamid", "doc_id", "received_at"], "wamid"),
    ("whatsapp_contacts", &["team", "wa_id", "doc_id"], "team, wa_id"),
    (
        "whatsapp_outbox",
        &[
            "message_id",
            "doc_id",
            "payload",
            "refused",
            "created_at",
            "attempts",
            "next_attempt_at",
            "sent_at",
            "wamid",
            "failed",
        ],
        "message_id",
    ),
    ("blobs", &["hash", "size", "mime", "thumbnail", "created_at"], "hash"),
    ("blob_refs", &["hash", "doc_id"], "hash, doc_id"),
    ("mailboxes", &["team", "url", "password_file", "password_env", "address", "uidvalidity", "last_uid"], "team"),
    ("email_ids", &["message_id", "doc_id", "team", "ours", "at"], "message_id"),
    ("email_threads", &["doc_id", "team", "address", "subject", "updated_at"], "doc_id"),
];

/// What was copied: rows per table and documents whose heads were compared.
#[derive(Debug, Default)]
pub struct Report {
    pub tables: Vec<(String, usize)>,
    pub chunks: usize,
    pub documents_verified: usize,
    /// Attachment files copied into the database, and files the old store named but did not have.
    pub files: usize,
    pub files_missing: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (t, n) in &self.tables {
            writeln!(f, "{t:<18} {n:>8} rows copied, counts match")?;
        }
        writeln!(f, "{:<18} {:>8} rows copied, counts match", "doc_chunks", self.chunks)?;
        writeln!(f, "{:<18} {:>8} attachment files copied", "blob_bytes", self.files)?;
        for hash in &self.files_missing {
            writeln!(f, "warning: attachment {hash} is recorded but its file is missing from the old data directory")?;
        }
        write!(f, "{} documents verified: identical heads on both sides", self.documents_verified)
    }
}

enum Cell {
    Int(Option<i64>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
    Bool(Option<bool>),
}

impl Cell {
    fn param(&self) -> &(dyn tokio_postgres::types::ToSql + Sync) {
        match self {
            Cell::Int(v) => v,
            Cell::Text(v) => v,
            Cell::Bytes(v) => v,
            Cell::Bool(v) => v,
        }
    }
}

/// An SQLite value as the PostgreSQL column type wants it.
fn cell(v: Value, ty: &tokio_postgres::types::Type) -> Cell {
    use tokio_postgres::types::Type;
    match (v, ty) {
        (Value::Integer(i), &Type::BOOL) => Cell::Bool(Some(i != 0)),
        (Value::Null, &Type::BOOL) => Cell::Bool(None),
        (Value::Null, &Type::INT8) => Cell::Int(None),
        (Value::Null, &Type::BYTEA) => Cell::Bytes(None),
        (Value::Integer(i), _) => Cell::Int(Some(i)),
        (Value::Real(r), _) => Cell::Int(Some(r as i64)),
        (Value::Text(t), _) => Cell::Text(Some(t)),
        (Value::Blob(b), _) => Cell::Bytes(Some(b)),
        (Value::Null, _) => Cell::Text(None),
    }
}

/// Copies `from` (an SQLite data directory) into the PostgreSQL database `to`, which must hold
/// no teams and no documents yet, and verifies the copy.
pub fn migrate(from: &Path, to: &str) -> Result<Report, StoreError> {
    if !from.join("relay.sqlite3").exists() {
        return Err(StoreError::Invalid(format!(
            "no relay database in {} (expected relay.sqlite3 there)",
            from.display()
        )));
    }
    // Brings an older SQLite store up to the current schema first.
    drop(SqliteStore::open(from)?);
    let mut src = rusqlite::Connection::open_with_flags(
        from.join("relay.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let snapshot = src.transaction()?;
    let pg = PgStore::connect(to)?;
    let existing: i64 = pg.block(async {
        let c = pg.client().await?;
        Ok(c.query_one("SELECT (SELECT count(*) FROM teams) + (SELECT count(*) FROM documents)", &[]).await?.get(0))
    })?;
    if existing > 0 {
        return Err(StoreError::Invalid(
            "the PostgreSQL database already holds teams or documents; migrate into an empty database".into(),
        ));
    }
    let mut report = Report::default();
    pg.block(async {
        let mut c = pg.client().await?;
        let tx = c.transaction().await?;
        // The storage id moves too: peers keep their sync state with "this" relay.
        tx.execute("DELETE FROM meta", &[]).await?;
        for (table, columns, order) in TABLES {
            let list = columns.join(", ");
            let marks: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
            let insert = format!("INSERT INTO {table} ({list}) VALUES ({})", marks.join(", "));
            let statement = tx.prepare(&insert).await?;
            let mut stmt = snapshot.prepare(&format!("SELECT {list} FROM {table} ORDER BY {order}"))?;
            let mut rows = stmt.query([])?;
            let mut n = 0;
            while let Some(row) = rows.next()? {
                let cells: Vec<Cell> = statement
                    .params()
                    .iter()
                    .enumerate()
                    .map(|(i, ty)| Ok(cell(row.get::<_, Value>(i)?, ty)))
                    .collect::<Result<_, rusqlite::Error>>()?;
                let params: Vec<_> = cells.iter().map(Cell::param).collect();
                tx.execute(&statement, &params).await?;
                n += 1;
            }
            report.tables.push((table.to_string(), n));
        }
        let statement = tx.prepare("INSERT INTO doc_chunks (doc_id, origin, bytes) VALUES ($1, 'migrate', $2)").await?;
        let mut stmt = snapshot.prepare("SELECT doc_id, bytes FROM doc_chunks ORDER BY doc_id, seq")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let (doc, bytes): (String, Vec<u8>) = (row.get(0)?, row.get(1)?);
            tx.execute(&statement, &[&doc as &(dyn tokio_postgres::types::ToSql + Sync), &bytes]).await?;
            report.chunks += 1;
        }
        // Attachment bytes move into the database, so every instance can serve them.
        let statement = tx.prepare("INSERT INTO blob_bytes (hash, bytes, thumbnail) VALUES ($1, $2, $3)").await?;
        let blobs: Vec<(String, bool)> = {
            let mut stmt = snapshot.prepare("SELECT hash, thumbnail FROM blobs ORDER BY hash")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)))?.collect::<Result<_, _>>()?
        };
        let dir = from.join("blobs");
        for (hash, thumbnail) in blobs {
            let Ok(blob) = crewdesk::domain::attachment::BlobHash::parse(&hash) else {
                report.files_missing.push(hash);
                continue;
            };
            let Ok(bytes) = std::fs::read(crate::blobs::blob_path(&dir, &blob)) else {
                report.files_missing.push(hash);
                continue;
            };
            let thumb = match thumbnail {
                true => std::fs::read(crate::blobs::thumb_path(&dir, &blob)).ok(),
                false => None,
            };
            tx.execute(&statement, &[&hash as &(dyn tokio_postgres::types::ToSql + Sync), &bytes, &thumb]).await?;
            report.files += 1;
        }
        tx.commit().await?;
        Ok(())
    })?;
    verify(&snapshot, &pg, &mut report)?;
    Ok(report)
}

/// Row counts per table and every document's heads, compared between both sides.
fn verify(src: &rusqlite::Transaction<'_>, pg: &PgStore, report: &mut Report) -> Result<(), StoreError> {
    let mut tables: Vec<&str> = TABLES.iter().map(|t| t.0).collect();
    tables.push("doc_chunks");
    for table in tables {
        let here: i64 = src.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?;
        let there: i64 = pg.block(async {
            let c = pg.client().await?;
            Ok(c.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await?.get(0))
        })?;
        if here != there {
            return Err(StoreError::Invalid(format!("{table}: {here} rows in SQLite but {there} in PostgreSQL")));
        }
    }
    let ids: Vec<String> = {
        let mut stmt = src.prepare("SELECT id FROM documents ORDER BY id")?;
        stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
    };
    for id in ids {
        let mut stmt = src.prepare_cached("SELECT bytes FROM doc_chunks WHERE doc_id = ?1 ORDER BY seq")?;
        let mut bytes = Vec::new();
        for chunk in stmt.query_map([&id], |r| r.get::<_, Vec<u8>>(0))? {
            bytes.extend(chunk?);
        }
        let there = pg.load_document(&id)?.map(|(_, b)| b).unwrap_or_default();
        let heads = |b: &[u8]| {
            automerge::Automerge::load(b)
                .map(|d| d.get_heads())
                .map_err(|e| StoreError::Invalid(format!("document {id} cannot be read: {e}")))
        };
        if heads(&bytes)? != heads(&there)? {
            return Err(StoreError::Invalid(format!("document {id}: different heads after the copy")));
        }
        report.documents_verified += 1;
    }
    Ok(())
}
