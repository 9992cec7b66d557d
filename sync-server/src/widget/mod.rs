//! The web widget's customer API: a customer starts a conversation over HTTP and then chats over a
//! WebSocket scoped to that one conversation. The relay turns customer messages into changes of the
//! conversation (never exposing automerge documents to browsers), streams crew replies back, and
//! reports the customer's presence (online, last active, location) to the crew as ephemeral data.

use crate::relay::Relay;
use axum::Router;
use axum::extract::ws::{Message as Ws, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use crewdesk::domain::{
    Author, Channel, Customer, CustomerEdit, CustomerId, Message, MessageBody, MessageId, Presence, TeamId, Timestamp,
};
use crewdesk::replica::doc::{self, NewConversation};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::warn;

pub fn routes() -> Router<Arc<Relay>> {
    Router::new()
        .route("/api/widget/{team}/conversations", post(start))
        .route("/api/widget/ws", get(chat))
        .route("/widget.js", get(script))
        .route("/widget/demo", get(demo_page))
}

/// Customer messages allowed per window, per session.
const RATE_MESSAGES: usize = 10;
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(serde::Deserialize)]
struct Start {
    name: String,
    email: Option<String>,
    text: String,
    /// What the browser reports (time zone, language) when the relay has no GeoIP database.
    location: Option<String>,
}

fn bad(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// The customer's address: the TCP peer, or the first `X-Forwarded-For` entry behind a trusted proxy.
fn client_ip(relay: &Relay, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    if relay.config().trust_forwarded_for
        && let Some(ip) = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok())
    {
        return ip;
    }
    peer.ip()
}

