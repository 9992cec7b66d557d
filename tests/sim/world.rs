//! One simulated world: agents' replicas (real `Replica` on in-memory SQLite, real
//! `ClientSession`), the relay's real per-document core (`RelayDoc`) with storage in memory, and
//! connections as two FIFO queues each. A seeded scheduler picks every step: an agent's action
//! through the desk's own commands, a frame delivered, a commit finishing, a fan-out firing, a
//! connection dropped or made, the relay crashing (what was not committed is lost). Time is
//! virtual. After the chaos the network heals and the world must settle with every invariant.

use automerge::{Automerge, ChangeHash};
use crewdesk::domain::{
    AgentId, Author, Channel, ConversationId, Customer, CustomerId, Member, Message, MessageBody, MessageId, Role,
    Team, TeamId, TeamMode, Thresholds, Timestamp,
};
use crewdesk::replica::conversation::ChangeAuthor;
use crewdesk::replica::{Replica, doc};
use crewdesk::sync::bounded::{self, SyncLimits};
use crewdesk::sync::relay_doc::{Action, Claim, ConnId, Incoming, RelayDoc, WaitingBudget};
use crewdesk::sync::session::{ClientSession, SessionEvent};
use crewdesk::sync::wire::{PeerMetadata, WireMessage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// A conversation as the relay's disk has it: id, heads, header, messages.
type OnDisk = (String, Vec<ChangeHash>, Result<doc::DocHeader, doc::DocError>, Vec<Message>);

/// A protocol bug put in on purpose, to show that the simulator catches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// The relay tells its peers of a change before the change is durable.
    AdvertiseBeforeCommit,
    /// The relay drops changes whose dependencies have not arrived (instead of keeping them until
    /// they do): what the relay did before the stall was found.
    DropWaitingChanges,
    /// The relay lets automerge take a replica's heads for heads it told the replica: the cause
    /// of the stall (a replica never hears that its change was stored).
    Stall,
}

const RELAY_PEER: &str = "relay";
const TEAM: &str = "sales";
/// Virtual time starts here (2026-05-28), one step is 50 ms to 2 s.
const T0: i64 = 1_780_000_000_000;

struct Agent {
    id: AgentId,
    replica: Replica,
    session: Option<(ConnId, ClientSession)>,
    /// Messages this agent wrote through the desk's commands.
    written: Vec<(ConversationId, MessageId)>,
    /// Refusals the relay reported to this agent.
    refused: Vec<String>,
}

struct Link {
    agent: usize,
    to_relay: VecDeque<WireMessage>,
    to_client: VecDeque<WireMessage>,
    /// What its changes waiting for dependencies hold, across documents.
    waiting: WaitingBudget,
}

struct Entry {
    loaded: bool,
    core: RelayDoc,
}

/// What the relay has on disk (it survives a crash).
#[derive(Default)]
struct Disk {
    docs: BTreeMap<String, (TeamId, Automerge)>,
    /// Which agent each actor is bound to.
    actors: HashMap<String, AgentId>,
    /// Grab requests in the order the relay logged them, per conversation.
    grabs: BTreeMap<String, Vec<AgentId>>,
}

pub struct World {
    /// Every frame goes into the trace (for one seed, not for thousands).
    pub verbose: bool,
    /// This world's admin may switch the team between open and grab mode while agents are offline
    /// (one seed in four): changes made before an agent heard of it are then refused, taken back,
    /// and their messages sent again or shown as not delivered.
    rule_changes: bool,
    /// The rules did change during the run.
    rules_changed: bool,
    seed: u64,
    bug: Option<Bug>,
    rng: StdRng,
    now: i64,
    team: Team,
    agents: Vec<Agent>,
    docs: BTreeMap<String, Entry>,
    disk: Disk,
    /// Commits in progress, in the order the group commit takes them.
    commits: VecDeque<(String, u64, TeamId, Vec<u8>)>,
    /// Commits made durable ahead of a relay change, whose callers hear so at the next finish.
    commit_answered: Vec<(String, u64)>,
    fanouts: BTreeSet<String>,
    links: BTreeMap<ConnId, Link>,
    next_conn: ConnId,
    relay_actor: automerge::ActorId,
    pub trace: Vec<String>,
    pub violations: Vec<String>,
}

