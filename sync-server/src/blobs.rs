//! Attachments: a content-addressed blob store on the relay. Files live under
//! `<data_dir>/blobs/<aa>/<sha256>` (written to a temporary file, fsynced, then renamed), image
//! thumbnails under `<data_dir>/blobs/thumbs/<sha256>.png`, and SQLite records each blob and the
//! conversations it was sent in. Agents upload with their token into a conversation of their
//! teams; widget customers upload into their own conversation. A download is allowed exactly when
//! the conversation it was sent in is: anything else is a 404, like a missing file.

use crate::images::ImageError;
use crate::relay::{Relay, TokenQuery, bearer};
use crate::store::{BlobInfo, Store};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use crewdesk::domain::attachment::BlobHash;
use crewdesk::domain::{Author, Message, MessageBody, Timestamp};
use crewdesk::replica::doc;
use std::io::Write;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

pub fn routes(max_bytes: usize) -> Router<Arc<Relay>> {
    Router::new()
        .route("/api/conversations/{doc}/blobs/{hash}", get(agent_download).put(agent_upload))
        .layer(DefaultBodyLimit::max(max_bytes))
}

/// The widget customers' file routes (behind the widget's origin check, see `widget::routes`).
pub(crate) fn widget_routes(max_bytes: usize) -> Router<Arc<Relay>> {
    Router::new()
        .route("/api/widget/blobs", post(widget_upload))
        .route("/api/widget/blobs/{hash}", get(widget_download))
        .layer(DefaultBodyLimit::max(max_bytes))
}

fn bad(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn not_found() -> Response {
    bad(StatusCode::NOT_FOUND, "no such file in this conversation")
}

/// Where a file lives: built from a [`BlobHash`] only, never from text a client sent.
pub(crate) fn blob_path(dir: &FsPath, hash: &BlobHash) -> PathBuf {
    dir.join(hash.shard()).join(hash.as_str())
}

pub(crate) fn thumb_path(dir: &FsPath, hash: &BlobHash) -> PathBuf {
    dir.join("thumbs").join(format!("{hash}.png"))
}

/// A blob's bytes (or its thumbnail's), when it was sent in conversation `doc_id`: the file in
/// this relay's `dir`, or, when it was stored through another relay instance, the shared store's
/// copy (kept in `dir` from then on). `None` while nobody has uploaded it into that conversation,
/// so a message can never reach a file of another conversation or team by naming its hash.
pub(crate) async fn read_blob(
    store: &Arc<Store>,
    dir: &FsPath,
    doc_id: &str,
    hash: &BlobHash,
    thumbnail: bool,
) -> Option<Vec<u8>> {
    let (s, h, d) = (store.clone(), hash.as_str().to_owned(), doc_id.to_owned());
    tokio::task::spawn_blocking(move || s.blob_in(&h, &d)).await.ok()?.ok()??;
    let path = match thumbnail {
        true => thumb_path(dir, hash),
        false => blob_path(dir, hash),
    };
    if let Ok(bytes) = tokio::fs::read(&path).await {
        return Some(bytes);
    }
    let (s, h) = (store.clone(), hash.as_str().to_owned());
    let bytes = tokio::task::spawn_blocking(move || s.blob_bytes(&h, thumbnail)).await.ok()?.ok()??;
    let copy = bytes.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = write_durably(&path, &copy) {
            tracing::debug!(%e, "attachment not cached locally");
        }
    });
    Some(bytes)
}

