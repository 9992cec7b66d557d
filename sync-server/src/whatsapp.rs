//! The WhatsApp Cloud API channel.
//!
//! Inbound: Meta calls `GET /api/whatsapp/webhook` once to verify the subscription (the verify
//! token handshake) and then `POST`s every customer message there, signed with the app secret
//! (`X-Hub-Signature-256`). The relay checks the signature before it reads the body, turns each
//! message into a change of that contact's conversation (one per contact and team, created on the
//! first message), and remembers WhatsApp's message id so that a retried webhook changes nothing.
//!
//! Outbound: crew messages in WhatsApp conversations are queued durably when the relay commits
//! them, checked against the 24 h customer-service window (the root crate's rule), and sent to
//! `{api_base}/{phone_number_id}/messages`. Transient failures are retried with backoff; a message
//! WhatsApp refuses, or one the window forbids, is reported in the conversation.

use crate::relay::Relay;
use crate::store::{QueuedWhatsApp, WhatsAppOutcome};
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use crewdesk::domain::access::may_deliver_on_whatsapp;
use crewdesk::domain::attachment::BlobHash;
use crewdesk::domain::{Author, Channel, Customer, CustomerId, Message, MessageBody, MessageId, TeamId, Timestamp};
use crewdesk::replica::doc::{self, NewConversation};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

/// How the relay reaches the WhatsApp Cloud API (all from the Meta app's dashboard).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhatsAppConfig {
    /// The team whose conversations WhatsApp messages become.
    pub team: TeamId,
    /// The string you type as "Verify token" when subscribing the webhook.
    pub verify_token: String,
    /// The app secret: webhook bodies are signed with it.
    pub app_secret: String,
    /// A system user's access token with the whatsapp_business_messaging permission.
    pub access_token: String,
    /// The sending phone number's id (not the phone number itself).
    pub phone_number_id: String,
    /// The Graph API base, versioned.
    #[serde(default = "default_api_base")]
    pub api_base: String,
}

pub fn default_api_base() -> String {
    "https://graph.facebook.com/v21.0".to_owned()
}

pub fn routes() -> Router<Arc<Relay>> {
    Router::new().route("/api/whatsapp/webhook", get(verify).post(webhook))
}

#[derive(serde::Deserialize)]
struct VerifyQuery {
    #[serde(rename = "hub.mode")]
    mode: Option<String>,
    #[serde(rename = "hub.verify_token")]
    verify_token: Option<String>,
    #[serde(rename = "hub.challenge")]
    challenge: Option<String>,
}

fn plain(status: StatusCode, text: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text.into()).into_response()
}

/// Constant-time comparison of secrets.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn verify(State(relay): State<Arc<Relay>>, Query(q): Query<VerifyQuery>) -> Response {
    let Some(config) = relay.whatsapp() else { return plain(StatusCode::NOT_FOUND, "WhatsApp is not configured") };
    let token_ok = q.verify_token.as_deref().is_some_and(|t| same_secret(t.as_bytes(), config.verify_token.as_bytes()));
    match (q.mode.as_deref(), token_ok, q.challenge) {
        (Some("subscribe"), true, Some(challenge)) => plain(StatusCode::OK, challenge),
        _ => plain(StatusCode::FORBIDDEN, "verification failed: wrong mode or verify token"),
    }
}

