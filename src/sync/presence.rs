//! Web-widget presence as it travels in automerge-repo `ephemeral` messages: a small CBOR map
//! `{type: "presence", online, last_active, location}`. Never stored in any document.

use crate::domain::{Presence, Timestamp};
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

#[cfg(test)]
mod tests {
    use super::*;

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
