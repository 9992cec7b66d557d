//! Import for team admins: conversations and customer messages that reach the team outside the
//! relay's own channels (another help desk's history, an email gateway, a script). Customer
//! messages are written by the relay only: through the widget, the WhatsApp webhook, or here, by an
//! admin of the conversation's team. Replicas never write them (the relay refuses such changes).
//!
//! - `POST /api/import/conversations` `{team, channel, customer: {name, email?, phone?}, text, id?, at?}`
//!   starts a conversation with the customer's first message; answers `{conversation}`.
//! - `POST /api/import/conversations/{id}/messages` `{text, id?, at?}` adds a customer message. With
//!   an `id` the import is idempotent: a message id already in the conversation is left as it is.

use crate::relay::{Relay, SignInError, TokenQuery, bearer};
use crate::store::Agent;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use crewdesk::domain::{
    Author, Channel, Customer, CustomerEdit, CustomerId, Message, MessageBody, MessageId, Role, TeamId, Timestamp,
};
use crewdesk::replica::doc::{self, NewConversation};
use std::sync::Arc;

pub fn routes() -> Router<Arc<Relay>> {
    Router::new()
        .route("/api/import/conversations", post(import_conversation))
        .route("/api/import/conversations/{id}/messages", post(import_message))
}

pub(crate) fn answer(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message.into() }))).into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomerIn {
    name: String,
    email: Option<String>,
    phone: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewImport {
    team: TeamId,
    channel: Channel,
    customer: CustomerIn,
    text: String,
    id: Option<String>,
    at: Option<i64>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageImport {
    text: String,
    id: Option<String>,
    at: Option<i64>,
}

/// Largest import request (a message is at most 64 KiB of text, plus the customer's details).
const MAX_IMPORT_BYTES: usize = 256 * 1024;

/// The agent of the request's token: decided before the body is read, so nobody without a token
/// can make the relay wait for one (whether they are an admin of the team is decided after).
pub(crate) async fn an_agent(
    relay: &Relay,
    headers: &HeaderMap,
    token: Option<String>,
    peer: std::net::SocketAddr,
) -> Result<Agent, Response> {
    let from = relay.client_address(peer.ip(), headers);
    match relay.sign_in(bearer(headers, &TokenQuery { token }), from).await {
        Ok(s) => Ok(s.agent),
        Err(SignInError::Refused) => Err(answer(StatusCode::NOT_FOUND, "no such team or conversation")),
        Err(e) => Err(answer(e.status(), e.to_string())),
    }
}

/// Allowed only to admins of `team` (a representative hears that only admins may `what`); anyone
/// else learns nothing about the team or the conversation.
pub(crate) fn require_admin(agent: &Agent, team: &TeamId, what: &str) -> Result<(), Box<Response>> {
    match agent.role_in(team) {
        Some(Role::Admin) => Ok(()),
        Some(Role::Representative) => {
            Err(Box::new(answer(StatusCode::FORBIDDEN, format!("only admins of the team may {what}"))))
        }
        None => Err(Box::new(answer(StatusCode::NOT_FOUND, "no such team or conversation"))),
    }
}

/// The request's JSON, read only once the sender is known.
async fn json<T: serde::de::DeserializeOwned>(body: axum::body::Body) -> Result<T, Response> {
    json_within(body, MAX_IMPORT_BYTES).await
}

/// The request's JSON, at most `max` bytes of it.
pub(crate) async fn json_within<T: serde::de::DeserializeOwned>(
    body: axum::body::Body,
    max: usize,
) -> Result<T, Response> {
    let bytes = crate::relay::gate::read_body(body, max).await.map_err(|(status, e)| answer(status, e))?;
    serde_json::from_slice(&bytes).map_err(|e| answer(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))
}

/// A customer message from the import: checked like any message, never dated in the future.
fn customer_message(text: String, id: Option<String>, at: Option<i64>) -> Result<Message, String> {
    let body = MessageBody::Text { text };
    body.validate().map_err(|e| e.to_string())?;
    let id = match id {
        Some(id)
            if id.is_empty()
                || id.len() > 100
                || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
        {
            return Err("id: 1 to 100 letters, digits, '-', '_' or '.'".into());
        }
        Some(id) => MessageId(id),
        None => doc::new_message_id(&mut rand::rng()),
    };
    let now = Timestamp::now();
    let at = at.map_or(now, |t| Timestamp(t).min(now));
    Ok(Message { id, at, author: Author::Customer, body })
}

async fn import_conversation(
    State(relay): State<Arc<Relay>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let agent = match an_agent(&relay, &headers, q.token, peer).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let body: NewImport = match json(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(r) = require_admin(&agent, &body.team, "import") {
        return *r;
    }
    let c = body.customer;
    let check =
        CustomerEdit { name: Some(c.name.clone()), email: c.email.clone(), phone: c.phone.clone(), notes: None };
    if let Err(e) = check.validate() {
        return answer(StatusCode::BAD_REQUEST, e.to_string());
    }
    let first = match customer_message(body.text, body.id, body.at) {
        Ok(m) => m,
        Err(e) => return answer(StatusCode::BAD_REQUEST, e),
    };
    let id = doc::new_conversation_id(&mut rand::rng());
    let new = NewConversation {
        id: id.clone(),
        team: body.team,
        channel: body.channel,
        customer: Customer {
            id: CustomerId(format!("import-{}", doc::random_id(&mut rand::rng()))),
            name: c.name.trim().to_owned(),
            email: c.email.filter(|e| !e.trim().is_empty()),
            phone: c.phone.filter(|p| !p.trim().is_empty()),
            notes: None,
        },
        created_at: first.at,
    };
    match relay.create_as_relay(&new, &first).await {
        Ok(()) => (StatusCode::CREATED, axum::Json(serde_json::json!({ "conversation": id }))).into_response(),
        Err(e) => answer(StatusCode::SERVICE_UNAVAILABLE, format!("not imported: {e}")),
    }
}

async fn import_message(
    State(relay): State<Arc<Relay>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let agent = match an_agent(&relay, &headers, q.token, peer).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let doc_id = id.clone();
    let Ok(Some(team)) = relay.blocking(move |s| s.document_team(&doc_id)).await else {
        return answer(StatusCode::NOT_FOUND, "no such team or conversation");
    };
    if let Err(r) = require_admin(&agent, &team, "import") {
        return *r;
    }
    let body: MessageImport = match json(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let message = match customer_message(body.text, body.id, body.at) {
        Ok(m) => m,
        Err(e) => return answer(StatusCode::BAD_REQUEST, e),
    };
    if relay.messages_of(&id).await.is_ok_and(|all| all.iter().any(|m| m.id == message.id)) {
        return (StatusCode::OK, axum::Json(serde_json::json!({ "message": message.id }))).into_response();
    }
    match relay.change_as_relay(&id, |tx| doc::add_message(tx, &message)).await {
        Ok(()) => (StatusCode::CREATED, axum::Json(serde_json::json!({ "message": message.id }))).into_response(),
        Err(e) => answer(StatusCode::SERVICE_UNAVAILABLE, format!("not imported: {e}")),
    }
}
