//! Web-widget presence as it travels in automerge-repo `ephemeral` messages: a small CBOR map
//! `{type: "presence", online, last_active, location}`; and someone typing in a conversation,
//! `{type: "typing", from: "customer"}` or `{type: "typing", from: "crew", agent}` (the relay
//! writes the agent itself: what a client says of who is typing is never passed on). Never stored
//! in any document.

use crate::domain::{AgentId, Presence, Timestamp};
use ciborium::Value;

pub fn encode(p: &Presence) -> Vec<u8> {
    let mut entries = vec![
        (Value::Text("type".into()), Value::Text("presence".into())),
        (Value::Text("online".into()), Value::Bool(p.online)),
    ];
    if let Some(t) = p.last_active {
        entries.push((Value::Text("last_active".into()), Value::Integer(t.0.into())));
    }
    if let Some(l) = &p.location {
        entries.push((Value::Text("location".into()), Value::Text(l.clone())));
    }
    let mut out = Vec::new();
    let _ = ciborium::into_writer(&Value::Map(entries), &mut out);
    out
}

/// `None` for anything that is not a presence message (other ephemeral traffic is not ours).
pub fn decode(data: &[u8]) -> Option<Presence> {
    let Value::Map(entries) = ciborium::from_reader::<Value, _>(data).ok()? else { return None };
    let get = |k: &str| entries.iter().find(|(key, _)| key.as_text() == Some(k)).map(|(_, v)| v);
    if get("type")?.as_text()? != "presence" {
        return None;
    }
    Some(Presence {
        online: get("online")?.as_bool()?,
        last_active: get("last_active").and_then(|v| v.as_integer()).and_then(|i| i64::try_from(i).ok()).map(Timestamp),
        location: get("location").and_then(|v| v.as_text()).map(|s| s.chars().take(120).collect()),
    })
}

/// Who is typing in a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Typing {
    Customer,
    Crew(AgentId),
}

pub fn encode_typing(t: &Typing) -> Vec<u8> {
    let mut entries = vec![(Value::Text("type".into()), Value::Text("typing".into()))];
    match t {
        Typing::Customer => entries.push((Value::Text("from".into()), Value::Text("customer".into()))),
        Typing::Crew(agent) => {
            entries.push((Value::Text("from".into()), Value::Text("crew".into())));
            entries.push((Value::Text("agent".into()), Value::Text(agent.as_str().to_owned())));
        }
    }
    let mut out = Vec::new();
    let _ = ciborium::into_writer(&Value::Map(entries), &mut out);
    out
}

/// `None` for anything that is not a typing message.
pub fn decode_typing(data: &[u8]) -> Option<Typing> {
    let Value::Map(entries) = ciborium::from_reader::<Value, _>(data).ok()? else { return None };
    let get = |k: &str| entries.iter().find(|(key, _)| key.as_text() == Some(k)).and_then(|(_, v)| v.as_text());
    if get("type")? != "typing" {
        return None;
    }
    match get("from")? {
        "customer" => Some(Typing::Customer),
        "crew" => {
            let agent = get("agent").unwrap_or_default();
            Some(Typing::Crew(AgentId::from(agent.chars().take(64).collect::<String>().as_str())))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_round_trips_and_is_not_presence() {
        for t in [Typing::Customer, Typing::Crew(AgentId::from("bob"))] {
            assert_eq!(decode_typing(&encode_typing(&t)), Some(t.clone()));
            assert_eq!(decode(&encode_typing(&t)), None);
        }
        let p = Presence { online: true, last_active: None, location: None };
        assert_eq!(decode_typing(&encode(&p)), None);
        assert_eq!(decode_typing(b"garbage"), None);
    }

    #[test]
    fn round_trip_and_foreign_payloads_are_ignored() {
        let p = Presence { online: true, last_active: Some(Timestamp(5)), location: Some("Oslo, Norway".into()) };
        assert_eq!(decode(&encode(&p)), Some(p));
        assert_eq!(decode(b"garbage"), None);
        let mut other = Vec::new();
        ciborium::into_writer(&Value::Map(vec![(Value::Text("cursor".into()), Value::Integer(3.into()))]), &mut other)
            .unwrap_or(());
        assert_eq!(decode(&other), None);
    }
}
