//! The bodies of the fuzz targets, shared by the fuzz binaries (`fuzz/fuzz_targets/*.rs`, one
//! line each) and the main crate's regression test (`tests/fuzz_regressions.rs`), which runs every
//! committed corpus and regression input through them. A panic here is a finding: the assertions
//! state what must hold for any input a client can send.
//!
//! - [`wire_frame`]: a WebSocket frame through `WireMessage::decode`, and back.
//! - [`sync_message`]: a client's sync message through the relay's chain (bounded check, automerge's
//!   parser, the judge, then the relay's taking of the rest of the message and automerge's sync
//!   protocol) against a loaded conversation.
//! - [`judge_sequence`]: changes made by three actors with the document functions and raw automerge
//!   operations, delivered in any order to the judge.
//! - [`message_body`]: a message as JSON, its validation, and file references.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use arbitrary::{Arbitrary, Unstructured};
use automerge::sync::{self, SyncDoc};
use automerge::transaction::{Transactable, Transaction};
use automerge::{ActorId, Automerge, Change, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue};
use crewdesk::domain::attachment::{self, BlobHash};
use crewdesk::domain::{
    AgentId, Author, Channel, Customer, CustomerEdit, CustomerId, Member, Message, MessageBody, MessageId, Role,
    TeamMode, Timestamp,
};
use crewdesk::replica::conversation::{self, ChangeAuthor, Verdict};
use crewdesk::replica::doc::{self, DocHeader};
use crewdesk::sync::bounded::{SyncLimits, check_sync_message};
use crewdesk::sync::relay_doc;
use crewdesk::sync::wire::{PeerMetadata, WireMessage};
use std::collections::{BTreeMap, HashSet};
use std::sync::OnceLock;

/// The fuzz targets, by name (their folders under `fuzz/corpus` and `fuzz/regressions`).
pub const TARGETS: [&str; 4] = ["wire_frame", "sync_message", "judge_sequence", "message_body"];

/// Runs `data` through the target named `target`.
pub fn run(target: &str, data: &[u8]) {
    match target {
        "wire_frame" => wire_frame(data),
        "sync_message" => sync_message(data),
        "judge_sequence" => judge_sequence_bytes(data),
        "message_body" => message_body(data),
        other => panic!("no fuzz target `{other}`"),
    }
}

/// The judge's clock: fixed, so an input always gives the same verdict.
pub const NOW: Timestamp = Timestamp(1_800_000_000_000);
/// The conversation's document id.
pub const DOC_ID: &str = "2jQ5Vc7u9o1Wk6Bq3TXYtY7cWKdV";
const TEAM: &str = "sales";
const MINUTE: i64 = Timestamp::MINUTE;

// ---- wire_frame ---------------------------------------------------------------------------------

/// A frame that decodes encodes to a frame that decodes to the same message.
pub fn wire_frame(data: &[u8]) {
    let Ok(message) = WireMessage::decode(data) else { return };
    let encoded = message.encode();
    match WireMessage::decode(&encoded) {
        Ok(again) => assert_eq!(again, message, "a decoded frame re-encodes to another message"),
        Err(e) => panic!("a decoded frame re-encodes to a frame that does not decode ({e}): {message:?}"),
    }
}

// ---- sync_message -------------------------------------------------------------------------------

/// A representative of the conversation's open-mode team, who has joined it.
pub fn sync_author() -> ChangeAuthor {
    author("bob", Role::Representative, TeamMode::Open, TEAM, Vec::new())
}

fn author(agent: &str, role: Role, mode: TeamMode, team: &str, foreign_actors: Vec<ActorId>) -> ChangeAuthor {
    // The team's members: a hand-over names one of them (or someone else, and is refused).
    let members = [
        ("bob", Role::Representative),
        ("carol", Role::Representative),
        ("erin", Role::Representative),
        ("ada", Role::Admin),
    ]
    .map(|(a, role)| Member { agent: a.into(), name: a.into(), role });
    ChangeAuthor {
        agent: agent.into(),
        team: team.into(),
        role,
        mode,
        foreign_actors,
        members: std::sync::Arc::new(members.to_vec()),
    }
}

/// A client's sync message through the relay's chain (`parse_client_sync`, then `apply_judged` and
/// the rest of the message) against the loaded conversation; the conversation must still read.
pub fn sync_message(data: &[u8]) {
    let _ = sync_message_verdict(data);
}

/// [`sync_message`], returning the judge's verdict when the message got that far.
pub fn sync_message_verdict(data: &[u8]) -> Option<Verdict> {
    let checked = check_sync_message(data, &SyncLimits::CLIENT).ok()?;
    let message = sync::Message::decode(data).ok()?;
    let changes = checked.changes.iter().map(|c| Change::try_from(c.as_slice())).collect::<Result<Vec<_>, _>>().ok()?;
    let base = &bases().conversation;
    let mut doc = base.doc.fork();
    let verdict = conversation::apply_judged(&mut doc, DOC_ID, changes.clone(), &sync_author(), NOW);
    check_verdict(Some(base), &doc, &[&verdict], &changes, &[]);
    // The relay then takes the rest of the message (heads, needs, bloom filters) as it does, and
    // answers with what the client lacks; then the same message again, now an acknowledgement of
    // heads the sync state knows.
    let mut state = sync::State::new();
    for _ in 0..2 {
        if relay_doc::take_rest(&mut doc, &mut state, message.clone()).is_ok() {
            let _ = doc.generate_sync_message(&mut state);
        }
    }
    Some(verdict)
}

