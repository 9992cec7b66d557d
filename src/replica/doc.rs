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
    doc.transact::<_, _, DocError>(|tx| write_new(tx, new)).map_err(|f| f.error)?;
    Ok(doc)
}

/// Writes a new conversation's layout into an empty document.
pub fn write_new(tx: &mut Transaction<'_>, new: &NewConversation) -> Result<(), DocError> {
    tx.put(ROOT, "schema", SCHEMA_VERSION)?;
    tx.put(ROOT, "id", new.id.as_str())?;
    tx.put(ROOT, "team", new.team.as_str())?;
    tx.put(ROOT, "channel", new.channel.as_str())?;
    tx.put(ROOT, "created_at", new.created_at.0)?;
    let customer = tx.put_object(ROOT, "customer", ObjType::Map)?;
    tx.put(&customer, "id", new.customer.id.as_str())?;
    tx.put(&customer, "name", new.customer.name.as_str())?;
    for (key, value) in [("email", &new.customer.email), ("phone", &new.customer.phone), ("notes", &new.customer.notes)]
    {
        put_opt_str(tx, &customer, key, value.as_deref())?;
    }
    tx.put_object(ROOT, "messages", ObjType::Map)?;
    tx.put_object(ROOT, "room", ObjType::Map)?;
    tx.put_object(ROOT, "grab_requests", ObjType::Map)?;
    tx.put(ROOT, "closed_at", ScalarValue::Null)?;
    tx.put(ROOT, "owner", ScalarValue::Null)?;
    Ok(())
}

fn put_opt_str(tx: &mut Transaction<'_>, obj: &ObjId, key: &str, value: Option<&str>) -> Result<(), AutomergeError> {
    match value {
        Some(v) => tx.put(obj, key, v),
        None => tx.put(obj, key, ScalarValue::Null),
    }
}

/// Where a read looks: the document as it is (`None`) or as it was at some heads.
pub type At<'a> = Option<&'a [ChangeHash]>;

fn get_at<R: ReadDoc>(
    doc: &R,
    obj: &ObjId,
    key: &str,
    at: At<'_>,
) -> Result<Option<(Value<'static>, ObjId)>, DocError> {
    let found = match at {
        None => doc.get(obj, key)?,
        Some(heads) => doc.get_at(obj, key, heads)?,
    };
    Ok(found.map(|(v, id)| (v.into_owned(), id)))
}

fn map_obj<R: ReadDoc>(doc: &R, parent: &ObjId, key: &str) -> Result<ObjId, DocError> {
    map_obj_at(doc, parent, key, None)
}

fn map_obj_at<R: ReadDoc>(doc: &R, parent: &ObjId, key: &str, at: At<'_>) -> Result<ObjId, DocError> {
    match get_at(doc, parent, key, at)? {
        Some((Value::Object(ObjType::Map), id)) => Ok(id),
        _ => Err(DocError::Malformed(format!("`{key}` is missing or not a map"))),
    }
}

fn get_scalar<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str, at: At<'_>) -> Result<Option<ScalarValue>, DocError> {
    Ok(match get_at(doc, obj, key, at)? {
        Some((Value::Scalar(s), _)) => Some(s.into_owned()),
        _ => None,
    })
}

fn get_str<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str, at: At<'_>) -> Result<Option<String>, DocError> {
    Ok(match get_scalar(doc, obj, key, at)? {
        Some(ScalarValue::Str(s)) => Some(s.to_string()),
        _ => None,
    })
}

