//! Relay load benchmark. In one run, the same load against the Crewdesk relay and against the
//! reference automerge-repo sync server (Node, `tests/interop/reference-server.mjs`): N agents on
//! M conversations each send K messages; it prints throughput, fan-out latency p50/p99 and each
//! server's memory, and the ratios. Then: a replica's offline catch-up of 10k changes over 100
//! conversations, and the relay's memory with 10k stored conversations of which 100 are active.
//! Run with `cargo bench -p sync-server --bench relay` (CREWDESK_LOAD_AGENTS, _CONVERSATIONS,
//! _MESSAGES change the load).

#![allow(clippy::unwrap_used)] // a benchmark harness: any failure aborts the measurement

use automerge::sync::{self, SyncDoc};
use automerge::{ActorId, Automerge, ChangeHash};
use crewdesk::demo;
use crewdesk::domain::{
    AgentId, Author, Channel, ConversationId, Customer, CustomerId, Member, Message, MessageBody, MessageId, Role,
    Team, TeamId, TeamMode, Thresholds, Timestamp,
};
use crewdesk::replica::Replica;
use crewdesk::replica::doc::{self, NewConversation};
use crewdesk::sync::wire::{PeerMetadata, WireMessage};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use sync_server::store::Store;
use tokio::sync::Barrier;
use tokio_tungstenite::tungstenite::Message as Ws;

#[path = "relay/hostile.rs"]
mod hostile;
#[path = "relay/scale_out.rs"]
mod scale_out;
use scale_out::scale_out;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and stime are 14th and 15th.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// (VmRSS, VmHWM) of a process in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn wait_listening(port: u16) {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("server on {port} did not start");
}

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop")
}

/// A server process that is killed when dropped, even when the benchmark panics.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

fn start_relay(data: &Path, port: u16) -> Server {
    start_relay_on(data, None, port, None)
}

/// A relay for the widget rows: every customer comes from 127.0.0.1, so the per-address limits
/// (conversation starts, messages, connections) are raised for the measurement.
fn start_relay_for_widgets(data: &Path, port: u16) -> Server {
    let limits = ["--widget-starts-per-ip", "1000000", "--widget-messages-per-ip", "1000000"];
    start_relay_with(data, None, port, &[&limits[..], &["--max-connections-per-address", "100000"]].concat())
}

/// The relay of the main rows: every connection comes from 127.0.0.1, so the per-address cap is
/// lifted (the slow-body row plays 2,000 addresses).
fn start_relay_many_addresses(data: &Path, port: u16) -> Server {
    start_relay_with(data, None, port, &["--max-connections-per-address", "100000"])
}

/// Agents per team in the widget rows (customer i writes to team i / 10, agent i answers).
const WIDGET_TEAM: usize = 10;

/// What the widget rows measured.
struct WidgetResult {
    /// A customer's message in the widget until the agent's replica has it.
    to_agent: Vec<Duration>,
    /// An agent's reply until the customer's widget socket shows it.
    to_widget: Vec<Duration>,
    elapsed: Duration,
    /// Relay CPU seconds from the moment everyone is connected and in the room until the end.
    relay_cpu: f64,
}

