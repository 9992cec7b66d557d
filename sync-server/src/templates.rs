//! A team's 📃 message templates, managed by its admins from the desk:
//!
//! - `PUT /api/teams/{team}/templates` `{"templates": [{"name", "text"}, ...]}` replaces the list
//!   (the last admin to save wins, as in any settings form); the core checks it
//!   (`crewdesk::domain::checked_templates`) and the answer is the saved list. Only admins of the
//!   team; a representative hears 403, anyone else 404. Desks get the new list when they next
//!   connect (`GET /api/me`); the desk that saved it takes the answer at once.

use crate::import::{an_agent, answer, json_within, require_admin};
use crate::relay::{Relay, TokenQuery};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use crewdesk::domain::{MessageTemplate, TeamId, checked_templates};
use std::sync::Arc;

pub fn routes() -> Router<Arc<Relay>> {
    Router::new().route("/api/teams/{team}/templates", put(save_templates))
}

/// A team's templates as JSON (twice the text limit, for JSON's escapes).
const MAX_TEMPLATES_REQUEST: usize = 2 * crewdesk::domain::MAX_TEMPLATES_BYTES + 64 * 1024;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Templates {
    templates: Vec<TemplateIn>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateIn {
    name: String,
    text: String,
}

async fn save_templates(
    State(relay): State<Arc<Relay>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    Path(team): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let agent = match an_agent(&relay, &headers, q.token, peer).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let team = TeamId(team);
    if let Err(r) = require_admin(&agent, &team, "manage its templates") {
        return *r;
    }
    let body: Templates = match json_within(body, MAX_TEMPLATES_REQUEST).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let templates = body.templates.into_iter().map(|t| MessageTemplate { name: t.name, text: t.text }).collect();
    let templates = match checked_templates(templates) {
        Ok(t) => t,
        Err(e) => return answer(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let saved = relay
        .blocking(move |s| {
            let Some(mut t) = s.teams()?.into_iter().find(|t| t.id == team) else {
                return Ok(None);
            };
            t.templates = templates;
            s.put_team(&t)?;
            Ok(Some(t.templates))
        })
        .await;
    match saved {
        Ok(Some(templates)) => axum::Json(serde_json::json!({ "templates": templates })).into_response(),
        Ok(None) => answer(StatusCode::NOT_FOUND, "no such team or conversation"),
        Err(e) => {
            tracing::warn!(%e, "cannot save a team's templates");
            answer(StatusCode::INTERNAL_SERVER_ERROR, "the templates could not be saved; try again")
        }
    }
}
