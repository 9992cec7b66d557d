//! The Crewdesk relay as a library: `run(listener, config, shutdown)` serves automerge-repo's
//! WebSocket protocol (so npm automerge-repo clients and Crewdesk replicas both sync with it),
//! authenticates every connection by token, limits each agent to their teams' conversations,
//! never advertises heads it has not fsynced, and decides grabs.

mod blobs;
pub mod demo_customers;
pub mod email;
mod geoip;
mod images;
mod import;
mod limits;
mod mailer;
mod private;
pub mod relay;
pub mod smtp;
pub mod store;
mod templates;
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
    /// SMTP server for the email fallback: `smtps://USER@HOST:465` (TLS), `smtp://USER@HOST:587`
    /// (STARTTLS) or, on this machine only, plain `smtp://localhost:25?tls=none` / `127.0.0.1:25`
    /// (see [`smtp::SmtpServer::parse`]); `None` keeps fallback emails queued until one is configured.
    pub smtp: Option<String>,
    /// The SMTP user's password (read from `--smtp-password-file`), never part of the URL.
    pub smtp_password: Option<smtp::SmtpPassword>,
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
    /// Largest image accepted, in pixels (width × height, read from its header before decoding);
    /// larger ones are refused with 422 and nothing is stored.
    pub max_image_pixels: u64,
    /// Bytes of files each team's conversations may hold on the relay (each file counted once per
    /// team); an upload beyond it is refused with 507 and nothing is stored.
    pub team_blob_quota_bytes: u64,
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
    smtp_password_file: Option<PathBuf>,
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
    max_image_pixels: Option<u64>,
    team_blob_quota_bytes: Option<u64>,
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
            smtp_password: match &file.smtp_password_file {
                Some(p) => Some(smtp::SmtpPassword::from_file(p).with_context(|| format!("in {}", path.display()))?),
                None => d.smtp_password,
            },
            mail_from: file.mail_from.unwrap_or(d.mail_from),
            whatsapp: file.whatsapp,
            geoip: file.geoip,
            trusted_proxies: file.trusted_proxies.unwrap_or(d.trusted_proxies),
            widget_starts_per_ip: file.widget_starts_per_ip.unwrap_or(d.widget_starts_per_ip),
            widget_sockets_per_session: file.widget_sockets_per_session.unwrap_or(d.widget_sockets_per_session),
            widget_messages_per_ip: file.widget_messages_per_ip.unwrap_or(d.widget_messages_per_ip),
            max_blob_bytes: file.max_blob_bytes.unwrap_or(d.max_blob_bytes),
            max_image_pixels: file.max_image_pixels.unwrap_or(d.max_image_pixels),
            team_blob_quota_bytes: file.team_blob_quota_bytes.unwrap_or(d.team_blob_quota_bytes),
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
            smtp_password: None,
            mail_from: "Crewdesk <no-reply@crewdesk.invalid>".into(),
            whatsapp: None,
            geoip: None,
            trusted_proxies: Vec::new(),
            widget_starts_per_ip: 10,
            widget_sockets_per_session: 4,
            widget_messages_per_ip: 60,
            max_blob_bytes: 10 * 1024 * 1024,
            // A 48-megapixel phone photo passes; its decoded pixels stay under 200 MiB.
            max_image_pixels: 50_000_000,
            // About 2,000 photos at the largest file size per team.
            team_blob_quota_bytes: 20 * 1024 * 1024 * 1024,
            // A 1,000-agent team (one socket each, plus a few requests) and its web-widget
            // customers stay far below these.
            max_connections: 20_000,
            max_connections_per_address: 2_000,
            body_timeout: Duration::from_secs(10),
            min_body_rate: 4 * 1024,
        }
    }
}