impl World {
    pub fn new(seed: u64, bug: Option<Bug>) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let mode = if rng.random_bool(0.3) { TeamMode::Grab } else { TeamMode::Open };
        let count = rng.random_range(2..=4);
        let members: Vec<Member> = (0..count)
            .map(|i| Member {
                agent: AgentId(format!("agent{i}")),
                name: format!("Agent {i}"),
                role: if i == 0 { Role::Admin } else { Role::Representative },
            })
            .collect();
        let team = Team {
            id: TeamId(TEAM.into()),
            name: "Sales".into(),
            mode,
            thresholds: Thresholds::default(),
            members: members.clone(),
            templates: Vec::new(),
            whatsapp_templates: Vec::new(),
            conference_base: None,
        };
        let agents = members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut replica =
                    Replica::open_seeded(":memory:", m.agent.clone(), seed.wrapping_mul(31).wrapping_add(i as u64))
                        .expect("replica");
                replica.put_team(team.clone()).expect("team");
                Agent { id: m.agent.clone(), replica, session: None, written: Vec::new(), refused: Vec::new() }
            })
            .collect();
        let mut relay_actor = [0u8; 16];
        rng.fill(&mut relay_actor);
        let mut w = World {
            verbose: false,
            rule_changes: seed % 4 == 3,
            rules_changed: false,
            seed,
            bug,
            rng,
            now: T0,
            team,
            agents,
            docs: BTreeMap::new(),
            disk: Disk::default(),
            commits: VecDeque::new(),
            commit_answered: Vec::new(),
            fanouts: BTreeSet::new(),
            links: BTreeMap::new(),
            next_conn: 1,
            relay_actor: automerge::ActorId::from(&relay_actor[..]),
            trace: Vec::new(),
            violations: Vec::new(),
        };
        w.disk.actors.insert(w.relay_actor.to_hex_string(), AgentId("(relay)".into()));
        for _ in 0..w.rng.random_range(1..=3) {
            w.customer_starts();
        }
        w
    }

    fn at(&self) -> Timestamp {
        Timestamp(self.now)
    }

    fn note(&mut self, what: String) {
        self.trace.push(format!("[{:>6}] {what}", (self.now - T0) / 1000));
    }

    fn violation(&mut self, what: String) {
        self.note(format!("VIOLATION: {what}"));
        self.violations.push(what);
    }

    /// Runs `steps` random steps, then heals the network and checks every invariant.
    pub fn run(&mut self, steps: usize) {
        for _ in 0..steps {
            self.now += self.rng.random_range(50..2000);
            self.step();
            if !self.violations.is_empty() {
                return;
            }
        }
        self.heal();
        if self.violations.is_empty() {
            self.check();
        }
    }

    fn step(&mut self) {
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=29 => self.agent_acts(),
            30..=64 => self.deliver_one(),
            65..=74 => self.finish_commits(),
            75..=79 => self.fire_fanout(),
            80..=86 => {
                let i = self.rng.random_range(0..self.agents.len());
                if self.agents[i].session.is_some() {
                    self.disconnect(i);
                } else {
                    self.connect(i);
                }
            }
            87..=90 => self.customer_writes(),
            91..=92 => self.customer_starts(),
            93 => self.crash_relay(),
            94 if self.rule_changes => self.switch_mode(),
            _ => self.deliver_one(),
        }
    }

    // ---- agents -----------------------------------------------------------------------------------

    fn agent_acts(&mut self) {
        let i = self.rng.random_range(0..self.agents.len());
        let at = self.at();
        let ids = self.agents[i].replica.document_ids().unwrap_or_default();
        let ids: Vec<ConversationId> =
            ids.into_iter().filter(|id| self.agents[i].replica.summary(id).is_some()).collect();
        if ids.is_empty() {
            return;
        }
        let id = ids[self.rng.random_range(0..ids.len())].clone();
        let roll = self.rng.random_range(0..100);
        let agent = &mut self.agents[i];
        let (what, result) = match roll {
            0..=24 => ("join", agent.replica.join(&id, at).map(|_| ())),
            25..=76 => {
                let text = format!("reply {} from {}", self.now, agent.id);
                let sent = agent.replica.send(&id, MessageBody::Text { text }, at);
                if let Ok(m) = &sent {
                    agent.written.push((id.clone(), m.clone()));
                }
                ("send", sent.map(|_| ()))
            }
            77..=79 => {
                // ↪ to a colleague the desk offers (or, when it offers none, anyone of the team,
                // which the desk refuses).
                let offered = agent
                    .replica
                    .summary(&id)
                    .map_or_else(Vec::new, |s| crewdesk::domain::access::transfer_candidates(&self.team, &agent.id, s));
                let to = match offered.is_empty() {
                    false => offered[self.rng.random_range(0..offered.len())].clone(),
                    true => self.team.members[self.rng.random_range(0..self.team.members.len())].agent.clone(),
                };
                ("transfer", agent.replica.transfer(&id, &to, at).map(|_| ()))
            }
            80..=87 => ("leave", agent.replica.leave(&id)),
            88..=91 => {
                let edit =
                    crewdesk::domain::CustomerEdit { notes: Some(format!("note {}", self.now)), ..Default::default() };
                ("edit the customer", agent.replica.edit_customer(&id, &edit))
            }
            92..=96 => ("grab", agent.replica.grab(&id, at)),
            _ => ("close", agent.replica.close(&id, at)),
        };
        let ok = result.is_ok();
        let name = self.agents[i].id.clone();
        self.note(format!("{name} {what} {} -> {}", short(&id.0), if ok { "ok" } else { "not allowed" }));
        if ok {
            self.offer(i, &id);
        }
    }

    /// What the desktop's sync driver does after a local change: offer it if connected.
    fn offer(&mut self, i: usize, id: &ConversationId) {
        let agent = &mut self.agents[i];
        let Some((conn, session)) = agent.session.as_mut() else { return };
        let conn = *conn;
        match session.offer(&mut agent.replica, id) {
            Ok(Some(m)) => self.send_up(conn, m),
            Ok(None) => {}
            Err(e) => {
                let what = format!("{} cannot offer {}: {e}", agent.id, id.0);
                self.violation(what)
            }
        }
    }

    /// The admin switches the team between open and grab mode (the relay knows at once; agents
    /// hear of it when they next connect, as `/api/me` tells them).
    fn switch_mode(&mut self) {
        self.team.mode = if self.team.mode == TeamMode::Open { TeamMode::Grab } else { TeamMode::Open };
        self.rules_changed = true;
        let mode = self.team.mode;
        self.note(format!("admin switches the team to {mode:?} mode"));
    }

    fn connect(&mut self, i: usize) {
        let conn = self.next_conn;
        self.next_conn += 1;
        let mut session = ClientSession::new(format!("peer-{}-{conn}", self.agents[i].id));
        self.links.insert(
            conn,
            Link { agent: i, to_relay: VecDeque::new(), to_client: VecDeque::new(), waiting: WaitingBudget::new() },
        );
        let peer = WireMessage::Peer {
            sender_id: RELAY_PEER.into(),
            target_id: String::new(),
            peer_metadata: PeerMetadata { storage_id: Some("disk".into()), is_ephemeral: false },
            selected_protocol_version: "1".into(),
        };
        let agent = &mut self.agents[i];
        if let Err(e) = agent.replica.put_team(self.team.clone()) {
            self.violation(format!("the team does not store: {e}"));
            return;
        }
        if let Err(e) = session.receive(&mut agent.replica, peer) {
            self.violation(format!("handshake: {e}"));
            return;
        }
        // The relay lists the conversations of the agent's teams (`/api/me`).
        let listed: Vec<ConversationId> = self.disk.docs.keys().map(|k| ConversationId(k.clone())).collect();
        let first = session.start(&mut agent.replica, &listed);
        agent.session = Some((conn, session));
        let name = agent.id.clone();
        self.note(format!("{name} connects (conn {conn})"));
        match first {
            Ok(messages) => messages.into_iter().for_each(|m| self.send_up(conn, m)),
            Err(e) => self.violation(format!("{name} cannot start syncing: {e}")),
        }
    }

    fn disconnect(&mut self, i: usize) {
        let Some((conn, _)) = self.agents[i].session.take() else { return };
        self.links.remove(&conn);
        for e in self.docs.values_mut() {
            e.core.disconnect(conn);
        }
        let name = self.agents[i].id.clone();
        self.note(format!("{name} disconnects (conn {conn})"));
    }

    // ---- the network ---------------------------------------------------------------------------

    fn send_up(&mut self, conn: ConnId, m: WireMessage) {
        if let Some(link) = self.links.get_mut(&conn) {
            link.to_relay.push_back(m);
        }
    }

    fn deliver_one(&mut self) {
        let busy: Vec<(ConnId, bool)> = self
            .links
            .iter()
            .flat_map(|(c, l)| {
                let a = (!l.to_relay.is_empty()).then_some((*c, true));
                let b = (!l.to_client.is_empty()).then_some((*c, false));
                a.into_iter().chain(b)
            })
            .collect();
        if busy.is_empty() {
            return;
        }
        let (conn, up) = busy[self.rng.random_range(0..busy.len())];
        self.deliver(conn, up);
    }

    fn deliver(&mut self, conn: ConnId, up: bool) {
        let Some(link) = self.links.get_mut(&conn) else { return };
        let agent = link.agent;
        if up {
            let Some(m) = link.to_relay.pop_front() else { return };
            if self.verbose {
                self.note(format!("conn {conn} -> relay: {}", describe(&m)));
            }
            self.relay_receives(conn, agent, m);
        } else {
            let Some(m) = link.to_client.pop_front() else { return };
            if self.verbose {
                self.note(format!("relay -> conn {conn}: {}", describe(&m)));
            }
            self.client_receives(conn, agent, m);
        }
    }

    fn client_receives(&mut self, conn: ConnId, i: usize, m: WireMessage) {
        let agent = &mut self.agents[i];
        let Some((_, session)) = agent.session.as_mut() else { return };
        let doc_id = match &m {
            WireMessage::Sync { document_id, .. } => Some(document_id.clone()),
            _ => None,
        };
        let received = session.receive(&mut agent.replica, m);
        let name = agent.id.clone();
        match received {
            Ok((out, events)) => {
                for e in events {
                    if let SessionEvent::RelayError(message) = e {
                        self.note(format!("{name} hears: {message}"));
                        self.agents[i].refused.push(message);
                    }
                }
                for m in out {
                    self.send_up(conn, m);
                }
            }
            Err(e) => self.violation(format!("{name}'s replica failed on a frame: {e}")),
        }
        if let Some(doc_id) = doc_id {
            self.check_synced_is_durable(i, &ConversationId(doc_id));
        }
    }

    /// Every change a replica counts as synced is on the relay's disk.
    fn check_synced_is_durable(&mut self, i: usize, id: &ConversationId) {
        let agent = &mut self.agents[i];
        let Ok((_, unsynced)) = agent.replica.unsynced() else { return };
        if unsynced.contains(id) {
            return;
        }
        let heads = agent.replica.heads(id).unwrap_or_default();
        let name = agent.id.clone();
        let Some((_, disk)) = self.disk.docs.get(&id.0) else {
            if !heads.is_empty() {
                self.violation(format!("{name} counts {} as synced; the relay never stored it", short(&id.0)));
            }
            return;
        };
        let missing = heads.iter().filter(|h| !crewdesk::replica::conversation::has_change(disk, h)).count();
        if missing > 0 {
            self.violation(format!(
                "{name} counts {} as synced but {missing} of its heads are not on the relay's disk",
                short(&id.0)
            ));
        }
    }

    // ---- the relay ---------------------------------------------------------------------------------

    fn entry(&mut self, doc_id: &str) -> &mut Entry {
        let relay_actor = self.relay_actor.clone();
        let stall = self.bug == Some(Bug::Stall);
        let e = self.docs.entry(doc_id.to_owned()).or_insert_with(|| {
            let core = RelayDoc::new(doc_id, RELAY_PEER, relay_actor);
            Entry { loaded: false, core: if stall { core.with_stall_bug() } else { core } }
        });
        if !e.loaded && !e.core.is_stored() {
            e.loaded = true;
            if let Some((team, d)) = self.disk.docs.get(doc_id) {
                e.core.load(d.clone(), team.clone());
                // A grab asked for before a crash is decided when the conversation is read again.
                self.decide_grab(doc_id);
            }
        }
        let e = self.docs.get_mut(doc_id).expect("inserted above");
        e.loaded = true;
        e
    }

    fn relay_receives(&mut self, conn: ConnId, i: usize, m: WireMessage) {
        let (document_id, data, is_request) = match m {
            WireMessage::Sync { document_id, data, .. } => (document_id, data, false),
            WireMessage::Request { document_id, data, .. } => (document_id, data, true),
            _ => return,
        };
        let peer_id = format!("peer-{}-{conn}", self.agents[i].id);
        let checked = match bounded::check_sync_message(&data, &SyncLimits::CLIENT) {
            Ok(c) => c,
            Err(e) => return self.violation(format!("an honest sync message was over a limit: {e}")),
        };
        let message = automerge::sync::Message::decode(&data).expect("checked");
        let changes: Vec<automerge::Change> =
            checked.changes.iter().map(|c| automerge::Change::try_from(c.as_slice()).expect("checked")).collect();
        let agent = self.agents[i].id.clone();
        let role = self.team.member(&agent).map(|m| m.role);
        let mode = self.team.mode;
        let members = std::sync::Arc::new(self.team.members.clone());
        let foreign_actors = self.bind_actors(&agent, &changes);
        let now = self.at();
        let drop_waiting = self.bug == Some(Bug::DropWaitingChanges);
        let waiting = self.links.get(&conn).map(|l| l.waiting.clone()).unwrap_or_default();
        let peer_id = peer_id.as_str();
        let e = self.entry(&document_id);
        if drop_waiting {
            e.core.forget_waiting_changes();
        }
        let claim = match e.core.team() {
            Some(t) => Claim::Team(t.clone()),
            None if changes.is_empty() => Claim::Empty,
            None => e.core.claim(conn, &changes),
        };
        let author = |team: TeamId, role: Role, mode: TeamMode| ChangeAuthor {
            agent: agent.clone(),
            team,
            role,
            mode,
            foreign_actors: foreign_actors.clone(),
            members: members.clone(),
        };
        let actions = match (claim, role) {
            (_, None) => e.core.unavailable(conn, peer_id),
            (Claim::Team(team), Some(role)) => {
                let a = author(team, role, mode);
                e.core.receive(
                    Incoming { conn, peer_id, message, changes, is_request, author: Some(&a), waiting: &waiting },
                    now,
                )
            }
            (Claim::Empty, Some(_)) => {
                let a = author(TeamId::default(), Role::Representative, TeamMode::Open);
                e.core.receive(
                    Incoming { conn, peer_id, message, changes, is_request, author: Some(&a), waiting: &waiting },
                    now,
                )
            }
            (Claim::NotConversation, _) => e.core.unavailable(conn, peer_id),
            (Claim::Unreadable(why), _) => e.core.refuse_creation(conn, peer_id, &why),
        };
        if drop_waiting {
            self.docs.get_mut(&document_id).expect("entry").core.forget_waiting_changes();
        }
        self.perform(&document_id, actions);
    }

    fn bind_actors(&mut self, agent: &AgentId, changes: &[automerge::Change]) -> Vec<automerge::ActorId> {
        let mut foreign = Vec::new();
        for c in changes {
            let owner = self.disk.actors.entry(c.actor_id().to_hex_string()).or_insert_with(|| agent.clone());
            if owner != agent && !foreign.contains(c.actor_id()) {
                foreign.push(c.actor_id().clone());
            }
        }
        foreign
    }

    /// What the relay's IO shell does with the core's actions.
    fn perform(&mut self, doc_id: &str, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Send(conn, m) => match self.links.get_mut(&conn) {
                    Some(link) => link.to_client.push_back(m),
                    None => self.entry(doc_id).core.disconnect(conn),
                },
                Action::Commit { ticket, team, chunk, .. } => {
                    self.commits.push_back((doc_id.to_owned(), ticket, team, chunk));
                    if self.bug == Some(Bug::AdvertiseBeforeCommit) {
                        queue.extend(self.entry(doc_id).core.committed(ticket, Ok(())));
                    }
                }
                Action::ScheduleFanout => {
                    self.fanouts.insert(doc_id.to_owned());
                }
                Action::Reload => self.entry(doc_id).loaded = false,
                Action::Created { team } => {
                    let followers: Vec<(ConnId, String)> = self
                        .links
                        .iter()
                        .filter(|(_, l)| self.team.member(&self.agents[l.agent].id).is_some())
                        .map(|(c, l)| (*c, format!("peer-{}-{c}", self.agents[l.agent].id)))
                        .collect();
                    let _ = team;
                    let e = self.entry(doc_id);
                    for (conn, peer) in followers {
                        e.core.follow(conn, &peer);
                    }
                    self.decide_grab(doc_id);
                    queue.extend(self.entry(doc_id).core.advertise());
                }
                Action::Stored { .. } => self.decide_grab(doc_id),
                Action::Missing | Action::Refused(_) => {}
            }
        }
    }

    /// The relay's grab decision: the first request it logged wins, written and stored at once.
    fn decide_grab(&mut self, doc_id: &str) {
        if self.team.mode != TeamMode::Grab {
            return;
        }
        let Some(Ok(header)) = self.entry(doc_id).core.header() else { return };
        if header.owner.is_some() || header.grab_requests.is_empty() {
            return;
        }
        let mut requests = header.grab_requests;
        requests.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        let log = self.disk.grabs.entry(doc_id.to_owned()).or_default();
        for (a, _) in requests {
            if !log.contains(&a) {
                log.push(a);
            }
        }
        let order = log.clone();
        let Some(winner) = crewdesk::domain::access::decide_grab(None, &self.team, &order).cloned() else { return };
        let chunk = match self.entry(doc_id).core.relay_change(|tx| doc::record_owner(tx, &winner)) {
            Ok(c) => c,
            Err(e) => return self.violation(format!("the relay cannot record the grab winner: {e}")),
        };
        self.commit_now(doc_id, chunk);
        self.note(format!("relay: {winner} wins the grab of {}", short(doc_id)));
    }

    fn write_disk(&mut self, doc_id: &str, chunk: &[u8]) {
        let team = self.team.id.clone();
        let (_, d) = self.disk.docs.entry(doc_id.to_owned()).or_insert_with(|| (team, Automerge::new()));
        if let Err(e) = d.load_incremental(chunk) {
            self.violation(format!("a committed chunk does not load: {e}"));
        }
    }

    /// A change the relay makes itself: queued behind the commits in progress (the group commit
    /// keeps their order) and awaited, as the relay does while it holds the document.
    fn commit_now(&mut self, doc_id: &str, chunk: Vec<u8>) {
        self.commits.push_back((doc_id.to_owned(), 0, self.team.id.clone(), chunk));
        while let Some((doc_id, ticket, _, chunk)) = self.commits.pop_front() {
            self.write_disk(&doc_id, &chunk);
            if ticket == 0 {
                return;
            }
            self.commit_answered.push((doc_id, ticket));
        }
    }

    /// The group commit finishes: every chunk waiting is durable, and each caller hears so.
    fn finish_commits(&mut self) {
        for (doc_id, ticket) in std::mem::take(&mut self.commit_answered) {
            self.answer_commit(&doc_id, ticket);
        }
        let n = self.rng.random_range(1..=self.commits.len().max(1));
        for _ in 0..n {
            let Some((doc_id, ticket, _, chunk)) = self.commits.pop_front() else { return };
            self.write_disk(&doc_id, &chunk);
            self.answer_commit(&doc_id, ticket);
        }
    }

    fn answer_commit(&mut self, doc_id: &str, ticket: u64) {
        if self.bug != Some(Bug::AdvertiseBeforeCommit) {
            let actions = self.entry(doc_id).core.committed(ticket, Ok(()));
            self.perform(doc_id, actions);
        }
    }

    fn fire_fanout(&mut self) {
        let Some(doc_id) = self.fanouts.pop_first() else { return };
        let actions = self.entry(&doc_id).core.fanout();
        self.perform(&doc_id, actions);
    }

    /// The relay process dies: memory, connections and commits in progress are gone; the disk
    /// stays. It is back at once (agents reconnect by themselves).
    fn crash_relay(&mut self) {
        self.note(format!("relay crashes ({} commits lost)", self.commits.len()));
        self.docs.clear();
        self.commits.clear();
        self.commit_answered.clear();
        self.fanouts.clear();
        self.links.clear();
        for a in &mut self.agents {
            a.session = None;
        }
    }

    /// A customer starts a conversation (a channel gateway on the relay creates and stores it).
    fn customer_starts(&mut self) {
        let mut bytes = [0u8; 16];
        self.rng.fill(&mut bytes);
        let id = crewdesk::sync::document_id::encode(&bytes);
        let new = doc::NewConversation {
            id: ConversationId(id.clone()),
            team: self.team.id.clone(),
            channel: Channel::WebWidget,
            customer: Customer {
                id: CustomerId(format!("cust-{}", short(&id))),
                name: "Customer".into(),
                email: None,
                phone: None,
                notes: None,
            },
            created_at: self.at(),
        };
        let first = self.customer_message();
        let mut d = doc::create(self.relay_actor.clone(), &new).expect("create");
        d.transact::<_, _, doc::DocError>(|tx| doc::add_message(tx, &first)).expect("first message");
        let chunk = d.save();
        self.write_disk(&id, &chunk);
        let followers: Vec<(ConnId, String)> =
            self.links.iter().map(|(c, l)| (*c, format!("peer-{}-{c}", self.agents[l.agent].id))).collect();
        let e = self.entry(&id);
        for (conn, peer) in followers {
            e.core.follow(conn, &peer);
        }
        let actions = e.core.advertise();
        self.note(format!("customer starts {}", short(&id)));
        self.perform(&id, actions);
    }

    fn customer_message(&mut self) -> Message {
        let mut id = [0u8; 8];
        self.rng.fill(&mut id);
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        Message {
            id: MessageId(id),
            at: self.at(),
            author: Author::Customer,
            body: MessageBody::Text { text: format!("customer at {}", self.now) },
        }
    }

    /// A customer writes in a conversation (the relay writes it, stores it, tells the followers).
    fn customer_writes(&mut self) {
        let ids: Vec<String> = self.disk.docs.keys().cloned().collect();
        if ids.is_empty() {
            return;
        }
        let id = ids[self.rng.random_range(0..ids.len())].clone();
        let m = self.customer_message();
        let chunk = match self.entry(&id).core.relay_change(|tx| doc::add_message(tx, &m)) {
            Ok(c) => c,
            Err(e) => return self.violation(format!("the relay cannot write a customer message: {e}")),
        };
        self.commit_now(&id, chunk);
        let actions = self.entry(&id).core.advertise();
        self.note(format!("customer writes in {}", short(&id)));
        self.perform(&id, actions);
    }

    // ---- healing and invariants --------------------------------------------------------------------

    /// Every agent online, every frame delivered, every commit and fan-out done, until nothing
    /// moves. A world that keeps moving is a sync that never settles.
    fn heal(&mut self) {
        self.note("the network heals".into());
        for i in 0..self.agents.len() {
            if self.agents[i].session.is_none() {
                self.connect(i);
            }
        }
        for round in 0.. {
            if round > 20_000 {
                return self.violation("the sync never settles (20,000 rounds after healing)".into());
            }
            self.now += 10;
            let busy: Option<(ConnId, bool)> = self.links.iter().find_map(|(c, l)| {
                if !l.to_client.is_empty() {
                    Some((*c, false))
                } else if !l.to_relay.is_empty() {
                    Some((*c, true))
                } else {
                    None
                }
            });
            if let Some((conn, up)) = busy {
                self.deliver(conn, up);
            } else if !self.commits.is_empty() || !self.commit_answered.is_empty() {
                self.finish_commits();
            } else if !self.fanouts.is_empty() {
                self.fire_fanout();
            } else {
                return;
            }
            if !self.violations.is_empty() {
                return;
            }
        }
    }

    fn check(&mut self) {
        let disk: Vec<OnDisk> = self
            .disk
            .docs
            .iter()
            .map(|(id, (_, d))| {
                (id.clone(), d.get_heads(), doc::read_header(d), doc::all_messages(d).unwrap_or_default())
            })
            .collect();
        let mut found = Vec::new();
        for (id, heads, header, messages) in &disk {
            let cid = ConversationId(id.clone());
            match header {
                Ok(h) if self.team.mode == TeamMode::Grab && !h.grab_requests.is_empty() && h.owner.is_none() => {
                    found.push(format!("{} has grab requests and no owner", short(id)));
                }
                Ok(_) => {}
                Err(e) => found.push(format!("{} does not read on the relay: {e}", short(id))),
            }
            let on_disk: BTreeSet<&MessageId> = messages.iter().map(|m| &m.id).collect();
            for a in &mut self.agents {
                let mine = a.replica.heads(&cid).unwrap_or_default();
                if sorted(&mine) != sorted(heads) {
                    found.push(format!("{}'s copy of {} differs from the relay's", a.id, short(id)));
                    continue;
                }
                let rows = a.replica.stored_messages(&cid).unwrap_or_default();
                let row_ids: Vec<&MessageId> = rows.iter().map(|m| &m.id).collect();
                let unique: BTreeSet<&MessageId> = row_ids.iter().copied().collect();
                if unique.len() != row_ids.len() {
                    found.push(format!("{}'s index lists a message of {} twice", a.id, short(id)));
                }
                if unique != on_disk {
                    found.push(format!("{}'s index of {} differs from the document", a.id, short(id)));
                }
            }
        }
        for a in &self.agents {
            match a.replica.unsynced() {
                Ok((0, _)) => {}
                Ok((n, ids)) => found.push(format!(
                    "{} still has {n} unsynced changes ({})",
                    a.id,
                    ids.iter().map(|i| short(&i.0)).collect::<Vec<_>>().join(", ")
                )),
                Err(e) => found.push(format!("{}: {e}", a.id)),
            }
            for (cid, m) in &a.written {
                let kept = disk.iter().any(|(id, _, _, ms)| *id == cid.0 && ms.iter().any(|x| x.id == *m));
                let undelivered = a.replica.undelivered(cid).unwrap_or_default();
                let shown = undelivered.iter().find(|u| u.message.id == *m).map(|u| u.state.clone());
                match (kept, shown.as_deref()) {
                    (true, None) | (false, Some("failed")) => {}
                    (false, None) => found.push(format!("{}'s message {} in {} was lost", a.id, m.0, short(&cid.0))),
                    (true, Some(state)) => found.push(format!(
                        "{}'s message {} in {} was delivered and is also shown as not delivered ({state})",
                        a.id,
                        m.0,
                        short(&cid.0)
                    )),
                    (false, Some(state)) => found.push(format!(
                        "{}'s message {} in {} still waits to be sent again ({state})",
                        a.id,
                        m.0,
                        short(&cid.0)
                    )),
                }
            }
            // Without a change of the rules, nothing made through the desk's commands is refused.
            if !self.rules_changed {
                for r in &a.refused {
                    found.push(format!("{} was refused something made through the desk's commands: {r}", a.id));
                }
            }
        }
        for f in found {
            self.violation(f);
        }
    }

    pub fn report(&self) -> String {
        let tail: Vec<&String> = self.trace.iter().rev().take(60).collect();
        let mut out = format!(
            "seed {} ({} team, {} agents) broke: {:?}\nlast steps:\n",
            self.seed,
            if self.team.mode == TeamMode::Grab { "grab-mode" } else { "open-mode" },
            self.agents.len(),
            self.violations
        );
        for line in tail.into_iter().rev() {
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}

fn describe(m: &WireMessage) -> String {
    match m {
        WireMessage::Sync { document_id, data, .. } | WireMessage::Request { document_id, data, .. } => {
            match automerge::sync::Message::decode(data) {
                Ok(s) => format!(
                    "sync {} heads {:?} need {} have {} changes {}",
                    short(document_id),
                    s.heads.iter().map(|h| h.to_string()[..6].to_owned()).collect::<Vec<_>>(),
                    s.need.len(),
                    s.have.len(),
                    s.changes.len()
                ),
                Err(_) => format!("sync {} (undecodable)", short(document_id)),
            }
        }
        WireMessage::Error { message, .. } => format!("error {message}"),
        WireMessage::DocUnavailable { document_id, .. } => format!("unavailable {}", short(document_id)),
        other => format!("{other:?}").chars().take(60).collect(),
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(6)]
}

fn sorted(h: &[ChangeHash]) -> Vec<ChangeHash> {
    let mut v = h.to_vec();
    v.sort();
    v
}
