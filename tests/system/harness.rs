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

mod stand_ins;
pub use stand_ins::*;
mod protocol;
pub use protocol::*;
