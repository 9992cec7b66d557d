//! One WebSocket connection of a signed-in agent: the handshake, the reader that hands frames to
//! the documents, the writer with its byte budget, keepalive and closing.

#[allow(unused_imports)]
use super::*;

/// What the relay knows of one connection, shared with the documents it syncs.
#[derive(Clone)]
pub(super) struct Session {
    pub(super) conn: ConnId,
    pub(super) agent: Arc<Agent>,
    pub(super) peer_id: String,
    pub(super) tx: mpsc::Sender<WireMessage>,
    pub(super) overloaded: Arc<Notify>,
    /// Documents this connection is creating (see `MAX_PENDING_PER_CONNECTION`).
    pub(super) pending: Arc<AtomicUsize>,
    /// What this connection's changes waiting for dependencies hold, across all documents.
    pub(super) waiting: WaitingBudget,
    /// Bytes queued for this connection and not yet written (see `MAX_QUEUED_BYTES`).
    pub(super) queued: Arc<AtomicUsize>,
    /// The SHA-256 of the token it signed in with (checked again when access changes).
    pub(super) token_hash: Arc<str>,
    /// Set when the relay ends this connection on purpose (a revoked token, a removed agent): the
    /// client is told why before the socket closes.
    pub(super) hangup: Arc<HangupSlot>,
}

/// Why the relay ends a connection: an `error` frame (if any), then a close frame with this code
/// and reason.
#[derive(Clone, Debug)]
pub(super) struct Hangup {
    pub(super) code: u16,
    pub(super) reason: String,
    pub(super) error: Option<String>,
}

/// Close codes of agent connections (4000-4999 are the application's).
pub mod close {
    /// The token is missing, unknown or was revoked (also when revoked while connected): sign in
    /// again; retrying with the same token will not help.
    pub const SIGNED_OUT: u16 = 4001;
    /// The agent's teams or roles changed while connected: reconnect to sync with the new access.
    pub const ACCESS_CHANGED: u16 = 4005;
    /// The agent's changes were refused too often (`MAX_REFUSALS` a minute): the relay stops
    /// reading them for a while; an honest client reconnects later and goes on.
    pub const TOO_MANY_REFUSALS: u16 = 4008;
    /// Too many failed sign-ins from this address: wait a minute.
    pub const TOO_MANY_FAILURES: u16 = 4029;
}

/// Where a `Hangup` waits for the connection's reader.
#[derive(Default)]
pub(super) struct HangupSlot {
    why: Mutex<Option<Hangup>>,
    notify: Notify,
}

impl HangupSlot {
    /// Asks the connection to end; the first reason given is the one the client hears.
    pub(super) fn hang_up(&self, why: Hangup) {
        let mut slot = self.why.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(why);
        }
        drop(slot);
        self.notify.notify_one();
    }

    async fn wait(&self) -> Hangup {
        loop {
            self.notify.notified().await;
            if let Some(why) = self.why.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                return why;
            }
        }
    }
}

/// Message types of automerge-repo that this relay has no use for: received and ignored.
const IGNORED_TYPES: &[&str] = &["leave", "remote-subscription-change", "remote-heads-changed", "doc-unavailable"];

/// The error an unknown message type gets (the type named, at most 64 characters of it).
fn unknown_type(kind: &str) -> String {
    let kind: String = kind.chars().filter(|c| !c.is_control()).take(64).collect();
    format!(
        "unknown message type \"{kind}\"; this relay reads join, request, sync and ephemeral (automerge-repo protocol 1); ignored"
    )
}

/// The close a client gets when it announces a frame larger than the relay reads (1009, "message
/// too big", with the limit).
fn too_big(size: Option<usize>, limit: usize) -> Hangup {
    let reason = match size {
        Some(size) => format!("frame of {size} bytes is over the limit of {limit} bytes"),
        None => format!("message over the limit of {limit} bytes"),
    };
    Hangup { code: 1009, reason, error: None }
}

/// The size a client announced when its frame or message was refused for being too large.
fn oversized(e: &axum::Error) -> Option<Option<usize>> {
    use tungstenite::error::{CapacityError, Error};
    let inner = std::error::Error::source(e)?;
    match inner.downcast_ref::<Error>()? {
        Error::Capacity(CapacityError::MessageTooLong { size, .. }) => Some(Some(*size)),
        Error::Capacity(_) => Some(None),
        _ => None,
    }
}

/// Bytes the relay queues for one connection before it counts as unable to keep up: a client
/// asking again and again for a whole conversation (`request` with no heads) cannot make the relay
/// hold many copies of it.
pub(super) const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

