//! The embedded SQLite backend: WAL with synchronous=FULL, so a commit that returned is on disk.
//! One connection behind a mutex (SQLite has one writer anyway; reads are short).

use super::*;
use crewdesk::domain::{AgentId, Member, Team, TeamId};
use rusqlite::{Connection, OptionalExtension, params};

use std::sync::{Mutex, MutexGuard};

const MIGRATIONS: &[&str] = &[
    include_str!("migrations/sqlite/0001_relay.sql"),
    include_str!("migrations/sqlite/0002_widget.sql"),
    include_str!("migrations/sqlite/0003_email_outbox.sql"),
    include_str!("migrations/sqlite/0004_whatsapp.sql"),
    include_str!("migrations/sqlite/0005_blobs.sql"),
    include_str!("migrations/sqlite/0006_document_created_at.sql"),
    include_str!("migrations/sqlite/0007_email_attachments.sql"),
    include_str!("migrations/sqlite/0008_actors.sql"),
    include_str!("migrations/sqlite/0009_widget_settings.sql"),
    include_str!("migrations/sqlite/0010_access_version.sql"),
    include_str!("migrations/sqlite/0011_blob_refs_doc.sql"),
    include_str!("migrations/sqlite/0012_message_times.sql"),
    include_str!("migrations/sqlite/0013_email_channel.sql"),
];

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        crate::private::dir(dir)
            .map_err(|e| StoreError::Invalid(format!("cannot create data directory {}: {e}", dir.display())))?;
        let path = dir.join("relay.sqlite3");
        crate::private::sqlite_database(&path)
            .map_err(|e| StoreError::Invalid(format!("cannot prepare the database {}: {e}", path.display())))?;
        let conn = crewdesk::replica::sqlite::open(&path, MIGRATIONS).map_err(|e| match e {
            crewdesk::replica::sqlite::OpenError::Sqlite(e) => StoreError::Sqlite(e),
            crewdesk::replica::sqlite::OpenError::NewerSchema { found, supported } => {
                StoreError::NewerSchema { found, supported }
            }
        })?;
        Ok(SqliteStore { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll back).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Storage for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    /// This relay's stable storage id (automerge-repo peers use it to remember sync state).
    fn storage_id(&self) -> Result<String, StoreError> {
        let conn = self.conn();
        if let Some(id) =
            conn.query_row("SELECT value FROM meta WHERE key = 'storage_id'", [], |r| r.get(0)).optional()?
        {
            return Ok(id);
        }
        let id = crewdesk::sync::document_id::encode(&rand::random());
        conn.execute("INSERT INTO meta (key, value) VALUES ('storage_id', ?1)", [&id])?;
        Ok(id)
    }

    // ---- accounts ------------------------------------------------------------------------------

    fn put_team(&self, team: &Team) -> Result<(), StoreError> {
        team.thresholds.validate().map_err(|e| StoreError::Invalid(e.to_string()))?;
        if team.id.as_str().trim().is_empty() || team.name.trim().is_empty() {
            return Err(StoreError::Invalid("a team needs an id and a name".into()));
        }
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let body = Team { members: Vec::new(), ..team.clone() };
        tx.execute(
            "INSERT INTO teams (id, name, mode, body) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, mode = excluded.mode, body = excluded.body",
            params![team.id.as_str(), team.name, mode_str(team.mode), serde_json::to_string(&body)?],
        )?;
        for m in &team.members {
            add_member_tx(&tx, &team.id, m)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn add_member(&self, team: &TeamId, member: &Member) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let exists: bool =
            tx.query_row("SELECT count(*) FROM teams WHERE id = ?1", [team.as_str()], |r| r.get::<_, i64>(0))? > 0;
        if !exists {
            return Err(StoreError::Invalid(format!("no team `{team}`; create it first")));
        }
        add_member_tx(&tx, team, member)?;
        tx.commit()?;
        Ok(())
    }

    fn remove_member(&self, team: &TeamId, agent: &AgentId) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM memberships WHERE team = ?1 AND agent = ?2", [team.as_str(), agent.as_str()])?
            > 0)
    }

    /// Every team with its members, as replicas receive them.
    fn teams(&self) -> Result<Vec<Team>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT body FROM teams ORDER BY id")?;
        let mut teams: Vec<Team> = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .map(|b| Ok(serde_json::from_str(&b?)?))
            .collect::<Result<_, StoreError>>()?;
        let mut stmt = conn.prepare(
            "SELECT m.team, m.agent, a.name, m.role FROM memberships m JOIN agents a ON a.id = m.agent ORDER BY m.team, m.agent",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
        })?;
        for row in rows {
            let (team, agent, name, role) = row?;
            if let Some(t) = teams.iter_mut().find(|t| t.id.as_str() == team) {
                t.members.push(Member { agent: AgentId(agent), name, role: parse_role(&role)? });
            }
        }
        Ok(teams)
    }

    /// Issues a new token for an agent; returns the token (only its hash is stored).
    fn issue_token(&self, agent: &AgentId, label: &str) -> Result<String, StoreError> {
        let conn = self.conn();
        let exists: i64 =
            conn.query_row("SELECT count(*) FROM agents WHERE id = ?1", [agent.as_str()], |r| r.get(0))?;
        if exists == 0 {
            return Err(StoreError::Invalid(format!("no agent `{agent}`; add them to a team first")));
        }
        let token = format!("cdt_{}", crewdesk::sync::document_id::encode(&rand::random()));
        conn.execute(
            "INSERT INTO tokens (hash, agent, label, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![hash_token(&token), agent.as_str(), label, now_millis()],
        )?;
        Ok(token)
    }

    /// Revokes every token of an agent, or the one token given. Returns how many were revoked.
    fn revoke_tokens(&self, agent: &AgentId, token: Option<&str>) -> Result<usize, StoreError> {
        let conn = self.conn();
        let n = match token {
            Some(t) => conn.execute(
                "UPDATE tokens SET revoked_at = ?1 WHERE agent = ?2 AND hash = ?3 AND revoked_at IS NULL",
                params![now_millis(), agent.as_str(), hash_token(t)],
            )?,
            None => conn.execute(
                "UPDATE tokens SET revoked_at = ?1 WHERE agent = ?2 AND revoked_at IS NULL",
                params![now_millis(), agent.as_str()],
            )?,
        };
        Ok(n)
    }

    fn access_version(&self) -> Result<i64, StoreError> {
        Ok(self.conn().query_row("SELECT version FROM access_version WHERE id = 1", [], |r| r.get(0))?)
    }

    /// The agent a valid (issued, not revoked) token belongs to, by the token's hash.
    fn authenticate_hash(&self, hash: &str) -> Result<Option<Agent>, StoreError> {
        let conn = self.conn();
        let agent: Option<(String, String)> = conn
            .query_row(
                "SELECT a.id, a.name FROM tokens t JOIN agents a ON a.id = t.agent WHERE t.hash = ?1 AND t.revoked_at IS NULL",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((id, name)) = agent else { return Ok(None) };
        let mut stmt = conn.prepare("SELECT team, role FROM memberships WHERE agent = ?1 ORDER BY team")?;
        let teams = stmt
            .query_map([&id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .map(|row| {
                let (team, role) = row?;
                Ok((TeamId(team), parse_role(&role)?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some(Agent { id: AgentId(id), name, teams }))
    }

    fn token_list(&self) -> Result<Vec<(String, String, bool)>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT agent, label, revoked_at IS NOT NULL FROM tokens ORDER BY agent, created_at")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- documents -----------------------------------------------------------------------------

    fn load_document_at(&self, id: &str) -> Result<Option<StoredChunks>, StoreError> {
        let conn = self.conn();
        let team: Option<String> =
            conn.query_row("SELECT team FROM documents WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        let Some(team) = team else { return Ok(None) };
        let mut stmt = conn.prepare_cached("SELECT seq, bytes FROM doc_chunks WHERE doc_id = ?1 ORDER BY seq")?;
        let (mut bytes, mut seq, mut chunks) = (Vec::new(), 0, 0);
        for chunk in stmt.query_map([id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))? {
            let (s, b) = chunk?;
            seq = s;
            chunks += 1;
            bytes.extend(b);
        }
        Ok(Some(StoredChunks { team: TeamId(team), bytes, seq, chunks }))
    }

    /// One process owns an SQLite store, so every chunk after the position counts.
    fn chunks_since_many(
        &self,
        wanted: &[(String, i64)],
    ) -> Result<std::collections::HashMap<String, (Vec<u8>, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT seq, bytes FROM doc_chunks WHERE doc_id = ?1 AND seq > ?2 ORDER BY seq")?;
        let mut out = std::collections::HashMap::new();
        for (id, seq) in wanted {
            let (mut bytes, mut last) = (Vec::new(), *seq);
            for chunk in stmt.query_map(params![id, seq], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))? {
                let (s, b) = chunk?;
                last = s;
                bytes.extend(b);
            }
            out.insert(id.clone(), (bytes, last));
        }
        Ok(out)
    }

    /// Appends chunks of any documents in one transaction and one fsync (group commit); in order
    /// for chunks of the same document.
    /// One relay instance holds each conversation in one copy under one lock, where automerge
    /// refuses a second change with the same actor and sequence number before it is committed; so
    /// every chunk is stored (the places of changes are checked on PostgreSQL, where instances share
    /// the store).
    fn append_chunks(&self, chunks: &[NewChunk<'_>]) -> Result<Vec<bool>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = now_millis();
        for NewChunk { doc: id, team, bytes: chunk, messages, mail, .. } in chunks {
            tx.prepare_cached("INSERT OR IGNORE INTO documents (id, team, created_at) VALUES (?1, ?2, ?3)")?
                .execute(params![*id, team.as_str(), now])?;
            tx.prepare_cached(
                "INSERT INTO doc_chunks (doc_id, seq, bytes)
                 VALUES (?1, (SELECT coalesce(max(seq), 0) + 1 FROM doc_chunks WHERE doc_id = ?1), ?2)",
            )?
            .execute(params![id, chunk])?;
            for m in *messages {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO message_times (doc_id, message_id, at, received_at) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![id, m.id, m.at.0, now])?;
            }
            if let Some(m) = mail {
                tx.execute(
                    "UPDATE mailboxes SET uidvalidity = ?2, last_uid = ?3 WHERE team = ?1",
                    params![m.team.as_str(), m.uidvalidity, m.uid],
                )?;
                record_email_in(
                    &tx,
                    &RecordedEmail {
                        doc_id: id,
                        team: &m.team,
                        address: &m.address,
                        subject: &m.subject,
                        message_id: m.message_id.as_deref(),
                        ours: false,
                    },
                )?;
            }
        }
        tx.commit()?;
        Ok(vec![true; chunks.len()])
    }

    fn message_times(&self, doc: &str) -> Result<Vec<(String, i64, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT message_id, at, received_at FROM message_times WHERE doc_id = ?1 ORDER BY received_at, message_id",
        )?;
        let rows = stmt.query_map([doc], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores many new documents in one transaction (seeding, imports). Existing ids are skipped.
    fn import_documents(&self, docs: &[(String, TeamId, Vec<u8>)]) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (mut added, now) = (0, now_millis());
        for (id, team, bytes) in docs {
            if tx.execute(
                "INSERT OR IGNORE INTO documents (id, team, created_at) VALUES (?1, ?2, ?3)",
                params![id.as_str(), team.as_str(), now],
            )? == 1
            {
                tx.execute("INSERT INTO doc_chunks (doc_id, seq, bytes) VALUES (?1, 1, ?2)", params![id, bytes])?;
                added += 1;
            }
        }
        tx.commit()?;
        Ok(added)
    }

    fn compact_stored(&self, id: &str) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (bytes, last, count) = {
            let mut stmt = tx.prepare("SELECT seq, bytes FROM doc_chunks WHERE doc_id = ?1 ORDER BY seq")?;
            let (mut bytes, mut last, mut count) = (Vec::new(), 0, 0);
            for row in stmt.query_map([id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))? {
                let (s, b) = row?;
                last = s;
                count += 1;
                bytes.extend(b);
            }
            (bytes, last, count)
        };
        if count < 2 {
            return Ok(0);
        }
        let full = compacted(id, &bytes)?;
        tx.execute("DELETE FROM doc_chunks WHERE doc_id = ?1", [id])?;
        tx.execute("INSERT INTO doc_chunks (doc_id, seq, bytes) VALUES (?1, ?2, ?3)", params![id, last, full])?;
        tx.commit()?;
        Ok(count)
    }

    fn chunk_count(&self, id: &str) -> Result<usize, StoreError> {
        Ok(self.conn().query_row("SELECT count(*) FROM doc_chunks WHERE doc_id = ?1", [id], |r| r.get::<_, i64>(0))?
            as usize)
    }

    /// Documents of the given teams with their ids (for a replica catching up).
    fn documents_of(&self, teams: &[TeamId]) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT id FROM documents WHERE team = ?1 ORDER BY id")?;
        let mut out = Vec::new();
        for t in teams {
            for id in stmt.query_map([t.as_str()], |r| r.get::<_, String>(0))? {
                out.push(id?);
            }
        }
        Ok(out)
    }

    fn documents_since(&self, since: i64) -> Result<Vec<(String, TeamId)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, team FROM documents WHERE created_at >= ?1 ORDER BY id")?;
        let rows = stmt.query_map([since], |r| Ok((r.get(0)?, TeamId(r.get(1)?))))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Creates a widget session for a conversation; returns the token (stored only as a hash).
    fn create_widget_session(&self, doc_id: &str, location: Option<&str>) -> Result<String, StoreError> {
        let token = format!("cws_{}", crewdesk::sync::document_id::encode(&rand::random()));
        self.conn().execute(
            "INSERT INTO widget_sessions (token_hash, doc_id, location, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![hash_token(&token), doc_id, location, now_millis()],
        )?;
        Ok(token)
    }

    /// The conversation and location of a widget session token.
    fn widget_session(&self, token: &str) -> Result<Option<(String, Option<String>)>, StoreError> {
        if token.is_empty() || token.len() > 200 {
            return Ok(None);
        }
        Ok(self
            .conn()
            .query_row("SELECT doc_id, location FROM widget_sessions WHERE token_hash = ?1", [hash_token(token)], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?)
    }

    fn widget_settings(&self, team: &TeamId) -> Result<Option<WidgetSettings>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let exists: bool =
            tx.query_row("SELECT count(*) FROM teams WHERE id = ?1", [team.as_str()], |r| r.get::<_, i64>(0))? > 0;
        if !exists {
            return Ok(None);
        }
        tx.execute(
            "INSERT OR IGNORE INTO widget_settings (team, key, rotated_at) VALUES (?1, ?2, ?3)",
            params![team.as_str(), new_widget_key(), now_millis()],
        )?;
        let settings = read_widget_settings(&tx, team.as_str())?;
        tx.commit()?;
        Ok(settings)
    }

    fn widget_by_key(&self, key: &str) -> Result<Option<WidgetSettings>, StoreError> {
        if !plausible_widget_key(key) {
            return Ok(None);
        }
        let conn = self.conn();
        let team: Option<String> =
            conn.query_row("SELECT team FROM widget_settings WHERE key = ?1", [key], |r| r.get(0)).optional()?;
        match team {
            Some(team) => read_widget_settings(&conn, &team),
            None => Ok(None),
        }
    }

    fn set_widget_origins(&self, team: &TeamId, origins: &[String]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM widget_origins WHERE team = ?1", [team.as_str()])?;
        for origin in origins {
            tx.execute(
                "INSERT OR IGNORE INTO widget_origins (team, origin) VALUES (?1, ?2)",
                params![team.as_str(), origin],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn set_widget_greeting(&self, team: &TeamId, greeting: Option<&str>) -> Result<(), StoreError> {
        self.widget_settings(team)?.ok_or_else(|| StoreError::Invalid(format!("no team `{team}`")))?;
        self.conn()
            .execute("UPDATE widget_settings SET greeting = ?2 WHERE team = ?1", params![team.as_str(), greeting])?;
        Ok(())
    }

    fn rotate_widget_key(&self, team: &TeamId) -> Result<String, StoreError> {
        self.widget_settings(team)?.ok_or_else(|| StoreError::Invalid(format!("no team `{team}`")))?;
        let key = new_widget_key();
        self.conn().execute(
            "UPDATE widget_settings SET key = ?2, rotated_at = ?3 WHERE team = ?1",
            params![team.as_str(), key, now_millis()],
        )?;
        Ok(key)
    }

    /// Queues crew messages for the email fallback; a message already queued is not queued again.
    fn queue_emails(&self, emails: &[QueuedEmail]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for e in emails {
            tx.execute(
                "INSERT OR IGNORE INTO email_outbox (message_id, doc_id, to_addr, customer, agent, text, created_at, next_attempt_at, attachment, team)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9)",
                params![
                    e.message_id,
                    e.doc_id,
                    e.to,
                    e.customer,
                    e.agent,
                    e.text,
                    e.created_at,
                    e.attachment_json(),
                    e.team.as_ref().map(TeamId::as_str)
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Unsent emails whose next attempt is due, oldest first.
    fn due_emails(&self, now: i64) -> Result<Vec<QueuedEmail>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT message_id, doc_id, to_addr, customer, agent, text, created_at, attachment, team, attempts FROM email_outbox
             WHERE sent_at IS NULL AND next_attempt_at <= ?1 ORDER BY created_at, message_id LIMIT 500",
        )?;
        let rows = stmt.query_map([now], |r| {
            Ok(QueuedEmail {
                message_id: r.get(0)?,
                doc_id: r.get(1)?,
                to: r.get(2)?,
                customer: r.get(3)?,
                agent: r.get(4)?,
                text: r.get(5)?,
                created_at: r.get(6)?,
                attachment: EmailAttachment::from_json(r.get::<_, Option<String>>(7)?),
                team: r.get::<_, Option<String>>(8)?.map(TeamId),
                attempts: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn mark_emails_sent(&self, ids: &[String], now: i64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for id in ids {
            tx.execute("UPDATE email_outbox SET sent_at = ?2 WHERE message_id = ?1", params![id, now])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A failed attempt: try again after a backoff that doubles (1 s … 5 min).
    fn retry_emails(&self, ids: &[String], now: i64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for id in ids {
            tx.execute(
                "UPDATE email_outbox SET attempts = attempts + 1,
                   next_attempt_at = ?2 + min(300000, 1000 * (1 << min(attempts, 9))) WHERE message_id = ?1",
                params![id, now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn fail_emails(&self, ids: &[String], reason: &str, now: i64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for id in ids {
            tx.execute(
                "UPDATE email_outbox SET attempts = attempts + 1, sent_at = ?2, failed = ?3 WHERE message_id = ?1",
                params![id, now, reason],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn set_mailbox(&self, m: &MailboxSetting) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO mailboxes (team, url, password_file, password_env, address) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (team) DO UPDATE SET password_file = excluded.password_file,
               password_env = excluded.password_env, address = excluded.address,
               uidvalidity = CASE WHEN mailboxes.url = excluded.url THEN mailboxes.uidvalidity ELSE 0 END,
               last_uid = CASE WHEN mailboxes.url = excluded.url THEN mailboxes.last_uid ELSE 0 END,
               url = excluded.url",
            params![m.team.as_str(), m.url, m.password_file, m.password_env, m.address],
        )?;
        Ok(())
    }

    fn remove_mailbox(&self, team: &TeamId) -> Result<bool, StoreError> {
        Ok(self.conn().execute("DELETE FROM mailboxes WHERE team = ?1", [team.as_str()])? > 0)
    }

    fn mailboxes(&self) -> Result<Vec<MailboxSetting>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT team, url, password_file, password_env, address, uidvalidity, last_uid FROM mailboxes ORDER BY team",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(MailboxSetting {
                team: TeamId(r.get(0)?),
                url: r.get(1)?,
                password_file: r.get(2)?,
                password_env: r.get(3)?,
                address: r.get(4)?,
                uidvalidity: r.get(5)?,
                last_uid: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn mailbox_read(&self, team: &TeamId, uidvalidity: i64, last_uid: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE mailboxes SET uidvalidity = ?2, last_uid = ?3 WHERE team = ?1",
            params![team.as_str(), uidvalidity, last_uid],
        )?;
        Ok(())
    }

    fn email_conversation(&self, team: &TeamId, ids: &[String]) -> Result<Option<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT doc_id FROM email_ids WHERE message_id = ?1 AND team = ?2")?;
        for id in ids.iter().rev() {
            if let Some(doc) = stmt.query_row(params![id, team.as_str()], |r| r.get(0)).optional()? {
                return Ok(Some(doc));
            }
        }
        Ok(None)
    }

    fn email_id_known(&self, message_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT 1 FROM email_ids WHERE message_id = ?1", [message_id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn email_conversation_of_address(&self, team: &TeamId, address: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT doc_id FROM email_threads WHERE team = ?1 AND address = ?2 ORDER BY updated_at DESC LIMIT 1",
                [team.as_str(), address],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn record_email(&self, mail: &RecordedEmail<'_>) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        record_email_in(&tx, mail)?;
        tx.commit()?;
        Ok(())
    }

    fn email_thread(&self, doc_id: &str) -> Result<Option<EmailThread>, StoreError> {
        let conn = self.conn();
        let Some((team, address, subject)) = conn
            .query_row("SELECT team, address, subject FROM email_threads WHERE doc_id = ?1", [doc_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
            })
            .optional()?
        else {
            return Ok(None);
        };
        let mut stmt = conn.prepare_cached(
            "SELECT message_id FROM email_ids WHERE doc_id = ?1 ORDER BY at DESC, rowid DESC LIMIT ?2",
        )?;
        let mut refs: Vec<String> =
            stmt.query_map(params![doc_id, THREAD_REFERENCES], |r| r.get(0))?.collect::<Result<_, _>>()?;
        refs.reverse();
        Ok(Some(EmailThread { doc_id: doc_id.to_owned(), team: TeamId(team), address, subject, refs }))
    }

    /// The team of a stored conversation (without loading it).
    fn document_team(&self, id: &str) -> Result<Option<TeamId>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT team FROM documents WHERE id = ?1", [id], |r| r.get(0))
            .optional()?
            .map(TeamId))
    }

    /// Records a stored blob (its file is already on disk) and the conversation it was sent in.
    fn put_blob(&self, blob: &BlobInfo, doc_id: &str, _bytes: &[u8], _thumb: Option<&[u8]>) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT OR IGNORE INTO blobs (hash, size, mime, thumbnail, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![blob.hash, blob.size as i64, blob.mime, blob.thumbnail, now_millis()],
        )?;
        tx.execute("INSERT OR IGNORE INTO blob_refs (hash, doc_id) VALUES (?1, ?2)", [&blob.hash, doc_id])?;
        tx.commit()?;
        Ok(())
    }

    fn team_blob_usage(&self, team: &TeamId, hash: &str) -> Result<(u64, bool), StoreError> {
        let (bytes, has): (i64, bool) = self.conn().query_row(
            "SELECT COALESCE(SUM(b.size), 0), COALESCE(MAX(b.hash = ?2), 0) FROM blobs b
             WHERE b.hash IN (SELECT r.hash FROM blob_refs r JOIN documents d ON d.id = r.doc_id WHERE d.team = ?1)",
            params![team.0, hash],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((bytes.max(0) as u64, has))
    }

    /// A blob as sent in `doc_id`; `None` when it was never sent there (or does not exist).
    fn blob_in(&self, hash: &str, doc_id: &str) -> Result<Option<BlobInfo>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT b.hash, b.size, b.mime, b.thumbnail FROM blobs b JOIN blob_refs r ON r.hash = b.hash
                 WHERE b.hash = ?1 AND r.doc_id = ?2",
                [hash, doc_id],
                |r| {
                    Ok(BlobInfo {
                        hash: r.get(0)?,
                        size: r.get::<_, i64>(1)? as u64,
                        mime: r.get(2)?,
                        thumbnail: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// True when this WhatsApp message id was already turned into a conversation change.
    fn whatsapp_seen(&self, wamid: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT 1 FROM whatsapp_inbound WHERE wamid = ?1", [wamid], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn mark_whatsapp_seen(&self, wamid: &str, doc_id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO whatsapp_inbound (wamid, doc_id, received_at) VALUES (?1, ?2, ?3)",
            params![wamid, doc_id, now_millis()],
        )?;
        Ok(())
    }

    /// The conversation of a WhatsApp contact in a team, if one was started.
    fn whatsapp_contact(&self, team: &TeamId, wa_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT doc_id FROM whatsapp_contacts WHERE team = ?1 AND wa_id = ?2",
                [team.as_str(), wa_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn set_whatsapp_contact(&self, team: &TeamId, wa_id: &str, doc_id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO whatsapp_contacts (team, wa_id, doc_id) VALUES (?1, ?2, ?3)
             ON CONFLICT (team, wa_id) DO UPDATE SET doc_id = excluded.doc_id",
            [team.as_str(), wa_id, doc_id],
        )?;
        Ok(())
    }

    /// Queues crew messages for WhatsApp; a message already queued is not queued again.
    fn queue_whatsapp(&self, rows: &[QueuedWhatsApp]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for m in rows {
            tx.execute(
                "INSERT OR IGNORE INTO whatsapp_outbox (message_id, doc_id, payload, refused, created_at, next_attempt_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                params![m.message_id, m.doc_id, m.payload, m.refused, m.created_at],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// WhatsApp messages neither sent nor given up on, whose next attempt is due, oldest first.
    fn due_whatsapp(&self, now: i64) -> Result<Vec<QueuedWhatsApp>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT message_id, doc_id, payload, refused, created_at FROM whatsapp_outbox
             WHERE sent_at IS NULL AND failed IS NULL AND next_attempt_at <= ?1 ORDER BY created_at, message_id LIMIT 200",
        )?;
        let rows = stmt.query_map([now], |r| {
            Ok(QueuedWhatsApp {
                message_id: r.get(0)?,
                doc_id: r.get(1)?,
                payload: r.get(2)?,
                refused: r.get(3)?,
                created_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The outcome of one attempt: sent (with WhatsApp's message id), failed for good, or retry
    /// after a backoff that doubles (1 s … 5 min).
    fn whatsapp_attempted(&self, message_id: &str, outcome: &WhatsAppOutcome, now: i64) -> Result<(), StoreError> {
        let conn = self.conn();
        match outcome {
            WhatsAppOutcome::Sent { wamid } => conn.execute(
                "UPDATE whatsapp_outbox SET sent_at = ?2, wamid = ?3, attempts = attempts + 1 WHERE message_id = ?1",
                params![message_id, now, wamid],
            )?,
            WhatsAppOutcome::Failed { reason } => conn.execute(
                "UPDATE whatsapp_outbox SET failed = ?2, attempts = attempts + 1 WHERE message_id = ?1",
                params![message_id, reason],
            )?,
            WhatsAppOutcome::Retry => conn.execute(
                "UPDATE whatsapp_outbox SET attempts = attempts + 1,
                   next_attempt_at = ?2 + min(300000, 1000 * (1 << min(attempts, 9))) WHERE message_id = ?1",
                params![message_id, now],
            )?,
        };
        Ok(())
    }

    /// Records grab requests in arrival order; returns the full order for the document.
    fn bind_actors(&self, agent: &AgentId, actors: &[String]) -> Result<Vec<AgentId>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut bound = Vec::with_capacity(actors.len());
        for actor in actors {
            tx.execute(
                "INSERT OR IGNORE INTO actors (actor, agent, first_seen) VALUES (?1, ?2, ?3)",
                params![actor, agent.as_str(), now_millis()],
            )?;
            let owner: String = tx.query_row("SELECT agent FROM actors WHERE actor = ?1", [actor], |r| r.get(0))?;
            bound.push(AgentId(owner));
        }
        tx.commit()?;
        Ok(bound)
    }

    fn log_grabs(&self, doc: &str, agents: &[AgentId]) -> Result<Vec<AgentId>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for a in agents {
            tx.execute(
                "INSERT OR IGNORE INTO grab_log (doc_id, agent, received_at) VALUES (?1, ?2, ?3)",
                params![doc, a.as_str(), now_millis()],
            )?;
        }
        let order = {
            let mut stmt = tx.prepare("SELECT agent FROM grab_log WHERE doc_id = ?1 ORDER BY seq")?;
            stmt.query_map([doc], |r| r.get::<_, String>(0))?.map(|a| a.map(AgentId)).collect::<Result<Vec<_>, _>>()?
        };
        tx.commit()?;
        Ok(order)
    }
}

fn add_member_tx(tx: &rusqlite::Transaction<'_>, team: &TeamId, m: &Member) -> Result<(), StoreError> {
    if m.agent.as_str().trim().is_empty() || m.agent.as_str().len() > 100 {
        return Err(StoreError::Invalid("an agent id must be 1 to 100 characters".into()));
    }
    tx.execute(
        "INSERT INTO agents (id, name) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET name = excluded.name",
        [m.agent.as_str(), &m.name],
    )?;
    tx.execute(
        "INSERT INTO memberships (team, agent, role) VALUES (?1, ?2, ?3)
         ON CONFLICT (team, agent) DO UPDATE SET role = excluded.role",
        [team.as_str(), m.agent.as_str(), role_str(m.role)],
    )?;
    Ok(())
}

/// A team's widget settings as stored (the key row must exist).
fn read_widget_settings(conn: &Connection, team: &str) -> Result<Option<WidgetSettings>, StoreError> {
    let row = conn
        .query_row(
            "SELECT t.name, w.key, w.greeting FROM widget_settings w JOIN teams t ON t.id = w.team WHERE w.team = ?1",
            [team],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?)),
        )
        .optional()?;
    let Some((team_name, key, greeting)) = row else { return Ok(None) };
    let mut stmt = conn.prepare_cached("SELECT origin FROM widget_origins WHERE team = ?1 ORDER BY origin")?;
    let origins = stmt.query_map([team], |r| r.get(0))?.collect::<Result<_, _>>()?;
    Ok(Some(WidgetSettings { team: TeamId(team.to_owned()), team_name, key, greeting, origins }))
}

/// A mail's Message-ID and its thread, inside the caller's transaction.
fn record_email_in(tx: &rusqlite::Transaction<'_>, mail: &RecordedEmail<'_>) -> Result<(), StoreError> {
    let now = now_millis();
    if let Some(id) = mail.message_id {
        tx.prepare_cached(
            "INSERT OR IGNORE INTO email_ids (message_id, doc_id, team, ours, at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![id, mail.doc_id, mail.team.as_str(), mail.ours, now])?;
    }
    tx.prepare_cached(
        "INSERT INTO email_threads (doc_id, team, address, subject, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (doc_id) DO UPDATE SET updated_at = excluded.updated_at",
    )?
    .execute(params![mail.doc_id, mail.team.as_str(), mail.address, mail.subject, now])?;
    Ok(())
}
