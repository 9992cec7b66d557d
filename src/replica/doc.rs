//! The automerge document of one conversation: its layout, and the operations that read and change
//! it. Shared by replicas and the relay so that both write exactly the same shape.
//!
//! Layout (root map): `schema`, `id`, `team`, `channel`, `created_at`, `customer` {id, name, email,
//! phone, notes}, `messages` {message id → {id, at, author, body}}, `room` {agent → bool},
//! `closed_at`, `owner`, `grab_requests` {agent → requested at}. Messages live in a map keyed by
//! id, so concurrent sends never duplicate; readers order them by (at, id).

use crate::domain::{
    AgentId, Author, Channel, ConversationId, Customer, CustomerEdit, CustomerId, Message, MessageId, TeamId, Timestamp,
};
use automerge::transaction::{Transactable, Transaction};
use automerge::{ActorId, AutomergeError, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use automerge::{Automerge, PatchAction};
use serde_json::Value as Json;

/// The document layout this build reads and writes. Documents with a higher number come from a
/// newer Crewdesk and are refused rather than misread.
pub const SCHEMA_VERSION: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error("the conversation data is corrupt and was not applied: {0}")]
    Corrupt(String),
    #[error(
        "the conversation was written by a newer Crewdesk (document schema {found}, this build reads up to {supported}); update Crewdesk"
    )]
    UnknownSchema { found: i64, supported: i64 },
    #[error("the conversation document is malformed: {0}")]
    Malformed(String),
}

impl From<AutomergeError> for DocError {
    fn from(e: AutomergeError) -> Self {
        DocError::Corrupt(e.to_string())
    }
}

/// What a gateway or an agent needs to open a new conversation.
#[derive(Clone, Debug)]
pub struct NewConversation {
    pub id: ConversationId,
    pub team: TeamId,
    pub channel: Channel,
    pub customer: Customer,
    pub created_at: Timestamp,
}

/// The top-level fields of a conversation, read without touching its messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocHeader {
    pub id: ConversationId,
    pub team: TeamId,
    pub channel: Channel,
    pub created_at: Timestamp,
    pub customer: Customer,
    pub crew_in_room: Vec<AgentId>,
    pub closed_at: Option<Timestamp>,
    pub owner: Option<AgentId>,
    pub grab_requests: Vec<(AgentId, Timestamp)>,
}

/// Creates the document of a new conversation with `actor`.
pub fn create(actor: ActorId, new: &NewConversation) -> Result<Automerge, DocError> {
    let mut doc = Automerge::new().with_actor(actor);
    doc.transact::<_, _, AutomergeError>(|tx| {
        tx.put(ROOT, "schema", SCHEMA_VERSION)?;
        tx.put(ROOT, "id", new.id.as_str())?;
        tx.put(ROOT, "team", new.team.as_str())?;
        tx.put(ROOT, "channel", new.channel.as_str())?;
        tx.put(ROOT, "created_at", new.created_at.0)?;
        let customer = tx.put_object(ROOT, "customer", ObjType::Map)?;
        tx.put(&customer, "id", new.customer.id.as_str())?;
        tx.put(&customer, "name", new.customer.name.as_str())?;
        for (key, value) in
            [("email", &new.customer.email), ("phone", &new.customer.phone), ("notes", &new.customer.notes)]
        {
            put_opt_str(tx, &customer, key, value.as_deref())?;
        }
        tx.put_object(ROOT, "messages", ObjType::Map)?;
        tx.put_object(ROOT, "room", ObjType::Map)?;
        tx.put_object(ROOT, "grab_requests", ObjType::Map)?;
        tx.put(ROOT, "closed_at", ScalarValue::Null)?;
        tx.put(ROOT, "owner", ScalarValue::Null)?;
        Ok(())
    })
    .map_err(|f| DocError::from(f.error))?;
    Ok(doc)
}

fn put_opt_str(tx: &mut Transaction<'_>, obj: &ObjId, key: &str, value: Option<&str>) -> Result<(), AutomergeError> {
    match value {
        Some(v) => tx.put(obj, key, v),
        None => tx.put(obj, key, ScalarValue::Null),
    }
}

