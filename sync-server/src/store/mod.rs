//! The relay's storage: accounts, tokens (hashed), documents as durable chunks, the grab log,
//! widget sessions, the channels' outboxes and blob metadata. One trait, [`Storage`], with two
//! backends chosen by URL: embedded SQLite (`sqlite://DIR`, the default: `DIR/relay.sqlite3`) and
//! PostgreSQL (`postgres://…`), where several relay instances share one database.
//!
//! Every method blocks; the relay calls them from `spawn_blocking`. A method that returned `Ok`
//! has committed durably (SQLite: WAL with synchronous=FULL; PostgreSQL: a committed transaction).

pub mod migrate;
mod postgres;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use crewdesk::domain::{AgentId, Member, Role, Team, TeamId, TeamMode};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("relay storage failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("relay storage (PostgreSQL) failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("a stored row could not be read: {0}")]
    Row(#[from] serde_json::Error),
    #[error("the relay data was written by a newer Crewdesk (schema {found}, this build knows {supported})")]
    NewerSchema { found: i64, supported: i64 },
    #[error("{0}")]
    Invalid(String),
}

/// An authenticated agent and the teams they belong to, with their role in each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    pub id: AgentId,
    pub name: String,
    pub teams: Vec<(TeamId, Role)>,
}

impl Agent {
    pub fn role_in(&self, team: &TeamId) -> Option<Role> {
        self.teams.iter().find(|(t, _)| t == team).map(|(_, r)| *r)
    }
}

pub fn hash_token(token: &str) -> String {
    crewdesk::sync::sha256_hex(token.as_bytes())
}

pub(crate) fn now_millis() -> i64 {
    crewdesk::domain::Timestamp::now().0
}

/// A stored document: its team, all its chunks concatenated, and the position of its last chunk
/// (what a later [`Storage::chunks_since_many`] continues from).
/// A chunk for the group commit, with the client changes it holds.
pub struct NewChunk<'a> {
    pub doc: &'a str,
    pub team: &'a TeamId,
    pub bytes: &'a [u8],
    pub changes: &'a [crewdesk::sync::relay_doc::ChangeSeq],
    /// The messages the client changes add: the relay's time is kept beside their `at`.
    pub messages: &'a [crewdesk::sync::relay_doc::MessageTime],
    /// The mail this chunk takes in (the email channel): its UID, its Message-ID and its thread are
    /// recorded in the same transaction as the chunk.
    pub mail: Option<&'a TakenMail>,
}

/// A mail taken into a conversation: where it was read and what its thread records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakenMail {
    pub team: TeamId,
    pub uidvalidity: i64,
    pub uid: i64,
    /// The customer's address.
    pub address: String,
    pub subject: String,
    pub message_id: Option<String>,
}

pub struct StoredChunks {
    pub team: TeamId,
    pub bytes: Vec<u8>,
    pub seq: i64,
    /// How many chunks it was stored as (many small ones are worth compacting).
    pub chunks: usize,
}

/// What other relay instances sharing the database did (PostgreSQL only; arrives by LISTEN/NOTIFY).
#[derive(Clone, Debug, PartialEq)]
pub enum StoreEvent {
    /// An instance committed chunks of a document, up to `seq`; `created` on its first chunk.
    /// `prev` is the document's last position before them and `bytes` the chunks themselves when
    /// they are small, so an instance that holds the document up to `prev` applies them without
    /// reading the database. `own` when this instance committed them (it has them in memory; the
    /// note only moves its position on).
    Committed {
        doc_id: String,
        team: TeamId,
        seq: i64,
        created: bool,
        prev: Option<i64>,
        bytes: Option<Vec<u8>>,
        own: bool,
    },
    /// A web-widget customer's presence, as another instance heard it.
    Presence { doc_id: String, presence: crewdesk::domain::Presence },
    /// An ephemeral message an agent sent through another instance.
    Ephemeral { doc_id: String, sender_id: String, count: u64, session_id: String, data: Vec<u8> },
    /// Someone is typing in a conversation, as another instance heard it: the web-widget customer
    /// (`crew` is `None`) or an agent, with the id and name that instance's relay gave them.
    Typing { doc_id: String, crew: Option<(crewdesk::domain::AgentId, String)> },
    /// The notification channel was (re)opened: anything committed since `since` (milliseconds)
    /// may have been missed and is read from the database.
    Resync { since: i64 },
}

