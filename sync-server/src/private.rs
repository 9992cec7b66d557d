//! The relay's files hold conversations, token hashes and customers' attachments: its data
//! directory and every directory in it are created 0700 and every file 0600, whatever the umask.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

#[cfg(unix)]
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

/// Creates `path` and its missing parents as private directories; an existing `path` is made
/// private too (an operator's `mkdir` leaves it 0755).
pub(crate) fn dir(path: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    builder.mode(0o700);
    builder.create(path)?;
    restrict(path, 0o700)
}

/// Creates (or truncates) a file only its owner may read.
pub(crate) fn create_file(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let file = options.open(path)?;
    restrict(path, 0o600)?;
    Ok(file)
}

/// Makes an existing file private; a missing one is fine.
pub(crate) fn existing_file(path: &Path) -> io::Result<()> {
    match std::fs::metadata(path) {
        Ok(_) => restrict(path, 0o600),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Prepares the SQLite database at `path` before SQLite opens it: created 0600 when missing (SQLite
/// gives its `-wal` and `-shm` files the database's mode), and an older deployment's files tightened.
pub(crate) fn sqlite_database(path: &Path) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    options.mode(0o600);
    options.open(path)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        existing_file(Path::new(&name))?;
    }
    Ok(())
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) -> io::Result<()> {
    let current = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if current != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn restrict(_path: &Path, _mode: u32) -> io::Result<()> {
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn directories_and_files_are_private_and_loose_ones_are_tightened() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let nested = tmp.path().join("data/blobs/ab");
        dir(&nested).expect("create");
        assert_eq!(mode(&tmp.path().join("data")), 0o700);
        assert_eq!(mode(&tmp.path().join("data/blobs")), 0o700);
        assert_eq!(mode(&nested), 0o700);

        let loose = tmp.path().join("loose");
        std::fs::create_dir(&loose).expect("mkdir");
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        dir(&loose).expect("tighten");
        assert_eq!(mode(&loose), 0o700);

        let file = nested.join("f");
        create_file(&file).expect("file");
        assert_eq!(mode(&file), 0o600);

        let db = tmp.path().join("relay.sqlite3");
        std::fs::write(&db, b"").expect("write");
        std::fs::write(tmp.path().join("relay.sqlite3-wal"), b"").expect("write");
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::set_permissions(tmp.path().join("relay.sqlite3-wal"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        sqlite_database(&db).expect("prepare");
        assert_eq!(mode(&db), 0o600);
        assert_eq!(mode(&tmp.path().join("relay.sqlite3-wal")), 0o600);
    }
}
