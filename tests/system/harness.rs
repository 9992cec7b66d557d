//! Test harness: a real relay on 127.0.0.1:0 in this process (stoppable and restartable on the same
//! port and data), demo accounts, replicas with sync drivers, and a raw protocol client.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use automerge::Automerge;
use automerge::sync::SyncDoc;
use automerge::transaction::Transaction;
use crewdesk::demo;
pub use crewdesk::domain::attachment::BlobHash;
use crewdesk::domain::{AgentId, Channel, ConversationId, MessageBody, Timestamp};
use crewdesk::replica::Replica;
use crewdesk::replica::doc::{self, DocError};
use crewdesk::sync::wire::{PeerMetadata, WireMessage};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use sync_client::{ClientConfig, SharedReplica, SyncClient};
use sync_server::store::Store;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub struct TestRelay {
    pub addr: SocketAddr,
    pub data: PathBuf,
    /// `postgres://…` when the suite runs on PostgreSQL (`CREWDESK_TEST_STORE=postgres`), else SQLite in `data`.
    pub store: Option<String>,
    /// Settings a test adds to the defaults (SMTP server, WhatsApp, ...); kept across restarts.
    pub settings: Arc<dyn Fn(&mut sync_server::Config) + Send + Sync>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The store the relay suite runs on: PostgreSQL when `CREWDESK_TEST_STORE=postgres` (a fresh
/// database in the cluster at `CREWDESK_TEST_POSTGRES`), otherwise SQLite.
pub fn suite_store() -> Option<String> {
    match std::env::var("CREWDESK_TEST_STORE").as_deref() {
        Ok("postgres") => Some(postgres_database()),
        Ok("sqlite") | Err(_) => None,
        Ok(other) => panic!("CREWDESK_TEST_STORE={other}: expected sqlite or postgres"),
    }
}

/// A new, empty database in the test PostgreSQL cluster (`cargo xtask test` starts one and sets
/// `CREWDESK_TEST_POSTGRES` to its URL, e.g. `postgres://crewdesk@127.0.0.1:5433`).
pub fn postgres_database() -> String {
    let base = std::env::var("CREWDESK_TEST_POSTGRES").expect(
        "CREWDESK_TEST_POSTGRES is not set: run `cargo xtask test` (it starts a throwaway PostgreSQL cluster), \
         or point it at a PostgreSQL server URL such as postgres://crewdesk@127.0.0.1:5433",
    );
    let name = format!("t_{}", crewdesk::sync::document_id::encode(&rand::random()).to_lowercase());
    let admin = format!("{base}/postgres");
    let create = format!("CREATE DATABASE \"{name}\"");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            client.batch_execute(&create).await.unwrap();
        });
    })
    .join()
    .unwrap();
    format!("{base}/{name}")
}

fn open_store(data: &std::path::Path, url: Option<&str>) -> Store {
    match url {
        Some(url) => Store::connect(&sync_server::store::StoreUrl::parse(url).unwrap()).unwrap(),
        None => Store::open(data).unwrap(),
    }
}

impl TestRelay {
    /// Starts a relay on a free loopback port with the demo teams; returns it and a token per agent.
    pub async fn start(data: PathBuf) -> (TestRelay, HashMap<String, String>) {
        TestRelay::start_on(data, suite_store()).await
    }