fn map_obj<R: ReadDoc>(doc: &R, parent: &ObjId, key: &str) -> Result<ObjId, DocError> {
    match doc.get(parent, key)? {
        Some((Value::Object(ObjType::Map), id)) => Ok(id),
        _ => Err(DocError::Malformed(format!("`{key}` is missing or not a map"))),
    }
}

fn get_scalar<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Result<Option<ScalarValue>, DocError> {
    Ok(match doc.get(obj, key)? {
        Some((Value::Scalar(s), _)) => Some(s.into_owned()),
        _ => None,
    })
}

fn get_str<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Result<Option<String>, DocError> {
    Ok(match get_scalar(doc, obj, key)? {
        Some(ScalarValue::Str(s)) => Some(s.to_string()),
        _ => None,
    })
}

fn get_int<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str) -> Result<Option<i64>, DocError> {
    Ok(match get_scalar(doc, obj, key)? {
        Some(ScalarValue::Int(i) | ScalarValue::Timestamp(i)) => Some(i),
        Some(ScalarValue::Uint(u)) => i64::try_from(u).ok(),
        Some(ScalarValue::F64(f)) if f.is_finite() => Some(f as i64),
        _ => None,
    })
}

fn require<T>(value: Option<T>, what: &str) -> Result<T, DocError> {
    value.ok_or_else(|| DocError::Malformed(format!("`{what}` is missing")))
}

/// The document's schema number, if it has one yet (a document still waiting for its first change
/// has none).
pub fn schema_of<R: ReadDoc>(doc: &R) -> Result<Option<i64>, DocError> {
    get_int(doc, &ROOT, "schema")
}

/// Refuses documents from a newer Crewdesk. `Ok(false)` means "no content yet".
pub fn check_schema<R: ReadDoc>(doc: &R) -> Result<bool, DocError> {
    match schema_of(doc)? {
        None => Ok(false),
        Some(v) if (1..=SCHEMA_VERSION).contains(&v) => Ok(true),
        Some(found) => Err(DocError::UnknownSchema { found, supported: SCHEMA_VERSION }),
    }
}

pub fn read_header<R: ReadDoc>(doc: &R) -> Result<DocHeader, DocError> {
    let channel_name = require(get_str(doc, &ROOT, "channel")?, "channel")?;
    let channel = Channel::parse(&channel_name)
        .ok_or_else(|| DocError::Malformed(format!("unknown channel `{channel_name}`")))?;
    let customer_obj = map_obj(doc, &ROOT, "customer")?;
    let customer = Customer {
        id: CustomerId(get_str(doc, &customer_obj, "id")?.unwrap_or_default()),
        name: get_str(doc, &customer_obj, "name")?.unwrap_or_default(),
        email: get_str(doc, &customer_obj, "email")?,
        phone: get_str(doc, &customer_obj, "phone")?,
        notes: get_str(doc, &customer_obj, "notes")?,
    };
    let room = map_obj(doc, &ROOT, "room")?;
    let mut crew_in_room: Vec<AgentId> = doc
        .map_range(&room, ..)
        .filter(|item| item.value.clone().into_value().as_bool() == Some(true))
        .map(|item| AgentId(item.key.to_string()))
        .collect();
    crew_in_room.sort();
    let grabs = map_obj(doc, &ROOT, "grab_requests")?;
    let mut grab_requests: Vec<(AgentId, Timestamp)> = doc
        .map_range(&grabs, ..)
        .map(|item| (AgentId(item.key.to_string()), Timestamp(item.value.clone().into_value().as_i64().unwrap_or(0))))
        .collect();
    grab_requests.sort();
    Ok(DocHeader {
        id: ConversationId(require(get_str(doc, &ROOT, "id")?, "id")?),
        team: TeamId(require(get_str(doc, &ROOT, "team")?, "team")?),
        channel,
        created_at: Timestamp(require(get_int(doc, &ROOT, "created_at")?, "created_at")?),
        customer,
        crew_in_room,
        closed_at: get_int(doc, &ROOT, "closed_at")?.map(Timestamp),
        owner: get_str(doc, &ROOT, "owner")?.map(AgentId),
        grab_requests,
    })
}

/// Adds a message (a map under `messages`, keyed by its id).
pub fn add_message(tx: &mut Transaction<'_>, message: &Message) -> Result<(), DocError> {
    let messages = map_obj(tx, &ROOT, "messages")?;
    let json = serde_json::to_value(message).map_err(|e| DocError::Malformed(e.to_string()))?;
    let obj = tx.put_object(&messages, message.id.as_str(), ObjType::Map)?;
    put_json_fields(tx, &obj, &json)?;
    Ok(())
}