/// Checks `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body with the app secret>`.
pub fn signature_valid(app_secret: &str, body: &[u8], header: Option<&str>) -> bool {
    // No secret, no way to tell a forged delivery from Meta's (the relay refuses to start so).
    if app_secret.trim().is_empty() {
        return false;
    }
    let Some(hex) = header.and_then(|h| h.strip_prefix("sha256=")) else { return false };
    let Some(given) = decode_hex(hex) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()) else { return false };
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// The header value WhatsApp sends for `body` (used by tests and tools that replay webhooks).
pub fn sign(app_secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", to_hex(&mac.finalize().into_bytes()))
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[derive(serde::Deserialize)]
struct Payload {
    object: String,
    #[serde(default)]
    entry: Vec<Entry>,
}

#[derive(serde::Deserialize)]
struct Entry {
    #[serde(default)]
    changes: Vec<Change>,
}

#[derive(serde::Deserialize)]
struct Change {
    field: String,
    value: ChangeValue,
}

#[derive(serde::Deserialize)]
struct ChangeValue {
    #[serde(default)]
    contacts: Vec<Contact>,
    #[serde(default)]
    messages: Vec<Inbound>,
}

#[derive(serde::Deserialize)]
struct Contact {
    wa_id: String,
    profile: Option<Profile>,
}

#[derive(serde::Deserialize)]
struct Profile {
    name: String,
}

#[derive(serde::Deserialize)]
struct Inbound {
    from: String,
    id: String,
    timestamp: String,
    #[serde(rename = "type")]
    kind: String,
    text: Option<TextBody>,
    image: Option<Media>,
    document: Option<Media>,
    sticker: Option<Media>,
    audio: Option<Media>,
    video: Option<Media>,
}

/// A media message's reference: the file is fetched from the Graph API by its id.
#[derive(serde::Deserialize)]
struct Media {
    id: String,
    mime_type: Option<String>,
    filename: Option<String>,
    caption: Option<String>,
}

#[derive(serde::Deserialize)]
struct TextBody {
    body: String,
}

/// Largest webhook delivery read (Meta batches at most a few hundred events).
const MAX_WEBHOOK_BYTES: usize = 2 * 1024 * 1024;

async fn webhook(State(relay): State<Arc<Relay>>, headers: HeaderMap, body: axum::body::Body) -> Response {
    let Some(config) = relay.whatsapp().cloned() else {
        return plain(StatusCode::NOT_FOUND, "WhatsApp is not configured");
    };
    // Signed over the body, so it must be read first: with a size limit and the body deadline.
    if headers.get("x-hub-signature-256").is_none() {
        return plain(StatusCode::UNAUTHORIZED, "X-Hub-Signature-256 is missing or does not match the body");
    }
    let body = match crate::relay::gate::read_body(body, MAX_WEBHOOK_BYTES).await {
        Ok(b) => b,
        Err((status, e)) => return plain(status, e),
    };
    let signature = headers.get("x-hub-signature-256").and_then(|v| v.to_str().ok());
    if !signature_valid(&config.app_secret, &body, signature) {
        warn!("WhatsApp webhook with a missing or wrong signature refused");
        return plain(StatusCode::UNAUTHORIZED, "X-Hub-Signature-256 is missing or does not match the body");
    }
    let payload: Payload = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("not a WhatsApp webhook payload: {e}")),
    };
    if payload.object != "whatsapp_business_account" {
        return plain(StatusCode::OK, "ignored: not a WhatsApp Business Account event");
    }
    let team = config.team.clone();
    if !relay.blocking(move |s| Ok(s.teams()?.iter().any(|t| t.id == team))).await.unwrap_or(false) {
        warn!(team = %config.team, "the WhatsApp team does not exist on this relay; create it with `sync-server team`");
        return plain(StatusCode::SERVICE_UNAVAILABLE, "not ready: the WhatsApp team does not exist");
    }
    // One webhook at a time: two deliveries of a first message must not start two conversations.
    let _one = relay.whatsapp_inbound_lock().lock().await;
    for change in payload.entry.iter().flat_map(|e| &e.changes).filter(|c| c.field == "messages") {
        for m in &change.value.messages {
            let name = change.value.contacts.iter().find(|c| c.wa_id == m.from).and_then(|c| c.profile.as_ref());
            if let Err(e) = receive(&relay, &config.team, m, name.map(|p| p.name.as_str())).await {
                // WhatsApp retries on anything but 200; what was stored is skipped then.
                warn!(%e, wamid = %m.id, "WhatsApp message not stored");
                return plain(StatusCode::SERVICE_UNAVAILABLE, "not stored; retry later");
            }
        }
    }
    plain(StatusCode::OK, "ok")
}