/// What must hold after `apply_judged` took the `delivered` changes into `doc`, a fork of `base`
/// (`None`: a document with no conversation yet): the accepted changes are in, refused ones, changes
/// made with `foreign` actors and changes not accepted are not, the conversation still reads, and
/// what no change may alter (id, team, channel, creation time, customer id, the grab winner, sent
/// messages) is as it was.
fn check_verdict(
    base: Option<&Base>,
    doc: &Automerge,
    verdicts: &[&Verdict],
    delivered: &[Change],
    foreign: &[ActorId],
) {
    let mut accepted = HashSet::new();
    for v in verdicts {
        assert!(!v.damaged, "a refused change could not be taken back out");
        for hash in &v.accepted {
            assert!(doc.get_change_by_hash(hash).is_some(), "accepted change {hash} is not in the document");
            accepted.insert(*hash);
        }
        if let Some((hash, refusal)) = &v.refused {
            assert!(doc.get_change_by_hash(hash).is_none(), "refused change {hash} ({refusal}) is in the document");
        }
    }
    let in_base = |hash: &ChangeHash| base.is_some_and(|b| b.doc.get_change_by_hash(hash).is_some());
    for change in delivered {
        let hash = change.hash();
        if doc.get_change_by_hash(&hash).is_some() && !in_base(&hash) {
            assert!(accepted.contains(&hash), "change {hash} is in the document unjudged");
            assert!(!foreign.contains(change.actor_id()), "a change made with a foreign actor was kept");
        }
    }
    let header = doc::read_header(doc);
    let messages = doc::all_messages(doc);
    let Some(base) = base else {
        // No conversation before: there is one now only if a creation was accepted.
        if !doc.get_heads().is_empty() {
            let header = header.expect("an accepted conversation reads");
            assert_eq!(header.owner, None, "a new conversation has a grab winner");
            messages.expect("an accepted conversation's messages read");
        }
        return;
    };
    let (was, now) = (&base.header, header.expect("the conversation still reads"));
    let fixed = |h: &DocHeader| (h.id.clone(), h.team.clone(), h.channel, h.created_at, h.customer.id.clone());
    assert_eq!(fixed(&now), fixed(was), "the conversation's fixed fields changed");
    assert_eq!(now.owner, was.owner, "the grab winner changed");
    let messages = messages.expect("the messages still read");
    let by_id: BTreeMap<&MessageId, &Message> = messages.iter().map(|m| (&m.id, m)).collect();
    for m in &base.messages {
        assert_eq!(by_id.get(&m.id).copied(), Some(m), "sent message {} changed or disappeared", m.id);
    }
}

// ---- the conversations the targets start from ----------------------------------------------------

/// The loaded conversations, built once.
pub struct Bases {
    /// A web-widget conversation: the customer wrote, bob and carol joined and answered (a text,
    /// a file), erin asked to grab it, the customer's email was added.
    pub conversation: Base,
    /// The same, after the relay recorded erin as the grab winner.
    pub owned: Base,
}

/// A conversation as the judge holds it, what it reads, and the document as it was after each of
/// its changes.
pub struct Base {
    pub doc: Automerge,
    pub header: DocHeader,
    pub messages: Vec<Message>,
    early: Vec<Automerge>,
}

impl Base {
    fn new(doc: Automerge) -> Base {
        let header = doc::read_header(&doc).expect("the base reads");
        let messages = doc::all_messages(&doc).expect("the base's messages read");
        let early = doc.get_changes(&[]).iter().map(|c| doc.fork_at(&[c.hash()]).expect("an early fork")).collect();
        Base { doc, header, messages, early }
    }
}

