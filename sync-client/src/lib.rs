//! Keeps a replica in sync with the relay: fetches the agent's teams, connects over WebSocket,
//! runs the sans-IO `ClientSession`, reconnects with backoff and jitter after any failure (sleep,
//! lost network, relay restart), and publishes the sync status (online, unsynced changes).

use crewdesk::domain::ConversationId;
use crewdesk::domain::Team;
use crewdesk::replica::Replica;
use crewdesk::sync::session::{ClientSession, SessionEvent};
use crewdesk::sync::wire::WireMessage;
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};

/// What the app shows: online or offline, and how many local changes the relay has not yet
/// made durable.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncStatus {
    pub connected: bool,
    pub unsynced_changes: usize,
    /// Attachments picked here that the relay does not have yet.
    pub pending_uploads: usize,
    pub last_error: Option<String>,
    /// The relay refused the token (revoked, or unknown): the driver stopped and does not retry
    /// until the agent signs in again (a new `SyncClient` with a new token).
    pub signed_out: bool,
    /// Conversations still to compare with the relay after connecting (each is offered once).
    #[serde(default)]
    pub checking: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("signed out: token revoked or unknown; ask an admin for a new token and sign in again")]
    Unauthorized,
    #[error("cannot reach the relay: {0}")]
    Unreachable(String),
    #[error("the relay answered something unexpected: {0}")]
    Protocol(String),
    #[error(transparent)]
    Replica(#[from] crewdesk::replica::ReplicaError),
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `http://host:port` of the relay.
    pub relay_url: String,
    pub token: String,
    /// Backoff bounds between reconnects (doubling, with jitter).
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// The local blob store (files named by their sha256) that queued attachments are read from.
    pub blob_dir: Option<std::path::PathBuf>,
    /// When set, the driver connects once this is notified, or after [`START_WAIT`] at most: the
    /// desk lets it go when the window has drawn its first list. Connecting compares every
    /// conversation with the relay, which at 10,000 conversations would compete with the window's
    /// start for the CPU.
    pub start: Option<Arc<Notify>>,
}

/// The longest the driver waits for [`ClientConfig::start`].
pub const START_WAIT: Duration = Duration::from_secs(2);

impl ClientConfig {
    pub fn new(relay_url: impl Into<String>, token: impl Into<String>) -> ClientConfig {
        ClientConfig {
            relay_url: relay_url.into().trim_end_matches('/').to_owned(),
            token: token.into(),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            blob_dir: None,
            start: None,
        }
    }
}

pub type SharedReplica = Arc<Mutex<Replica>>;

/// The relay's close code for a token it no longer accepts (`sync_server::relay::close::SIGNED_OUT`).
const SIGNED_OUT: u16 = 4001;

/// How long a conversation waits before it is offered again after the relay could not serve it.
const RETRY_LATER: Duration = Duration::from_secs(3);

/// How long the connection may stay silent before it counts as lost (the relay pings every 5 s).
const SILENCE_LIMIT: Duration = Duration::from_secs(20);

/// A running sync driver. Dropping it stops syncing.
/// What the desk tells the driver.
#[derive(Debug)]
enum Local {
    /// A conversation changed locally.
    Changed(ConversationId),
    /// The agent is typing in a conversation.
    Typing(ConversationId),
}