pub fn set_in_room(tx: &mut Transaction<'_>, agent: &AgentId, in_room: bool) -> Result<(), DocError> {
    let room = map_obj(tx, &ROOT, "room")?;
    tx.put(&room, agent.as_str(), in_room)?;
    Ok(())
}

pub fn close(tx: &mut Transaction<'_>, at: Timestamp) -> Result<(), DocError> {
    tx.put(ROOT, "closed_at", at.0)?;
    Ok(())
}

pub fn request_grab(tx: &mut Transaction<'_>, agent: &AgentId, at: Timestamp) -> Result<(), DocError> {
    let grabs = map_obj(tx, &ROOT, "grab_requests")?;
    tx.put(&grabs, agent.as_str(), at.0)?;
    Ok(())
}

/// Only the relay calls this: records the grab winner and puts them in the room.
pub fn record_owner(tx: &mut Transaction<'_>, agent: &AgentId) -> Result<(), DocError> {
    tx.put(ROOT, "owner", agent.as_str())?;
    set_in_room(tx, agent, true)
}

/// Writes each edited field separately so concurrent edits of different fields both survive.
pub fn edit_customer(tx: &mut Transaction<'_>, edit: &CustomerEdit) -> Result<(), DocError> {
    let customer = map_obj(tx, &ROOT, "customer")?;
    if let Some(name) = &edit.name {
        tx.put(&customer, "name", name.trim())?;
    }
    for (key, value) in [("email", &edit.email), ("phone", &edit.phone), ("notes", &edit.notes)] {
        if let Some(v) = value {
            let v = v.trim();
            put_opt_str(tx, &customer, key, (!v.is_empty()).then_some(v))?;
        }
    }
    Ok(())
}

pub fn message<R: ReadDoc>(doc: &R, id: &str) -> Result<Option<Message>, DocError> {
    let messages = map_obj(doc, &ROOT, "messages")?;
    let Some((Value::Object(ObjType::Map), obj)) = doc.get(&messages, id)? else {
        return Ok(None);
    };
    let json = read_json(doc, &obj)?;
    let message: Message =
        serde_json::from_value(json).map_err(|e| DocError::Malformed(format!("message {id}: {e}")))?;
    if message.id.as_str() != id {
        return Err(DocError::Malformed(format!("message {id} carries id {}", message.id)));
    }
    Ok(Some(message))
}

/// Every message, in (at, id) order. Loads the whole map: for the index use `messages_added`.
pub fn all_messages<R: ReadDoc>(doc: &R) -> Result<Vec<Message>, DocError> {
    let messages = map_obj(doc, &ROOT, "messages")?;
    let keys: Vec<String> = doc.keys(&messages).collect();
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        if let Some(m) = message(doc, &key)? {
            out.push(m);
        }
    }
    out.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
    Ok(out)
}

/// Messages that appeared between two sets of heads (what a merge brought in).
pub fn messages_added(doc: &Automerge, before: &[ChangeHash], after: &[ChangeHash]) -> Result<Vec<Message>, DocError> {
    if before.is_empty() {
        return all_messages(doc);
    }
    let messages = map_obj(doc, &ROOT, "messages")?;
    let mut ids: Vec<String> = doc
        .diff(before, after)
        .into_iter()
        .filter_map(|patch| match patch.action {
            PatchAction::PutMap { key, .. } if patch.obj == messages => Some(key),
            _ => None,
        })
        .collect();
    ids.sort();
    ids.dedup();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(m) = message(doc, &id)? {
            out.push(m);
        }
    }
    Ok(out)
}