fn get_int<R: ReadDoc>(doc: &R, obj: &ObjId, key: &str, at: At<'_>) -> Result<Option<i64>, DocError> {
    Ok(match get_scalar(doc, obj, key, at)? {
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
    schema_at(doc, None)
}

/// The schema number as of `at`.
pub fn schema_at<R: ReadDoc>(doc: &R, at: At<'_>) -> Result<Option<i64>, DocError> {
    get_int(doc, &ROOT, "schema", at)
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
    read_header_at(doc, None)
}

/// The header as of `at` (the state a change was made on, when `at` are its dependencies).
pub fn read_header_at<R: ReadDoc>(doc: &R, at: At<'_>) -> Result<DocHeader, DocError> {
    let channel_name = require(get_str(doc, &ROOT, "channel", at)?, "channel")?;
    let channel = Channel::parse(&channel_name)
        .ok_or_else(|| DocError::Malformed(format!("unknown channel `{channel_name}`")))?;
    let customer_obj = map_obj_at(doc, &ROOT, "customer", at)?;
    let customer = Customer {
        id: CustomerId(get_str(doc, &customer_obj, "id", at)?.unwrap_or_default()),
        name: get_str(doc, &customer_obj, "name", at)?.unwrap_or_default(),
        email: get_str(doc, &customer_obj, "email", at)?,
        phone: get_str(doc, &customer_obj, "phone", at)?,
        notes: get_str(doc, &customer_obj, "notes", at)?,
    };
    let entries = |obj: &ObjId| -> Vec<(String, Value<'static>)> {
        let range = match at {
            None => doc.map_range(obj, ..),
            Some(heads) => doc.map_range_at(obj, .., heads),
        };
        range.map(|item| (item.key.to_string(), item.value.into_value().into_owned())).collect()
    };
    let room = map_obj_at(doc, &ROOT, "room", at)?;
    let mut crew_in_room: Vec<AgentId> =
        entries(&room).into_iter().filter(|(_, v)| v.as_bool() == Some(true)).map(|(k, _)| AgentId(k)).collect();
    crew_in_room.sort();
    let grabs = map_obj_at(doc, &ROOT, "grab_requests", at)?;
    let mut grab_requests: Vec<(AgentId, Timestamp)> =
        entries(&grabs).into_iter().map(|(k, v)| (AgentId(k), Timestamp(v.as_i64().unwrap_or(0)))).collect();
    grab_requests.sort();
    Ok(DocHeader {
        id: ConversationId(require(get_str(doc, &ROOT, "id", at)?, "id")?),
        team: TeamId(require(get_str(doc, &ROOT, "team", at)?, "team")?),
        channel,
        created_at: Timestamp(require(get_int(doc, &ROOT, "created_at", at)?, "created_at")?),
        customer,
        crew_in_room,
        closed_at: get_int(doc, &ROOT, "closed_at", at)?.map(Timestamp),
        owner: get_str(doc, &ROOT, "owner", at)?.map(AgentId),
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

/// A hand-over's effect, written by the agent handing over in the same change as the
/// [`crate::domain::MessageBody::Transfer`] message: the colleague joins the room and, in a
/// grab-mode team (`records_owner`), becomes the conversation's representative.
pub fn hand_over(tx: &mut Transaction<'_>, to: &AgentId, records_owner: bool) -> Result<(), DocError> {
    if records_owner {
        tx.put(ROOT, "owner", to.as_str())?;
    }
    set_in_room(tx, to, true)
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
    message_at(doc, id, None)
}

/// A message as of `at` (read with the limits of [`read_json`]).
pub fn message_at<R: ReadDoc>(doc: &R, id: &str, at: At<'_>) -> Result<Option<Message>, DocError> {
    let messages = map_obj_at(doc, &ROOT, "messages", at)?;
    let Some((Value::Object(ObjType::Map), obj)) = get_at(doc, &messages, id, at)? else {
        return Ok(None);
    };
    let json = read_json(doc, &obj, at)?;
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

/// How deep a message's fields may nest (a message is three levels deep: message, body, params).
pub const MAX_JSON_DEPTH: usize = 6;
/// How many fields and list items one message may hold in all.
pub const MAX_JSON_NODES: usize = 1_024;
/// How many bytes of text one message may hold in all.
pub const MAX_JSON_TEXT_BYTES: usize = 256 * 1024;

/// Reads an object of plain maps, lists, text and scalars as JSON, without recursion and within
/// [`MAX_JSON_DEPTH`], [`MAX_JSON_NODES`] and [`MAX_JSON_TEXT_BYTES`]: documents come from clients,
/// so anything beyond those limits is refused as malformed instead of read.
pub fn read_json<R: ReadDoc>(doc: &R, obj: &ObjId, at: At<'_>) -> Result<Json, DocError> {
    struct Node {
        kind: Option<ObjType>,
        scalar: Json,
        key: Option<String>,
        children: Vec<usize>,
    }
    let malformed = |what: &str| DocError::Malformed(format!("a message {what}"));
    let mut nodes =
        vec![Node { kind: Some(doc.object_type(obj)?), scalar: Json::Null, key: None, children: Vec::new() }];
    // Objects still to read: (node, object, depth). Children are read after their parent, so
    // building the values from the last node to the first finds every child already built.
    let mut pending = vec![(0_usize, obj.clone(), 1_usize)];
    let mut text_bytes = 0_usize;
    while let Some((index, id, depth)) = pending.pop() {
        let kind = nodes[index].kind.unwrap_or(ObjType::Map);
        let entries: Vec<(Option<String>, Value<'_>, ObjId)> = match kind {
            ObjType::Map | ObjType::Table => {
                let range = match at {
                    None => doc.map_range(&id, ..),
                    Some(heads) => doc.map_range_at(&id, .., heads),
                };
                range
                    .take(MAX_JSON_NODES + 1)
                    .map(|item| {
                        let child = item.id();
                        (Some(item.key.to_string()), item.value.into_value(), child)
                    })
                    .collect()
            }
            ObjType::List => {
                let range = match at {
                    None => doc.list_range(&id, ..),
                    Some(heads) => doc.list_range_at(&id, .., heads),
                };
                range
                    .take(MAX_JSON_NODES + 1)
                    .map(|item| {
                        let child = item.id();
                        (None, item.value.into_value(), child)
                    })
                    .collect()
            }
            ObjType::Text => {
                let text = match at {
                    None => doc.text(&id)?,
                    Some(heads) => doc.text_at(&id, heads)?,
                };
                text_bytes += text.len();
                nodes[index].scalar = Json::String(text);
                Vec::new()
            }
        };
        for (key, value, child) in entries {
            if nodes.len() >= MAX_JSON_NODES {
                return Err(malformed(&format!("holds more than {MAX_JSON_NODES} fields")));
            }
            text_bytes += key.as_ref().map_or(0, String::len);
            let next = nodes.len();
            match value {
                Value::Object(kind) => {
                    if depth >= MAX_JSON_DEPTH {
                        return Err(malformed(&format!("nests deeper than {MAX_JSON_DEPTH} levels")));
                    }
                    nodes.push(Node { kind: Some(kind), scalar: Json::Null, key, children: Vec::new() });
                    pending.push((next, child, depth + 1));
                }
                Value::Scalar(s) => {
                    let scalar = scalar_json(&s);
                    if let Json::String(t) = &scalar {
                        text_bytes += t.len();
                    }
                    nodes.push(Node { kind: None, scalar, key, children: Vec::new() });
                }
            }
            nodes[index].children.push(next);
        }
        if text_bytes > MAX_JSON_TEXT_BYTES {
            return Err(malformed(&format!("holds more than {MAX_JSON_TEXT_BYTES} bytes of text")));
        }
    }
    let mut built: Vec<Json> = vec![Json::Null; nodes.len()];
    for index in (0..nodes.len()).rev() {
        let children = std::mem::take(&mut nodes[index].children);
        let value = match nodes[index].kind {
            None | Some(ObjType::Text) => std::mem::take(&mut nodes[index].scalar),
            Some(ObjType::List) => Json::Array(children.iter().map(|c| std::mem::take(&mut built[*c])).collect()),
            Some(ObjType::Map | ObjType::Table) => Json::Object(
                children
                    .iter()
                    .map(|c| (nodes[*c].key.take().unwrap_or_default(), std::mem::take(&mut built[*c])))
                    .collect(),
            ),
        };
        built[index] = value;
    }
    Ok(built.into_iter().next().unwrap_or_default())
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