/// Turns one inbound WhatsApp message into a change of the contact's conversation, once.
async fn receive(relay: &Arc<Relay>, team: &TeamId, m: &Inbound, name: Option<&str>) -> Result<(), String> {
    let wamid = m.id.clone();
    if wamid.is_empty() || wamid.len() > 200 {
        return Ok(());
    }
    if m.from.is_empty() || m.from.len() > 20 || !m.from.bytes().all(|b| b.is_ascii_digit()) {
        warn!(from = %m.from, "WhatsApp message from an invalid number ignored");
        return Ok(());
    }
    // One contact's deliveries are handled one at a time across relay instances too, so two
    // instances hearing from a new contact at once start one conversation, not two.
    let key = format!("whatsapp:{team}:{}", m.from);
    let _contact = blocking(relay, move |s| s.hold_lock(&key)).await?;
    if blocking(relay, move |s| s.whatsapp_seen(&wamid)).await? {
        return Ok(());
    }
    let now = Timestamp::now();
    // WhatsApp's own timestamp (seconds) is when the customer wrote: the 24 h window counts from it.
    let at = m.timestamp.parse::<i64>().ok().map(|s| Timestamp(s.saturating_mul(1000))).filter(|t| t.0 > 0);
    let at = at.map_or(now, |t| t.min(now));
    // The contact's conversation id is stored before the conversation, so a crash in between leads
    // to the same conversation on retry, not a second one.
    let (t, from) = (team.clone(), m.from.clone());
    let known = blocking(relay, move |s| s.whatsapp_contact(&t, &from)).await?;
    let exists = match &known {
        Some(doc_id) => {
            let id = doc_id.clone();
            blocking(relay, move |s| Ok(s.document_team(&id)?.is_some())).await?
        }
        None => false,
    };
    let doc_id = known.unwrap_or_else(|| doc::new_conversation_id(&mut rand::rng()).0);
    if !exists {
        let (t, from, id) = (team.clone(), m.from.clone(), doc_id.clone());
        blocking(relay, move |s| s.set_whatsapp_contact(&t, &from, &id)).await?;
    }
    // Message ids follow from WhatsApp's, so storing a message twice writes the same message.
    let base = format!("wa-{}", &crewdesk::sync::sha256_hex(m.id.as_bytes())[..32]);
    let mut messages = Vec::new();
    for (suffix, body) in bodies(relay, &doc_id, m).await? {
        body.validate().map_err(|e| e.to_string())?;
        messages.push(Message { id: MessageId(format!("{base}{suffix}")), at, author: Author::Customer, body });
    }
    let Some(first) = messages.first() else { return Ok(()) };
    if exists {
        relay
            .change_as_relay(&doc_id, |tx| messages.iter().try_for_each(|message| doc::add_message(tx, message)))
            .await?;
    } else {
        let phone = format!("+{}", m.from);
        let new = NewConversation {
            id: crewdesk::domain::ConversationId(doc_id.clone()),
            team: team.clone(),
            channel: Channel::WhatsApp,
            customer: Customer {
                id: CustomerId(format!("whatsapp-{}", m.from)),
                name: name
                    .map(|n| n.chars().filter(|c| !c.is_control()).take(100).collect::<String>())
                    .filter(|n| !n.trim().is_empty())
                    .unwrap_or_else(|| phone.clone()),
                email: None,
                phone: Some(phone),
                notes: None,
            },
            created_at: at,
        };
        relay.create_as_relay(&new, first).await?;
        if messages.len() > 1 {
            relay
                .change_as_relay(&doc_id, |tx| {
                    messages[1..].iter().try_for_each(|message| doc::add_message(tx, message))
                })
                .await?;
        }
        info!(%doc_id, "WhatsApp conversation started");
    }
    let wamid = m.id.clone();
    blocking(relay, move |s| s.mark_whatsapp_seen(&wamid, &doc_id)).await
}

/// What a WhatsApp message becomes: its text; or its file (fetched from the Graph API into the blob
/// store) and caption; or a note for kinds Crewdesk does not show. Each with the suffix of its id.
async fn bodies(relay: &Arc<Relay>, doc_id: &str, m: &Inbound) -> Result<Vec<(&'static str, MessageBody)>, String> {
    let note = |kind: &str| {
        let text = format!("The customer sent a WhatsApp {kind} message, which Crewdesk does not show yet.");
        vec![("", MessageBody::Text { text })]
    };
    let media = match m.kind.as_str() {
        "text" => {
            return Ok(match &m.text {
                Some(t) if !t.body.trim().is_empty() => vec![("", MessageBody::Text { text: t.body.clone() })],
                _ => note("empty"),
            });
        }
        "image" => &m.image,
        "document" => &m.document,
        "sticker" => &m.sticker,
        "audio" => &m.audio,
        "video" => &m.video,
        kind => return Ok(note(kind)),
    };
    let Some(media) = media else { return Ok(note(&m.kind)) };
    let Some(config) = relay.whatsapp().cloned() else { return Ok(note(&m.kind)) };
    let (bytes, mime) = fetch_media(&config, &media.id, relay.config().max_blob_bytes).await?;
    if bytes.is_empty() {
        return Ok(note(&m.kind));
    }
    let mime = media.mime_type.clone().unwrap_or(mime);
    let (hash, info) = match crate::blobs::store_bytes(relay, doc_id, &mime, bytes.into(), None).await {
        Ok(stored) => stored,
        // Not a kind of file the relay keeps (audio, video, ...): say so instead.
        Err((axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE | axum::http::StatusCode::PAYLOAD_TOO_LARGE, _)) => {
            return Ok(note(&m.kind));
        }
        Err((_, e)) => return Err(e),
    };
    let extension = info.mime.rsplit('/').next().unwrap_or("bin").to_owned();
    let file_name = media
        .filename
        .as_deref()
        .map(|n| {
            n.rsplit(['/', '\\']).next().unwrap_or(n).chars().filter(|c| !c.is_control()).take(200).collect::<String>()
        })
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| format!("whatsapp-{}.{extension}", m.kind));
    let mut out =
        vec![("", MessageBody::Attachment { blob: hash.reference(), file_name, mime: info.mime, size: info.size })];
    if let Some(caption) = media.caption.as_ref().filter(|c| !c.trim().is_empty()) {
        out.push(("-caption", MessageBody::Text { text: caption.clone() }));
    }
    Ok(out)
}

