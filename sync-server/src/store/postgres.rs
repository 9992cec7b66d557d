//! The PostgreSQL backend: several relay instances share one database.
//!
//! - A commit is a committed PostgreSQL transaction; chunks of one document are written under that
//!   document's advisory lock, so their `seq` order is their commit order.
//! - In the same transaction the instance sends `NOTIFY crewdesk` with the document id, team and
//!   last `seq` (never the data). Other instances LISTEN and read the chunks from the database.
//! - When the LISTEN connection drops, the instance reconnects and reports a [`StoreEvent::Resync`],
//!   so whatever was committed meanwhile is read from the database instead of being missed.
//! - Grab orders and outbox claims are decided inside transactions (advisory lock, `FOR UPDATE
//!   SKIP LOCKED`), never by one instance's memory.
//!
//! The driver is `tokio-postgres` with a `deadpool-postgres` pool on a small runtime of its own;
//! the [`Storage`] methods block on it (the relay calls them from `spawn_blocking`).

use super::*;
use crewdesk::domain::{AgentId, Member, Team, TeamId};
use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use std::future::Future;
use std::sync::Mutex;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use tracing::{info, warn};

const MIGRATIONS: &[&str] = &[
    include_str!("migrations/postgres/0001_relay.sql"),
    include_str!("migrations/postgres/0002_blob_bytes.sql"),
    include_str!("migrations/postgres/0003_rate_events.sql"),
    include_str!("migrations/postgres/0004_email_attachments.sql"),
    include_str!("migrations/postgres/0005_actors.sql"),
    include_str!("migrations/postgres/0006_widget_settings.sql"),
    include_str!("migrations/postgres/0007_change_seqs.sql"),
    include_str!("migrations/postgres/0008_access_version.sql"),
    include_str!("migrations/postgres/0009_blob_refs_doc.sql"),
    include_str!("migrations/postgres/0010_message_times.sql"),
    include_str!("migrations/postgres/0011_email_channel.sql"),
];

/// The NOTIFY channel the instances talk on.
const CHANNEL: &str = "crewdesk";
/// NOTIFY payloads must stay below 8000 bytes.
const MAX_NOTE: usize = 7900;

/// Chunks of at most this many bytes (together, per document and commit) travel in the commit's
/// notification (as hex, well inside PostgreSQL's 8,000-byte payload), so the other instances
/// need not read them: a typical message is a few hundred bytes.
const NOTE_CHUNK_BYTES: i64 = 3000;
/// How long a claimed outbox row stays with the instance that claimed it.
const CLAIM_MS: i64 = 60_000;

pub struct PgStore {
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    config: tokio_postgres::Config,
    /// This process's id in notifications (it ignores its own).
    instance: String,
    subscribed: Mutex<bool>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropping a runtime inside async code panics; this one's tasks just stop.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// What goes over NOTIFY.
#[derive(serde::Serialize, serde::Deserialize)]
struct Note {
    /// The instance that sent it.
    o: String,
    #[serde(flatten)]
    what: NoteKind,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "k")]
enum NoteKind {
    #[serde(rename = "c")]
    Committed {
        d: String,
        t: String,
        s: i64,
        n: bool,
        /// The document's last position before this commit (none for a new document).
        #[serde(default)]
        p: Option<i64>,
        /// The committed chunks in hex, when they are at most `NOTE_CHUNK_BYTES` together.
        #[serde(default)]
        b: Option<String>,
    },
    #[serde(rename = "p")]
    Presence { d: String, p: crewdesk::domain::Presence },
    #[serde(rename = "e")]
    Ephemeral { d: String, from: String, count: u64, session: String, data: String },
    #[serde(rename = "t")]
    Typing { d: String, a: Option<String>, n: Option<String> },
}

/// The pool's error with its causes (deadpool's own message alone hides why a connection failed).
fn pool_error(e: impl std::error::Error) -> StoreError {
    let mut message = format!("relay storage (PostgreSQL) is unavailable: {e}");
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    StoreError::Invalid(message)
}

impl PgStore {
    /// Connects (checking the URL and the server), creates or upgrades the schema.
    pub fn connect(url: &str) -> Result<PgStore, StoreError> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Invalid(format!("invalid PostgreSQL URL: {e} (expected postgres://USER@HOST:PORT/DATABASE)"))
        })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("crewdesk-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Invalid(format!("cannot start the PostgreSQL driver: {e}")))?;
        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = {
            let _g = rt.enter();
            Pool::builder(manager)
                .max_size(16)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(std::time::Duration::from_secs(30)))
                .create_timeout(Some(std::time::Duration::from_secs(10)))
                .build()
                .map_err(pool_error)?
        };
        let store = PgStore {
            rt: Some(rt),
            pool,
            config,
            instance: crewdesk::sync::document_id::encode(&rand::random()),
            subscribed: Mutex::new(false),
        };
        store.block(async {
            let mut c = store.client().await?;
            migrate(&mut c).await
        })?;
        Ok(store)
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("the runtime lives as long as the store")
    }

    /// Runs a query future to completion on this store's runtime, from any thread. Unconstrained:
    /// called from inside another runtime's task, tokio's cooperative budget would otherwise run
    /// out and the pool would wait for a wake-up that only yielding to that runtime brings.
    pub(super) fn block<T>(&self, f: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        let _g = self.rt().enter();
        futures_executor::block_on(tokio::task::unconstrained(f))
    }

    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    fn note(&self, what: NoteKind) -> Result<String, StoreError> {
        Ok(serde_json::to_string(&Note { o: self.instance.clone(), what })?)
    }
}

async fn migrate(c: &mut deadpool_postgres::Object) -> Result<(), StoreError> {
    let tx = c.transaction().await?;
    // Instances starting together migrate one at a time.
    tx.execute("SELECT pg_advisory_xact_lock(7461234001)", &[]).await?;
    // "already exists, skipping" notices are not news.
    tx.batch_execute("SET LOCAL client_min_messages = warning").await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .await?;
    let current: i64 = tx.query_one("SELECT coalesce(max(version), 0) FROM schema_migrations", &[]).await?.get(0);
    let supported = MIGRATIONS.len() as i64;
    if current > supported {
        return Err(StoreError::NewerSchema { found: current, supported });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
            &[&(i as i64 + 1), &now_millis()],
        )
        .await?;
        info!(version = i + 1, "PostgreSQL schema migrated");
    }
    tx.commit().await?;
    Ok(())
}

