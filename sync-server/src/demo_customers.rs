//! Demo customers for `cargo xtask run`: a few people chatting through a team's web widget, as a
//! browser would (the widget's HTTP API and WebSocket, nothing else), so the demo desk has
//! customers who are Online and conversations that keep moving through Waiting, Soon to be and
//! Overdue while someone looks at it. It stops when killed.

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message as Frame;
use tracing::{info, warn};

const PEOPLE: &[(&str, &str, &str)] = &[
    ("Lena Fischer", "lena@example.com", "Hi! I ordered the walnut desk last week, is it on its way?"),
    ("Tomás Ortega", "tomas@example.com", "Hello, can I still change the delivery address of my order?"),
    ("Aiko Tanaka", "aiko@example.com", "Do you ship to Japan? I could not find it on the website."),
];

const FOLLOW_UPS: &[&str] = &[
    "Are you still there?",
    "Any news on this?",
    "I am still waiting, thanks.",
    "Sorry, one more question: is there a discount for two?",
    "Thank you, I will wait.",
];

/// Runs `count` customers of the team whose widget key is `key` on the relay at `relay_url`.
pub async fn run(relay_url: &str, key: &str, count: usize) -> anyhow::Result<()> {
    let relay_url = relay_url.trim_end_matches('/').to_owned();
    let mut tasks = Vec::new();
    for (i, person) in PEOPLE.iter().cycle().take(count).enumerate() {
        let (relay_url, key) = (relay_url.clone(), key.to_owned());
        tasks.push(tokio::spawn(async move {
            // Arrive one after the other, like real customers.
            tokio::time::sleep(Duration::from_secs(2 + 20 * i as u64)).await;
            loop {
                if let Err(e) = customer(&relay_url, &key, person).await {
                    warn!(customer = person.0, %e, "demo customer lost the relay; back in 10 s");
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }));
    }
    futures_util::future::join_all(tasks).await;
    Ok(())
}

/// One customer: starts a chat, stays online, writes again every minute or two.
async fn customer(relay_url: &str, key: &str, (name, email, first): &(&str, &str, &str)) -> anyhow::Result<()> {
    let started: serde_json::Value = reqwest::Client::new()
        .post(format!("{relay_url}/api/widget/{key}/conversations"))
        .json(&serde_json::json!({ "name": name, "email": email, "text": first }))
        .timeout(Duration::from_secs(10))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let session = started["session"].as_str().ok_or_else(|| anyhow::anyhow!("no session in {started}"))?.to_owned();
    info!(customer = name, "demo customer started a chat");
    loop {
        let ws_url = format!("{}/api/widget/ws?session={session}", relay_url.replacen("http", "ws", 1));
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await?;
        loop {
            let wait = Duration::from_secs(rand::rng().random_range(60..150));
            tokio::select! {
                frame = ws.next() => match frame {
                    // Pings are answered by the socket itself; replies from the crew are read.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                    None => break,
                },
                _ = tokio::time::sleep(wait) => {
                    let text = FOLLOW_UPS[rand::rng().random_range(0..FOLLOW_UPS.len())];
                    ws.send(Frame::Text(serde_json::json!({ "type": "message", "text": text }).to_string().into())).await?;
                }
            }
        }
    }
}