/// Where the relay keeps its data, parsed from `sqlite://DIR` (or a plain path) or `postgres://…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<StoreUrl, StoreError> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(url.to_owned()));
        }
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        if path.is_empty() || url.contains("://") && !url.starts_with("sqlite://") {
            return Err(StoreError::Invalid(format!(
                "unknown store `{url}`: expected sqlite://DIRECTORY or postgres://USER@HOST:PORT/DATABASE"
            )));
        }
        let path = Path::new(path);
        // The database file itself names its directory.
        let dir = if path.extension().is_some_and(|e| e == "sqlite3") { path.parent().unwrap_or(path) } else { path };
        Ok(StoreUrl::Sqlite(dir.to_path_buf()))
    }
}

/// The relay's storage operations. Both backends implement all of them with the same meaning;
/// the system tests run the relay's suite against each.
pub trait Storage: Send + Sync {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// This deployment's stable storage id (automerge-repo peers use it to remember sync state).
    /// Instances sharing a database share it: to a peer they are one storage.
    fn storage_id(&self) -> Result<String, StoreError>;

    // ---- accounts ------------------------------------------------------------------------------
    fn put_team(&self, team: &Team) -> Result<(), StoreError>;
    fn add_member(&self, team: &TeamId, member: &Member) -> Result<(), StoreError>;
    fn remove_member(&self, team: &TeamId, agent: &AgentId) -> Result<bool, StoreError>;
    /// Every team with its members, as replicas receive them.
    fn teams(&self) -> Result<Vec<Team>, StoreError>;
    /// Issues a new token for an agent; returns the token (only its hash is stored).
    fn issue_token(&self, agent: &AgentId, label: &str) -> Result<String, StoreError>;
    /// Revokes every token of an agent, or the one token given. Returns how many were revoked.
    fn revoke_tokens(&self, agent: &AgentId, token: Option<&str>) -> Result<usize, StoreError>;
    /// The agent a valid (issued, not revoked) token belongs to.
    fn authenticate(&self, token: &str) -> Result<Option<Agent>, StoreError> {
        if token.is_empty() || token.len() > 200 {
            return Ok(None);
        }
        self.authenticate_hash(&hash_token(token))
    }
    /// The agent of a valid token, by the token's SHA-256 (hex), as `hash_token` makes it.
    fn authenticate_hash(&self, hash: &str) -> Result<Option<Agent>, StoreError>;
    /// A number that changes whenever a token is revoked or a membership or role changes (by this
    /// process or any other): the relay checks its open connections again when it moves.
    fn access_version(&self) -> Result<i64, StoreError>;
    /// Tokens as (agent, label, revoked), for listing; never the token.
    fn token_list(&self) -> Result<Vec<(String, String, bool)>, StoreError>;

    /// The accounts as a table for the admin CLI (tokens by label and state, never the token).
    fn describe(&self) -> Result<String, StoreError> {
        let mut out = String::new();
        for team in self.teams()? {
            out.push_str(&format!("team {} \"{}\" ({} mode)\n", team.id, team.name, mode_str(team.mode)));
            for m in &team.members {
                out.push_str(&format!("  {} \"{}\" {}\n", m.agent, m.name, role_str(m.role)));
            }
            for t in &team.templates {
                out.push_str(&format!("  template \"{}\": {}\n", t.name, t.text.replace('\n', " / ")));
            }
            if let Some(w) = self.widget_settings(&team.id)? {
                let origins = if w.origins.is_empty() { "none yet".to_owned() } else { w.origins.join(" ") };
                out.push_str(&format!("  widget key {} (origins: {origins})\n", w.key));
            }
        }
        for (agent, label, revoked) in self.token_list()? {
            out.push_str(&format!("token for {agent} \"{label}\"{}\n", if revoked { " (revoked)" } else { "" }));
        }
        Ok(out)
    }

