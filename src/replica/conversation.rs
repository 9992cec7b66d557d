//! The judge: what one change to a conversation may do. The relay calls it for every change a
//! client sends, and the replica for every change it makes before it writes it, so the desktop
//! never makes a change the relay would refuse and no rule is written twice.
//!
//! A change is judged on its own, in causal order, against the conversation as it was at the
//! change's dependencies, and accepted or refused whole; the first change of a new conversation is
//! judged like every later one. The judge reads only the change's operations (and, for objects older
//! than the change, where those objects sit), so its cost follows the size of the change.

use super::doc::{self, DocHeader, SCHEMA_VERSION};
use crate::domain::access;
use crate::domain::{AgentId, Author, Channel, CustomerEdit, Member, Message, Role, TeamId, TeamMode, Timestamp};
use automerge::legacy::{Key, OpType};
use automerge::{Automerge, Change, ChangeHash, ReadDoc, ScalarValue};
use std::collections::{BTreeSet, HashMap, HashSet};

/// How far ahead of the judge's clock a message, a close or a new conversation may be dated.
/// Replicas' clocks drift; a date further ahead would freeze statuses (waiting, overdue) for
/// everyone until that time.
pub const MAX_CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// Longest customer detail (name, email, phone) and longest note, in bytes.
pub const MAX_CUSTOMER_FIELD_BYTES: usize = 1_024;
pub const MAX_CUSTOMER_NOTES_BYTES: usize = 16 * 1024;

/// Who makes a change, as the judge needs to know them: the agent, the team the conversation
/// belongs to (as the relay or the replica knows it), their role in it, and how that team works.
#[derive(Clone, Debug)]
pub struct ChangeAuthor {
    pub agent: AgentId,
    pub team: TeamId,
    pub role: Role,
    pub mode: TeamMode,
    /// Actor ids bound to other agents (the relay records who first used each actor): a change
    /// made with one of them is refused, so nobody writes with a teammate's actor and sequence
    /// numbers (which would block the teammate's own changes for good).
    pub foreign_actors: Vec<automerge::ActorId>,
    /// The team's members (shared, not copied per change): a hand-over names one of them.
    pub members: std::sync::Arc<Vec<Member>>,
}

impl ChangeAuthor {
    fn role_of(&self, agent: &AgentId) -> Option<Role> {
        self.members.iter().find(|m| m.agent == *agent).map(|m| m.role)
    }
}

/// Why a change was refused: the rule it broke, in words an agent understands.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

fn refuse<T>(rule: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(rule.into()))
}

/// Where an object of the conversation sits.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Place {
    Customer,
    Room,
    Grabs,
    Messages,
    /// Inside the message with this id (the message itself or one of its fields).
    InMessage(String),
}

/// The root keys of the layout (`doc.rs`), and which of them a change may write after creation.
const ROOT_KEYS: [&str; 11] = [
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
];
const CUSTOMER_KEYS: [&str; 5] = ["id", "name", "email", "phone", "notes"];

/// What one change does, read from its operations.
#[derive(Clone, Debug, Default)]
pub struct ChangeSummary {
    /// Root keys written (put, made or deleted).
    pub root: BTreeSet<String>,
    /// Room entries written: the agent, and `Some(in room)` for a boolean put (`None`: anything else).
    pub room: Vec<(AgentId, Option<bool>)>,
    /// Grab requests written: the agent, and whether it was a put of a time (`false`: a deletion
    /// or anything else).
    pub grabs: Vec<(AgentId, bool)>,
    /// Customer fields written.
    pub customer: BTreeSet<String>,
    /// Messages the change adds (read as of the change).
    pub added: Vec<Message>,
    /// The change edits, replaces or deletes a message that existed before it.
    pub touches_history: bool,
    /// An operation outside the layout, described (the first one found).
    pub foreign: Option<String>,
    /// Whether the change has any operation at all.
    pub empty: bool,
}

impl ChangeSummary {
    /// The change writes nothing the header holds (root fields, the customer, the room, the grab
    /// requests) and nothing outside the layout: the header after it is the header before it.
    pub fn leaves_header(&self) -> bool {
        self.root.is_empty()
            && self.room.is_empty()
            && self.grabs.is_empty()
            && self.customer.is_empty()
            && self.foreign.is_none()
    }
}

/// Reads what `change` does. `doc` must hold the change (it was just applied); older objects are
/// looked up in it, and added messages are read as of the change.
pub fn summarize(doc: &Automerge, change: &Change) -> Result<ChangeSummary, Refusal> {
    summarize_decoded(doc, change, &change.decode())
}

/// What automerge must never be asked to apply, read from the change's operations before it is:
/// counters. A conversation has none, and automerge 0.12 panics in builds with overflow checks when
/// an increment overflows a counter (found by fuzzing; release builds wrap silently). Whoever
/// applies a client's change outside [`apply_judged`] (the relay reading which team a new
/// conversation claims) asks this first.
pub fn check_before_applying(change: &Change) -> Result<(), Refusal> {
    refuse_before_applying(&change.decode())
}

/// See [`check_before_applying`].
fn refuse_before_applying(expanded: &automerge::ExpandedChange) -> Result<(), Refusal> {
    let counter = expanded
        .operations
        .iter()
        .any(|op| matches!(op.action, OpType::Increment(_) | OpType::Put(ScalarValue::Counter(_))));
    match counter {
        true => refuse("a conversation has no counters"),
        false => Ok(()),
    }
}

