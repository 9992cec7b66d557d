//! Thin commands: each checks nothing itself; the replica applies the core's rules and the desk
//! view models carry what the UI shows.

use crate::desk::{self, AppState, Desk, Settings, emit_changed};
use crate::error::{CommandError, CommandResult};
use crewdesk::desk::{
    CrewMember, DetailView, ListView, NotificationView, RowView, SessionView, TokenKept, detail_view, row_view,
    team_views,
};
use crewdesk::domain::access::{self, GrabState, JoinKind};
use crewdesk::domain::attachment::BlobHash;
use crewdesk::domain::filter::Filter;
use crewdesk::domain::{AgentId, ConversationId, CustomerEdit, MessageBody, MessageTemplate, TeamId, Timestamp};
use std::sync::Arc;
use sync_client::SyncStatus;
use tauri::{AppHandle, State};

async fn current(state: &State<'_, AppState>) -> CommandResult<Arc<Desk>> {
    state.desk.lock().await.clone().ok_or(CommandError::NotSignedIn)
}

fn session_of(desk: Option<&Desk>) -> SessionView {
    let Some(desk) = desk else { return SessionView::default() };
    let r = desk.lock();
    SessionView {
        signed_in: true,
        agent: Some(CrewMember { id: desk.settings.agent.clone(), name: desk.settings.agent_name.clone() }),
        relay_url: Some(desk.settings.relay_url.clone()),
        teams: team_views(&r.teams(), r.agent()),
        token_kept: (!desk.settings.token_note.is_empty()).then(|| TokenKept {
            in_keyring: desk.settings.token_in == crate::settings::TokenIn::Keyring,
            note: desk.settings.token_note.clone(),
        }),
        opening: false,
    }
}

#[tauri::command]
pub async fn session(state: State<'_, AppState>) -> CommandResult<SessionView> {
    let mut view = session_of(state.desk.lock().await.as_deref());
    view.opening = !view.signed_in && state.opening.load(std::sync::atomic::Ordering::SeqCst);
    Ok(view)
}

/// First run: checks the relay address and token with the relay, remembers them, opens the desk.
#[tauri::command]
pub async fn sign_in(
    app: AppHandle,
    state: State<'_, AppState>,
    relay_url: String,
    token: String,
) -> CommandResult<SessionView> {
    let (agent, agent_name) = desk::who_am_i(&relay_url, &token).await?;
    let settings = Settings::new(&relay_url, &token, agent, agent_name);
    let opened = desk::open(&app, settings, true)?;
    let mut slot = state.desk.lock().await;
    *slot = Some(opened);
    Ok(session_of(slot.as_deref()))
}

/// Signs out (a revoked token, or another agent on this computer): the desk closes, the saved token
/// is forgotten and the window shows the sign-in form. The replica stays on disk: signing in again
/// as the same agent finds every conversation, and what was not synced is sent then.
#[tauri::command]
pub async fn sign_out(app: AppHandle, state: State<'_, AppState>) -> CommandResult<SessionView> {
    let desk = state.desk.lock().await.take();
    if let Some(desk) = desk {
        desk.client.stop();
    }
    desk::forget_settings(&app)?;
    Ok(SessionView::default())
}

fn rows<S: std::borrow::Borrow<crewdesk::domain::status::ConversationSummary>>(
    desk: &Desk,
    listing: &[S],
    now: Timestamp,
) -> CommandResult<Vec<RowView>> {
    let r = desk.lock();
    let seen = r.seen_counts(listing.iter().map(|s| &s.borrow().id))?;
    let (_, unsynced) = r.unsynced()?;
    Ok(listing
        .iter()
        .filter_map(|s| {
            let s = s.borrow();
            let team = r.team(&s.team)?;
            Some(row_view(s, team, r.agent(), now, seen.get(&s.id).copied().unwrap_or(0), unsynced.contains(&s.id)))
        })
        .collect())
}