/// W web-widget customers, one per conversation, each with an agent in the room: the customer
/// writes K messages through the widget's socket and the agent K replies through the sync
/// protocol, `every` apart, both at once.
async fn widget_load(
    (port, relay_pid): (u16, u32),
    keys: &[String],
    tokens: &[String],
    w: usize,
    k: usize,
    every: Duration,
) -> WidgetResult {
    let http = reqwest::Client::new();
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let to_agent: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let to_widget: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let barrier = Arc::new(Barrier::new(2 * w + 1));
    let mut tasks = Vec::new();
    for i in 0..w {
        let started: serde_json::Value = http
            .post(format!("http://127.0.0.1:{port}/api/widget/{}/conversations", keys[i / WIDGET_TEAM]))
            .json(&serde_json::json!({ "name": format!("Customer {i}"), "text": format!("hello {i}") }))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = started["session"].as_str().unwrap().to_owned();
        let id = started["conversation"].as_str().unwrap().to_owned();
        // The customer: writes through the widget's socket, reads the agent's replies there.
        let (sent_c, to_widget, barrier_c) = (sent.clone(), to_widget.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) =
                tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/api/widget/ws?session={session}"))
                    .await
                    .unwrap();
            barrier_c.wait().await;
            let offset = Duration::from_millis((i as u64 * 7919) % every.as_millis().max(1) as u64);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
            let (mut mine, mut got) = (0, 0);
            let deadline = tokio::time::sleep(Duration::from_secs(60));
            tokio::pin!(deadline);
            while mine < k || got < k {
                tokio::select! {
                    frame = ws.next() => {
                        let Some(Ok(Ws::Text(t))) = frame else { if matches!(frame, Some(Ok(_))) { continue } else { break } };
                        let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) else { continue };
                        for m in v["messages"].as_array().into_iter().flatten() {
                            let Some(text) = m["text"].as_str() else { continue };
                            if m["from"] == "crew" && let Some(at) = sent_c.lock().unwrap().get(text) {
                                to_widget.lock().unwrap().push(at.elapsed());
                                got += 1;
                            }
                        }
                    }
                    _ = tick.tick(), if mine < k => {
                        let text = format!("w{i}-{mine}");
                        sent_c.lock().unwrap().insert(text.clone(), Instant::now());
                        let frame = serde_json::json!({ "type": "message", "text": text }).to_string();
                        if ws.send(Ws::Text(frame.into())).await.is_err() { break }
                        mine += 1;
                    }
                    _ = &mut deadline => break,
                }
            }
        }));
        // The agent: joins the conversation, replies through the sync protocol, reads the
        // customer's messages from the changes the relay sends.
        let (token, sent_a, to_agent, barrier_a) =
            (tokens[i % tokens.len()].clone(), sent.clone(), to_agent.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let peer = format!("widget-agent{i}");
            let agent = AgentId(format!("agent{}", i % 1_000_000));
            let mut ws = connect(port, &token, &peer).await;
            let mut d = Automerge::new().with_actor(ActorId::from(format!("widget-run-agent{i}").as_bytes()));
            let mut state = sync::State::new();
            let request = d.generate_sync_message(&mut state).unwrap();
            let m = WireMessage::Request { sender_id: peer.clone(), target_id: "server".into(), document_id: id.clone(), data: request.encode() };
            ws.send(Ws::Binary(m.encode().into())).await.unwrap();
            // Fetch the conversation, then join it.
            while !doc::check_schema(&d).unwrap_or(false) {
                let Some(Ok(Ws::Binary(b))) = ws.next().await else { continue };
                // Other conversations of the team arrive too (a desk would sync them): skipped.
                let Ok(WireMessage::Sync { data, document_id, .. }) = WireMessage::decode(&b) else { continue };
                if document_id != id {
                    continue;
                }
                d.receive_sync_message(&mut state, sync::Message::decode(&data).unwrap()).unwrap();
                if let Some(m) = d.generate_sync_message(&mut state) {
                    ws.send(sync_frame(&peer, &id, m)).await.unwrap();
                }
            }
            d.transact::<_, _, doc::DocError>(|tx| doc::set_in_room(tx, &agent, true)).unwrap();
            if let Some(m) = d.generate_sync_message(&mut state) {
                ws.send(sync_frame(&peer, &id, m)).await.unwrap();
            }
            barrier_a.wait().await;
            let offset = Duration::from_millis((i as u64 * 104_729) % every.as_millis().max(1) as u64);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
            let (mut mine, mut got) = (0, 0);
            let deadline = tokio::time::sleep(Duration::from_secs(60));
            tokio::pin!(deadline);
            // Until its replies are on the relay too (the relay's heads cover them): leaving right
            // after the last reply was made could take it away before automerge sent it.
            while mine < k || got < k || state.their_heads.as_deref() != Some(&d.get_heads()[..]) {
                tokio::select! {
                    frame = ws.next() => {
                        let Some(Ok(Ws::Binary(b))) = frame else { if matches!(frame, Some(Ok(_))) { continue } else { break } };
                        let Ok(WireMessage::Sync { data, document_id, .. }) = WireMessage::decode(&b) else { continue };
                        if document_id != id {
                            continue;
                        }
                        let before = d.get_heads();
                        d.receive_sync_message(&mut state, sync::Message::decode(&data).unwrap()).unwrap();
                        let now = Instant::now();
                        if d.get_heads() != before {
                            let after = d.get_heads();
                            for m in doc::messages_added(&d, &before, &after).unwrap_or_default() {
                                if let (Author::Customer, MessageBody::Text { text }) = (&m.author, &m.body)
                                    && let Some(at) = sent_a.lock().unwrap().remove(text)
                                {
                                    to_agent.lock().unwrap().push(now - at);
                                    got += 1;
                                }
                            }
                        }
                        if let Some(m) = d.generate_sync_message(&mut state)
                            && ws.send(sync_frame(&peer, &id, m)).await.is_err() { break }
                    }
                    _ = tick.tick(), if mine < k => {
                        let text = format!("a{i}-{mine}");
                        let m = Message { id: MessageId(format!("wa{i}-{mine}")), at: Timestamp::now(), author: Author::Crew { agent: agent.clone() }, body: MessageBody::Text { text: text.clone() } };
                        d.transact::<_, _, doc::DocError>(|tx| doc::add_message(tx, &m)).unwrap();
                        sent_a.lock().unwrap().insert(text, Instant::now());
                        mine += 1;
                        if let Some(m) = d.generate_sync_message(&mut state)
                            && ws.send(sync_frame(&peer, &id, m)).await.is_err() { break }
                    }
                    _ = &mut deadline => break,
                }
            }
        }));
    }
    barrier.wait().await;
    let (started, cpu) = (Instant::now(), cpu_seconds(relay_pid));
    for t in tasks {
        let _ = t.await;
    }
    let (elapsed, relay_cpu) = (started.elapsed(), cpu_seconds(relay_pid) - cpu);
    let (mut a, mut b) = (to_agent.lock().unwrap().clone(), to_widget.lock().unwrap().clone());
    a.sort();
    b.sort();
    WidgetResult { to_agent: a, to_widget: b, elapsed, relay_cpu }
}

/// A relay process; with a PostgreSQL URL it is one instance of a deployment sharing that database.
/// The relay binary serving `data` (and `store` when given) on `port`; with `cgroup`, it starts
/// inside that cgroup's `cgroup.procs`, as on a machine of that size: its runtime sizes its worker
/// threads to the group's quota.
fn start_relay_on(data: &Path, store: Option<&str>, port: u16, cgroup: Option<&Path>) -> Server {
    start_relay_in(data, store, port, &[], cgroup)
}

