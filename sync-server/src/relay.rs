//! The relay's connections and documents. One async task per connection reads frames and hands
//! sync messages to the document they name; each document is processed under its own lock, and a
//! change is committed (fsynced) before any sync message that advertises it is generated.

use crate::Config;
use crate::store::{Agent, Store, StoreError};
use automerge::sync;
use automerge::{ActorId, Automerge};
use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use crewdesk::domain::Timestamp;
use crewdesk::domain::access::decide_grab;
use crewdesk::domain::{AgentId, Role, TeamId, TeamMode};
use crewdesk::replica::conversation::ChangeAuthor;
use crewdesk::replica::doc;
use crewdesk::sync::bounded::{self, SyncLimits};
use crewdesk::sync::document_id;
use crewdesk::sync::relay_doc::{Action, Claim, RelayDoc};
use crewdesk::sync::wire::{PeerMetadata, WireMessage};
use futures_util::{SinkExt, StreamExt};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::{Mutex as AsyncMutex, Notify, mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

type ConnId = u64;

/// Serves the relay on `listener` until `shutdown` completes, then closes every connection.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let url = config.store_url()?;
    let store = Arc::new(tokio::task::spawn_blocking(move || Store::connect(&url)).await??);
    let s = store.clone();
    let storage_id = tokio::task::spawn_blocking(move || s.storage_id()).await??;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (commits, commit_rx) = mpsc::channel(4096);
    tokio::spawn(committer(store.clone(), commit_rx));
    let mail_wake = Arc::new(Notify::new());
    tokio::spawn(crate::mailer::run(
        store.clone(),
        config.blob_dir(),
        config.smtp.clone(),
        config.mail_from.clone(),
        mail_wake.clone(),
        stop_rx.clone(),
    ));
    let geoip = match &config.geoip {
        Some(path) => Some(crate::geoip::GeoIp::open(path)?),
        None => None,
    };
    let whatsapp_wake = Arc::new(Notify::new());
    // The relay writes with its own actor (gateways, grab decisions): no agent may use it.
    let actor = ActorId::random();
    let (s, hex) = (store.clone(), actor.to_hex_string());
    tokio::task::spawn_blocking(move || s.bind_actors(&AgentId(RELAY_ACTOR_OWNER.into()), &[hex])).await??;
    let widgets = crate::widget::WidgetHub::new(config.widget_sockets_per_session, config.widget_messages_per_ip);
    let relay = Arc::new(Relay {
        mail_wake,
        whatsapp_wake: whatsapp_wake.clone(),
        whatsapp_inbound: AsyncMutex::new(()),
        geoip,
        widget_starts: crate::limits::Limiter::new(config.widget_starts_per_ip, std::time::Duration::from_secs(600)),
        widget_uploads: crate::limits::Limiter::new(20, std::time::Duration::from_secs(600)),
        team_modes: Mutex::default(),
        commits,
        shared: store.backend() == "postgres",
        store,
        peer_id: format!("crewdesk-relay-{storage_id}"),
        storage_id,
        actors: Mutex::new(HashMap::from([(actor.to_hex_string(), AgentId(RELAY_ACTOR_OWNER.into()))])),
        actor,
        config,
        docs: Mutex::new(HashMap::new()),
        sessions: Mutex::new(HashMap::new()),
        recent: Mutex::new(Recent::default()),
        presence: Mutex::new(HashMap::new()),
        widgets,
        next_conn: AtomicU64::new(1),
        stop: stop_rx.clone(),
    });
    if let Some(events) = relay.store.subscribe() {
        tokio::spawn(follow_instances(relay.clone(), events, stop_rx.clone()));
    }
    if let Some(wa) = relay.config.whatsapp.clone() {
        tokio::spawn(crate::whatsapp::run(relay.clone(), wa, whatsapp_wake, stop_rx.clone()));
    }
    let app = Router::new()
        .route("/", get(websocket))
        .route("/sync", get(websocket))
        .route("/health", get(health))
        .route("/api/me", get(me))
        .merge(crate::widget::routes(relay.clone()))
        .merge(crate::whatsapp::routes())
        .merge(crate::blobs::routes(relay.config.max_blob_bytes))
        .merge(crate::import::routes())
        .with_state(relay.clone());
    info!(addr = %listener.local_addr()?, data = %relay.config.data_dir.display(), "relay listening");
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    serve(listener, app, relay.config.handshake_timeout, stop_rx).await;
    info!("relay stopped");
    Ok(())
}

/// Serves HTTP/1.1 with WebSocket upgrades until `stop`. Unlike `axum::serve`, a connection that has
/// not sent a whole request head within `head_timeout` is closed, so idle or trickling connections
/// (slowloris) cannot pile up and take every file descriptor. On `stop`, connections finish their
/// request (at most 5 s); upgraded WebSockets close themselves on the same signal.
async fn serve(listener: TcpListener, app: Router, head_timeout: std::time::Duration, mut stop: watch::Receiver<bool>) {
    use tower::Service;
    let (open_tx, open_rx) = watch::channel(());
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    warn!(%err, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        // Small frames go out at once: with Nagle's algorithm a fan-out message can wait for the
        // peer's delayed acknowledgement (tens of milliseconds).
        if let Err(err) = tcp.set_nodelay(true) {
            debug!(%err, "TCP_NODELAY not set");
        }
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(axum::extract::ConnectInfo(remote));
            app.clone().call(request)
        });
        let (mut stop, open) = (stop.clone(), open_rx.clone());
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(head_timeout);
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), service).with_upgrades();
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => if let Err(err) = result {
                    debug!(%err, %remote, "HTTP connection ended");
                },
                _ = stopped(&mut stop) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), connection).await;
                }
            }
            drop(open);
        });
    }
    drop(open_rx);
    // Until every HTTP connection has finished (they were told to), at most 6 s.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(6), open_tx.closed()).await;
}

pub struct Relay {
    store: Arc<Store>,
    /// Other relay instances share the store (PostgreSQL): what they commit arrives as events.
    shared: bool,
    peer_id: String,
    storage_id: String,
    actor: ActorId,
    config: Config,
    docs: Mutex<HashMap<String, Arc<AsyncMutex<DocEntry>>>>,
    sessions: Mutex<HashMap<ConnId, Session>>,
    /// When each loaded document was last used, for evicting the least recently used.
    recent: Mutex<Recent>,
    /// Web-widget customers' presence per conversation: ephemeral, never stored.
    presence: Mutex<HashMap<String, crewdesk::domain::Presence>>,
    /// Web-widget customers' sockets per conversation: told of each committed change of theirs.
    pub(crate) widgets: crate::widget::WidgetHub,
    next_conn: AtomicU64,
    stop: watch::Receiver<bool>,
    commits: mpsc::Sender<Commit>,
    /// Wakes the email fallback sender when messages are queued.
    mail_wake: Arc<Notify>,
    /// Wakes the WhatsApp sender when messages are queued.
    whatsapp_wake: Arc<Notify>,
    /// Serializes inbound WhatsApp webhooks.
    whatsapp_inbound: AsyncMutex<()>,
    pub(crate) geoip: Option<crate::geoip::GeoIp>,
    /// Web-widget conversations started per address (10 minutes).
    widget_starts: crate::limits::Limiter<std::net::IpAddr>,
    /// Files sent by widget customers per conversation (10 minutes).
    widget_uploads: crate::limits::Limiter<String>,
    /// Each team's mode (open or grab) and when it was read, for the judge of changes.
    team_modes: Mutex<HashMap<TeamId, (TeamMode, Instant)>>,
    /// Which agent each automerge actor id (hex) is bound to, as far as this instance has seen.
    actors: Mutex<HashMap<String, AgentId>>,
}

/// Who the relay's own actors are bound to (not a valid agent id: it holds parentheses and a
/// space-free word no admin command creates).
const RELAY_ACTOR_OWNER: &str = "(relay)";

