//! OS notifications: a new customer message in a joined conversation, a new grab-able conversation
//! (representatives of grab-mode teams), a conversation turning overdue. Never for the agent's own
//! messages, and never twice: what was notified is remembered on disk across restarts.

use crate::desk::Desk;
use crate::error::{CommandError, CommandResult};
use crewdesk::desk::notifications_due;
use crewdesk::domain::status::Status;
use crewdesk::domain::{ConversationId, Timestamp};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tauri::AppHandle;
use tauri_plugin_notification::NotificationExt;

pub struct Notifier {
    app: AppHandle,
    path: PathBuf,
    seen: BTreeSet<String>,
}

impl Notifier {
    /// Loads what was already notified. On the very first run everything present counts as seen,
    /// so signing in does not replay the whole history.
    pub fn load(app: AppHandle, dir: &Path, desk: &Desk) -> CommandResult<Notifier> {
        let path = dir.join(format!("notified-{}.json", desk.settings.agent));
        let existing: Option<BTreeSet<String>> =
            std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok());
        let first_run = existing.is_none();
        let mut n = Notifier { app, path, seen: existing.unwrap_or_default() };
        if first_run {
            let ids: Vec<ConversationId> = desk.lock().document_ids().map_err(CommandError::from)?;
            for id in ids {
                for key in n.keys(desk, &id) {
                    n.seen.insert(key.0);
                }
            }
            n.save();
        }
        Ok(n)
    }

    fn save(&self) {
        if let Ok(text) = serde_json::to_string(&self.seen) {
            let _ = std::fs::write(&self.path, text);
        }
    }

    /// The notifications a conversation deserves now (the rule lives in the core).
    fn keys(&self, desk: &Desk, id: &ConversationId) -> Vec<(String, String, String)> {
        let r = desk.lock();
        let Some(s) = r.summary(id) else { return Vec::new() };
        let Some(team) = r.team(&s.team) else { return Vec::new() };
        notifications_due(s, team, r.agent(), Timestamp::now()).into_iter().map(|n| (n.key, n.title, n.body)).collect()
    }

    pub fn conversation_changed(&mut self, desk: &Desk, id: &ConversationId) {
        let fresh: Vec<_> = self.keys(desk, id).into_iter().filter(|(k, ..)| !self.seen.contains(k)).collect();
        for (key, title, body) in fresh {
            self.seen.insert(key);
            if let Err(e) = self.app.notification().builder().title(title).body(body).show() {
                tracing::debug!(%e, "notification not shown");
            }
        }
        self.save();
    }

    /// Conversations that turned overdue while nothing else happened.
    pub fn check_overdue(&mut self, desk: &Desk) {
        let ids: Vec<ConversationId> = {
            let r = desk.lock();
            let listing = r.list(
                &crewdesk::domain::filter::Filter {
                    selection: crewdesk::domain::filter::Selection::Status(Status::Overdue),
                    limit: 500,
                    ..Default::default()
                },
                Timestamp::now(),
            );
            listing.rows.into_iter().map(|s| s.id).collect()
        };
        for id in ids {
            self.conversation_changed(desk, &id);
        }
    }
}