async fn start(
    State(relay): State<Arc<Relay>>,
    Path(team): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Option<axum::Json<Start>>,
) -> Response {
    let Some(axum::Json(body)) = body else {
        return bad(StatusCode::BAD_REQUEST, "expected JSON: {name, email?, text, location?}");
    };
    let team = TeamId(team);
    let store = relay.store().clone();
    let known = tokio::task::spawn_blocking(move || store.teams()).await.ok().and_then(Result::ok).unwrap_or_default();
    if !known.iter().any(|t| t.id == team) {
        return bad(StatusCode::NOT_FOUND, "unknown team");
    }
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
    let ip = client_ip(&relay, peer, &headers);
    if !relay.allow_widget_start(ip).await {
        return bad(StatusCode::TOO_MANY_REQUESTS, "too many conversations started from your address; try again later");
    }
    let now = Timestamp::now();
    let id = doc::new_conversation_id(&mut rand::rng());
    let new = NewConversation {
        id: id.clone(),
        team,
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
    // The GeoIP database when it knows the address, else what the browser reported.
    let location: Option<String> = relay
        .geoip
        .as_ref()
        .and_then(|g| g.locate(ip))
        .or_else(|| body.location.map(|l| l.chars().filter(|c| !c.is_control()).take(120).collect()));
    let (store, doc_id) = (relay.store().clone(), id.0.clone());
    match tokio::task::spawn_blocking(move || store.create_widget_session(&doc_id, location.as_deref())).await {
        Ok(Ok(session)) => axum::Json(serde_json::json!({ "session": session, "conversation": id })).into_response(),
        _ => bad(StatusCode::SERVICE_UNAVAILABLE, "the session could not be stored; try again"),
    }
}

#[derive(serde::Deserialize)]
struct SessionQuery {
    session: Option<String>,
}

#[derive(serde::Serialize)]
struct WidgetMessage {
    id: MessageId,
    at: Timestamp,
    from: &'static str,
    text: String,
    /// A conference invitation's link (shown as a Join button).
    join_url: Option<String>,
    /// A file: its sha256 (the widget downloads it with its session) and what it is.
    attachment: Option<WidgetAttachment>,
}

#[derive(serde::Serialize)]
struct WidgetAttachment {
    blob: String,
    file_name: String,
    mime: String,
    size: u64,
}

fn widget_message(m: &Message) -> Option<WidgetMessage> {
    let from = match m.author {
        Author::Customer => "customer",
        Author::Crew { .. } => "crew",
        Author::System => return None,
    };
    let (text, join_url, attachment) = match &m.body {
        MessageBody::ConferenceInvitation { url } => ("Join the video call".to_owned(), Some(url.clone()), None),
        MessageBody::Attachment { file_name, mime, size, .. } => {
            let blob = m.body.blob()?.as_str().to_owned();
            let a = WidgetAttachment { blob, file_name: file_name.clone(), mime: mime.clone(), size: *size };
            (file_name.clone(), None, Some(a))
        }
        body => (body.preview(), None, None),
    };
    Some(WidgetMessage { id: m.id.clone(), at: m.at, from, text, join_url, attachment })
}

async fn chat(State(relay): State<Arc<Relay>>, Query(q): Query<SessionQuery>, ws: WebSocketUpgrade) -> Response {
    let token = q.session.unwrap_or_default();
    let store = relay.store().clone();
    let session =
        tokio::task::spawn_blocking(move || store.widget_session(&token)).await.ok().and_then(Result::ok).flatten();
    let Some((doc_id, location)) = session else { return bad(StatusCode::UNAUTHORIZED, "unknown session") };
    ws.max_message_size(64 * 1024).on_upgrade(move |socket| customer(relay, socket, doc_id, location))
}

async fn customer(relay: Arc<Relay>, mut socket: WebSocket, doc_id: String, location: Option<String>) {
    let mut changes = relay.changes.subscribe();
    let mut stop = relay.stopping();
    let presence = |online| Presence { online, last_active: Some(Timestamp::now()), location: location.clone() };
    relay.set_presence(&doc_id, presence(true)).await;
    let mut sent = 0_usize;
    let mut recent: Vec<Instant> = Vec::new();
    loop {
        // Everything new in the conversation goes to the customer (their own messages included, as
        // the confirmation that they were stored).
        if let Ok(all) = relay.messages_of(&doc_id).await {
            let fresh: Vec<WidgetMessage> = all.iter().skip(sent).filter_map(widget_message).collect();
            sent = all.len();
            if !fresh.is_empty() {
                let frame = serde_json::json!({ "type": "messages", "messages": fresh }).to_string();
                if socket.send(Ws::Text(frame.into())).await.is_err() {
                    break;
                }
            }
        }
        tokio::select! {
            frame = socket.recv() => {
                let text = match frame {
                    Some(Ok(Ws::Text(t))) => t.to_string(),
                    Some(Ok(Ws::Ping(_) | Ws::Pong(_))) => continue,
                    _ => break,
                };
                let reply = match serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v.get("text")?.as_str().map(str::to_owned)) {
                    None => Some("expected {\"text\": \"...\"}".to_owned()),
                    Some(text) => {
                        recent.retain(|t| t.elapsed() < RATE_WINDOW);
                        let body = MessageBody::Text { text };
                        if recent.len() >= RATE_MESSAGES {
                            Some("you are sending too fast; wait a few seconds".to_owned())
                        } else if let Err(e) = body.validate() {
                            Some(e.to_string())
                        } else {
                            recent.push(Instant::now());
                            let m = Message { id: doc::new_message_id(&mut rand::rng()), at: Timestamp::now(), author: Author::Customer, body };
                            relay.change_as_relay(&doc_id, |tx| doc::add_message(tx, &m)).await.err()
                        }
                    }
                };
                if let Some(error) = reply {
                    let frame = serde_json::json!({ "type": "error", "error": error }).to_string();
                    if socket.send(Ws::Text(frame.into())).await.is_err() {
                        break;
                    }
                }
            }
            changed = changes.recv() => match changed {
                Ok(id) if id != doc_id => continue,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            },
            _ = crate::relay::stopped(&mut stop) => break,
        }
    }
    relay.set_presence(&doc_id, presence(false)).await;
}

async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], WIDGET_JS).into_response()
}

async fn demo_page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], DEMO_HTML).into_response()
}

