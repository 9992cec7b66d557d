//! The relay's IO: connections and documents. What a sync message does to a document is decided
//! by the core (`crewdesk::sync::relay_doc::RelayDoc`, sans IO, driven step by step by the
//! simulator in `tests/sim`); these modules only read and write around it:
//! - `mod.rs` — the server (accept loop, routes, `/health`, `/api/me`), the shared `Relay`;
//! - `gate` — connection caps (global, per address), body deadlines, the answer over the caps;
//! - `access` — signing in (token cache, failed sign-ins per address), revocation reaching open
//!   connections;
//! - `connection` — one agent's WebSocket: handshake, reader, writer, byte budget, keepalive, the
//!   reasons it is closed with;
//! - `documents` — each document under its own lock: loading, the facts the judge needs, carrying
//!   out the core's actions, grab decisions, eviction;
//! - `commit` — the group commit (one transaction and fsync for everything waiting);
//! - `instances` — other relay instances on the same PostgreSQL store;
//! - `presence` — customers' presence and ephemeral messages;
//! - `channels` — what the widget, WhatsApp and email fallback read and write.

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
use crewdesk::sync::relay_doc::{Action, Claim, Incoming, RelayDoc, WaitingBudget};
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

mod access;
mod channels;
mod commit;
mod connection;
mod documents;
pub(crate) mod gate;
mod instances;
mod presence;

pub(crate) use access::SignInError;
use access::*;
use commit::*;
use connection::*;
use documents::*;
use instances::*;
use presence::*;

type ConnId = u64;