    /// Starts a relay on the given store (`None`: SQLite in `data`) with the demo accounts.
    pub async fn start_on(data: PathBuf, url: Option<String>) -> (TestRelay, HashMap<String, String>) {
        let store = open_store(&data, url.as_deref());
        for team in demo::teams() {
            store.put_team(&team).unwrap();
        }
        let tokens = demo::AGENTS
            .iter()
            .map(|(a, ..)| (a.to_string(), store.issue_token(&AgentId::from(*a), "test").unwrap()))
            .collect();
        drop(store);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut relay = TestRelay { addr, data, store: url, settings: Arc::new(|_| {}), stop: None, task: None };
        relay.serve(listener);
        (relay, tokens)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (tx, rx) = oneshot::channel();
        let mut config = sync_server::Config {
            data_dir: self.data.clone(),
            store: self.store.clone(),
            listen: self.addr,
            keepalive: Duration::from_secs(1),
            ..sync_server::Config::default()
        };
        (self.settings)(&mut config);
        self.stop = Some(tx);
        self.task = Some(tokio::spawn(async move {
            sync_server::run(listener, config, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        }));
    }

    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task).await.expect("relay stops").unwrap();
        }
    }

    /// Starts a relay with settings added to the defaults.
    pub async fn start_with(
        data: PathBuf,
        settings: impl Fn(&mut sync_server::Config) + Send + Sync + 'static,
    ) -> (TestRelay, HashMap<String, String>) {
        TestRelay::start_on_with(data, suite_store(), settings).await
    }

    /// Starts a relay on the given store with settings added to the defaults.
    pub async fn start_on_with(
        data: PathBuf,
        url: Option<String>,
        settings: impl Fn(&mut sync_server::Config) + Send + Sync + 'static,
    ) -> (TestRelay, HashMap<String, String>) {
        let (mut relay, tokens) = TestRelay::start_on(data, url).await;
        relay.stop().await;
        relay.settings = Arc::new(settings);
        relay.restart().await;
        (relay, tokens)
    }

    /// Another relay instance on its own port over the same (PostgreSQL) store, with the same
    /// settings and its own data directory.
    pub async fn another_instance(&self, data: PathBuf) -> TestRelay {
        assert!(self.store.is_some(), "several instances need a PostgreSQL store");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut relay = TestRelay {
            addr,
            data,
            store: self.store.clone(),
            settings: self.settings.clone(),
            stop: None,
            task: None,
        };
        relay.serve(listener);
        relay
    }

    /// Starts again on the same port with the same data.
    pub async fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    /// The relay's store, opened beside it (as an admin's CLI would).
    pub fn open_store(&self) -> Store {
        open_store(&self.data, self.store.as_deref())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A team's web-widget key (made on first use), as an admin reads it with `sync-server list`.
    pub fn widget_key(&self, team: &str) -> String {
        let team = crewdesk::domain::TeamId(team.to_owned());
        self.open_store().widget_settings(&team).unwrap().unwrap().key
    }

    /// A customer's conversation with their first message ("Hello?", id `m-first`), imported by an
    /// admin of `team` (customer messages never come from replicas).
    pub async fn customer_conversation(&self, admin_token: &str, team: &str, channel: Channel) -> ConversationId {
        let r = reqwest::Client::new()
            .post(format!("{}/api/import/conversations", self.url()))
            .bearer_auth(admin_token)
            .json(&serde_json::json!({
                "team": team,
                "channel": channel,
                "customer": { "name": "Maya Hansen", "email": "maya@example.com" },
                "text": "Hello?",
                "id": "m-first",
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        let v: serde_json::Value = r.json().await.unwrap();
        ConversationId(v["conversation"].as_str().unwrap().to_owned())
    }

    /// The customer writes (through an admin's import); false when the relay refused or was down.
    pub async fn customer_writes(&self, admin_token: &str, id: &ConversationId, text: &str, at: Timestamp) -> bool {
        let sent = reqwest::Client::new()
            .post(format!("{}/api/import/conversations/{}/messages", self.url(), id.0))
            .bearer_auth(admin_token)
            .json(&serde_json::json!({ "text": text, "at": at.0 }))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        sent.is_ok_and(|r| r.status().is_success())
    }
}

/// A replica with its sync driver.
pub struct Agent {
    pub replica: SharedReplica,
    /// `None` while disconnected.
    pub client: Option<SyncClient>,
    config: ClientConfig,
    _dir: tempfile::TempDir,
}

impl Agent {
    pub fn start(relay: &TestRelay, tokens: &HashMap<String, String>, agent: &str) -> Agent {
        Agent::start_at(relay.url(), tokens, agent)
    }

    /// An agent syncing with the relay at `relay_url`.
    pub fn start_at(relay_url: String, tokens: &HashMap<String, String>, agent: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let replica = Replica::open(dir.path().join("replica.sqlite3"), AgentId::from(agent)).unwrap();
        let replica = Arc::new(Mutex::new(replica));
        let mut config = ClientConfig::new(relay_url, tokens[agent].clone());
        config.max_backoff = Duration::from_millis(500);
        config.blob_dir = Some(dir.path().join("blobs"));
        let mut agent = Agent { replica, client: None, config, _dir: dir };
        agent.reconnect();
        agent
    }

    /// The sync driver (panics while disconnected).
    pub fn client(&self) -> &SyncClient {
        self.client.as_ref().expect("connected agent")
    }

    /// Stops syncing, as when the network goes away; local work goes on.
    pub async fn disconnect(&mut self) {
        if let Some(client) = self.client.take() {
            client.shutdown().await;
        }
    }

    /// Connects to another relay (instance) from now on; the agent must be disconnected.
    pub fn move_to(&mut self, relay_url: String) {
        assert!(self.client.is_none(), "disconnect before moving to another relay");
        self.config.relay_url = relay_url;
    }

    pub fn reconnect(&mut self) {
        if self.client.is_none() {
            let (events, mut rx) = mpsc::channel(1024);
            // Events are not needed by these tests; keep the channel drained.
            tokio::spawn(async move { while rx.recv().await.is_some() {} });
            self.client = Some(SyncClient::spawn(self.config.clone(), self.replica.clone(), events));
        }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut Replica) -> T) -> T {
        f(&mut self.replica.lock().unwrap())
    }

    /// Runs an action and tells the driver the conversation changed.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// 📎 as the desktop app does it: the file goes into the local blob store, the message into
    /// the conversation, and the upload into the queue. Returns the blob's hash.
    pub fn attach(&self, id: &ConversationId, file_name: &str, mime: &str, bytes: &[u8]) -> BlobHash {
        let hash = BlobHash::of(bytes);
        let dir = self.config.blob_dir.clone().unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(hash.as_str()), bytes).unwrap();
        let body = MessageBody::Attachment {
            blob: hash.reference(),
            file_name: file_name.into(),
            mime: mime.into(),
            size: bytes.len() as u64,
        };
        self.act(id, |r| {
            r.send(id, body, Timestamp::now()).unwrap();
            r.queue_blob_upload(id, &hash, mime).unwrap();
        });
        if let Some(client) = &self.client {
            client.upload_now();
        }
        hash
    }

    /// Waits (at most 20 s) until this replica has the conversation.
    pub async fn has(&self, id: &ConversationId) {
        eventually(20, "the replica has the conversation", || self.with(|r| r.summary(id).is_some())).await;
    }

    /// Waits (at most 10 s) until the sync driver is connected.
    pub async fn connected(&self) {
        let mut status = self.client().status();
        tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| s.connected))
            .await
            .expect("connects")
            .unwrap();
    }

    /// The texts of a conversation's messages as this replica has them (other bodies as debug text).
    pub fn message_texts(&self, id: &ConversationId) -> Vec<String> {
        self.with(|r| {
            r.stored_messages(id)
                .unwrap_or_default()
                .into_iter()
                .map(|m| match m.body {
                    MessageBody::Text { text } => text,
                    other => format!("{other:?}"),
                })
                .collect()
        })
    }

    pub fn act<T>(&self, id: &ConversationId, f: impl FnOnce(&mut Replica) -> T) -> T {
        let out = self.with(f);
        if let Some(client) = &self.client {
            client.changed(id.clone());
        }
        out
    }
}