/// The embeddable widget: `<script src="/widget.js" data-team="sales"></script>`. Message text is
/// only ever set with textContent, never parsed as HTML.
const WIDGET_JS: &str = r#"(() => {
  const me = document.currentScript;
  const team = me.dataset.team;
  const base = new URL(me.src).origin;
  const key = "crewdesk-session-" + team;
  const box = document.createElement("div");
  box.id = "crewdesk-widget";
  box.style.cssText = "position:fixed;bottom:16px;right:16px;width:320px;font:14px system-ui;border:1px solid #ccd;border-radius:10px;background:#fff;color:#123;box-shadow:0 6px 24px rgba(0,0,0,.15);display:flex;flex-direction:column;max-height:70vh";
  const head = document.createElement("div"); head.textContent = "Chat with us"; head.style.cssText = "padding:10px;background:#0d9488;color:#fff;border-radius:10px 10px 0 0;font-weight:600";
  const list = document.createElement("div"); list.id = "crewdesk-messages"; list.style.cssText = "padding:8px;overflow:auto;flex:1;min-height:120px";
  const form = document.createElement("form"); form.style.cssText = "display:flex;flex-direction:column;gap:6px;padding:8px;border-top:1px solid #eee";
  const name = document.createElement("input"); name.placeholder = "Your name"; name.id = "crewdesk-name";
  const email = document.createElement("input"); email.placeholder = "Email (optional)"; email.id = "crewdesk-email";
  const text = document.createElement("textarea"); text.placeholder = "Type a message"; text.id = "crewdesk-text"; text.rows = 2;
  const send = document.createElement("button"); send.textContent = "Send"; send.id = "crewdesk-send";
  const file = document.createElement("input"); file.type = "file"; file.id = "crewdesk-file"; file.title = "Send a file"; file.style.display = "none";
  form.append(name, email, text, file, send); box.append(head, list, form); document.body.append(box);
  let ws = null, session = null;
  const shown = new Set();
  const show = (m) => {
    if (shown.has(m.id)) return; shown.add(m.id);
    const row = document.createElement("div"); row.className = "crewdesk-msg " + m.from;
    row.style.cssText = "margin:4px 0;padding:6px 8px;border-radius:8px;max-width:85%;" + (m.from === "crew" ? "background:#e8f3f1" : "background:#f1f3f6;margin-left:auto");
    row.textContent = m.text;
    if (m.attachment && session) {
      const url = base + "/api/widget/blobs/" + encodeURIComponent(m.attachment.blob) + "?session=" + encodeURIComponent(session);
      row.textContent = "";
      if (m.attachment.mime.startsWith("image/")) { const img = document.createElement("img"); img.src = url + "&thumbnail=1"; img.alt = m.attachment.file_name; img.className = "crewdesk-thumb"; img.onload = () => { list.scrollTop = list.scrollHeight; }; img.style.cssText = "display:block;max-width:100%;border-radius:6px"; row.append(img); }
      const a = document.createElement("a"); a.href = url; a.target = "_blank"; a.rel = "noopener"; a.className = "crewdesk-file";
      a.textContent = "📎 " + m.attachment.file_name + " (" + Math.max(1, Math.round(m.attachment.size / 1024)) + " KB)"; row.append(a);
    }
    if (m.join_url && /^https?:\/\//.test(m.join_url)) { const a = document.createElement("a"); a.href = m.join_url; a.target = "_blank"; a.textContent = " Join"; a.className = "crewdesk-join"; row.append(a); }
    list.append(row); list.scrollTop = list.scrollHeight;
  };
  const connect = (s) => {
    session = s; file.style.display = "";
    ws = new WebSocket(base.replace(/^http/, "ws") + "/api/widget/ws?session=" + encodeURIComponent(session));
    ws.onmessage = (e) => { const d = JSON.parse(e.data); if (d.type === "messages") d.messages.forEach(show); if (d.type === "error") alert(d.error); };
    ws.onclose = () => setTimeout(() => connect(session), 3000);
    name.style.display = email.style.display = "none";
  };
  file.onchange = async () => {
    const f = file.files[0]; if (!f || !session) return;
    const r = await fetch(base + "/api/widget/blobs?session=" + encodeURIComponent(session), { method: "POST", headers: { "content-type": f.type || "application/octet-stream", "x-file-name": encodeURIComponent(f.name) }, body: f });
    file.value = "";
    if (!r.ok) { const d = await r.json().catch(() => ({ error: "the file was not sent" })); alert(d.error); }
  };
  const saved = localStorage.getItem(key);
  if (saved) connect(saved);
  form.onsubmit = async (e) => {
    e.preventDefault();
    const t = text.value.trim(); if (!t) return; text.value = "";
    if (ws) { ws.send(JSON.stringify({ text: t })); return; }
    const location = Intl.DateTimeFormat().resolvedOptions().timeZone + " · " + navigator.language;
    const r = await fetch(base + "/api/widget/" + encodeURIComponent(team) + "/conversations", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ name: name.value || "Visitor", email: email.value, text: t, location }) });
    const d = await r.json(); if (!r.ok) { alert(d.error); return; }
    localStorage.setItem(key, d.session); connect(d.session);
  };
})();
"#;

const DEMO_HTML: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Crewdesk widget demo</title></head>
<body style="font:16px system-ui;margin:40px">
<h1>Example Shop</h1><p>This page embeds the Crewdesk web widget for the Sales team.</p>
<script src="/widget.js" data-team="sales"></script>
</body></html>
"#;