/// Downloads a customer's media: its URL from `{api_base}/{media_id}`, then the file, both with the
/// access token. Failures are errors (the webhook answers 503 and WhatsApp retries).
async fn fetch_media(config: &WhatsAppConfig, media_id: &str, max: usize) -> Result<(Vec<u8>, String), String> {
    if media_id.is_empty() || !media_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(format!("invalid media id {media_id:?}"));
    }
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().map_err(|e| e.to_string())?;
    let meta: serde_json::Value = client
        .get(format!("{}/{media_id}", config.api_base.trim_end_matches('/')))
        .bearer_auth(&config.access_token)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| format!("WhatsApp media {media_id}: {e}"))?
        .json()
        .await
        .map_err(|e| format!("WhatsApp media {media_id}: {e}"))?;
    let url = meta["url"].as_str().ok_or_else(|| format!("WhatsApp media {media_id}: no url"))?;
    let mime = meta["mime_type"].as_str().unwrap_or("application/octet-stream").to_owned();
    let response = client
        .get(url)
        .bearer_auth(&config.access_token)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| format!("WhatsApp media {media_id}: {e}"))?;
    if response.content_length().is_some_and(|n| n as usize > max) {
        return Ok((Vec::new(), mime));
    }
    let bytes = response.bytes().await.map_err(|e| format!("WhatsApp media {media_id}: {e}"))?;
    Ok((bytes.to_vec(), mime))
}

async fn blocking<T: Send + 'static>(
    relay: &Arc<Relay>,
    f: impl FnOnce(&crate::store::Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, String> {
    relay.blocking(f).await.map_err(|e| e.to_string())
}

/// The Graph API request body for a crew message to `to` (the contact's WhatsApp id).
pub fn outbound_payload(to: &str, body: &MessageBody) -> serde_json::Value {
    match body {
        MessageBody::WhatsAppTemplate { template, language, params, .. } => serde_json::json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
            "type": "template",
            "template": {
                "name": template,
                "language": { "code": language },
                "components": if params.is_empty() { serde_json::json!([]) } else { serde_json::json!([{
                    "type": "body",
                    "parameters": params.iter().map(|p| serde_json::json!({ "type": "text", "text": p })).collect::<Vec<_>>(),
                }]) },
            },
        }),
        // Files go up to WhatsApp's media endpoint when sent (see `media_message`); the row keeps
        // which blob to upload.
        MessageBody::Attachment { blob, file_name, mime, .. } => serde_json::json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
            "type": if mime == "image/jpeg" || mime == "image/png" { "image" } else { "document" },
            "crewdesk_blob": { "reference": blob, "mime": mime, "file_name": file_name },
        }),
        body => serde_json::json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
            "type": "text",
            "text": { "preview_url": false, "body": body.text_content() },
        }),
    }
}