/// What the changes since `before` did to the messages: the messages they added, and whether they
/// touched (edited, replaced or deleted) any message that existed at `before`. Sent messages are
/// history: the relay refuses changes that touch them. Reads only the new changes' operations (and,
/// for objects older than them, where those objects sit), so the cost follows the size of the
/// change, not of the conversation.
pub fn message_changes(doc: &Automerge, before: &[ChangeHash]) -> Result<(Vec<Message>, bool), DocError> {
    use automerge::legacy::{Key, OpType};
    use std::collections::{BTreeSet, HashMap, HashSet};
    if before.is_empty() {
        return Ok((all_messages(doc)?, false));
    }
    let messages = map_obj(doc, &ROOT, "messages")?;
    let messages_id = messages.to_string();
    let changes: Vec<automerge::ExpandedChange> = doc.get_changes(before).into_iter().map(|c| c.decode()).collect();
    let op_id = |c: &automerge::ExpandedChange, i: usize| format!("{}@{}", c.start_op.get() + i as u64, c.actor_id);
    let new_ops: HashSet<String> =
        changes.iter().flat_map(|c| (0..c.operations.len()).map(move |i| op_id(c, i))).collect();
    // The message each object lies in (`None`: outside the messages): objects made by these changes
    // inherit it from where they were made; older objects are looked up once.
    let mut owner: HashMap<String, Option<String>> = HashMap::new();
    let mut added = BTreeSet::new();
    let mut touched = false;
    for c in &changes {
        for (i, op) in c.operations.iter().enumerate() {
            let obj = op.obj.to_string();
            let key = match &op.key {
                Key::Map(k) => Some(k.to_string()),
                Key::Seq(_) => None,
            };
            let overwrites_old = op.pred.iter().any(|p| !new_ops.contains(&p.to_string()));
            let inside = if obj == "_root" {
                // The messages map itself replaced or removed.
                touched |= key.as_deref() == Some("messages");
                None
            } else if obj == messages_id {
                let Some(k) = key else {
                    touched = true;
                    continue;
                };
                // An older value under this key (overwritten, deleted, or left in conflict) is a
                // message that existed before.
                let older = doc.get_all(&messages, k.as_str())?.iter().any(|(_, v)| !new_ops.contains(&v.to_string()));
                if overwrites_old || older {
                    touched = true;
                } else if !matches!(op.action, OpType::Delete) {
                    added.insert(k.clone());
                }
                Some(k)
            } else {
                match owner.get(&obj) {
                    Some(o) => o.clone(),
                    None => {
                        // Made before these changes: inside a message means inside a sent message.
                        let id = doc.import_obj(&obj)?;
                        let o = doc.parents(&id)?.find(|p| p.obj == messages).and_then(|p| match p.prop {
                            automerge::Prop::Map(key) => Some(key),
                            automerge::Prop::Seq(_) => None,
                        });
                        touched |= o.is_some();
                        owner.insert(obj, o.clone());
                        o
                    }
                }
            };
            if matches!(op.action, OpType::Make(_)) {
                owner.insert(op_id(c, i), inside);
            }
        }
    }
    let mut out = Vec::with_capacity(added.len());
    for id in added {
        if let Some(m) = message(doc, &id)? {
            out.push(m);
        }
    }
    Ok((out, touched))
}

/// Splits automerge's binary format (a document save and/or change chunks, as `save`,
/// `save_after` and `save_incremental` produce) into verified changes. Unlike automerge's
/// `load_incremental`, which skips what it cannot parse, any damage is an error here.
pub fn parse_changes(bytes: &[u8]) -> Result<Vec<automerge::Change>, DocError> {
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    let corrupt = |what: &str| DocError::Corrupt(what.to_owned());
    let mut changes = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < 10 || rest[..4] != MAGIC {
            return Err(corrupt("not automerge data (bad magic bytes)"));
        }
        let chunk_type = rest[8];
        // Data length: unsigned LEB128 after magic (4), checksum (4) and type (1).
        let (mut len, mut shift, mut pos) = (0_u64, 0_u32, 9_usize);
        loop {
            let byte = *rest.get(pos).ok_or_else(|| corrupt("truncated chunk header"))?;
            pos += 1;
            len |= u64::from(byte & 0x7f).checked_shl(shift).ok_or_else(|| corrupt("chunk length overflows"))?;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 63 {
                return Err(corrupt("chunk length overflows"));
            }
        }
        let end = usize::try_from(len).ok().and_then(|l| pos.checked_add(l)).filter(|&e| e <= rest.len());
        let end = end.ok_or_else(|| corrupt("truncated chunk"))?;
        let chunk = &rest[..end];
        match chunk_type {
            0 => {
                let options = automerge::LoadOptions::new().on_partial_load(automerge::OnPartialLoad::Error);
                let doc = Automerge::load_with_options(chunk, options)?;
                changes.extend(doc.get_changes(&[]));
            }
            1 | 2 => changes.push(automerge::Change::try_from(chunk).map_err(|e| DocError::Corrupt(e.to_string()))?),
            other => return Err(DocError::Corrupt(format!("unsupported chunk type {other}"))),
        }
        rest = &rest[end..];
    }
    Ok(changes)
}