/// A PNG of `width`×`height` with a gradient (for attachments and photos).
pub fn png(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Polls `cond` until it holds or `secs` pass.
pub async fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A bare protocol client, for hostile and access tests.
pub struct RawClient {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
}

impl RawClient {
    pub async fn connect(relay: &TestRelay, token: Option<&str>) -> RawClient {
        let url = match token {
            Some(t) => format!("ws://{}/?token={t}", relay.addr),
            None => format!("ws://{}/", relay.addr),
        };
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        RawClient { ws }
    }

    pub async fn send(&mut self, m: &WireMessage) {
        self.ws.send(Frame::Binary(m.encode().into())).await.unwrap();
    }

    pub async fn send_raw(&mut self, m: Frame) -> bool {
        self.ws.send(m).await.is_ok()
    }

    /// Bytes written to the socket as they are, outside any WebSocket frame of this client (to
    /// announce a frame and never send it whole).
    pub async fn write_bytes(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = self.ws.get_mut() else { panic!("plain TCP expected") };
        tcp.write_all(bytes).await.unwrap();
        tcp.flush().await.unwrap();
    }

    /// The next frame of any kind (close frames included), or `None` when the connection ends or
    /// nothing comes within `within`.
    pub async fn next_frame(&mut self, within: Duration) -> Option<Frame> {
        loop {
            match tokio::time::timeout(within, self.ws.next()).await.ok()?? {
                Ok(Frame::Ping(_) | Frame::Pong(_)) => continue,
                Ok(frame) => return Some(frame),
                Err(e) => {
                    eprintln!("the connection ended: {e}");
                    return None;
                }
            }
        }
    }

    pub async fn join(&mut self) -> WireMessage {
        let join = WireMessage::Join {
            sender_id: "raw".into(),
            peer_metadata: PeerMetadata::default(),
            supported_protocol_versions: vec!["1".into()],
        };
        self.send(&join).await;
        self.next().await.expect("an answer to join")
    }

    /// The next protocol message, or `None` when the connection closes (5 s at most).
    /// The next close frame's code and reason (error frames before it collected), within `within`.
    pub async fn closed(&mut self, within: Duration) -> (u16, String, Vec<String>) {
        let deadline = std::time::Instant::now() + within;
        let mut errors = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.next_frame(left).await {
                Some(Frame::Binary(b)) => {
                    if let WireMessage::Error { message, .. } = WireMessage::decode(&b).unwrap() {
                        errors.push(message);
                    }
                }
                Some(Frame::Close(Some(close))) => return (close.code.into(), close.reason.to_string(), errors),
                other => panic!("expected a close frame within {within:?}, got {other:?} (errors: {errors:?})"),
            }
        }
    }

    pub async fn next(&mut self) -> Option<WireMessage> {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.ws.next()).await.ok()?? {
                Ok(Frame::Binary(b)) => return Some(WireMessage::decode(&b).unwrap()),
                Ok(Frame::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }
}

/// A real (minimal) SMTP server on loopback that keeps every message it accepts.
pub struct SmtpSink {
    pub addr: SocketAddr,
    pub mails: Arc<Mutex<Vec<String>>>,
}

impl SmtpSink {
    pub async fn start() -> SmtpSink {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mails: Arc<Mutex<Vec<String>>> = Arc::default();
        let store = mails.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    let _ = write.write_all(b"220 sink ready\r\n").await;
                    let mut data: Option<String> = None;
                    while let Ok(Some(line)) = lines.next_line().await {
                        if let Some(body) = data.as_mut() {
                            if line == "." {
                                store.lock().unwrap().push(std::mem::take(body));
                                data = None;
                                let _ = write.write_all(b"250 queued\r\n").await;
                            } else {
                                body.push_str(&line);
                                body.push('\n');
                            }
                            continue;
                        }
                        let verb = line.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
                        let reply: &[u8] = match verb.as_str() {
                            "EHLO" | "HELO" => b"250 sink\r\n",
                            "DATA" => {
                                data = Some(String::new());
                                b"354 end with .\r\n"
                            }
                            "QUIT" => {
                                let _ = write.write_all(b"221 bye\r\n").await;
                                break;
                            }
                            _ => b"250 ok\r\n",
                        };
                        let _ = write.write_all(reply).await;
                    }
                });
            }
        });
        SmtpSink { addr, mails }
    }

    pub fn received(&self) -> Vec<String> {
        self.mails.lock().unwrap().clone()
    }
}