pub struct SyncClient {
    status: watch::Receiver<SyncStatus>,
    upload_wake: Arc<Notify>,
    changed: mpsc::Sender<Local>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl SyncClient {
    /// Starts syncing `replica` with the relay. `events` receives what the relay changed.
    pub fn spawn(config: ClientConfig, replica: SharedReplica, events: mpsc::Sender<SessionEvent>) -> SyncClient {
        let (status_tx, status) = watch::channel(SyncStatus::default());
        let status_tx = Arc::new(status_tx);
        let (changed, changed_rx) = mpsc::channel(1024);
        let (stop, stop_rx) = watch::channel(false);
        let upload_wake = Arc::new(Notify::new());
        tokio::spawn(uploader(
            config.clone(),
            replica.clone(),
            status_tx.clone(),
            status.clone(),
            upload_wake.clone(),
            stop_rx.clone(),
        ));
        let task = tokio::spawn(drive(config, replica, events, status_tx, changed_rx, stop_rx));
        SyncClient { status, upload_wake, changed, stop, task }
    }

    /// Tells the uploader an attachment was queued, so it goes now (or once online).
    pub fn upload_now(&self) {
        self.upload_wake.notify_one();
    }

    /// Tells the driver a conversation changed locally, so it is sent now (or after reconnect).
    pub fn changed(&self, id: ConversationId) {
        // A full queue only delays: everything is offered again on the next connection.
        let _ = self.changed.try_send(Local::Changed(id));
    }

    /// Tells the conversation's followers that this agent is typing (dropped while offline or
    /// when the queue is full: typing is not worth keeping).
    pub fn typing(&self, id: ConversationId) {
        let _ = self.changed.try_send(Local::Typing(id));
    }

    pub fn status(&self) -> watch::Receiver<SyncStatus> {
        self.status.clone()
    }

    /// Stops syncing (signing out) without waiting for the driver to finish.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn lock(replica: &SharedReplica) -> std::sync::MutexGuard<'_, Replica> {
    replica.lock().unwrap_or_else(|p| p.into_inner())
}

/// Conversations offered in a row after connecting before the relay's frames are read again.
const OFFER_BATCH: usize = 16;
/// How often the count of conversations still to check is published while connecting.
const CHECKING_STEP: usize = 512;

async fn drive(
    config: ClientConfig,
    replica: SharedReplica,
    events: mpsc::Sender<SessionEvent>,
    status: Arc<watch::Sender<SyncStatus>>,
    mut changed: mpsc::Receiver<Local>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = config.min_backoff;
    let peer_id = format!("crewdesk-replica-{}", lock(&replica).agent());
    if let Some(start) = &config.start {
        tokio::select! {
            _ = start.notified() => {}
            _ = tokio::time::sleep(START_WAIT) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
    loop {
        let result = tokio::select! {
            r = session(&config, &replica, &events, &status, &mut changed, &peer_id, &mut backoff) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let error = match result {
            Ok(()) => None,
            Err(ClientError::Unauthorized) => {
                // Retrying with the same token cannot help: stop until the agent signs in again.
                warn!("signed out: the relay refused the token; not retrying");
                publish(&status, &replica, false, Some(ClientError::Unauthorized.to_string()));
                status.send_modify(|st| st.signed_out = true);
                return;
            }
            Err(e) => {
                warn!(%e, "sync connection ended");
                Some(e.to_string())
            }
        };
        publish(&status, &replica, false, error);
        let jitter = rand::rng().random_range(0.5..1.5);
        let sleep = tokio::time::sleep(backoff.mul_f64(jitter));
        tokio::pin!(sleep);
        backoff = (backoff * 2).min(config.max_backoff);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                // Offline changes: keep the count of unsynced changes current.
                Some(_) = changed.recv() => publish(&status, &replica, false, None),
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct Me {
    teams: Vec<Team>,
    documents: Vec<String>,
}

async fn session(
    config: &ClientConfig,
    replica: &SharedReplica,
    events: &mpsc::Sender<SessionEvent>,
    status: &watch::Sender<SyncStatus>,
    changed: &mut mpsc::Receiver<Local>,
    peer_id: &str,
    backoff: &mut Duration,
) -> Result<(), ClientError> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    // The token goes in the Authorization header, never in the URL (proxies log URLs).
    let ws_url = format!("{}/", config.relay_url.replacen("http", "ws", 1));
    let mut request = ws_url.into_client_request().map_err(|e| ClientError::Unreachable(e.to_string()))?;
    let bearer = format!("Bearer {}", config.token)
        .parse()
        .map_err(|_| ClientError::Protocol("the token holds characters a header cannot carry".into()))?;
    request.headers_mut().insert("authorization", bearer);
    // TCP_NODELAY: a change goes out at once, not after the relay's delayed acknowledgement.
    let (ws, _) = tokio_tungstenite::connect_async_with_config(request, None, true)
        .await
        .map_err(|e| ClientError::Unreachable(e.to_string()))?;
    let (mut sink, mut stream) = ws.split();
    let mut s = ClientSession::new(peer_id);
    send(&mut sink, s.join()).await?;
    // Handshake.
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .map_err(|_| ClientError::Unreachable("no answer to join".into()))?;
        match frame {
            Some(Ok(Message::Binary(b))) => {
                let m = WireMessage::decode(&b).map_err(|e| ClientError::Protocol(e.to_string()))?;
                if let WireMessage::Error { message, .. } = &m {
                    return Err(if message.contains("authentication") {
                        ClientError::Unauthorized
                    } else {
                        ClientError::Protocol(message.clone())
                    });
                }
                let (_, evs) = s.receive(&mut lock(replica), m)?;
                if evs.iter().any(|e| matches!(e, SessionEvent::Connected { .. })) {
                    break;
                }
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(ClientError::Unreachable(e.to_string())),
            None => return Err(ClientError::Unreachable("closed during handshake".into())),
        }
    }
    // Teams and roles come from the relay, which is their truth. Asked only after the handshake:
    // the relay announces conversations created from then on, and this list has the older ones.
    let me = reqwest::Client::new()
        .get(format!("{}/api/me", config.relay_url))
        .bearer_auth(&config.token)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| ClientError::Unreachable(e.to_string()))?;
    if me.status() == reqwest::StatusCode::UNAUTHORIZED {
        return Err(ClientError::Unauthorized);
    }
    let me: Me = me
        .error_for_status()
        .map_err(|e| ClientError::Protocol(e.to_string()))?
        .json()
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    lock(replica).set_teams(me.teams)?;

    info!("connected to the relay");
    *backoff = config.min_backoff;
    let documents: Vec<ConversationId> = me.documents.into_iter().map(ConversationId).collect();
    // Every conversation is offered, a few at a time between the relay's frames: the replica is
    // never held for the whole loop (the window reads it meanwhile), and the relay's answers are
    // read while the offers go out.
    let mut to_offer: std::collections::VecDeque<ConversationId> =
        ClientSession::to_offer(&lock(replica), &documents)?.into();
    set_checking(status, to_offer.len());
    publish(status, replica, true, None);
    let (retry_tx, mut retry_rx) = mpsc::channel::<ConversationId>(256);
    loop {
        tokio::select! {
            biased;
            // The relay pings every few seconds: silence this long means the connection is gone
            // (a laptop that slept, a network that vanished) even if the socket never says so.
            frame = tokio::time::timeout(SILENCE_LIMIT, stream.next()) => {
                let Ok(frame) = frame else {
                    return Err(ClientError::Unreachable("no word from the relay for 20 s".into()));
                };
                let b = match frame {
                    Some(Ok(Message::Binary(b))) => b,
                    // 4001: the token was revoked while connected.
                    Some(Ok(Message::Close(Some(close)))) if u16::from(close.code) == SIGNED_OUT => return Err(ClientError::Unauthorized),
                    Some(Ok(Message::Close(_))) | None => return Err(ClientError::Unreachable("the relay closed the connection".into())),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(ClientError::Unreachable(e.to_string())),
                };
                let m = match WireMessage::decode(&b) {
                    Ok(m) => m,
                    Err(e) => { debug!(%e, "undecodable frame from the relay"); continue; }
                };
                let (out, evs) = s.receive(&mut lock(replica), m)?;
                for m in out {
                    send(&mut sink, m).await?;
                }
                let mut error = None;
                for e in evs {
                    if let SessionEvent::RelayError(message) = &e {
                        error = Some(message.clone());
                    }
                    if let SessionEvent::RetryLater(id) = &e {
                        // The relay could not serve it just now: offered again in a few seconds.
                        let (retry, id) = (retry_tx.clone(), id.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(RETRY_LATER).await;
                            let _ = retry.send(id).await;
                        });
                        continue;
                    }
                    let _ = events.try_send(e);
                }
                publish(status, replica, true, error);
            }
            Some(id) = retry_rx.recv() => {
                let offer = s.offer(&mut lock(replica), &id)?;
                if let Some(m) = offer {
                    send(&mut sink, m).await?;
                }
            }
            local = changed.recv() => match local {
                None => return Ok(()),
                Some(Local::Changed(id)) => {
                    let offer = s.offer(&mut lock(replica), &id)?;
                    if let Some(m) = offer {
                        send(&mut sink, m).await?;
                    }
                    publish(status, replica, true, None);
                }
                Some(Local::Typing(id)) => {
                    let agent = lock(replica).agent().clone();
                    if let Some(m) = s.typing(&agent, &id) {
                        send(&mut sink, m).await?;
                    }
                }
            },
            () = std::future::ready(()), if !to_offer.is_empty() => {
                let batch: Vec<ConversationId> = to_offer.drain(..to_offer.len().min(OFFER_BATCH)).collect();
                for id in batch {
                    let offer = s.offer(&mut lock(replica), &id)?;
                    if let Some(m) = offer {
                        send(&mut sink, m).await?;
                    }
                }
                // The count shown moves in steps (each step is an event to the window).
                if to_offer.len() % CHECKING_STEP < OFFER_BATCH || to_offer.is_empty() {
                    set_checking(status, to_offer.len());
                }
                if to_offer.is_empty() {
                    publish(status, replica, true, None);
                }
            }
        }
    }
}

fn publish(status: &watch::Sender<SyncStatus>, replica: &SharedReplica, connected: bool, error: Option<String>) {
    let unsynced = lock(replica).unsynced().map_or(0, |(n, _)| n);
    let pending_uploads = lock(replica).pending_blob_uploads().map_or(0, |p| p.len());
    status.send_if_modified(|st| {
        let next = SyncStatus {
            connected,
            unsynced_changes: unsynced,
            pending_uploads,
            last_error: error.or_else(|| st.last_error.clone()),
            signed_out: st.signed_out,
            checking: if connected { st.checking } else { 0 },
        };
        let modified = *st != next;
        *st = next;
        modified
    });
}

fn set_checking(status: &watch::Sender<SyncStatus>, n: usize) {
    status.send_if_modified(|st| std::mem::replace(&mut st.checking, n) != n);
}

async fn send<S>(sink: &mut S, m: WireMessage) -> Result<(), ClientError>
where
    S: SinkExt<Message> + Unpin,
    S::Error: std::fmt::Display,
{
    sink.send(Message::Binary(m.encode().into())).await.map_err(|e| ClientError::Unreachable(e.to_string()))
}

/// Uploads queued attachments to the relay's blob store whenever connected: picked offline, they
/// go out once the relay is reachable. A refusal (too large, wrong type) is final and reported.
async fn uploader(
    config: ClientConfig,
    replica: SharedReplica,
    status: Arc<watch::Sender<SyncStatus>>,
    mut connected: watch::Receiver<SyncStatus>,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(dir) = config.blob_dir.clone() else { return };
    // Idle connections are let go before the relay closes them (it closes a connection that sends
    // no request for 5 s), so an upload never goes out on a connection that is being closed.
    let Ok(client) =
        reqwest::Client::builder().timeout(Duration::from_secs(120)).pool_idle_timeout(Duration::from_secs(3)).build()
    else {
        return;
    };
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = connected.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !connected.borrow().connected {
            continue;
        }
        let Ok(pending) = lock(&replica).pending_blob_uploads() else { continue };
        for (doc, hash, mime) in pending {
            let mut error = None;
            let done = match tokio::fs::read(dir.join(hash.as_str())).await {
                Err(e) => {
                    error = Some(format!("an attachment cannot be uploaded: its local file is gone ({e})"));
                    true
                }
                Ok(bytes) => {
                    let url = format!("{}/api/conversations/{}/blobs/{hash}", config.relay_url, doc.as_str());
                    let sent = client
                        .put(url)
                        .bearer_auth(&config.token)
                        .header(reqwest::header::CONTENT_TYPE, mime.as_str())
                        .body(bytes)
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().is_success() => true,
                        // The conversation has not reached the relay yet: try again later.
                        Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => false,
                        Ok(r)
                            if r.status().is_client_error() && r.status() != reqwest::StatusCode::TOO_MANY_REQUESTS =>
                        {
                            let body: serde_json::Value = r.json().await.unwrap_or_default();
                            let why = body["error"].as_str().unwrap_or("refused").to_owned();
                            error = Some(format!("the relay refused an attachment: {why}"));
                            true
                        }
                        Ok(r) => {
                            warn!(status = %r.status(), "attachment upload failed; will retry");
                            false
                        }
                        Err(e) => {
                            warn!(%e, "attachment upload failed; will retry");
                            false
                        }
                    }
                }
            };
            if done && let Err(e) = lock(&replica).blob_upload_done(&doc, &hash) {
                warn!(%e, "upload queue not updated");
            }
            let pending_uploads = lock(&replica).pending_blob_uploads().map_or(0, |p| p.len());
            status.send_if_modified(|st| {
                let modified = st.pending_uploads != pending_uploads || error.is_some();
                st.pending_uploads = pending_uploads;
                if let Some(e) = error.take() {
                    st.last_error = Some(e);
                }
                modified
            });
        }
    }
}

/// Replaces a team's 📃 templates on the relay (its admins only); answers the list the relay saved.
/// A refusal comes back with the relay's reason.
pub async fn save_templates(
    config: &ClientConfig,
    team: &crewdesk::domain::TeamId,
    templates: &[crewdesk::domain::MessageTemplate],
) -> Result<Vec<crewdesk::domain::MessageTemplate>, ClientError> {
    #[derive(serde::Deserialize)]
    struct Saved {
        templates: Vec<crewdesk::domain::MessageTemplate>,
    }
    let r = reqwest::Client::new()
        .put(format!("{}/api/teams/{}/templates", config.relay_url, team.as_str()))
        .bearer_auth(&config.token)
        .json(&serde_json::json!({ "templates": templates }))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| ClientError::Unreachable(e.to_string()))?;
    match r.status() {
        reqwest::StatusCode::UNAUTHORIZED => Err(ClientError::Unauthorized),
        s if s.is_success() => Ok(r.json::<Saved>().await.map_err(|e| ClientError::Protocol(e.to_string()))?.templates),
        s => {
            let why = r.json::<serde_json::Value>().await.ok();
            let why = why.as_ref().and_then(|v| v["error"].as_str()).map_or_else(|| s.to_string(), str::to_owned);
            Err(ClientError::Protocol(why))
        }
    }
}

