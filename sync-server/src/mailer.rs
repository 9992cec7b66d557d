//! The email fallback: crew messages to web-widget customers who are offline and left an email
//! address are queued durably (one row per message) and sent by SMTP. Quick successive messages of
//! a conversation go out together in one email; failures are retried with a doubling backoff; a
//! message is marked sent only after the SMTP server accepted it.

use crate::store::{QueuedEmail, Store};
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

/// Messages of one conversation written within this window are sent in one email.
pub const BATCH_WINDOW_MS: i64 = 2_000;

pub async fn run(
    store: Arc<Store>,
    smtp: Option<String>,
    from: String,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(smtp) = smtp else {
        info!("no SMTP server configured: email fallback messages stay queued");
        return;
    };
    let (host, port) = match smtp.rsplit_once(':').and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?))) {
        Some(hp) => hp,
        None => {
            warn!(%smtp, "the SMTP setting must be host:port; email fallback disabled");
            return;
        }
    };
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host).port(port).build();
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
            let ids: Vec<String> = batch.iter().map(|e| e.message_id.clone()).collect();
            let result = send(&transport, &from, &batch).await;
            let s = store.clone();
            let now = crewdesk::domain::Timestamp::now().0;
            match result {
                Ok(()) => {
                    let _ = tokio::task::spawn_blocking(move || s.mark_emails_sent(&ids, now)).await;
                }
                Err(e) => {
                    warn!(%e, "fallback email not sent; will retry");
                    let _ = tokio::task::spawn_blocking(move || s.retry_emails(&ids, now)).await;
                }
            }
        }
    }
}

async fn send(
    transport: &AsyncSmtpTransport<Tokio1Executor>,
    from: &Mailbox,
    batch: &[QueuedEmail],
) -> Result<(), String> {
    let first = &batch[0];
    let to: Mailbox = format!("{} <{}>", first.customer.replace(['<', '>', '"'], ""), first.to)
        .parse()
        .map_err(|e| format!("{e}"))?;
    let mut body = format!("Hello {},\n\nYou have new replies in your conversation:\n\n", first.customer);
    for e in batch {
        body.push_str(&format!("{}: {}\n\n", e.agent, e.text));
    }
    body.push_str("Reply on the website where you started the chat to continue.\n");
    let email = Message::builder()
        .from(from.clone())
        .to(to)
        .subject(if batch.len() == 1 {
            "New reply to your conversation".to_owned()
        } else {
            format!("{} new replies to your conversation", batch.len())
        })
        .body(body)
        .map_err(|e| e.to_string())?;
    transport.send(email).await.map(|_| ()).map_err(|e| e.to_string())
}
