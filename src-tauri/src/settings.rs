//! What the app remembers between runs: the relay's address and who signed in, in `settings.json`
//! (written for this user only, 0600), and the agent's token in the OS keyring (the Secret Service
//! on Linux, the Keychain on macOS, the Credential Manager on Windows). Where no keyring answers (a
//! session without one), the token goes into the settings file instead, and the desk says so,
//! naming the file.

use crate::error::{CommandError, CommandResult};
use crewdesk::domain::AgentId;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The keyring's service name for the agent's tokens (the entry's user is "agent@relay").
const KEYRING_SERVICE: &str = "Crewdesk relay token";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    pub relay_url: String,
    /// In the file only when no keyring holds it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    pub agent: AgentId,
    pub agent_name: String,
    /// Where the token is kept (a file written before keyrings were used: in the file).
    #[serde(default)]
    pub token_in: TokenIn,
    /// Where the token is kept, as the desk shows it (not saved).
    #[serde(skip)]
    pub token_note: String,
}

impl Settings {
    pub fn new(relay_url: &str, token: &str, agent: AgentId, agent_name: String) -> Settings {
        Settings {
            relay_url: relay_url.trim().trim_end_matches('/').to_owned(),
            token: token.trim().to_owned(),
            agent,
            agent_name,
            token_in: TokenIn::File,
            token_note: String::new(),
        }
    }

