//! The relay binary: parses flags and environment, then serves or administers accounts.

use anyhow::Context;
use clap::{Parser, Subcommand};
use crewdesk::domain::{AgentId, Member, Team, TeamId, Thresholds};
use std::path::PathBuf;
use sync_server::store::{Store, StoreUrl, parse_mode, parse_role};
use sync_server::{Config, run};

#[derive(Parser)]
#[command(name = "sync-server", about = "The Crewdesk relay: sync, accounts, tokens, grab decisions")]
struct Cli {
    /// A TOML file with any of: data_dir, store, listen, max_frame_bytes, keepalive_secs,
    /// outbound_queue, max_loaded_documents, smtp, smtp_password_file, mail_from, ... Flags and CREWDESK_* variables
    /// override it.
    #[arg(long, env = "CREWDESK_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Where the relay keeps its SQLite database and attachment files [default: crewdesk-relay-data].
    #[arg(long, env = "CREWDESK_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Where accounts and conversations are stored: sqlite://DIR (the default, in the data
    /// directory) or postgres://USER@HOST:PORT/DATABASE, shared by several relay instances.
    #[arg(long, env = "CREWDESK_STORE", global = true, hide_env_values = true)]
    store: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// The email channel (see README, "Email"): the team's mailbox, followed by IMAP.
#[derive(clap::Args)]
struct MailboxFlags {
    /// The team's mailbox: imaps://USER@HOST[:PORT]/MAILBOX, the user percent-encoded
    /// (imaps://support%40example.com@imap.example.com/INBOX); imap://…?tls=none only on this machine.
    #[arg(long, value_name = "URL")]
    imap: Option<String>,
    /// A file holding the mailbox password (one line; only the relay's user should read it).
    #[arg(long, value_name = "FILE", conflicts_with = "imap_password_env")]
    imap_password_file: Option<PathBuf>,
    /// An environment variable of the relay holding the mailbox password.
    #[arg(long, value_name = "VAR")]
    imap_password_env: Option<String>,
    /// The team's email address (replies come from it) [default: the IMAP user, when it is one].
    #[arg(long, value_name = "ADDRESS")]
    email_address: Option<String>,
    /// Stop following the team's mailbox.
    #[arg(long, conflicts_with_all = ["imap", "imap_password_file", "imap_password_env", "email_address"])]
    no_imap: bool,
}

/// The WhatsApp Cloud API channel (see README, "WhatsApp"). Setting the team turns it on; the
/// other values then come from the Meta app's dashboard.
#[derive(clap::Args)]
struct WhatsAppFlags {
    /// The team whose conversations WhatsApp messages become.
    #[arg(long, env = "CREWDESK_WHATSAPP_TEAM")]
    whatsapp_team: Option<String>,
    /// The verify token typed in when subscribing the webhook.
    #[arg(long, env = "CREWDESK_WHATSAPP_VERIFY_TOKEN", hide_env_values = true)]
    whatsapp_verify_token: Option<String>,
    /// The Meta app's secret (webhook signatures).
    #[arg(long, env = "CREWDESK_WHATSAPP_APP_SECRET", hide_env_values = true)]
    whatsapp_app_secret: Option<String>,
    /// Access token for the Graph API.
    #[arg(long, env = "CREWDESK_WHATSAPP_ACCESS_TOKEN", hide_env_values = true)]
    whatsapp_access_token: Option<String>,
    /// The sending phone number's id.
    #[arg(long, env = "CREWDESK_WHATSAPP_PHONE_NUMBER_ID")]
    whatsapp_phone_number_id: Option<String>,
    /// Graph API base URL [default: https://graph.facebook.com/v21.0].
    #[arg(long, env = "CREWDESK_WHATSAPP_API_BASE")]
    whatsapp_api_base: Option<String>,
}

impl WhatsAppFlags {
    fn into_config(self) -> anyhow::Result<Option<sync_server::whatsapp::WhatsAppConfig>> {
        let Some(team) = self.whatsapp_team else { return Ok(None) };
        let need = |v: Option<String>, name: &str| {
            v.filter(|v| !v.trim().is_empty())
                .with_context(|| format!("WhatsApp is on (--whatsapp-team) but --{name} is missing"))
        };
        Ok(Some(sync_server::whatsapp::WhatsAppConfig {
            team: TeamId(team),
            verify_token: need(self.whatsapp_verify_token, "whatsapp-verify-token")?,
            app_secret: need(self.whatsapp_app_secret, "whatsapp-app-secret")?,
            access_token: need(self.whatsapp_access_token, "whatsapp-access-token")?,
            phone_number_id: need(self.whatsapp_phone_number_id, "whatsapp-phone-number-id")?,
            api_base: self.whatsapp_api_base.unwrap_or_else(sync_server::whatsapp::default_api_base),
        }))
    }
}

// Parsed once at start: the size of the `serve` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve WebSocket sync and the HTTP API.
    Serve {
        /// Address to listen on [default: 127.0.0.1:3030].
        #[arg(long, env = "CREWDESK_LISTEN")]
        listen: Option<std::net::SocketAddr>,
        /// Largest accepted WebSocket message in bytes [default: 8 MiB].
        #[arg(long, env = "CREWDESK_MAX_FRAME_BYTES")]
        max_frame_bytes: Option<usize>,
        /// SMTP server for the email fallback: smtps://USER@HOST:465 (TLS), smtp://USER@HOST:587
        /// (STARTTLS), or plain to this machine only: smtp://localhost:25?tls=none (or 127.0.0.1:25).
        #[arg(long, env = "CREWDESK_SMTP")]
        smtp: Option<String>,
        /// A file holding the SMTP user's password (one line), never put in the URL.
        #[arg(long, env = "CREWDESK_SMTP_PASSWORD_FILE")]
        smtp_password_file: Option<PathBuf>,
        /// Sender address of fallback emails.
        #[arg(long, env = "CREWDESK_MAIL_FROM")]
        mail_from: Option<String>,
        /// A MaxMind DB file (e.g. GeoLite2-City.mmdb) to locate web-widget customers.
        #[arg(long, env = "CREWDESK_GEOIP")]
        geoip: Option<PathBuf>,
        /// A reverse proxy (address or network, e.g. 10.0.0.0/8) whose X-Forwarded-For names the
        /// customer's address; repeatable. Without one, X-Forwarded-For is ignored.
        #[arg(long = "trusted-proxy", env = "CREWDESK_TRUSTED_PROXIES", value_delimiter = ',')]
        trusted_proxies: Vec<sync_server::widget::Cidr>,
        /// Replaced by --trusted-proxy.
        #[arg(long, hide = true)]
        trust_forwarded_for: bool,
        /// Web-widget conversations one address may start per 10 minutes [default: 10].
        #[arg(long, env = "CREWDESK_WIDGET_STARTS_PER_IP")]
        widget_starts_per_ip: Option<usize>,
        /// Web-widget sockets one customer's session may have open at once [default: 4].
        #[arg(long, env = "CREWDESK_WIDGET_SOCKETS_PER_SESSION")]
        widget_sockets_per_session: Option<usize>,
        /// Web-widget messages one address (IPv6: one /64) may send per 10 s [default: 60].
        #[arg(long, env = "CREWDESK_WIDGET_MESSAGES_PER_IP")]
        widget_messages_per_ip: Option<usize>,
        /// Bytes of files each team's conversations may hold on the relay [default: 21474836480, 20 GiB].
        #[arg(long, env = "CREWDESK_TEAM_BLOB_QUOTA_BYTES")]
        team_blob_quota_bytes: Option<u64>,
        /// Connections open at once, all addresses together [default: 20000].
        #[arg(long, env = "CREWDESK_MAX_CONNECTIONS")]
        max_connections: Option<usize>,
        /// Connections open at once from one address (IPv6: one /64; trusted proxies exempt)
        /// [default: 2000].
        #[arg(long, env = "CREWDESK_MAX_CONNECTIONS_PER_ADDRESS")]
        max_connections_per_address: Option<usize>,
        #[command(flatten)]
        whatsapp: WhatsAppFlags,
    },
    /// Create or update a team. For an existing team, only the settings given change.
    Team {
        id: String,
        /// The team's name (needed to create it).
        #[arg(long)]
        name: Option<String>,
        /// open or grab [default for a new team: open]
        #[arg(long)]
        mode: Option<String>,
        /// [default for a new team: 180]
        #[arg(long)]
        soon_to_be_secs: Option<i64>,
        /// [default for a new team: 300]
        #[arg(long)]
        overdue_secs: Option<i64>,
        /// [default for a new team: 86400]
        #[arg(long)]
        auto_close_secs: Option<i64>,
        /// Where 📹 meeting links point, a Jitsi Meet style server [default: https://meet.jit.si/].
        #[arg(long)]
        conference_base: Option<String>,
        /// A website the team's web widget may run on, e.g. https://shop.example.com; repeatable.
        /// Given at least once, it replaces the team's list.
        #[arg(long = "widget-origin")]
        widget_origins: Vec<String>,
        /// Remove every widget origin (the widget then runs nowhere).
        #[arg(long, conflicts_with = "widget_origins")]
        no_widget_origins: bool,
        /// The greeting the widget shows customers ("" for the default one).
        #[arg(long)]
        widget_greeting: Option<String>,
        #[command(flatten)]
        mailbox: MailboxFlags,
    },
    /// Give a team a new web-widget key and print it; the old key stops working at once, so update
    /// the snippet on the team's website.
    RotateWidgetKey { team: String },
    /// Add an agent to a team (or change their role there).
    AddAgent {
        agent: String,
        #[arg(long)]
        team: String,
        #[arg(long)]
        name: String,
        /// representative or admin
        #[arg(long, default_value = "representative")]
        role: String,
    },
    /// Remove an agent from a team.
    RemoveAgent {
        agent: String,
        #[arg(long)]
        team: String,
    },
    /// Issue a token for an agent; it is printed once and stored only as a hash.
    IssueToken {
        agent: String,
        #[arg(long, default_value = "desktop")]
        label: String,
    },
    /// Revoke an agent's tokens (all, or the one given).
    RevokeToken {
        agent: String,
        #[arg(long)]
        token: Option<String>,
    },
    /// Add, replace or remove a team's 📃 message template (what agents pick in the composer and
    /// edit before sending). Placeholders: {name}, {email}, {phone} (the customer's), {agent}.
    /// Desks see the change when they next connect.
    #[command(group = clap::ArgGroup::new("what").required(true).args(["text", "remove"]))]
    Template {
        team: String,
        /// The template's name, as agents see it in the 📃 menu.
        #[arg(long)]
        name: String,
        /// Its text, e.g. "Hello {name}, this is {agent} from the shop."
        #[arg(long)]
        text: Option<String>,
        /// Remove the template of that name instead.
        #[arg(long)]
        remove: bool,
    },
    /// Add or replace an approved WhatsApp template of a team (as approved in WhatsApp Manager).
    WhatsappTemplate {
        team: String,
        /// The template's name in WhatsApp Manager, e.g. order_update.
        #[arg(long)]
        name: String,
        /// Its language code, e.g. en_US.
        #[arg(long)]
        language: String,
        /// Its body with numbered parameters, e.g. "Hello {{1}}, your order {{2}} shipped."
        #[arg(long)]
        body: String,
    },
    /// List teams, members and tokens.
    List,
    /// Create the demo teams and agents, load the demo conversations, print a token per agent.
    SeedDemo {
        /// How many conversations [default: 42, every status on every channel for both teams].
        #[arg(long)]
        conversations: Option<usize>,
        /// Messages per conversation (at least 2) [default: 6].
        #[arg(long)]
        messages: Option<usize>,
        /// One more conversation of this many messages (for the benchmarks: a long one to open).
        #[arg(long)]
        long: Option<usize>,
        /// Also write the same conversations into a desk replica at this path, as the desk of
        /// --agent would hold them after syncing (the desk benchmark starts from it).
        #[arg(long, value_name = "PATH")]
        desk_replica: Option<PathBuf>,
        /// Whose desk --desk-replica is.
        #[arg(long, default_value = "ada")]
        agent: String,
    },
    /// Activity made elsewhere, for the desk benchmark: the customer writes again in each of the
    /// first N demo conversations (relay stopped; the desks get it when they next sync).
    DemoFollowUps {
        #[arg(long)]
        count: usize,
    },
    /// Demo customers (for `cargo xtask run`): people chatting through a team's web widget on the
    /// relay at --relay, staying online and writing again now and then, until stopped.
    DemoCustomers {
        /// The relay's address, e.g. http://127.0.0.1:3030.
        #[arg(long)]
        relay: String,
        /// The team's widget key (`sync-server team TEAM` prints it).
        #[arg(long)]
        key: String,
        /// How many customers.
        #[arg(long, default_value_t = 3)]
        count: usize,
    },
    /// Copy a deployment from SQLite into an empty PostgreSQL database, then verify row counts
    /// and every conversation's heads. Stop the relay first (or copy again afterwards).
    Migrate {
        /// The SQLite store: sqlite://DIR, the relay's data directory.
        #[arg(long)]
        from: String,
        /// The PostgreSQL database: postgres://USER@HOST:PORT/DATABASE.
        #[arg(long)]
        to: String,
    },
}