#[tauri::command]
pub async fn list(state: State<'_, AppState>, filter: Filter, search: Option<String>) -> CommandResult<ListView> {
    let desk = current(&state).await?;
    let now = Timestamp::now();
    let listing = desk.lock().list_search(&filter, now, search.as_deref().unwrap_or(""))?;
    let view = ListView {
        rows: rows(&desk, &listing.rows, now)?,
        total: listing.total,
        offset: listing.offset,
        counts: listing.counts,
    };
    // The window has its list: the sync driver may start (it waits for this at start-up).
    desk.listed.notify_one();
    Ok(view)
}

#[tauri::command]
pub async fn notifications(state: State<'_, AppState>) -> CommandResult<Vec<NotificationView>> {
    let desk = current(&state).await?;
    let now = Timestamp::now();
    let entries = desk.lock().notifications(now);
    // The panel shows these lost grabs now: each leaves a minute after it was first shown.
    let lost: Vec<ConversationId> =
        entries.iter().filter(|(_, g)| *g == GrabState::Lost).map(|(s, _)| s.id.clone()).collect();
    desk.lock().lost_grabs_shown_now(&lost, now)?;
    let summaries: Vec<_> = entries.iter().map(|(s, _)| s.clone()).collect();
    let row_views = rows(&desk, &summaries, now)?;
    let r = desk.lock();
    Ok(entries
        .into_iter()
        .zip(row_views)
        .map(|((s, grab), row)| {
            let may_grab = r.team(&s.team).is_some_and(|t| access::may_grab(t, r.agent(), &s, now).is_ok());
            NotificationView { row, grab, may_grab }
        })
        .collect())
}

#[tauri::command]
pub async fn conversation(
    state: State<'_, AppState>,
    id: ConversationId,
    newest: Option<usize>,
) -> CommandResult<DetailView> {
    let desk = current(&state).await?;
    let now = Timestamp::now();
    let mut r = desk.lock();
    let detail = r.conversation(&id, now)?;
    r.mark_read(&id)?;
    let team = r.team(&detail.summary.team).ok_or_else(|| CommandError::Invalid("unknown team".into()))?;
    let unsynced = r.unsynced()?.1.contains(&id);
    let count = detail.summary.message_count;
    let row = row_view(&detail.summary, team, r.agent(), now, count, unsynced);
    let mut view = detail_view(row, detail.messages, team, r.agent(), now);
    view.refused = r.refusal(&id).map(str::to_owned);
    view.undelivered = r
        .undelivered(&id)?
        .into_iter()
        .map(|u| crewdesk::desk::Undelivered { retrying: u.state == "retry", message: u.message, reason: u.reason })
        .collect();
    // Only the newest messages, when the window asks for them (the rest on "Show earlier").
    if let Some(newest) = newest {
        view.earlier = view.messages.len().saturating_sub(newest);
        view.messages.drain(..view.earlier);
    }
    Ok(view)
}

/// Forgets a message that was not delivered (the agent copied it or does not need it).
#[tauri::command]
pub async fn dismiss_undelivered(
    app: AppHandle,
    state: State<'_, AppState>,
    id: ConversationId,
    message: crewdesk::domain::MessageId,
) -> CommandResult<()> {
    let desk = current(&state).await?;
    desk.lock().dismiss_undelivered(&id, &message)?;
    emit_changed(&app, vec![id]);
    Ok(())
}

/// Runs an agent action on the replica, wakes the sync driver and tells the window.
async fn act<T>(
    app: &AppHandle,
    state: &State<'_, AppState>,
    id: &ConversationId,
    f: impl FnOnce(&mut crewdesk::replica::Replica) -> Result<T, crewdesk::replica::ReplicaError>,
) -> CommandResult<T> {
    let desk = current(state).await?;
    let out = f(&mut desk.lock())?;
    desk.client.changed(id.clone());
    emit_changed(app, vec![id.clone()]);
    Ok(out)
}