/// Writes `bytes` to `path` durably and privately (0600 in 0700 directories): temporary file,
/// fsync, rename, fsync of the directory.
fn write_durably(path: &FsPath, bytes: &[u8]) -> std::io::Result<()> {
    let parent = path.parent().ok_or_else(|| std::io::Error::other("no parent directory"))?;
    crate::private::dir(parent)?;
    let tmp = parent.join(format!(".{}.tmp", rand::random::<u64>()));
    let mut f = crate::private::create_file(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(parent)?.sync_all()
}

/// Checks and stores an upload sent in `doc_id`. `expected` is the hash the uploader named.
async fn store_upload(
    relay: &Arc<Relay>,
    doc_id: &str,
    declared: &str,
    bytes: Bytes,
    expected: Option<&BlobHash>,
) -> Result<BlobInfo, Response> {
    store_bytes(relay, doc_id, declared, bytes, expected)
        .await
        .map(|(_, info)| info)
        .map_err(|(status, e)| bad(status, e))
}

/// Checks a file (hash, type from its content, size, pixels, the team's quota), stores it durably
/// with its thumbnail and records that it was sent in `doc_id`. Nothing is written before every
/// check has passed. Errors carry the HTTP status that fits them.
pub(crate) async fn store_bytes(
    relay: &Arc<Relay>,
    doc_id: &str,
    declared: &str,
    bytes: Bytes,
    expected: Option<&BlobHash>,
) -> Result<(BlobHash, BlobInfo), (StatusCode, String)> {
    if bytes.is_empty() {
        return Err((StatusCode::BAD_REQUEST, "the file is empty".into()));
    }
    if bytes.len() > relay.config().max_blob_bytes {
        return Err((StatusCode::PAYLOAD_TOO_LARGE, "the file is larger than this relay accepts".into()));
    }
    let (declared, expected, b) = (declared.to_owned(), expected.cloned(), bytes.clone());
    let (hash, mime) = tokio::task::spawn_blocking(move || -> Result<(BlobHash, String), (StatusCode, String)> {
        let hash = BlobHash::of(&b);
        if expected.as_ref().is_some_and(|e| *e != hash) {
            return Err((StatusCode::BAD_REQUEST, "the content does not match the hash in the address".into()));
        }
        let mime = crewdesk::domain::attachment::accepted_type(&declared, &b)
            .map_err(|e| (StatusCode::UNSUPPORTED_MEDIA_TYPE, e))?;
        Ok((hash, mime))
    })
    .await
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    check_quota(relay, doc_id, &hash, bytes.len() as u64).await?;
    let thumb = match mime.starts_with("image/") {
        true => Some(relay.images.thumbnail(bytes.clone(), relay.config().max_image_pixels).await.map_err(|e| {
            let status = match e {
                ImageError::TooManyPixels { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                ImageError::Unreadable(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ImageError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            };
            (status, e.to_string())
        })?),
        false => None,
    };
    let dir = relay.config().blob_dir();
    let info = BlobInfo { hash: hash.as_str().to_owned(), size: bytes.len() as u64, mime, thumbnail: thumb.is_some() };
    let (h, t, b) = (hash.clone(), thumb.clone(), bytes.clone());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let path = blob_path(&dir, &h);
        if !path.exists() {
            write_durably(&path, &b)?;
        }
        if let Some(t) = &t {
            write_durably(&thumb_path(&dir, &h), t)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("the file could not be stored: {e}")))?;
    let (stored, doc_id) = (info.clone(), doc_id.to_owned());
    relay
        .blocking(move |s| s.put_blob(&stored, &doc_id, &bytes, thumb.as_deref()))
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("the file could not be recorded: {e}")))?;
    Ok((hash, info))
}

/// Refuses a file that would take the conversation's team over its storage quota (a file the
/// team already holds costs nothing). Two uploads at the same moment may both pass: the quota can
/// be exceeded by at most a few files, never by a growing amount.
async fn check_quota(relay: &Arc<Relay>, doc_id: &str, hash: &BlobHash, size: u64) -> Result<(), (StatusCode, String)> {
    let quota = relay.config().team_blob_quota_bytes;
    let (d, h) = (doc_id.to_owned(), hash.as_str().to_owned());
    let usage = relay
        .blocking(move |s| match s.document_team(&d)? {
            Some(team) => s.team_blob_usage(&team, &h).map(|u| Some((team, u))),
            None => Ok(None),
        })
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("the file could not be checked: {e}")))?;
    let Some((team, (used, already))) = usage else {
        return Err((StatusCode::NOT_FOUND, "no such conversation".into()));
    };
    if !already && used.saturating_add(size) > quota {
        tracing::warn!(team = %team.0, used, size, quota, "a file was refused: the team's storage quota is used up");
        return Err((
            StatusCode::INSUFFICIENT_STORAGE,
            format!(
                "this team's file storage is full ({} of {} used; this file needs {}); ask the relay's operator to raise team_blob_quota_bytes",
                human_bytes(used),
                human_bytes(quota),
                human_bytes(size)
            ),
        ));
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    match n as f64 {
        b if b >= 1024.0 * MIB => format!("{:.1} GiB", b / (1024.0 * MIB)),
        b if b >= MIB => format!("{:.1} MiB", b / MIB),
        b if b >= 1024.0 => format!("{:.1} KiB", b / 1024.0),
        _ => format!("{n} bytes"),
    }
}

#[derive(serde::Deserialize)]
struct DownloadQuery {
    token: Option<String>,
    session: Option<String>,
    thumbnail: Option<String>,
}

/// Serves a blob sent in `doc_id` (or its thumbnail) as a download, never as a page.
async fn serve(relay: &Arc<Relay>, doc_id: String, hash: String, want_thumbnail: bool) -> Response {
    let Ok(hash) = BlobHash::parse(&hash) else { return not_found() };
    let (h, d) = (hash.as_str().to_owned(), doc_id.clone());
    let Ok(Some(info)) = relay.blocking(move |s| s.blob_in(&h, &d)).await else { return not_found() };
    let mime = match want_thumbnail {
        true if info.thumbnail => "image/png".to_owned(),
        true => return not_found(),
        false => info.mime,
    };
    let dir = relay.config().blob_dir();
    let Some(bytes) = read_blob(relay.store(), &dir, &doc_id, &hash, want_thumbnail).await else { return not_found() };
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    let content_type = HeaderValue::from_str(&mime).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox; default-src 'none'"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=31536000, immutable"));
    if !mime.starts_with("image/") {
        headers.insert(header::CONTENT_DISPOSITION, HeaderValue::from_static("attachment"));
    }
    response
}