fn summarize_decoded(
    doc: &Automerge,
    change: &Change,
    expanded: &automerge::ExpandedChange,
) -> Result<ChangeSummary, Refusal> {
    let hash = change.hash();
    let deps = change.deps().to_vec();
    let mut out = ChangeSummary { empty: expanded.operations.is_empty(), ..Default::default() };
    let op_id = |i: usize| format!("{}@{}", expanded.start_op.get() + i as u64, expanded.actor_id);
    let new_ops: HashSet<String> = (0..expanded.operations.len()).map(op_id).collect();
    // Where each object sits: the layout's objects as of the change's dependencies, objects made
    // by this change where they were made, and older objects looked up when first met.
    let mut places: HashMap<String, Option<Place>> = HashMap::new();
    let schema_objects = [("customer", Place::Customer), ("room", Place::Room), ("grab_requests", Place::Grabs)];
    // When the change is the document's only head (it came in a line, the usual case), the state at
    // the change is the document as it is, and the state at its dependencies differs only by the
    // change's own operations: reads then need no clock of past heads.
    let linear = doc.get_heads() == [hash];
    let mut messages_obj = None;
    if !deps.is_empty() {
        for (key, place) in schema_objects.iter().cloned().chain([("messages", Place::Messages)]) {
            let found = match linear {
                true => doc.get_all(automerge::ROOT, key).map(|all| {
                    all.into_iter()
                        .find(|(_, id)| !new_ops.contains(&id.to_string()))
                        .map(|(v, id)| (v.into_owned(), id))
                }),
                false => doc.get_at(automerge::ROOT, key, &deps).map(|v| v.map(|(v, id)| (v.into_owned(), id))),
            };
            if let Ok(Some((automerge::Value::Object(_), id))) = found {
                if place == Place::Messages {
                    messages_obj = Some(id.clone());
                }
                places.insert(id.to_string(), Some(place));
            }
        }
    }
    let mut message_keys = BTreeSet::new();
    for (i, op) in expanded.operations.iter().enumerate() {
        let obj = op.obj.to_string();
        let key = match &op.key {
            Key::Map(k) => Some(k.to_string()),
            Key::Seq(_) => None,
        };
        let overwrites_old = op.pred.iter().any(|p| !new_ops.contains(&p.to_string()));
        let place = if obj == "_root" {
            let Some(k) = key else {
                out.foreign.get_or_insert_with(|| "a list operation on the conversation itself".into());
                continue;
            };
            if !ROOT_KEYS.contains(&k.as_str()) {
                out.foreign.get_or_insert_with(|| format!("an unknown field `{}`", truncated(&k)));
                continue;
            }
            out.root.insert(k.clone());
            let made = match k.as_str() {
                "customer" => Some(Place::Customer),
                "room" => Some(Place::Room),
                "grab_requests" => Some(Place::Grabs),
                "messages" => Some(Place::Messages),
                _ => None,
            };
            if matches!(op.action, OpType::Make(_)) {
                places.insert(op_id(i), made);
            }
            continue;
        } else {
            match places.get(&obj) {
                Some(p) => p.clone(),
                None => {
                    // Made before this change and not one of the layout's objects: inside a message
                    // means inside a sent message; anywhere else is outside the layout.
                    let found = doc.import_obj(&obj).ok().and_then(|id| {
                        let messages = messages_obj.as_ref()?;
                        let mut parents = doc.parents(&id).ok()?;
                        parents.find(|p| p.obj == *messages).and_then(|p| match p.prop {
                            automerge::Prop::Map(key) => Some(Place::InMessage(key)),
                            automerge::Prop::Seq(_) => None,
                        })
                    });
                    match found {
                        Some(_) => out.touches_history = true,
                        None => {
                            out.foreign.get_or_insert_with(|| "an object outside the conversation's layout".into());
                        }
                    }
                    places.insert(obj.clone(), found.clone());
                    found
                }
            }
        };
        let Some(place) = place else {
            out.foreign.get_or_insert_with(|| "an object outside the conversation's layout".into());
            continue;
        };
        let made_here = |place: Place| if matches!(op.action, OpType::Make(_)) { Some(place) } else { None };
        match place {
            Place::Customer => {
                let Some(k) = key else {
                    out.foreign.get_or_insert_with(|| "a list operation on the customer's details".into());
                    continue;
                };
                if !CUSTOMER_KEYS.contains(&k.as_str()) || !matches!(op.action, OpType::Put(_)) {
                    out.foreign.get_or_insert_with(|| format!("an unknown customer field `{}`", truncated(&k)));
                }
                out.customer.insert(k);
            }
            Place::Room => {
                let Some(k) = key else {
                    out.foreign.get_or_insert_with(|| "a list operation on the room".into());
                    continue;
                };
                let value = match &op.action {
                    OpType::Put(ScalarValue::Boolean(b)) => Some(*b),
                    _ => None,
                };
                out.room.push((AgentId(k), value));
            }
            Place::Grabs => {
                let Some(k) = key else {
                    out.foreign.get_or_insert_with(|| "a list operation on the grab requests".into());
                    continue;
                };
                let time = matches!(
                    &op.action,
                    OpType::Put(
                        ScalarValue::Int(_) | ScalarValue::Uint(_) | ScalarValue::F64(_) | ScalarValue::Timestamp(_)
                    )
                );
                out.grabs.push((AgentId(k), time));
            }
            Place::Messages => {
                let Some(k) = key else {
                    out.touches_history = true;
                    continue;
                };
                // An older value under this key (overwritten, deleted, or left in conflict) is a
                // message that existed before.
                let older = messages_obj.as_ref().is_some_and(|m| {
                    let values = match linear {
                        true => doc.get_all(m, k.as_str()),
                        false => doc.get_all_at(m, k.as_str(), &deps),
                    };
                    values.is_ok_and(|values| values.iter().any(|(_, id)| !new_ops.contains(&id.to_string())))
                });
                if overwrites_old || older || !matches!(op.action, OpType::Make(automerge::ObjType::Map)) {
                    out.touches_history = true;
                } else {
                    message_keys.insert(k.clone());
                }
                if let Some(p) = made_here(Place::InMessage(k)) {
                    places.insert(op_id(i), Some(p));
                }
            }
            Place::InMessage(m) => {
                if overwrites_old {
                    out.touches_history = true;
                }
                if let Some(p) = made_here(Place::InMessage(m)) {
                    places.insert(op_id(i), Some(p));
                }
            }
        }
    }
    let at: &[ChangeHash] = &[hash];
    for id in message_keys {
        match doc::message_at(doc, &id, (!linear).then_some(at)) {
            Ok(Some(m)) => out.added.push(m),
            Ok(None) => out.touches_history = true,
            Err(e) => return refuse(format!("the message {} is malformed: {e}", truncated(&id))),
        }
    }
    Ok(out)
}

fn truncated(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if s.chars().count() > 40 {
        out.push('…');
    }
    out
}

