//! One signed-in agent with a modified client beside the load: changes the judge refuses (a
//! customer's message written by an agent, each with a new actor), sent as fast as the socket takes
//! them to one of the loaded conversations while the load runs. The row beside the paced one shows
//! what it costs everyone else.

use super::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by `load` while its agents write (after every agent caught up, until all are done).
pub static LOAD_RUNNING: AtomicBool = AtomicBool::new(false);

/// What the hostile agent did.
pub struct Hostile {
    pub sent: usize,
    /// `error` frames it got back (each refusal is one).
    pub refused: usize,
}

/// Sends `frames` refused changes to conversation `d` once the load runs; returns when the load is
/// over (or 60 s passed).
pub async fn hostile(port: u16, token: String, id: ConversationId, d: Automerge, frames: usize) -> Hostile {
    let ws = connect(port, &token, "hostile").await;
    let (mut tx, mut rx) = ws.split();
    // Its answers are read all along (a client that never reads is dropped by the relay's queue
    // bound, which is another test).
    let reader = tokio::spawn(async move {
        let mut refused = 0;
        while let Ok(Some(Ok(frame))) = tokio::time::timeout(Duration::from_secs(60), rx.next()).await {
            if let Ws::Binary(b) = frame
                && let Ok(WireMessage::Error { .. }) = WireMessage::decode(&b)
            {
                refused += 1;
            }
        }
        refused
    });
    let waited = Instant::now();
    while !LOAD_RUNNING.load(Ordering::SeqCst) && waited.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut sent = 0;
    for n in 0..frames {
        let mut attempt = d.fork();
        let m = Message {
            id: MessageId(format!("forged{n}")),
            at: Timestamp::now(),
            author: Author::Customer,
            body: MessageBody::Text { text: "Refund me".into() },
        };
        attempt.transact::<_, _, doc::DocError>(|tx| doc::add_message(tx, &m)).unwrap();
        let change = attempt.get_last_local_change().unwrap();
        let mut message = sync::Message::decode(&[0x42, 0, 0, 0, 0]).unwrap();
        message.heads = attempt.get_heads();
        message.changes = vec![change.raw_bytes().to_vec()].into();
        if tx.send(sync_frame("hostile", id.as_str(), message)).await.is_err() {
            break;
        }
        sent += 1;
    }
    while LOAD_RUNNING.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The last refusals may still be on their way: a moment for them, then the count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = tx.close().await;
    let refused = tokio::time::timeout(Duration::from_secs(5), reader).await.ok().and_then(Result::ok).unwrap_or(0);
    Hostile { sent, refused }
}

/// `n` anonymous connections that each announce a 10 MiB widget upload and send a byte every
/// 300 ms, from the moment the load runs until it is over; each one the relay cuts off (too slow)
/// is opened again at once. Returns how many connections were opened and how many the relay
/// answered (408, 503 or a close).
pub async fn slow_bodies(port: u16, widget_key: String, n: usize) -> (usize, usize) {
    let waited = Instant::now();
    while !LOAD_RUNNING.load(Ordering::SeqCst) && waited.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let key = widget_key.clone();
            tokio::spawn(async move {
                let (mut opened, mut ended) = (0, 0);
                while LOAD_RUNNING.load(Ordering::SeqCst) {
                    opened += 1;
                    if slow_body(port, &key).await {
                        ended += 1;
                    }
                }
                (opened, ended)
            })
        })
        .collect();
    let (mut opened, mut ended) = (0, 0);
    for t in tasks {
        let (o, e) = t.await.unwrap_or((0, 0));
        opened += o;
        ended += e;
    }
    (opened, ended)
}

/// One slow body; true when the relay ended it (false: the load ended first).
async fn slow_body(port: u16, key: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        tokio::time::sleep(Duration::from_millis(100)).await;
        return false;
    };
    let (mut read, mut write) = tcp.into_split();
    let head = format!(
        "POST /api/widget/{key}/conversations HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\ncontent-length: 10485760\r\n\r\n{{"
    );
    if write.write_all(head.as_bytes()).await.is_err() {
        return true;
    }
    let mut buf = [0u8; 512];
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    loop {
        tokio::select! {
            // An answer (408, 503) or a close: either way the relay ended it.
            _ = read.read(&mut buf) => return true,
            _ = tick.tick() => {
                if !LOAD_RUNNING.load(Ordering::SeqCst) {
                    return false;
                }
                if write.write_all(b" ").await.is_err() {
                    return true;
                }
            }
        }
    }
}