/// Bound actors kept in memory; beyond this the map starts over (it is a cache of the store).
const MAX_CACHED_ACTORS: usize = 100_000;

/// A chunk waiting for the group commit, and who to tell when it is on disk.
struct Commit {
    doc: String,
    team: TeamId,
    chunk: Vec<u8>,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// Group commit: every chunk waiting when the previous commit finished goes into one transaction
/// and one fsync. Each caller is answered only after its chunk is durable.
async fn committer(store: Arc<Store>, mut rx: mpsc::Receiver<Commit>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let store = store.clone();
        let started = Instant::now();
        let (batch, result) = tokio::task::spawn_blocking(move || {
            let rows: Vec<(&str, &TeamId, &[u8])> =
                batch.iter().map(|c| (c.doc.as_str(), &c.team, c.chunk.as_slice())).collect();
            let result = store.append_chunks(&rows).map_err(|e| e.to_string());
            (batch, result)
        })
        .await
        .unwrap_or_else(|e| (Vec::new(), Err(e.to_string())));
        debug!(chunks = batch.len(), ms = started.elapsed().as_secs_f64() * 1e3, "group commit");
        for c in batch {
            let _ = c.done.send(result.clone());
        }
    }
}

/// What the relay knows of one connection, shared with the documents it syncs.
#[derive(Clone)]
struct Session {
    conn: ConnId,
    agent: Arc<Agent>,
    peer_id: String,
    tx: mpsc::Sender<WireMessage>,
    overloaded: Arc<Notify>,
    /// Documents this connection is creating (see `MAX_PENDING_PER_CONNECTION`).
    pending: Arc<AtomicUsize>,
    /// Bytes queued for this connection and not yet written (see `MAX_QUEUED_BYTES`).
    queued: Arc<AtomicUsize>,
}

/// Bytes the relay queues for one connection before it counts as unable to keep up: a client
/// asking again and again for a whole conversation (`request` with no heads) cannot make the relay
/// hold many copies of it.
const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

/// About how many bytes a message takes in a connection's queue.
fn queued_size(m: &WireMessage) -> usize {
    match m {
        WireMessage::Sync { data, .. } | WireMessage::Request { data, .. } | WireMessage::Ephemeral { data, .. } => {
            data.len() + 128
        }
        _ => 256,
    }
}

impl Session {
    /// Queues a message; a connection that cannot keep up is closed (it resyncs when it comes back).
    fn send(&self, message: WireMessage) {
        let size = queued_size(&message);
        if self.queued.fetch_add(size, Ordering::Relaxed) + size > MAX_QUEUED_BYTES {
            self.queued.fetch_sub(size, Ordering::Relaxed);
            self.overloaded.notify_one();
            return;
        }
        if self.tx.try_send(message).is_err() {
            self.queued.fetch_sub(size, Ordering::Relaxed);
            self.overloaded.notify_one();
        }
    }
    fn error(&self, relay_peer: &str, message: impl Into<String>) {
        self.send(WireMessage::Error {
            sender_id: relay_peer.to_owned(),
            target_id: self.peer_id.clone(),
            message: message.into(),
        });
    }
}

/// One document on this relay: its sync logic (sans IO, in the core) and what the IO around it
/// needs to know.
struct DocEntry {
    /// Whether storage was read (the document may be absent there: a conversation in creation).
    loaded: bool,
    /// The position of the last stored chunk in memory (other instances' chunks after it are
    /// read when they announce them).
    seq: i64,
    core: RelayDoc,
    /// Places taken by connections creating this document (see `MAX_PENDING_PER_CONNECTION`).
    slots: HashMap<ConnId, PendingSlot>,
}

/// Documents one connection may be creating at once; more are answered as unavailable, so a client
/// cannot make the relay hold any number of unfinished documents in memory.
const MAX_PENDING_PER_CONNECTION: usize = 64;

/// One of a connection's documents in creation; dropping it frees the place.
struct PendingSlot(Arc<AtomicUsize>);

impl PendingSlot {
    fn take(count: &Arc<AtomicUsize>) -> Option<PendingSlot> {
        let before = count.fetch_add(1, Ordering::SeqCst);
        let slot = PendingSlot(count.clone());
        (before < MAX_PENDING_PER_CONNECTION).then_some(slot)
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Ephemeral messages (presence and the like) are small; larger ones are refused.
const MAX_EPHEMERAL_BYTES: usize = 4 * 1024;

/// Each connection may send this many ephemeral messages a second (with a burst of
/// `EPHEMERAL_BURST`); the rest are dropped, so one client cannot flood everyone following a
/// conversation (whose queues would overflow and get them disconnected).
const EPHEMERAL_PER_SECOND: f64 = 20.0;
const EPHEMERAL_BURST: f64 = 50.0;

/// A token bucket for one connection's ephemeral messages.
struct EphemeralBudget {
    tokens: f64,
    at: Instant,
    /// When the sender was last told that messages were dropped (at most once a second).
    told: Option<Instant>,
}

enum Budget {
    Granted,
    Refused { tell: bool },
}

impl EphemeralBudget {
    fn new(now: Instant) -> EphemeralBudget {
        EphemeralBudget { tokens: EPHEMERAL_BURST, at: now, told: None }
    }

    fn take(&mut self, now: Instant) -> Budget {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * EPHEMERAL_PER_SECOND).min(EPHEMERAL_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Budget::Granted;
        }
        let tell = self.told.is_none_or(|t| now.saturating_duration_since(t) >= std::time::Duration::from_secs(1));
        if tell {
            self.told = Some(now);
        }
        Budget::Refused { tell }
    }
}

/// Loaded documents by when they were last used: touching one and finding the least recently used
/// are O(log n), so a client asking for many documents costs no sorting per message.
#[derive(Default)]
struct Recent {
    tick_of: HashMap<String, u64>,
    by_tick: std::collections::BTreeMap<u64, String>,
}

impl Recent {
    /// Marks `id` as used at `tick`; returns the least recently used documents beyond `max`.
    fn touch(&mut self, id: &str, tick: u64, max: usize) -> Vec<String> {
        if let Some(old) = self.tick_of.insert(id.to_owned(), tick) {
            self.by_tick.remove(&old);
        }
        self.by_tick.insert(tick, id.to_owned());
        let mut out = Vec::new();
        while self.tick_of.len() > max {
            let Some((_, oldest)) = self.by_tick.pop_first() else { break };
            self.tick_of.remove(&oldest);
            out.push(oldest);
        }
        out
    }

    fn remove(&mut self, id: &str) {
        if let Some(tick) = self.tick_of.remove(id) {
            self.by_tick.remove(&tick);
        }
    }
}

/// A conversation read from more chunks than this is merged into one when it is loaded.
const COMPACT_AFTER_CHUNKS: usize = 100;

/// Changes arriving within this window are fanned out together: one message per peer carries
/// them all. Everything sent is still committed first.
const FANOUT_COALESCE: std::time::Duration = std::time::Duration::from_millis(3);

#[derive(serde::Deserialize)]
pub(crate) struct TokenQuery {
    pub(crate) token: Option<String>,
}

pub(crate) fn bearer(headers: &HeaderMap, query: &TokenQuery) -> Option<String> {
    query.token.clone().or_else(|| {
        headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned)
    })
}