/// A media upload the Graph API stand-in received: its type and bytes.
pub type Upload = (String, Vec<u8>);

/// A stand-in for the WhatsApp Cloud API's `POST /{version}/{phone-number-id}/messages`: it checks
/// the bearer token and the payload's shape the way the Graph API does, answers like it, and keeps
/// every message it accepted.
pub struct GraphStandIn {
    /// What to configure as the API base (`http://127.0.0.1:PORT/v21.0`).
    pub base: String,
    pub accepted: Arc<Mutex<Vec<serde_json::Value>>>,
    pub refused: Arc<Mutex<Vec<String>>>,
    /// Uploaded media: (type, bytes); media ids are `media-1`, `media-2`, ... in this order.
    pub media: Arc<Mutex<Vec<Upload>>>,
    /// Media customers sent, by media id, for the relay to fetch.
    pub inbound: Arc<Mutex<HashMap<String, Upload>>>,
}

impl GraphStandIn {
    pub async fn start(phone_number_id: &str, access_token: &str) -> GraphStandIn {
        use axum::http::{HeaderMap, StatusCode};
        let accepted: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let refused: Arc<Mutex<Vec<String>>> = Arc::default();
        let media: Arc<Mutex<Vec<Upload>>> = Arc::default();
        let (ok, bad) = (accepted.clone(), refused.clone());
        let expected_auth = format!("Bearer {access_token}");
        let path = format!("/v21.0/{phone_number_id}/messages");
        let handler = move |headers: HeaderMap, body: axum::body::Bytes| {
            let (ok, bad, expected_auth) = (ok.clone(), bad.clone(), expected_auth.clone());
            async move {
                let error = |status: StatusCode, message: String| {
                    bad.lock().unwrap().push(message.clone());
                    (status, axum::Json(serde_json::json!({ "error": { "message": message, "code": 100 } })))
                };
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected_auth.as_str()) {
                    return error(StatusCode::UNAUTHORIZED, "Invalid OAuth access token".into());
                }
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
                    return error(StatusCode::BAD_REQUEST, "body is not JSON".into());
                };
                if let Err(e) = check_graph_message(&v) {
                    return error(StatusCode::BAD_REQUEST, e);
                }
                let n = {
                    let mut all = ok.lock().unwrap();
                    all.push(v);
                    all.len()
                };
                (
                    StatusCode::OK,
                    axum::Json(
                        serde_json::json!({ "messaging_product": "whatsapp", "messages": [{ "id": format!("wamid.standin-{n}") }] }),
                    ),
                )
            }
        };
        // `POST /{version}/{phone-number-id}/media`: multipart with messaging_product, type and file.
        let (uploads, media_auth) = (media.clone(), format!("Bearer {access_token}"));
        let media_handler = move |headers: HeaderMap, mut form: axum::extract::Multipart| {
            let (uploads, media_auth) = (uploads.clone(), media_auth.clone());
            async move {
                let refuse = |status: StatusCode, message: &str| {
                    (status, axum::Json(serde_json::json!({ "error": { "message": message, "code": 100 } })))
                };
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(media_auth.as_str()) {
                    return refuse(StatusCode::UNAUTHORIZED, "Invalid OAuth access token");
                }
                let mut fields: HashMap<String, Vec<u8>> = HashMap::new();
                let mut file_type = None;
                while let Ok(Some(field)) = form.next_field().await {
                    let name = field.name().unwrap_or_default().to_owned();
                    if name == "file" {
                        file_type = field.content_type().map(str::to_owned);
                    }
                    fields.insert(name, field.bytes().await.unwrap().to_vec());
                }
                let text = |k: &str| fields.get(k).map(|v| String::from_utf8_lossy(v).into_owned());
                if text("messaging_product").as_deref() != Some("whatsapp") {
                    return refuse(StatusCode::BAD_REQUEST, "messaging_product must be whatsapp");
                }
                let (Some(kind), Some(file)) = (text("type"), fields.get("file")) else {
                    return refuse(StatusCode::BAD_REQUEST, "type and file are required");
                };
                if file.is_empty() || file_type.as_deref() != Some(kind.as_str()) {
                    return refuse(StatusCode::BAD_REQUEST, "the file is empty or its type differs from type");
                }
                let n = {
                    let mut all = uploads.lock().unwrap();
                    all.push((kind, file.clone()));
                    all.len()
                };
                (StatusCode::OK, axum::Json(serde_json::json!({ "id": format!("media-{n}") })))
            }
        };
        // Customers' media: `GET /{version}/{media-id}` names a URL, which gives the file; both need the token.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inbound: Arc<Mutex<HashMap<String, Upload>>> = Arc::default();
        let auth = format!("Bearer {access_token}");
        let authorized = move |headers: &HeaderMap| {
            headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(auth.as_str())
        };
        let (files, ok_auth) = (inbound.clone(), authorized.clone());
        let media_url = move |headers: HeaderMap, axum::extract::Path(id): axum::extract::Path<String>| {
            let (files, ok_auth) = (files.clone(), ok_auth.clone());
            async move {
                let known = files.lock().unwrap().get(&id).map(|(mime, _)| mime.clone());
                match (ok_auth(&headers), known) {
                    (false, _) => (
                        StatusCode::UNAUTHORIZED,
                        axum::Json(serde_json::json!({ "error": { "message": "Invalid OAuth access token" } })),
                    ),
                    (true, None) => (
                        StatusCode::NOT_FOUND,
                        axum::Json(serde_json::json!({ "error": { "message": "no such media" } })),
                    ),
                    (true, Some(mime)) => (
                        StatusCode::OK,
                        axum::Json(
                            serde_json::json!({ "id": id, "mime_type": mime, "url": format!("http://{addr}/files/{id}") }),
                        ),
                    ),
                }
            }
        };
        let files = inbound.clone();
        let media_file = move |headers: HeaderMap, axum::extract::Path(id): axum::extract::Path<String>| {
            let (files, ok_auth) = (files.clone(), authorized.clone());
            async move {
                match (ok_auth(&headers), files.lock().unwrap().get(&id).cloned()) {
                    (true, Some((_, bytes))) => (StatusCode::OK, bytes),
                    _ => (StatusCode::NOT_FOUND, Vec::new()),
                }
            }
        };
        let app = axum::Router::new()
            .route(&path, axum::routing::post(handler))
            .route(&format!("/v21.0/{phone_number_id}/media"), axum::routing::post(media_handler))
            .route("/v21.0/{id}", axum::routing::get(media_url))
            .route("/files/{id}", axum::routing::get(media_file));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        GraphStandIn { base: format!("http://{addr}/v21.0"), accepted, refused, media, inbound }
    }

    pub fn accepted(&self) -> Vec<serde_json::Value> {
        self.accepted.lock().unwrap().clone()
    }
}