/// About how many bytes a message takes in a connection's queue.
pub(super) fn queued_size(m: &WireMessage) -> usize {
    match m {
        WireMessage::Sync { data, .. } | WireMessage::Request { data, .. } | WireMessage::Ephemeral { data, .. } => {
            data.len() + 128
        }
        _ => 256,
    }
}

impl Session {
    /// Queues a message; a connection that cannot keep up is closed (it resyncs when it comes back).
    pub(super) fn send(&self, message: WireMessage) {
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
    pub(super) fn error(&self, relay_peer: &str, message: impl Into<String>) {
        self.send(WireMessage::Error {
            sender_id: relay_peer.to_owned(),
            target_id: self.peer_id.clone(),
            message: message.into(),
        });
    }
}

pub(super) async fn websocket(
    State(relay): State<Arc<Relay>>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    held: Option<axum::Extension<gate::Held>>,
    ws: WebSocketUpgrade,
) -> Response {
    let from = relay.client_address(peer.ip(), &headers);
    let signed_in = relay.sign_in(bearer(&headers, &q), from).await;
    let max = relay.config.max_frame_bytes;
    // Small per-connection buffers: a thousand idle agents should not cost a thousand large buffers.
    ws.max_message_size(max).max_frame_size(max).read_buffer_size(4 * 1024).write_buffer_size(4 * 1024).on_upgrade(
        move |socket| async move {
            // The connection counts under the caps for as long as the socket is open.
            let _held = held;
            match signed_in {
                Ok(signed_in) => {
                    let conn = relay.next_conn.fetch_add(1, Ordering::Relaxed);
                    let span = info_span!("connection", conn, agent = %signed_in.agent.id);
                    connection(relay, socket, conn, signed_in).instrument(span).await;
                }
                Err(e) => {
                    let code = match e {
                        SignInError::TooManyFailures => close::TOO_MANY_FAILURES,
                        _ => close::SIGNED_OUT,
                    };
                    refuse(socket, code, &e.to_string()).await
                }
            }
        },
    )
}

/// Accepts the upgrade only to say why, then closes (a plain 401 crashes some Node clients).
pub(super) async fn refuse(mut socket: WebSocket, code: u16, reason: &str) {
    let error = WireMessage::Error { sender_id: String::new(), target_id: String::new(), message: reason.to_owned() };
    let _ = socket.send(Message::Binary(error.encode().into())).await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame { code, reason: reason.chars().take(100).collect::<String>().into() })))
        .await;
}