impl Relay {
    pub(crate) async fn authenticate(&self, token: Option<String>) -> Result<Option<Agent>, StoreError> {
        let Some(token) = token else { return Ok(None) };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.authenticate(&token))
            .await
            .map_err(|e| StoreError::Invalid(e.to_string()))?
    }

    fn entry(&self, id: &str) -> Arc<AsyncMutex<DocEntry>> {
        let mut docs = self.docs.lock().unwrap_or_else(|p| p.into_inner());
        docs.entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(AsyncMutex::new(DocEntry {
                    loaded: false,
                    seq: 0,
                    core: RelayDoc::new(id, &self.peer_id, self.actor.clone()),
                    slots: HashMap::new(),
                }))
            })
            .clone()
    }

    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store)).await.map_err(|e| StoreError::Invalid(e.to_string()))?
    }

    /// Stores a chunk durably (group commit); returns once it is fsynced.
    async fn commit(&self, doc: &str, team: &TeamId, chunk: Vec<u8>) -> Result<(), String> {
        let wait = self.enqueue_commit(doc, team, chunk).await?;
        wait.await.map_err(|_| "the relay is shutting down".to_owned())?
    }

    /// Hands a chunk to the group commit; the receiver answers once it is durable.
    async fn enqueue_commit(
        &self,
        doc: &str,
        team: &TeamId,
        chunk: Vec<u8>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, String> {
        let (done, wait) = tokio::sync::oneshot::channel();
        let c = Commit { doc: doc.to_owned(), team: team.clone(), chunk, done };
        self.commits.send(c).await.map_err(|_| "the relay is shutting down".to_owned())?;
        Ok(wait)
    }

    async fn ensure_loaded(&self, id: &str, e: &mut DocEntry) -> Result<(), StoreError> {
        if e.loaded || e.core.is_stored() {
            e.loaded = true;
            return Ok(());
        }
        let owned = id.to_owned();
        if let Some(loaded) = self.blocking(move |s| s.load_document_at(&owned)).await? {
            let doc = Automerge::load(&loaded.bytes)
                .map_err(|err| StoreError::Invalid(format!("stored document {id} is unreadable: {err}")))?;
            e.core.load(doc, loaded.team);
            e.seq = loaded.seq;
            if loaded.chunks > COMPACT_AFTER_CHUNKS {
                // Every commit adds a chunk; merge them in the background so the next load is one
                // read of one save. The store merges exactly what it holds, in one transaction.
                let (store, id) = (self.store.clone(), id.to_owned());
                tokio::task::spawn_blocking(move || match store.compact_stored(&id) {
                    Ok(n) if n > 0 => debug!(doc_id = %id, chunks = n, "conversation compacted"),
                    Ok(_) => {}
                    Err(err) => warn!(doc_id = %id, %err, "conversation not compacted"),
                });
            }
            e.loaded = true;
            // A grab asked for just before the relay stopped is decided when the conversation is
            // read again (the simulator found grab requests left without an owner after a crash).
            if let Err(reason) = self.decide_grab(id, e).await {
                warn!(doc_id = %id, %reason, "grab not decided");
            }
        }
        e.loaded = true;
        Ok(())
    }

    /// A `request` or `sync` from a connection. Every sync message is checked against the limits
    /// of [`SyncLimits::CLIENT`] before automerge parses it; what it means for the document is
    /// decided by the core's [`RelayDoc`] (which judges every change on its own with the core's
    /// judge); this function finds the facts it needs (who the agent is in the team, the team's
    /// mode, whose actors the changes use) and carries out what it decides.
    async fn handle_sync(self: &Arc<Self>, session: &Session, doc_id: String, data: Vec<u8>, is_request: bool) {
        let unavailable = || WireMessage::DocUnavailable {
            sender_id: self.peer_id.clone(),
            target_id: session.peer_id.clone(),
            document_id: doc_id.clone(),
        };
        if !document_id::is_valid(&doc_id) {
            session.send(unavailable());
            return;
        }
        let (message, changes) = match parse_client_sync(&data) {
            Ok(parsed) => parsed,
            Err(e) => {
                info!(%doc_id, agent = %session.agent.id, %e, "sync message refused");
                session.error(&self.peer_id, format!("document {doc_id}: {e}; the sync message was ignored"));
                return;
            }
        };
        let entry = self.entry(&doc_id);
        let mut guard = entry.lock().await;
        if let Err(err) = self.ensure_loaded(&doc_id, &mut guard).await {
            warn!(%doc_id, %err, "cannot load document");
            session.error(
                &self.peer_id,
                format!("document {doc_id}: the relay could not read this conversation; try again later"),
            );
            return;
        }
        let e = &mut *guard;
        let (conn, peer_id) = (session.conn, session.peer_id.as_str());
        let claim = match e.core.team() {
            Some(team) => {
                if session.agent.role_in(team).is_none() {
                    // Exactly like a missing document: no existence leak.
                    session.send(unavailable());
                    return;
                }
                if !e.core.follows(conn)
                    && let Some(p) = self.presence_of(&doc_id)
                {
                    // A new follower of this conversation hears the customer's presence at once.
                    session.send(self.presence_message(&doc_id, peer_id, &p));
                }
                Claim::Team(team.clone())
            }
            None => {
                if let std::collections::hash_map::Entry::Vacant(v) = e.slots.entry(conn) {
                    let Some(slot) = PendingSlot::take(&session.pending) else {
                        session.send(unavailable());
                        return;
                    };
                    v.insert(slot);
                }
                match changes.is_empty() {
                    true => Claim::Empty,
                    false => e.core.claim(conn, &changes),
                }
            }
        };
        let refused_read = || format!("document {doc_id}: the relay could not read this conversation; try again later");
        let actions = match claim {
            _ if changes.is_empty() => {
                e.core.receive(conn, peer_id, message, changes, is_request, None, Timestamp::now())
            }
            Claim::Team(team) => match session.agent.role_in(&team) {
                None => e.core.unavailable(conn, peer_id),
                Some(role) => {
                    let Some(author) = self.author(&session.agent.id, team, role, &changes).await else {
                        session.error(&self.peer_id, refused_read());
                        return;
                    };
                    e.core.receive(conn, peer_id, message, changes, is_request, Some(&author), Timestamp::now())
                }
            },
            Claim::Empty => {
                // No conversation in it yet: automerge-repo clients start a document with an
                // empty change, kept until the layout arrives.
                let Some(author) =
                    self.author(&session.agent.id, TeamId::default(), Role::Representative, &changes).await
                else {
                    session.error(&self.peer_id, refused_read());
                    return;
                };
                e.core.receive(conn, peer_id, message, changes, is_request, Some(&author), Timestamp::now())
            }
            Claim::NotConversation => e.core.unavailable(conn, peer_id),
            Claim::Unreadable(why) => {
                info!(%doc_id, agent = %session.agent.id, %why, "new conversation refused");
                e.core.refuse_creation(conn, peer_id, &why)
            }
        };
        self.perform(&entry, guard, actions).await;
    }

    /// Who sent `changes`, as the judge needs to know them. `None` when storage cannot be reached.
    async fn author(
        &self,
        agent: &AgentId,
        team: TeamId,
        role: Role,
        changes: &[automerge::Change],
    ) -> Option<ChangeAuthor> {
        let mode = match team == TeamId::default() {
            true => TeamMode::Open,
            false => self.team_mode(&team).await?,
        };
        let foreign_actors = self.foreign_actors(agent, changes).await?;
        Some(ChangeAuthor { agent: agent.clone(), team, role, mode, foreign_actors })
    }

    /// The actors of `changes` that are bound to someone other than `agent` (binding the ones
    /// nobody used yet to `agent`). `None` when the store cannot be reached.
    async fn foreign_actors(&self, agent: &AgentId, changes: &[automerge::Change]) -> Option<Vec<ActorId>> {
        let mut unknown: Vec<String> = Vec::new();
        let mut foreign = Vec::new();
        {
            let known = self.actors.lock().unwrap_or_else(|p| p.into_inner());
            for actor in changes.iter().map(automerge::Change::actor_id) {
                let hex = actor.to_hex_string();
                match known.get(&hex) {
                    Some(owner) if owner != agent => foreign.push(actor.clone()),
                    Some(_) => {}
                    None if !unknown.contains(&hex) => unknown.push(hex),
                    None => {}
                }
            }
        }
        if unknown.is_empty() {
            return Some(foreign);
        }
        let (who, asked) = (agent.clone(), unknown.clone());
        let owners = self.blocking(move |s| s.bind_actors(&who, &asked)).await.ok()?;
        let mut known = self.actors.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() + owners.len() > MAX_CACHED_ACTORS {
            known.clear();
        }
        for (hex, owner) in unknown.into_iter().zip(owners) {
            if owner != *agent
                && let Some(c) = changes.iter().find(|c| c.actor_id().to_hex_string() == hex)
            {
                foreign.push(c.actor_id().clone());
            }
            known.insert(hex, owner);
        }
        Some(foreign)
    }

    /// How a team works (open or grab mode), read from storage at most every few seconds.
    async fn team_mode(&self, team: &TeamId) -> Option<TeamMode> {
        const FRESH: std::time::Duration = std::time::Duration::from_secs(5);
        {
            let modes = self.team_modes.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((mode, at)) = modes.get(team)
                && at.elapsed() < FRESH
            {
                return Some(*mode);
            }
        }
        let teams = self.blocking(|s| s.teams()).await.ok()?;
        let now = Instant::now();
        let mut modes = self.team_modes.lock().unwrap_or_else(|p| p.into_inner());
        for t in &teams {
            modes.insert(t.id.clone(), (t.mode, now));
        }
        teams.into_iter().find(|t| t.id == *team).map(|t| t.mode)
    }

    /// Carries out what a document's core decided, in order, until nothing is left: frames go to
    /// their connections, chunks are committed (the document's lock is released while the commit
    /// waits for its fsync, so other agents' changes join the same group commit), fan-outs are
    /// scheduled, the channels hear of stored messages and grabs are decided.
    async fn perform(
        self: &Arc<Self>,
        entry: &Arc<AsyncMutex<DocEntry>>,
        mut guard: tokio::sync::MutexGuard<'_, DocEntry>,
        actions: Vec<Action>,
    ) {
        let doc_id = guard.core.id().to_owned();
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Send(conn, message) => {
                    let session = self.sessions.lock().unwrap_or_else(|p| p.into_inner()).get(&conn).cloned();
                    match session {
                        Some(s) if !s.tx.is_closed() => s.send(message),
                        _ => guard.core.disconnect(conn),
                    }
                }
                Action::Commit { ticket, team, chunk } => {
                    let wait = self.enqueue_commit(&doc_id, &team, chunk).await;
                    let result = match wait {
                        Ok(wait) => {
                            drop(guard);
                            let result = wait.await.unwrap_or_else(|_| Err("the relay is shutting down".to_owned()));
                            guard = entry.lock().await;
                            result
                        }
                        Err(e) => Err(e),
                    };
                    queue.extend(guard.core.committed(ticket, result));
                }
                Action::ScheduleFanout => self.schedule_fanout(entry),
                Action::Reload => guard.loaded = false,
                Action::Created { team } => {
                    for s in self.team_sessions(&team) {
                        guard.core.follow(s.conn, &s.peer_id);
                    }
                    self.widgets.changed(&doc_id);
                    if let Err(reason) = self.decide_grab(&doc_id, &mut guard).await {
                        warn!(%doc_id, %reason, "grab not decided");
                    }
                    queue.extend(guard.core.advertise());
                }
                Action::Stored { added } => {
                    self.widgets.changed(&doc_id);
                    let e = &mut *guard;
                    match e.core.header() {
                        Some(Ok(header)) => {
                            let team = header.team.clone();
                            self.queue_email_fallback(&doc_id, &team, &added, &header).await;
                            if let Some(d) = e.core.doc() {
                                self.queue_whatsapp(&doc_id, d, &added, &header).await;
                            }
                            if let Err(reason) = self.decide_grab(&doc_id, e).await {
                                warn!(%doc_id, %reason, "grab not decided");
                            }
                        }
                        Some(Err(err)) => warn!(%doc_id, %err, "a stored conversation cannot be read"),
                        None => {}
                    }
                }
                Action::Missing if self.shared => {
                    // The changes may build on what another instance committed and this one has
                    // not read yet (an agent who moved between instances): read it now.
                    let wanted = vec![(doc_id.clone(), guard.seq)];
                    if let Ok(found) = self.blocking(move |s| s.chunks_since_many(&wanted)).await
                        && let Some((bytes, last)) = found.get(&doc_id)
                    {
                        guard.seq = guard.seq.max(*last);
                        match guard.core.apply_stored(bytes) {
                            Ok(more) => {
                                queue.extend(more);
                                queue.extend(guard.core.retry_deferred(Timestamp::now()));
                            }
                            Err(err) => {
                                warn!(%doc_id, %err, "cannot apply another instance's change");
                                guard.loaded = false;
                            }
                        }
                    }
                }
                Action::Missing => {}
            }
        }
        let e = &mut *guard;
        e.slots.retain(|conn, _| e.core.is_pending(*conn));
    }

    /// Calls the core's fan-out shortly (changes arriving meanwhile go out with it).
    fn schedule_fanout(self: &Arc<Self>, entry: &Arc<AsyncMutex<DocEntry>>) {
        let (relay, entry) = (self.clone(), entry.clone());
        tokio::spawn(async move {
            tokio::time::sleep(FANOUT_COALESCE).await;
            let mut e = entry.lock().await;
            let doc_id = e.core.id().to_owned();
            if let Err(err) = relay.ensure_loaded(&doc_id, &mut e).await {
                warn!(%doc_id, %err, "cannot reload document for fan-out");
            }
            let actions = e.core.fanout();
            relay.perform(&entry, e, actions).await;
        });
    }

    /// Sends every follower what it needs now (nothing while a commit is in progress: its fan-out
    /// follows). Only frames come out of an advertisement.
    fn advertise_now(&self, e: &mut DocEntry) {
        let actions = e.core.advertise();
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for action in actions {
            if let Action::Send(conn, message) = action
                && let Some(s) = sessions.get(&conn)
            {
                s.send(message);
            }
        }
    }

    /// Web-widget customers who are offline and left an email address get crew messages by email
    /// ("Customer is offline. Email fallback activated" in the desktop app).
    async fn queue_email_fallback(
        &self,
        doc_id: &str,
        team: &TeamId,
        added: &[crewdesk::domain::Message],
        header: &doc::DocHeader,
    ) {
        let online = self.presence_of(doc_id).is_some_and(|p| p.online);
        let email = header.customer.email.as_deref();
        if !crewdesk::domain::status::email_fallback_applies(header.channel, online, email) {
            return;
        }
        let Some(to) = header.customer.email.clone() else { return };
        if !added.iter().any(|m| matches!(m.author, crewdesk::domain::Author::Crew { .. })) {
            return;
        }
        let teams = self.blocking(|s| s.teams()).await.unwrap_or_default();
        let team = teams.iter().find(|t| &t.id == team);
        let emails: Vec<crate::store::QueuedEmail> = added
            .iter()
            .filter_map(|m| {
                let crewdesk::domain::Author::Crew { agent } = &m.author else { return None };
                let agent_name =
                    team.and_then(|t| t.member(agent)).map_or_else(|| agent.to_string(), |m| m.name.clone());
                let text = m.body.text_content();
                let attachment = match (&m.body, m.body.blob()) {
                    (crewdesk::domain::MessageBody::Attachment { file_name, mime, size, .. }, Some(hash)) => {
                        Some(crate::store::EmailAttachment {
                            hash: hash.as_str().to_owned(),
                            file_name: file_name.clone(),
                            mime: mime.clone(),
                            size: *size,
                        })
                    }
                    _ => None,
                };
                Some(crate::store::QueuedEmail {
                    message_id: format!("{doc_id}/{}", m.id),
                    doc_id: doc_id.to_owned(),
                    to: to.clone(),
                    customer: header.customer.name.clone(),
                    agent: agent_name,
                    text,
                    created_at: crewdesk::domain::Timestamp::now().0,
                    attachment,
                })
            })
            .collect();
        if emails.is_empty() {
            return;
        }
        if let Err(e) = self.blocking(move |s| s.queue_emails(&emails)).await {
            warn!(%doc_id, %e, "fallback emails not queued");
        }
        self.mail_wake.notify_one();
    }

    /// Crew messages in WhatsApp conversations go to the Graph API through a durable outbox.
    async fn queue_whatsapp(
        &self,
        doc_id: &str,
        stored: &Automerge,
        added: &[crewdesk::domain::Message],
        header: &doc::DocHeader,
    ) {
        if header.channel != crewdesk::domain::Channel::WhatsApp || self.config.whatsapp.is_none() {
            return;
        }
        if !added.iter().any(|m| matches!(m.author, crewdesk::domain::Author::Crew { .. })) {
            return;
        }
        let Ok(all) = doc::all_messages(stored) else { return };
        let rows = crate::whatsapp::outbound_rows(doc_id, header, added, &all);
        if let Err(e) = self.blocking(move |s| s.queue_whatsapp(&rows)).await {
            warn!(%doc_id, %e, "WhatsApp messages not queued");
        }
        self.whatsapp_wake.notify_one();
    }

    pub(crate) fn whatsapp(&self) -> Option<&crate::whatsapp::WhatsAppConfig> {
        self.config.whatsapp.as_ref()
    }

    pub(crate) fn whatsapp_inbound_lock(&self) -> &AsyncMutex<()> {
        &self.whatsapp_inbound
    }

    /// Grab-mode teams: the first grab request the relay received wins; the winner is written
    /// into the conversation by the relay (and stored) before anyone hears of it.
    async fn decide_grab(&self, doc_id: &str, e: &mut DocEntry) -> Result<(), String> {
        let Some(Ok(header)) = e.core.header() else { return Ok(()) };
        if header.owner.is_some() || header.grab_requests.is_empty() {
            return Ok(());
        }
        let teams = self.blocking(|s| s.teams()).await.map_err(|e| e.to_string())?;
        let Some(team) = teams.into_iter().find(|t| t.id == header.team) else { return Ok(()) };
        if team.mode != TeamMode::Grab {
            return Ok(());
        }
        // Requests that arrived together are ordered by the time they were made.
        let mut requests = header.grab_requests;
        requests.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        let agents: Vec<AgentId> = requests.into_iter().map(|(a, _)| a).collect();
        let id = doc_id.to_owned();
        let order = self.blocking(move |s| s.log_grabs(&id, &agents)).await.map_err(|e| e.to_string())?;
        let Some(winner) = decide_grab(None, &team, &order).cloned() else { return Ok(()) };
        let chunk = e.core.relay_change(|tx| doc::record_owner(tx, &winner))?;
        if let Err(err) = self.commit(doc_id, &header.team, chunk).await {
            e.core.unload();
            e.loaded = false;
            return Err(err);
        }
        info!(%doc_id, %winner, "grab decided");
        Ok(())
    }

    /// Makes a conversation the relay stored itself live: every connected agent of its team follows
    /// it (the followers it already has keep their sync state) and hears of it now.
    fn announce_loaded(&self, e: &mut DocEntry) {
        let Some(team) = e.core.team().cloned() else { return };
        for s in self.team_sessions(&team) {
            e.core.follow(s.conn, &s.peer_id);
        }
        self.advertise_now(e);
    }

    fn team_sessions(&self, team: &TeamId) -> Vec<Session> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.values().filter(|s| s.agent.role_in(team).is_some()).cloned().collect()
    }

    /// Applies chunks other instances stored (up to position `last`) and passes them on.
    fn apply_remote(&self, e: &mut DocEntry, bytes: &[u8], last: i64) -> Result<(), StoreError> {
        if !e.core.is_stored() {
            return Ok(());
        }
        // Chunks read since an older position may repeat what is in memory: automerge skips those.
        e.seq = e.seq.max(last);
        match e.core.apply_stored(bytes) {
            Ok(actions) => {
                // Frames only (changes that waited for these are judged with their sender's next
                // message, which this advertisement prompts).
                let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
                for action in actions {
                    if let Action::Send(conn, message) = action
                        && let Some(s) = sessions.get(&conn)
                    {
                        s.send(message);
                    }
                }
                Ok(())
            }
            Err(err) => {
                e.loaded = false;
                Err(StoreError::Invalid(err))
            }
        }
    }

    /// Applies a batch of what other instances report. Commits are grouped by document, and the
    /// chunks every loaded document misses are read in one query. A resync (the notification
    /// channel was reopened) counts as a commit of every loaded document, then announces the
    /// conversations created meanwhile.
    async fn on_instance_events(&self, batch: Vec<crate::store::StoreEvent>) {
        use crate::store::StoreEvent;
        // Per document: the last position announced and, for a new conversation, its team.
        let mut committed: std::collections::BTreeMap<String, (i64, Option<TeamId>)> = Default::default();
        let mut resync_since: Option<i64> = None;
        let (started, events) = (Instant::now(), batch.len());
        for event in batch {
            match event {
                StoreEvent::Committed { doc_id, team, seq, created } => {
                    let c = committed.entry(doc_id).or_insert((seq, None));
                    c.0 = c.0.max(seq);
                    if created {
                        c.1 = Some(team);
                    }
                }
                StoreEvent::Resync { since } => {
                    let loaded: Vec<String> =
                        self.docs.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
                    for doc_id in loaded {
                        committed.entry(doc_id).or_insert((i64::MAX, None)).0 = i64::MAX;
                    }
                    resync_since = Some(resync_since.map_or(since, |s| s.min(since)));
                }
                StoreEvent::Presence { doc_id, presence } => self.show_presence(&doc_id, presence).await,
                StoreEvent::Ephemeral { doc_id, sender_id, count, session_id, data } => {
                    let entry = self.docs.lock().unwrap_or_else(|p| p.into_inner()).get(&doc_id).cloned();
                    if let Some(entry) = entry {
                        forward_ephemeral(
                            &self.sessions,
                            &*entry.lock().await,
                            None,
                            &sender_id,
                            &doc_id,
                            count,
                            &session_id,
                            &data,
                        );
                    }
                }
            }
        }
        // Where each loaded document is. Documents busy with their own commits are waited for
        // together, not one after the other.
        let positions = futures_util::future::join_all(committed.iter().map(|(doc_id, (seq, _))| async move {
            let entry = self.docs.lock().unwrap_or_else(|p| p.into_inner()).get(doc_id).cloned();
            let Some(entry) = entry else { return (doc_id, *seq, None) };
            let at = {
                let e = entry.lock().await;
                e.core.is_stored().then_some(e.seq)
            };
            (doc_id, *seq, at.map(|at| (at, entry)))
        }))
        .await;
        let waited = started.elapsed();
        let mut behind = Vec::new();
        let mut announce = Vec::new();
        for (doc_id, seq, loaded) in positions {
            match (loaded, &committed[doc_id].1) {
                (Some((at, entry)), _) if at < seq => behind.push((doc_id.clone(), at, entry)),
                (Some(_), _) => {}
                (None, Some(team)) => announce.push((doc_id.clone(), team.clone())),
                (None, None) => {}
            }
        }
        if !behind.is_empty() {
            let wanted: Vec<(String, i64)> = behind.iter().map(|(d, at, _)| (d.clone(), *at)).collect();
            match self.blocking(move |s| s.chunks_since_many(&wanted)).await {
                Ok(found) => {
                    let found = &found;
                    futures_util::future::join_all(behind.into_iter().map(|(doc_id, _, entry)| async move {
                        let Some((bytes, last)) = found.get(&doc_id) else { return };
                        let mut e = entry.lock().await;
                        if let Err(err) = self.apply_remote(&mut e, bytes, *last) {
                            warn!(%doc_id, %err, "cannot apply another instance's change");
                        }
                    }))
                    .await;
                }
                Err(err) => warn!(%err, "cannot read other instances' changes"),
            }
        }
        for (doc_id, team) in announce {
            self.announce_remote(&doc_id, &team).await;
        }
        for doc_id in committed.into_keys() {
            self.widgets.changed(&doc_id);
        }
        if let Some(since) = resync_since {
            match self.blocking(move |s| s.documents_since(since)).await {
                Ok(created) => {
                    for (doc_id, team) in created {
                        self.announce_remote(&doc_id, &team).await;
                    }
                }
                Err(err) => warn!(%err, "cannot list new conversations"),
            }
        }
        debug!(
            events,
            lock_wait_ms = waited.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "other instances' events applied"
        );
    }

    /// A conversation another instance stored: followed here when agents of its team are here.
    async fn announce_remote(&self, doc_id: &str, team: &TeamId) {
        if self.team_sessions(team).is_empty() {
            return;
        }
        let entry = self.entry(doc_id);
        let mut e = entry.lock().await;
        if let Err(err) = self.ensure_loaded(doc_id, &mut e).await {
            warn!(%doc_id, %err, "cannot load a conversation another instance created");
            return;
        }
        self.announce_loaded(&mut e);
    }

    /// Passes an event (presence, an ephemeral message) to the other relay instances, if any.
    async fn tell_instances(&self, event: crate::store::StoreEvent) {
        if !self.shared {
            return;
        }
        if let Err(err) = self.blocking(move |s| s.publish(&event)).await {
            warn!(%err, "not passed to the other relay instances");
        }
    }

    async fn handle_ephemeral(&self, session: &Session, doc_id: String, count: u64, session_id: String, data: Vec<u8>) {
        // Only conversations someone follows here: an ephemeral message never creates an entry.
        let entry = self.docs.lock().unwrap_or_else(|p| p.into_inner()).get(&doc_id).cloned();
        let Some(entry) = entry else { return };
        let e = entry.lock().await;
        let Some(team) = e.core.team() else { return };
        if session.agent.role_in(team).is_none() {
            return;
        }
        forward_ephemeral(&self.sessions, &e, Some(session.conn), &session.peer_id, &doc_id, count, &session_id, &data);
        drop(e);
        let sender_id = session.peer_id.clone();
        self.tell_instances(crate::store::StoreEvent::Ephemeral { doc_id, sender_id, count, session_id, data }).await;
    }

    /// Marks a document as just used and drops the least recently used loaded documents beyond
    /// `max_loaded_documents`. Their sync states stay; the document is read again when needed.
    async fn touch(&self, id: &str) {
        let tick = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let evict =
            self.recent.lock().unwrap_or_else(|p| p.into_inner()).touch(id, tick, self.config.max_loaded_documents);
        for doc_id in evict {
            let entry = self.entry(&doc_id);
            // A document being worked on right now stays; it is evicted on a later pass.
            let Ok(mut e) = entry.try_lock() else { continue };
            if e.slots.is_empty() && e.core.unload() {
                e.loaded = false;
            }
            drop(e);
            drop(entry);
            self.forget_if_unused(&doc_id);
        }
    }

    /// Removes a document's entry when nobody syncs it and no task holds it, so memory follows the
    /// active documents. Checked under the map's lock, so no second entry can appear meanwhile.
    fn forget_if_unused(&self, id: &str) {
        let mut docs = self.docs.lock().unwrap_or_else(|p| p.into_inner());
        let idle = docs
            .get(id)
            .is_some_and(|entry| Arc::strong_count(entry) == 1 && entry.try_lock().is_ok_and(|e| e.core.is_idle()));
        if idle {
            docs.remove(id);
            self.recent.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        }
    }

    pub(crate) fn presence_of(&self, doc_id: &str) -> Option<crewdesk::domain::Presence> {
        self.presence.lock().unwrap_or_else(|p| p.into_inner()).get(doc_id).cloned()
    }

    fn presence_message(&self, doc_id: &str, target: &str, p: &crewdesk::domain::Presence) -> WireMessage {
        let count = self.next_conn.fetch_add(1, Ordering::Relaxed);
        WireMessage::Ephemeral {
            sender_id: self.peer_id.clone(),
            target_id: target.to_owned(),
            document_id: doc_id.to_owned(),
            count,
            session_id: self.storage_id.clone(),
            data: crewdesk::sync::presence::encode(p),
        }
    }

    /// Records a web-widget customer's presence and tells every follower of the conversation.
    pub(crate) async fn set_presence(&self, doc_id: &str, p: crewdesk::domain::Presence) {
        self.tell_instances(crate::store::StoreEvent::Presence { doc_id: doc_id.to_owned(), presence: p.clone() })
            .await;
        self.show_presence(doc_id, p).await;
    }

    /// Records a customer's presence here and tells this instance's followers of the conversation.
    async fn show_presence(&self, doc_id: &str, p: crewdesk::domain::Presence) {
        self.presence.lock().unwrap_or_else(|p| p.into_inner()).insert(doc_id.to_owned(), p.clone());
        let entry = self.entry(doc_id);
        let e = entry.lock().await;
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for (conn, peer_id) in e.core.followers() {
            if let Some(s) = sessions.get(&conn) {
                s.send(self.presence_message(doc_id, peer_id, &p));
            }
        }
    }

    /// Applies a change made by the relay itself (widget customers' messages), commits it and
    /// fans it out like any other change.
    pub(crate) async fn change_as_relay<F>(&self, doc_id: &str, f: F) -> Result<(), String>
    where
        F: FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<(), doc::DocError>,
    {
        let entry = self.entry(doc_id);
        let mut e = entry.lock().await;
        self.ensure_loaded(doc_id, &mut e).await.map_err(|e| e.to_string())?;
        let e = &mut *e;
        let Some(team) = e.core.team().cloned() else { return Err("no such conversation".into()) };
        let chunk = e.core.relay_change(f)?;
        if let Err(err) = self.commit(doc_id, &team, chunk).await {
            // Not stored: forget the in-memory change.
            e.core.unload();
            e.loaded = false;
            return Err(err);
        }
        self.widgets.changed(doc_id);
        self.advertise_now(e);
        Ok(())
    }

    /// Creates a conversation on the relay (widget customers) and announces it to the team.
    pub(crate) async fn create_as_relay(
        &self,
        new: &doc::NewConversation,
        first: &crewdesk::domain::Message,
    ) -> Result<(), String> {
        let mut d = doc::create(self.actor.clone(), new).map_err(|e| e.to_string())?;
        d.transact::<_, _, doc::DocError>(|tx| doc::add_message(tx, first)).map_err(|f| f.error.to_string())?;
        self.commit(new.id.as_str(), &new.team, d.save()).await?;
        let entry = self.entry(new.id.as_str());
        let mut e = entry.lock().await;
        e.core.load(d, new.team.clone());
        e.loaded = true;
        self.announce_loaded(&mut e);
        Ok(())
    }

    /// A stored conversation's messages (for a widget session's history).
    pub(crate) async fn messages_of(&self, doc_id: &str) -> Result<Vec<crewdesk::domain::Message>, String> {
        let entry = self.entry(doc_id);
        let mut e = entry.lock().await;
        self.ensure_loaded(doc_id, &mut e).await.map_err(|e| e.to_string())?;
        match e.core.doc() {
            Some(d) => doc::all_messages(d).map_err(|e| e.to_string()),
            None => Err("no such conversation".into()),
        }
    }

    /// Files a widget customer may send per conversation (20 per 10 minutes), across instances.
    pub(crate) async fn allow_widget_upload(&self, doc_id: &str) -> bool {
        let key = format!("upload:{doc_id}");
        self.allow_shared(key, 20, 600_000, || self.widget_uploads.allow(doc_id.to_owned())).await
    }

    /// Conversations one address may start (`widget_starts_per_ip` per 10 minutes), across instances.
    pub(crate) async fn allow_widget_start(&self, ip: std::net::IpAddr) -> bool {
        let key = format!("start:{ip}");
        let max = self.config.widget_starts_per_ip;
        self.allow_shared(key, max, 600_000, || self.widget_starts.allow(ip)).await
    }

    /// A limit counted in the shared store when instances share one, else by this process.
    async fn allow_shared(&self, key: String, max: usize, window_ms: i64, local: impl FnOnce() -> bool) -> bool {
        if !self.shared {
            return local();
        }
        match self.blocking(move |s| s.allow_event(&key, max, window_ms)).await {
            Ok(Some(allowed)) => allowed,
            Ok(None) => local(),
            Err(err) => {
                warn!(%err, "shared rate limit unavailable; counting on this instance");
                local()
            }
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub(crate) fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.clone()
    }

    async fn disconnect(&self, conn: ConnId, touched: &HashSet<String>) {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(&conn);
        for id in touched {
            let entry = self.entry(id);
            let mut e = entry.lock().await;
            e.core.disconnect(conn);
            e.slots.remove(&conn);
            drop(e);
            drop(entry);
            // Nobody else syncs it: free the memory; it is read from SQLite when asked for again.
            self.forget_if_unused(id);
        }
        // Documents announced to this connection hold a stale entry until their next change, when
        // `advertise` drops peers whose channel is closed.
    }
}