/// The Graph API's rules for a text or template message, as far as the relay uses them.
fn check_graph_message(v: &serde_json::Value) -> Result<(), String> {
    let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).ok_or_else(|| format!("{p} missing or not a string"));
    if s("/messaging_product")? != "whatsapp" {
        return Err("messaging_product must be whatsapp".into());
    }
    if !s("/to")?.bytes().all(|b| b.is_ascii_digit()) {
        return Err("to must be a phone number in international format".into());
    }
    match s("/type")? {
        "text" => {
            if s("/text/body")?.trim().is_empty() {
                return Err("text.body is empty".into());
            }
        }
        "template" => {
            s("/template/name")?;
            s("/template/language/code")?;
            for c in v.pointer("/template/components").and_then(|c| c.as_array()).ok_or("components missing")? {
                for p in c.get("parameters").and_then(|p| p.as_array()).ok_or("parameters missing")? {
                    if p.get("type").and_then(|t| t.as_str()) != Some("text") || p.get("text").is_none() {
                        return Err("template parameters must be {type: text, text}".into());
                    }
                }
            }
        }
        "image" => {
            s("/image/id")?;
        }
        "document" => {
            s("/document/id")?;
            s("/document/filename")?;
        }
        other => return Err(format!("unsupported type {other}")),
    }
    Ok(())
}