/// The agent is typing in a conversation: its followers (teammates, the customer's widget) hear so
/// for a few seconds. Nothing is stored; offline it is dropped.
#[tauri::command]
pub async fn typing(state: State<'_, AppState>, id: ConversationId) -> CommandResult<()> {
    current(&state).await?.client.typing(id);
    Ok(())
}

#[tauri::command]
pub async fn join(app: AppHandle, state: State<'_, AppState>, id: ConversationId) -> CommandResult<JoinKind> {
    act(&app, &state, &id, |r| r.join(&id, Timestamp::now())).await
}

#[tauri::command]
pub async fn grab(app: AppHandle, state: State<'_, AppState>, id: ConversationId) -> CommandResult<()> {
    act(&app, &state, &id, |r| r.grab(&id, Timestamp::now())).await
}

#[tauri::command]
pub async fn leave(app: AppHandle, state: State<'_, AppState>, id: ConversationId) -> CommandResult<()> {
    act(&app, &state, &id, |r| r.leave(&id)).await
}

/// ↪ TRANSFER: hands the conversation to a colleague (`to`, an agent id of its team).
#[tauri::command]
pub async fn transfer(
    app: AppHandle,
    state: State<'_, AppState>,
    id: ConversationId,
    to: AgentId,
) -> CommandResult<()> {
    act(&app, &state, &id, |r| r.transfer(&id, &to, Timestamp::now()).map(|_| ())).await
}

#[tauri::command]
pub async fn close(app: AppHandle, state: State<'_, AppState>, id: ConversationId) -> CommandResult<()> {
    act(&app, &state, &id, |r| r.close(&id, Timestamp::now())).await
}

#[tauri::command]
pub async fn send(
    app: AppHandle,
    state: State<'_, AppState>,
    id: ConversationId,
    text: String,
    template: Option<String>,
    note: Option<bool>,
) -> CommandResult<()> {
    let text = text.trim_end().to_owned();
    act(&app, &state, &id, |r| match (note.unwrap_or(false), template) {
        // 📝 an internal note: for the crew only.
        (true, _) => r.send(&id, MessageBody::Note { text }, Timestamp::now()).map(|_| ()),
        // A 📃 template filled into the composer, maybe edited: sent as that template's message.
        (false, Some(name)) => r.send_filled_template(&id, &name, text, Timestamp::now()).map(|_| ()),
        (false, None) => r.send(&id, MessageBody::Text { text }, Timestamp::now()).map(|_| ()),
    })
    .await
}

#[tauri::command]
pub async fn send_whatsapp_template(
    app: AppHandle,
    state: State<'_, AppState>,
    id: ConversationId,
    template: String,
    params: Vec<String>,
) -> CommandResult<()> {
    act(&app, &state, &id, |r| r.send_whatsapp_template(&id, &template, params, Timestamp::now()).map(|_| ())).await
}

/// 📎 a picked file: checked (size, type from its content), kept in the local content-addressed
/// blob store (app data `blobs/<sha256>`), sent as an attachment message that references it by
/// hash, and queued for upload to the relay's blob store (at once when online, else on reconnect).
#[tauri::command]
pub async fn attach(
    app: AppHandle,
    state: State<'_, AppState>,
    id: ConversationId,
    file_name: String,
    mime: String,
    bytes: Vec<u8>,
) -> CommandResult<()> {
    use crewdesk::domain::attachment::{MAX_ATTACHMENT_BYTES, accepted_type};
    if bytes.is_empty() {
        return Err(CommandError::Invalid("the file is empty".into()));
    }
    if bytes.len() > MAX_ATTACHMENT_BYTES {
        return Err(CommandError::Invalid("attachments are limited to 10 MB".into()));
    }
    let mime = accepted_type(&mime, &bytes).map_err(CommandError::Invalid)?;
    // Only the last path component, without control characters: names are shown, never used as paths.
    let file_name: String =
        file_name.rsplit(['/', '\\']).next().unwrap_or("file").chars().filter(|c| !c.is_control()).take(200).collect();
    let hash = BlobHash::of(&bytes);
    keep_blob(&app, &hash, &bytes)?;
    let body =
        MessageBody::Attachment { blob: hash.reference(), file_name, mime: mime.clone(), size: bytes.len() as u64 };
    act(&app, &state, &id, |r| {
        r.send(&id, body, Timestamp::now())?;
        r.queue_blob_upload(&id, &hash, &mime)
    })
    .await?;
    current(&state).await?.client.upload_now();
    Ok(())
}

