//! The email fallback: crew messages to web-widget customers who are offline and left an email
//! address are queued durably (one row per message) and sent by SMTP. Quick successive messages of
//! a conversation go out together in one email; failures are retried with a doubling backoff; a
//! message is marked sent only after the SMTP server accepted it. A crew file goes with its email,
//! once the sender's app has uploaded it (up to 10 MiB of files per email; larger ones, and files
//! still missing after 10 minutes, are named in the text instead).
//!
//! Crew replies in Email conversations (the email channel, see [`crate::email`]) go through the
//! same outbox as threaded replies from the team's address: the team's name as the sender, our own
//! Message-ID, `In-Reply-To`/`References` of the thread, the subject kept with "Re:". A reply the
//! SMTP server refuses for good, or that still fails after [`REPLY_ATTEMPTS`] tries, is given up and
//! the conversation says so.

use crate::relay::Relay;
use crate::smtp::{SmtpPassword, SmtpSecurity, SmtpServer};
use crate::store::{QueuedEmail, RecordedEmail, Store};
use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

/// Messages of one conversation written within this window are sent in one email.
pub const BATCH_WINDOW_MS: i64 = 2_000;

/// Files an email carries at most, together; larger ones are named in the text.
const MAX_ATTACHED_BYTES: usize = 10 * 1024 * 1024;

/// How long an email waits for its file to be uploaded before it goes without it.
pub(crate) const ATTACHMENT_WAIT_MS: i64 = 10 * 60 * 1_000;

/// Tries of a reply in an Email conversation before it is given up (the backoff doubles from 1 s:
/// about eight minutes in all).
pub const REPLY_ATTEMPTS: i64 = 10;

/// A file read for an email, or why it is not attached.
enum Attached {
    File { name: String, mime: String, bytes: Vec<u8> },
    Named(String),
}

pub async fn run(
    relay: Arc<Relay>,
    blobs: PathBuf,
    transport: Option<AsyncSmtpTransport<Tokio1Executor>>,
    from: String,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let store = relay.store().clone();
    let Some(transport) = transport else {
        info!("no SMTP server configured: email fallback messages and replies stay queued");
        return;
    };
    let Ok(from) = from.parse::<Mailbox>() else {
        warn!(%from, "the sender address is not valid; email fallback disabled");
        return;
    };
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = crate::relay::stopped(&mut stop) => return,
        }
        let now = crewdesk::domain::Timestamp::now().0;
        let s = store.clone();
        let Ok(Ok(due)) = tokio::task::spawn_blocking(move || s.due_emails(now)).await else { continue };
        let mut by_conversation: BTreeMap<String, Vec<QueuedEmail>> = BTreeMap::new();
        for e in due {
            by_conversation.entry(e.doc_id.clone()).or_default().push(e);
        }
        for (_, batch) in by_conversation {
            // Wait until the agent has stopped typing for a moment, so quick messages go together.
            if batch.iter().any(|e| now - e.created_at < BATCH_WINDOW_MS) {
                continue;
            }
            let Some(files) = attachments(&store, &blobs, &batch, now).await else {
                // A file is not uploaded yet: the email waits for it (and is asked for again).
                continue;
            };
            let ids: Vec<String> = batch.iter().map(|e| e.message_id.clone()).collect();
            let result = match &batch[0].team {
                None => send(&transport, &from, &batch, files).await.map_err(|e| (e, false)),
                Some(team) => reply(&store, &transport, team, &batch, files).await,
            };
            let s = store.clone();
            let now = crewdesk::domain::Timestamp::now().0;
            match result {
                Ok(()) => {
                    let _ = tokio::task::spawn_blocking(move || s.mark_emails_sent(&ids, now)).await;
                }
                Err((e, permanent))
                    if batch[0].team.is_some() && (permanent || batch[0].attempts + 1 >= REPLY_ATTEMPTS) =>
                {
                    warn!(%e, doc_id = %batch[0].doc_id, "reply by email given up");
                    let reason = e.clone();
                    let _ = tokio::task::spawn_blocking(move || s.fail_emails(&ids, &reason, now)).await;
                    let text = format!("This reply could not be sent by email: {e}");
                    let note = crewdesk::domain::Message {
                        id: crewdesk::domain::MessageId(format!(
                            "mail-failed-{}",
                            &crewdesk::sync::sha256_hex(batch[0].message_id.as_bytes())[..32]
                        )),
                        at: crewdesk::domain::Timestamp::now(),
                        author: crewdesk::domain::Author::System,
                        body: crewdesk::domain::MessageBody::Text { text },
                    };
                    if let Err(e) = relay
                        .change_as_relay(&batch[0].doc_id, |tx| crewdesk::replica::doc::add_message(tx, &note))
                        .await
                    {
                        warn!(%e, "the failed reply is not noted in its conversation");
                    }
                }
                Err((e, _)) => {
                    warn!(%e, "email not sent; will retry");
                    let _ = tokio::task::spawn_blocking(move || s.retry_emails(&ids, now)).await;
                }
            }
        }
    }
}

