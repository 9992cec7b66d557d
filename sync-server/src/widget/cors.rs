//! Where a team's widget may run: each team lists origins (`sync-server team T --widget-origin
//! https://shop.example.com`). Browsers send `Origin` with every cross-origin request and every
//! WebSocket; the relay answers CORS preflights and adds `Access-Control-Allow-Origin` only for
//! the team's listed origins, so a page elsewhere cannot use the team's widget key. Requests without
//! `Origin` come from programs, not browsers (which can send anything anyway) and pass.

use crate::relay::Relay;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OriginError {
    #[error("`{0}`: an origin starts with http:// or https://")]
    Scheme(String),
    #[error("`{0}`: an origin is scheme://host[:port] only, without a path, query or user")]
    Shape(String),
    #[error("`{0}`: the host is not a valid host name or address")]
    Host(String),
    #[error("`{0}`: the port must be a number from 1 to 65535")]
    Port(String),
}

/// An origin as browsers send it: lowercase `scheme://host[:port]`, without the scheme's default
/// port. A trailing `/` is forgiven (people paste URLs).
pub fn normalize_origin(input: &str) -> Result<String, OriginError> {
    let s = input.trim();
    let shown = || s.chars().take(100).collect::<String>();
    let lower = s.to_ascii_lowercase();
    let (scheme, rest, default_port) = if let Some(rest) = lower.strip_prefix("https://") {
        ("https", rest, 443)
    } else if let Some(rest) = lower.strip_prefix("http://") {
        ("http", rest, 80)
    } else {
        return Err(OriginError::Scheme(shown()));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', '\\', ' ']) || rest.len() > 260 {
        return Err(OriginError::Shape(shown()));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or_else(|| OriginError::Host(shown()))?;
        addr.parse::<std::net::Ipv6Addr>().map_err(|_| OriginError::Host(shown()))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| OriginError::Shape(shown()))?),
        };
        (format!("[{addr}]"), port)
    } else {
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.is_empty() || !host.split('.').all(label_ok) {
            return Err(OriginError::Host(shown()));
        }
        (host.to_owned(), port)
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(OriginError::Port(shown())),
            Ok(p) if p == default_port => None,
            Ok(p) => Some(p),
        },
    };
    Ok(match port {
        Some(p) => format!("{scheme}://{host}:{p}"),
        None => format!("{scheme}://{host}"),
    })
}

/// What the relay decided about a request's `Origin`, for the handlers (the WebSocket tells a
/// refused page why in its first frame; the settings route answers refused pages readably).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OriginCheck {
    /// No `Origin` (not a browser), or one the team lists.
    Allowed,
    /// A browser page on an origin the team does not list.
    Refused { origin: String },
}

impl OriginCheck {
    pub fn refusal(origin: &str) -> String {
        format!(
            "This chat is not enabled on {origin}. The team's admin can allow this site with \
             `sync-server team TEAM --widget-origin {origin}`."
        )
    }
}

/// The widget key or session a request is about (the path `/api/widget/{key}/…` or `?session=`).
fn scope(request: &Request) -> Option<Scope> {
    let path = request.uri().path();
    let rest = path.strip_prefix("/api/widget/")?;
    if let Some((key, _)) = rest.split_once('/')
        && key != "blobs"
    {
        return Some(Scope::Key(key.chars().take(100).collect()));
    }
    let query = request.uri().query()?;
    let session = query.split('&').find_map(|kv| kv.strip_prefix("session="))?;
    Some(Scope::Session(session.chars().take(200).collect()))
}

enum Scope {
    Key(String),
    Session(String),
}

const ALLOW_HEADERS: &str = "content-type, x-file-name";

/// CORS for the widget's routes: preflights answered for listed origins only, responses to listed
/// origins marked readable, and the verdict left in the request for the handlers.
pub async fn layer(State(relay): State<Arc<Relay>>, mut request: Request, next: Next) -> Response {
    let origin = request.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let preflight = request.method() == Method::OPTIONS;
    let Some(origin) = origin else {
        if preflight {
            return StatusCode::NO_CONTENT.into_response();
        }
        request.extensions_mut().insert(OriginCheck::Allowed);
        return next.run(request).await;
    };
    // An unknown key or session is no team's: its handler refuses it readably ("unknown widget
    // key"), which tells a site owner with a wrong snippet what is wrong and nobody anything else.
    let allowed = match scope(&request) {
        None => false,
        Some(scope) => match allowed_origins(&relay, scope).await {
            None => true,
            Some(listed) => normalize_origin(&origin).is_ok_and(|o| listed.contains(&o)),
        },
    };
    if preflight {
        if !allowed {
            return (StatusCode::FORBIDDEN, OriginCheck::refusal(&origin)).into_response();
        }
        let mut response = StatusCode::NO_CONTENT.into_response();
        let h = response.headers_mut();
        allow(h, &origin);
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST"));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOW_HEADERS));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        return response;
    }
    let check = if allowed { OriginCheck::Allowed } else { OriginCheck::Refused { origin: origin.clone() } };
    request.extensions_mut().insert(check);
    // The settings route tells a refused page why (readably: it carries nothing else); every other
    // route answers a refused page unreadably, or (WebSocket) with an error frame.
    let settings_route = request.uri().path().ends_with("/settings");
    let websocket = request.headers().contains_key(header::UPGRADE);
    if !allowed && !settings_route && !websocket {
        let mut response =
            (StatusCode::FORBIDDEN, axum::Json(serde_json::json!({ "error": OriginCheck::refusal(&origin) })))
                .into_response();
        response.headers_mut().insert(header::VARY, HeaderValue::from_static("origin"));
        return response;
    }
    let mut response = next.run(request).await;
    if allowed || settings_route {
        allow(response.headers_mut(), &origin);
    }
    response
}

fn allow(h: &mut HeaderMap, origin: &str) {
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.insert(header::VARY, HeaderValue::from_static("origin"));
}

/// The origins listed by the team the key or session belongs to; `None` for unknown ones.
async fn allowed_origins(relay: &Arc<Relay>, scope: Scope) -> Option<Vec<String>> {
    let widget = match scope {
        Scope::Key(key) => super::settings_by_key(relay, key).await?,
        Scope::Session(token) => super::session(relay, token).await?.settings,
    };
    Some(widget.origins)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_normalized_as_browsers_send_them() {
        assert_eq!(normalize_origin("https://Shop.Example.com/").unwrap(), "https://shop.example.com");
        assert_eq!(normalize_origin("https://shop.example.com:443").unwrap(), "https://shop.example.com");
        assert_eq!(normalize_origin("http://127.0.0.1:8088").unwrap(), "http://127.0.0.1:8088");
        assert_eq!(normalize_origin("http://[::1]:8080").unwrap(), "http://[::1]:8080");
        assert_eq!(normalize_origin("http://localhost:80").unwrap(), "http://localhost");
        for bad in [
            "shop.example.com",
            "ftp://shop.example.com",
            "https://shop.example.com/path",
            "https://user@shop.example.com",
            "https://shop.example.com:0",
            "https://shop.example.com:99999",
            "https://",
            "https://-bad-.com",
            "https://shop.example.com?x=1",
            "null",
        ] {
            assert!(normalize_origin(bad).is_err(), "{bad}");
        }
    }
}