/// For a file: uploads it to `{api_base}/{phone_number_id}/media` and returns the message that
/// refers to WhatsApp's media id. Other messages go out as they are.
async fn media_message(
    relay: &Relay,
    client: &reqwest::Client,
    config: &WhatsAppConfig,
    row: &crate::store::QueuedWhatsApp,
) -> Result<String, WhatsAppOutcome> {
    let payload = row.payload.as_str();
    let Ok(mut message) = serde_json::from_str::<serde_json::Value>(payload) else {
        return Err(WhatsAppOutcome::Failed { reason: "the queued message is damaged".into() });
    };
    let Some(blob) = message.as_object_mut().and_then(|m| m.remove("crewdesk_blob")) else {
        return Ok(payload.to_owned());
    };
    let field = |k: &str| blob.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let (mime, file_name) = (field("mime"), field("file_name"));
    // Rows queued before file references were kept whole carry the bare hash.
    let hash = match field("reference") {
        r if !r.is_empty() => BlobHash::from_reference(&r),
        _ => BlobHash::parse(&field("hash")),
    };
    let Ok(hash) = hash else {
        return Err(WhatsAppOutcome::Failed { reason: "the message names no valid file".into() });
    };
    let dir = relay.config().blob_dir();
    // The sender's app uploads the file after the message (perhaps through another relay instance):
    // until it is here, try again later; a file never uploaded into this conversation is not sent.
    let Some(bytes) = crate::blobs::read_blob(relay.store(), &dir, &row.doc_id, &hash, false).await else {
        if Timestamp::now().0 - row.created_at > crate::mailer::ATTACHMENT_WAIT_MS {
            return Err(WhatsAppOutcome::Failed { reason: format!("{file_name} was never uploaded") });
        }
        return Err(WhatsAppOutcome::Retry);
    };
    let part = reqwest::multipart::Part::bytes(bytes).file_name(file_name.clone()).mime_str(&mime);
    let Ok(part) = part else { return Err(WhatsAppOutcome::Failed { reason: format!("unusable file type {mime}") }) };
    let form = reqwest::multipart::Form::new()
        .text("messaging_product", "whatsapp")
        .text("type", mime.clone())
        .part("file", part);
    let url = format!("{}/{}/media", config.api_base.trim_end_matches('/'), config.phone_number_id);
    let response = client.post(url).bearer_auth(&config.access_token).multipart(form).send().await;
    let id = match outcome_of(response).await {
        Ok(body) => body.get("id").and_then(|v| v.as_str()).unwrap_or_default().to_owned(),
        Err(outcome) => return Err(outcome),
    };
    let kind = message.get("type").and_then(|v| v.as_str()).unwrap_or("document").to_owned();
    let media = if kind == "image" {
        serde_json::json!({ "id": id })
    } else {
        serde_json::json!({ "id": id, "filename": file_name })
    };
    message[kind.as_str()] = media;
    Ok(message.to_string())
}

/// The outbox rows for the crew messages a change added to a WhatsApp conversation. The 24 h
/// window is checked now, against the customer's last message in the document.
pub fn outbound_rows(doc_id: &str, header: &doc::DocHeader, added: &[Message], all: &[Message]) -> Vec<QueuedWhatsApp> {
    let Some(to) = header.customer.phone.as_deref().map(|p| p.trim_start_matches('+').to_owned()) else {
        return Vec::new();
    };
    let last_customer = all.iter().filter(|m| m.author == Author::Customer).map(|m| m.at).max();
    let now = Timestamp::now();
    added
        .iter()
        .filter(|m| m.reaches_customer())
        .map(|m| QueuedWhatsApp {
            message_id: format!("{doc_id}/{}", m.id),
            doc_id: doc_id.to_owned(),
            payload: outbound_payload(&to, &m.body).to_string(),
            refused: may_deliver_on_whatsapp(last_customer, &m.body, now).err().map(|e| e.to_string()),
            created_at: now.0,
        })
        .collect()
}

