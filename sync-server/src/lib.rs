//! The Crewdesk relay as a library: `run(listener, config, shutdown)` serves automerge-repo's
//! WebSocket protocol (so npm automerge-repo clients and Crewdesk replicas both sync with it),
//! authenticates every connection by token, limits each agent to their teams' conversations,
//! never advertises heads it has not fsynced, and decides grabs.

mod blobs;
pub mod demo_customers;
mod geoip;
mod import;
mod limits;
mod mailer;
mod private;
pub mod relay;
pub mod store;
pub mod whatsapp;
pub mod widget;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Relay settings; `Config::default()` runs out of the box. The binary fills it from flags and
/// `CREWDESK_*` environment variables.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where blobs are kept, and the SQLite database unless `store` names PostgreSQL.
    pub data_dir: PathBuf,
    /// `postgres://…` to share one PostgreSQL database between several relay instances, or
    /// `sqlite://DIR`; `None` is SQLite in `data_dir`.
    pub store: Option<String>,
    pub listen: SocketAddr,
    /// Largest WebSocket message accepted (bigger ones close the connection with an error).
    pub max_frame_bytes: usize,
    /// Ping interval; a connection silent for three intervals is dropped.
    pub keepalive: Duration,
    /// Messages waiting for one slow connection before the relay drops it (it resyncs on reconnect).
    pub outbound_queue: usize,
    /// A client must send its HTTP request head within this time after connecting, and a WebSocket
    /// client its `join` within this time after the upgrade; otherwise the connection is closed.
    pub handshake_timeout: Duration,
    /// SMTP server (`host:port`, plain, e.g. a local relay MTA) for the email fallback; `None` keeps
    /// fallback emails queued until one is configured.
    pub smtp: Option<String>,
    /// Sender of fallback emails.
    pub mail_from: String,
    /// Conversation documents kept in memory; the least recently used beyond this are dropped
    /// (their sync states stay) and read again from SQLite when next needed.
    pub max_loaded_documents: usize,
    /// The WhatsApp Cloud API channel; `None` leaves it off.
    pub whatsapp: Option<whatsapp::WhatsAppConfig>,
    /// A MaxMind DB file (e.g. GeoLite2-City.mmdb) for web-widget customers' location.
    pub geoip: Option<PathBuf>,
    /// Reverse proxies whose `X-Forwarded-For` names the customer's address (empty: the TCP peer
    /// is the customer, whatever the header says).
    pub trusted_proxies: Vec<widget::Cidr>,
    /// Web-widget sockets one session (one customer's conversation) may have open at once.
    pub widget_sockets_per_session: usize,
    /// Web-widget messages one address (IPv6: one /64) may send per 10 seconds, all sessions together.
    pub widget_messages_per_ip: usize,
    /// Web-widget conversations one address may start per 10 minutes.
    pub widget_starts_per_ip: usize,
    /// Largest attachment accepted, in bytes.
    pub max_blob_bytes: usize,
    /// Connections open at once, all addresses together; more are answered 503 (WebSocket: close
    /// 1013) with the reason, while `/health` keeps answering.
    pub max_connections: usize,
    /// Connections open at once from one address (IPv6: one /64); trusted proxies count only
    /// towards `max_connections`.
    pub max_connections_per_address: usize,
    /// A request body may take this long, plus one second per `min_body_rate` bytes; slower bodies
    /// are answered 408 and their connection closed.
    pub body_timeout: Duration,
    /// Bytes per second a request body must keep up after `body_timeout`.
    pub min_body_rate: usize,
}

/// The config file's shape: every field optional, defaults filled from `Config::default()`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    data_dir: Option<PathBuf>,
    store: Option<String>,
    listen: Option<SocketAddr>,
    max_frame_bytes: Option<usize>,
    keepalive_secs: Option<u64>,
    outbound_queue: Option<usize>,
    max_loaded_documents: Option<usize>,
    smtp: Option<String>,
    mail_from: Option<String>,
    whatsapp: Option<whatsapp::WhatsAppConfig>,
    geoip: Option<PathBuf>,
    /// Replaced by `trusted_proxies`; read only to say so.
    trust_forwarded_for: Option<bool>,
    trusted_proxies: Option<Vec<widget::Cidr>>,
    widget_starts_per_ip: Option<usize>,
    widget_sockets_per_session: Option<usize>,
    widget_messages_per_ip: Option<usize>,
    max_blob_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_connections_per_address: Option<usize>,
    body_timeout_secs: Option<u64>,
    min_body_rate: Option<usize>,
}