async fn add_member_tx(tx: &impl GenericClient, team: &TeamId, m: &Member) -> Result<(), StoreError> {
    if m.agent.as_str().trim().is_empty() || m.agent.as_str().len() > 100 {
        return Err(StoreError::Invalid("an agent id must be 1 to 100 characters".into()));
    }
    tx.execute(
        "INSERT INTO agents (id, name) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET name = excluded.name",
        &[&m.agent.as_str(), &m.name],
    )
    .await?;
    tx.execute(
        "INSERT INTO memberships (team, agent, role) VALUES ($1, $2, $3)
         ON CONFLICT (team, agent) DO UPDATE SET role = excluded.role",
        &[&team.as_str(), &m.agent.as_str(), &role_str(m.role)],
    )
    .await?;
    Ok(())
}

/// A connection holding a session advisory lock; it never goes back to the pool.
struct HeldLock(Option<deadpool_postgres::Object>);

impl Drop for HeldLock {
    fn drop(&mut self) {
        if let Some(object) = self.0.take() {
            drop(deadpool_postgres::Object::take(object));
        }
    }
}

/// A team's widget settings as stored (the key row must exist).
async fn read_widget_settings(c: &tokio_postgres::Client, team: &str) -> Result<Option<WidgetSettings>, StoreError> {
    let row = c
        .query_opt(
            "SELECT t.name, w.key, w.greeting FROM widget_settings w JOIN teams t ON t.id = w.team WHERE w.team = $1",
            &[&team],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let origins = c
        .query("SELECT origin FROM widget_origins WHERE team = $1 ORDER BY origin", &[&team])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Some(WidgetSettings {
        team: TeamId(team.to_owned()),
        team_name: row.get(0),
        key: row.get(1),
        greeting: row.get(2),
        origins,
    }))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl Storage for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn storage_id(&self) -> Result<String, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let id = crewdesk::sync::document_id::encode(&rand::random());
            c.execute("INSERT INTO meta (key, value) VALUES ('storage_id', $1) ON CONFLICT (key) DO NOTHING", &[&id])
                .await?;
            Ok(c.query_one("SELECT value FROM meta WHERE key = 'storage_id'", &[]).await?.get(0))
        })
    }

    fn put_team(&self, team: &Team) -> Result<(), StoreError> {
        team.thresholds.validate().map_err(|e| StoreError::Invalid(e.to_string()))?;
        if team.id.as_str().trim().is_empty() || team.name.trim().is_empty() {
            return Err(StoreError::Invalid("a team needs an id and a name".into()));
        }
        let body = serde_json::to_string(&Team { members: Vec::new(), ..team.clone() })?;
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            tx.execute(
                "INSERT INTO teams (id, name, mode, body) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, mode = excluded.mode, body = excluded.body",
                &[&team.id.as_str(), &team.name, &mode_str(team.mode), &body],
            )
            .await?;
            for m in &team.members {
                add_member_tx(&tx, &team.id, m).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn add_member(&self, team: &TeamId, member: &Member) -> Result<(), StoreError> {
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let exists: i64 = tx.query_one("SELECT count(*) FROM teams WHERE id = $1", &[&team.as_str()]).await?.get(0);
            if exists == 0 {
                return Err(StoreError::Invalid(format!("no team `{team}`; create it first")));
            }
            add_member_tx(&tx, team, member).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn remove_member(&self, team: &TeamId, agent: &AgentId) -> Result<bool, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let n = c
                .execute("DELETE FROM memberships WHERE team = $1 AND agent = $2", &[&team.as_str(), &agent.as_str()])
                .await?;
            Ok(n > 0)
        })
    }

    fn teams(&self) -> Result<Vec<Team>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let mut teams: Vec<Team> = c
                .query("SELECT body FROM teams ORDER BY id", &[])
                .await?
                .iter()
                .map(|r| Ok(serde_json::from_str(r.get::<_, &str>(0))?))
                .collect::<Result<_, StoreError>>()?;
            let rows = c
                .query(
                    "SELECT m.team, m.agent, a.name, m.role FROM memberships m JOIN agents a ON a.id = m.agent
                     ORDER BY m.team, m.agent",
                    &[],
                )
                .await?;
            for r in rows {
                let team: &str = r.get(0);
                if let Some(t) = teams.iter_mut().find(|t| t.id.as_str() == team) {
                    t.members.push(Member { agent: AgentId(r.get(1)), name: r.get(2), role: parse_role(r.get(3))? });
                }
            }
            Ok(teams)
        })
    }

    fn issue_token(&self, agent: &AgentId, label: &str) -> Result<String, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let exists: i64 =
                c.query_one("SELECT count(*) FROM agents WHERE id = $1", &[&agent.as_str()]).await?.get(0);
            if exists == 0 {
                return Err(StoreError::Invalid(format!("no agent `{agent}`; add them to a team first")));
            }
            let token = format!("cdt_{}", crewdesk::sync::document_id::encode(&rand::random()));
            c.execute(
                "INSERT INTO tokens (hash, agent, label, created_at) VALUES ($1, $2, $3, $4)",
                &[&hash_token(&token), &agent.as_str(), &label, &now_millis()],
            )
            .await?;
            Ok(token)
        })
    }

    fn revoke_tokens(&self, agent: &AgentId, token: Option<&str>) -> Result<usize, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let n = match token {
                Some(t) => {
                    c.execute(
                        "UPDATE tokens SET revoked_at = $1 WHERE agent = $2 AND hash = $3 AND revoked_at IS NULL",
                        &[&now_millis(), &agent.as_str(), &hash_token(t)],
                    )
                    .await?
                }
                None => {
                    c.execute(
                        "UPDATE tokens SET revoked_at = $1 WHERE agent = $2 AND revoked_at IS NULL",
                        &[&now_millis(), &agent.as_str()],
                    )
                    .await?
                }
            };
            Ok(n as usize)
        })
    }

    fn access_version(&self) -> Result<i64, StoreError> {
        self.block(async {
            let c = self.client().await?;
            Ok(c.query_one("SELECT version FROM access_version WHERE id = 1", &[]).await?.get(0))
        })
    }

    fn authenticate_hash(&self, hash: &str) -> Result<Option<Agent>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let Some(row) = c
                .query_opt(
                    "SELECT a.id, a.name FROM tokens t JOIN agents a ON a.id = t.agent
                     WHERE t.hash = $1 AND t.revoked_at IS NULL",
                    &[&hash],
                )
                .await?
            else {
                return Ok(None);
            };
            let (id, name): (String, String) = (row.get(0), row.get(1));
            let teams = c
                .query("SELECT team, role FROM memberships WHERE agent = $1 ORDER BY team", &[&id])
                .await?
                .iter()
                .map(|r| Ok((TeamId(r.get(0)), parse_role(r.get(1))?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(Some(Agent { id: AgentId(id), name, teams }))
        })
    }

    fn token_list(&self) -> Result<Vec<(String, String, bool)>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let rows = c
                .query("SELECT agent, label, revoked_at IS NOT NULL FROM tokens ORDER BY agent, created_at", &[])
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
        })
    }

    fn load_document_at(&self, id: &str) -> Result<Option<StoredChunks>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let team = c.prepare_cached("SELECT team FROM documents WHERE id = $1").await?;
            let Some(team) = c.query_opt(&team, &[&id]).await? else {
                return Ok(None);
            };
            let chunks = c.prepare_cached("SELECT seq, bytes FROM doc_chunks WHERE doc_id = $1 ORDER BY seq").await?;
            let rows = c.query(&chunks, &[&id]).await?;
            let (mut bytes, mut seq) = (Vec::new(), 0);
            let chunks = rows.len();
            for r in rows {
                seq = r.get(0);
                bytes.extend_from_slice(r.get::<_, &[u8]>(1));
            }
            Ok(Some(StoredChunks { team: TeamId(team.get(0)), bytes, seq, chunks }))
        })
    }

    /// Chunks other instances wrote (this instance's own are already in its memory), for all the
    /// documents in one query.
    fn chunks_since_many(
        &self,
        wanted: &[(String, i64)],
    ) -> Result<std::collections::HashMap<String, (Vec<u8>, i64)>, StoreError> {
        let ids: Vec<&str> = wanted.iter().map(|w| w.0.as_str()).collect();
        let since: Vec<i64> = wanted.iter().map(|w| w.1).collect();
        self.block(async {
            let c = self.client().await?;
            // Prepared once per connection (the hot paths skip parsing and a round trip).
            let statement = c
                .prepare_cached(
                    "SELECT c.doc_id, c.seq, CASE WHEN c.origin <> $3 THEN c.bytes END
                     FROM unnest($1::text[], $2::bigint[]) AS w(d, s)
                     JOIN doc_chunks c ON c.doc_id = w.d AND c.seq > w.s
                     ORDER BY c.doc_id, c.seq",
                )
                .await?;
            let rows = c.query(&statement, &[&ids, &since, &self.instance]).await?;
            let mut out: std::collections::HashMap<String, (Vec<u8>, i64)> = std::collections::HashMap::new();
            for r in rows {
                let e = out.entry(r.get(0)).or_default();
                e.1 = r.get(1);
                if let Some(b) = r.get::<_, Option<&[u8]>>(2) {
                    e.0.extend_from_slice(b);
                }
            }
            Ok(out)
        })
    }

    fn append_chunks(&self, chunks: &[NewChunk<'_>]) -> Result<Vec<bool>, StoreError> {
        let mut ids: Vec<&str> = chunks.iter().map(|c| c.doc).collect();
        ids.sort_unstable();
        ids.dedup();
        let doc_ids: Vec<&str> = chunks.iter().map(|c| c.doc).collect();
        let teams: Vec<&str> = chunks.iter().map(|c| c.team.as_str()).collect();
        let bytes: Vec<&[u8]> = chunks.iter().map(|c| c.bytes).collect();
        // Every client change of the batch with the chunk it is in (1-based, as WITH ORDINALITY).
        let (mut ord, mut change_docs, mut actors, mut seqs, mut hashes) = (vec![], vec![], vec![], vec![], vec![]);
        for (n, c) in chunks.iter().enumerate() {
            for ch in c.changes {
                ord.push(n as i64 + 1);
                change_docs.push(c.doc);
                actors.push(ch.actor.as_str());
                seqs.push(i64::try_from(ch.seq).unwrap_or(i64::MAX));
                hashes.push(ch.hash.as_str());
            }
        }
        // The messages they add, with the chunk they are in: the relay's time beside their `at`.
        let (mut m_ord, mut m_docs, mut m_ids, mut m_ats) = (vec![], vec![], vec![], vec![]);
        for (n, c) in chunks.iter().enumerate() {
            for m in c.messages {
                m_ord.push(n as i64 + 1);
                m_docs.push(c.doc);
                m_ids.push(m.id.as_str());
                m_ats.push(m.at.0);
            }
        }
        // Mails the chunks take in (the email channel): their mailboxes' progress, Message-IDs and
        // threads, in the same transaction.
        let mails: Vec<(&str, &TakenMail)> = chunks.iter().filter_map(|c| c.mail.map(|m| (c.doc, m))).collect();
        let mail_docs: Vec<&str> = mails.iter().map(|(d, _)| *d).collect();
        let mail_teams: Vec<&str> = mails.iter().map(|(_, m)| m.team.as_str()).collect();
        let mail_validities: Vec<i64> = mails.iter().map(|(_, m)| m.uidvalidity).collect();
        let mail_uids: Vec<i64> = mails.iter().map(|(_, m)| m.uid).collect();
        let mail_ids: Vec<Option<&str>> = mails.iter().map(|(_, m)| m.message_id.as_deref()).collect();
        let mail_addresses: Vec<&str> = mails.iter().map(|(_, m)| m.address.as_str()).collect();
        let mail_subjects: Vec<&str> = mails.iter().map(|(_, m)| m.subject.as_str()).collect();
        let now = now_millis();
        self.block(async {
            let c = self.client().await?;
            // One document's chunks commit one transaction at a time (sorted: no deadlocks).
            let lock = c
                .prepare_cached("SELECT pg_advisory_xact_lock(hashtextextended(d, 0)) FROM unnest($1::text[]) AS d")
                .await?;
            // Under the documents' locks: the chunks whose changes take an (actor, sequence number)
            // another change holds are refused; the other changes take their places.
            let claim = c
                .prepare_cached(
                    "WITH input AS (
                       SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[])
                         AS u(n, d, actor, seq, hash)
                     ), taken AS (
                       SELECT DISTINCT i.n FROM input i JOIN change_seqs c
                         ON c.doc_id = i.d AND c.actor = i.actor AND c.seq = i.seq AND c.hash <> i.hash
                     ), claimed AS (
                       INSERT INTO change_seqs (doc_id, actor, seq, hash)
                       SELECT d, actor, seq, hash FROM input WHERE n NOT IN (SELECT n FROM taken)
                       ON CONFLICT DO NOTHING
                     )
                     SELECT n FROM taken",
                )
                .await?;
            // The documents, the chunks (but the refused ones) and one notification per document
            // (the last position, and whether it is new) in one statement. The notification is
            // `Note` with `NoteKind::Committed` as JSON: {"o": instance, "k": "c", "d": document,
            // "t": team, "s": position, "n": new, "p": the position before, "b": the chunks in hex
            // when small}. Every part of the statement sees the table as it was before it (one
            // snapshot), so `p` is the document's last position before these chunks; under the
            // document's lock no other commit can come between.
            let append = c
                .prepare_cached(
                    "WITH docs AS (
                       INSERT INTO documents (id, team, created_at)
                       SELECT DISTINCT ON (d) d, t, $4::bigint FROM unnest($1::text[], $2::text[]) AS u(d, t)
                       ON CONFLICT (id) DO NOTHING RETURNING id
                     ), refused AS (
                       SELECT DISTINCT i.n FROM unnest($7::bigint[], $8::text[], $9::text[], $10::bigint[], $11::text[])
                         AS i(n, d, actor, seq, hash)
                       JOIN change_seqs c ON c.doc_id = i.d AND c.actor = i.actor AND c.seq = i.seq AND c.hash <> i.hash
                     ), chunks AS (
                       INSERT INTO doc_chunks (doc_id, origin, bytes)
                       SELECT d, $5, b FROM unnest($1::text[], $3::bytea[]) WITH ORDINALITY AS u(d, b, n)
                       WHERE n NOT IN (SELECT n FROM refused) ORDER BY n
                       RETURNING doc_id, seq, bytes
                     ), times AS (
                       INSERT INTO message_times (doc_id, message_id, at, received_at)
                       SELECT d, id, at, $4 FROM unnest($12::bigint[], $13::text[], $14::text[], $15::bigint[])
                         AS m(n, d, id, at)
                       WHERE n NOT IN (SELECT n FROM refused)
                       ON CONFLICT DO NOTHING
                     ), teams AS (
                       SELECT DISTINCT ON (d) d, t FROM unnest($1::text[], $2::text[]) AS u(d, t)
                     )
                     SELECT pg_notify($6, json_build_object(
                       'o', $5::text, 'k', 'c', 'd', c.doc_id, 't', teams.t, 's', max(c.seq),
                       'n', EXISTS (SELECT 1 FROM docs WHERE docs.id = c.doc_id),
                       'p', (SELECT max(x.seq) FROM doc_chunks x WHERE x.doc_id = c.doc_id),
                       'b', CASE WHEN sum(length(c.bytes)) <= $16
                         THEN string_agg(encode(c.bytes, 'hex'), '' ORDER BY c.seq) END)::text)
                     FROM chunks c JOIN teams ON teams.d = c.doc_id
                     GROUP BY c.doc_id, teams.t",
                )
                .await?;
            // One round trip: BEGIN, the lock, the claim, the append and COMMIT are pipelined. If a
            // statement fails, the ones after it in the transaction are skipped and COMMIT rolls it
            // back.
            let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&ids];
            let claim_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
                [&ord, &change_docs, &actors, &seqs, &hashes];
            let append_params: [&(dyn tokio_postgres::types::ToSql + Sync); 16] = [
                &doc_ids,
                &teams,
                &bytes,
                &now,
                &self.instance,
                &CHANNEL,
                &ord,
                &change_docs,
                &actors,
                &seqs,
                &hashes,
                &m_ord,
                &m_docs,
                &m_ids,
                &m_ats,
                &NOTE_CHUNK_BYTES,
            ];
            let mail_params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
                &mail_docs,
                &mail_teams,
                &mail_validities,
                &mail_uids,
                &mail_ids,
                &mail_addresses,
                &mail_subjects,
                &now,
            ];
            // One statement (it is pipelined before COMMIT), sent only when a chunk takes a mail in.
            let mailboxes = async {
                if mails.is_empty() {
                    return Ok(0);
                }
                c.execute(
                    "WITH input AS (
                       SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::text[])
                         AS u(doc, team, v, uid, mid, address, subject)
                     ), progress AS (
                       UPDATE mailboxes SET uidvalidity = input.v, last_uid = input.uid FROM input
                       WHERE mailboxes.team = input.team
                     ), ids AS (
                       INSERT INTO email_ids (message_id, doc_id, team, ours, at)
                       SELECT mid, doc, team, false, $8 FROM input WHERE mid IS NOT NULL ON CONFLICT DO NOTHING
                     )
                     INSERT INTO email_threads (doc_id, team, address, subject, updated_at)
                     SELECT DISTINCT ON (doc) doc, team, address, subject, $8 FROM input
                     ON CONFLICT (doc_id) DO UPDATE SET updated_at = excluded.updated_at",
                    &mail_params,
                )
                .await
            };
            let (begin, locked, claimed, appended, read, commit) = futures_util::join!(
                c.batch_execute("BEGIN"),
                c.execute(&lock, &lock_params),
                c.query(&claim, &claim_params),
                c.execute(&append, &append_params),
                mailboxes,
                c.batch_execute("COMMIT"),
            );
            begin?;
            locked?;
            let refused: Vec<i64> = claimed?.iter().map(|r| r.get(0)).collect();
            appended?;
            read?;
            commit?;
            Ok((1..=chunks.len() as i64).map(|n| !refused.contains(&n)).collect())
        })
    }

    fn message_times(&self, doc: &str) -> Result<Vec<(String, i64, i64)>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT message_id, at, received_at FROM message_times WHERE doc_id = $1
                     ORDER BY received_at, message_id",
                    &[&doc],
                )
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
        })
    }

    fn import_documents(&self, docs: &[(String, TeamId, Vec<u8>)]) -> Result<usize, StoreError> {
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let mut added = 0;
            let now = now_millis();
            for (id, team, bytes) in docs {
                let n = tx
                    .execute(
                        "INSERT INTO documents (id, team, created_at) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
                        &[id, &team.as_str(), &now],
                    )
                    .await?;
                if n == 1 {
                    tx.execute(
                        "INSERT INTO doc_chunks (doc_id, origin, bytes) VALUES ($1, $2, $3)",
                        &[id, &self.instance, bytes],
                    )
                    .await?;
                    added += 1;
                }
            }
            tx.commit().await?;
            Ok(added)
        })
    }

    /// Under the document's lock (no other instance appends meanwhile); the merged chunk takes the
    /// last chunk's position, so instances that are up to date do not read it again.
    fn compact_stored(&self, id: &str) -> Result<usize, StoreError> {
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&id]).await?;
            let rows = tx.query("SELECT seq, bytes FROM doc_chunks WHERE doc_id = $1 ORDER BY seq", &[&id]).await?;
            if rows.len() < 2 {
                return Ok(0);
            }
            let mut bytes = Vec::new();
            for r in &rows {
                bytes.extend_from_slice(r.get::<_, &[u8]>(1));
            }
            let last: i64 = rows[rows.len() - 1].get(0);
            let full = compacted(id, &bytes)?;
            tx.execute("DELETE FROM doc_chunks WHERE doc_id = $1 AND seq <= $2", &[&id, &last]).await?;
            tx.execute(
                "INSERT INTO doc_chunks (seq, doc_id, origin, bytes) VALUES ($1, $2, '', $3)",
                &[&last, &id, &full],
            )
            .await?;
            tx.commit().await?;
            Ok(rows.len())
        })
    }

    fn chunk_count(&self, id: &str) -> Result<usize, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let n: i64 = c.query_one("SELECT count(*) FROM doc_chunks WHERE doc_id = $1", &[&id]).await?.get(0);
            Ok(n as usize)
        })
    }

    fn documents_of(&self, teams: &[TeamId]) -> Result<Vec<String>, StoreError> {
        let teams: Vec<&str> = teams.iter().map(TeamId::as_str).collect();
        self.block(async {
            let c = self.client().await?;
            let rows = c.query("SELECT id FROM documents WHERE team = ANY($1) ORDER BY team, id", &[&teams]).await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn documents_since(&self, since: i64) -> Result<Vec<(String, TeamId)>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let rows = c.query("SELECT id, team FROM documents WHERE created_at >= $1 ORDER BY id", &[&since]).await?;
            Ok(rows.iter().map(|r| (r.get(0), TeamId(r.get(1)))).collect())
        })
    }

    fn document_team(&self, id: &str) -> Result<Option<TeamId>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            Ok(c.query_opt("SELECT team FROM documents WHERE id = $1", &[&id]).await?.map(|r| TeamId(r.get(0))))
        })
    }

    fn create_widget_session(&self, doc_id: &str, location: Option<&str>) -> Result<String, StoreError> {
        let token = format!("cws_{}", crewdesk::sync::document_id::encode(&rand::random()));
        self.block(async {
            let c = self.client().await?;
            c.execute(
                "INSERT INTO widget_sessions (token_hash, doc_id, location, created_at) VALUES ($1, $2, $3, $4)",
                &[&hash_token(&token), &doc_id, &location, &now_millis()],
            )
            .await?;
            Ok(())
        })?;
        Ok(token)
    }

    fn widget_session(&self, token: &str) -> Result<Option<(String, Option<String>)>, StoreError> {
        if token.is_empty() || token.len() > 200 {
            return Ok(None);
        }
        self.block(async {
            let c = self.client().await?;
            let row = c
                .query_opt("SELECT doc_id, location FROM widget_sessions WHERE token_hash = $1", &[&hash_token(token)])
                .await?;
            Ok(row.map(|r| (r.get(0), r.get(1))))
        })
    }

    fn widget_settings(&self, team: &TeamId) -> Result<Option<WidgetSettings>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            c.execute(
                "INSERT INTO widget_settings (team, key, rotated_at) SELECT id, $2, $3 FROM teams WHERE id = $1
                 ON CONFLICT (team) DO NOTHING",
                &[&team.as_str(), &new_widget_key(), &now_millis()],
            )
            .await?;
            read_widget_settings(&c, team.as_str()).await
        })
    }

    fn widget_by_key(&self, key: &str) -> Result<Option<WidgetSettings>, StoreError> {
        if !plausible_widget_key(key) {
            return Ok(None);
        }
        self.block(async {
            let c = self.client().await?;
            let team: Option<String> =
                c.query_opt("SELECT team FROM widget_settings WHERE key = $1", &[&key]).await?.map(|r| r.get(0));
            match team {
                Some(team) => read_widget_settings(&c, &team).await,
                None => Ok(None),
            }
        })
    }

    fn set_widget_origins(&self, team: &TeamId, origins: &[String]) -> Result<(), StoreError> {
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            tx.execute("DELETE FROM widget_origins WHERE team = $1", &[&team.as_str()]).await?;
            for origin in origins {
                tx.execute(
                    "INSERT INTO widget_origins (team, origin) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&team.as_str(), origin],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn set_widget_greeting(&self, team: &TeamId, greeting: Option<&str>) -> Result<(), StoreError> {
        self.widget_settings(team)?.ok_or_else(|| StoreError::Invalid(format!("no team `{team}`")))?;
        self.block(async {
            let c = self.client().await?;
            c.execute("UPDATE widget_settings SET greeting = $2 WHERE team = $1", &[&team.as_str(), &greeting]).await?;
            Ok(())
        })
    }

    fn rotate_widget_key(&self, team: &TeamId) -> Result<String, StoreError> {
        self.widget_settings(team)?.ok_or_else(|| StoreError::Invalid(format!("no team `{team}`")))?;
        let key = new_widget_key();
        self.block(async {
            let c = self.client().await?;
            c.execute(
                "UPDATE widget_settings SET key = $2, rotated_at = $3 WHERE team = $1",
                &[&team.as_str(), &key, &now_millis()],
            )
            .await?;
            Ok(())
        })?;
        Ok(key)
    }

    fn queue_emails(&self, emails: &[QueuedEmail]) -> Result<(), StoreError> {
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            for e in emails {
                tx.execute(
                    "INSERT INTO email_outbox (message_id, doc_id, to_addr, customer, agent, text, created_at, next_attempt_at, attachment, team)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9) ON CONFLICT (message_id) DO NOTHING",
                    &[
                        &e.message_id,
                        &e.doc_id,
                        &e.to,
                        &e.customer,
                        &e.agent,
                        &e.text,
                        &e.created_at,
                        &e.attachment_json(),
                        &e.team.as_ref().map(TeamId::as_str),
                    ],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Claims due emails of conversations whose latest message is older than the batching window
    /// (quick successive messages still go out together), for [`CLAIM_MS`].
    fn due_emails(&self, now: i64) -> Result<Vec<QueuedEmail>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "WITH due AS (
                       SELECT message_id FROM email_outbox
                       WHERE sent_at IS NULL AND next_attempt_at <= $1 AND doc_id NOT IN (
                         SELECT doc_id FROM email_outbox WHERE sent_at IS NULL AND created_at > $1 - $2)
                       ORDER BY created_at, message_id LIMIT 500 FOR UPDATE SKIP LOCKED)
                     UPDATE email_outbox o SET next_attempt_at = $1 + $3 FROM due WHERE o.message_id = due.message_id
                     RETURNING o.message_id, o.doc_id, o.to_addr, o.customer, o.agent, o.text, o.created_at, o.attachment,
                       o.team, o.attempts",
                    &[&now, &crate::mailer::BATCH_WINDOW_MS, &CLAIM_MS],
                )
                .await?;
            let mut out: Vec<QueuedEmail> = rows
                .iter()
                .map(|r| QueuedEmail {
                    message_id: r.get(0),
                    doc_id: r.get(1),
                    to: r.get(2),
                    customer: r.get(3),
                    agent: r.get(4),
                    text: r.get(5),
                    created_at: r.get(6),
                    attachment: EmailAttachment::from_json(r.get(7)),
                    team: r.get::<_, Option<String>>(8).map(TeamId),
                    attempts: r.get(9),
                })
                .collect();
            out.sort_by(|a, b| (a.created_at, &a.message_id).cmp(&(b.created_at, &b.message_id)));
            Ok(out)
        })
    }

    fn mark_emails_sent(&self, ids: &[String], now: i64) -> Result<(), StoreError> {
        self.block(async {
            let c = self.client().await?;
            c.execute("UPDATE email_outbox SET sent_at = $2 WHERE message_id = ANY($1)", &[&ids, &now]).await?;
            Ok(())
        })
    }

    fn retry_emails(&self, ids: &[String], now: i64) -> Result<(), StoreError> {
        self.block(async {
            let c = self.client().await?;
            c.execute(
                "UPDATE email_outbox SET attempts = attempts + 1,
                   next_attempt_at = $2 + least(300000, 1000 * (1::bigint << least(attempts, 9)::int))
                 WHERE message_id = ANY($1)",
                &[&ids, &now],
            )
            .await?;
            Ok(())
        })
    }

    fn fail_emails(&self, ids: &[String], reason: &str, now: i64) -> Result<(), StoreError> {
        self.block(async {
            let c = self.client().await?;
            c.execute(
                "UPDATE email_outbox SET attempts = attempts + 1, sent_at = $2, failed = $3 WHERE message_id = ANY($1)",
                &[&ids, &now, &reason],
            )
            .await?;
            Ok(())
        })
    }

    fn set_mailbox(&self, m: &MailboxSetting) -> Result<(), StoreError> {
        self.block(async {
            let c = self.client().await?;
            c.execute(
                "INSERT INTO mailboxes (team, url, password_file, password_env, address) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (team) DO UPDATE SET password_file = excluded.password_file,
                   password_env = excluded.password_env, address = excluded.address,
                   uidvalidity = CASE WHEN mailboxes.url = excluded.url THEN mailboxes.uidvalidity ELSE 0 END,
                   last_uid = CASE WHEN mailboxes.url = excluded.url THEN mailboxes.last_uid ELSE 0 END,
                   url = excluded.url",
                &[&m.team.as_str(), &m.url, &m.password_file, &m.password_env, &m.address],
            )
            .await?;
            Ok(())
        })
    }

    fn remove_mailbox(&self, team: &TeamId) -> Result<bool, StoreError> {
        self.block(async {
            let c = self.client().await?;
            Ok(c.execute("DELETE FROM mailboxes WHERE team = $1", &[&team.as_str()]).await? > 0)
        })
    }

    fn mailboxes(&self) -> Result<Vec<MailboxSetting>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT team, url, password_file, password_env, address, uidvalidity, last_uid FROM mailboxes ORDER BY team",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| MailboxSetting {
                    team: TeamId(r.get(0)),
                    url: r.get(1),
                    password_file: r.get(2),
                    password_env: r.get(3),
                    address: r.get(4),
                    uidvalidity: r.get(5),
                    last_uid: r.get(6),
                })
                .collect())
        })
    }

    fn mailbox_read(&self, team: &TeamId, uidvalidity: i64, last_uid: i64) -> Result<(), StoreError> {
        self.block(async {
            let c = self.client().await?;
            c.execute(
                "UPDATE mailboxes SET uidvalidity = $2, last_uid = $3 WHERE team = $1",
                &[&team.as_str(), &uidvalidity, &last_uid],
            )
            .await?;
            Ok(())
        })
    }

    fn email_conversation(&self, team: &TeamId, ids: &[String]) -> Result<Option<String>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT message_id, doc_id FROM email_ids WHERE message_id = ANY($1) AND team = $2",
                    &[&ids, &team.as_str()],
                )
                .await?;
            let found: std::collections::HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            Ok(ids.iter().rev().find_map(|id| found.get(id).cloned()))
        })
    }

    fn email_id_known(&self, message_id: &str) -> Result<bool, StoreError> {
        self.block(async {
            let c = self.client().await?;
            Ok(c.query_opt("SELECT 1 FROM email_ids WHERE message_id = $1", &[&message_id]).await?.is_some())
        })
    }

    fn email_conversation_of_address(&self, team: &TeamId, address: &str) -> Result<Option<String>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let row = c
                .query_opt(
                    "SELECT doc_id FROM email_threads WHERE team = $1 AND address = $2 ORDER BY updated_at DESC LIMIT 1",
                    &[&team.as_str(), &address],
                )
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn record_email(&self, mail: &RecordedEmail<'_>) -> Result<(), StoreError> {
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let now = now_millis();
            if let Some(id) = mail.message_id {
                tx.execute(
                    "INSERT INTO email_ids (message_id, doc_id, team, ours, at) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (message_id) DO NOTHING",
                    &[&id, &mail.doc_id, &mail.team.as_str(), &mail.ours, &now],
                )
                .await?;
            }
            tx.execute(
                "INSERT INTO email_threads (doc_id, team, address, subject, updated_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (doc_id) DO UPDATE SET updated_at = excluded.updated_at",
                &[&mail.doc_id, &mail.team.as_str(), &mail.address, &mail.subject, &now],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn email_thread(&self, doc_id: &str) -> Result<Option<EmailThread>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let Some(row) =
                c.query_opt("SELECT team, address, subject FROM email_threads WHERE doc_id = $1", &[&doc_id]).await?
            else {
                return Ok(None);
            };
            let ids = c
                .query(
                    "SELECT message_id FROM email_ids WHERE doc_id = $1 ORDER BY at DESC, message_id DESC LIMIT $2",
                    &[&doc_id, &THREAD_REFERENCES],
                )
                .await?;
            let mut refs: Vec<String> = ids.iter().map(|r| r.get(0)).collect();
            refs.reverse();
            Ok(Some(EmailThread {
                doc_id: doc_id.to_owned(),
                team: TeamId(row.get(0)),
                address: row.get(1),
                subject: row.get(2),
                refs,
            }))
        })
    }

    fn put_blob(
        &self,
        blob: &BlobInfo,
        doc_id: &str,
        bytes: &[u8],
        thumbnail: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            tx.execute(
                "INSERT INTO blob_bytes (hash, bytes, thumbnail) VALUES ($1, $2, $3) ON CONFLICT (hash) DO NOTHING",
                &[&blob.hash, &bytes, &thumbnail],
            )
            .await?;
            tx.execute(
                "INSERT INTO blobs (hash, size, mime, thumbnail, created_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (hash) DO NOTHING",
                &[&blob.hash, &(blob.size as i64), &blob.mime, &blob.thumbnail, &now_millis()],
            )
            .await?;
            tx.execute(
                "INSERT INTO blob_refs (hash, doc_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&blob.hash, &doc_id],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn team_blob_usage(&self, team: &TeamId, hash: &str) -> Result<(u64, bool), StoreError> {
        self.block(async {
            let c = self.client().await?;
            let row = c
                .query_one(
                    "SELECT COALESCE(SUM(b.size), 0)::BIGINT, COALESCE(BOOL_OR(b.hash = $2), false) FROM blobs b
                     WHERE b.hash IN (SELECT r.hash FROM blob_refs r JOIN documents d ON d.id = r.doc_id WHERE d.team = $1)",
                    &[&team.0, &hash],
                )
                .await?;
            Ok((row.get::<_, i64>(0).max(0) as u64, row.get(1)))
        })
    }

    fn blob_in(&self, hash: &str, doc_id: &str) -> Result<Option<BlobInfo>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let row = c
                .query_opt(
                    "SELECT b.hash, b.size, b.mime, b.thumbnail FROM blobs b JOIN blob_refs r ON r.hash = b.hash
                     WHERE b.hash = $1 AND r.doc_id = $2",
                    &[&hash, &doc_id],
                )
                .await?;
            Ok(row.map(|r| BlobInfo {
                hash: r.get(0),
                size: r.get::<_, i64>(1) as u64,
                mime: r.get(2),
                thumbnail: r.get(3),
            }))
        })
    }

    fn blob_bytes(&self, hash: &str, thumbnail: bool) -> Result<Option<Vec<u8>>, StoreError> {
        let sql = match thumbnail {
            true => "SELECT thumbnail FROM blob_bytes WHERE hash = $1",
            false => "SELECT bytes FROM blob_bytes WHERE hash = $1",
        };
        self.block(async {
            let c = self.client().await?;
            Ok(c.query_opt(sql, &[&hash]).await?.and_then(|r| r.get::<_, Option<Vec<u8>>>(0)))
        })
    }

    fn whatsapp_seen(&self, wamid: &str) -> Result<bool, StoreError> {
        self.block(async {
            let c = self.client().await?;
            Ok(c.query_opt("SELECT 1 FROM whatsapp_inbound WHERE wamid = $1", &[&wamid]).await?.is_some())
        })
    }

    fn mark_whatsapp_seen(&self, wamid: &str, doc_id: &str) -> Result<(), StoreError> {
        self.block(async {
            let c = self.client().await?;
            c.execute(
                "INSERT INTO whatsapp_inbound (wamid, doc_id, received_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&wamid, &doc_id, &now_millis()],
            )
            .await?;
            Ok(())
        })
    }

    fn whatsapp_contact(&self, team: &TeamId, wa_id: &str) -> Result<Option<String>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let row = c
                .query_opt(
                    "SELECT doc_id FROM whatsapp_contacts WHERE team = $1 AND wa_id = $2",
                    &[&team.as_str(), &wa_id],
                )
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn set_whatsapp_contact(&self, team: &TeamId, wa_id: &str, doc_id: &str) -> Result<(), StoreError> {
        self.block(async {
            let c = self.client().await?;
            c.execute(
                "INSERT INTO whatsapp_contacts (team, wa_id, doc_id) VALUES ($1, $2, $3)
                 ON CONFLICT (team, wa_id) DO UPDATE SET doc_id = excluded.doc_id",
                &[&team.as_str(), &wa_id, &doc_id],
            )
            .await?;
            Ok(())
        })
    }

    fn queue_whatsapp(&self, rows: &[QueuedWhatsApp]) -> Result<(), StoreError> {
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            for m in rows {
                tx.execute(
                    "INSERT INTO whatsapp_outbox (message_id, doc_id, payload, refused, created_at, next_attempt_at)
                     VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (message_id) DO NOTHING",
                    &[&m.message_id, &m.doc_id, &m.payload, &m.refused, &m.created_at],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn due_whatsapp(&self, now: i64) -> Result<Vec<QueuedWhatsApp>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "WITH due AS (
                       SELECT message_id FROM whatsapp_outbox
                       WHERE sent_at IS NULL AND failed IS NULL AND next_attempt_at <= $1
                       ORDER BY created_at, message_id LIMIT 200 FOR UPDATE SKIP LOCKED)
                     UPDATE whatsapp_outbox o SET next_attempt_at = $1 + $2 FROM due WHERE o.message_id = due.message_id
                     RETURNING o.message_id, o.doc_id, o.payload, o.refused, o.created_at",
                    &[&now, &CLAIM_MS],
                )
                .await?;
            let mut out: Vec<QueuedWhatsApp> = rows
                .iter()
                .map(|r| QueuedWhatsApp {
                    message_id: r.get(0),
                    doc_id: r.get(1),
                    payload: r.get(2),
                    refused: r.get(3),
                    created_at: r.get(4),
                })
                .collect();
            out.sort_by(|a, b| (a.created_at, &a.message_id).cmp(&(b.created_at, &b.message_id)));
            Ok(out)
        })
    }

    fn whatsapp_attempted(&self, message_id: &str, outcome: &WhatsAppOutcome, now: i64) -> Result<(), StoreError> {
        self.block(async {
            let c = self.client().await?;
            match outcome {
                WhatsAppOutcome::Sent { wamid } => {
                    c.execute(
                        "UPDATE whatsapp_outbox SET sent_at = $2, wamid = $3, attempts = attempts + 1 WHERE message_id = $1",
                        &[&message_id, &now, wamid],
                    )
                    .await?
                }
                WhatsAppOutcome::Failed { reason } => {
                    c.execute(
                        "UPDATE whatsapp_outbox SET failed = $2, attempts = attempts + 1 WHERE message_id = $1",
                        &[&message_id, reason],
                    )
                    .await?
                }
                WhatsAppOutcome::Retry => {
                    c.execute(
                        "UPDATE whatsapp_outbox SET attempts = attempts + 1,
                           next_attempt_at = $2 + least(300000, 1000 * (1::bigint << least(attempts, 9)::int))
                         WHERE message_id = $1",
                        &[&message_id, &now],
                    )
                    .await?
                }
            };
            Ok(())
        })
    }

    /// Under the document's grab lock: every instance sees the same first request.
    fn bind_actors(&self, agent: &AgentId, actors: &[String]) -> Result<Vec<AgentId>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let mut bound = Vec::with_capacity(actors.len());
            for actor in actors {
                // One statement: the first agent to use the actor wins on every instance.
                let row = c
                    .query_one(
                        "WITH ins AS (INSERT INTO actors (actor, agent, first_seen) VALUES ($1, $2, $3) \
                         ON CONFLICT (actor) DO NOTHING RETURNING agent) \
                         SELECT agent FROM ins UNION ALL SELECT agent FROM actors WHERE actor = $1 LIMIT 1",
                        &[actor, &agent.as_str(), &now_millis()],
                    )
                    .await?;
                bound.push(AgentId(row.get(0)));
            }
            Ok(bound)
        })
    }

    fn log_grabs(&self, doc: &str, agents: &[AgentId]) -> Result<Vec<AgentId>, StoreError> {
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('grab:' || $1, 0))", &[&doc]).await?;
            for a in agents {
                tx.execute(
                    "INSERT INTO grab_log (doc_id, agent, received_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&doc, &a.as_str(), &now_millis()],
                )
                .await?;
            }
            let order = tx
                .query("SELECT agent FROM grab_log WHERE doc_id = $1 ORDER BY seq", &[&doc])
                .await?
                .iter()
                .map(|r| AgentId(r.get(0)))
                .collect();
            tx.commit().await?;
            Ok(order)
        })
    }

    /// A session advisory lock on a connection taken out of the pool; dropping the guard closes that
    /// connection, which releases the lock (also when this process dies).
    fn hold_lock(&self, key: &str) -> Result<Option<Box<dyn std::any::Any + Send>>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            c.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&key]).await?;
            Ok(Some(Box::new(HeldLock(Some(c))) as Box<dyn std::any::Any + Send>))
        })
    }

    fn try_lock(&self, key: &str) -> Result<Option<Box<dyn std::any::Any + Send>>, StoreError> {
        self.block(async {
            let c = self.client().await?;
            let taken: bool =
                c.query_one("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &[&key]).await?.get(0);
            Ok(taken.then(|| Box::new(HeldLock(Some(c))) as Box<dyn std::any::Any + Send>))
        })
    }

    /// Counted under the key's lock; events older than an hour (longer than any window) are pruned
    /// now and then.
    fn allow_event(&self, key: &str, max: usize, window_ms: i64) -> Result<Option<bool>, StoreError> {
        let now = now_millis();
        let prune = rand::random::<u8>() == 0;
        self.block(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('rate:' || $1, 0))", &[&key]).await?;
            if prune {
                tx.execute("DELETE FROM rate_events WHERE at < $1", &[&(now - 3_600_000)]).await?;
            }
            tx.execute("DELETE FROM rate_events WHERE key = $1 AND at <= $2", &[&key, &(now - window_ms)]).await?;
            let used: i64 = tx.query_one("SELECT count(*) FROM rate_events WHERE key = $1", &[&key]).await?.get(0);
            let allowed = (used as usize) < max;
            if allowed {
                tx.execute("INSERT INTO rate_events (key, at) VALUES ($1, $2)", &[&key, &now]).await?;
            }
            tx.commit().await?;
            Ok(Some(allowed))
        })
    }

    fn subscribe(&self) -> Option<mpsc::Receiver<StoreEvent>> {
        let mut subscribed = self.subscribed.lock().unwrap_or_else(|p| p.into_inner());
        if *subscribed {
            return None;
        }
        *subscribed = true;
        let (tx, rx) = mpsc::channel(4096);
        self.rt().spawn(listen(self.config.clone(), self.instance.clone(), tx));
        Some(rx)
    }

    fn publish(&self, event: &StoreEvent) -> Result<(), StoreError> {
        let what = match event {
            StoreEvent::Presence { doc_id, presence } => NoteKind::Presence { d: doc_id.clone(), p: presence.clone() },
            StoreEvent::Ephemeral { doc_id, sender_id, count, session_id, data } => NoteKind::Ephemeral {
                d: doc_id.clone(),
                from: sender_id.clone(),
                count: *count,
                session: session_id.clone(),
                data: hex(data),
            },
            StoreEvent::Typing { doc_id, crew } => NoteKind::Typing {
                d: doc_id.clone(),
                a: crew.as_ref().map(|(a, _)| a.as_str().to_owned()),
                n: crew.as_ref().map(|(_, n)| n.clone()),
            },
            // Commits announce themselves inside their transaction.
            StoreEvent::Committed { .. } | StoreEvent::Resync { .. } => return Ok(()),
        };
        let note = self.note(what)?;
        if note.len() > MAX_NOTE {
            return Err(StoreError::Invalid("too large to pass to the other relay instances".into()));
        }
        self.block(async {
            let c = self.client().await?;
            c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &note]).await?;
            Ok(())
        })
    }
}

