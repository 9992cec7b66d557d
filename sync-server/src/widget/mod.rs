//! The web widget's customer API. A team's website embeds `widget.js` with the team's widget key;
//! the customer starts a conversation over HTTP and then chats over a WebSocket scoped to that one
//! conversation. Customers never see automerge: the relay turns their messages into changes of the
//! conversation and pushes every message of it back, whole and in order.
//!
//! - `cors`: which websites (origins) may use a team's widget; CORS and the WebSocket's `Origin`.
//! - `hub`: sockets per conversation (a change wakes only its own conversation's sockets), limits
//!   per session and per address, presence coalesced before it reaches the crew.
//! - `net`: the customer's address (trusted proxies only) and how addresses are counted.
//! - `frames`: what the socket carries.

mod cors;
mod frames;
mod hub;
pub(crate) mod net;

pub use cors::{OriginError, normalize_origin};
pub use hub::WidgetHub;
pub use net::{Cidr, CidrError};

use crate::relay::Relay;
use crate::store::WidgetSettings;
use axum::extract::ws::{CloseFrame, Message as Ws, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use cors::OriginCheck;
use crewdesk::domain::{
    AgentId, Author, Channel, Customer, CustomerEdit, CustomerId, Message, MessageBody, MessageId, Presence, Timestamp,
};
use crewdesk::replica::doc::{self, NewConversation};
use frames::{Incoming, widget_message};
use hub::PresenceStep;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// The widget's routes: its API behind the origin check, and the script.
pub fn routes(relay: Arc<Relay>) -> Router<Arc<Relay>> {
    let max_blob_bytes = relay.config().max_blob_bytes;
    Router::new()
        .route("/api/widget/{key}/settings", get(settings))
        .route("/api/widget/{key}/conversations", post(start))
        .route("/api/widget/ws", get(chat))
        .merge(crate::blobs::widget_routes(max_blob_bytes))
        .layer(middleware::from_fn_with_state(relay, cors::layer))
        .route("/widget.js", get(script))
}

fn bad(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// The greeting a team that has not chosen one shows.
pub const DEFAULT_GREETING: &str = "Hi! How can we help you today?";

/// The settings of the team whose widget key this is.
pub(crate) async fn settings_by_key(relay: &Arc<Relay>, key: String) -> Option<WidgetSettings> {
    relay.blocking(move |s| s.widget_by_key(&key)).await.ok().flatten()
}

/// A widget customer's session: their conversation, location, and their team's widget.
pub(crate) struct SessionInfo {
    pub doc_id: String,
    pub location: Option<String>,
    pub settings: WidgetSettings,
}

pub(crate) async fn session(relay: &Arc<Relay>, token: String) -> Option<SessionInfo> {
    relay
        .blocking(move |s| {
            let Some((doc_id, location)) = s.widget_session(&token)? else { return Ok(None) };
            let Some(team) = s.document_team(&doc_id)? else { return Ok(None) };
            Ok(s.widget_settings(&team)?.map(|settings| SessionInfo { doc_id, location, settings }))
        })
        .await
        .ok()
        .flatten()
}

/// The team's name and greeting, for the widget's header. A page on an origin the team does not
/// list is told so, readably (and told nothing else).
async fn settings(
    State(relay): State<Arc<Relay>>,
    Path(key): Path<String>,
    check: Option<Extension<OriginCheck>>,
) -> Response {
    if let Some(Extension(OriginCheck::Refused { origin })) = check {
        return bad(StatusCode::FORBIDDEN, &OriginCheck::refusal(&origin));
    }
    let Some(w) = settings_by_key(&relay, key).await else {
        return bad(StatusCode::NOT_FOUND, "unknown widget key: copy the snippet again from the team's admin");
    };
    let greeting = w.greeting.unwrap_or_else(|| DEFAULT_GREETING.to_owned());
    axum::Json(serde_json::json!({ "team": w.team_name, "greeting": greeting })).into_response()
}

#[derive(serde::Deserialize)]
struct Start {
    name: String,
    email: Option<String>,
    text: String,
    /// Sent by older widgets (the browser's time zone); not used: without a GeoIP database the
    /// crew sees "unknown" rather than a guess.
    #[allow(dead_code)]
    location: Option<String>,
}

async fn start(
    State(relay): State<Arc<Relay>>,
    Path(key): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let Some(widget) = settings_by_key(&relay, key).await else {
        return bad(StatusCode::NOT_FOUND, "unknown widget key: copy the snippet again from the team's admin");
    };
    // Read only once the key is known; a first message is at most 64 KiB of text.
    let body = match crate::relay::gate::read_body(body, 256 * 1024).await {
        Ok(b) => b,
        Err((status, e)) => return bad(status, &e),
    };
    let Ok(body) = serde_json::from_slice::<Start>(&body) else {
        return bad(StatusCode::BAD_REQUEST, "expected JSON: {name, email?, text}");
    };
    let name: String = body.name.trim().chars().take(100).collect();
    let email = body.email.map(|e| e.trim().to_owned()).filter(|e| !e.is_empty());
    let check = CustomerEdit { name: Some(name.clone()), email: email.clone(), ..Default::default() };
    if let Err(e) = check.validate() {
        return bad(StatusCode::BAD_REQUEST, &e.to_string());
    }
    let text = MessageBody::Text { text: body.text };
    if let Err(e) = text.validate() {
        return bad(StatusCode::BAD_REQUEST, &e.to_string());
    }
    let ip = net::client_ip(peer.ip(), &headers, &relay.config().trusted_proxies);
    if !relay.allow_widget_start(net::counted(ip)).await {
        return bad(StatusCode::TOO_MANY_REQUESTS, "too many conversations started from your address; try again later");
    }
    let now = Timestamp::now();
    let id = doc::new_conversation_id(&mut rand::rng());
    let new = NewConversation {
        id: id.clone(),
        team: widget.team,
        channel: Channel::WebWidget,
        customer: Customer {
            id: CustomerId(format!("widget-{}", doc::random_id(&mut rand::rng()))),
            name,
            email,
            phone: None,
            notes: None,
        },
        created_at: now,
    };
    let first = Message { id: doc::new_message_id(&mut rand::rng()), at: now, author: Author::Customer, body: text };
    if let Err(e) = relay.create_as_relay(&new, &first).await {
        warn!(%e, "widget conversation not created");
        return bad(StatusCode::SERVICE_UNAVAILABLE, "the conversation could not be started; try again");
    }
    // Only the GeoIP database locates a customer; without one the crew sees "unknown".
    let location = relay.geoip.as_ref().and_then(|g| g.locate(ip));
    let doc_id = id.0.clone();
    match relay.blocking(move |s| s.create_widget_session(&doc_id, location.as_deref())).await {
        Ok(session) => axum::Json(serde_json::json!({ "session": session, "conversation": id })).into_response(),
        Err(_) => bad(StatusCode::SERVICE_UNAVAILABLE, "the session could not be stored; try again"),
    }
}

#[derive(serde::Deserialize)]
struct SessionQuery {
    session: Option<String>,
}

/// Close codes the widget acts on (4000-4999 are the application's).
pub mod close {
    /// The session is unknown: start a new conversation.
    pub const UNKNOWN_SESSION: u16 = 4001;
    /// The page's origin is not listed by the team: do not retry.
    pub const ORIGIN_REFUSED: u16 = 4003;
    /// Too many windows of this chat are open: retry later.
    pub const TOO_MANY_SOCKETS: u16 = 4008;
    /// No answer to pings.
    pub const SILENT: u16 = 4010;
}

async fn chat(
    State(relay): State<Arc<Relay>>,
    Query(q): Query<SessionQuery>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    check: Option<Extension<OriginCheck>>,
    held: Option<Extension<crate::relay::gate::Held>>,
    ws: WebSocketUpgrade,
) -> Response {
    let ws = ws.max_message_size(64 * 1024).max_frame_size(64 * 1024);
    // Refusals go over the socket: a browser cannot read an HTTP status of a failed upgrade.
    if let Some(Extension(OriginCheck::Refused { origin })) = check {
        let reason = OriginCheck::refusal(&origin);
        return ws.on_upgrade(move |s| refuse(s, close::ORIGIN_REFUSED, "origin", reason));
    }
    let Some(session) = session(&relay, q.session.unwrap_or_default()).await else {
        let reason = "this chat has ended or was never started here; start a new one".to_owned();
        return ws.on_upgrade(move |s| refuse(s, close::UNKNOWN_SESSION, "session", reason));
    };
    let ip = net::client_ip(peer.ip(), &headers, &relay.config().trusted_proxies);
    // The connection counts under the caps for as long as the socket is open.
    ws.on_upgrade(move |socket| async move {
        let _held = held;
        customer(relay, socket, session, net::counted(ip)).await
    })
}

fn error_frame(code: &str, error: &str, reference: Option<&str>) -> Ws {
    Ws::Text(serde_json::json!({ "type": "error", "code": code, "error": error, "ref": reference }).to_string().into())
}

async fn refuse(mut socket: WebSocket, code: u16, kind: &'static str, reason: String) {
    let _ = socket.send(error_frame(kind, &reason, None)).await;
    let close = CloseFrame { code, reason: kind.into() };
    let _ = socket.send(Ws::Close(Some(close))).await;
}

/// A send that takes longer than this means the customer's browser stopped reading: the socket is
/// dropped (the widget reconnects and gets what it missed).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

struct Chat {
    relay: Arc<Relay>,
    doc_id: String,
    team_name: String,
    team: crewdesk::domain::TeamId,
    crew_names: HashMap<AgentId, String>,
    /// Every message id already sent on this socket (their own messages included, as the
    /// confirmation that they were stored).
    sent: HashSet<MessageId>,
}

impl Chat {
    async fn refresh_names(&mut self) {
        let team = self.team.clone();
        if let Ok(teams) = self.relay.blocking(|s| s.teams()).await
            && let Some(t) = teams.into_iter().find(|t| t.id == team)
        {
            self.crew_names = t.members.into_iter().map(|m| (m.agent, m.name)).collect();
        }
    }

    /// Frames with every message of the conversation not yet sent, in (time, id) order. A message
    /// that arrives late with an earlier time (an agent who was offline) is sent all the same.
    async fn fresh_frames(&mut self) -> Result<Vec<Ws>, String> {
        let mut all = self.relay.messages_of(&self.doc_id).await?;
        // Internal notes are for the crew only: never in a frame to the customer.
        all.retain(|m| !self.sent.contains(&m.id) && !m.body.is_internal());
        if all.is_empty() {
            return Ok(Vec::new());
        }
        all.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        let unknown =
            all.iter().any(|m| matches!(&m.author, Author::Crew { agent } if !self.crew_names.contains_key(agent)));
        if unknown {
            self.refresh_names().await;
        }
        let shown: Vec<_> = all.iter().filter_map(|m| widget_message(m, &self.crew_names, &self.team_name)).collect();
        self.sent.extend(all.into_iter().map(|m| m.id));
        Ok(shown
            .chunks(frames::MESSAGES_PER_FRAME)
            .map(|chunk| Ws::Text(serde_json::json!({ "type": "messages", "messages": chunk }).to_string().into()))
            .collect())
    }
}

async fn send(socket: &mut WebSocket, frame: Ws) -> bool {
    matches!(tokio::time::timeout(SEND_TIMEOUT, socket.send(frame)).await, Ok(Ok(())))
}

async fn customer(relay: Arc<Relay>, mut socket: WebSocket, session: SessionInfo, address: IpAddr) {
    let doc_id = session.doc_id.clone();
    let Ok(mut membership) = relay.widgets.join(&doc_id, session.location.clone()) else {
        let reason = "this chat is open in too many windows; close one and try again".to_owned();
        refuse(socket, close::TOO_MANY_SOCKETS, "sockets", reason).await;
        return;
    };
    presence_changed(&relay, &doc_id).await;
    let mut chat = Chat {
        relay: relay.clone(),
        doc_id: doc_id.clone(),
        team_name: session.settings.team_name.clone(),
        team: session.settings.team.clone(),
        crew_names: HashMap::new(),
        sent: HashSet::new(),
    };
    chat.refresh_names().await;
    let keepalive = relay.config().keepalive;
    let mut ping = tokio::time::interval(keepalive);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    let mut stop = relay.stopping();
    // Everything so far (a reconnect gets what it missed), then whatever each change adds.
    let mut wake = true;
    loop {
        if wake {
            wake = false;
            match chat.fresh_frames().await {
                Ok(frames) => {
                    let mut ok = true;
                    for f in frames {
                        ok = ok && send(&mut socket, f).await;
                    }
                    if !ok {
                        break;
                    }
                }
                Err(e) => warn!(%doc_id, %e, "widget messages not read"),
            }
        }
        tokio::select! {
            frame = socket.recv() => {
                heard = Instant::now();
                let reply = match frame {
                    Some(Ok(Ws::Text(t))) => receive(&relay, &doc_id, address, &t).await,
                    Some(Ok(Ws::Binary(_))) => Some(error_frame("frame", "expected JSON text frames", None)),
                    Some(Ok(Ws::Ping(_) | Ws::Pong(_))) => None,
                    Some(Ok(Ws::Close(_)) | Err(_)) | None => break,
                };
                if let Some(reply) = reply && !send(&mut socket, reply).await {
                    break;
                }
            }
            changed = membership.changed.changed() => match changed {
                Ok(()) => wake = true,
                Err(_) => break,
            },
            typing = membership.crew_typing.changed() => {
                if typing.is_err() {
                    break;
                }
                let name = membership.crew_typing.borrow_and_update().1.clone();
                let frame = serde_json::json!({ "type": "typing", "name": name }).to_string();
                if !send(&mut socket, Ws::Text(frame.into())).await {
                    break;
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() > keepalive * 3 {
                    debug!(%doc_id, "widget socket silent; closed");
                    let close = CloseFrame { code: close::SILENT, reason: "no answer to pings".into() };
                    let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(Ws::Close(Some(close)))).await;
                    break;
                }
                if !send(&mut socket, Ws::Ping(Vec::new().into())).await {
                    break;
                }
            }
            _ = crate::relay::stopped(&mut stop) => break,
        }
    }
    relay.widgets.leave(&doc_id);
    presence_changed(&relay, &doc_id).await;
}

/// One frame from the customer's browser: a message is checked, counted against the session's and
/// the address's limits, and stored; the answer says what happened (`sent` or an error).
async fn receive(relay: &Arc<Relay>, doc_id: &str, address: IpAddr, text: &str) -> Option<Ws> {
    let (text, reference) = match frames::parse_incoming(text) {
        Ok(Incoming::Message { text, reference }) => (text, reference),
        Ok(Incoming::Typing) => {
            if relay.widgets.customer_typing(doc_id, Instant::now()) {
                relay.customer_typing(doc_id).await;
            }
            return None;
        }
        Err(e) => return Some(error_frame("frame", &e, None)),
    };
    let r = reference.as_deref();
    let body = MessageBody::Text { text };
    if let Err(e) = body.validate() {
        return Some(error_frame("invalid", &e.to_string(), r));
    }
    let window = hub::MESSAGE_WINDOW.as_millis() as i64;
    let per_session = allow_shared(relay, format!("wmsg:{doc_id}"), hub::MESSAGES_PER_SESSION, window, || {
        relay.widgets.messages_per_session.allow(doc_id.to_owned())
    });
    if !per_session.await {
        return Some(error_frame("rate", "you are sending too fast; wait a few seconds and send again", r));
    }
    let max = relay.config().widget_messages_per_ip;
    let per_address = allow_shared(relay, format!("wmsgip:{address}"), max, window, || {
        relay.widgets.messages_per_address.allow(address)
    });
    if !per_address.await {
        return Some(error_frame("rate", "too many messages from your network; wait a few seconds and send again", r));
    }
    let m = Message { id: doc::new_message_id(&mut rand::rng()), at: Timestamp::now(), author: Author::Customer, body };
    match relay.change_as_relay(doc_id, |tx| doc::add_message(tx, &m)).await {
        Ok(()) => Some(Ws::Text(serde_json::json!({ "type": "sent", "ref": r, "id": m.id }).to_string().into())),
        Err(e) => {
            warn!(%doc_id, %e, "widget message not stored");
            Some(error_frame("store", "your message could not be stored; send it again", r))
        }
    }
}

/// A limit counted in the shared store when relay instances share one, else in this process.
async fn allow_shared(
    relay: &Arc<Relay>,
    key: String,
    max: usize,
    window_ms: i64,
    local: impl FnOnce() -> bool,
) -> bool {
    if relay.store().backend() != "postgres" {
        return local();
    }
    match relay.blocking(move |s| s.allow_event(&key, max, window_ms)).await {
        Ok(Some(allowed)) => allowed,
        Ok(None) => local(),
        Err(err) => {
            warn!(%err, "shared rate limit unavailable; counting on this instance");
            local()
        }
    }
}

/// Tells the crew of the conversation's presence as the hub decides: at once when it can, later
/// (one timer per conversation) when updates come faster than the crew should hear them.
async fn presence_changed(relay: &Arc<Relay>, doc_id: &str) {
    let (step, location) = relay.widgets.presence_step(doc_id, Instant::now(), false);
    let mut due = match step {
        PresenceStep::Publish(online) => return publish(relay, doc_id, online, location).await,
        PresenceStep::Nothing => return,
        PresenceStep::WaitUntil(at) => at,
    };
    let (relay, doc_id) = (relay.clone(), doc_id.to_owned());
    tokio::spawn(async move {
        let mut stop = relay.stopping();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                _ = crate::relay::stopped(&mut stop) => return,
            }
            let (step, location) = relay.widgets.presence_step(&doc_id, Instant::now(), true);
            match step {
                PresenceStep::Publish(online) => return publish(&relay, &doc_id, online, location).await,
                PresenceStep::Nothing => return,
                PresenceStep::WaitUntil(at) => due = at,
            }
        }
    });
}

