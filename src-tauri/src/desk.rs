//! The signed-in desk: the replica, its sync driver, the settings that reopen it, and the
//! forwarding of changes to the window (events, not polling) and to OS notifications.

use crate::error::{CommandError, CommandResult};
use crate::notify::Notifier;
use crewdesk::domain::{AgentId, ConversationId};
use crewdesk::replica::Replica;
use crewdesk::sync::session::SessionEvent;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use sync_client::{ClientConfig, SharedReplica, SyncClient, SyncStatus};
use tauri::{AppHandle, Emitter, Manager};

pub use crate::settings::Settings;

pub struct Desk {
    pub replica: SharedReplica,
    pub client: SyncClient,
    pub settings: Settings,
    /// Notified when the window has its list: the sync driver starts then (`ClientConfig::start`).
    pub listed: Arc<tokio::sync::Notify>,
}

impl Desk {
    /// Where and as whom to reach the relay over HTTP (attachments).
    pub fn relay(&self) -> ClientConfig {
        ClientConfig::new(&self.settings.relay_url, &self.settings.token)
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Replica> {
        self.replica.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
pub struct AppState {
    pub desk: tokio::sync::Mutex<Option<Arc<Desk>>>,
    /// The desk of an earlier sign-in is being opened at start.
    pub opening: std::sync::atomic::AtomicBool,
}

fn settings_path(app: &AppHandle) -> CommandResult<PathBuf> {
    let dir = app.path().app_config_dir().map_err(|e| CommandError::Settings(e.to_string()))?;
    Ok(dir.join("settings.json"))
}

pub fn data_dir(app: &AppHandle) -> CommandResult<PathBuf> {
    let dir = app.path().app_data_dir().map_err(|e| CommandError::Settings(e.to_string()))?;
    std::fs::create_dir_all(&dir).map_err(|e| CommandError::Settings(format!("{}: {e}", dir.display())))?;
    Ok(dir)
}

/// The settings of an earlier sign-in (the token from the keyring or the file), if any.
pub fn load_settings(app: &AppHandle) -> Option<Settings> {
    crate::settings::load(&settings_path(app).ok()?, &crate::settings::OsKeyring)
}

/// Forgets the saved relay address and token (signing out): the next start asks for them.
pub fn forget_settings(app: &AppHandle) -> CommandResult<()> {
    crate::settings::forget(&settings_path(app)?, &crate::settings::OsKeyring)
}

#[derive(Deserialize)]
struct Me {
    agent: MeAgent,
}

#[derive(Deserialize)]
struct MeAgent {
    id: AgentId,
    name: String,
}

/// Checks a relay URL and token with the relay and returns who they belong to.
pub async fn who_am_i(relay_url: &str, token: &str) -> CommandResult<(AgentId, String)> {
    let url = relay_url.trim().trim_end_matches('/');
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(CommandError::Invalid("the relay address starts with http:// or https://".into()));
    }
    let response = reqwest::Client::new()
        .get(format!("{url}/api/me"))
        .bearer_auth(token.trim())
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| CommandError::Relay(format!("cannot reach the relay at {url}: {e}")))?;
    if response.status() == reqwest::StatusCode::UNAUTHORIZED {
        return Err(CommandError::Relay("the relay does not accept this token; ask your admin for a new one".into()));
    }
    let me: Me = response
        .error_for_status()
        .map_err(|e| CommandError::Relay(e.to_string()))?
        .json()
        .await
        .map_err(|e| CommandError::Relay(format!("unexpected answer from the relay: {e}")))?;
    Ok((me.agent.id, me.agent.name))
}

/// Opens the agent's replica, starts syncing and forwards what happens to the window.
pub fn open(app: &AppHandle, mut settings: Settings, remember: bool) -> CommandResult<Arc<Desk>> {
    if remember {
        crate::settings::save(&settings_path(app)?, &crate::settings::OsKeyring, &mut settings)?;
    }
    let dir = data_dir(app)?;
    let opening = std::time::Instant::now();
    let replica = Replica::open(replica_path(&dir, &settings.agent), settings.agent.clone())?;
    tracing::info!(ms = opening.elapsed().as_millis() as u64, "replica opened");
    let replica: SharedReplica = Arc::new(Mutex::new(replica));
    let (events, rx) = tokio::sync::mpsc::channel(4096);
    let mut config = ClientConfig::new(&settings.relay_url, &settings.token);
    config.blob_dir = Some(dir.join("blobs"));
    let listed = Arc::new(tokio::sync::Notify::new());
    config.start = Some(listed.clone());
    let client = SyncClient::spawn(config, replica.clone(), events);
    let desk = Arc::new(Desk { replica, client, settings, listed });
    let notifier = Notifier::load(app.clone(), &dir, &desk)?;
    spawn_forwarders(app.clone(), desk.clone(), rx, notifier);
    Ok(desk)
}

fn replica_path(dir: &Path, agent: &AgentId) -> PathBuf {
    let safe: String = agent
        .as_str()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    dir.join(format!("replica-{safe}.sqlite3"))
}

#[derive(Clone, Serialize)]
struct Changed {
    ids: Vec<ConversationId>,
}

/// Tells the window something changed, so it reloads what it shows.
/// A relay error as a person reads it: "document <id>: <why>[; refused (change <hash>)]" names
/// the conversation by its customer and leaves out ids and hashes (the conversation shows the rest).
fn readable_relay_error(desk: &Desk, message: &str) -> String {
    let Some((id, why)) = message.strip_prefix("document ").and_then(|m| m.split_once(": ")) else {
        return message.to_owned();
    };
    let why = why.split_once("; refused (change ").map_or(why, |(rule, _)| rule);
    let customer = desk.lock().summary(&ConversationId(id.to_owned())).map(|s| s.customer.name.clone());
    match customer {
        Some(name) => format!("The relay refused a change in the conversation with {name}: {why}"),
        None => format!("The relay refused a change: {why}"),
    }
}

#[derive(Clone, Serialize)]
struct Typing {
    id: ConversationId,
    text: String,
}

/// "Maya Rossi is typing…" for the conversation's customer or a teammate (by their name in the
/// conversation's team).
fn typing_text(desk: &Desk, id: &ConversationId, who: &crewdesk::sync::presence::Typing) -> Option<String> {
    let r = desk.lock();
    let summary = r.summary(id)?;
    let name = match who {
        crewdesk::sync::presence::Typing::Customer => summary.customer.name.clone(),
        crewdesk::sync::presence::Typing::Crew(agent) => r
            .teams()
            .iter()
            .find(|t| t.id == summary.team)
            .and_then(|t| t.members.iter().find(|m| &m.agent == agent))
            .map_or_else(|| agent.to_string(), |m| m.name.clone()),
    };
    Some(format!("{name} is typing…"))
}

pub fn emit_changed(app: &AppHandle, ids: Vec<ConversationId>) {
    let _ = app.emit("desk-changed", Changed { ids });
}

/// The shortest time between two change events to the window (changes meanwhile are gathered
/// into the next one).
const CHANGES_GATHERED: std::time::Duration = std::time::Duration::from_millis(300);

fn spawn_forwarders(
    app: AppHandle,
    desk: Arc<Desk>,
    mut rx: tokio::sync::mpsc::Receiver<SessionEvent>,
    notifier: Notifier,
) {
    let notifier = Arc::new(Mutex::new(notifier));
    let (app2, desk2, notifier2) = (app.clone(), desk.clone(), notifier.clone());
    tauri::async_runtime::spawn(async move {
        // Changes reach the window at once when it has heard nothing for a while, else gathered
        // into one event per CHANGES_GATHERED: a reconnect that brings thousands of changes redraws
        // the list a few times a second, not thousands of times.
        let mut gathered = std::collections::BTreeSet::<ConversationId>::new();
        let mut flush_at = tokio::time::Instant::now();
        let mut last_emit =
            tokio::time::Instant::now().checked_sub(CHANGES_GATHERED).unwrap_or_else(tokio::time::Instant::now);
        loop {
            let event = if gathered.is_empty() {
                rx.recv().await
            } else {
                match tokio::time::timeout_at(flush_at, rx.recv()).await {
                    Ok(event) => event,
                    Err(_) => {
                        emit_changed(&app, std::mem::take(&mut gathered).into_iter().collect());
                        last_emit = tokio::time::Instant::now();
                        continue;
                    }
                }
            };
            let Some(event) = event else { break };
            match event {
                SessionEvent::Changed(id) => {
                    notifier.lock().unwrap_or_else(|p| p.into_inner()).conversation_changed(&desk, &id);
                    if gathered.is_empty() {
                        flush_at = last_emit + CHANGES_GATHERED;
                    }
                    gathered.insert(id);
                }
                SessionEvent::RelayError(message) => {
                    let _ = app.emit("relay-error", readable_relay_error(&desk, &message));
                }
                SessionEvent::Typing(id, who) => {
                    if let Some(text) = typing_text(&desk, &id, &who) {
                        let _ = app.emit("typing", Typing { id, text });
                    }
                }
                SessionEvent::Connected { .. } => emit_changed(&app, Vec::new()),
                SessionEvent::Unavailable(_) | SessionEvent::RetryLater(_) => {}
            }
        }
        if !gathered.is_empty() {
            emit_changed(&app, gathered.into_iter().collect());
        }
    });
    let mut status = desk2.client.status();
    let app3 = app2.clone();
    tauri::async_runtime::spawn(async move {
        while status.changed().await.is_ok() {
            let s: SyncStatus = status.borrow().clone();
            let _ = app3.emit("sync-status", s);
        }
    });
    // Statuses move with the clock (Soon to be, Overdue, auto-close): the list and counts are
    // re-evaluated every 10 s ("desk-clock"); the open conversation is read again only when it
    // changes ("desk-changed" naming it).
    tauri::async_runtime::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            // Signed out (or signed in again): this desk is no longer the window's.
            let current = app2.state::<AppState>().desk.lock().await.clone();
            if !current.is_some_and(|d| Arc::ptr_eq(&d, &desk2)) {
                return;
            }
            notifier2.lock().unwrap_or_else(|p| p.into_inner()).check_overdue(&desk2);
            // The search index merges here, between sends, never inside one.
            if let Err(e) = desk2.lock().tidy_search() {
                tracing::warn!(%e, "the search index was not tidied");
            }
            let _ = app2.emit("desk-clock", ());
        }
    });
}