/// Follows the other relay instances sharing the store until the relay stops.
async fn follow_instances(
    relay: Arc<Relay>,
    mut events: mpsc::Receiver<crate::store::StoreEvent>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => {
                    // Whatever else is waiting goes in the same batch.
                    let mut batch = vec![event];
                    while batch.len() < 4096 {
                        match events.try_recv() {
                            Ok(e) => batch.push(e),
                            Err(_) => break,
                        }
                    }
                    relay.on_instance_events(batch).await;
                }
                None => return,
            },
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Passes an ephemeral message to a document's followers here (but not back to `except`).
#[allow(clippy::too_many_arguments)]
fn forward_ephemeral(
    sessions: &Mutex<HashMap<ConnId, Session>>,
    e: &DocEntry,
    except: Option<ConnId>,
    sender_id: &str,
    doc_id: &str,
    count: u64,
    session_id: &str,
    data: &[u8],
) {
    let sessions = sessions.lock().unwrap_or_else(|p| p.into_inner());
    for (conn, peer_id) in e.core.followers() {
        if Some(conn) != except
            && let Some(s) = sessions.get(&conn)
        {
            s.send(WireMessage::Ephemeral {
                sender_id: sender_id.to_owned(),
                target_id: peer_id.to_owned(),
                document_id: doc_id.to_owned(),
                count,
                session_id: session_id.to_owned(),
                data: data.to_vec(),
            });
        }
    }
}