async fn publish(relay: &Arc<Relay>, doc_id: &str, online: bool, location: Option<String>) {
    relay.set_presence(doc_id, Presence { online, last_active: Some(Timestamp::now()), location }).await;
}

/// The widget's script with its stylesheet inside (it goes into the widget's shadow root, so the
/// host page's CSS and the widget's never meet).
static WIDGET_JS: std::sync::LazyLock<(String, String)> = std::sync::LazyLock::new(|| {
    let css = serde_json::to_string(include_str!("../../widget/widget.css")).unwrap_or_else(|_| "\"\"".into());
    let js = include_str!("../../widget/widget.js").replace("\"__CREWDESK_CSS__\"", &css);
    let etag = format!("\"{}\"", &crewdesk::sync::sha256_hex(js.as_bytes())[..16]);
    (js, etag)
});

/// The script, cacheable for 5 minutes and revalidated by its ETag (a new relay version's script
/// reaches customers within minutes; the same one costs a 304).
async fn script(headers: HeaderMap) -> Response {
    let (js, etag) = &*WIDGET_JS;
    let cache = [
        (header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300")),
        (header::ETAG, HeaderValue::from_str(etag).unwrap_or(HeaderValue::from_static("\"0\""))),
    ];
    if headers.get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == etag.as_bytes()) {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    (cache, [(header::CONTENT_TYPE, HeaderValue::from_static("text/javascript; charset=utf-8"))], js.clone())
        .into_response()
}

/// The script as served (for size checks).
pub fn script_source() -> &'static str {
    &WIDGET_JS.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_carries_its_stylesheet_and_stays_small() {
        use std::io::Write;
        let js = script_source();
        assert!(!js.contains("__CREWDESK_CSS__"), "the stylesheet is put in");
        assert!(js.contains(":host { all: initial; }"), "the stylesheet is in the script");
        assert!(!js.contains("alert("), "errors are shown inline");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(js.as_bytes()).unwrap();
        let size = gz.finish().unwrap().len();
        assert!(size < 15 * 1024, "widget.js is {size} bytes gzipped; the budget is 15 KB");
        println!("widget.js: {} bytes, {size} bytes gzipped", js.len());
    }
}