impl Config {
    /// Reads a TOML config file; unknown keys and bad values are errors that name the file.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Config> {
        use anyhow::Context;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        let file: ConfigFile =
            toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
        let d = Config::default();
        if file.trust_forwarded_for.is_some() {
            anyhow::bail!(
                "{}: `trust_forwarded_for` was replaced by `trusted_proxies = [\"10.0.0.0/8\", ...]`, the addresses of your reverse proxies",
                path.display()
            );
        }
        Ok(Config {
            data_dir: file.data_dir.unwrap_or(d.data_dir),
            store: file.store,
            listen: file.listen.unwrap_or(d.listen),
            max_frame_bytes: file.max_frame_bytes.unwrap_or(d.max_frame_bytes),
            keepalive: file.keepalive_secs.map_or(d.keepalive, Duration::from_secs),
            outbound_queue: file.outbound_queue.unwrap_or(d.outbound_queue),
            handshake_timeout: d.handshake_timeout,
            max_loaded_documents: file.max_loaded_documents.unwrap_or(d.max_loaded_documents),
            smtp: file.smtp.or(d.smtp),
            mail_from: file.mail_from.unwrap_or(d.mail_from),
            whatsapp: file.whatsapp,
            geoip: file.geoip,
            trusted_proxies: file.trusted_proxies.unwrap_or(d.trusted_proxies),
            widget_starts_per_ip: file.widget_starts_per_ip.unwrap_or(d.widget_starts_per_ip),
            widget_sockets_per_session: file.widget_sockets_per_session.unwrap_or(d.widget_sockets_per_session),
            widget_messages_per_ip: file.widget_messages_per_ip.unwrap_or(d.widget_messages_per_ip),
            max_blob_bytes: file.max_blob_bytes.unwrap_or(d.max_blob_bytes),
            max_connections: file.max_connections.unwrap_or(d.max_connections),
            max_connections_per_address: file.max_connections_per_address.unwrap_or(d.max_connections_per_address),
            body_timeout: file.body_timeout_secs.map_or(d.body_timeout, Duration::from_secs),
            min_body_rate: file.min_body_rate.unwrap_or(d.min_body_rate),
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("crewdesk-relay-data"),
            store: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 3030)),
            max_frame_bytes: 8 * 1024 * 1024,
            keepalive: Duration::from_secs(5),
            outbound_queue: 1024,
            handshake_timeout: Duration::from_secs(5),
            max_loaded_documents: 2_000,
            smtp: None,
            mail_from: "Crewdesk <no-reply@crewdesk.invalid>".into(),
            whatsapp: None,
            geoip: None,
            trusted_proxies: Vec::new(),
            widget_starts_per_ip: 10,
            widget_sockets_per_session: 4,
            widget_messages_per_ip: 60,
            max_blob_bytes: 10 * 1024 * 1024,
            // A 1,000-agent team (one socket each, plus a few requests) and its web-widget
            // customers stay far below these.
            max_connections: 20_000,
            max_connections_per_address: 2_000,
            body_timeout: Duration::from_secs(10),
            min_body_rate: 4 * 1024,
        }
    }
}

impl Config {
    /// The store this configuration names.
    pub fn store_url(&self) -> Result<store::StoreUrl, store::StoreError> {
        match &self.store {
            Some(url) => store::StoreUrl::parse(url),
            None => Ok(store::StoreUrl::Sqlite(self.data_dir.clone())),
        }
    }

    /// Where attachment files (and their thumbnails) are kept, by content address.
    pub fn blob_dir(&self) -> std::path::PathBuf {
        self.data_dir.join("blobs")
    }
}

pub use relay::run;
