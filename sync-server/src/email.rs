//! The email channel: customers write to a team's address, crew replies thread in their mail client.
//!
//! Inbound: each team with a mailbox (`sync-server team TEAM --imap imaps://USER@HOST/INBOX`) is
//! followed by one relay instance (a lock in the shared store: when that instance dies another
//! takes the mailbox over). The follower reads every mail above the last UID taken in, waits with
//! IDLE (or polls when the server has no IDLE), and turns each mail into messages of the
//! conversation it answers (`In-Reply-To`/`References` matched to the thread's Message-IDs, then the
//! sender's address) or of a new Email conversation. Text parts become the message (HTML turned
//! into plain text, quoted history cut), files go to the blob store under the widget's type and
//! size rules. Auto-replies, bulk mail, our own mail and Message-IDs already taken in start or
//! continue nothing; each sender has a rate limit.
//!
//! Exactly once: the mailbox's UIDVALIDITY and the mail's UID, its Message-ID and its thread are
//! recorded in the transaction that stores the conversation's change (`TakenMail` with the chunk);
//! a relay killed before that commit reads the mail again. Besides, a mail's message ids (and, for a
//! first mail, the conversation's id) follow from UIDVALIDITY and UID and the conversation is checked
//! for them before anything is written, so a mail read again (a first mail with files, stopped
//! between its conversation and its files; or a mailbox whose progress was lost) writes nothing twice.
//!
//! Outbound: crew messages in Email conversations go through the email outbox (see
//! [`crate::mailer`]) as replies from the team's address with the thread's headers.

use crate::relay::Relay;
use crate::store::{MailboxSetting, TakenMail};
use crewdesk::domain::{Author, Channel, Customer, CustomerId, Message, MessageBody, MessageId, TeamId, Timestamp};
use crewdesk::replica::doc::{self, NewConversation};
use mail_parser::{HeaderValue, MessageParser, MimeHeaders};
use rand::SeedableRng;
use sha2::Digest;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::{info, warn};

/// Mails larger than this are not taken in whole: the conversation gets a note instead.
pub const MAX_MAIL_BYTES: u32 = 25 * 1024 * 1024;

/// Mails one sender may send a team per hour; more are left in the mailbox unread by the desk
/// (the log says so).
pub const MAILS_PER_SENDER_PER_HOUR: usize = 30;

/// On a mailbox's first read (and after its UIDVALIDITY changed) only mail that arrived in the last
/// this many days is taken in: connecting a mailbox that holds years of mail does not turn them all
/// into conversations. Older mail stays in the mailbox, untouched.
pub const FIRST_READ_DAYS: i64 = 7;

/// Mails taken in per round before the follower looks at its stop signal and the lock again.
const MAILS_PER_ROUND: usize = 100;

/// How long the follower waits in IDLE before it asks again (servers drop idle clients at 30 min).
const IDLE_FOR: Duration = Duration::from_secs(9 * 60);

/// How often a server without IDLE is asked for new mail.
const POLL_EVERY: Duration = Duration::from_secs(30);

/// Network operations (connect, sign in, one command) give up after this.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// How the connection to the IMAP server is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImapSecurity {
    /// TLS from the first byte (`imaps://`, port 993 by default).
    Tls,
    /// No encryption: only to a server on this machine (`imap://127.0.0.1:143/INBOX?tls=none`).
    Plain,
}

/// A mailbox setting, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImapServer {
    pub host: String,
    pub port: u16,
    pub security: ImapSecurity,
    pub user: String,
    pub mailbox: String,
}

/// A refused mailbox setting; the text says what to write instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("IMAP setting: {0}")]
pub struct ImapError(String);

