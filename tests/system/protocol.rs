//! The bare protocol as a modified client speaks it, and the web widget's socket.

use super::*;

/// Sends the sync message the state calls for; false when it calls for none.
pub async fn sync_with(client: &mut RawClient, id: &str, d: &Automerge, state: &mut automerge::sync::State) -> bool {
    let Some(m) = d.generate_sync_message(state) else { return false };
    send_sync(client, id, m.encode()).await;
    true
}

pub async fn send_sync(client: &mut RawClient, id: &str, data: Vec<u8>) {
    let m = WireMessage::Sync { sender_id: "raw".into(), target_id: "relay".into(), document_id: id.into(), data };
    client.send(&m).await;
}

/// The next message about `id` or an error (announcements of other conversations are skipped).
pub async fn next_about(client: &mut RawClient, id: &str) -> Option<WireMessage> {
    loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), client.next()).await.ok()??;
        let about = match &m {
            WireMessage::Sync { document_id, .. } | WireMessage::DocUnavailable { document_id, .. } => {
                document_id == id
            }
            WireMessage::Error { .. } => true,
            _ => false,
        };
        if about {
            return Some(m);
        }
    }
}

/// A copy of a stored conversation, fetched with the bare protocol.
pub async fn fetch(client: &mut RawClient, id: &str) -> Automerge {
    let mut copy = Automerge::new();
    let mut state = automerge::sync::State::new();
    let request = copy.generate_sync_message(&mut state).unwrap();
    let m = WireMessage::Request {
        sender_id: "raw".into(),
        target_id: "relay".into(),
        document_id: id.into(),
        data: request.encode(),
    };
    client.send(&m).await;
    for _ in 0..10 {
        match next_about(client, id).await {
            Some(WireMessage::Sync { data, .. }) => {
                copy.receive_sync_message(&mut state, automerge::sync::Message::decode(&data).unwrap()).unwrap();
                if doc::check_schema(&copy).unwrap_or(false) {
                    return copy;
                }
                sync_with(client, id, &copy, &mut state).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("the conversation did not arrive");
}

/// Makes `forge` on a copy of `base` and syncs it; returns the relay's error, or "accepted" when
/// the relay took the change (its heads covered it).
pub async fn attempt(
    client: &mut RawClient,
    id: &str,
    base: &Automerge,
    forge: impl FnOnce(&mut Transaction<'_>) -> Result<(), DocError>,
) -> String {
    let mut attempt = base.fork().with_actor(base.get_actor().clone());
    let mut state = automerge::sync::State::new();
    attempt.transact::<_, _, DocError>(forge).unwrap();
    for _ in 0..10 {
        if !sync_with(client, id, &attempt, &mut state).await {
            break;
        }
        match next_about(client, id).await {
            Some(WireMessage::Error { message, .. }) => return message,
            Some(WireMessage::Sync { data, .. }) => {
                let m = automerge::sync::Message::decode(&data).unwrap();
                let covered = m.heads == attempt.get_heads();
                if let Err(e) = attempt.receive_sync_message(&mut state, m) {
                    // The relay sent a change this copy cannot take (one with the same actor and
                    // sequence number as the forged one): the forged change is not the relay's.
                    return format!("the relay's answer does not fit the forged change ({e})");
                }
                if covered {
                    return "accepted".into();
                }
            }
            Some(WireMessage::DocUnavailable { .. }) => return "unavailable".into(),
            other => panic!("unexpected {other:?}"),
        }
    }
    "no answer".into()
}

// The web widget and ephemeral messages, as tests drive them.

pub type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn widget_socket(relay: &TestRelay, session: &str, origin: Option<&str>) -> Socket {
    let mut request = format!("ws://{}/api/widget/ws?session={session}", relay.addr).into_client_request().unwrap();
    if let Some(o) = origin {
        request.headers_mut().insert("origin", o.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// The next JSON frame (pings skipped), or `None` when the socket closes or stays quiet `secs`.
pub async fn next_json(ws: &mut Socket, secs: u64) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(secs), ws.next()).await.ok()?? {
            Ok(Frame::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(Frame::Ping(_) | Frame::Pong(_)) => continue,
            _ => return None,
        }
    }
}

/// A request for the conversation: the connection follows it from then on.
pub fn follow(id: &ConversationId) -> WireMessage {
    let request = automerge::sync::SyncDoc::generate_sync_message(
        &automerge::Automerge::new(),
        &mut automerge::sync::State::new(),
    );
    WireMessage::Request {
        sender_id: "raw".into(),
        target_id: "relay".into(),
        document_id: id.0.clone(),
        data: request.unwrap().encode(),
    }
}

/// The typing messages about `id` a connection hears within `secs`.
pub async fn typing_seen(
    client: &mut RawClient,
    id: &ConversationId,
    secs: u64,
) -> Vec<crewdesk::sync::presence::Typing> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Ok(Some(WireMessage::Ephemeral { document_id, data, .. })) =
            tokio::time::timeout(Duration::from_millis(200), client.next()).await
            && document_id == id.0
            && let Some(t) = crewdesk::sync::presence::decode_typing(&data)
        {
            seen.push(t);
        }
    }
    seen
}

/// A (modified) client's typing message claiming `who` is typing in `id`: the relay must name the
/// connection's own agent instead.
pub fn typing_claim(id: &ConversationId, who: &str) -> WireMessage {
    use crewdesk::sync::presence::{Typing, encode_typing};
    WireMessage::Ephemeral {
        sender_id: "raw".into(),
        target_id: "relay".into(),
        document_id: id.0.clone(),
        count: 1,
        session_id: "s".into(),
        data: encode_typing(&Typing::Crew(who.into())),
    }
}

/// The next typing frame a widget socket gets (other frames skipped), within `secs` of each frame.
pub async fn widget_typing_frame(ws: &mut Socket, secs: u64) -> Value {
    loop {
        let v = next_json(ws, secs).await.expect("a typing frame");
        if v["type"] == "typing" {
            return v;
        }
    }
}