/// Stores a file in the local blob store under its hash (write to a temporary name, then rename).
fn keep_blob(app: &AppHandle, hash: &BlobHash, bytes: &[u8]) -> CommandResult<std::path::PathBuf> {
    let dir = desk::data_dir(app)?.join("blobs");
    std::fs::create_dir_all(&dir).map_err(|e| CommandError::Settings(e.to_string()))?;
    let path = dir.join(hash.as_str());
    if !path.exists() {
        let tmp = dir.join(format!(".{hash}.tmp"));
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| CommandError::Settings(format!("cannot keep the file: {e}")))?;
    }
    Ok(path)
}

/// The attachment's bytes: from the local blob store, else downloaded from the relay (checked
/// against its hash) and kept.
async fn blob_bytes(app: &AppHandle, desk: &Desk, id: &ConversationId, hash: &BlobHash) -> CommandResult<Vec<u8>> {
    let local = desk::data_dir(app)?.join("blobs").join(hash.as_str());
    if let Ok(bytes) = std::fs::read(&local) {
        return Ok(bytes);
    }
    let config = sync_client::ClientConfig::new(&desk.settings.relay_url, &desk.settings.token);
    let bytes =
        sync_client::download_blob(&config, id, hash, false).await.map_err(|e| CommandError::Relay(e.to_string()))?;
    keep_blob(app, hash, &bytes)?;
    Ok(bytes)
}

/// The attachment a message of this conversation names: its file (a well-formed content address,
/// or no attachment at all), name and type.
fn attachment_of(desk: &Desk, id: &ConversationId, blob: &str) -> CommandResult<(BlobHash, String, String)> {
    let messages = desk.lock().stored_messages(id)?;
    messages
        .into_iter()
        .find_map(|m| {
            let hash = m.body.blob()?;
            match m.body {
                MessageBody::Attachment { blob: b, file_name, mime, .. } if b == blob => Some((hash, file_name, mime)),
                _ => None,
            }
        })
        .ok_or_else(|| CommandError::Invalid("no such attachment in this conversation".into()))
}

/// An image attachment as a `data:` URL for the conversation view: the relay's thumbnail, or the
/// local file when it is here already.
#[tauri::command]
pub async fn attachment_preview(
    app: AppHandle,
    state: State<'_, AppState>,
    id: ConversationId,
    blob: String,
) -> CommandResult<String> {
    let desk = current(&state).await?;
    let (hash, _, mime) = attachment_of(&desk, &id, &blob)?;
    if !mime.starts_with("image/") {
        return Err(CommandError::Invalid("only images have a preview".into()));
    }
    let local = desk::data_dir(&app)?.join("blobs").join(hash.as_str());
    let (mime, bytes) = match std::fs::read(&local) {
        Ok(bytes) => (mime, bytes),
        Err(_) => {
            let thumb = sync_client::download_blob(&desk.relay(), &id, &hash, true).await;
            ("image/png".to_owned(), thumb.map_err(|e| CommandError::Relay(e.to_string()))?)
        }
    };
    Ok(format!("data:{mime};base64,{}", base64_encode(&bytes)))
}