/// A new conversation id: a random automerge-repo document id.
pub fn new_conversation_id(rng: &mut impl rand::Rng) -> ConversationId {
    ConversationId(crate::sync::document_id::encode(&rng.random()))
}

pub fn new_message_id(rng: &mut impl rand::Rng) -> MessageId {
    MessageId(random_id(rng))
}

/// 128 random bits, hex: unguessable and collision-free in practice.
pub fn random_id(rng: &mut impl rand::Rng) -> String {
    format!("{:032x}", rng.random::<u128>())
}

/// An author that names a crew member.
pub fn crew(agent: &AgentId) -> Author {
    Author::Crew { agent: agent.clone() }
}

// JSON <-> automerge: messages are written as nested maps of scalars so that any automerge client
// (the npm automerge-repo ones included) reads them as plain objects.

fn put_json_fields(tx: &mut Transaction<'_>, obj: &ObjId, json: &Json) -> Result<(), DocError> {
    let Json::Object(map) = json else {
        return Err(DocError::Malformed("expected an object".into()));
    };
    for (key, value) in map {
        put_json(tx, obj, key, value)?;
    }
    Ok(())
}

fn put_json(tx: &mut Transaction<'_>, obj: &ObjId, key: &str, value: &Json) -> Result<(), DocError> {
    match value {
        Json::Null => tx.put(obj, key, ScalarValue::Null)?,
        Json::Bool(b) => tx.put(obj, key, *b)?,
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => tx.put(obj, key, i)?,
            (None, Some(u), _) => tx.put(obj, key, u)?,
            (_, _, Some(f)) => tx.put(obj, key, f)?,
            _ => return Err(DocError::Malformed("unrepresentable number".into())),
        },
        Json::String(s) => tx.put(obj, key, s.as_str())?,
        Json::Array(items) => {
            let list = tx.put_object(obj, key, ObjType::List)?;
            for (i, item) in items.iter().enumerate() {
                match item {
                    Json::String(s) => tx.insert(&list, i, s.as_str())?,
                    other => {
                        return Err(DocError::Malformed(format!("lists hold strings only, got {other}")));
                    }
                }
            }
        }
        Json::Object(_) => {
            let child = tx.put_object(obj, key, ObjType::Map)?;
            put_json_fields(tx, &child, value)?;
        }
    }
    Ok(())
}

fn read_json<R: ReadDoc>(doc: &R, obj: &ObjId) -> Result<Json, DocError> {
    let kind = doc.object_type(obj)?;
    let entries: Vec<(Option<String>, Value<'_>, ObjId)> = match kind {
        ObjType::Map | ObjType::Table => doc
            .map_range(obj, ..)
            .map(|item| {
                let id = item.id();
                (Some(item.key.to_string()), item.value.into_value(), id)
            })
            .collect(),
        ObjType::List => doc
            .list_range(obj, ..)
            .map(|item| {
                let id = item.id();
                (None, item.value.into_value(), id)
            })
            .collect(),
        ObjType::Text => return Ok(Json::String(doc.text(obj)?)),
    };
    let mut map = serde_json::Map::new();
    let mut list = Vec::new();
    for (key, value, id) in entries {
        let json = match value {
            Value::Object(_) => read_json(doc, &id)?,
            Value::Scalar(s) => scalar_json(&s),
        };
        match key {
            Some(k) => {
                map.insert(k, json);
            }
            None => list.push(json),
        }
    }
    Ok(if kind == ObjType::List { Json::Array(list) } else { Json::Object(map) })
}

fn scalar_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Int(i) | ScalarValue::Timestamp(i) => Json::from(*i),
        ScalarValue::Uint(u) => Json::from(*u),
        // JavaScript clients write every number as a float: whole ones read back as integers.
        ScalarValue::F64(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Json::from(*f as i64),
        ScalarValue::F64(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(c) => Json::from(i64::from(c)),
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Bytes(_) | ScalarValue::Unknown { .. } | ScalarValue::Null => Json::Null,
    }
}