/// Sends queued crew messages to the Graph API until the relay stops.
pub async fn run(relay: Arc<Relay>, config: WhatsAppConfig, wake: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(20)).build() {
        Ok(c) => c,
        Err(e) => {
            warn!(%e, "no HTTP client for WhatsApp; outbound WhatsApp messages stay queued");
            return;
        }
    };
    let url = format!("{}/{}/messages", config.api_base.trim_end_matches('/'), config.phone_number_id);
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = crate::relay::stopped(&mut stop) => return,
        }
        let Ok(due) = blocking(&relay, |s| s.due_whatsapp(Timestamp::now().0)).await else { continue };
        for row in due {
            let outcome = match &row.refused {
                Some(reason) => WhatsAppOutcome::Failed { reason: reason.clone() },
                None => match media_message(&relay, &client, &config, &row).await {
                    Ok(payload) => send(&client, &url, &config.access_token, &payload).await,
                    Err(outcome) => outcome,
                },
            };
            if let WhatsAppOutcome::Failed { reason } = &outcome {
                warn!(message = %row.message_id, %reason, "WhatsApp message not delivered");
                let note = Message {
                    id: doc::new_message_id(&mut rand::rng()),
                    at: Timestamp::now(),
                    author: Author::System,
                    body: MessageBody::Text { text: format!("Not delivered on WhatsApp: {reason}") },
                };
                if let Err(e) = relay.change_as_relay(&row.doc_id, |tx| doc::add_message(tx, &note)).await {
                    warn!(%e, "the delivery failure could not be noted in the conversation");
                }
            }
            let id = row.message_id.clone();
            if let Err(e) = blocking(&relay, move |s| s.whatsapp_attempted(&id, &outcome, Timestamp::now().0)).await {
                warn!(%e, "WhatsApp outbox not updated");
            }
        }
    }
}

/// One attempt: 2xx is sent, 4xx is WhatsApp refusing this message (final), anything else is retried.
async fn send(client: &reqwest::Client, url: &str, token: &str, payload: &str) -> WhatsAppOutcome {
    let response = client
        .post(url)
        .bearer_auth(token)
        .header(header::CONTENT_TYPE, "application/json")
        .body(payload.to_owned())
        .send()
        .await;
    match outcome_of(response).await {
        Ok(body) => WhatsAppOutcome::Sent {
            wamid: body.pointer("/messages/0/id").and_then(|v| v.as_str()).unwrap_or_default().to_owned(),
        },
        Err(outcome) => outcome,
    }
}

/// A Graph API answer: its JSON body on 2xx; a final failure on 4xx (but 429); retry otherwise.
async fn outcome_of(response: Result<reqwest::Response, reqwest::Error>) -> Result<serde_json::Value, WhatsAppOutcome> {
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            warn!(%e, "WhatsApp API unreachable; will retry");
            return Err(WhatsAppOutcome::Retry);
        }
    };
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if status.is_success() {
        Ok(body)
    } else if status.is_client_error() && status != reqwest::StatusCode::TOO_MANY_REQUESTS {
        let reason = body.pointer("/error/message").and_then(|v| v.as_str()).unwrap_or("refused by WhatsApp");
        Err(WhatsAppOutcome::Failed { reason: format!("{reason} (HTTP {})", status.as_u16()) })
    } else {
        warn!(%status, "WhatsApp API error; will retry");
        Err(WhatsAppOutcome::Retry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crewdesk::domain::{AgentId, Channel, Customer, CustomerId, MessageId};

    #[test]
    fn internal_notes_and_hand_overs_are_never_queued_for_whatsapp() {
        let now = Timestamp::now();
        let new = doc::NewConversation {
            id: "2jQ5Vc7u9o1Wk6Bq3TXYtY7cWKdV".into(),
            team: "sales".into(),
            channel: Channel::WhatsApp,
            customer: Customer {
                id: CustomerId("wa-4712345678".into()),
                name: "Maya".into(),
                email: None,
                phone: Some("+4712345678".into()),
                notes: None,
            },
            created_at: now,
        };
        let header = doc::read_header(&doc::create(automerge::ActorId::random(), &new).unwrap()).unwrap();
        let message =
            |id: &str, author: Author, body: MessageBody| Message { id: MessageId(id.into()), at: now, author, body };
        let bob = || Author::Crew { agent: AgentId::from("bob") };
        let asked = message("c1", Author::Customer, MessageBody::Text { text: "Hi".into() });
        let note = message("n1", bob(), MessageBody::Note { text: "VIP customer".into() });
        let reply = message("r1", bob(), MessageBody::Text { text: "Hello Maya".into() });
        let handover = message("h1", bob(), MessageBody::Transfer { to: AgentId::from("carol") });
        let added = [note.clone(), reply.clone(), handover.clone()];
        let rows = outbound_rows(new.id.as_str(), &header, &added, &[asked, note, reply, handover]);
        assert_eq!(rows.len(), 1, "only the reply goes to WhatsApp (no note, no hand-over)");
        assert!(rows[0].message_id.ends_with("/r1"), "{}", rows[0].message_id);
        assert!(!rows[0].payload.contains("VIP"), "{}", rows[0].payload);
    }
}