/// Judges one change by `who`, given what it does (`change`), the conversation before it (`None`
/// while the document holds no conversation yet) and after it. `now` is the judge's clock.
pub fn judge(
    doc_id: &str,
    before: Option<&DocHeader>,
    after: Option<&DocHeader>,
    change: &ChangeSummary,
    who: &ChangeAuthor,
    now: Timestamp,
) -> Result<(), Refusal> {
    if change.empty {
        return Ok(());
    }
    if let Some(what) = &change.foreign {
        return refuse(format!("a conversation holds only its own fields; the change writes {what}"));
    }
    let fixed = ["schema", "id", "team", "channel", "created_at", "customer", "messages", "room", "grab_requests"];
    if before.is_some() && change.root.iter().any(|k| fixed.contains(&k.as_str())) {
        return refuse("a conversation cannot change its id, team, channel, creation time or layout");
    }
    // A hand-over (↪) is one message naming the colleague, who the same change puts in the room
    // (and, in a grab-mode team, records as the representative).
    let mut handovers = change.added.iter().filter_map(|m| m.body.handed_to());
    let handover = handovers.next();
    if handovers.next().is_some() {
        return refuse("a change hands a conversation over once");
    }
    let Some(after) = after else {
        return refuse("the change does not leave a readable conversation");
    };
    let records_handover =
        before.is_some() && who.mode == TeamMode::Grab && handover.is_some_and(|to| after.owner.as_ref() == Some(to));
    if before.is_some() && change.root.contains("owner") && !records_handover {
        return refuse("only the relay records who won a grab");
    }
    if after.team != who.team {
        return refuse("a conversation cannot change its team");
    }
    let agent = &who.agent;
    let latest = now.plus(MAX_CLOCK_SKEW_MS);
    match before {
        None => judge_creation(doc_id, after, change, who, latest)?,
        Some(before) => {
            // Grab-mode teams: a conversation handled by one representative is invisible and
            // unjoinable for the others; they may only still ask to grab it (and lose).
            let handled_by_other = !access::may_act_on(who.mode, who.role, before.owner.as_ref(), agent);
            let only_grab = change.root.is_empty()
                && change.room.is_empty()
                && change.customer.is_empty()
                && change.added.is_empty()
                && !change.touches_history;
            if handled_by_other && !only_grab {
                return refuse("another representative handles this conversation");
            }
            let in_room_before = before.crew_in_room.contains(agent);
            for (who_, value) in &change.room {
                if who_ != agent {
                    if handover == Some(who_) && *value == Some(true) {
                        continue;
                    }
                    return refuse("agents join and leave only for themselves");
                }
                match value {
                    None => return refuse("the room holds true or false for each agent"),
                    Some(true) if !in_room_before => {
                        access::may_enter(who.mode, who.role, before.owner.as_ref(), agent).map_err(rule)?;
                    }
                    Some(_) => {}
                }
            }
            judge_grabs(&change.grabs, who)?;
            let in_room = in_room_before || after.crew_in_room.contains(agent);
            let admin = who.role == Role::Admin;
            if change.root.contains("closed_at") {
                if !(in_room || admin) {
                    return refuse("only agents in the conversation, or admins, close it");
                }
                match after.closed_at {
                    Some(at) if at <= latest => {}
                    Some(_) => return refuse("a conversation cannot be closed in the future"),
                    None => return refuse("a closed conversation reopens when the customer writes, not by a change"),
                }
            }
            if !change.customer.is_empty() {
                if !(in_room || admin) {
                    return refuse("only agents in the conversation, or admins, edit the customer's details");
                }
                if change.customer.contains("id") {
                    return refuse("the customer's id cannot change");
                }
                check_customer(after, Some(&change.customer))?;
            }
            if change.touches_history {
                return refuse("sent messages cannot be changed or deleted");
            }
            check_messages(&change.added, agent, latest)?;
            if let Some(to) = handover {
                access::may_hand_over(
                    who.mode,
                    who.role,
                    before.owner.as_ref(),
                    in_room_before,
                    agent,
                    to,
                    who.role_of(to),
                )
                .map_err(rule)?;
                if !after.crew_in_room.contains(to) {
                    return refuse("a hand-over puts the colleague in the conversation in the same change");
                }
                if who.mode == TeamMode::Grab && after.owner.as_ref() != Some(to) {
                    return refuse(
                        "in a grab-mode team a hand-over makes the colleague its representative in the same change",
                    );
                }
            }
            // Admins hand over without joining; every other message needs the room.
            let admin_handover = admin && change.added.len() == 1 && handover.is_some();
            if !change.added.is_empty() && !in_room && !admin_handover {
                return refuse("agents send messages only in conversations they have joined");
            }
        }
    }
    Ok(())
}

fn rule(e: crate::domain::DomainError) -> Refusal {
    Refusal(e.to_string())
}

fn judge_grabs(grabs: &[(AgentId, bool)], who: &ChangeAuthor) -> Result<(), Refusal> {
    for (agent, is_put) in grabs {
        if *agent != who.agent {
            return refuse("agents ask to grab only for themselves");
        }
        if !is_put {
            return refuse("a grab request holds the time it was made and cannot be withdrawn");
        }
        access::may_ask_to_grab(who.mode, who.role).map_err(rule)?;
    }
    Ok(())
}

/// The customer's details after a change: the fields it wrote (`written`, or all of them for a new
/// conversation) must be valid; details a gateway wrote earlier are left as they are.
fn check_customer(after: &DocHeader, written: Option<&BTreeSet<String>>) -> Result<(), Refusal> {
    let c = &after.customer;
    let wrote = |k: &str| written.is_none_or(|w| w.contains(k));
    let edit = CustomerEdit {
        name: wrote("name").then(|| c.name.clone()),
        email: c.email.clone().filter(|_| wrote("email")),
        phone: c.phone.clone().filter(|_| wrote("phone")),
        notes: c.notes.clone().filter(|_| wrote("notes")),
    };
    edit.validate().map_err(rule)?;
    let long = [&Some(c.name.clone()), &c.email, &c.phone]
        .iter()
        .any(|f| f.as_ref().is_some_and(|v| v.len() > MAX_CUSTOMER_FIELD_BYTES));
    if long || c.notes.as_ref().is_some_and(|n| n.len() > MAX_CUSTOMER_NOTES_BYTES) {
        return refuse("the customer's details are too long");
    }
    Ok(())
}

fn check_messages(added: &[Message], agent: &AgentId, latest: Timestamp) -> Result<(), Refusal> {
    for m in added {
        match &m.author {
            Author::Crew { agent: a } if a == agent => {}
            Author::Customer => {
                return refuse("customer messages come only from the customer's channel or an admin's import");
            }
            _ => return refuse("agents send messages only in their own name"),
        }
        m.body.validate().map_err(rule)?;
        if m.at > latest {
            return refuse("a message cannot be dated in the future (check this computer's clock)");
        }
        if m.at.0 < 0 {
            return refuse("a message cannot be dated before 1970");
        }
    }
    Ok(())
}

fn judge_creation(
    doc_id: &str,
    after: &DocHeader,
    change: &ChangeSummary,
    who: &ChangeAuthor,
    latest: Timestamp,
) -> Result<(), Refusal> {
    if after.id.as_str() != doc_id {
        return refuse("a new conversation must carry its own id");
    }
    access::may_open(who.role, after.channel).map_err(rule)?;
    if after.created_at > latest || after.created_at.0 < 0 {
        return refuse("a new conversation cannot be dated in the future");
    }
    if after.owner.is_some() {
        return refuse("only the relay records who won a grab");
    }
    if after.closed_at.is_some() {
        return refuse("a new conversation starts open");
    }
    if after.crew_in_room.iter().any(|a| *a != who.agent) {
        return refuse("agents join and leave only for themselves");
    }
    if !after.grab_requests.is_empty() {
        return refuse("a new conversation starts without grab requests");
    }
    check_customer(after, None)?;
    if after.channel == Channel::Email && after.customer.email.is_none() {
        return refuse("an email conversation needs the customer's email address");
    }
    if change.touches_history {
        return refuse("sent messages cannot be changed or deleted");
    }
    if change.added.iter().any(|m| m.body.handed_to().is_some()) {
        return refuse("a conversation is handed over once it has started");
    }
    check_messages(&change.added, &who.agent, latest)?;
    if !change.added.is_empty() && !after.crew_in_room.contains(&who.agent) {
        return refuse("agents send messages only in conversations they have joined");
    }
    Ok(())
}