/// Keeps a LISTEN connection open and turns other instances' notes into events. After every
/// (re)connection it reports a resync from shortly before the last moment the previous connection
/// was known to be alive, so nothing committed in between is missed.
async fn listen(mut config: tokio_postgres::Config, instance: String, events: mpsc::Sender<StoreEvent>) {
    config.application_name("crewdesk-listen");
    let mut alive_at = now_millis();
    let mut backoff = std::time::Duration::from_millis(200);
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut conn)) => {
                let (ntx, mut nrx) = mpsc::unbounded_channel::<String>();
                let driver = tokio::spawn(async move {
                    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                    while let Some(m) = messages.next().await {
                        match m {
                            Ok(AsyncMessage::Notification(n)) => {
                                if ntx.send(n.payload().to_owned()).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                warn!(%e, "the LISTEN connection to PostgreSQL failed");
                                return;
                            }
                        }
                    }
                });
                if client.batch_execute(&format!("LISTEN {CHANNEL}")).await.is_ok() {
                    backoff = std::time::Duration::from_millis(200);
                    if events.send(StoreEvent::Resync { since: alive_at - 5_000 }).await.is_err() {
                        return;
                    }
                    let mut check = tokio::time::interval(std::time::Duration::from_secs(2));
                    loop {
                        tokio::select! {
                            n = nrx.recv() => match n {
                                Some(payload) => {
                                    if let Some(e) = decode(&payload, &instance) && events.send(e).await.is_err() {
                                        return;
                                    }
                                }
                                None => break,
                            },
                            _ = check.tick() => {
                                let at = now_millis();
                                if client.simple_query("SELECT 1").await.is_err() {
                                    break;
                                }
                                alive_at = at;
                            }
                        }
                    }
                }
                driver.abort();
            }
            Err(e) => warn!(%e, "cannot open the LISTEN connection to PostgreSQL; retrying"),
        }
        if events.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}

fn decode(payload: &str, me: &str) -> Option<StoreEvent> {
    let note: Note = serde_json::from_str(payload).ok()?;
    let own = note.o == me;
    // This instance's own commits only move its position on; nothing else of its own is news.
    if own && !matches!(note.what, NoteKind::Committed { .. }) {
        return None;
    }
    Some(match note.what {
        NoteKind::Committed { d, t, s, n, p, b } => StoreEvent::Committed {
            doc_id: d,
            team: TeamId(t),
            seq: s,
            created: n,
            prev: p,
            bytes: b.filter(|_| !own).and_then(|b| unhex(&b)),
            own,
        },
        NoteKind::Presence { d, p } => StoreEvent::Presence { doc_id: d, presence: p },
        NoteKind::Ephemeral { d, from, count, session, data } => {
            StoreEvent::Ephemeral { doc_id: d, sender_id: from, count, session_id: session, data: unhex(&data)? }
        }
        NoteKind::Typing { d, a, n } => {
            StoreEvent::Typing { doc_id: d, crew: a.map(|a| (a.as_str().into(), n.unwrap_or_default())) }
        }
    })
}
