//! Opening a Crewdesk SQLite database, shared by the replica and the relay: WAL with
//! synchronous=FULL (an acknowledged commit survives a crash) and append-only migrations tracked in
//! `user_version`. A database from a newer Crewdesk is refused untouched.

use rusqlite::Connection;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("written by a newer Crewdesk (schema {found}, this build knows {supported})")]
    NewerSchema { found: i64, supported: i64 },
}

/// Opens (or creates) the database at `path` and applies the migrations it has not seen yet.
pub fn open(path: &Path, migrations: &[&str]) -> Result<Connection, OpenError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let supported = migrations.len() as i64;
    if found > supported {
        return Err(OpenError::NewerSchema { found, supported });
    }
    for (i, sql) in migrations.iter().enumerate().skip(usize::try_from(found).unwrap_or(0)) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(conn)
}