/// The outcome of [`apply_judged`].
#[derive(Debug, Default)]
pub struct Verdict {
    /// Changes applied, in the order they were applied.
    pub accepted: Vec<ChangeHash>,
    /// Messages the accepted changes added.
    pub added: Vec<Message>,
    /// The first refused change and why (later changes that depend on it are dropped too).
    pub refused: Option<(ChangeHash, Refusal)>,
    /// Dependencies that neither the document nor the batch holds: the changes that need them
    /// were dropped, and the sender should be asked for these.
    pub missing: Vec<ChangeHash>,
    /// The changes that wait for those missing dependencies (not applied, not refused): the
    /// caller may keep them and offer them again once the dependencies arrive.
    pub deferred: Vec<Change>,
    /// A refused change could not be taken back out of the document: the caller must drop its
    /// copy and read the conversation again from storage.
    pub damaged: bool,
}

/// Applies a client's `changes` to `doc` one by one in causal order, each judged against the
/// conversation at its dependencies. Changes already present are skipped; a refused change is
/// rolled back (the document is rebuilt without it) and every change depending on it is dropped;
/// changes whose dependencies are missing are never applied, so nothing unjudged is kept.
pub fn apply_judged(
    doc: &mut Automerge,
    doc_id: &str,
    changes: Vec<Change>,
    who: &ChangeAuthor,
    now: Timestamp,
) -> Verdict {
    apply_judged_with(doc, doc_id, changes, who, now, &mut Headers::default())
}

/// Headers of one conversation already read, by the heads they were read at. A header at given
/// heads never changes, so nothing here goes stale. The judge needs the header before and after
/// each change, and reading one at past heads walks the change graph once per field; most changes
/// build on heads the judge has just seen (the relay keeps one of these per loaded conversation).
#[derive(Clone, Debug, Default)]
pub struct Headers(std::collections::VecDeque<(Vec<ChangeHash>, DocHeader)>);

impl Headers {
    /// Headers kept (the oldest read goes first).
    const KEPT: usize = 8;

    /// The header at `heads` (in any order), if read before.
    pub fn get(&self, heads: &[ChangeHash]) -> Option<&DocHeader> {
        self.find(&Self::key(heads))
    }

    /// Keeps `header` as the header at `heads` (in any order).
    pub fn put(&mut self, heads: &[ChangeHash], header: &DocHeader) {
        self.keep(Self::key(heads), header);
    }

    /// The header at `heads` (`current`: the document's heads), read or remembered.
    fn at(&mut self, doc: &Automerge, heads: &[ChangeHash], current: bool) -> Option<DocHeader> {
        let key = Self::key(heads);
        if let Some(known) = self.find(&key) {
            return Some(known.clone());
        }
        let header = header_at(doc, heads, current)?;
        self.keep(key, &header);
        Some(header)
    }

    /// Heads in the order headers are kept by.
    fn key(heads: &[ChangeHash]) -> Vec<ChangeHash> {
        let mut key = heads.to_vec();
        key.sort();
        key
    }

    fn find(&self, key: &[ChangeHash]) -> Option<&DocHeader> {
        self.0.iter().find(|(at, _)| at == key).map(|(_, h)| h)
    }

    fn keep(&mut self, key: Vec<ChangeHash>, header: &DocHeader) {
        if self.find(&key).is_some() {
            return;
        }
        if self.0.len() == Self::KEPT {
            self.0.pop_front();
        }
        self.0.push_back((key, header.clone()));
    }
}

/// [`apply_judged`] with the caller's headers of this conversation, kept from change to change.
pub fn apply_judged_with(
    doc: &mut Automerge,
    doc_id: &str,
    changes: Vec<Change>,
    who: &ChangeAuthor,
    now: Timestamp,
    headers: &mut Headers,
) -> Verdict {
    let mut verdict = Verdict::default();
    let mut waiting: Vec<Change> = Vec::new();
    let mut seen = HashSet::new();
    for c in changes {
        if !has_change(doc, &c.hash()) && seen.insert(c.hash()) {
            waiting.push(c);
        }
    }
    let mut dropped: HashSet<ChangeHash> = HashSet::new();
    loop {
        let ready = waiting.iter().position(|c| c.deps().iter().all(|d| has_change(doc, d)));
        let Some(index) = ready else { break };
        let change = waiting.swap_remove(index);
        if change.deps().iter().any(|d| dropped.contains(d)) {
            dropped.insert(change.hash());
            continue;
        }
        let hash = change.hash();
        if who.foreign_actors.contains(change.actor_id()) {
            dropped.insert(hash);
            let refusal = Refusal("the change was made with another agent's actor id".into());
            verdict.refused.get_or_insert((hash, refusal));
            continue;
        }
        let heads = doc.get_heads();
        let existed = matches!(doc::schema_of(doc), Ok(Some(_)));
        // The change was made on the document as it is when its dependencies include every head
        // (automerge also lists the actor's own previous change, often an ancestor of the heads).
        let on_heads = !heads.is_empty() && heads.iter().all(|h| change.deps().contains(h));
        let before = match on_heads {
            // The dependencies may name ancestors of the heads too (the author's previous change).
            true => headers.at(doc, &heads, true),
            false => headers.at(doc, change.deps(), false),
        };
        let expanded = change.decode();
        if let Err(refusal) = refuse_before_applying(&expanded) {
            dropped.insert(hash);
            verdict.refused.get_or_insert((hash, refusal));
            continue;
        }
        if let Err(e) = doc.apply_changes([change.clone()]) {
            dropped.insert(hash);
            verdict.refused.get_or_insert((hash, Refusal(format!("the change could not be applied ({e})"))));
            verdict.damaged |= !rebuild(doc, &heads);
            continue;
        }
        let judged = summarize_decoded(doc, &change, &expanded).and_then(|summary| {
            // A conversation is created once: a change made beside its creation (on a document
            // without it) would overwrite its fixed fields in a conflict. Found by fuzzing.
            if before.is_none() && existed && !summary.empty {
                return refuse("the conversation exists already; a change must build on it");
            }
            // A change that writes no field of the header (a message, the usual case) leaves it as
            // it was at its dependencies.
            let after = match &before {
                Some(before) if summary.leaves_header() => {
                    headers.put(&[hash], before);
                    Some(before.clone())
                }
                _ => headers.at(doc, &[hash], on_heads),
            };
            judge(doc_id, before.as_ref(), after.as_ref(), &summary, who, now).map(|()| summary.added)
        });
        match judged {
            Ok(added) => {
                verdict.accepted.push(hash);
                verdict.added.extend(added);
            }
            Err(refusal) => {
                dropped.insert(hash);
                verdict.refused.get_or_insert((hash, refusal));
                verdict.damaged |= !rebuild(doc, &heads);
            }
        }
    }
    let mut missing: BTreeSet<ChangeHash> = BTreeSet::new();
    for c in &waiting {
        for d in c.deps() {
            if !has_change(doc, d) && !dropped.contains(d) && !seen.contains(d) {
                missing.insert(*d);
            }
        }
    }
    verdict.missing = missing.into_iter().collect();
    // What waits only for missing changes (not for a dropped one, even through another waiting
    // change) is deferred; the rest is dropped with the refused change it depends on.
    loop {
        let before = dropped.len();
        for c in &waiting {
            if c.deps().iter().any(|d| dropped.contains(d)) {
                dropped.insert(c.hash());
            }
        }
        if dropped.len() == before {
            break;
        }
    }
    verdict.deferred = waiting.into_iter().filter(|c| !dropped.contains(&c.hash())).collect();
    verdict
}