/// A client's sync message, checked against [`SyncLimits::CLIENT`] before automerge parses it,
/// and the changes it carries (decompressed within the limits and verified).
fn parse_client_sync(data: &[u8]) -> Result<(sync::Message, Vec<automerge::Change>), String> {
    let checked = bounded::check_sync_message(data, &SyncLimits::CLIENT)
        .map_err(|e| format!("the sync message is malformed or over a limit ({e})"))?;
    let message = sync::Message::decode(data).map_err(|e| format!("the sync message is malformed ({e})"))?;
    let changes = checked
        .changes
        .iter()
        .map(|c| automerge::Change::try_from(c.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("a change is malformed ({e})"))?;
    Ok((message, changes))
}

async fn health(State(relay): State<Arc<Relay>>) -> impl IntoResponse {
    let connections = relay.sessions.lock().map(|s| s.len()).unwrap_or(0);
    let documents = relay.docs.lock().map(|d| d.len()).unwrap_or(0);
    axum::Json(serde_json::json!({
        "status": "ok",
        "store": relay.store.backend(),
        "connections": connections,
        "documents_loaded": documents,
    }))
}

/// The signed-in agent, their teams (membership and roles as the relay knows them) and the ids of
/// their teams' conversations: what a replica needs to mirror before syncing.
async fn me(State(relay): State<Arc<Relay>>, headers: HeaderMap, Query(q): Query<TokenQuery>) -> Response {
    let agent = match relay.authenticate(bearer(&headers, &q)).await {
        Ok(Some(a)) => a,
        Ok(None) => return (StatusCode::UNAUTHORIZED, "missing, unknown or revoked token").into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let team_ids: Vec<TeamId> = agent.teams.iter().map(|(t, _)| t.clone()).collect();
    let result = relay
        .blocking(move |s| {
            let teams: Vec<_> = s.teams()?.into_iter().filter(|t| team_ids.contains(&t.id)).collect();
            let documents = s.documents_of(&team_ids)?;
            Ok((teams, documents))
        })
        .await;
    match result {
        Ok((teams, documents)) => axum::Json(serde_json::json!({
            "agent": { "id": agent.id, "name": agent.name },
            "teams": teams,
            "documents": documents,
            "relay_storage_id": relay.storage_id,
        }))
        .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn websocket(
    State(relay): State<Arc<Relay>>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let agent = relay.authenticate(bearer(&headers, &q)).await;
    let max = relay.config.max_frame_bytes;
    // Small per-connection buffers: a thousand idle agents should not cost a thousand large buffers.
    ws.max_message_size(max).max_frame_size(max).read_buffer_size(4 * 1024).write_buffer_size(4 * 1024).on_upgrade(
        move |socket| async move {
            match agent {
                Ok(Some(agent)) => {
                    let conn = relay.next_conn.fetch_add(1, Ordering::Relaxed);
                    let span = info_span!("connection", conn, agent = %agent.id);
                    connection(relay, socket, conn, Arc::new(agent)).instrument(span).await;
                }
                Ok(None) => refuse(socket, "authentication failed: missing, unknown or revoked token").await,
                Err(e) => refuse(socket, &format!("the relay cannot check tokens right now: {e}")).await,
            }
        },
    )
}

/// Accepts the upgrade only to say why, then closes (a plain 401 crashes some Node clients).
async fn refuse(mut socket: WebSocket, reason: &str) {
    let error = WireMessage::Error { sender_id: String::new(), target_id: String::new(), message: reason.to_owned() };
    let _ = socket.send(Message::Binary(error.encode().into())).await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: 4001,
            reason: reason.chars().take(100).collect::<String>().into(),
        })))
        .await;
}