pub(super) async fn connection(relay: Arc<Relay>, socket: WebSocket, conn: ConnId, signed_in: SignedIn) {
    let agent = Arc::new(signed_in.agent);
    let (mut sink, mut stream) = socket.split();
    let error = |target: &str, message: String| {
        let m = WireMessage::Error { sender_id: relay.peer_id.clone(), target_id: target.to_owned(), message };
        Message::Binary(m.encode().into())
    };
    // Handshake: the first message must be `join`, within the handshake timeout.
    let deadline = tokio::time::Instant::now() + relay.config.handshake_timeout;
    let mut strikes = 0;
    let peer_id = loop {
        let frame = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => {
                if let Some(size) = oversized(&e) {
                    let why = too_big(size, relay.config.max_frame_bytes);
                    let _ =
                        sink.send(Message::Close(Some(CloseFrame { code: why.code, reason: why.reason.into() }))).await;
                    linger().await;
                }
                return;
            }
            Ok(None) => return,
            Err(_) => {
                let _ = sink.send(error("", "no join message within the handshake timeout".into())).await;
                return;
            }
        };
        let frame = match frame {
            Message::Binary(frame) => frame,
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => return,
            Message::Text(_) => {
                strikes += 1;
                let _ = sink.send(error("", TEXT_FRAME.into())).await;
                if strikes > 10 {
                    return;
                }
                continue;
            }
        };
        match WireMessage::decode(&frame) {
            Ok(WireMessage::Join { sender_id, supported_protocol_versions, .. }) => {
                if !supported_protocol_versions.iter().any(|v| v == "1") {
                    let _ =
                        sink.send(error(&sender_id, "unsupported protocol version; this relay speaks 1".into())).await;
                    return;
                }
                break sender_id;
            }
            Ok(other) => {
                let kind = match other {
                    WireMessage::Other { kind } => kind,
                    _ => "a message of another type".into(),
                };
                let kind: String = kind.chars().filter(|c| !c.is_control()).take(64).collect();
                let _ = sink.send(error("", format!("expected a join message first, got \"{kind}\""))).await;
                return;
            }
            Err(e) => {
                let _ = sink.send(error("", format!("expected a join message first; malformed message: {e}"))).await;
                return;
            }
        }
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
        waiting: WaitingBudget::new(),
        queued: Arc::default(),
        token_hash: signed_in.token_hash.into(),
        hangup: Arc::default(),
    };
    relay.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(conn, session.clone());
    // Access changed between the sign-in and now (the check of open connections may have missed
    // this one): checked again.
    if relay.access_moved_since(signed_in.version) {
        relay.check_again(std::slice::from_ref(&session)).await;
    }
    if sink.send(Message::Binary(peer.encode().into())).await.is_err() {
        relay.disconnect(conn, &HashSet::new()).await;
        return;
    }
    debug!(%peer_id, "joined");

    let keepalive = relay.config.keepalive;
    let mut stop = relay.stop.clone();
    let queued = session.queued.clone();
    let (close_tx, mut close_rx) = tokio::sync::oneshot::channel::<Hangup>();
    let (relay_peer, target) = (relay.peer_id.clone(), peer_id.clone());
    let mut writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(keepalive);
        loop {
            tokio::select! {
                // A hang-up goes first: the rest of the queue is of no use to a closing connection.
                biased;
                why = &mut close_rx => {
                    if let Ok(why) = why {
                        if let Some(message) = why.error {
                            let m = WireMessage::Error { sender_id: relay_peer.clone(), target_id: target.clone(), message };
                            let _ = sink.send(Message::Binary(m.encode().into())).await;
                        }
                        let _ = sink.send(Message::Close(Some(CloseFrame { code: why.code, reason: why.reason.into() }))).await;
                        if why.code == 1009 {
                            linger().await;
                        }
                    }
                    break;
                }
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
    let mut ephemeral_budget = EphemeralBudget::new(Instant::now());
    let hangup = session.hangup.clone();
    let why: Option<Hangup> = loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(keepalive * 3, stream.next()) => f,
            _ = overloaded.notified() => {
                warn!("connection too slow; dropped (it will resync on reconnect)");
                break None;
            }
            why = hangup.wait() => {
                info!(reason = %why.reason, "connection ended by the relay");
                break Some(why);
            }
            _ = stopped(&mut stop) => break None,
        };
        let message = match frame {
            Err(_) => {
                debug!("silent for too long; dropped");
                break None;
            }
            Ok(None) => break None,
            Ok(Some(Err(e))) => {
                if let Some(size) = oversized(&e) {
                    info!(%e, "frame over the limit; closed");
                    break Some(too_big(size, relay.config.max_frame_bytes));
                }
                debug!(%e, "connection error");
                break None;
            }
            Ok(Some(Ok(m))) => m,
        };
        let frame = match message {
            Message::Binary(b) => b,
            Message::Text(_) => {
                session.error(&relay.peer_id, TEXT_FRAME);
                strikes += 1;
                if strikes > 10 {
                    break Some(Hangup { code: 1003, reason: "too many text frames".into(), error: None });
                }
                continue;
            }
            Message::Close(_) => break None,
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
            Ok(WireMessage::DocUnavailable { .. }) => {}
            Ok(WireMessage::Other { kind }) => {
                if !IGNORED_TYPES.contains(&kind.as_str()) {
                    session.error(&relay.peer_id, unknown_type(&kind));
                }
            }
            Err(e) => {
                session.error(&relay.peer_id, format!("malformed message: {e}"));
                strikes += 1;
                if strikes > 10 {
                    warn!("too many malformed messages; dropped");
                    break Some(Hangup { code: 1007, reason: "too many malformed messages".into(), error: None });
                }
            }
        }
    };
    // The writer says why and closes (told before the session's queue closes, which would end it
    // first); a client that does not read gets at most a second.
    let told = why.is_some_and(|why| close_tx.send(why).is_ok());
    relay.disconnect(conn, &touched).await;
    drop(session);
    if !told || tokio::time::timeout(std::time::Duration::from_secs(1), &mut writer).await.is_err() {
        writer.abort();
    }
    debug!("disconnected");
}

/// Keeps a socket open a moment after its close frame when the client's oversized frame is still
/// unread: closed at once, the kernel would answer the unread bytes with a reset, and the client
/// could lose the close frame (and its reason) with it.
async fn linger() {
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
}

/// What a text frame gets (the protocol is binary CBOR).
const TEXT_FRAME: &str =
    "text frames are not part of the protocol; send binary CBOR (automerge-repo protocol 1); ignored";

impl Relay {
    pub(super) async fn disconnect(&self, conn: ConnId, touched: &HashSet<String>) {
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