/// The SMTP client for a checked setting: TLS from the start, STARTTLS required (a server that
/// does not offer it is not sent anything), or plain to this machine; certificates are checked
/// against the webpki (Mozilla) roots.
pub(crate) fn transport(
    smtp: &SmtpServer,
    password: Option<SmtpPassword>,
) -> Result<AsyncSmtpTransport<Tokio1Executor>, lettre::transport::smtp::Error> {
    info!(host = %smtp.host, port = smtp.port, security = ?smtp.security, user = ?smtp.user, "email fallback by SMTP");
    let builder = match smtp.security {
        SmtpSecurity::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host)?,
        SmtpSecurity::StartTls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host)?,
        SmtpSecurity::Plain => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host),
    };
    let builder = builder.port(smtp.port);
    Ok(match (&smtp.user, password) {
        (Some(user), Some(password)) => builder.credentials(Credentials::new(user.clone(), password.0)).build(),
        _ => builder.build(),
    })
}

/// The files of a batch, or `None` while one of them is still being uploaded (and younger than
/// [`ATTACHMENT_WAIT_MS`]).
async fn attachments(
    store: &Arc<Store>,
    blobs: &std::path::Path,
    batch: &[QueuedEmail],
    now: i64,
) -> Option<Vec<Attached>> {
    let mut files = Vec::new();
    let mut total = 0;
    for e in batch {
        let Some(a) = &e.attachment else { continue };
        let Ok(hash) = crewdesk::domain::attachment::BlobHash::parse(&a.hash) else {
            files.push(Attached::Named(format!("{} could not be attached.", a.file_name)));
            continue;
        };
        if total + a.size as usize > MAX_ATTACHED_BYTES {
            files.push(Attached::Named(format!("{} is too large for email; open the chat to get it.", a.file_name)));
            continue;
        }
        match crate::blobs::read_blob(store, blobs, &e.doc_id, &hash, false).await {
            Some(bytes) => {
                total += bytes.len();
                files.push(Attached::File { name: a.file_name.clone(), mime: a.mime.clone(), bytes });
            }
            None if now - e.created_at < ATTACHMENT_WAIT_MS => return None,
            None => {
                files.push(Attached::Named(format!("{} could not be attached; open the chat to get it.", a.file_name)))
            }
        }
    }
    Some(files)
}

