//! The one error type commands return; the UI shows its message as is.

use serde::{Serialize, Serializer};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("sign in first")]
    NotSignedIn,
    #[error(transparent)]
    Replica(#[from] crewdesk::replica::ReplicaError),
    #[error("{0}")]
    Relay(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the app could not save its settings: {0}")]
    Settings(String),
}

impl Serialize for CommandError {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

pub type CommandResult<T> = Result<T, CommandError>;