    // ---- documents -----------------------------------------------------------------------------
    /// A stored document: team, bytes (all chunks concatenated) and last chunk position.
    fn load_document_at(&self, id: &str) -> Result<Option<StoredChunks>, StoreError>;
    /// A stored document's team and bytes.
    fn load_document(&self, id: &str) -> Result<Option<(TeamId, Vec<u8>)>, StoreError> {
        Ok(self.load_document_at(id)?.map(|d| (d.team, d.bytes)))
    }
    /// For each (document, position): the chunks other relay instances stored after that position,
    /// concatenated, and the document's last chunk position. Documents with nothing after their
    /// position may be left out.
    fn chunks_since_many(
        &self,
        wanted: &[(String, i64)],
    ) -> Result<std::collections::HashMap<String, (Vec<u8>, i64)>, StoreError>;
    /// Appends chunks of any documents in one transaction (group commit), creating documents on
    /// their first chunk; in order for chunks of the same document. Per chunk: whether it was
    /// stored (`false`: one of its changes takes an (actor, sequence number) a different change of
    /// the document holds already, so it was refused).
    fn append_chunks(&self, chunks: &[NewChunk<'_>]) -> Result<Vec<bool>, StoreError>;
    fn append_chunk(&self, id: &str, team: &TeamId, chunk: &[u8]) -> Result<(), StoreError> {
        self.append_chunks(&[NewChunk { doc: id, team, bytes: chunk, changes: &[], messages: &[], mail: None }])
            .map(|_| ())
    }
    /// The messages agents' changes added to a document: id, the `at` its author gave it and when
    /// the relay received it (its own clock), in the order received.
    fn message_times(&self, doc: &str) -> Result<Vec<(String, i64, i64)>, StoreError>;
    /// Stores many new documents in one transaction (seeding, imports). Existing ids are skipped.
    fn import_documents(&self, docs: &[(String, TeamId, Vec<u8>)]) -> Result<usize, StoreError>;
    /// Replaces a document's chunks by one full save of exactly what is stored, read and written in
    /// one transaction (so no chunk another writer adds meanwhile is lost). Returns how many chunks
    /// were merged (0 when there was nothing to do). The merged chunk keeps the last position.
    fn compact_stored(&self, id: &str) -> Result<usize, StoreError>;
    fn chunk_count(&self, id: &str) -> Result<usize, StoreError>;
    /// Ids of the given teams' documents.
    fn documents_of(&self, teams: &[TeamId]) -> Result<Vec<String>, StoreError>;
    /// Documents (id, team) first stored at or after `since` (milliseconds).
    fn documents_since(&self, since: i64) -> Result<Vec<(String, TeamId)>, StoreError>;
    /// The team of a stored conversation (without loading it).
    fn document_team(&self, id: &str) -> Result<Option<TeamId>, StoreError>;

    // ---- web widget ----------------------------------------------------------------------------
    /// Creates a widget session for a conversation; returns the token (stored only as a hash).
    fn create_widget_session(&self, doc_id: &str, location: Option<&str>) -> Result<String, StoreError>;
    /// The conversation and location of a widget session token.
    fn widget_session(&self, token: &str) -> Result<Option<(String, Option<String>)>, StoreError>;

    // ---- web widget settings -------------------------------------------------------------------
    /// A team's widget settings; its key is made on first use. `None` when there is no such team.
    fn widget_settings(&self, team: &TeamId) -> Result<Option<WidgetSettings>, StoreError>;
    /// The settings of the team whose widget key this is (the current key only).
    fn widget_by_key(&self, key: &str) -> Result<Option<WidgetSettings>, StoreError>;
    /// Replaces the origins (normalized, see `widget::normalize_origin`) the widget may run on.
    fn set_widget_origins(&self, team: &TeamId, origins: &[String]) -> Result<(), StoreError>;
    /// The greeting the widget shows above the first message (`None`: the default one).
    fn set_widget_greeting(&self, team: &TeamId, greeting: Option<&str>) -> Result<(), StoreError>;
    /// Gives the team a new widget key; the old one stops working at once. Returns the new key.
    fn rotate_widget_key(&self, team: &TeamId) -> Result<String, StoreError>;

    // ---- email fallback ------------------------------------------------------------------------
    /// Queues crew messages for the email fallback; a message already queued is not queued again.
    fn queue_emails(&self, emails: &[QueuedEmail]) -> Result<(), StoreError>;
    /// Unsent emails whose next attempt is due, oldest first, claimed for a minute so that no
    /// other relay instance sends them meanwhile.
    fn due_emails(&self, now: i64) -> Result<Vec<QueuedEmail>, StoreError>;
    fn mark_emails_sent(&self, ids: &[String], now: i64) -> Result<(), StoreError>;
    /// A failed attempt: try again after a backoff that doubles (1 s … 5 min).
    fn retry_emails(&self, ids: &[String], now: i64) -> Result<(), StoreError>;
    /// Gives emails up for good (they are not tried again); `reason` is kept beside them.
    fn fail_emails(&self, ids: &[String], reason: &str, now: i64) -> Result<(), StoreError>;

    // ---- email channel -------------------------------------------------------------------------
    /// Sets a team's mailbox (a new URL starts reading it from its beginning).
    fn set_mailbox(&self, m: &MailboxSetting) -> Result<(), StoreError>;
    /// Removes a team's mailbox; false when it had none.
    fn remove_mailbox(&self, team: &TeamId) -> Result<bool, StoreError>;
    fn mailboxes(&self) -> Result<Vec<MailboxSetting>, StoreError>;
    /// How far a mailbox has been taken in: every UID up to `last_uid` under `uidvalidity`.
    fn mailbox_read(&self, team: &TeamId, uidvalidity: i64, last_uid: i64) -> Result<(), StoreError>;
    /// The conversation of `team` one of these Message-IDs belongs to (the newest known first).
    fn email_conversation(&self, team: &TeamId, ids: &[String]) -> Result<Option<String>, StoreError>;
    /// True when this Message-ID was taken in already, or is one of ours.
    fn email_id_known(&self, message_id: &str) -> Result<bool, StoreError>;
    /// The Email conversation of `team` with this customer address most recently written in.
    fn email_conversation_of_address(&self, team: &TeamId, address: &str) -> Result<Option<String>, StoreError>;
    /// Records a mail of an Email conversation (our reply): its Message-ID and the thread (created
    /// with `subject` on its first mail). Mails taken in are recorded with their chunk ([`TakenMail`]).
    fn record_email(&self, mail: &RecordedEmail<'_>) -> Result<(), StoreError>;
    fn email_thread(&self, doc_id: &str) -> Result<Option<EmailThread>, StoreError>;

    // ---- attachments ---------------------------------------------------------------------------
    /// Records a blob (already written to the data directory) and the conversation it was sent in.
    /// PostgreSQL also keeps its bytes and thumbnail, in the same transaction, so every instance
    /// can serve it; for SQLite the files are the storage.
    fn put_blob(&self, blob: &BlobInfo, doc_id: &str, bytes: &[u8], thumbnail: Option<&[u8]>)
    -> Result<(), StoreError>;
    /// Bytes of the distinct files sent in `team`'s conversations (its storage quota counts them),
    /// and whether `hash` is one of them (then storing it again costs the team nothing).
    fn team_blob_usage(&self, team: &TeamId, hash: &str) -> Result<(u64, bool), StoreError>;
    /// A blob as sent in `doc_id`; `None` when it was never sent there (or does not exist).
    fn blob_in(&self, hash: &str, doc_id: &str) -> Result<Option<BlobInfo>, StoreError>;
    /// A blob's bytes (or its thumbnail's) as [`Storage::put_blob`] kept them in the store.
    fn blob_bytes(&self, _hash: &str, _thumbnail: bool) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }

    // ---- WhatsApp ------------------------------------------------------------------------------
    /// True when this WhatsApp message id was already turned into a conversation change.
    fn whatsapp_seen(&self, wamid: &str) -> Result<bool, StoreError>;
    fn mark_whatsapp_seen(&self, wamid: &str, doc_id: &str) -> Result<(), StoreError>;
    /// The conversation of a WhatsApp contact in a team, if one was started.
    fn whatsapp_contact(&self, team: &TeamId, wa_id: &str) -> Result<Option<String>, StoreError>;
    fn set_whatsapp_contact(&self, team: &TeamId, wa_id: &str, doc_id: &str) -> Result<(), StoreError>;
    /// Queues crew messages for WhatsApp; a message already queued is not queued again.
    fn queue_whatsapp(&self, rows: &[QueuedWhatsApp]) -> Result<(), StoreError>;
    /// WhatsApp messages neither sent nor given up on, whose next attempt is due, oldest first,
    /// claimed for a minute like [`Storage::due_emails`].
    fn due_whatsapp(&self, now: i64) -> Result<Vec<QueuedWhatsApp>, StoreError>;
    /// The outcome of one attempt: sent, failed for good, or retry after a doubling backoff.
    fn whatsapp_attempted(&self, message_id: &str, outcome: &WhatsAppOutcome, now: i64) -> Result<(), StoreError>;

    // ---- actors --------------------------------------------------------------------------------
    /// Binds each automerge actor id (hex) not yet bound to `agent`; returns the agent each one is
    /// bound to (the first to use it, on any instance).
    fn bind_actors(&self, agent: &AgentId, actors: &[String]) -> Result<Vec<AgentId>, StoreError>;

    // ---- grabs ---------------------------------------------------------------------------------
    /// Records grab requests in arrival order; returns the full order for the document. The
    /// order is decided inside one transaction, so every instance reads the same order.
    fn log_grabs(&self, doc: &str, agents: &[AgentId]) -> Result<Vec<AgentId>, StoreError>;

    // ---- several instances ---------------------------------------------------------------------
    /// Waits for and holds a lock named `key` across every instance sharing the store, until the
    /// returned guard is dropped. `None` when no other instance can exist (SQLite): the caller's
    /// own in-process lock is enough.
    fn hold_lock(&self, _key: &str) -> Result<Option<Box<dyn std::any::Any + Send>>, StoreError> {
        Ok(None)
    }
    /// Takes the lock named `key` if no instance holds it (`None`: another one does), held until
    /// the guard is dropped or this instance's connection to the store ends (it died). With SQLite
    /// no other instance can exist: always taken.
    fn try_lock(&self, _key: &str) -> Result<Option<Box<dyn std::any::Any + Send>>, StoreError> {
        Ok(Some(Box::new(())))
    }
    /// Counts an event for `key` across every instance: false (and not counted) when `max` events
    /// happened within the last `window_ms`. `None` when no other instance can exist (SQLite): the
    /// caller's in-memory limiter is enough.
    fn allow_event(&self, _key: &str, _max: usize, _window_ms: i64) -> Result<Option<bool>, StoreError> {
        Ok(None)
    }
    /// The stream of what other instances do; `None` when no other instance can exist (SQLite).
    /// Called once, by the relay.
    fn subscribe(&self) -> Option<tokio::sync::mpsc::Receiver<StoreEvent>> {
        None
    }
    /// Tells the other instances (presence, ephemeral messages); a no-op without them.
    fn publish(&self, _event: &StoreEvent) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The relay's store: one of the backends behind [`Storage`].
pub struct Store(Box<dyn Storage>);

impl std::ops::Deref for Store {
    type Target = dyn Storage;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl Store {
    /// The embedded SQLite store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Ok(Store(Box::new(SqliteStore::open(dir)?)))
    }

    /// The store a URL names. Blocks (connects and migrates); call it outside async tasks.
    pub fn connect(url: &StoreUrl) -> Result<Store, StoreError> {
        match url {
            StoreUrl::Sqlite(dir) => Store::open(dir),
            StoreUrl::Postgres(url) => Ok(Store(Box::new(PgStore::connect(url)?))),
        }
    }
}

/// One full save of a document stored as `bytes` (its chunks concatenated); an error leaves the
/// stored chunks as they are.
fn compacted(id: &str, bytes: &[u8]) -> Result<Vec<u8>, StoreError> {
    automerge::Automerge::load(bytes)
        .map(|d| d.save())
        .map_err(|e| StoreError::Invalid(format!("document {id} cannot be compacted: {e}")))
}

pub fn mode_str(mode: TeamMode) -> &'static str {
    match mode {
        TeamMode::Open => "open",
        TeamMode::Grab => "grab",
    }
}

pub fn role_str(role: Role) -> &'static str {
    match role {
        Role::Representative => "representative",
        Role::Admin => "admin",
    }
}

pub fn parse_role(role: &str) -> Result<Role, StoreError> {
    match role {
        "representative" | "rep" => Ok(Role::Representative),
        "admin" => Ok(Role::Admin),
        other => Err(StoreError::Invalid(format!("unknown role `{other}` (representative or admin)"))),
    }
}

pub fn parse_mode(mode: &str) -> Result<TeamMode, StoreError> {
    match mode {
        "open" => Ok(TeamMode::Open),
        "grab" => Ok(TeamMode::Grab),
        other => Err(StoreError::Invalid(format!("unknown team mode `{other}` (open or grab)"))),
    }
}

/// A team's web widget: the public key its snippet names, the greeting, and the origins (websites)
/// it may run on. The key is not a secret (every page that embeds the widget shows it); the origins
/// decide where browsers may use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WidgetSettings {
    pub team: TeamId,
    pub team_name: String,
    pub key: String,
    pub greeting: Option<String>,
    pub origins: Vec<String>,
}