async fn connection(relay: Arc<Relay>, socket: WebSocket, conn: ConnId, agent: Arc<Agent>) {
    let (mut sink, mut stream) = socket.split();
    // Handshake: the first message must be `join`.
    let join = tokio::time::timeout(relay.config.handshake_timeout, stream.next()).await;
    let peer_id = match join {
        Ok(Some(Ok(Message::Binary(frame)))) => match WireMessage::decode(&frame) {
            Ok(WireMessage::Join { sender_id, supported_protocol_versions, .. }) => {
                if !supported_protocol_versions.iter().any(|v| v == "1") {
                    let m = WireMessage::Error {
                        sender_id: relay.peer_id.clone(),
                        target_id: sender_id,
                        message: "unsupported protocol version".into(),
                    };
                    let _ = sink.send(Message::Binary(m.encode().into())).await;
                    return;
                }
                sender_id
            }
            _ => {
                let m = WireMessage::Error {
                    sender_id: relay.peer_id.clone(),
                    target_id: String::new(),
                    message: "expected a join message first".into(),
                };
                let _ = sink.send(Message::Binary(m.encode().into())).await;
                return;
            }
        },
        _ => return,
    };
    let peer = WireMessage::Peer {
        sender_id: relay.peer_id.clone(),
        target_id: peer_id.clone(),
        peer_metadata: PeerMetadata { storage_id: Some(relay.storage_id.clone()), is_ephemeral: false },
        selected_protocol_version: "1".into(),
    };
    // Registered before the client hears `peer`: conversations created from now on are announced.
    let (tx, mut rx) = mpsc::channel::<WireMessage>(relay.config.outbound_queue);
    let overloaded = Arc::new(Notify::new());
    let session = Session {
        conn,
        agent: agent.clone(),
        peer_id: peer_id.clone(),
        tx,
        overloaded: overloaded.clone(),
        pending: Arc::default(),
        queued: Arc::default(),
    };
    relay.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(conn, session.clone());
    if sink.send(Message::Binary(peer.encode().into())).await.is_err() {
        relay.disconnect(conn, &HashSet::new()).await;
        return;
    }
    debug!(%peer_id, "joined");

    let keepalive = relay.config.keepalive;
    let mut stop = relay.stop.clone();
    let queued = session.queued.clone();
    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(keepalive);
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => {
                        queued.fetch_sub(queued_size(&m), Ordering::Relaxed);
                        if sink.send(Message::Binary(m.encode().into())).await.is_err() { break }
                    }
                    None => break,
                },
                _ = ping.tick() => if sink.send(Message::Ping(Vec::new().into())).await.is_err() { break },
                _ = stopped(&mut stop) => {
                    let _ = sink.send(Message::Close(Some(CloseFrame { code: 1001, reason: "relay shutting down".into() }))).await;
                    break;
                }
            }
        }
    });

    let mut touched: HashSet<String> = HashSet::new();
    let mut stop = relay.stop.clone();
    let mut strikes = 0;
    let mut ephemeral_budget = EphemeralBudget::new(Instant::now());
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(keepalive * 3, stream.next()) => f,
            _ = overloaded.notified() => {
                warn!("connection too slow; dropped (it will resync on reconnect)");
                break;
            }
            _ = stopped(&mut stop) => break,
        };
        let message = match frame {
            Err(_) => {
                debug!("silent for too long; dropped");
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                debug!(%e, "connection error");
                break;
            }
            Ok(Some(Ok(m))) => m,
        };
        let frame = match message {
            Message::Binary(b) => b,
            Message::Text(_) => {
                session.error(&relay.peer_id, "text frames are not part of the protocol; send binary CBOR");
                strikes += 1;
                if strikes > 10 {
                    break;
                }
                continue;
            }
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        match WireMessage::decode(&frame) {
            Ok(WireMessage::Request { document_id, data, .. }) => {
                touched.insert(document_id.clone());
                // Boxed: the connection's own future stays small (a few hundred bytes for each of
                // a thousand idle connections, instead of the largest message handler's state).
                Box::pin(relay.handle_sync(&session, document_id.clone(), data, true)).await;
                relay.touch(&document_id).await;
            }
            Ok(WireMessage::Sync { document_id, data, .. }) => {
                touched.insert(document_id.clone());
                Box::pin(relay.handle_sync(&session, document_id.clone(), data, false)).await;
                relay.touch(&document_id).await;
            }
            Ok(WireMessage::Ephemeral { document_id, count, session_id, data, .. }) => {
                if data.len() > MAX_EPHEMERAL_BYTES {
                    let limit = format!(
                        "ephemeral messages are limited to {} KiB; this one was dropped",
                        MAX_EPHEMERAL_BYTES / 1024
                    );
                    session.error(&relay.peer_id, limit);
                    continue;
                }
                match ephemeral_budget.take(Instant::now()) {
                    Budget::Granted => {
                        Box::pin(relay.handle_ephemeral(&session, document_id, count, session_id, data)).await
                    }
                    Budget::Refused { tell } => {
                        if tell {
                            let rate = format!(
                                "too many ephemeral messages (at most {EPHEMERAL_PER_SECOND} a second); some were dropped"
                            );
                            session.error(&relay.peer_id, rate);
                        }
                    }
                }
            }
            Ok(WireMessage::Join { .. } | WireMessage::Peer { .. }) => {
                session.error(&relay.peer_id, "already joined");
            }
            Ok(WireMessage::Error { message, .. }) => debug!(%message, "peer reported an error"),
            Ok(WireMessage::DocUnavailable { .. } | WireMessage::Other { .. }) => {}
            Err(e) => {
                session.error(&relay.peer_id, format!("malformed message: {e}"));
                strikes += 1;
                if strikes > 10 {
                    warn!("too many malformed messages; dropped");
                    break;
                }
            }
        }
    }
    relay.disconnect(conn, &touched).await;
    drop(session);
    writer.abort();
    debug!("disconnected");
}

pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped at once, so this future stays `Send`.
    let _ = rx.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::{
        Agent, Arc, Budget, EphemeralBudget, MAX_QUEUED_BYTES, Notify, Ordering, Recent, Session, WireMessage, mpsc,
    };
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn a_connection_queues_at_most_its_byte_budget() {
        let (tx, mut rx) = mpsc::channel(1024);
        let overloaded = Arc::new(Notify::new());
        let agent = Agent { id: "bob".into(), name: "Bob".into(), teams: Vec::new() };
        let session = Session {
            conn: 1,
            agent: Arc::new(agent),
            peer_id: "p".into(),
            tx,
            overloaded: overloaded.clone(),
            pending: Arc::default(),
            queued: Arc::default(),
        };
        let whole = |n: u8| WireMessage::Sync {
            sender_id: "relay".into(),
            target_id: "p".into(),
            document_id: "d".into(),
            data: vec![n; 8 * 1024 * 1024],
        };
        for n in 0..7 {
            session.send(whole(n));
        }
        assert!(session.queued.load(Ordering::Relaxed) <= MAX_QUEUED_BYTES);
        session.send(whole(7));
        // The eighth copy does not fit: the connection is told to close, nothing more is queued.
        tokio::time::timeout(std::time::Duration::from_secs(1), overloaded.notified()).await.unwrap();
        assert!(session.queued.load(Ordering::Relaxed) <= MAX_QUEUED_BYTES);
        let mut count = 0;
        while rx.try_recv().is_ok() {
            count += 1;
        }
        assert_eq!(count, 7);
    }

    #[test]
    fn recent_evicts_the_least_recently_used_beyond_the_limit() {
        let mut r = Recent::default();
        assert!(r.touch("a", 1, 2).is_empty());
        assert!(r.touch("b", 2, 2).is_empty());
        // "a" used again: "b" is now the oldest.
        assert!(r.touch("a", 3, 2).is_empty());
        assert_eq!(r.touch("c", 4, 2), ["b"]);
        r.remove("a");
        assert!(r.touch("d", 5, 2).is_empty());
        assert_eq!(r.touch("e", 6, 2), ["c"]);
        assert_eq!(r.tick_of.len(), 2);
        assert_eq!(r.by_tick.len(), 2);
    }

    #[test]
    fn ephemeral_budget_allows_a_burst_then_the_rate_and_tells_once_a_second() {
        let start = Instant::now();
        let mut b = EphemeralBudget::new(start);
        let granted = (0..100).filter(|_| matches!(b.take(start), Budget::Granted)).count();
        assert_eq!(granted, 50, "the burst");
        // Of the refusals at the same instant, only the first tells the sender.
        let told = (0..10).filter(|_| matches!(b.take(start), Budget::Refused { tell: true })).count();
        assert_eq!(told, 0, "already told at the first refusal");
        // Half a second later: ten more.
        let later = start + Duration::from_millis(500);
        let granted = (0..10).filter(|_| matches!(b.take(later), Budget::Granted)).count();
        assert_eq!(granted, 10);
        assert!(matches!(b.take(later), Budget::Refused { tell: false }), "told less than a second ago");
        // 1.1 s after the first refusal: twelve more, then the sender is told again.
        let again = start + Duration::from_millis(1_100);
        let granted = (0..12).filter(|_| matches!(b.take(again), Budget::Granted)).count();
        assert_eq!(granted, 12);
        assert!(matches!(b.take(again), Budget::Refused { tell: true }));
    }
}