pub fn bases() -> &'static Bases {
    static BASES: OnceLock<Bases> = OnceLock::new();
    BASES.get_or_init(|| {
        let new = doc::NewConversation {
            id: DOC_ID.into(),
            team: TEAM.into(),
            channel: Channel::WebWidget,
            customer: Customer {
                id: CustomerId("cus-1".into()),
                name: "Jane Roe".into(),
                email: None,
                phone: Some("+1 555 0100".into()),
                notes: None,
            },
            created_at: NOW.plus(-60 * MINUTE),
        };
        let mut d = doc::create(ActorId::from([0xa0; 16]), &new).expect("a new conversation");
        let steps: Vec<Edit> = vec![
            Box::new(|tx| doc::add_message(tx, &text_message("m-1", Author::Customer, -59, "My order arrived broken"))),
            Box::new(|tx| doc::set_in_room(tx, &"bob".into(), true)),
            Box::new(|tx| {
                doc::add_message(tx, &text_message("m-2", crew("bob"), -58, "Sorry! Could you send a photo?"))
            }),
            Box::new(|tx| doc::request_grab(tx, &"erin".into(), NOW.plus(-57 * MINUTE))),
            Box::new(|tx| doc::set_in_room(tx, &"carol".into(), true)),
            Box::new(|tx| {
                let body = MessageBody::Attachment {
                    blob: BlobHash::of(b"photo").reference(),
                    file_name: "broken.jpg".into(),
                    mime: "image/jpeg".into(),
                    size: 5,
                };
                doc::add_message(tx, &message("m-3", crew("carol"), -56, body))
            }),
            Box::new(|tx| {
                doc::edit_customer(tx, &CustomerEdit { email: Some("jane@example.com".into()), ..Default::default() })
            }),
        ];
        for step in steps {
            d.transact::<_, _, doc::DocError>(|tx| step(tx)).expect("a change to the conversation");
        }
        let mut owned = d.fork().with_actor(ActorId::from([0xa1; 16]));
        owned.transact::<_, _, doc::DocError>(|tx| doc::record_owner(tx, &"erin".into())).expect("the grab winner");
        Bases { conversation: Base::new(d), owned: Base::new(owned) }
    })
}