/// A fresh widget key: `wk_` and 16 random bytes (bs58check).
pub fn new_widget_key() -> String {
    format!("wk_{}", crewdesk::sync::document_id::encode(&rand::random()))
}

/// Keys are short; anything longer is not looked up.
pub(crate) fn plausible_widget_key(key: &str) -> bool {
    key.starts_with("wk_") && key.len() <= 64
}

/// A crew message waiting to be emailed to an offline web-widget customer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedEmail {
    pub message_id: String,
    pub doc_id: String,
    pub to: String,
    pub customer: String,
    pub agent: String,
    pub text: String,
    pub created_at: i64,
    /// The file, when the message is one: it goes with the email.
    pub attachment: Option<EmailAttachment>,
    /// Set for a crew reply in an Email conversation of this team (sent as a threaded reply from
    /// the team's address); `None` for the web widget's email fallback.
    pub team: Option<TeamId>,
    /// Attempts that failed so far.
    pub attempts: i64,
}

/// A team's mailbox (the email channel), as stored: no password, only where it is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailboxSetting {
    pub team: TeamId,
    /// `imaps://USER@HOST[:PORT]/MAILBOX` (see [`crate::email::ImapServer::parse`]).
    pub url: String,
    pub password_file: Option<String>,
    pub password_env: Option<String>,
    /// The team's address: replies are sent from it, and mail from it is never taken in.
    pub address: String,
    pub uidvalidity: i64,
    pub last_uid: i64,
}