impl ImapServer {
    /// `imaps://USER@HOST[:PORT]/MAILBOX` (the user percent-encoded: `support%40example.com`), or
    /// `imap://USER@HOST:PORT/MAILBOX?tls=none` to a server on this machine. No password in it.
    pub fn parse(setting: &str) -> Result<ImapServer, ImapError> {
        let refuse = |why: &str| Err(ImapError(format!("{setting:?}: {why}")));
        let Ok(url) = url::Url::parse(setting) else {
            return refuse("expected a URL like imaps://support%40example.com@mail.example.com/INBOX");
        };
        if url.password().is_some() {
            return refuse("the password does not go in the URL: use --imap-password-file or --imap-password-env");
        }
        let plain = url.query_pairs().any(|(k, v)| k == "tls" && v == "none");
        let security = match (url.scheme(), plain) {
            ("imaps", false) => ImapSecurity::Tls,
            ("imap", true) => ImapSecurity::Plain,
            ("imap", false) => {
                return refuse("use imaps:// (TLS); plain imap://…?tls=none only reaches a server on this machine");
            }
            _ => return refuse("the scheme is imaps:// (or imap://…?tls=none on this machine)"),
        };
        let Some(host) = url.host_str().filter(|h| !h.is_empty()) else { return refuse("no host") };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        if security == ImapSecurity::Plain && !is_loopback(&host) {
            return refuse("plain IMAP (tls=none) only to this machine (localhost, 127.0.0.1, ::1)");
        }
        let user = percent_encoding::percent_decode_str(url.username()).decode_utf8_lossy().into_owned();
        if user.is_empty() {
            return refuse("name the user: imaps://USER@HOST/INBOX");
        }
        let mailbox =
            percent_encoding::percent_decode_str(url.path().trim_start_matches('/')).decode_utf8_lossy().into_owned();
        let mailbox = if mailbox.is_empty() { "INBOX".to_owned() } else { mailbox };
        if mailbox.chars().any(|c| c.is_control() || c == '"' || c == '\\') {
            return refuse("the mailbox name has characters IMAP cannot quote");
        }
        let port = url.port().unwrap_or(if security == ImapSecurity::Tls { 993 } else { 143 });
        Ok(ImapServer { host, port, security, user, mailbox })
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The mailbox password, kept out of `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct ImapPassword(String);

impl fmt::Debug for ImapPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ImapPassword(..)")
    }
}

impl ImapPassword {
    /// Reads the password where the setting says it is: a file (one line) or an environment variable.
    pub fn of(setting: &MailboxSetting) -> Result<ImapPassword, String> {
        let text = match (&setting.password_file, &setting.password_env) {
            (Some(path), _) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the mailbox password file {path}: {e}"))?,
            (None, Some(var)) => std::env::var(var)
                .map_err(|_| format!("the environment variable {var} (the mailbox password) is not set"))?,
            (None, None) => return Err("no password: set --imap-password-file or --imap-password-env".into()),
        };
        let password = text.trim_end_matches(['\r', '\n']);
        if password.is_empty() {
            return Err("the mailbox password is empty".into());
        }
        Ok(ImapPassword(password.to_owned()))
    }
}

/// Follows every team's mailbox (re-reading the settings now and then, so `sync-server team
/// --imap` takes effect without a restart) until the relay stops.
pub async fn run(relay: Arc<Relay>, mut stop: watch::Receiver<bool>) {
    let mut followers: HashMap<TeamId, (MailboxSetting, tokio::task::JoinHandle<()>)> = HashMap::new();
    loop {
        if let Ok(settings) = relay.blocking(|s| s.mailboxes()).await {
            followers.retain(|team, (setting, task)| {
                let same = settings.iter().any(|s| &s.team == team && same_setting(s, setting));
                if !same {
                    task.abort();
                }
                same
            });
            for setting in settings {
                if !followers.contains_key(&setting.team) {
                    let task = tokio::spawn(follow(relay.clone(), setting.clone(), stop.clone()));
                    followers.insert(setting.team.clone(), (setting, task));
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = crate::relay::stopped(&mut stop) => break,
        }
    }
    for (_, (_, task)) in followers {
        task.abort();
    }
}

fn same_setting(a: &MailboxSetting, b: &MailboxSetting) -> bool {
    (&a.url, &a.password_file, &a.password_env, &a.address) == (&b.url, &b.password_file, &b.password_env, &b.address)
}

/// One team's mailbox: holds the lock, then reads and waits, reconnecting with a backoff.
async fn follow(relay: Arc<Relay>, setting: MailboxSetting, mut stop: watch::Receiver<bool>) {
    let team = setting.team.clone();
    let server = match ImapServer::parse(&setting.url) {
        Ok(s) => s,
        Err(e) => {
            warn!(%team, %e, "the team's mailbox is not followed");
            return;
        }
    };
    let key = format!("imap:{team}");
    let mut backoff = Duration::from_secs(1);
    loop {
        let k = key.clone();
        let lock = match relay.blocking(move |s| s.try_lock(&k)).await {
            Ok(Some(lock)) => lock,
            // Another instance follows the mailbox (or the store cannot say): look again in a
            // while (it may die).
            other => {
                if let Err(e) = other {
                    warn!(%team, %e, "mailbox lock unavailable");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    _ = crate::relay::stopped(&mut stop) => return,
                }
            }
        };
        let result = match ImapPassword::of(&setting) {
            Ok(password) => session(&relay, &setting, &server, &password, &mut stop, &mut backoff).await,
            Err(e) => Err(e),
        };
        drop(lock);
        match result {
            Ok(()) => return,
            Err(e) => warn!(%team, host = %server.host, %e, retry_in = ?backoff, "mailbox not read"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = crate::relay::stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(300));
    }
}

async fn timed<T, E: fmt::Display>(what: &str, f: impl Future<Output = Result<T, E>>) -> Result<T, String> {
    match tokio::time::timeout(IO_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {} s", IO_TIMEOUT.as_secs())),
    }
}

/// Connects and follows until the relay stops (`Ok`) or the connection fails (`Err`).
async fn session(
    relay: &Arc<Relay>,
    setting: &MailboxSetting,
    server: &ImapServer,
    password: &ImapPassword,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Result<(), String> {
    let tcp = timed("connect", tokio::net::TcpStream::connect((server.host.as_str(), server.port))).await?;
    match server.security {
        ImapSecurity::Plain => follow_on(relay, setting, server, password, tcp, stop, backoff).await,
        ImapSecurity::Tls => {
            let mut roots = tokio_rustls::rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            let config =
                tokio_rustls::rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(server.host.clone())
                .map_err(|e| format!("{}: {e}", server.host))?;
            let tls = timed("TLS", tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp)).await?;
            follow_on(relay, setting, server, password, tls, stop, backoff).await
        }
    }
}

async fn follow_on<T: AsyncRead + AsyncWrite + Unpin + fmt::Debug + Send>(
    relay: &Arc<Relay>,
    setting: &MailboxSetting,
    server: &ImapServer,
    password: &ImapPassword,
    stream: T,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Result<(), String> {
    let team = &setting.team;
    let mut client = async_imap::Client::new(stream);
    timed("greeting", async { client.read_response().await.map_err(|e| e.to_string()) }).await?;
    let mut session = match tokio::time::timeout(IO_TIMEOUT, client.login(&server.user, &password.0)).await {
        Ok(Ok(s)) => s,
        Ok(Err((e, _))) => return Err(format!("sign-in as {} refused: {e}", server.user)),
        Err(_) => return Err("sign-in: no answer".into()),
    };
    let idle = timed("CAPABILITY", session.capabilities()).await?.has_str("IDLE");
    let mailbox = timed("SELECT", session.select(&server.mailbox)).await?;
    let uidvalidity = i64::from(mailbox.uid_validity.unwrap_or(0));
    let t = team.clone();
    let stored = relay.blocking(move |s| s.mailboxes()).await.map_err(|e| e.to_string())?;
    let mut last_uid = stored.iter().find(|m| m.team == t && m.uidvalidity == uidvalidity).map_or(0, |m| m.last_uid);
    info!(%team, host = %server.host, mailbox = %server.mailbox, uidvalidity, last_uid, idle, "following the team's mailbox");
    *backoff = Duration::from_secs(1);
    loop {
        // Everything above the last UID taken in, in UID order.
        loop {
            let query = match last_uid {
                0 => format!("UID 1:* SINCE {}", imap_date(Timestamp::now().0 - FIRST_READ_DAYS * 86_400_000)),
                _ => format!("UID {}:*", last_uid + 1),
            };
            let found = timed("UID SEARCH", session.uid_search(query)).await?;
            let mut uids: Vec<u32> = found.into_iter().filter(|u| i64::from(*u) > last_uid).collect();
            uids.sort_unstable();
            let more = uids.len() > MAILS_PER_ROUND;
            for uid in uids.into_iter().take(MAILS_PER_ROUND) {
                let size = fetch_one(&mut session, uid, "RFC822.SIZE").await?.and_then(|f| f.size).unwrap_or(0);
                let oversized = size > MAX_MAIL_BYTES;
                let part = if oversized { "BODY.PEEK[HEADER]" } else { "BODY.PEEK[]" };
                let raw = match fetch_one(&mut session, uid, part).await? {
                    Some(f) => if oversized { f.header() } else { f.body() }.unwrap_or_default().to_vec(),
                    // Expunged meanwhile: nothing to take in.
                    None => Vec::new(),
                };
                let mail =
                    Inbound { team, address: &setting.address, uidvalidity, uid, oversized: oversized.then_some(size) };
                take_in(relay, &mail, &raw).await?;
                last_uid = i64::from(uid);
            }
            while session.unsolicited_responses.try_recv().is_ok() {}
            if !more || *stop.borrow() {
                break;
            }
        }
        if *stop.borrow() {
            let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
            return Ok(());
        }
        if idle {
            let mut handle = session.idle();
            timed("IDLE", handle.init()).await?;
            let (wait, interrupt) = handle.wait_with_timeout(IDLE_FOR);
            let stopped = tokio::select! {
                r = wait => { r.map_err(|e| format!("IDLE: {e}"))?; false }
                _ = crate::relay::stopped(stop) => true,
            };
            drop(interrupt);
            session = timed("DONE", handle.done()).await?;
            if stopped {
                let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
                return Ok(());
            }
        } else {
            tokio::select! {
                _ = tokio::time::sleep(POLL_EVERY) => {}
                _ = crate::relay::stopped(stop) => {}
            }
            timed("NOOP", session.noop()).await?;
        }
    }
}

async fn fetch_one<T: AsyncRead + AsyncWrite + Unpin + fmt::Debug + Send>(
    session: &mut async_imap::Session<T>,
    uid: u32,
    what: &str,
) -> Result<Option<async_imap::types::Fetch>, String> {
    use futures_util::StreamExt;
    timed("UID FETCH", async {
        let mut stream = session.uid_fetch(uid.to_string(), what).await?;
        let mut found = None;
        while let Some(item) = stream.next().await {
            let item = item?;
            if item.uid == Some(uid) {
                found = Some(item);
            }
        }
        Ok::<_, async_imap::error::Error>(found)
    })
    .await
}

/// A day as IMAP's SEARCH writes it (`7-Dec-2026`), from milliseconds since the Unix epoch (UTC).
pub fn imap_date(ms: i64) -> String {
    // Days to the civil date (H. Hinnant's algorithm).
    let z = ms.div_euclid(86_400_000) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!("{day}-{}-{year}", MONTHS[(month - 1) as usize])
}

/// Where a mail was read.
pub struct Inbound<'a> {
    pub team: &'a TeamId,
    /// The team's address.
    pub address: &'a str,
    pub uidvalidity: i64,
    pub uid: u32,
    /// The mail's size when it is larger than [`MAX_MAIL_BYTES`] (`raw` is then its header only).
    pub oversized: Option<u32>,
}

/// Why a mail starts or continues no conversation, or `None` when it may.
pub fn refused(parsed: &mail_parser::Message<'_>, team_address: &str) -> Option<&'static str> {
    let header = |name: &str| parsed.header_raw(name).map(|v| v.trim().to_ascii_lowercase());
    if header("Auto-Submitted").is_some_and(|v| !v.is_empty() && v != "no") {
        return Some("an automatic reply (Auto-Submitted)");
    }
    if header("Precedence").is_some_and(|v| ["bulk", "junk", "list", "auto_reply"].contains(&v.as_str())) {
        return Some("bulk mail (Precedence)");
    }
    if header("X-Autoreply").is_some()
        || header("X-Autorespond").is_some()
        || header("X-Auto-Response-Suppress").is_some_and(|v| v.contains("all"))
    {
        return Some("an automatic reply");
    }
    match sender(parsed) {
        None => Some("no sender address"),
        Some((address, _)) if address.eq_ignore_ascii_case(team_address) => Some("sent from the team's own address"),
        Some((address, _)) if address.starts_with("mailer-daemon@") || address.starts_with("postmaster@") => {
            Some("a delivery report")
        }
        Some(_) => None,
    }
}

/// The sender's address (lower case) and name.
fn sender(parsed: &mail_parser::Message<'_>) -> Option<(String, Option<String>)> {
    let from = parsed.from().and_then(|a| a.first())?;
    let address = from.address()?.trim().to_ascii_lowercase();
    if address.is_empty() || address.len() > 254 || !address.contains('@') || address.chars().any(char::is_control) {
        return None;
    }
    let name = from.name().map(|n| n.chars().filter(|c| !c.is_control()).take(100).collect::<String>());
    Some((address, name.filter(|n| !n.trim().is_empty())))
}

/// Message-IDs named by a header (one or a list), without angle brackets, at most 50.
fn ids(value: &HeaderValue<'_>) -> Vec<String> {
    let list: Vec<&str> = match value {
        HeaderValue::Text(t) => vec![t.as_ref()],
        HeaderValue::TextList(l) => l.iter().map(|t| t.as_ref()).collect(),
        _ => Vec::new(),
    };
    list.into_iter().filter_map(clean_id).take(50).collect()
}

fn clean_id(id: &str) -> Option<String> {
    let id = id.trim().trim_start_matches('<').trim_end_matches('>');
    (!id.is_empty()
        && id.len() <= 250
        && !id.chars().any(|c| c.is_control() || c.is_whitespace() || c == '<' || c == '>'))
    .then(|| id.to_owned())
}

/// The new text of a reply: the quoted history below "On … wrote:" and lines starting with ">"
/// at its end are cut (the conversation shows them already).
pub fn without_quote(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut end = lines.len();
    for (i, line) in lines.iter().enumerate() {
        let l = line.trim();
        let header = (l.starts_with("On ") && l.ends_with("wrote:")) || l == "-----Original Message-----";
        if header && i > 0 {
            end = i;
            break;
        }
    }
    while end > 0 && (lines[end - 1].trim_start().starts_with('>') || lines[end - 1].trim().is_empty()) {
        end -= 1;
    }
    let kept = lines[..end].join("\n");
    let kept = kept.trim();
    if kept.is_empty() { text.trim().to_owned() } else { kept.to_owned() }
}

/// Turns one mail into messages of its conversation, once (see the module's text), and records it
/// as read: with the conversation's change when it writes one, else on its own.
pub async fn take_in(relay: &Arc<Relay>, mail: &Inbound<'_>, raw: &[u8]) -> Result<(), String> {
    if !write_mail(relay, mail, raw).await? {
        let (t, v, uid) = (mail.team.clone(), mail.uidvalidity, i64::from(mail.uid));
        relay.blocking(move |s| s.mailbox_read(&t, v, uid)).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// What a mail becomes; true when the mail was recorded with the conversation's change (its UID,
/// Message-ID and thread in the same transaction), false when it wrote nothing.
async fn write_mail(relay: &Arc<Relay>, mail: &Inbound<'_>, raw: &[u8]) -> Result<bool, String> {
    if raw.is_empty() {
        // Expunged before it was fetched.
        return Ok(false);
    }
    let team = mail.team;
    let where_ = format!("UID {} of {team}'s mailbox", mail.uid);
    // Parsing a large mail takes a while: off the relay's async threads.
    let bytes = raw.to_vec();
    let parsed = tokio::task::spawn_blocking(move || MessageParser::default().parse(&bytes).map(|m| m.into_owned()))
        .await
        .map_err(|e| e.to_string())?;
    let Some(parsed) = parsed else {
        warn!(mail = %where_, "a mail that cannot be read as one was skipped");
        return Ok(false);
    };
    if let Some(why) = refused(&parsed, mail.address) {
        info!(mail = %where_, why, "mail not taken in");
        return Ok(false);
    }
    let Some((address, name)) = sender(&parsed) else { return Ok(false) };
    let message_id = parsed.message_id().and_then(clean_id);
    let known = match message_id.clone() {
        Some(id) => relay.blocking(move |s| s.email_id_known(&id)).await.map_err(|e| e.to_string())?,
        None => false,
    };
    if known {
        info!(mail = %where_, "mail already taken in (or ours): skipped");
        return Ok(false);
    }
    if !relay.allow_email_from(team, &address).await {
        warn!(mail = %where_, %address, "more than {MAILS_PER_SENDER_PER_HOUR} mails an hour from one sender: not taken in");
        return Ok(false);
    }
    let subject: String = parsed
        .subject()
        .map(|s| s.chars().filter(|c| !c.is_control()).take(200).collect::<String>())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "(no subject)".to_owned());
    let mut answers = ids(parsed.references());
    answers.extend(ids(parsed.in_reply_to()));
    // The conversation: the thread it answers, then the sender's latest, then a new one whose id
    // follows from the mail's place in the mailbox.
    let seed: [u8; 32] = sha2::Sha256::digest(format!("{team}/{}/{}", mail.uidvalidity, mail.uid)).into();
    let (t, a, list) = (team.clone(), address.clone(), answers.clone());
    let known = relay
        .blocking(move |s| match s.email_conversation(&t, &list)? {
            Some(doc) => Ok(Some(doc)),
            None => s.email_conversation_of_address(&t, &a),
        })
        .await
        .map_err(|e| e.to_string())?;
    let fresh = doc::new_conversation_id(&mut rand::rngs::StdRng::from_seed(seed)).0;
    let doc_id = known.unwrap_or(fresh);
    let id = doc_id.clone();
    let exists = match relay.blocking(move |s| s.document_team(&id)).await.map_err(|e| e.to_string())? {
        Some(t) if &t == team => true,
        Some(_) => return Err(format!("{where_}: conversation {doc_id} is another team's")),
        None => false,
    };
    let taken = TakenMail {
        team: team.clone(),
        uidvalidity: mail.uidvalidity,
        uid: i64::from(mail.uid),
        address: address.clone(),
        subject: subject.clone(),
        message_id: message_id.clone(),
    };
    // A first mail with files starts its conversation before they are stored (they belong to it)
    // and is recorded with the files' change; otherwise with the one change it makes.
    let files = mail.oversized.is_none() && parsed.attachments().next().is_some();
    let at = Timestamp::now();
    let base = format!("em-{}", seed[..16].iter().map(|b| format!("{b:02x}")).collect::<String>());
    let mut messages = Vec::new();
    let add = |messages: &mut Vec<Message>, suffix: String, author: Author, body: MessageBody| {
        if body.validate().is_ok() {
            messages.push(Message { id: MessageId(format!("{base}{suffix}")), at, author, body });
        }
    };
    if let Some(size) = mail.oversized {
        let text = format!(
            "An email from {address} (\"{subject}\") of {:.1} MB was larger than the {} MB Crewdesk takes in; read it in the team's mailbox.",
            f64::from(size) / 1_048_576.0,
            MAX_MAIL_BYTES / 1_048_576
        );
        add(&mut messages, String::new(), Author::System, MessageBody::Text { text });
    } else {
        let body = parsed.body_text(0).map(|t| without_quote(&t)).unwrap_or_default();
        let body: String = body.chars().take(crewdesk::domain::MAX_MESSAGE_BYTES / 4).collect();
        let text = match (exists, body.trim().is_empty()) {
            (false, true) => subject.clone(),
            (false, false) => format!("{subject}\n\n{}", body.trim()),
            (true, false) => body.trim().to_owned(),
            (true, true) => String::new(),
        };
        if !text.trim().is_empty() {
            add(&mut messages, String::new(), Author::Customer, MessageBody::Text { text });
        }
        if !exists && files {
            start(relay, mail, &doc_id, &address, name.as_deref(), &mut messages, at, None).await?;
        }
        for (i, part) in parsed.attachments().enumerate().take(20) {
            let name: String = part
                .attachment_name()
                .map(|n| {
                    n.rsplit(['/', '\\']).next().unwrap_or(n).chars().filter(|c| !c.is_control()).take(200).collect()
                })
                .filter(|n: &String| !n.trim().is_empty())
                .unwrap_or_else(|| format!("attachment-{}", i + 1));
            let mime = part
                .content_type()
                .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or("octet-stream")).to_ascii_lowercase())
                .unwrap_or_else(|| "application/octet-stream".to_owned());
            let bytes = part.contents().to_vec();
            let body = match crate::blobs::store_bytes(relay, &doc_id, &mime, bytes.into(), None).await {
                Ok((hash, info)) => MessageBody::Attachment {
                    blob: hash.reference(),
                    file_name: name,
                    mime: info.mime,
                    size: info.size,
                },
                Err((status, why)) if status.is_client_error() => {
                    let text = format!("The customer's email came with {name}, which Crewdesk does not keep: {why}");
                    add(&mut messages, format!("-{i}"), Author::System, MessageBody::Text { text });
                    continue;
                }
                Err((_, e)) => return Err(format!("{where_}: {name} not stored: {e}")),
            };
            add(&mut messages, format!("-{i}"), Author::Customer, body);
        }
    }
    if !exists && !files {
        start(relay, mail, &doc_id, &address, name.as_deref(), &mut messages, at, Some(taken.clone())).await?;
        if messages.is_empty() {
            return Ok(true);
        }
    }
    if exists {
        // Read again (the mailbox's progress lost, or a crash before the files' change): what is
        // there is not written twice.
        let there = relay.messages_of(&doc_id).await?;
        messages.retain(|m| !there.iter().any(|t| t.id == m.id));
    }
    if messages.is_empty() {
        return Ok(false);
    }
    relay
        .change_as_relay_reading(&doc_id, Some(taken), |tx| messages.iter().try_for_each(|m| doc::add_message(tx, m)))
        .await?;
    Ok(true)
}

/// Starts a new Email conversation with the first of `messages` (taken out of it).
#[allow(clippy::too_many_arguments)]
async fn start(
    relay: &Arc<Relay>,
    mail: &Inbound<'_>,
    doc_id: &str,
    address: &str,
    name: Option<&str>,
    messages: &mut Vec<Message>,
    at: Timestamp,
    taken: Option<TakenMail>,
) -> Result<(), String> {
    if messages.is_empty() {
        return Err("a first mail without a message".into());
    }
    let first = messages.remove(0);
    let new = NewConversation {
        id: crewdesk::domain::ConversationId(doc_id.to_owned()),
        team: mail.team.clone(),
        channel: Channel::Email,
        customer: Customer {
            id: CustomerId(format!("email-{address}")),
            name: name.map_or_else(|| address.to_owned(), str::to_owned),
            email: Some(address.to_owned()),
            phone: None,
            notes: None,
        },
        created_at: at,
    };
    relay.create_as_relay_reading(&new, &first, taken).await?;
    info!(%doc_id, team = %mail.team, "Email conversation started");
    Ok(())
}

/// The Message-ID of our reply carrying these queued messages (stable across retries).
pub fn our_message_id(first_queued: &str, team_address: &str) -> String {
    let domain = team_address.rsplit('@').next().filter(|d| !d.is_empty()).unwrap_or("crewdesk.invalid");
    format!("crewdesk.{}@{domain}", &crewdesk::sync::sha256_hex(first_queued.as_bytes())[..32])
}

/// "Re: " before the thread's subject, once.
pub fn reply_subject(subject: &str) -> String {
    let s = subject.trim();
    if s.len() >= 3 && s[..3].eq_ignore_ascii_case("re:") { s.to_owned() } else { format!("Re: {s}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_settings_are_checked() {
        let s = ImapServer::parse("imaps://support%40example.com@mail.example.com/INBOX").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.user.as_str(), s.mailbox.as_str()),
            ("mail.example.com", 993, "support@example.com", "INBOX")
        );
        assert_eq!(s.security, ImapSecurity::Tls);
        let local = ImapServer::parse("imap://support@127.0.0.1:1430/INBOX?tls=none").unwrap();
        assert_eq!((local.security, local.port), (ImapSecurity::Plain, 1430));
        for bad in [
            "imap://support@mail.example.com/INBOX",
            "imap://support@mail.example.com/INBOX?tls=none",
            "imaps://support:secret@mail.example.com/INBOX",
            "imaps://mail.example.com/INBOX",
            "https://support@mail.example.com/",
            "not a url",
        ] {
            assert!(ImapServer::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn auto_replies_bulk_mail_and_our_own_are_refused() {
        let parse = |raw: &str| MessageParser::default().parse(raw.as_bytes()).unwrap().into_owned();
        let plain = parse("From: Maya <maya@example.org>\r\nSubject: Hi\r\n\r\nHello\r\n");
        assert_eq!(refused(&plain, "support@example.com"), None);
        for raw in [
            "From: maya@example.org\r\nAuto-Submitted: auto-replied\r\n\r\nOut of office\r\n",
            "From: news@example.org\r\nPrecedence: bulk\r\n\r\nNews\r\n",
            "From: maya@example.org\r\nX-Autoreply: yes\r\n\r\nAway\r\n",
            "From: Support <Support@Example.com>\r\n\r\nLoop\r\n",
            "From: MAILER-DAEMON@example.org\r\n\r\nUndeliverable\r\n",
            "Subject: nobody\r\n\r\nNo sender\r\n",
        ] {
            assert!(refused(&parse(raw), "support@example.com").is_some(), "{raw}");
        }
    }

    /// Mail is read on the relay's threads (2 MiB stacks): deeply nested parts must not overflow.
    #[test]
    fn deeply_nested_mail_is_parsed_on_a_small_stack() {
        let mut raw = String::from("From: a@example.org\r\nSubject: nest\r\n");
        for i in 0..20_000 {
            raw.push_str(&format!("Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n"));
        }
        raw.push_str("Content-Type: text/plain\r\n\r\ndeep\r\n");
        let parsed = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || {
                MessageParser::default().parse(raw.as_bytes()).map(|m| refused(&m, "s@example.com").is_none())
            })
            .unwrap()
            .join();
        assert!(parsed.is_ok(), "the parser overflowed its stack");
    }

    #[test]
    fn quoted_history_is_cut() {
        let text = "Yes, that works.\n\nOn Tue, 1 Dec 2026 at 10:00, Support <support@example.com> wrote:\n> Would Friday suit you?\n> Bob";
        assert_eq!(without_quote(text), "Yes, that works.");
        assert_eq!(without_quote("Thanks!\n> old\n> older\n"), "Thanks!");
        assert_eq!(without_quote("> only a quote"), "> only a quote");
    }

    #[test]
    fn search_dates_are_imaps() {
        assert_eq!(imap_date(0), "1-Jan-1970");
        assert_eq!(imap_date(1_796_339_193_000), "3-Dec-2026");
        assert_eq!(imap_date(951_782_400_000), "29-Feb-2000");
        assert_eq!(imap_date(1_709_251_199_999), "29-Feb-2024");
    }

    #[test]
    fn replies_keep_the_subject_once() {
        assert_eq!(reply_subject("Where is my parcel?"), "Re: Where is my parcel?");
        assert_eq!(reply_subject("RE: Where is my parcel?"), "RE: Where is my parcel?");
        assert_eq!(our_message_id("doc/m1", "support@example.com"), our_message_id("doc/m1", "support@example.com"));
        assert!(our_message_id("doc/m1", "support@example.com").ends_with("@example.com"));
    }
}