/// Serves the relay on `listener` until `shutdown` completes, then closes every connection.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Refused before anything is opened: the error says which setting to fix.
    let smtp = config.check()?;
    let mail_transport = match &smtp {
        Some(s) => Some(
            crate::mailer::transport(s, config.smtp_password.clone())
                .map_err(|e| anyhow::anyhow!("the SMTP server {} cannot be used: {e}", s.host))?,
        ),
        None => None,
    };
    let url = config.store_url()?;
    // Attachments (and, on SQLite, the database) live here: only the relay's user may read them.
    crate::private::dir(&config.data_dir)
        .map_err(|e| anyhow::anyhow!("cannot create the data directory {}: {e}", config.data_dir.display()))?;
    let store = Arc::new(tokio::task::spawn_blocking(move || Store::connect(&url)).await??);
    let s = store.clone();
    let storage_id = tokio::task::spawn_blocking(move || s.storage_id()).await??;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (commits, commit_rx) = mpsc::channel(4096);
    tokio::spawn(committer(store.clone(), commit_rx));
    let mail_wake = Arc::new(Notify::new());
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
        email_senders: crate::limits::Limiter::new(
            crate::email::MAILS_PER_SENDER_PER_HOUR,
            std::time::Duration::from_secs(3600),
        ),
        refusals: crate::limits::Limiter::new(MAX_REFUSALS, std::time::Duration::from_secs(60)),
        team_cache: Mutex::default(),
        // Two decoding threads (of the machine's few cores) and eight images waiting at most.
        images: crate::images::ImagePool::new(2, 8),
        commits,
        shared: store.backend() == "postgres",
        store,
        gate: gate::Gate::new(&config),
        credentials: Credentials::default(),
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
    tokio::spawn(crate::mailer::run(
        relay.clone(),
        relay.config.blob_dir(),
        mail_transport,
        relay.config.mail_from.clone(),
        relay.mail_wake.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn(crate::email::run(relay.clone(), stop_rx.clone()));
    tokio::spawn(watch_access(relay.clone(), stop_rx.clone()));
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
        .merge(crate::templates::routes())
        .with_state(relay.clone());
    info!(addr = %listener.local_addr()?, data = %relay.config.data_dir.display(), "relay listening");
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let busy_app = Router::new().route("/health", get(health)).fallback(gate::busy).with_state(relay.clone());
    serve(listener, app, busy_app, relay.clone(), stop_rx).await;
    info!("relay stopped");
    Ok(())
}

/// Serves HTTP/1.1 with WebSocket upgrades until `stop`. Unlike `axum::serve`, a connection that has
/// not sent a whole request head within `head_timeout` is closed, so idle or trickling connections
/// (slowloris) cannot pile up and take every file descriptor; request bodies must keep a minimum
/// rate (`gate::TimedBody`); connections over the caps (`gate::Gate`) get `busy_app` (`/health`
/// and a 503 saying why) or, beyond that, a 503 written at once. On `stop`, connections finish
/// their request (at most 5 s); upgraded WebSockets close themselves on the same signal.
async fn serve(
    listener: TcpListener,
    app: Router,
    busy_app: Router,
    relay: Arc<Relay>,
    mut stop: watch::Receiver<bool>,
) {
    use tower::Service;
    let head_timeout = relay.config.handshake_timeout;
    let (grace, min_rate) = (relay.config.body_timeout, relay.config.min_body_rate as u64);
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
        let permit = match relay.gate.admit(remote.ip()) {
            gate::Admission::Admitted(permit) => permit,
            gate::Admission::Busy(guard, why) => {
                tokio::spawn(gate::turn_away(tcp, remote, busy_app.clone(), why, guard));
                continue;
            }
            gate::Admission::Refused(why) => {
                gate::refuse_at_once(tcp, &why);
                continue;
            }
        };
        // Small frames go out at once: with Nagle's algorithm a fan-out message can wait for the
        // peer's delayed acknowledgement (tens of milliseconds).
        if let Err(err) = tcp.set_nodelay(true) {
            debug!(%err, "TCP_NODELAY not set");
        }
        let app = app.clone();
        let held = gate::Held(permit);
        let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let mut request = request.map(|body| axum::body::Body::new(gate::TimedBody::new(body, grace, min_rate)));
            request.extensions_mut().insert(axum::extract::ConnectInfo(remote));
            request.extensions_mut().insert(held.clone());
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

/// A team's mode and members as the judge needs them, and when they were read.
type TeamRules = (TeamMode, Arc<Vec<crewdesk::domain::Member>>, Instant);

pub struct Relay {
    store: Arc<Store>,
    /// Open connections under the global and per-address caps.
    gate: Arc<gate::Gate>,
    /// Signed-in tokens (cached, dropped when access changes) and failed sign-ins per address.
    credentials: Credentials,
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
    /// Mails per sender and team (email channel), when the store is not shared.
    email_senders: crate::limits::Limiter<String>,
    /// Changes refused per agent (a minute): one that keeps sending changes the judge refuses is
    /// not read any more (each refusal costs taking the change back out of the conversation).
    refusals: crate::limits::Limiter<AgentId>,
    /// Decodes uploaded images for their thumbnails, apart from the blocking threads.
    pub(crate) images: crate::images::ImagePool,
    /// Each team's mode (open or grab) and members, and when they were read, for the judge of
    /// changes.
    team_cache: Mutex<HashMap<TeamId, TeamRules>>,
    /// Which agent each automerge actor id (hex) is bound to, as far as this instance has seen.
    actors: Mutex<HashMap<String, AgentId>>,
}

/// Changes of one agent the relay refuses in a minute before it stops reading them (close
/// `TOO_MANY_REFUSALS`). An honest desk gets a handful when the rules changed while it was offline.
pub(crate) const MAX_REFUSALS: usize = 30;

/// Who the relay's own actors are bound to (not a valid agent id: it holds parentheses and a
/// space-free word no admin command creates).
const RELAY_ACTOR_OWNER: &str = "(relay)";

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

async fn health(State(relay): State<Arc<Relay>>) -> impl IntoResponse {
    let connections = relay.sessions.lock().map(|s| s.len()).unwrap_or(0);
    let documents = relay.docs.lock().map(|d| d.len()).unwrap_or(0);
    axum::Json(serde_json::json!({
        "status": "ok",
        "store": relay.store.backend(),
        "connections": connections,
        "open_connections": relay.gate.open(),
        "token_lookups": relay.credentials.lookups.load(Ordering::Relaxed),
        "documents_loaded": documents,
    }))
}

/// The signed-in agent, their teams (membership and roles as the relay knows them) and the ids of
/// their teams' conversations: what a replica needs to mirror before syncing.
async fn me(
    State(relay): State<Arc<Relay>>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
) -> Response {
    let from = relay.client_address(peer.ip(), &headers);
    let agent = match relay.sign_in(bearer(&headers, &q), from).await {
        Ok(signed_in) => signed_in.agent,
        Err(e) => return (e.status(), e.to_string()).into_response(),
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

pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped at once, so this future stays `Send`.
    let _ = rx.wait_for(|s| *s).await;
}

impl Relay {
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

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub(crate) fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.clone()
    }
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
            waiting: crewdesk::sync::relay_doc::WaitingBudget::new(),
            queued: Arc::default(),
            token_hash: "h".into(),
            hangup: Arc::default(),
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
