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
    seen: Seen,
}

/// The notifications already shown, kept on disk so a restart does not show them again.
struct Seen {
    path: PathBuf,
    keys: BTreeSet<String>,
}

impl Seen {
    /// Loads the set; `None` when there is none yet (first run).
    fn load(path: PathBuf) -> (Seen, bool) {
        let existing: Option<BTreeSet<String>> =
            std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok());
        let first_run = existing.is_none();
        (Seen { path, keys: existing.unwrap_or_default() }, first_run)
    }

    /// Records a key; true when it was not seen before (so it should be shown now).
    fn insert(&mut self, key: String) -> bool {
        self.keys.insert(key)
    }

    fn save(&self) {
        if let Ok(text) = serde_json::to_string(&self.keys) {
            let _ = std::fs::write(&self.path, text);
        }
    }
}

impl Notifier {
    /// Loads what was already notified. On the very first run everything present counts as seen,
    /// so signing in does not replay the whole history.
    pub fn load(app: AppHandle, dir: &Path, desk: &Desk) -> CommandResult<Notifier> {
        let (seen, first_run) = Seen::load(dir.join(format!("notified-{}.json", desk.settings.agent)));
        let mut n = Notifier { app, seen };
        if first_run {
            let ids: Vec<ConversationId> = desk.lock().document_ids().map_err(CommandError::from)?;
            for id in ids {
                for (key, ..) in n.keys(desk, &id) {
                    n.seen.insert(key);
                }
            }
            n.seen.save();
        }
        Ok(n)
    }

    /// The notifications a conversation deserves now (the rule lives in the core).
    fn keys(&self, desk: &Desk, id: &ConversationId) -> Vec<(String, String, String)> {
        let r = desk.lock();
        let Some(s) = r.summary(id) else { return Vec::new() };
        let Some(team) = r.team(&s.team) else { return Vec::new() };
        notifications_due(s, team, r.agent(), Timestamp::now()).into_iter().map(|n| (n.key, n.title, n.body)).collect()
    }

    pub fn conversation_changed(&mut self, desk: &Desk, id: &ConversationId) {
        let mut shown = false;
        for (key, title, body) in self.keys(desk, id) {
            if self.seen.insert(key) {
                shown = true;
                if let Err(e) = self.app.notification().builder().title(title).body(body).show() {
                    tracing::debug!(%e, "notification not shown");
                }
            }
        }
        if shown {
            self.seen.save();
        }
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
            listing.rows.iter().map(|s| s.id.clone()).collect()
        };
        for id in ids {
            self.conversation_changed(desk, &id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Seen;

    #[test]
    fn a_notification_is_not_shown_again_after_a_restart() {
        let dir = std::env::temp_dir().join(format!("crewdesk-notified-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("notified.json");
        let (mut seen, first_run) = Seen::load(path.clone());
        assert!(first_run);
        assert!(seen.insert("message:c:1".into()), "new: shown");
        assert!(!seen.insert("message:c:1".into()), "same event: not shown twice");
        seen.save();
        let (mut again, first_run) = Seen::load(path);
        assert!(!first_run);
        assert!(!again.insert("message:c:1".into()), "not shown again after a restart");
        assert!(again.insert("message:c:2".into()), "a new message is shown");
        let _ = std::fs::remove_dir_all(dir);
    }
}
