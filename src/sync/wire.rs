//! automerge-repo's WebSocket messages: one CBOR map per binary frame. Decoding is strict about
//! what matters (types, byte strings, size) and lenient about the rest (unknown keys, `undefined`,
//! float timestamps), as the JS clients require.

use ciborium::Value;

/// Frames larger than this are refused before decoding.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PeerMetadata {
    pub storage_id: Option<String>,
    pub is_ephemeral: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireMessage {
    Join {
        sender_id: String,
        peer_metadata: PeerMetadata,
        supported_protocol_versions: Vec<String>,
    },
    Peer {
        sender_id: String,
        target_id: String,
        peer_metadata: PeerMetadata,
        selected_protocol_version: String,
    },
    Error {
        sender_id: String,
        target_id: String,
        message: String,
    },
    Request {
        sender_id: String,
        target_id: String,
        document_id: String,
        data: Vec<u8>,
    },
    Sync {
        sender_id: String,
        target_id: String,
        document_id: String,
        data: Vec<u8>,
    },
    DocUnavailable {
        sender_id: String,
        target_id: String,
        document_id: String,
    },
    Ephemeral {
        sender_id: String,
        target_id: String,
        document_id: String,
        count: u64,
        session_id: String,
        data: Vec<u8>,
    },
    /// Messages a relay may ignore (leave, remote-subscription-change, remote-heads-changed, ...).
    Other {
        kind: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("frame is not valid CBOR: {0}")]
    Cbor(String),
    #[error("message is not a CBOR map")]
    NotAMap,
    #[error("message field `{0}` is missing or has the wrong type")]
    Field(&'static str),
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn metadata_value(m: &PeerMetadata) -> Value {
    let mut entries = Vec::new();
    if let Some(id) = &m.storage_id {
        entries.push((text("storageId"), text(id)));
    }
    entries.push((text("isEphemeral"), Value::Bool(m.is_ephemeral)));
    Value::Map(entries)
}

impl WireMessage {
    pub fn encode(&self) -> Vec<u8> {
        let mut e: Vec<(Value, Value)> = Vec::new();
        let mut put = |k: &str, v: Value| e.push((text(k), v));
        match self {
            WireMessage::Join { sender_id, peer_metadata, supported_protocol_versions } => {
                put("type", text("join"));
                put("senderId", text(sender_id));
                put("peerMetadata", metadata_value(peer_metadata));
                put(
                    "supportedProtocolVersions",
                    Value::Array(supported_protocol_versions.iter().map(|v| text(v)).collect()),
                );
            }
            WireMessage::Peer { sender_id, target_id, peer_metadata, selected_protocol_version } => {
                put("type", text("peer"));
                put("senderId", text(sender_id));
                put("targetId", text(target_id));
                put("peerMetadata", metadata_value(peer_metadata));
                put("selectedProtocolVersion", text(selected_protocol_version));
            }
            WireMessage::Error { sender_id, target_id, message } => {
                put("type", text("error"));
                put("senderId", text(sender_id));
                put("targetId", text(target_id));
                put("message", text(message));
            }
            WireMessage::Request { sender_id, target_id, document_id, data }
            | WireMessage::Sync { sender_id, target_id, document_id, data } => {
                put("type", text(if matches!(self, WireMessage::Request { .. }) { "request" } else { "sync" }));
                put("senderId", text(sender_id));
                put("targetId", text(target_id));
                put("documentId", text(document_id));
                put("data", Value::Bytes(data.clone()));
            }
            WireMessage::DocUnavailable { sender_id, target_id, document_id } => {
                put("type", text("doc-unavailable"));
                put("senderId", text(sender_id));
                put("targetId", text(target_id));
                put("documentId", text(document_id));
            }
            WireMessage::Ephemeral { sender_id, target_id, document_id, count, session_id, data } => {
                put("type", text("ephemeral"));
                put("senderId", text(sender_id));
                put("targetId", text(target_id));
                put("documentId", text(document_id));
                put("count", Value::Integer((*count).into()));
                put("sessionId", text(session_id));
                put("data", Value::Bytes(data.clone()));
            }
            WireMessage::Other { kind } => put("type", text(kind)),
        }
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = ciborium::into_writer(&Value::Map(e), &mut out);
        out
    }

    pub fn decode(frame: &[u8]) -> Result<WireMessage, WireError> {
        if frame.len() > MAX_FRAME_BYTES {
            return Err(WireError::TooLarge(frame.len()));
        }
        let value: Value = ciborium::from_reader(frame).map_err(|e| WireError::Cbor(e.to_string()))?;
        let Value::Map(entries) = value else { return Err(WireError::NotAMap) };
        let get = |key: &str| {
            entries
                .iter()
                .find(|(k, _)| matches!(k, Value::Text(t) if t == key))
                .map(|(_, v)| v)
                .filter(|v| !v.is_null())
        };
        let string = |key: &'static str| match get(key) {
            Some(Value::Text(t)) => Ok(t.clone()),
            _ => Err(WireError::Field(key)),
        };
        let bytes = |key: &'static str| match get(key) {
            Some(Value::Bytes(b)) => Ok(b.clone()),
            _ => Err(WireError::Field(key)),
        };
        let metadata = || {
            let Some(Value::Map(m)) = get("peerMetadata").or_else(|| get("metadata")) else {
                return PeerMetadata::default();
            };
            let field = |key: &str| m.iter().find(|(k, _)| matches!(k, Value::Text(t) if t == key)).map(|(_, v)| v);
            PeerMetadata {
                storage_id: match field("storageId") {
                    Some(Value::Text(t)) => Some(t.clone()),
                    _ => None,
                },
                is_ephemeral: matches!(field("isEphemeral"), Some(Value::Bool(true))),
            }
        };
        let kind = string("type")?;
        Ok(match kind.as_str() {
            "join" => WireMessage::Join {
                sender_id: string("senderId")?,
                peer_metadata: metadata(),
                supported_protocol_versions: match get("supportedProtocolVersions") {
                    Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_text().map(str::to_owned)).collect(),
                    _ => vec!["1".to_owned()],
                },
            },
            "peer" => WireMessage::Peer {
                sender_id: string("senderId")?,
                target_id: string("targetId")?,
                peer_metadata: metadata(),
                selected_protocol_version: string("selectedProtocolVersion").unwrap_or_else(|_| "1".into()),
            },
            "error" => WireMessage::Error {
                sender_id: string("senderId").unwrap_or_default(),
                target_id: string("targetId").unwrap_or_default(),
                message: string("message")?,
            },
            "request" | "sync" => {
                let (sender_id, target_id, document_id, data) =
                    (string("senderId")?, string("targetId")?, string("documentId")?, bytes("data")?);
                if kind == "request" {
                    WireMessage::Request { sender_id, target_id, document_id, data }
                } else {
                    WireMessage::Sync { sender_id, target_id, document_id, data }
                }
            }
            "doc-unavailable" => WireMessage::DocUnavailable {
                sender_id: string("senderId")?,
                target_id: string("targetId")?,
                document_id: string("documentId")?,
            },
            "ephemeral" => WireMessage::Ephemeral {
                sender_id: string("senderId")?,
                target_id: string("targetId")?,
                document_id: string("documentId")?,
                count: match get("count") {
                    Some(Value::Integer(i)) => u64::try_from(*i).map_err(|_| WireError::Field("count"))?,
                    Some(Value::Float(f)) if *f >= 0.0 => *f as u64,
                    _ => return Err(WireError::Field("count")),
                },
                session_id: string("sessionId")?,
                data: bytes("data")?,
            },
            _ => WireMessage::Other { kind },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_real_javascript_join() {
        // Captured from @automerge/automerge-repo 2.5.6 (peer "peer-test", no storage: storageId undefined).
        let mut frame = vec![0xb9, 0x00, 0x04, 0x64];
        frame.extend(b"type");
        frame.push(0x64);
        frame.extend(b"join");
        frame.push(0x68);
        frame.extend(b"senderId");
        frame.push(0x69);
        frame.extend(b"peer-test");
        frame.push(0x6c);
        frame.extend(b"peerMetadata");
        frame.extend([0xb9, 0x00, 0x02, 0x69]);
        frame.extend(b"storageId");
        frame.extend([0xf7, 0x6b]);
        frame.extend(b"isEphemeral");
        frame.extend([0xf5, 0x78, 0x19]);
        frame.extend(b"supportedProtocolVersions");
        frame.extend([0x81, 0x61, b'1']);
        assert_eq!(
            WireMessage::decode(&frame).unwrap(),
            WireMessage::Join {
                sender_id: "peer-test".into(),
                peer_metadata: PeerMetadata { storage_id: None, is_ephemeral: true },
                supported_protocol_versions: vec!["1".into()],
            }
        );
    }

    #[test]
    fn round_trips_and_data_is_a_byte_string() {
        let m = WireMessage::Sync {
            sender_id: "a".into(),
            target_id: "b".into(),
            document_id: "d".into(),
            data: vec![0x42, 1, 2],
        };
        let bytes = m.encode();
        assert!(bytes.windows(4).any(|w| w == [0x43, 0x42, 1, 2]), "data must be a CBOR bstr");
        assert_eq!(WireMessage::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn hostile_frames_are_errors() {
        assert!(matches!(WireMessage::decode(&[0xff, 0x00]), Err(WireError::Cbor(_))));
        assert!(matches!(WireMessage::decode(&[0x01]), Err(WireError::NotAMap)));
        assert!(matches!(WireMessage::decode(&vec![0; MAX_FRAME_BYTES + 1]), Err(WireError::TooLarge(_))));
        let no_data = WireMessage::Other { kind: "sync".into() }.encode();
        assert_eq!(WireMessage::decode(&no_data), Err(WireError::Field("senderId")));
    }
}