/// The conversation's id when the token's agent belongs to its team; `None` looks like "missing".
async fn agent_conversation(
    relay: &Arc<Relay>,
    headers: &HeaderMap,
    token: Option<String>,
    from: std::net::IpAddr,
    doc_id: &str,
) -> Option<()> {
    let q = TokenQuery { token };
    let agent = relay.sign_in(bearer(headers, &q), from).await.ok()?.agent;
    let id = doc_id.to_owned();
    let team = relay.blocking(move |s| s.document_team(&id)).await.ok()??;
    agent.role_in(&team).map(|_| ())
}

async fn agent_upload(
    State(relay): State<Arc<Relay>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    Path((doc_id, hash)): Path<(String, String)>,
    Query(q): Query<DownloadQuery>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let Ok(hash) = BlobHash::parse(&hash) else {
        return bad(StatusCode::BAD_REQUEST, "the address must end with the file's sha256 in lowercase hex");
    };
    if agent_conversation(&relay, &headers, q.token, relay.client_address(peer.ip(), &headers), &doc_id).await.is_none()
    {
        return bad(StatusCode::NOT_FOUND, "no such conversation");
    }
    // Read only once the sender is known.
    let body = match crate::relay::gate::read_body(body, relay.config().max_blob_bytes).await {
        Ok(b) => b,
        Err((status, e)) => return bad(status, e),
    };
    let declared = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    match store_upload(&relay, &doc_id, declared, body, Some(&hash)).await {
        Ok(info) => (StatusCode::CREATED, axum::Json(info)).into_response(),
        Err(r) => r,
    }
}

async fn agent_download(
    State(relay): State<Arc<Relay>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    Path((doc_id, hash)): Path<(String, String)>,
    Query(q): Query<DownloadQuery>,
    headers: HeaderMap,
) -> Response {
    if agent_conversation(&relay, &headers, q.token, relay.client_address(peer.ip(), &headers), &doc_id).await.is_none()
    {
        return not_found();
    }
    serve(&relay, doc_id, hash, q.thumbnail.is_some()).await
}

async fn widget_doc(relay: &Arc<Relay>, session: Option<String>) -> Option<String> {
    let token = session?;
    relay.blocking(move |s| s.widget_session(&token)).await.ok()?.map(|(doc, _)| doc)
}

/// A widget customer sends a file: stored, then added to their conversation as a message.
async fn widget_upload(
    State(relay): State<Arc<Relay>>,
    Query(q): Query<DownloadQuery>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let Some(doc_id) = widget_doc(&relay, q.session).await else {
        return bad(StatusCode::UNAUTHORIZED, "unknown session");
    };
    if !relay.allow_widget_upload(&doc_id).await {
        return bad(StatusCode::TOO_MANY_REQUESTS, "too many files in a short time; wait a few minutes");
    }
    // Read only once the session is known.
    let body = match crate::relay::gate::read_body(body, relay.config().max_blob_bytes).await {
        Ok(b) => b,
        Err((status, e)) => return bad(status, e),
    };
    let declared = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let name = headers.get("x-file-name").and_then(|v| v.to_str().ok()).map(percent_decode).unwrap_or_default();
    let file_name: String =
        name.rsplit(['/', '\\']).next().unwrap_or("").chars().filter(|c| !c.is_control()).take(200).collect();
    let file_name = if file_name.trim().is_empty() { "file".to_owned() } else { file_name };
    let (hash, info) = match store_bytes(&relay, &doc_id, declared, body, None).await {
        Ok(stored) => stored,
        Err((status, e)) => return bad(status, e),
    };
    let message = Message {
        id: doc::new_message_id(&mut rand::rng()),
        at: Timestamp::now(),
        author: Author::Customer,
        body: MessageBody::Attachment { blob: hash.reference(), file_name, mime: info.mime.clone(), size: info.size },
    };
    match relay.change_as_relay(&doc_id, |tx| doc::add_message(tx, &message)).await {
        Ok(()) => (StatusCode::CREATED, axum::Json(info)).into_response(),
        Err(e) => bad(StatusCode::SERVICE_UNAVAILABLE, format!("the file was stored but not sent: {e}")),
    }
}

async fn widget_download(
    State(relay): State<Arc<Relay>>,
    Path(hash): Path<String>,
    Query(q): Query<DownloadQuery>,
) -> Response {
    let Some(doc_id) = widget_doc(&relay, q.session).await else { return not_found() };
    serve(&relay, doc_id, hash, q.thumbnail.is_some()).await
}

/// `%XX` escapes (the widget sends file names with encodeURIComponent); bad escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (bytes.get(i + 1).and_then(|b| hex(*b)), bytes.get(i + 2).and_then(|b| hex(*b)))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_percent_decoded() {
        assert_eq!(percent_decode("Rechnung%20M%C3%A4rz.pdf"), "Rechnung März.pdf");
        assert_eq!(percent_decode("100%.txt"), "100%.txt");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