/// Downloads an attachment (or its thumbnail) sent in a conversation; full files are checked
/// against their hash.
pub async fn download_blob(
    config: &ClientConfig,
    doc: &ConversationId,
    hash: &crewdesk::domain::attachment::BlobHash,
    thumbnail: bool,
) -> Result<Vec<u8>, ClientError> {
    let mut url = format!("{}/api/conversations/{}/blobs/{hash}", config.relay_url, doc.as_str());
    if thumbnail {
        url.push_str("?thumbnail=1");
    }
    let r = reqwest::Client::new()
        .get(url)
        .bearer_auth(&config.token)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .map_err(|e| ClientError::Unreachable(e.to_string()))?;
    if r.status() == reqwest::StatusCode::NOT_FOUND {
        return Err(ClientError::Protocol("the relay does not have this attachment (yet)".into()));
    }
    let bytes = r.error_for_status().map_err(|e| ClientError::Protocol(e.to_string()))?.bytes().await;
    let bytes = bytes.map_err(|e| ClientError::Unreachable(e.to_string()))?.to_vec();
    if !thumbnail && crewdesk::domain::attachment::BlobHash::of(&bytes) != *hash {
        return Err(ClientError::Protocol("the downloaded attachment does not match its hash".into()));
    }
    Ok(bytes)
}