    /// The keyring entry's user: the same agent on two relays has two tokens.
    fn keyring_user(&self) -> String {
        format!("{}@{}", self.agent, self.relay_url)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenIn {
    #[default]
    File,
    Keyring,
}

/// Where secrets go: the OS keyring, or a stand-in in tests.
pub trait Keyring {
    fn set(&self, user: &str, token: &str) -> Result<(), String>;
    fn get(&self, user: &str) -> Result<String, String>;
    fn delete(&self, user: &str) -> Result<(), String>;
}

/// The OS keyring (`keyring` crate).
pub struct OsKeyring;

impl Keyring for OsKeyring {
    fn set(&self, user: &str, token: &str) -> Result<(), String> {
        keyring::Entry::new(KEYRING_SERVICE, user).and_then(|e| e.set_password(token)).map_err(|e| e.to_string())
    }

    fn get(&self, user: &str) -> Result<String, String> {
        keyring::Entry::new(KEYRING_SERVICE, user).and_then(|e| e.get_password()).map_err(|e| e.to_string())
    }

    fn delete(&self, user: &str) -> Result<(), String> {
        match keyring::Entry::new(KEYRING_SERVICE, user).and_then(|e| e.delete_credential()) {
            Ok(()) | Err(keyring::Error::NoEntry) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Saves `settings` in `path`, the token in `keyring` when it takes it, else in the file; sets
/// where it went (`token_in`, `token_note`).
pub fn save(path: &Path, keyring: &dyn Keyring, settings: &mut Settings) -> CommandResult<()> {
    let mut on_disk = settings.clone();
    match keyring.set(&settings.keyring_user(), &settings.token) {
        Ok(()) => {
            on_disk.token.clear();
            on_disk.token_in = TokenIn::Keyring;
            settings.token_note = "Your token is kept in the system keyring.".to_owned();
        }
        Err(why) => {
            tracing::warn!(%why, path = %path.display(), "no system keyring: the token is kept in the settings file");
            on_disk.token_in = TokenIn::File;
            settings.token_note = file_note(path, &why);
        }
    }
    settings.token_in = on_disk.token_in;
    let text = serde_json::to_string_pretty(&on_disk).map_err(|e| CommandError::Settings(e.to_string()))?;
    write_private(path, text.as_bytes())
        .map_err(|e| CommandError::Settings(format!("cannot save the settings in {}: {e}", path.display())))
}

fn file_note(path: &Path, why: &str) -> String {
    format!("No system keyring answered ({why}): your token is kept in {}, readable by you only.", path.display())
}

/// The settings of an earlier sign-in, with the token from wherever it was kept. A token in the
/// file (no keyring then, or an older version) moves into the keyring when one answers now.
/// `None` when there are none or the token cannot be read (the window then asks to sign in).
pub fn load(path: &Path, keyring: &dyn Keyring) -> Option<Settings> {
    let text = std::fs::read_to_string(path).ok()?;
    // A file written by an older version (0644) holds the token: make it the user's only.
    if let Err(e) = make_private(path) {
        tracing::warn!(%e, path = %path.display(), "cannot restrict the settings file to this user");
    }
    let mut settings: Settings = serde_json::from_str(&text).ok()?;
    match settings.token_in {
        TokenIn::Keyring => match keyring.get(&settings.keyring_user()) {
            Ok(token) => {
                settings.token = token;
                settings.token_note = "Your token is kept in the system keyring.".to_owned();
            }
            Err(why) => {
                tracing::warn!(%why, "the saved token cannot be read from the system keyring; sign in again");
                return None;
            }
        },
        TokenIn::File if settings.token.is_empty() => return None,
        TokenIn::File => {
            if let Err(e) = save(path, keyring, &mut settings) {
                tracing::warn!(%e, "cannot save the settings again");
                settings.token_note = file_note(path, &e.to_string());
            }
        }
    }
    Some(settings)
}

/// Forgets the saved relay address and token (signing out): the next start asks for them.
pub fn forget(path: &Path, keyring: &dyn Keyring) -> CommandResult<()> {
    if let Ok(text) = std::fs::read_to_string(path)
        && let Ok(settings) = serde_json::from_str::<Settings>(&text)
        && settings.token_in == TokenIn::Keyring
        && let Err(why) = keyring.delete(&settings.keyring_user())
    {
        tracing::warn!(%why, "cannot remove the token from the system keyring");
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CommandError::Settings(format!("cannot remove {}: {e}", path.display()))),
    }
}

/// Writes a file that may hold a secret: created 0600 under a temporary name, fsynced and renamed
/// over the old one, so no other user can ever read it.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().ok_or_else(|| std::io::Error::other("the settings path has no directory"))?;
    std::fs::create_dir_all(dir)?;
    let tmp: PathBuf = dir.join(format!(".{}.tmp", rand::random::<u64>()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    match written.and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => make_private(path),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn make_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if std::fs::metadata(path)?.permissions().mode() & 0o777 != 0o600 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// A keyring in memory; `None` plays a session without one.
    struct Memory(Option<Mutex<HashMap<String, String>>>);

    impl Keyring for Memory {
        fn set(&self, user: &str, token: &str) -> Result<(), String> {
            let m = self.0.as_ref().ok_or("no Secret Service on the session bus")?;
            m.lock().unwrap_or_else(|p| p.into_inner()).insert(user.into(), token.into());
            Ok(())
        }
        fn get(&self, user: &str) -> Result<String, String> {
            let m = self.0.as_ref().ok_or("no Secret Service on the session bus")?;
            m.lock().unwrap_or_else(|p| p.into_inner()).get(user).cloned().ok_or_else(|| "no entry".into())
        }
        fn delete(&self, user: &str) -> Result<(), String> {
            let m = self.0.as_ref().ok_or("no Secret Service on the session bus")?;
            m.lock().unwrap_or_else(|p| p.into_inner()).remove(user);
            Ok(())
        }
    }

    fn bob() -> Settings {
        Settings::new("https://relay.example.com/", " cdt_secret ", AgentId::from("bob"), "Bob".into())
    }

    #[test]
    fn with_a_keyring_the_token_never_touches_the_file_and_comes_back_from_the_keyring() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let path = tmp.path().join("config/settings.json");
        let keyring = Memory(Some(Mutex::default()));
        let mut s = bob();
        save(&path, &keyring, &mut s).expect("saved");
        assert_eq!(s.token_in, TokenIn::Keyring);
        assert!(s.token_note.contains("system keyring"), "{}", s.token_note);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(!text.contains("cdt_secret"), "{text}");
        let back = load(&path, &keyring).expect("loaded");
        assert_eq!((back.token.as_str(), back.relay_url.as_str()), ("cdt_secret", "https://relay.example.com"));
        forget(&path, &keyring).expect("forgotten");
        assert!(!path.exists());
        assert!(keyring.get("bob@https://relay.example.com").is_err(), "the keyring entry is gone too");
    }

    #[test]
    fn without_a_keyring_the_token_goes_into_a_file_for_this_user_only_and_the_note_names_it() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let path = tmp.path().join("config/settings.json");
        let none = Memory(None);
        let mut s = bob();
        save(&path, &none, &mut s).expect("saved");
        assert_eq!(s.token_in, TokenIn::File);
        assert!(s.token_note.contains(&path.display().to_string()), "{}", s.token_note);
        assert!(s.token_note.contains("no Secret Service"), "the note says why: {}", s.token_note);
        assert!(std::fs::read_to_string(&path).expect("read").contains("cdt_secret"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).expect("metadata").permissions().mode() & 0o777, 0o600);
        }
        let back = load(&path, &none).expect("loaded");
        assert_eq!(back.token, "cdt_secret");
        assert!(back.token_note.contains(&path.display().to_string()));
        // A keyring appears later: the token moves into it, out of the file.
        let keyring = Memory(Some(Mutex::default()));
        let moved = load(&path, &keyring).expect("loaded");
        assert_eq!((moved.token.as_str(), moved.token_in), ("cdt_secret", TokenIn::Keyring));
        assert!(!std::fs::read_to_string(&path).expect("read").contains("cdt_secret"));
    }

    #[test]
    fn a_token_the_keyring_lost_means_signing_in_again() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let path = tmp.path().join("settings.json");
        let keyring = Memory(Some(Mutex::default()));
        save(&path, &keyring, &mut bob()).expect("saved");
        keyring.delete("bob@https://relay.example.com").expect("deleted");
        assert!(load(&path, &keyring).is_none());
        assert!(load(&path, &Memory(None)).is_none(), "nor without a keyring");
    }

    #[cfg(unix)]
    #[test]
    fn an_old_loose_file_is_made_private_and_no_temporary_file_is_left() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("temp dir");
        let path = tmp.path().join("config/settings.json");
        write_private(&path, b"{\"token\":\"cdt_one\"}").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private(&path, b"{\"token\":\"cdt_two\"}").expect("write again");
        assert_eq!(std::fs::metadata(&path).expect("metadata").permissions().mode() & 0o777, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        make_private(&path).expect("tighten");
        assert_eq!(std::fs::metadata(&path).expect("metadata").permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir")).expect("list").collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
    }
}