/// Crew messages of an Email conversation as one threaded reply from the team's address.
/// `Err((why, permanent))`: permanent when retrying cannot help (no mailbox, refused address,
/// a 5xx answer).
async fn reply(
    store: &Arc<Store>,
    transport: &AsyncSmtpTransport<Tokio1Executor>,
    team: &crewdesk::domain::TeamId,
    batch: &[QueuedEmail],
    files: Vec<Attached>,
) -> Result<(), (String, bool)> {
    let first = &batch[0];
    let (s, doc, t) = (store.clone(), first.doc_id.clone(), team.clone());
    let found = tokio::task::spawn_blocking(move || -> Result<_, crate::store::StoreError> {
        let mailbox = s.mailboxes()?.into_iter().find(|m| m.team == t);
        let name = s.teams()?.into_iter().find(|x| x.id == t).map(|x| x.name);
        Ok((mailbox, name, s.email_thread(&doc)?))
    })
    .await
    .map_err(|e| (e.to_string(), false))?
    .map_err(|e| (e.to_string(), false))?;
    let (Some(mailbox), Some(team_name)) = (found.0, found.1) else {
        return Err((format!("the team {team} has no mailbox (sync-server team {team} --imap …)"), true));
    };
    // A conversation started in the desk (or imported) begins its thread with this reply.
    let subject = found.2.as_ref().map_or_else(|| format!("Your conversation with {team_name}"), |t| t.subject.clone());
    let refs = found.2.as_ref().map(|t| t.refs.clone()).unwrap_or_default();
    let from = named(&team_name, &mailbox.address)
        .map_err(|e| (format!("the team's address {}: {e}", mailbox.address), true))?;
    let to =
        named(&first.customer, &first.to).map_err(|e| (format!("the customer's address {}: {e}", first.to), true))?;
    let ours = crate::email::our_message_id(&first.message_id, &mailbox.address);
    // Recorded before it is sent, so an answer that comes quickly already finds its thread.
    let (s, doc, t, address, subj, id) =
        (store.clone(), first.doc_id.clone(), team.clone(), first.to.clone(), subject.clone(), ours.clone());
    tokio::task::spawn_blocking(move || {
        s.record_email(&RecordedEmail {
            doc_id: &doc,
            team: &t,
            address: &address,
            subject: &subj,
            message_id: Some(&id),
            ours: true,
        })
    })
    .await
    .map_err(|e| (e.to_string(), false))?
    .map_err(|e| (e.to_string(), false))?;
    let mut body = String::new();
    for e in batch {
        body.push_str(e.text.trim_end());
        body.push_str("\n\n");
    }
    for f in &files {
        if let Attached::Named(note) = f {
            body.push_str(&format!("{note}\n\n"));
        }
    }
    let agents: Vec<&str> = batch.iter().map(|e| e.agent.as_str()).fold(Vec::new(), |mut v, a| {
        if !v.contains(&a) {
            v.push(a);
        }
        v
    });
    body.push_str(&format!("-- \n{}, {team_name}\n", agents.join(", ")));
    let mut builder = Message::builder()
        .from(from)
        .to(to)
        // A thread the crew starts opens with the subject itself; replies say "Re:".
        .subject(if refs.is_empty() { subject.clone() } else { crate::email::reply_subject(&subject) })
        .message_id(Some(format!("<{ours}>")));
    if let Some(last) = refs.last() {
        builder = builder
            .in_reply_to(format!("<{last}>"))
            .references(refs.iter().map(|r| format!("<{r}>")).collect::<Vec<_>>().join(" "));
    }
    let email = with_files(builder, body, files).map_err(|e| (e, true))?;
    transport.send(email).await.map(|_| ()).map_err(|e| (e.to_string(), e.is_permanent()))
}

/// "Name <address>", the name without what would end it or start another header.
fn named(name: &str, address: &str) -> Result<Mailbox, lettre::address::AddressError> {
    format!("{} <{address}>", name.replace(['<', '>', '"', '\r', '\n'], "")).parse()
}

/// The message with its files attached (multipart/mixed), or plain text when there are none.
fn with_files(builder: lettre::message::MessageBuilder, body: String, files: Vec<Attached>) -> Result<Message, String> {
    let attached: Vec<SinglePart> = files
        .into_iter()
        .filter_map(|f| match f {
            Attached::File { name, mime, bytes } => {
                let kind = ContentType::parse(&mime).unwrap_or(ContentType::parse("application/octet-stream").ok()?);
                let name: String = name.chars().filter(|c| !c.is_control()).collect();
                Some(Attachment::new(name).body(bytes, kind))
            }
            Attached::Named(_) => None,
        })
        .collect();
    match attached.is_empty() {
        true => builder.body(body),
        false => {
            let parts = attached
                .into_iter()
                .fold(MultiPart::mixed().singlepart(SinglePart::plain(body)), |m, p| m.singlepart(p));
            builder.multipart(parts)
        }
    }
    .map_err(|e| e.to_string())
}

async fn send(
    transport: &AsyncSmtpTransport<Tokio1Executor>,
    from: &Mailbox,
    batch: &[QueuedEmail],
    files: Vec<Attached>,
) -> Result<(), String> {
    let first = &batch[0];
    let to = named(&first.customer, &first.to).map_err(|e| format!("{e}"))?;
    let mut body = format!("Hello {},\n\nYou have new replies in your conversation:\n\n", first.customer);
    for e in batch {
        body.push_str(&format!("{}: {}\n\n", e.agent, e.text));
    }
    for f in &files {
        if let Attached::Named(note) = f {
            body.push_str(&format!("{note}\n\n"));
        }
    }
    body.push_str("Reply on the website where you started the chat to continue.\n");
    let builder = Message::builder().from(from.clone()).to(to).subject(if batch.len() == 1 {
        "New reply to your conversation".to_owned()
    } else {
        format!("{} new replies to your conversation", batch.len())
    });
    let email = with_files(builder, body, files)?;
    transport.send(email).await.map(|_| ()).map_err(|e| e.to_string())
}