/// The relay binary serving `data` (and `store` when given) on `port`, with `args` after `serve`.
fn start_relay_with(data: &Path, store: Option<&str>, port: u16, args: &[&str]) -> Server {
    start_relay_in(data, store, port, args, None)
}

fn start_relay_in(data: &Path, store: Option<&str>, port: u16, args: &[&str], cgroup: Option<&Path>) -> Server {
    let relay = env!("CARGO_BIN_EXE_sync-server");
    let mut command = match cgroup {
        // The shell joins the group, then becomes the relay (same process id).
        Some(group) => {
            let mut c = Command::new("sh");
            c.args(["-c", "echo $$ > \"$0\" && exec \"$@\""]).arg(group.join("cgroup.procs")).arg(relay);
            c
        }
        None => Command::new(relay),
    };
    if let Some(url) = store {
        command.env("CREWDESK_STORE", url);
    }
    command
        .args(["--data-dir", data.to_str().unwrap(), "serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .env("RUST_LOG", std::env::var("CREWDESK_BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(format!("/tmp/crewdesk-bench-relay-{port}.log"))
                .map_or_else(|_| Stdio::null(), Stdio::from),
        )
        .spawn()
        .map(Server)
        .expect("relay binary")
}

fn start_reference(data: &Path, port: u16) -> Server {
    Command::new("node")
        .arg(interop_dir().join("reference-server.mjs"))
        .args([port.to_string(), data.to_str().unwrap().to_owned()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create("/tmp/crewdesk-reference-server.log").map_or_else(|_| Stdio::null(), Stdio::from))
        .spawn()
        .map(Server)
        .expect("node (run `npm install --prefix tests/interop`)")
}

fn conversation(i: usize, team: &str) -> (ConversationId, Automerge) {
    let id = demo::conversation_id(900_000 + i);
    let now = Timestamp::now();
    let new = NewConversation {
        id: id.clone(),
        team: TeamId::from(team),
        channel: Channel::WebWidget,
        customer: Customer { id: CustomerId(format!("load-{i}")), name: format!("Load {i}"), ..Default::default() },
        created_at: now,
    };
    let mut d = doc::create(ActorId::from(format!("seed{i}").as_bytes()), &new).unwrap();
    let first = Message {
        id: MessageId::from("first"),
        at: now,
        author: Author::Customer,
        body: MessageBody::Text { text: "hello".into() },
    };
    d.transact::<_, _, doc::DocError>(|tx| doc::add_message(tx, &first)).unwrap();
    (id, d)
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(port: u16, token: &str, peer: &str) -> Socket {
    for attempt in 1.. {
        match try_connect(port, token, peer).await {
            Ok(ws) => return ws,
            Err(e) if attempt < 5 => {
                eprintln!("connect {peer}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("connect {peer}: {e}"),
        }
    }
    unreachable!()
}

async fn try_connect(port: u16, token: &str, peer: &str) -> Result<Socket, String> {
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
        format!("ws://127.0.0.1:{port}/?token={token}"),
        // Small buffers (the frames are small; a 128 KiB buffer per read costs the shared CPU) and
        // TCP_NODELAY, as a real client would set.
        Some(
            tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .read_buffer_size(4 * 1024)
                .write_buffer_size(4 * 1024),
        ),
        true,
    )
    .await
    .map_err(|e| e.to_string())?;
    let join = WireMessage::Join {
        sender_id: peer.into(),
        peer_metadata: PeerMetadata::default(),
        supported_protocol_versions: vec!["1".into()],
    };
    ws.send(Ws::Binary(join.encode().into())).await.map_err(|e| e.to_string())?;
    loop {
        match ws.next().await {
            Some(Ok(Ws::Binary(b))) => match WireMessage::decode(&b).map_err(|e| e.to_string())? {
                WireMessage::Peer { .. } => return Ok(ws),
                other => return Err(format!("handshake: {other:?}")),
            },
            Some(Ok(_)) => continue,
            other => return Err(format!("handshake failed: {other:?}")),
        }
    }
}

fn sync_frame(peer: &str, doc_id: &str, m: sync::Message) -> Ws {
    Ws::Binary(
        WireMessage::Sync {
            sender_id: peer.into(),
            target_id: "server".into(),
            document_id: doc_id.into(),
            data: m.encode(),
        }
        .encode()
        .into(),
    )
}

/// Pushes documents into a server through the protocol and waits until it has them.
async fn seed_through_protocol(port: u16, token: &str, docs: &[(ConversationId, Automerge)]) {
    let mut ws = connect(port, token, "seeder").await;
    for (id, d) in docs {
        let mut state = sync::State::new();
        if let Some(m) = d.generate_sync_message(&mut state) {
            ws.send(sync_frame("seeder", id.as_str(), m)).await.unwrap();
        }
        let mut d = d.clone();
        loop {
            let b = match ws.next().await {
                Some(Ok(Ws::Binary(b))) => b,
                Some(Ok(_)) => continue,
                other => panic!("seeding failed: {other:?}"),
            };
            if let WireMessage::Sync { data, .. } = WireMessage::decode(&b).unwrap() {
                d.receive_sync_message(&mut state, sync::Message::decode(&data).unwrap()).unwrap();
            }
            match d.generate_sync_message(&mut state) {
                Some(m) => ws.send(sync_frame("seeder", id.as_str(), m)).await.unwrap(),
                None if state.their_heads.as_deref() == Some(&d.get_heads()[..]) => break,
                None => {}
            }
        }
    }
}

struct LoadResult {
    /// Connections the server closed or reset during the run.
    dropped: usize,
    sent: usize,
    delivered: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// The deliveries whose sender was connected to another instance than the receiver.
    cross_instance: Vec<Duration>,
    /// CPU seconds the load generator itself used during the run (it shares the machine).
    generator_cpu: f64,
}

/// N agents; agent i follows conversation i % M; each sends K messages `every` apart.
async fn load(
    ports: &[u16],
    tokens: &[String],
    docs: &[(ConversationId, Automerge)],
    k: usize,
    every: Duration,
) -> LoadResult {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    // Each run writes with its own actors: a second run on the same server must not reuse them.
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let n = tokens.len();
    let sent_at: Arc<Mutex<HashMap<ChangeHash, (Instant, u16)>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let cross: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let barrier = Arc::new(Barrier::new(n + 1));
    // Agents stay connected until everyone is done: one leaving early could take with it a change
    // the server has not asked for yet.
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let subscribers = |c: usize| (0..n).filter(|i| i % docs.len() == c).count();
    let mut tasks = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let (id, d) = &docs[i % docs.len()];
        let (id, mut d) = (id.clone(), d.clone().with_actor(ActorId::from(format!("run{run}agent{i}").as_bytes())));
        let expected = (subscribers(i % docs.len()) - 1) * k;
        let (token, sent_at, latencies, cross, barrier, done) =
            (token.clone(), sent_at.clone(), latencies.clone(), cross.clone(), barrier.clone(), done.clone());
        // With several instances, agent i connects to instance i % instances: the followers of
        // one conversation are spread over the instances.
        let port = ports[i % ports.len()];
        tasks.push(tokio::spawn(async move {
            let peer = format!("agent{i}");
            let mut ws = connect(port, &token, &peer).await;
            let mut state = sync::State::new();
            if let Some(m) = d.generate_sync_message(&mut state) {
                ws.send(sync_frame(&peer, id.as_str(), m)).await.unwrap();
            }
            // The agent catches up with its conversation (what earlier runs wrote) before the load
            // starts: otherwise the first second measures 1,000 agents connecting and syncing.
            let settled = tokio::time::timeout(Duration::from_secs(30), async {
                while state.their_heads.as_deref() != Some(&d.get_heads()[..]) {
                    let b = match ws.next().await {
                        Some(Ok(Ws::Binary(b))) => b,
                        Some(Ok(_)) => continue,
                        _ => return false,
                    };
                    let Ok(WireMessage::Sync { data, .. }) = WireMessage::decode(&b) else { continue };
                    d.receive_sync_message(&mut state, sync::Message::decode(&data).unwrap()).unwrap();
                    if let Some(m) = d.generate_sync_message(&mut state)
                        && ws.send(sync_frame(&peer, id.as_str(), m)).await.is_err()
                    {
                        return false;
                    }
                }
                true
            })
            .await;
            if settled != Ok(true) {
                eprintln!("{peer} did not catch up with its conversation before the load; it starts anyway");
            }
            barrier.wait().await;
            // Agents start at random offsets within one interval, as real agents do.
            let offset = Duration::from_millis((i as u64 * 7919) % every.as_millis().max(1) as u64);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
            let (mut mine, mut received, mut finished, mut dropped) = (0, 0, false, false);
            let deadline = tokio::time::sleep(Duration::from_secs(60));
            tokio::pin!(deadline);
            let mut check = tokio::time::interval(Duration::from_millis(20));
            while done.load(std::sync::atomic::Ordering::SeqCst) < n {
                if !finished && mine == k && received >= expected {
                    finished = true;
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                tokio::select! {
                    frame = ws.next() => {
                        let b = match frame {
                            Some(Ok(Ws::Binary(b))) => b,
                            Some(Ok(_)) => continue,
                            _ => { dropped = true; break }
                        };
                        let Ok(WireMessage::Sync { data, .. }) = WireMessage::decode(&b) else { continue };
                        let before = d.get_heads();
                        d.receive_sync_message(&mut state, sync::Message::decode(&data).unwrap()).unwrap();
                        let now = Instant::now();
                        for c in d.get_changes(&before) {
                            if c.actor_id() != d.get_actor()
                                && let Some((t, from)) = sent_at.lock().unwrap().get(&c.hash()) {
                                    latencies.lock().unwrap().push(now - *t);
                                    if *from != port {
                                        cross.lock().unwrap().push(now - *t);
                                    }
                                    received += 1;
                                }
                        }
                        if let Some(m) = d.generate_sync_message(&mut state)
                            && ws.send(sync_frame(&peer, id.as_str(), m)).await.is_err() { dropped = true; break }
                    }
                    _ = tick.tick(), if mine < k => {
                        let m = Message { id: MessageId(format!("r{run}a{i}-{mine}")), at: Timestamp::now(), author: Author::Crew { agent: AgentId(format!("agent{i}")) }, body: MessageBody::Text { text: format!("load {i} {mine}") } };
                        d.transact::<_, _, doc::DocError>(|tx| doc::add_message(tx, &m)).unwrap();
                        let hash = d.get_last_local_change().expect("just made").hash();
                        sent_at.lock().unwrap().insert(hash, (Instant::now(), port));
                        mine += 1;
                        if let Some(m) = d.generate_sync_message(&mut state)
                            && ws.send(sync_frame(&peer, id.as_str(), m)).await.is_err() { dropped = true; break }
                    }
                    _ = check.tick() => {}
                    _ = &mut deadline => break,
                }
            }
            if !finished {
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            (mine, received, dropped)
        }));
    }
    barrier.wait().await;
    hostile::LOAD_RUNNING.store(true, std::sync::atomic::Ordering::SeqCst);
    let started = Instant::now();
    let generator_started = cpu_seconds(std::process::id());
    let (mut sent, mut delivered, mut dropped) = (0, 0, 0);
    for t in tasks {
        let (s, r, d) = t.await.unwrap();
        sent += s;
        delivered += r;
        dropped += usize::from(d);
    }
    let elapsed = started.elapsed();
    hostile::LOAD_RUNNING.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort();
    let mut cross_instance = std::mem::take(&mut *cross.lock().unwrap());
    cross_instance.sort();
    let generator_cpu = cpu_seconds(std::process::id()) - generator_started;
    LoadResult { sent, delivered, elapsed, latencies, cross_instance, dropped, generator_cpu }
}

fn pct(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

/// Percentiles from p50 to the maximum, to see where a tail starts.
fn print_latency_shape(v: &[Duration]) {
    let ps = [0.5, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0];
    let shape: Vec<String> = ps.iter().map(|p| format!("p{}: {:.1} ms", p * 100.0, pct(v, *p))).collect();
    println!("  fan-out latency {}", shape.join(", "));
}

fn load_team(n: usize) -> (Team, Vec<String>) {
    let members: Vec<Member> = (0..n)
        .map(|i| Member { agent: AgentId(format!("agent{i}")), name: format!("Agent {i}"), role: Role::Representative })
        .collect();
    let team = Team {
        id: TeamId::from("load"),
        name: "Load".into(),
        mode: TeamMode::Open,
        thresholds: Thresholds::default(),
        members,
        templates: vec![],
        whatsapp_templates: vec![],
        conference_base: None,
    };
    let names = (0..n).map(|i| format!("agent{i}")).collect();
    (team, names)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = env_usize("CREWDESK_LOAD_AGENTS", 1000);
    let m = env_usize("CREWDESK_LOAD_CONVERSATIONS", 100);
    let k = env_usize("CREWDESK_LOAD_MESSAGES", 5);
    let mut docs: Vec<(ConversationId, Automerge)> = (0..m).map(|i| conversation(i, "load")).collect();
    // Agents write only in conversations they have joined: every agent is in its conversation's room
    // from the start, so joining is not part of the measured load.
    for (c, (_, d)) in docs.iter_mut().enumerate() {
        d.transact::<_, _, doc::DocError>(|tx| {
            (c..n).step_by(m).try_for_each(|i| doc::set_in_room(tx, &AgentId(format!("agent{i}")), true))
        })
        .unwrap();
    }
    println!(
        "Crewdesk relay benchmark: {n} agents, {m} conversations, {k} messages per agent, at a saturating and a paced rate"
    );
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |c| c.get()),
        std::env::consts::ARCH
    );

    let saturating = Duration::from_millis(100);
    let paced = Duration::from_millis(env_usize("CREWDESK_LOAD_PACED_MS", 2000) as u64);
    // Scale-out also runs a lighter load (still far above a real desk's), where the machine is not full.
    let light = Duration::from_millis(env_usize("CREWDESK_LOAD_LIGHT_MS", 5000) as u64);
    let (team, names) = load_team(n);
    if std::env::var_os("CREWDESK_BENCH_WIDGETS_ONLY").is_some() {
        widgets(&team, &names, &docs, k, [paced]).await;
        return;
    }
    if std::env::var_os("CREWDESK_BENCH_SCALE_OUT_ONLY").is_some() {
        let base = std::env::var("CREWDESK_BENCH_POSTGRES").expect("CREWDESK_BENCH_POSTGRES");
        scale_out(&base, &team, &names, &docs, k, [saturating, paced, light]).await;
        return;
    }
    let mut rows = Vec::new();

    // Crewdesk relay, as its own process.
    let dir = tempfile::tempdir().unwrap();
    // The conversations start with a customer message, which replicas may not write: they are
    // loaded into the relay's store, as `sync-server seed-demo` does.
    let store = Store::open(dir.path()).unwrap();
    let tokens = seed_store(&store, &team, &names, &docs);
    // The hostile agent of the attack row: a member of the team (so its changes are judged), in
    // no conversation's room, apart from the load's agents.
    let mut with_hostile = team.clone();
    with_hostile.members.push(Member {
        agent: AgentId::from("hostile"),
        name: "Hostile".into(),
        role: Role::Representative,
    });
    store.put_team(&with_hostile).unwrap();
    let hostile_token = store.issue_token(&AgentId::from("hostile"), "load").unwrap();
    drop(store);
    let port = free_port();
    let relay = start_relay_many_addresses(dir.path(), port);
    wait_listening(port).await;
    // Investigating the attack rows alone: `CREWDESK_BENCH_ATTACKS_ONLY` skips the saturating and
    // paced rows (and the reference server).
    let attacks_only = std::env::var_os("CREWDESK_BENCH_ATTACKS_ONLY").is_some();
    for every in [saturating, paced].into_iter().filter(|_| !attacks_only) {
        eprintln!("load on the Crewdesk relay, a message every {every:?} per agent");
        let cpu = cpu_seconds(relay.id());
        let r = load(&[port], &tokens, &docs, k, every).await;
        rows.push(("Crewdesk relay", every, cpu_seconds(relay.id()) - cpu, memory_kib(relay.id()), r));
    }
    // Attacks beside a lighter load (a message every 5 s per agent: the paced load leaves this
    // machine no headroom, so any extra work shows as its tail). First the lighter load alone, then
    // with one more signed-in agent sending 1,000 changes the judge refuses to conversation 0
    // (which ten agents follow), then with 2,000 anonymous connections trickling request bodies
    // (as from 2,000 addresses: the per-address cap is lifted for this relay, so only the body
    // deadline and the total cap act). The attackers run in this process, on the same two cores.
    eprintln!("load on the Crewdesk relay, a message every {light:?} per agent, no attack");
    let cpu = cpu_seconds(relay.id());
    let calm = load(&[port], &tokens, &docs, k, light).await;
    let calm_cpu = cpu_seconds(relay.id()) - cpu;
    let frames = env_usize("CREWDESK_BENCH_HOSTILE_FRAMES", 1000);
    eprintln!(
        "load on the Crewdesk relay, a message every {light:?} per agent, one agent sending {frames} refused changes"
    );
    let attack = tokio::spawn(hostile::hostile(port, hostile_token, docs[0].0.clone(), docs[0].1.clone(), frames));
    let cpu = cpu_seconds(relay.id());
    let r = load(&[port], &tokens, &docs, k, light).await;
    let under_attack = (cpu_seconds(relay.id()) - cpu, r, attack.await.unwrap());
    let slow = env_usize("CREWDESK_BENCH_SLOW_BODIES", 2000);
    eprintln!("load on the Crewdesk relay, a message every {light:?} per agent, {slow} slow request bodies");
    let key = Store::open(dir.path()).unwrap().widget_settings(&team.id).unwrap().expect("the load team's widget").key;
    let attack = tokio::spawn(hostile::slow_bodies(port, key, slow));
    let cpu = cpu_seconds(relay.id());
    let r = load(&[port], &tokens, &docs, k, light).await;
    let under_slow_bodies = (cpu_seconds(relay.id()) - cpu, memory_kib(relay.id()), r, attack.await.unwrap());
    drop(relay);
    let print_attack = || {
        let row = |what: &str, r: &LoadResult, cpu: f64| {
            println!(
                "a message every {} ms per agent, {what}: {} of {} deliveries, p50 {:.1} ms, p99 {:.1} ms (p99 {:.2}x the load alone), relay CPU {:.2} cores",
                light.as_millis(),
                r.delivered,
                r.sent * (n / m - 1),
                pct(&r.latencies, 0.5),
                pct(&r.latencies, 0.99),
                pct(&r.latencies, 0.99) / pct(&calm.latencies, 0.99),
                cpu / r.elapsed.as_secs_f64(),
            );
            print_latency_shape(&r.latencies);
        };
        println!();
        row("no attack", &calm, calm_cpu);
        let (cpu, r, h) = &under_attack;
        row(
            &format!(
                "one agent sending {} refused changes ({} refusals heard before the relay closed it)",
                h.sent, h.refused
            ),
            r,
            *cpu,
        );
        let (cpu, mem, r, (opened, ended)) = &under_slow_bodies;
        row(
            &format!(
                "{slow} slow request bodies at once ({opened} opened in all, {ended} cut off by the relay; relay RSS {} MiB)",
                mem.1 / 1024
            ),
            r,
            *cpu,
        );
    };
    if attacks_only || std::env::var_os("CREWDESK_BENCH_RELAY_ONLY").is_some() {
        // Investigating the relay alone: its rows and the shape of their latency, nothing else.
        for (_, every, cpu, mem, r) in &rows {
            println!(
                "relay, a message every {} ms: {} deliveries, {:.0}/s, relay CPU {:.2} cores, generator {:.2}, RSS {} MiB (peak {} MiB)",
                every.as_millis(),
                r.delivered,
                r.delivered as f64 / r.elapsed.as_secs_f64(),
                cpu / r.elapsed.as_secs_f64(),
                r.generator_cpu / r.elapsed.as_secs_f64(),
                mem.0 / 1024,
                mem.1 / 1024
            );
            print_latency_shape(&r.latencies);
        }
        print_attack();
        return;
    }

    // The reference automerge-repo sync server, same load.
    let ref_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let reference = start_reference(ref_dir.path(), port);
    wait_listening(port).await;
    let anonymous: Vec<String> = (0..n).map(|_| "none".to_owned()).collect();
    eprintln!("seeding the reference server");
    seed_through_protocol(port, "none", &docs).await;
    for every in [saturating, paced] {
        eprintln!("load on the reference server, a message every {every:?} per agent");
        let cpu = cpu_seconds(reference.id());
        let r = load(&[port], &anonymous, &docs, k, every).await;
        rows.push((
            "reference automerge-repo sync server",
            every,
            cpu_seconds(reference.id()) - cpu,
            memory_kib(reference.id()),
            r,
        ));
    }
    drop(reference);

    println!();
    println!(
        "| server | load | sent | fan-out deliveries (complete) | deliveries/s | fan-out p50 | fan-out p99 | server CPU per delivery | server / generator CPU (cores) | RSS (peak) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let per_conversation = n / m;
    for (name, every, cpu, mem, r) in &rows {
        println!(
            "| {name} | a message every {} ms per agent | {} | {} of {}{} | {:.0} | {:.1} ms | {:.1} ms | {:.0} µs | {:.2} / {:.2} | {} MiB ({} MiB) |",
            every.as_millis(),
            r.sent,
            r.delivered,
            r.sent * (per_conversation - 1),
            if r.dropped > 0 { format!(", {} connections dropped by the server", r.dropped) } else { String::new() },
            r.delivered as f64 / r.elapsed.as_secs_f64(),
            pct(&r.latencies, 0.5),
            pct(&r.latencies, 0.99),
            cpu * 1e6 / r.delivered.max(1) as f64,
            cpu / r.elapsed.as_secs_f64(),
            r.generator_cpu / r.elapsed.as_secs_f64(),
            mem.0 / 1024,
            mem.1 / 1024
        );
    }
    let throughput = |r: &LoadResult| r.delivered as f64 / r.elapsed.as_secs_f64();
    println!();
    println!(
        "saturating throughput ratio (Crewdesk / reference): {:.2}x",
        throughput(&rows[0].4) / throughput(&rows[2].4)
    );
    println!("peak memory ratio (Crewdesk / reference): {:.2}", rows[1].3.1 as f64 / rows[3].3.1.max(1) as f64);
    print_attack();

    widgets(&team, &names, &docs, k, [paced]).await;
    catch_up().await;
    stored_versus_active().await;
    match std::env::var("CREWDESK_BENCH_POSTGRES") {
        Ok(base) => scale_out(&base, &team, &names, &docs, k, [saturating, paced, light]).await,
        Err(_) => {
            eprintln!("\nscale-out on PostgreSQL skipped: set CREWDESK_BENCH_POSTGRES (`cargo xtask bench-relay` does)")
        }
    }
}

/// Web-widget customers beside the agents, on a relay of their own (same build): the agents' load
/// alone, then the same load with W widget customers (one per conversation, each with an agent in
/// the room) writing and reading at the same time.
async fn widgets(team: &Team, names: &[String], docs: &[(ConversationId, Automerge)], k: usize, rates: [Duration; 1]) {
    let w = env_usize("CREWDESK_LOAD_WIDGETS", 1000);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let tokens = seed_store(&store, team, names, docs);
    // The customers' conversations go to teams of ten agents (customer i to team i / 10, whose
    // agents are agent 10t to 10t + 9): every agent's desk follows every conversation of its teams,
    // so in one team of 1,000 each customer message would go to 1,000 desks.
    let keys: Vec<String> = (0..w.div_ceil(WIDGET_TEAM))
        .map(|t| {
            let members = (WIDGET_TEAM * t..WIDGET_TEAM * (t + 1))
                .map(|j| Member {
                    agent: AgentId(names[j % names.len()].clone()),
                    name: format!("Agent {j}"),
                    role: Role::Representative,
                })
                .collect();
            let team = Team { id: TeamId(format!("w{t}")), name: format!("Widget {t}"), members, ..team.clone() };
            store.put_team(&team).unwrap();
            store.widget_settings(&team.id).unwrap().expect("the team's widget").key
        })
        .collect();
    drop(store);
    let port = free_port();
    let relay = start_relay_for_widgets(dir.path(), port);
    wait_listening(port).await;
    for every in rates {
        eprintln!("agents alone, a message every {every:?}");
        let cpu = cpu_seconds(relay.id());
        let agents = load(&[port], &tokens, docs, k, every).await;
        let agent_cpu = cpu_seconds(relay.id()) - cpu;
        eprintln!("{w} widget customers with their agents, a message every {every:?} each way");
        let r = widget_load((port, relay.id()), &keys, &tokens, w, k, every).await;
        let widget_cpu = r.relay_cpu;
        let mem = memory_kib(relay.id());
        let deliveries = r.to_agent.len() + r.to_widget.len();
        let per_agent_delivery = agent_cpu * 1e6 / agents.delivered.max(1) as f64;
        // Each message reaches every desk of its team that is connected (a customer's message the
        // ten agents, an agent's reply the nine others and the widget): ten deliveries, of which
        // the rows above time one.
        let per_widget_delivery = widget_cpu * 1e6 / (deliveries * WIDGET_TEAM).max(1) as f64;
        println!();
        println!(
            "| web widget ({w} customers, one per conversation, each with an agent; {k} messages each way, one every {} ms) | count | p50 | p99 |",
            every.as_millis()
        );
        println!("|---|---|---|---|");
        println!(
            "| widget → agent | {} of {} | {:.1} ms | {:.1} ms |",
            r.to_agent.len(),
            w * k,
            pct(&r.to_agent, 0.5),
            pct(&r.to_agent, 0.99)
        );
        println!(
            "| agent → widget | {} of {} | {:.1} ms | {:.1} ms |",
            r.to_widget.len(),
            w * k,
            pct(&r.to_widget, 0.5),
            pct(&r.to_widget, 0.99)
        );
        println!(
            "relay CPU per message {:.0} µs, per delivery {per_widget_delivery:.0} µs (each message reaches the {WIDGET_TEAM} connections of its team: desks and the widget; from when all are in the room); per agent delivery in the agents' run {per_agent_delivery:.0} µs (connecting included) (ratio {:.2}x; target ≤ 2x); {} messages in {:.1} s; relay RSS {} MiB (peak {} MiB)",
            per_widget_delivery * WIDGET_TEAM as f64,
            per_widget_delivery / per_agent_delivery.max(1e-9),
            deliveries,
            r.elapsed.as_secs_f64(),
            mem.0 / 1024,
            mem.1 / 1024
        );
    }
    drop(relay);
}

/// The load team, its conversations (loaded as an import would) and a token per agent.
fn seed_store(store: &Store, team: &Team, names: &[String], docs: &[(ConversationId, Automerge)]) -> Vec<String> {
    store.put_team(team).unwrap();
    let rows: Vec<(String, TeamId, Vec<u8>)> =
        docs.iter().map(|(id, d)| (id.0.clone(), team.id.clone(), d.save())).collect();
    store.import_documents(&rows).unwrap();
    names.iter().map(|a| store.issue_token(&AgentId(a.clone()), "load").unwrap()).collect()
}

/// A replica comes back with 10k offline changes over 100 conversations.
async fn catch_up() {
    let dir = tempfile::tempdir().unwrap();
    let (token, docs) = {
        let store = Store::open(dir.path()).unwrap();
        for t in demo::teams() {
            store.put_team(&t).unwrap();
        }
        let docs: Vec<(ConversationId, Automerge)> = (0..100).map(|i| conversation(i, demo::SALES)).collect();
        let rows: Vec<(String, TeamId, Vec<u8>)> =
            docs.iter().map(|(id, d)| (id.0.clone(), TeamId::from(demo::SALES), d.save())).collect();
        store.import_documents(&rows).unwrap();
        (store.issue_token(&AgentId::from("bob"), "bench").unwrap(), docs)
    };
    let port = free_port();
    let relay = start_relay(dir.path(), port);
    wait_listening(port).await;
    let rdir = tempfile::tempdir().unwrap();
    let replica = Arc::new(Mutex::new(Replica::open(rdir.path().join("r.sqlite3"), AgentId::from("bob")).unwrap()));
    let (events, mut rx) = tokio::sync::mpsc::channel(10_000);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let config = sync_client::ClientConfig::new(format!("http://127.0.0.1:{port}"), token);
    let client = sync_client::SyncClient::spawn(config.clone(), replica.clone(), events.clone());
    let all_there = || docs.iter().all(|(id, _)| replica.lock().unwrap().summary(id).is_some());
    while !all_there() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.shutdown().await;
    // Offline: 100 changes in each of the 100 conversations.
    let now = Timestamp::now();
    {
        let mut r = replica.lock().unwrap();
        for (id, _) in &docs {
            r.join(id, now).unwrap();
            for j in 0..99 {
                r.send(id, MessageBody::Text { text: format!("offline {j}") }, now.plus(j)).unwrap();
            }
        }
        assert_eq!(r.unsynced().unwrap().0, 10_000);
    }
    let started = Instant::now();
    let client = sync_client::SyncClient::spawn(config, replica.clone(), events);
    while replica.lock().unwrap().unsynced().unwrap().0 > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    client.shutdown().await;
    println!();
    println!(
        "offline catch-up: 10,000 changes over 100 conversations durable on the relay in {:.0} ms (reconnect included)",
        took.as_secs_f64() * 1e3
    );
    drop(relay);
}

/// The relay's memory with 10k stored conversations of which 100 are active.
async fn stored_versus_active() {
    let dir = tempfile::tempdir().unwrap();
    let (team, names) = load_team(100);
    let all: Vec<(ConversationId, Automerge)> = (0..10_000).map(|i| conversation(i, "load")).collect();
    let tokens: Vec<String> = {
        let store = Store::open(dir.path()).unwrap();
        store.put_team(&team).unwrap();
        let rows: Vec<(String, TeamId, Vec<u8>)> =
            all.iter().map(|(id, d)| (id.0.clone(), TeamId::from("load"), d.save())).collect();
        store.import_documents(&rows).unwrap();
        names.iter().map(|a| store.issue_token(&AgentId(a.clone()), "load").unwrap()).collect()
    };
    let port = free_port();
    let relay = start_relay(dir.path(), port);
    wait_listening(port).await;
    let idle = memory_kib(relay.id());
    let active: Vec<(ConversationId, Automerge)> = all.into_iter().step_by(100).collect();
    let r = load(&[port], &tokens, &active, 3, Duration::from_millis(100)).await;
    let busy = memory_kib(relay.id());
    println!(
        "10,000 stored conversations, 100 active ({} messages): relay RSS {} MiB idle, {} MiB under load (peak {} MiB)",
        r.sent,
        idle.0 / 1024,
        busy.0 / 1024,
        busy.1 / 1024
    );
    drop(relay);
}