/// Saves an attachment into the Downloads folder (downloading it first if needed); returns where.
#[tauri::command]
pub async fn save_attachment(
    app: AppHandle,
    state: State<'_, AppState>,
    id: ConversationId,
    blob: String,
) -> CommandResult<String> {
    use tauri::Manager;
    let desk = current(&state).await?;
    let (hash, file_name, _) = attachment_of(&desk, &id, &blob)?;
    let bytes = blob_bytes(&app, &desk, &id, &hash).await?;
    let dir = match app.path().download_dir() {
        Ok(d) => d,
        Err(_) => desk::data_dir(&app)?.join("downloads"),
    };
    std::fs::create_dir_all(&dir).map_err(|e| CommandError::Settings(e.to_string()))?;
    let safe: String =
        file_name.chars().map(|c| if c == '/' || c == '\\' || c.is_control() { '_' } else { c }).collect();
    let safe = if safe.trim_matches('.').is_empty() { "attachment".to_owned() } else { safe };
    let mut path = dir.join(&safe);
    let mut n = 1;
    while path.exists() {
        path = dir.join(format!("({n}) {safe}"));
        n += 1;
    }
    std::fs::write(&path, bytes).map_err(|e| CommandError::Settings(format!("cannot save the file: {e}")))?;
    Ok(path.display().to_string())
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// 📹 an unguessable meeting link, sent as an invitation.
#[tauri::command]
pub async fn send_conference(app: AppHandle, state: State<'_, AppState>, id: ConversationId) -> CommandResult<()> {
    let room = crewdesk::replica::doc::random_id(&mut rand::rng());
    act(&app, &state, &id, |r| {
        let team = r
            .summary(&id)
            .and_then(|s| r.team(&s.team))
            .ok_or(crewdesk::replica::ReplicaError::UnknownConversation(id.clone()))?;
        let body = MessageBody::ConferenceInvitation { url: crewdesk::domain::conference_url(team, &room) };
        r.send(&id, body, Timestamp::now()).map(|_| ())
    })
    .await
}

#[tauri::command]
pub async fn edit_customer(
    app: AppHandle,
    state: State<'_, AppState>,
    id: ConversationId,
    edit: CustomerEdit,
) -> CommandResult<()> {
    act(&app, &state, &id, |r| r.edit_customer(&id, &edit)).await
}

#[tauri::command]
pub async fn sync_status(state: State<'_, AppState>) -> CommandResult<SyncStatus> {
    let desk = current(&state).await?;
    let status = desk.client.status().borrow().clone();
    Ok(status)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(super::base64_encode(b""), "");
        assert_eq!(super::base64_encode(b"f"), "Zg==");
        assert_eq!(super::base64_encode(b"fo"), "Zm8=");
        assert_eq!(super::base64_encode(b"foo"), "Zm9v");
        assert_eq!(super::base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(super::base64_encode(&[0xff, 0xfe, 0x00]), "//4A");
    }
}

/// A team's 📃 templates, for its admins' editor.
#[tauri::command]
pub async fn team_templates(state: State<'_, AppState>, team: TeamId) -> CommandResult<Vec<MessageTemplate>> {
    let desk = current(&state).await?;
    let r = desk.lock();
    let t = r.team(&team).ok_or_else(|| CommandError::Invalid("no such team".into()))?;
    Ok(t.templates.clone())
}

/// Saves a team's 📃 templates (admins): checked by the core's rule first (the relay applies the
/// same one), saved by the relay, then shown in this desk's composer at once.
#[tauri::command]
pub async fn save_templates(
    app: AppHandle,
    state: State<'_, AppState>,
    team: TeamId,
    templates: Vec<MessageTemplate>,
) -> CommandResult<Vec<MessageTemplate>> {
    let desk = current(&state).await?;
    let templates = crewdesk::domain::checked_templates(templates).map_err(|e| CommandError::Invalid(e.to_string()))?;
    let saved = sync_client::save_templates(&desk.relay(), &team, &templates)
        .await
        .map_err(|e| CommandError::Relay(e.to_string()))?;
    desk.lock().set_team_templates(&team, saved.clone())?;
    emit_changed(&app, Vec::new());
    Ok(saved)
}