/// One change to a conversation, made with the document functions.
type Edit = Box<dyn Fn(&mut Transaction<'_>) -> Result<(), doc::DocError>>;

fn crew(agent: &str) -> Author {
    doc::crew(&agent.into())
}

fn message(id: &str, author: Author, minutes: i64, body: MessageBody) -> Message {
    Message { id: MessageId(id.into()), at: NOW.plus(minutes * MINUTE), author, body }
}

fn text_message(id: &str, author: Author, minutes: i64, text: &str) -> Message {
    message(id, author, minutes, MessageBody::Text { text: text.into() })
}

// ---- judge_sequence -----------------------------------------------------------------------------

/// Changes made by three actors, then delivered to the judge.
#[derive(Arbitrary, Debug)]
pub struct JudgeInput {
    /// The conversation the judge holds: 0 the base, 1 the base with a grab winner, 2 none yet.
    base: u8,
    /// Who sends the changes.
    author: AuthorPick,
    /// Where each actor starts.
    starts: [Start; 3],
    steps: Vec<Step>,
    delivery: Delivery,
}

#[derive(Arbitrary, Debug)]
struct AuthorPick {
    agent: Agent,
    admin: bool,
    grab_mode: bool,
    other_team: bool,
    /// An actor (0 to 2) bound to another agent.
    foreign: Option<u8>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Start {
    /// A fork of the judge's conversation.
    Base,
    /// An empty document (a conversation made anew, or changes with no history).
    Empty,
    /// The judge's conversation as it was after its n-th change.
    Early(u8),
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// One transaction of the actor (0 to 2).
    Change { actor: u8, ops: Vec<Op> },
    /// The actor takes the other's changes.
    Merge { actor: u8, from: u8 },
}

#[derive(Arbitrary, Debug)]
struct Delivery {
    reverse: bool,
    swaps: Vec<(u8, u8)>,
    drop: Option<u8>,
    duplicate: Option<u8>,
    /// Split into two batches (two sync messages) after this many changes.
    split: Option<u8>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Join(Agent),
    Leave(Agent),
    Send {
        id: MsgId,
        author: AuthorKind,
        at: At,
        body: Body,
    },
    Grab {
        agent: Agent,
        at: At,
    },
    Close(At),
    Edit {
        name: Option<String>,
        email: Option<String>,
        phone: Option<String>,
        notes: Option<String>,
    },
    RecordOwner(Agent),
    /// A hand-over's effect: the colleague in the room, and (`owner`) as the representative.
    HandOver {
        to: Agent,
        owner: bool,
    },
    Create {
        own_id: bool,
        channel: u8,
        other_team: bool,
        name: String,
        email: Option<String>,
        created: At,
    },
    Put {
        obj: Obj,
        key: Key,
        value: Val,
    },
    Make {
        obj: Obj,
        key: Key,
        kind: u8,
    },
    /// Maps nested `depth` deep under `key`.
    Nest {
        obj: Obj,
        key: Key,
        depth: u8,
    },
    Delete {
        obj: Obj,
        key: Key,
    },
    Insert {
        obj: Obj,
        index: u8,
        value: Val,
    },
    Remove {
        obj: Obj,
        index: u8,
    },
    Splice {
        obj: Obj,
        index: u8,
        delete: u8,
        text: String,
    },
    Increment {
        obj: Obj,
        key: Key,
        by: i64,
    },
}

#[derive(Arbitrary, Debug, Clone)]
enum Agent {
    Bob,
    Carol,
    Erin,
    Ada,
    Other(String),
}

impl Agent {
    fn id(&self) -> AgentId {
        AgentId(match self {
            Agent::Bob => "bob".into(),
            Agent::Carol => "carol".into(),
            Agent::Erin => "erin".into(),
            Agent::Ada => "ada".into(),
            Agent::Other(s) => s.clone(),
        })
    }
}

#[derive(Arbitrary, Debug)]
enum MsgId {
    /// One of m-0 to m-7 (m-1 to m-3 are in the base).
    Known(u8),
    Other(String),
}

impl MsgId {
    fn id(&self) -> String {
        match self {
            MsgId::Known(n) => format!("m-{}", n % 8),
            MsgId::Other(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum AuthorKind {
    Customer,
    System,
    Crew(Agent),
}

#[derive(Arbitrary, Debug)]
enum At {
    /// Milliseconds before the judge's clock.
    Ago(u32),
    /// Milliseconds after it.
    Ahead(u32),
    Exactly(i64),
}

impl At {
    fn time(&self) -> Timestamp {
        match self {
            At::Ago(ms) => NOW.plus(-i64::from(*ms)),
            At::Ahead(ms) => NOW.plus(i64::from(*ms)),
            At::Exactly(t) => Timestamp(*t),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Body {
    Text(String),
    Template {
        template: String,
        text: String,
    },
    WhatsApp {
        template: String,
        language: String,
        params: Vec<String>,
        text: String,
    },
    Attachment {
        blob: Blob,
        file_name: String,
        mime: String,
        size: u64,
    },
    Conference(String),
    Note(String),
    /// A hand-over naming a colleague (or anyone).
    Transfer(Agent),
}

#[derive(Arbitrary, Debug)]
enum Blob {
    /// The reference of a well-formed content address.
    Valid(u8),
    Other(String),
}

impl Body {
    fn body(&self) -> MessageBody {
        match self {
            Body::Text(text) => MessageBody::Text { text: text.clone() },
            Body::Template { template, text } => {
                MessageBody::Template { template: template.clone(), text: text.clone() }
            }
            Body::WhatsApp { template, language, params, text } => MessageBody::WhatsAppTemplate {
                template: template.clone(),
                language: language.clone(),
                params: params.clone(),
                text: text.clone(),
            },
            Body::Attachment { blob, file_name, mime, size } => MessageBody::Attachment {
                blob: match blob {
                    Blob::Valid(n) => BlobHash::of(&[*n]).reference(),
                    Blob::Other(s) => s.clone(),
                },
                file_name: file_name.clone(),
                mime: mime.clone(),
                size: *size,
            },
            Body::Conference(url) => MessageBody::ConferenceInvitation { url: url.clone() },
            Body::Note(text) => MessageBody::Note { text: text.clone() },
            Body::Transfer(to) => MessageBody::Transfer { to: to.id() },
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Obj {
    Root,
    Room,
    Customer,
    Messages,
    Grabs,
    /// The map of a message.
    Message(MsgId),
    /// An object this actor made (by index).
    Made(u8),
}

#[derive(Arbitrary, Debug)]
enum Key {
    /// One of the layout's keys.
    Layout(u8),
    Agent(Agent),
    Message(MsgId),
    Other(String),
}

const LAYOUT_KEYS: [&str; 24] = [
    "schema",
    "id",
    "team",
    "channel",
    "created_at",
    "customer",
    "messages",
    "room",
    "grab_requests",
    "closed_at",
    "owner",
    "name",
    "email",
    "phone",
    "notes",
    "at",
    "author",
    "body",
    "kind",
    "agent",
    "text",
    "blob",
    "url",
    "params",
];

impl Key {
    fn key(&self) -> String {
        match self {
            Key::Layout(n) => LAYOUT_KEYS[usize::from(*n) % LAYOUT_KEYS.len()].to_owned(),
            Key::Agent(a) => a.id().0,
            Key::Message(m) => m.id(),
            Key::Other(s) => s.clone(),
        }
    }
}

/// See `Val::scalar`.
const COUNTER_RANGE: i64 = 1 << 40;

#[derive(Arbitrary, Debug)]
enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    F64(f64),
    Str(String),
    Timestamp(i64),
    Counter(i64),
    Bytes(Vec<u8>),
}

impl Val {
    fn scalar(&self) -> ScalarValue {
        match self {
            Val::Null => ScalarValue::Null,
            Val::Bool(b) => ScalarValue::Boolean(*b),
            Val::Int(i) => ScalarValue::Int(*i),
            Val::Uint(u) => ScalarValue::Uint(*u),
            Val::F64(f) => ScalarValue::F64(*f),
            Val::Str(s) => ScalarValue::Str(s.as_str().into()),
            Val::Timestamp(t) => ScalarValue::Timestamp(*t),
            // Counters and increments stay within ±2^40, so the clients' own automerge never
            // overflows adding them up (counters never reach the relay's documents: the judge
            // refuses them before applying, see `regressions/judge_sequence/counter-increment-overflow`).
            Val::Counter(c) => ScalarValue::counter(*c % COUNTER_RANGE),
            Val::Bytes(b) => ScalarValue::Bytes(b.clone()),
        }
    }
}

/// At most this many steps, operations per step and levels of nesting are used, so that one input
/// stays fast however long it is.
const MAX_STEPS: usize = 12;
const MAX_OPS: usize = 12;
const MAX_NEST: u8 = 10;

/// [`judge_sequence`] on raw bytes, decoded as the fuzz target decodes them.
pub fn judge_sequence_bytes(data: &[u8]) {
    if let Ok(input) = JudgeInput::arbitrary_take_rest(Unstructured::new(data)) {
        judge_sequence(input);
    }
}

/// One actor: its document, the changes it made or took from others, and the objects it made.
struct Actor {
    doc: Automerge,
    has: Vec<Change>,
    made: Vec<ObjId>,
}

pub fn judge_sequence(input: JudgeInput) {
    let bases = bases();
    let base = match input.base % 3 {
        0 => Some(&bases.conversation),
        1 => Some(&bases.owned),
        _ => None,
    };
    // Actor ids on both sides of the base's (0xa0...), so that either side wins a conflict.
    let ids: Vec<ActorId> = [0x10_u8, 0x90, 0xf0].into_iter().map(|n| ActorId::from([n; 16])).collect();
    let mut actors: Vec<Actor> = input
        .starts
        .iter()
        .zip(&ids)
        .map(|(start, id)| {
            let doc = match (start, base) {
                (Start::Base, Some(base)) => base.doc.clone(),
                (Start::Early(n), Some(base)) => base.early[usize::from(*n) % base.early.len()].clone(),
                _ => Automerge::new(),
            };
            Actor { doc: doc.with_actor(id.clone()), has: Vec::new(), made: Vec::new() }
        })
        .collect();
    let mut changes: Vec<Change> = Vec::new();
    for step in input.steps.iter().take(MAX_STEPS) {
        match step {
            Step::Change { actor, ops } => {
                let actor = &mut actors[usize::from(*actor) % 3];
                let mut tx = actor.doc.transaction();
                for op in ops.iter().take(MAX_OPS) {
                    apply_op(&mut tx, op, &mut actor.made);
                }
                if tx.commit().0.is_some() {
                    let change = actor.doc.get_last_local_change().expect("the change just made");
                    actor.has.push(change.clone());
                    changes.push(change);
                }
            }
            Step::Merge { actor, from } => {
                let (to, from) = (usize::from(*actor) % 3, usize::from(*from) % 3);
                let theirs: Vec<Change> = actors[from]
                    .has
                    .iter()
                    .filter(|c| actors[to].doc.get_change_by_hash(&c.hash()).is_none())
                    .cloned()
                    .collect();
                actors[to].doc.apply_changes(theirs.iter().cloned()).expect("changes made by an actor apply");
                actors[to].has.extend(theirs);
            }
        }
    }
    let delivered = changes.clone();
    let d = &input.delivery;
    if d.reverse {
        changes.reverse();
    }
    if !changes.is_empty() {
        for (a, b) in d.swaps.iter().take(16) {
            let n = changes.len();
            changes.swap(usize::from(*a) % n, usize::from(*b) % n);
        }
        if let Some(i) = d.duplicate {
            let c = changes[usize::from(i) % changes.len()].clone();
            changes.push(c);
        }
        if let Some(i) = d.drop {
            let n = changes.len();
            changes.remove(usize::from(i) % n);
        }
    }
    let second = match d.split {
        Some(k) => changes.split_off(usize::from(k).min(changes.len())),
        None => Vec::new(),
    };
    let a = &input.author;
    let foreign: Vec<ActorId> = a.foreign.map(|n| ids[usize::from(n) % 3].clone()).into_iter().collect();
    let who = author(
        a.agent.id().as_str(),
        if a.admin { Role::Admin } else { Role::Representative },
        if a.grab_mode { TeamMode::Grab } else { TeamMode::Open },
        if a.other_team { "support" } else { TEAM },
        foreign.clone(),
    );
    let mut doc = base.map_or_else(Automerge::new, |b| b.doc.clone());
    let first = conversation::apply_judged(&mut doc, DOC_ID, changes, &who, NOW);
    let second = conversation::apply_judged(&mut doc, DOC_ID, second, &who, NOW);
    check_verdict(base, &doc, &[&first, &second], &delivered, &foreign);
}

fn layout_obj(tx: &Transaction<'_>, parent: &ObjId, key: &str) -> Option<ObjId> {
    match tx.get(parent, key) {
        Ok(Some((automerge::Value::Object(_), id))) => Some(id),
        _ => None,
    }
}

fn resolve(tx: &Transaction<'_>, obj: &Obj, made: &[ObjId]) -> Option<ObjId> {
    match obj {
        Obj::Root => Some(ROOT),
        Obj::Room => layout_obj(tx, &ROOT, "room"),
        Obj::Customer => layout_obj(tx, &ROOT, "customer"),
        Obj::Messages => layout_obj(tx, &ROOT, "messages"),
        Obj::Grabs => layout_obj(tx, &ROOT, "grab_requests"),
        Obj::Message(m) => layout_obj(tx, &layout_obj(tx, &ROOT, "messages")?, &m.id()),
        Obj::Made(n) => made.get(usize::from(*n) % made.len().max(1)).cloned(),
    }
}

/// Applies one operation; one that automerge or the document functions refuse is skipped (the
/// transaction goes on), as a modified client would only send what its automerge wrote.
fn apply_op(tx: &mut Transaction<'_>, op: &Op, made: &mut Vec<ObjId>) {
    let _ = match op {
        Op::Join(agent) => doc::set_in_room(tx, &agent.id(), true),
        Op::Leave(agent) => doc::set_in_room(tx, &agent.id(), false),
        Op::Send { id, author, at, body } => {
            let author = match author {
                AuthorKind::Customer => Author::Customer,
                AuthorKind::System => Author::System,
                AuthorKind::Crew(agent) => doc::crew(&agent.id()),
            };
            doc::add_message(tx, &Message { id: MessageId(id.id()), at: at.time(), author, body: body.body() })
        }
        Op::Grab { agent, at } => doc::request_grab(tx, &agent.id(), at.time()),
        Op::Close(at) => doc::close(tx, at.time()),
        Op::Edit { name, email, phone, notes } => doc::edit_customer(
            tx,
            &CustomerEdit { name: name.clone(), email: email.clone(), phone: phone.clone(), notes: notes.clone() },
        ),
        Op::RecordOwner(agent) => doc::record_owner(tx, &agent.id()),
        Op::HandOver { to, owner } => doc::hand_over(tx, &to.id(), *owner),
        Op::Create { own_id, channel, other_team, name, email, created } => doc::write_new(
            tx,
            &doc::NewConversation {
                id: if *own_id { DOC_ID.into() } else { "another-conversation".into() },
                team: if *other_team { "support".into() } else { TEAM.into() },
                channel: Channel::ALL[usize::from(*channel) % Channel::ALL.len()],
                customer: Customer {
                    id: CustomerId("cus-2".into()),
                    name: name.clone(),
                    email: email.clone(),
                    phone: None,
                    notes: None,
                },
                created_at: created.time(),
            },
        ),
        Op::Put { obj, key, value } => {
            if let Some(obj) = resolve(tx, obj, made) {
                let _ = tx.put(&obj, key.key(), value.scalar());
            }
            Ok(())
        }
        Op::Make { obj, key, kind } => {
            let kind = [ObjType::Map, ObjType::List, ObjType::Text][usize::from(*kind) % 3];
            if let Some(obj) = resolve(tx, obj, made)
                && let Ok(id) = tx.put_object(&obj, key.key(), kind)
            {
                made.push(id);
            }
            Ok(())
        }
        Op::Nest { obj, key, depth } => {
            if let Some(mut obj) = resolve(tx, obj, made) {
                for _ in 0..(*depth % MAX_NEST) + 1 {
                    match tx.put_object(&obj, key.key(), ObjType::Map) {
                        Ok(id) => obj = id,
                        Err(_) => break,
                    }
                }
                made.push(obj);
            }
            Ok(())
        }
        Op::Delete { obj, key } => {
            if let Some(obj) = resolve(tx, obj, made) {
                let _ = tx.delete(&obj, key.key());
            }
            Ok(())
        }
        Op::Insert { obj, index, value } => {
            if let Some(obj) = resolve(tx, obj, made) {
                let index = usize::from(*index).min(tx.length(&obj));
                let _ = tx.insert(&obj, index, value.scalar());
            }
            Ok(())
        }
        Op::Remove { obj, index } => {
            if let Some(obj) = resolve(tx, obj, made) {
                let _ = tx.delete(&obj, usize::from(*index));
            }
            Ok(())
        }
        Op::Splice { obj, index, delete, text } => {
            if let Some(obj) = resolve(tx, obj, made) {
                let len = tx.length(&obj);
                let index = usize::from(*index).min(len);
                let delete = isize::from(*delete).min((len - index) as isize);
                let _ = tx.splice_text(&obj, index, delete, text);
            }
            Ok(())
        }
        Op::Increment { obj, key, by } => {
            if let Some(obj) = resolve(tx, obj, made) {
                let _ = tx.increment(&obj, key.key(), *by % COUNTER_RANGE);
            }
            Ok(())
        }
    };
}

// ---- message_body -------------------------------------------------------------------------------

/// A message as JSON (as a client writes it into a conversation): if it parses and validates, an
/// attachment names a well-formed file; and any text as a file reference or content address.
pub fn message_body(data: &[u8]) {
    if let Ok(m) = serde_json::from_slice::<Message>(data) {
        let body = &m.body;
        let _ = (body.preview(), body.text_content(), body.is_free_form());
        if body.validate().is_ok() {
            if let MessageBody::Attachment { blob, .. } = body {
                let hash = BlobHash::from_reference(blob).expect("a valid attachment names a well-formed file");
                check_hash(&hash);
                assert_eq!(&hash.reference(), blob);
                assert_eq!(body.blob(), Some(hash));
            }
            let json = serde_json::to_vec(&m).expect("a message serializes");
            let again: Message = serde_json::from_slice(&json).expect("a serialized message parses");
            assert_eq!(again, m, "a message changes through JSON");
        }
    }
    let text = String::from_utf8_lossy(data);
    for hash in [BlobHash::from_reference(&text), BlobHash::parse(&text)].into_iter().flatten() {
        check_hash(&hash);
    }
    let _ = attachment::accepted_type(text.lines().next().unwrap_or(""), data);
}

fn check_hash(hash: &BlobHash) {
    let hex = hash.as_str();
    assert!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "a content address is not 64 lowercase hex digits: {hex:?}"
    );
    assert_eq!(hash.shard(), &hex[..2]);
}

// ---- seeds --------------------------------------------------------------------------------------

/// Seed inputs for each target, by target and name: real frames, real sync messages (made by
/// automerge from real changes to the conversation, so the fuzzer starts past the framing), real
/// message bodies. `examples/seeds.rs` writes them into `corpus/`; the regression test runs them.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, frame) in wire_seeds() {
        out.push(("wire_frame", name, frame));
    }
    for (name, message) in sync_seeds() {
        out.push(("sync_message", name, message));
    }
    for (name, json) in body_seeds() {
        out.push(("message_body", name, json));
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    for n in 0..8 {
        let bytes = (0..64 << n.min(4))
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        out.push(("judge_sequence", format!("seed-random-{n}"), bytes));
    }
    out
}

fn wire_seeds() -> Vec<(String, Vec<u8>)> {
    let (sender_id, target_id) = ("peer-desk-bob".to_owned(), "relay-1".to_owned());
    let document_id = DOC_ID.to_owned();
    let data = sync_seeds().into_iter().map(|(_, m)| m).next().unwrap_or_default();
    let metadata = PeerMetadata { storage_id: Some("storage-1".into()), is_ephemeral: false };
    let messages = [
        WireMessage::Join {
            sender_id: sender_id.clone(),
            peer_metadata: metadata.clone(),
            supported_protocol_versions: vec!["1".into()],
        },
        WireMessage::Peer {
            sender_id: sender_id.clone(),
            target_id: target_id.clone(),
            peer_metadata: metadata,
            selected_protocol_version: "1".into(),
        },
        WireMessage::Error { sender_id: sender_id.clone(), target_id: target_id.clone(), message: "refused".into() },
        WireMessage::Request {
            sender_id: sender_id.clone(),
            target_id: target_id.clone(),
            document_id: document_id.clone(),
            data: data.clone(),
        },
        WireMessage::Sync {
            sender_id: sender_id.clone(),
            target_id: target_id.clone(),
            document_id: document_id.clone(),
            data,
        },
        WireMessage::DocUnavailable {
            sender_id: sender_id.clone(),
            target_id: target_id.clone(),
            document_id: document_id.clone(),
        },
        WireMessage::Ephemeral {
            sender_id,
            target_id,
            document_id,
            count: 3,
            session_id: "session-1".into(),
            data: vec![0xa1, 0x64, b't', b'y', b'p', b'e'],
        },
        WireMessage::Other { kind: "remote-heads-changed".into() },
    ];
    messages.iter().enumerate().map(|(n, m)| (format!("seed-{n}"), m.encode())).collect()
}

/// Real client sync messages for the conversation: a desk's first message (heads and a bloom
/// filter), then its changes (join, reply, file, close, customer edit, grab request, leave, the
/// forged ones the judge refuses) as automerge sends them, in v1 and v2, compressed and not.
pub fn sync_seeds() -> Vec<(String, Vec<u8>)> {
    let base = &bases().conversation.doc;
    let mut out = Vec::new();
    // An honest exchange: the relay has the conversation, bob's desk has it plus new changes.
    let mut desk = base.fork().with_actor(ActorId::from([0xb0; 16]));
    let edits: Vec<Edit> = vec![
        Box::new(|tx| doc::add_message(tx, &text_message("m-4", crew("bob"), -10, "Thanks, a refund is on its way"))),
        Box::new(|tx| {
            let body = MessageBody::Attachment {
                blob: BlobHash::of(b"label").reference(),
                file_name: "return-label.pdf".into(),
                mime: "application/pdf".into(),
                size: 5,
            };
            doc::add_message(tx, &message("m-5", crew("bob"), -9, body))
        }),
        Box::new(|tx| {
            doc::edit_customer(tx, &CustomerEdit { notes: Some("Refund sent".into()), ..Default::default() })
        }),
        Box::new(|tx| doc::close(tx, NOW.plus(-MINUTE))),
        Box::new(|tx| doc::set_in_room(tx, &"bob".into(), false)),
    ];
    let mut one_by_one = Vec::new();
    let mut changes = Vec::new();
    for edit in &edits {
        desk.transact::<_, _, doc::DocError>(|tx| edit(tx)).expect("an honest change");
        one_by_one.push(desk.get_last_local_change().expect("the change just made"));
        // The same edit alone, on the conversation as the relay has it.
        let mut alone = base.fork().with_actor(ActorId::from([0xb1; 16]));
        alone.transact::<_, _, doc::DocError>(|tx| edit(tx)).expect("an honest change");
        changes.push(alone.get_last_local_change().expect("the change just made"));
    }
    let mut relay = base.fork();
    let (mut desk_state, mut relay_state) = (sync::State::new(), sync::State::new());
    for round in 0..4 {
        if let Some(m) = desk.generate_sync_message(&mut desk_state) {
            out.push((format!("seed-exchange-{round}"), m.clone().encode()));
            relay.receive_sync_message(&mut relay_state, m).expect("the relay takes the desk's message");
        }
        // The relay advertises no capabilities (see `outgoing` in the relay): desks send changes.
        if let Some(mut m) = relay.generate_sync_message(&mut relay_state) {
            m.flags = None;
            desk.receive_sync_message(&mut desk_state, m).expect("the desk takes the relay's message");
        }
    }
    // Each change alone and all together, in v1 and v2, compressed (as automerge sends large
    // changes) and not, with the base's heads and an empty bloom filter.
    let forged: Vec<Edit> = vec![
        Box::new(|tx| doc::record_owner(tx, &"bob".into())),
        Box::new(|tx| doc::add_message(tx, &text_message("m-6", crew("ada"), -5, "Refund approved by an admin"))),
        Box::new(|tx| doc::add_message(tx, &text_message("m-1", crew("bob"), -5, "History rewritten"))),
        Box::new(|tx| doc::set_in_room(tx, &"carol".into(), false)),
        Box::new(|tx| doc::request_grab(tx, &"bob".into(), NOW)),
        Box::new(|tx| Ok(tx.put(ROOT, "channel", "email")?)),
        Box::new(|tx| {
            let text = "a long reply that automerge compresses ".repeat(40);
            doc::add_message(tx, &text_message("m-7", crew("bob"), -4, &text))
        }),
    ];
    for forge in forged {
        let mut d = base.fork().with_actor(ActorId::from([0xc0; 16]));
        d.transact::<_, _, doc::DocError>(|tx| forge(tx)).expect("a forged change");
        changes.push(d.get_last_local_change().expect("the change just made"));
    }
    let heads = base.get_heads();
    let encode = |version: sync::MessageVersion, chunks: Vec<Vec<u8>>| {
        sync::Message {
            heads: heads.clone(),
            need: Vec::new(),
            have: vec![sync::Have::default()],
            changes: sync::ChunkList::from(chunks),
            flags: None,
            version,
        }
        .encode()
    };
    for (n, change) in changes.iter_mut().enumerate() {
        let raw = change.raw_bytes().to_vec();
        let compressed = change.bytes().to_vec();
        if compressed != raw {
            out.push((format!("seed-change-{n}-compressed"), encode(sync::MessageVersion::V1, vec![compressed])));
        }
        out.push((format!("seed-change-{n}"), encode(sync::MessageVersion::V1, vec![raw])));
    }
    let all: Vec<Vec<u8>> = one_by_one.iter().map(|c| c.raw_bytes().to_vec()).collect();
    out.push(("seed-all-v1".into(), encode(sync::MessageVersion::V1, all.clone())));
    out.push(("seed-all-v2".into(), encode(sync::MessageVersion::V2, vec![all.concat()])));
    out
}

fn body_seeds() -> Vec<(String, Vec<u8>)> {
    let blob = BlobHash::of(b"photo");
    let bodies = [
        MessageBody::Text { text: "Hello, how can we help?".into() },
        MessageBody::Template { template: "greeting".into(), text: "Hi Jane, thanks for writing".into() },
        MessageBody::WhatsAppTemplate {
            template: "order_update".into(),
            language: "en_US".into(),
            params: vec!["Jane".into(), "#1234".into()],
            text: "Hi Jane, your order #1234 shipped".into(),
        },
        MessageBody::Attachment {
            blob: blob.reference(),
            file_name: "broken.jpg".into(),
            mime: "image/jpeg".into(),
            size: 48_213,
        },
        MessageBody::ConferenceInvitation { url: "https://meet.jit.si/crewdesk-0123456789abcdef".into() },
    ];
    let authors = [Author::Customer, crew("bob"), Author::System];
    let mut out: Vec<(String, Vec<u8>)> = bodies
        .into_iter()
        .enumerate()
        .map(|(n, body)| {
            let m = Message { id: MessageId(format!("m-{n}")), at: NOW, author: authors[n % 3].clone(), body };
            (format!("seed-{n}"), serde_json::to_vec(&m).expect("a message serializes"))
        })
        .collect();
    out.push(("seed-reference".into(), blob.reference().into_bytes()));
    out.push(("seed-hash".into(), blob.as_str().as_bytes().to_vec()));
    out
}