/// A configuration the relay refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "WhatsApp is on (team {team}) but its {setting} is empty: set `{setting}` in the [whatsapp] table of the \
         config file, --whatsapp-{flag} or CREWDESK_WHATSAPP_{env} (an empty app secret would let anyone forge webhook \
         deliveries)"
    )]
    WhatsAppSettingEmpty { team: String, setting: &'static str, flag: &'static str, env: &'static str },
    #[error(transparent)]
    Smtp(#[from] smtp::SmtpError),
}

impl Config {
    /// Checks what a typo could turn into a hole (an empty WhatsApp secret, plain SMTP over a
    /// network); returns the SMTP server to use. `run` refuses to start when this fails.
    pub fn check(&self) -> Result<Option<smtp::SmtpServer>, ConfigError> {
        if let Some(wa) = &self.whatsapp {
            let settings = [
                (&wa.app_secret, "app_secret", "app-secret", "APP_SECRET"),
                (&wa.verify_token, "verify_token", "verify-token", "VERIFY_TOKEN"),
                (&wa.access_token, "access_token", "access-token", "ACCESS_TOKEN"),
                (&wa.phone_number_id, "phone_number_id", "phone-number-id", "PHONE_NUMBER_ID"),
            ];
            if let Some((_, setting, flag, env)) = settings.into_iter().find(|(v, ..)| v.trim().is_empty()) {
                return Err(ConfigError::WhatsAppSettingEmpty { team: wa.team.0.clone(), setting, flag, env });
            }
        }
        match &self.smtp {
            Some(setting) => Ok(Some(smtp::SmtpServer::parse(setting, self.smtp_password.as_ref())?)),
            None if self.smtp_password.is_some() => {
                Err(smtp::SmtpError::new("a password file is given but no SMTP server (--smtp smtps://USER@HOST:465)")
                    .into())
            }
            None => Ok(None),
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn whatsapp(app_secret: &str) -> whatsapp::WhatsAppConfig {
        whatsapp::WhatsAppConfig {
            team: crewdesk::domain::TeamId("support".into()),
            verify_token: "verify".into(),
            app_secret: app_secret.into(),
            access_token: "EAAG".into(),
            phone_number_id: "1055".into(),
            api_base: whatsapp::default_api_base(),
        }
    }

    #[test]
    fn whatsapp_with_an_empty_or_blank_secret_is_refused_naming_the_setting() {
        for secret in ["", "   ", "\t\n"] {
            let config = Config { whatsapp: Some(whatsapp(secret)), ..Config::default() };
            let e = config.check().unwrap_err().to_string();
            assert!(e.contains("app_secret") && e.contains("CREWDESK_WHATSAPP_APP_SECRET"), "{e}");
        }
        let mut blank_verify = whatsapp("s3cret");
        blank_verify.verify_token = " ".into();
        let e = Config { whatsapp: Some(blank_verify), ..Config::default() }.check().unwrap_err().to_string();
        assert!(e.contains("verify_token"), "{e}");
        assert!(Config { whatsapp: Some(whatsapp("s3cret")), ..Config::default() }.check().is_ok());
        assert!(!whatsapp::signature_valid("", b"{}", Some(&whatsapp::sign("", b"{}"))), "no secret, no signature");
    }

    #[test]
    fn smtp_settings_are_checked_with_the_password_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let password = dir.path().join("smtp-password");
        std::fs::write(&password, "s3cret\n").expect("write");
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            format!("smtp = \"smtps://desk@mail.example.com\"\nsmtp_password_file = \"{}\"\n", password.display()),
        )
        .expect("write");
        let config = Config::from_file(&file).expect("config");
        assert_eq!(config.smtp_password.as_ref().map(|p| p.0.as_str()), Some("s3cret"));
        let server = config.check().expect("valid").expect("an SMTP server");
        assert_eq!((server.port, server.security), (465, smtp::SmtpSecurity::Tls));
        assert!(!format!("{config:?}").contains("s3cret"), "the password is not in debug output");

        let e = Config { smtp: Some("mail.example.com:25".into()), ..Config::default() }.check().unwrap_err();
        assert!(e.to_string().contains("unencrypted"), "{e}");
        let e = Config { smtp_password: config.smtp_password.clone(), ..Config::default() }.check().unwrap_err();
        assert!(e.to_string().contains("no SMTP server"), "{e}");
        std::fs::write(&file, "smtp_password_file = \"/nonexistent/smtp-password\"\n").expect("write");
        let e = format!("{:#}", Config::from_file(&file).unwrap_err());
        assert!(e.contains("cannot read the SMTP password file") && e.contains("relay.toml"), "{e}");
    }

    #[tokio::test]
    async fn the_relay_refuses_to_start_with_whatsapp_and_a_blank_secret_before_opening_anything() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            "[whatsapp]\nteam = \"support\"\nverify_token = \"v\"\napp_secret = \"  \"\naccess_token = \"a\"\nphone_number_id = \"1\"\n",
        )
        .expect("write");
        let config = Config { data_dir: data.clone(), ..Config::from_file(&file).expect("the file parses") };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let e = run(listener, config, std::future::pending()).await.unwrap_err().to_string();
        assert!(e.contains("WhatsApp is on (team support) but its app_secret is empty"), "{e}");
        assert!(!data.exists(), "nothing was created");
    }
}
