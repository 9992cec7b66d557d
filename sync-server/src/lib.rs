//! The Crewdesk relay as a library: `run(listener, config, shutdown)` serves automerge-repo's
//! WebSocket protocol (so npm automerge-repo clients and Crewdesk replicas both sync with it),
//! authenticates every connection by token, limits each agent to their teams' conversations,
//! never advertises heads it has not fsynced, and decides grabs.

pub mod relay;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Relay settings; `Config::default()` runs out of the box. The binary fills it from flags and
/// `CREWDESK_*` environment variables.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Largest WebSocket message accepted (bigger ones close the connection with an error).
    pub max_frame_bytes: usize,
    /// Ping interval; a connection silent for three intervals is dropped.
    pub keepalive: Duration,
    /// Messages waiting for one slow connection before the relay drops it (it resyncs on reconnect).
    pub outbound_queue: usize,
    /// A client must send `join` within this time after connecting.
    pub handshake_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("crewdesk-relay-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 3030)),
            max_frame_bytes: 8 * 1024 * 1024,
            keepalive: Duration::from_secs(5),
            outbound_queue: 1024,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

pub use relay::run;