/// Whether `doc` holds the change `hash`. (`get_change_by_hash` rebuilds the whole change from
/// the document's operations; the change graph answers this at once. `apply_judged` never gives
/// automerge a change whose dependencies are missing, so automerge has no queue to look in.)
pub fn has_change(doc: &Automerge, hash: &ChangeHash) -> bool {
    doc.get_missing_deps(std::slice::from_ref(hash)).is_empty()
}

/// The conversation's header at `heads` (`current`: they are the document's heads, read it as it
/// is). `None` while there is no conversation there yet, or it cannot be read.
fn header_at(doc: &Automerge, heads: &[ChangeHash], current: bool) -> Option<DocHeader> {
    if heads.is_empty() {
        return None;
    }
    let at = (!current).then_some(heads);
    match doc::schema_at(doc, at) {
        Ok(Some(v)) if (1..=SCHEMA_VERSION).contains(&v) => doc::read_header_at(doc, at).ok(),
        _ => None,
    }
}

/// Takes a refused change back out of `doc`: the document becomes what it was at `base` (its
/// heads before the refused change) again. `false` if that failed.
fn rebuild(doc: &mut Automerge, base: &[ChangeHash]) -> bool {
    let actor = doc.get_actor().clone();
    let rebuilt = match base.is_empty() {
        true => Ok(Automerge::new()),
        false => doc.fork_at(base),
    };
    match rebuilt {
        Ok(rebuilt) => {
            *doc = rebuilt.with_actor(actor);
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::domain::{Customer, CustomerId, MessageBody, MessageId};
    use automerge::transaction::{Transactable, Transaction};
    use automerge::{ActorId, ROOT};

    const NOW: Timestamp = Timestamp(1_800_000_000_000);
    const ID: &str = "2jQ5Vc7u9o1Wk6Bq3TXYtY7cWKdV";

    fn author(agent: &str, role: Role, mode: TeamMode) -> ChangeAuthor {
        let members = [("bob", Role::Representative), ("erin", Role::Representative), ("ann", Role::Admin)]
            .map(|(a, role)| Member { agent: a.into(), name: a.into(), role });
        ChangeAuthor {
            agent: agent.into(),
            team: "sales".into(),
            role,
            mode,
            foreign_actors: Vec::new(),
            members: std::sync::Arc::new(members.to_vec()),
        }
    }
    fn bob() -> ChangeAuthor {
        author("bob", Role::Representative, TeamMode::Open)
    }

    fn new(channel: Channel) -> doc::NewConversation {
        doc::NewConversation {
            id: ID.into(),
            team: "sales".into(),
            channel,
            customer: Customer {
                id: CustomerId("c1".into()),
                name: "Jane".into(),
                email: Some("jane@example.com".into()),
                phone: None,
                notes: None,
            },
            created_at: NOW.plus(-60_000),
        }
    }

    /// A conversation as the relay holds it: created by a gateway (not judged).
    fn stored() -> Automerge {
        doc::create(ActorId::random(), &new(Channel::WebWidget)).unwrap()
    }

    fn message(id: &str, agent: &str, at: Timestamp, body: MessageBody) -> Message {
        Message { id: MessageId(id.into()), at, author: doc::crew(&agent.into()), body }
    }
    fn text(t: &str) -> MessageBody {
        MessageBody::Text { text: t.into() }
    }

    /// Makes one change on a copy of `base` (as `actor`) and returns it.
    fn change(base: &Automerge, f: impl FnOnce(&mut Transaction<'_>) -> Result<(), doc::DocError>) -> Change {
        let mut copy = base.fork();
        copy.transact::<_, _, doc::DocError>(f).unwrap();
        copy.get_last_local_change().unwrap()
    }

    fn verdict(base: &mut Automerge, changes: Vec<Change>, who: &ChangeAuthor) -> Verdict {
        apply_judged(base, ID, changes, who, NOW)
    }

    fn refusal(
        base: &Automerge,
        who: &ChangeAuthor,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<(), doc::DocError>,
    ) -> String {
        let mut d = base.fork();
        let heads = d.get_heads();
        let c = change(base, f);
        let v = verdict(&mut d, vec![c], who);
        match v.refused {
            Some((_, r)) => {
                assert_eq!(d.get_heads(), heads, "a refused change is taken back out");
                assert!(v.accepted.is_empty());
                r.0
            }
            None => "accepted".into(),
        }
    }

    #[test]
    fn a_change_that_leaves_the_header_has_the_header_of_its_dependencies() {
        // Every kind of change, each made on a copy that has not seen the others (concurrent), then
        // all applied: where the summary says the header is left as it was, a fresh read at the
        // change agrees with the read at its dependencies (what the judge takes instead).
        let base = stored();
        type Edit = Box<dyn Fn(&mut Transaction<'_>) -> Result<(), doc::DocError>>;
        let kinds: Vec<(&str, Edit)> = vec![
            ("message", Box::new(|tx| doc::add_message(tx, &message("m1", "bob", NOW, text("hi"))))),
            ("join", Box::new(|tx| doc::set_in_room(tx, &AgentId::from("bob"), true))),
            ("close", Box::new(|tx| doc::close(tx, NOW))),
            ("grab", Box::new(|tx| doc::request_grab(tx, &AgentId::from("carol"), NOW))),
            ("owner", Box::new(|tx| doc::record_owner(tx, &AgentId::from("dan")))),
            ("notes", Box::new(|tx| tx.put(doc_obj(tx, "customer"), "notes", "VIP").map_err(Into::into))),
        ];
        let mut d = base.fork();
        let mut seen_left = 0;
        for (what, edit) in &kinds {
            let c = change(&base, |tx| edit(tx));
            d.apply_changes([c.clone()]).unwrap();
            let summary = summarize(&d, &c).unwrap();
            let before = header_at(&d, c.deps(), false).unwrap();
            let after = header_at(&d, &[c.hash()], false).unwrap();
            if summary.leaves_header() {
                seen_left += 1;
                assert_eq!(before, after, "{what}");
            } else {
                assert_ne!(before, after, "{what} writes the header");
            }
        }
        assert_eq!(seen_left, 1, "only the message leaves the header");
    }

    fn doc_obj(tx: &Transaction<'_>, key: &str) -> automerge::ObjId {
        match tx.get(ROOT, key).unwrap() {
            Some((automerge::Value::Object(_), id)) => id,
            _ => panic!("no {key}"),
        }
    }

    #[test]
    fn a_local_change_is_the_chunk_saved_after_the_heads_it_was_made_on() {
        // What the replica stores as a send's chunk without asking automerge to build it again.
        let mut d = stored();
        for n in 0..3 {
            let before = d.get_heads();
            d.transact::<_, _, doc::DocError>(|tx| {
                doc::add_message(tx, &message(&format!("m{n}"), "bob", NOW, text("hello")))
            })
            .unwrap();
            let c = d.get_last_local_change().unwrap();
            assert_eq!(d.get_heads(), [c.hash()]);
            assert_eq!(c.deps(), before.as_slice());
            assert_eq!(c.raw_bytes(), d.save_after(&before));
        }
    }

    #[test]
    fn join_send_leave_offline_is_accepted_change_by_change() {
        let mut d = stored();
        let mut offline = d.fork();
        let mut changes = Vec::new();
        let bob_id: AgentId = "bob".into();
        for step in 0..3 {
            offline
                .transact::<_, _, doc::DocError>(|tx| match step {
                    0 => doc::set_in_room(tx, &bob_id, true),
                    1 => doc::add_message(tx, &message("m1", "bob", NOW, text("On it"))),
                    _ => doc::set_in_room(tx, &bob_id, false),
                })
                .unwrap();
            changes.push(offline.get_last_local_change().unwrap());
        }
        changes.reverse(); // in any order: the judge applies them in causal order
        let v = verdict(&mut d, changes, &bob());
        assert_eq!(v.refused, None);
        assert_eq!(v.accepted.len(), 3);
        assert_eq!(v.added.len(), 1);
        assert_eq!(d.get_heads(), offline.get_heads());
    }

    #[test]
    fn a_refused_change_and_what_depends_on_it_are_dropped_the_rest_kept() {
        let mut d = stored();
        let bob_id: AgentId = "bob".into();
        let join = change(&d, |tx| doc::set_in_room(tx, &bob_id, true));
        let mut after_join = d.fork();
        after_join.apply_changes([join.clone()]).unwrap();
        let forged = change(&after_join, |tx| doc::record_owner(tx, &bob_id));
        let mut after_forged = after_join.fork();
        after_forged.apply_changes([forged.clone()]).unwrap();
        let reply = change(&after_forged, |tx| doc::add_message(tx, &message("m1", "bob", NOW, text("Hi"))));
        let v = verdict(&mut d, vec![join.clone(), forged.clone(), reply], &bob());
        assert_eq!(v.accepted, vec![join.hash()]);
        assert_eq!(v.refused.unwrap().0, forged.hash());
        assert_eq!(d.get_heads(), vec![join.hash()]);
        assert!(doc::all_messages(&d).unwrap().is_empty());
    }

    #[test]
    fn changes_whose_dependencies_are_missing_are_never_applied() {
        let mut d = stored();
        let bob_id: AgentId = "bob".into();
        let join = change(&d, |tx| doc::set_in_room(tx, &bob_id, true));
        let mut after_join = d.fork();
        after_join.apply_changes([join.clone()]).unwrap();
        let reply = change(&after_join, |tx| doc::add_message(tx, &message("m1", "bob", NOW, text("Hi"))));
        let heads = d.get_heads();
        let v = verdict(&mut d, vec![reply], &bob());
        assert!(v.accepted.is_empty() && v.refused.is_none());
        assert_eq!(v.missing, vec![join.hash()]);
        assert_eq!(d.get_heads(), heads);
    }

    /// A hand-over as the desk makes it: the message, the colleague in the room (and as the
    /// representative in a grab-mode team), the agent out of it when they were in.
    fn hand_over(
        from: &str,
        to: &str,
        grab: bool,
        leaves: bool,
    ) -> impl FnOnce(&mut Transaction<'_>) -> Result<(), doc::DocError> {
        let (from, to) = (AgentId::from(from), AgentId::from(to));
        move |tx| {
            let body = MessageBody::Transfer { to: to.clone() };
            doc::add_message(tx, &message("h1", from.as_str(), NOW, body))?;
            doc::hand_over(tx, &to, grab)?;
            if leaves {
                doc::set_in_room(tx, &from, false)?;
            }
            Ok(())
        }
    }

    #[test]
    fn a_hand_over_puts_the_colleague_in_and_is_refused_when_it_breaks_a_rule() {
        let open = stored();
        let mut joined = open.fork();
        joined.transact::<_, _, doc::DocError>(|tx| doc::set_in_room(tx, &"bob".into(), true)).unwrap();
        let ann = author("ann", Role::Admin, TeamMode::Open);
        // Open mode: in the room, to a colleague; admins also without joining.
        assert_eq!(refusal(&joined, &bob(), hand_over("bob", "erin", false, true)), "accepted");
        assert_eq!(refusal(&open, &ann, hand_over("ann", "erin", false, false)), "accepted");
        let cases: Vec<(&str, &Automerge, ChangeAuthor, Forge)> = vec![
            ("join the conversation first", &open, bob(), Box::new(hand_over("bob", "erin", false, false))),
            ("not a member of the team", &joined, bob(), Box::new(hand_over("bob", "mallory", false, true))),
            ("it is yours already", &joined, bob(), Box::new(hand_over("bob", "bob", false, false))),
            (
                "puts the colleague in the conversation",
                &joined,
                bob(),
                Box::new(|tx| {
                    doc::add_message(tx, &message("h1", "bob", NOW, MessageBody::Transfer { to: "erin".into() }))
                }),
            ),
            // The room entry for a colleague without the hand-over message: not allowed.
            (
                "join and leave only for themselves",
                &joined,
                bob(),
                Box::new(|tx| doc::hand_over(tx, &"erin".into(), false)),
            ),
            // Open mode records no representative.
            ("only the relay records who won a grab", &joined, bob(), Box::new(hand_over("bob", "erin", true, true))),
        ];
        for (expected, base, who, forge) in cases {
            let why = refusal(base, &who, forge);
            assert!(why.contains(expected), "expected “{expected}”, got “{why}”");
        }

        // Grab mode: bob won the grab (the relay recorded it); he hands it to erin, who becomes its
        // representative in the same change.
        let mut won = stored();
        won.transact::<_, _, doc::DocError>(|tx| doc::record_owner(tx, &"bob".into())).unwrap();
        let grab_bob = author("bob", Role::Representative, TeamMode::Grab);
        let grab_erin = author("erin", Role::Representative, TeamMode::Grab);
        let grab_ann = author("ann", Role::Admin, TeamMode::Grab);
        assert_eq!(refusal(&won, &grab_bob, hand_over("bob", "erin", true, true)), "accepted");
        assert_eq!(refusal(&won, &grab_ann, hand_over("ann", "erin", true, false)), "accepted");
        let cases: Vec<(&str, ChangeAuthor, Forge)> = vec![
            (
                "its representative in the same change",
                grab_bob.clone(),
                Box::new(hand_over("bob", "erin", false, true)),
            ),
            ("go to representatives", grab_bob.clone(), Box::new(hand_over("bob", "ann", true, true))),
            ("another representative handles", grab_erin, Box::new(hand_over("erin", "erin", true, false))),
            // Only a hand-over writes the representative.
            ("only the relay records who won a grab", grab_bob, Box::new(|tx| doc::record_owner(tx, &"erin".into()))),
        ];
        for (expected, who, forge) in cases {
            let why = refusal(&won, &who, forge);
            assert!(why.contains(expected), "expected “{expected}”, got “{why}”");
        }
        // Two hand-overs in one change, and one at creation, are refused.
        let twice = |tx: &mut Transaction<'_>| {
            hand_over("bob", "erin", true, true)(tx)?;
            doc::add_message(tx, &message("h2", "bob", NOW, MessageBody::Transfer { to: "erin".into() }))
        };
        assert!(refusal(&won, &author("bob", Role::Representative, TeamMode::Grab), twice).contains("once"));
        let mut created = Automerge::new();
        let first = change(&created, |tx| {
            doc::write_new(tx, &new(Channel::Email))?;
            doc::set_in_room(tx, &"bob".into(), true)?;
            doc::add_message(tx, &message("h1", "bob", NOW, MessageBody::Transfer { to: "erin".into() }))
        });
        let v = verdict(&mut created, vec![first], &bob());
        assert!(v.refused.unwrap().1.0.contains("once it has started"));
    }

    type Forge = Box<dyn FnOnce(&mut Transaction<'_>) -> Result<(), doc::DocError>>;

    #[test]
    fn every_rule_on_an_existing_conversation() {
        let d = stored();
        let mut joined = d.fork();
        joined.transact::<_, _, doc::DocError>(|tx| doc::set_in_room(tx, &"bob".into(), true)).unwrap();
        let cases: Vec<(&str, &Automerge, Forge)> = vec![
            ("cannot change its id, team, channel", &d, Box::new(|tx| Ok(tx.put(ROOT, "channel", "whatsapp")?))),
            ("cannot change its id, team, channel", &d, Box::new(|tx| Ok(tx.put(ROOT, "created_at", 1)?))),
            ("unknown field", &d, Box::new(|tx| Ok(tx.put(ROOT, "junk", "x".repeat(1 << 20))?))),
            ("only the relay records who won a grab", &d, Box::new(|tx| doc::record_owner(tx, &"bob".into()))),
            ("join and leave only for themselves", &d, Box::new(|tx| doc::set_in_room(tx, &"carol".into(), true))),
            (
                "true or false",
                &d,
                Box::new(|tx| {
                    let (_, room) = tx.get(ROOT, "room")?.unwrap();
                    Ok(tx.put(&room, "bob", 1)?)
                }),
            ),
            (
                "only in conversations they have joined",
                &d,
                Box::new(|tx| doc::add_message(tx, &message("m1", "bob", NOW, text("Hi")))),
            ),
            (
                "only in their own name",
                &joined,
                Box::new(|tx| doc::add_message(tx, &message("m1", "ada", NOW, text("Refund approved")))),
            ),
            (
                "customer messages come only",
                &joined,
                Box::new(|tx| {
                    doc::add_message(
                        tx,
                        &Message { author: Author::Customer, ..message("m1", "bob", NOW, text("Refund me")) },
                    )
                }),
            ),
            (
                "dated in the future",
                &joined,
                Box::new(|tx| doc::add_message(tx, &message("m1", "bob", NOW.plus(3_600_000), text("Hi")))),
            ),
            (
                "content address",
                &joined,
                Box::new(|tx| {
                    let body = MessageBody::Attachment {
                        blob: "sha256:../../../../etc/passwd".into(),
                        file_name: "passwd".into(),
                        mime: "text/plain".into(),
                        size: 1,
                    };
                    doc::add_message(tx, &message("m1", "bob", NOW, body))
                }),
            ),
            (
                "http(s) URL",
                &joined,
                Box::new(|tx| {
                    doc::add_message(
                        tx,
                        &message(
                            "m1",
                            "bob",
                            NOW,
                            MessageBody::ConferenceInvitation { url: "javascript:alert(1)".into() },
                        ),
                    )
                }),
            ),
            (
                "nests deeper",
                &joined,
                Box::new(|tx| {
                    let (_, messages) = tx.get(ROOT, "messages")?.unwrap();
                    let m = tx.put_object(&messages, "m1", automerge::ObjType::Map)?;
                    tx.put(&m, "id", "m1")?;
                    let mut obj = tx.put_object(&m, "deep", automerge::ObjType::Map)?;
                    for _ in 0..3_000 {
                        obj = tx.put_object(&obj, "x", automerge::ObjType::Map)?;
                    }
                    Ok(())
                }),
            ),
            ("or admins, close it", &d, Box::new(|tx| doc::close(tx, NOW))),
            (
                "or admins, edit the customer",
                &d,
                Box::new(|tx| {
                    doc::edit_customer(tx, &CustomerEdit { notes: Some("VIP".into()), ..Default::default() })
                }),
            ),
            (
                "email address is not valid",
                &joined,
                Box::new(|tx| {
                    doc::edit_customer(tx, &CustomerEdit { email: Some("nope".into()), ..Default::default() })
                }),
            ),
            (
                "customer's id cannot change",
                &joined,
                Box::new(|tx| {
                    let (_, c) = tx.get(ROOT, "customer")?.unwrap();
                    Ok(tx.put(&c, "id", "other")?)
                }),
            ),
        ];
        for (expected, base, f) in cases {
            let got = refusal(base, &bob(), f);
            assert!(got.contains(expected), "expected `{expected}`, got `{got}`");
        }
    }

    #[test]
    fn a_change_with_another_agents_actor_is_refused() {
        let mut d = stored();
        let mut as_carol = d.fork();
        as_carol.transact::<_, _, doc::DocError>(|tx| doc::set_in_room(tx, &"bob".into(), true)).unwrap();
        let c = as_carol.get_last_local_change().unwrap();
        let who = ChangeAuthor { foreign_actors: vec![c.actor_id().clone()], ..bob() };
        let v = verdict(&mut d, vec![c], &who);
        assert!(v.refused.unwrap().1.0.contains("another agent's actor"));
        assert!(v.accepted.is_empty());
    }

    #[test]
    fn a_second_creation_beside_the_first_is_refused() {
        let mut d = stored();
        let mut rival = Automerge::new();
        rival
            .transact::<_, _, doc::DocError>(|tx| {
                doc::write_new(tx, &doc::NewConversation { channel: Channel::Email, ..new(Channel::Email) })
            })
            .unwrap();
        let heads = d.get_heads();
        let v = verdict(&mut d, rival.get_changes(&[]), &bob());
        assert!(v.refused.unwrap().1.0.contains("exists already"));
        assert_eq!(d.get_heads(), heads);
        assert_eq!(doc::read_header(&d).unwrap().channel, Channel::WebWidget);
    }

    #[test]
    fn grab_mode_rules() {
        let rep = |a: &str| author(a, Role::Representative, TeamMode::Grab);
        let d = stored();
        assert!(
            refusal(&d, &rep("dave"), |tx| doc::request_grab(tx, &"erin".into(), NOW)).contains("only for themselves")
        );
        assert!(refusal(&d, &rep("dave"), |tx| doc::set_in_room(tx, &"dave".into(), true)).contains("grab it"));
        let admin = author("ada", Role::Admin, TeamMode::Grab);
        assert!(refusal(&d, &admin, |tx| doc::request_grab(tx, &"ada".into(), NOW)).contains("admins"));
        let mut asked = d.fork();
        asked.transact::<_, _, doc::DocError>(|tx| doc::request_grab(tx, &"erin".into(), NOW)).unwrap();
        let withdraw = |tx: &mut Transaction<'_>| {
            let (_, g) = tx.get(ROOT, "grab_requests")?.unwrap();
            Ok(tx.delete(&g, "erin")?)
        };
        assert!(refusal(&asked, &rep("dave"), withdraw).contains("only for themselves"));
        // Erin won: the conversation is hers; dave may still ask (and lose), nothing else.
        let mut won = asked.fork();
        won.transact::<_, _, doc::DocError>(|tx| doc::record_owner(tx, &"erin".into())).unwrap();
        assert!(refusal(&won, &rep("dave"), |tx| doc::close(tx, NOW)).contains("another representative"));
        assert!(
            refusal(&won, &rep("dave"), |tx| doc::set_in_room(tx, &"dave".into(), true))
                .contains("another representative")
        );
        assert_eq!(refusal(&won, &rep("dave"), |tx| doc::request_grab(tx, &"dave".into(), NOW)), "accepted");
        let reply = |tx: &mut Transaction<'_>| doc::add_message(tx, &message("m1", "erin", NOW, text("Hi")));
        assert_eq!(refusal(&won, &rep("erin"), reply), "accepted");
        assert_eq!(refusal(&won, &admin, |tx| doc::close(tx, NOW)), "accepted");
    }

    #[test]
    fn creation_is_judged_like_every_change() {
        // The layout and `f` in one change, as a modified client would send it.
        let create = |channel: Channel, f: &dyn Fn(&mut Transaction<'_>) -> Result<(), doc::DocError>| {
            let mut d = Automerge::new();
            d.transact::<_, _, doc::DocError>(|tx| {
                doc::write_new(tx, &new(channel))?;
                f(tx)
            })
            .unwrap();
            let mut relay = Automerge::new();
            let v = apply_judged(&mut relay, ID, d.get_changes(&[]), &bob(), NOW);
            if v.refused.is_some() {
                assert!(relay.get_heads().is_empty(), "nothing of a refused conversation is kept");
            }
            v.refused.map(|(_, r)| r.0).unwrap_or_else(|| "accepted".into())
        };
        let nothing = |_: &mut Transaction<'_>| Ok(());
        assert_eq!(create(Channel::Email, &nothing), "accepted");
        assert!(create(Channel::WhatsApp, &nothing).contains("start when the customer writes"));
        assert!(create(Channel::WebWidget, &nothing).contains("start when the customer writes"));
        let customer = |tx: &mut Transaction<'_>| {
            doc::add_message(tx, &Message { author: Author::Customer, ..message("m1", "bob", NOW, text("Hi")) })
        };
        let got = create(Channel::Email, &customer);
        assert!(got.contains("customer messages come only"), "{got}");
        let admin_in_room = |tx: &mut Transaction<'_>| doc::set_in_room(tx, &"ada".into(), true);
        assert!(create(Channel::Email, &admin_in_room).contains("only for themselves"));
        let in_ada_name = |tx: &mut Transaction<'_>| {
            doc::set_in_room(tx, &"bob".into(), true)?;
            doc::add_message(tx, &message("m1", "ada", NOW, text("Refund approved")))
        };
        assert!(create(Channel::Email, &in_ada_name).contains("own name"));
        let grab = |tx: &mut Transaction<'_>| doc::request_grab(tx, &"erin".into(), NOW);
        assert!(create(Channel::Email, &grab).contains("without grab requests"));
        let owner = |tx: &mut Transaction<'_>| doc::record_owner(tx, &"bob".into());
        assert!(create(Channel::Email, &owner).contains("who won a grab"));
        let own_reply = |tx: &mut Transaction<'_>| {
            doc::set_in_room(tx, &"bob".into(), true)?;
            doc::add_message(tx, &message("m1", "bob", NOW, text("Following up on your order")))
        };
        assert_eq!(create(Channel::Email, &own_reply), "accepted");
        let other_team = ChangeAuthor { team: "support".into(), ..bob() };
        let mut one = Automerge::new();
        let d = doc::create(ActorId::random(), &new(Channel::Email)).unwrap();
        let v = apply_judged(&mut one, ID, d.get_changes(&[]), &other_team, NOW);
        assert!(v.refused.unwrap().1.0.contains("team"));
        let mut one = Automerge::new();
        let v = apply_judged(&mut one, "another-id", d.get_changes(&[]), &bob(), NOW);
        assert!(v.refused.unwrap().1.0.contains("its own id"));
    }
}