pub mod mmdb;

/// The relay binary next to the test executables (built once if this test run did not build it).
pub fn relay_binary() -> PathBuf {
    use std::path::Path;
    // The workspace's binaries live next to the test executables' parent directory; build the
    // relay there if this test run did not (cargo builds a package's binaries only for its own tests).
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join("sync-server");
    BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let target = bin.parent().and_then(Path::parent).unwrap();
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "sync-server", "--bin", "sync-server"])
            .env("CARGO_TARGET_DIR", target)
            .status()
            .unwrap();
        assert!(status.success(), "building the relay binary failed");
    });
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

/// A relay process; killed when dropped, so a failing test leaves nothing running.
pub struct RelayProcess(pub std::process::Child);

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl RelayProcess {
    /// `sync-server serve` on `port` with `data` and, when given, a PostgreSQL store.
    pub fn spawn(data: &std::path::Path, store: Option<&str>, port: u16) -> RelayProcess {
        let mut command = std::process::Command::new(relay_binary());
        if let Some(url) = store {
            command.env("CREWDESK_STORE", url);
        }
        command
            .args(["--data-dir", data.to_str().unwrap(), "serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(RelayProcess)
            .unwrap()
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

/// Waits (at most 5 s) until something listens on the loopback port.
pub async fn wait_listening(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the relay did not start on port {port}");
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Every representative asks to grab at once (each at a slightly different moment); those with
/// `i % 5 == 0` are expected to be offline, so their grabs always go through. Returns how many asked.
pub fn grab_all(reps: &[Agent], id: &ConversationId) -> usize {
    let now = Timestamp::now();
    let mut requested = 0;
    for (i, r) in reps.iter().enumerate() {
        // Online representatives may already have heard of a winner: then the rules refuse.
        match r.act(id, |x| x.grab(id, now.plus(i as i64 % 7))) {
            Ok(()) => requested += 1,
            Err(crewdesk::replica::ReplicaError::Denied(crewdesk::domain::DomainError::HandledByAnother)) => {
                assert!(i % 5 != 0, "offline grabs always go through")
            }
            Err(e) => panic!("unexpected refusal: {e}"),
        }
    }
    requested
}

/// Waits until every replica names the same owner, then checks that exactly one representative
/// won and every other one who asked is told they lost. Returns the owner.
pub async fn one_owner_everywhere(reps: &[Agent], others: &[&Agent], id: &ConversationId, requested: usize) -> AgentId {
    let owners = || {
        reps.iter()
            .chain(others.iter().copied())
            .map(|r| r.with(|x| x.summary(id).and_then(|s| s.owner.clone())))
            .collect::<Vec<_>>()
    };
    eventually(90, "every replica agrees on one owner", || {
        let owners = owners();
        owners[0].is_some() && owners.iter().all(|o| *o == owners[0])
    })
    .await;
    use crewdesk::domain::access::{GrabState, grab_state};
    let states: Vec<Option<GrabState>> =
        reps.iter().map(|r| r.with(|x| x.summary(id).map(|s| grab_state(x.agent(), s)))).collect();
    assert_eq!(states.iter().filter(|s| **s == Some(GrabState::Won)).count(), 1, "exactly one representative won");
    assert_eq!(
        states.iter().filter(|s| **s == Some(GrabState::Lost)).count(),
        requested - 1,
        "every other representative who grabbed is told they lost"
    );
    owners()[0].clone().expect("an owner")
}

// ---- the bare protocol, as a modified client speaks it ------------------------------------------

/// Sends the sync message the state calls for; false when it calls for none.
pub async fn sync_with(client: &mut RawClient, id: &str, d: &Automerge, state: &mut automerge::sync::State) -> bool {
    let Some(m) = d.generate_sync_message(state) else { return false };
    send_sync(client, id, m.encode()).await;
    true
}

pub async fn send_sync(client: &mut RawClient, id: &str, data: Vec<u8>) {
    let m = WireMessage::Sync { sender_id: "raw".into(), target_id: "relay".into(), document_id: id.into(), data };
    client.send(&m).await;
}

/// The next message about `id` or an error (announcements of other conversations are skipped).
pub async fn next_about(client: &mut RawClient, id: &str) -> Option<WireMessage> {
    loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), client.next()).await.ok()??;
        let about = match &m {
            WireMessage::Sync { document_id, .. } | WireMessage::DocUnavailable { document_id, .. } => {
                document_id == id
            }
            WireMessage::Error { .. } => true,
            _ => false,
        };
        if about {
            return Some(m);
        }
    }
}

/// A copy of a stored conversation, fetched with the bare protocol.
pub async fn fetch(client: &mut RawClient, id: &str) -> Automerge {
    let mut copy = Automerge::new();
    let mut state = automerge::sync::State::new();
    let request = copy.generate_sync_message(&mut state).unwrap();
    let m = WireMessage::Request {
        sender_id: "raw".into(),
        target_id: "relay".into(),
        document_id: id.into(),
        data: request.encode(),
    };
    client.send(&m).await;
    for _ in 0..10 {
        match next_about(client, id).await {
            Some(WireMessage::Sync { data, .. }) => {
                copy.receive_sync_message(&mut state, automerge::sync::Message::decode(&data).unwrap()).unwrap();
                if doc::check_schema(&copy).unwrap_or(false) {
                    return copy;
                }
                sync_with(client, id, &copy, &mut state).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("the conversation did not arrive");
}

/// Makes `forge` on a copy of `base` and syncs it; returns the relay's error, or "accepted" when
/// the relay took the change (its heads covered it).
pub async fn attempt(
    client: &mut RawClient,
    id: &str,
    base: &Automerge,
    forge: impl FnOnce(&mut Transaction<'_>) -> Result<(), DocError>,
) -> String {
    let mut attempt = base.fork().with_actor(base.get_actor().clone());
    let mut state = automerge::sync::State::new();
    attempt.transact::<_, _, DocError>(forge).unwrap();
    for _ in 0..10 {
        if !sync_with(client, id, &attempt, &mut state).await {
            break;
        }
        match next_about(client, id).await {
            Some(WireMessage::Error { message, .. }) => return message,
            Some(WireMessage::Sync { data, .. }) => {
                let m = automerge::sync::Message::decode(&data).unwrap();
                let covered = m.heads == attempt.get_heads();
                if let Err(e) = attempt.receive_sync_message(&mut state, m) {
                    // The relay sent a change this copy cannot take (one with the same actor and
                    // sequence number as the forged one): the forged change is not the relay's.
                    return format!("the relay's answer does not fit the forged change ({e})");
                }
                if covered {
                    return "accepted".into();
                }
            }
            Some(WireMessage::DocUnavailable { .. }) => return "unavailable".into(),
            other => panic!("unexpected {other:?}"),
        }
    }
    "no answer".into()
}

// The web widget and ephemeral messages, as tests drive them.

pub type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn widget_socket(relay: &TestRelay, session: &str, origin: Option<&str>) -> Socket {
    let mut request = format!("ws://{}/api/widget/ws?session={session}", relay.addr).into_client_request().unwrap();
    if let Some(o) = origin {
        request.headers_mut().insert("origin", o.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// The next JSON frame (pings skipped), or `None` when the socket closes or stays quiet `secs`.
pub async fn next_json(ws: &mut Socket, secs: u64) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(secs), ws.next()).await.ok()?? {
            Ok(Frame::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(Frame::Ping(_) | Frame::Pong(_)) => continue,
            _ => return None,
        }
    }
}

/// A request for the conversation: the connection follows it from then on.
pub fn follow(id: &ConversationId) -> WireMessage {
    let request = automerge::sync::SyncDoc::generate_sync_message(
        &automerge::Automerge::new(),
        &mut automerge::sync::State::new(),
    );
    WireMessage::Request {
        sender_id: "raw".into(),
        target_id: "relay".into(),
        document_id: id.0.clone(),
        data: request.unwrap().encode(),
    }
}

/// The typing messages about `id` a connection hears within `secs`.
pub async fn typing_seen(
    client: &mut RawClient,
    id: &ConversationId,
    secs: u64,
) -> Vec<crewdesk::sync::presence::Typing> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Ok(Some(WireMessage::Ephemeral { document_id, data, .. })) =
            tokio::time::timeout(Duration::from_millis(200), client.next()).await
            && document_id == id.0
            && let Some(t) = crewdesk::sync::presence::decode_typing(&data)
        {
            seen.push(t);
        }
    }
    seen
}

/// A (modified) client's typing message claiming `who` is typing in `id`: the relay must name the
/// connection's own agent instead.
pub fn typing_claim(id: &ConversationId, who: &str) -> WireMessage {
    use crewdesk::sync::presence::{Typing, encode_typing};
    WireMessage::Ephemeral {
        sender_id: "raw".into(),
        target_id: "relay".into(),
        document_id: id.0.clone(),
        count: 1,
        session_id: "s".into(),
        data: encode_typing(&Typing::Crew(who.into())),
    }
}

/// The next typing frame a widget socket gets (other frames skipped), within `secs` of each frame.
pub async fn widget_typing_frame(ws: &mut Socket, secs: u64) -> Value {
    loop {
        let v = next_json(ws, secs).await.expect("a typing frame");
        if v["type"] == "typing" {
            return v;
        }
    }
}