/// Threads for blocking work (storage calls, file writes). Storage calls are short and SQLite
/// serializes writers anyway; without a bound, 1,000 agents connecting at once spawned well over
/// a hundred threads, each keeping its stack and allocator cache (most of the relay's memory).
const BLOCKING_THREADS: usize = 24;

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()?
        .block_on(relay_main())
}

async fn relay_main() -> anyhow::Result<()> {
    // Logs go to stderr: stdout carries what admin commands print (tokens, lists), for scripts.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let cli = Cli::parse();
    let mut config = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    if let Some(store) = cli.store {
        config.store = Some(store);
    }
    match cli.command {
        Command::Serve {
            listen,
            max_frame_bytes,
            smtp,
            smtp_password_file,
            mail_from,
            geoip,
            trusted_proxies,
            trust_forwarded_for,
            widget_starts_per_ip,
            widget_sockets_per_session,
            widget_messages_per_ip,
            team_blob_quota_bytes,
            max_connections,
            max_connections_per_address,
            whatsapp,
        } => {
            anyhow::ensure!(
                !trust_forwarded_for,
                "--trust-forwarded-for was replaced by --trusted-proxy ADDRESS_OR_NETWORK (repeatable): \
                 only your reverse proxies may name a customer's address"
            );
            config.geoip = geoip.or(config.geoip);
            if !trusted_proxies.is_empty() {
                config.trusted_proxies = trusted_proxies;
            }
            config.widget_starts_per_ip = widget_starts_per_ip.unwrap_or(config.widget_starts_per_ip);
            config.widget_sockets_per_session = widget_sockets_per_session.unwrap_or(config.widget_sockets_per_session);
            config.widget_messages_per_ip = widget_messages_per_ip.unwrap_or(config.widget_messages_per_ip);
            if let Some(wa) = whatsapp.into_config()? {
                config.whatsapp = Some(wa);
            }
            config.smtp = smtp.or(config.smtp);
            if let Some(path) = smtp_password_file {
                config.smtp_password = Some(sync_server::smtp::SmtpPassword::from_file(&path)?);
            }
            config.mail_from = mail_from.unwrap_or(config.mail_from);
            config.listen = listen.unwrap_or(config.listen);
            config.max_frame_bytes = max_frame_bytes.unwrap_or(config.max_frame_bytes);
            config.team_blob_quota_bytes = team_blob_quota_bytes.unwrap_or(config.team_blob_quota_bytes);
            config.max_connections = max_connections.unwrap_or(config.max_connections);
            config.max_connections_per_address =
                max_connections_per_address.unwrap_or(config.max_connections_per_address);
            let listen = config.listen;
            let listener =
                tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
            run(listener, config, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
        }
        Command::DemoCustomers { relay, key, count } => sync_server::demo_customers::run(&relay, &key, count).await,
        Command::Migrate { from, to } => {
            let from = match StoreUrl::parse(&from)? {
                StoreUrl::Sqlite(dir) => dir,
                StoreUrl::Postgres(_) => anyhow::bail!("--from must be sqlite://DIR"),
            };
            let StoreUrl::Postgres(to) = StoreUrl::parse(&to)? else { anyhow::bail!("--to must be postgres://...") };
            let report =
                tokio::task::spawn_blocking(move || sync_server::store::migrate::migrate(&from, &to)).await??;
            println!("{report}");
            Ok(())
        }
        command => {
            // The store blocks (PostgreSQL's driver runs on a runtime of its own).
            let url = config.store_url()?;
            tokio::task::spawn_blocking(move || admin(&Store::connect(&url)?, command)).await?
        }
    }
}

fn admin(store: &Store, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Team {
            id,
            name,
            mode,
            soon_to_be_secs,
            overdue_secs,
            auto_close_secs,
            conference_base,
            widget_origins,
            no_widget_origins,
            widget_greeting,
            mailbox,
        } => {
            if let Some(base) = &conference_base {
                crewdesk::domain::validate_conference_base(base).with_context(|| {
                    format!("--conference-base {base}: expected an http(s) URL like https://meet.example.com/")
                })?;
            }
            let origins = widget_origins
                .iter()
                .map(|o| sync_server::widget::normalize_origin(o).with_context(|| format!("--widget-origin {o}")))
                .collect::<anyhow::Result<Vec<String>>>()?;
            let existing = store.teams()?.into_iter().find(|t| t.id.as_str() == id);
            let d = Thresholds::default();
            let secs =
                |given: Option<i64>, old: Option<i64>, default: i64| given.map_or(old.unwrap_or(default), |s| s * 1000);
            let old = existing.as_ref().map(|t| t.thresholds);
            let thresholds = Thresholds {
                soon_to_be: secs(soon_to_be_secs, old.map(|t| t.soon_to_be), d.soon_to_be),
                overdue: secs(overdue_secs, old.map(|t| t.overdue), d.overdue),
                auto_close: secs(auto_close_secs, old.map(|t| t.auto_close), d.auto_close),
            };
            let name = match (name, &existing) {
                (Some(name), _) => name,
                (None, Some(t)) => t.name.clone(),
                (None, None) => anyhow::bail!("no team {id} yet: create it with --name"),
            };
            let mode = match (mode, &existing) {
                (Some(mode), _) => parse_mode(&mode)?,
                (None, Some(t)) => t.mode,
                (None, None) => crewdesk::domain::TeamMode::Open,
            };
            let team = Team {
                id: TeamId(id.clone()),
                name,
                mode,
                thresholds,
                members: Vec::new(),
                templates: existing.as_ref().map(|t| t.templates.clone()).unwrap_or_default(),
                whatsapp_templates: existing.as_ref().map(|t| t.whatsapp_templates.clone()).unwrap_or_default(),
                conference_base: conference_base.or_else(|| existing.and_then(|t| t.conference_base)),
            };
            store.put_team(&team)?;
            if !origins.is_empty() || no_widget_origins {
                store.set_widget_origins(&team.id, &origins)?;
            }
            if let Some(greeting) = &widget_greeting {
                let greeting = greeting.trim();
                anyhow::ensure!(greeting.chars().count() <= 300, "--widget-greeting: at most 300 characters");
                store.set_widget_greeting(&team.id, Some(greeting).filter(|g| !g.is_empty()))?;
            }
            if mailbox.no_imap {
                let removed = store.remove_mailbox(&team.id)?;
                println!(
                    "{}",
                    if removed { "the team's mailbox is no longer followed" } else { "the team had no mailbox" }
                );
            } else if let Some(url) = &mailbox.imap {
                let server = sync_server::email::ImapServer::parse(url)?;
                let address =
                    mailbox.email_address.clone().unwrap_or_else(|| server.user.clone()).trim().to_ascii_lowercase();
                anyhow::ensure!(
                    address.parse::<lettre::Address>().is_ok(),
                    "--email-address: {address:?} is not an email address (the IMAP user is not one: name the team's address)"
                );
                let password_file = match &mailbox.imap_password_file {
                    Some(path) => {
                        let path = std::path::absolute(path)?;
                        std::fs::read_to_string(&path)
                            .with_context(|| format!("--imap-password-file {}", path.display()))?;
                        Some(path.display().to_string())
                    }
                    None => None,
                };
                anyhow::ensure!(
                    password_file.is_some() || mailbox.imap_password_env.is_some(),
                    "--imap needs the password: --imap-password-file FILE or --imap-password-env VAR"
                );
                store.set_mailbox(&sync_server::store::MailboxSetting {
                    team: team.id.clone(),
                    url: url.clone(),
                    password_file,
                    password_env: mailbox.imap_password_env.clone(),
                    address: address.clone(),
                    uidvalidity: 0,
                    last_uid: 0,
                })?;
                println!(
                    "mail to {address} ({}:{} {}) becomes {id}'s Email conversations",
                    server.host, server.port, server.mailbox
                );
            } else if mailbox.imap_password_file.is_some()
                || mailbox.imap_password_env.is_some()
                || mailbox.email_address.is_some()
            {
                anyhow::bail!("--imap-password-file, --imap-password-env and --email-address go with --imap URL");
            }
            println!("team {id} saved");
            if let Some(w) = store.widget_settings(&team.id)? {
                let origins = if w.origins.is_empty() {
                    "none yet (add --widget-origin URL)".into()
                } else {
                    w.origins.join(" ")
                };
                println!("widget key {}; widget origins: {origins}", w.key);
            }
        }
        Command::RotateWidgetKey { team } => {
            let key = store.rotate_widget_key(&TeamId(team.clone()))?;
            println!("{key}");
            eprintln!("the old widget key of {team} no longer works: put the new one in the snippet on your website");
        }
        Command::AddAgent { agent, team, name, role } => {
            store.add_member(
                &TeamId(team.clone()),
                &Member { agent: AgentId(agent.clone()), name, role: parse_role(&role)? },
            )?;
            println!("{agent} is {role} in {team}");
        }
        Command::RemoveAgent { agent, team } => {
            let removed = store.remove_member(&TeamId(team.clone()), &AgentId(agent.clone()))?;
            println!(
                "{}",
                if removed { format!("{agent} removed from {team}") } else { format!("{agent} was not in {team}") }
            );
        }
        Command::IssueToken { agent, label } => println!("{}", store.issue_token(&AgentId(agent), &label)?),
        Command::RevokeToken { agent, token } => {
            println!("{} token(s) revoked", store.revoke_tokens(&AgentId(agent), token.as_deref())?)
        }
        Command::Template { team, name, text, remove: _ } => {
            let mut t = store
                .teams()?
                .into_iter()
                .find(|t| t.id.as_str() == team)
                .with_context(|| format!("no team {team}; create it with `sync-server team {team} --name ...`"))?;
            let name = name.trim().to_owned();
            match text {
                Some(text) => {
                    let template = crewdesk::domain::MessageTemplate { name: name.clone(), text };
                    match t.templates.iter_mut().find(|x| x.name == name) {
                        Some(existing) => *existing = template,
                        None => t.templates.push(template),
                    }
                    t.templates = crewdesk::domain::checked_templates(std::mem::take(&mut t.templates))
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    store.put_team(&t)?;
                    println!("template {name} saved for {team} ({} in all)", t.templates.len());
                }
                None => {
                    let before = t.templates.len();
                    t.templates.retain(|x| x.name != name);
                    anyhow::ensure!(
                        t.templates.len() < before,
                        "{team} has no template named {name} (it has: {})",
                        t.templates.iter().map(|x| x.name.as_str()).collect::<Vec<_>>().join(", ")
                    );
                    store.put_team(&t)?;
                    println!("template {name} removed from {team} ({} left)", t.templates.len());
                }
            }
        }
        Command::WhatsappTemplate { team, name, language, body } => {
            let mut t = store
                .teams()?
                .into_iter()
                .find(|t| t.id.as_str() == team)
                .with_context(|| format!("no team {team}; create it with `sync-server team {team} --name ...`"))?;
            anyhow::ensure!(
                !name.trim().is_empty() && !language.trim().is_empty() && !body.trim().is_empty(),
                "name, language and body must not be empty"
            );
            t.whatsapp_templates.retain(|w| !(w.name == name && w.language == language));
            t.whatsapp_templates.push(crewdesk::domain::WhatsAppTemplate { name: name.clone(), language, body });
            store.put_team(&t)?;
            println!("WhatsApp template {name} saved for {team}");
        }
        Command::List => print!("{}", store.describe()?),
        Command::SeedDemo { conversations, messages, long, desk_replica, agent } => {
            let now = crewdesk::domain::Timestamp::now();
            let defaults = crewdesk::demo::DemoSpec::default();
            let spec = crewdesk::demo::DemoSpec {
                conversations: conversations.unwrap_or(defaults.conversations),
                messages_per_conversation: messages.unwrap_or(defaults.messages_per_conversation),
                ..defaults
            };
            for team in crewdesk::demo::teams() {
                store.put_team(&team)?;
            }
            let mut generated = crewdesk::demo::conversations(&spec, now)?;
            if let Some(n) = long {
                let c = crewdesk::demo::long_conversation(spec.conversations, n, now)?;
                let customer = crewdesk::replica::doc::read_header(&c.document)?.customer.name;
                eprintln!("long conversation {} of {n} messages, customer {customer}", c.id);
                generated.push(c);
            }
            let saved = crewdesk::demo::save(generated);
            let mut added = 0;
            for batch in saved.chunks(500) {
                let mut docs = Vec::with_capacity(batch.len());
                for (id, bytes, _) in batch {
                    let header = crewdesk::replica::doc::read_header(&automerge::Automerge::load(bytes)?)?;
                    docs.push((id.0.clone(), header.team, bytes.clone()));
                }
                added += store.import_documents(&docs)?;
            }
            eprintln!("{added} demo conversations loaded");
            if let Some(path) = desk_replica {
                let mut replica = crewdesk::replica::Replica::open(&path, AgentId::from(agent.as_str()))
                    .with_context(|| format!("the desk replica at {}", path.display()))?;
                crewdesk::demo::load(&mut replica, &saved)?;
                eprintln!("{} conversations written to {agent}'s desk replica at {}", saved.len(), path.display());
            }
            for (agent, ..) in crewdesk::demo::AGENTS {
                println!("{agent} {}", store.issue_token(&AgentId::from(*agent), "demo")?);
            }
        }
        Command::DemoFollowUps { count } => {
            let at = crewdesk::domain::Timestamp::now();
            let teams: Vec<TeamId> = store.teams()?.into_iter().map(|t| t.id).collect();
            let ids: Vec<String> = store.documents_of(&teams)?.into_iter().take(count).collect();
            for (k, id) in ids.iter().enumerate() {
                let (team, bytes) = store.load_document(id)?.with_context(|| format!("conversation {id} vanished"))?;
                let mut document = automerge::Automerge::load(&bytes)?;
                let change = crewdesk::demo::follow_up(&mut document, k, at)?;
                store.append_chunk(id, &team, &change)?;
            }
            println!("{} follow-ups written at {}", ids.len(), at.0);
        }
        Command::Serve { .. } | Command::Migrate { .. } | Command::DemoCustomers { .. } => {
            unreachable!("handled in main")
        }
    }
    Ok(())
}