/// A mail of an Email conversation, to record (see [`Storage::record_email`]).
#[derive(Clone, Debug)]
pub struct RecordedEmail<'a> {
    pub doc_id: &'a str,
    pub team: &'a TeamId,
    /// The customer's address.
    pub address: &'a str,
    pub subject: &'a str,
    pub message_id: Option<&'a str>,
    /// Sent by the relay (a crew reply), not taken in.
    pub ours: bool,
}

/// An Email conversation's thread, for replies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmailThread {
    pub doc_id: String,
    pub team: TeamId,
    pub address: String,
    pub subject: String,
    /// Message-IDs of the thread, oldest first (its latest [`THREAD_REFERENCES`]).
    pub refs: Vec<String>,
}

/// Message-IDs a thread keeps for References (its latest).
pub const THREAD_REFERENCES: i64 = 20;

/// A crew file to send with its fallback email.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EmailAttachment {
    /// The blob's SHA-256 (hex, without the `sha256:` prefix).
    pub hash: String,
    pub file_name: String,
    pub mime: String,
    pub size: u64,
}

impl EmailAttachment {
    /// Reads the stored column; a damaged value sends the email without the file (its text names it).
    pub fn from_json(value: Option<String>) -> Option<EmailAttachment> {
        serde_json::from_str(&value?).ok()
    }
}

impl QueuedEmail {
    pub fn attachment_json(&self) -> Option<String> {
        self.attachment.as_ref().and_then(|a| serde_json::to_string(a).ok())
    }
}

/// A crew message waiting to be handed to WhatsApp: the Graph API request body, or why the 24 h
/// rule refused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedWhatsApp {
    pub message_id: String,
    pub doc_id: String,
    pub payload: String,
    pub refused: Option<String>,
    pub created_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WhatsAppOutcome {
    Sent { wamid: String },
    Failed { reason: String },
    Retry,
}

/// An attachment in the relay's blob store.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BlobInfo {
    pub hash: String,
    pub size: u64,
    pub mime: String,
    pub thumbnail: bool,
}
