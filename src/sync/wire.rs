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
    #[error("message field `{0}` is longer than {1} bytes")]
    TooLong(&'static str, usize),
    #[error("frame is not a protocol message: {0}")]
    Shape(&'static str),
}

/// Longest peer, document or session id a message may carry (automerge-repo's are 20 to 60 bytes).
pub const MAX_ID_BYTES: usize = 256;
/// Protocol versions a `join` may offer that are kept.
const MAX_VERSIONS: usize = 16;
/// Longest `type` and error text.
pub const MAX_TEXT_BYTES: usize = 4 * 1024;
/// A protocol message is a map of a dozen fields; nothing needs more CBOR items or nesting.
const MAX_CBOR_ITEMS: usize = 256;
const MAX_CBOR_DEPTH: usize = 8;

/// Walks a frame's CBOR structure without building anything, iteratively: at most
/// [`MAX_CBOR_ITEMS`] items nested at most [`MAX_CBOR_DEPTH`] deep, every length within the frame.
/// Run before the frame is decoded, so a small frame can never expand into a large value (CBOR
/// arrays of one-byte items would take ~50 times their size once decoded) nor nest without limit.
fn scan_cbor(frame: &[u8]) -> Result<(), WireError> {
    let shape = WireError::Shape;
    // Items still expected at each open level (`None`: indefinite length, ends with a break).
    let mut open: Vec<Option<u64>> = vec![Some(1)];
    let (mut pos, mut items) = (0_usize, 0_usize);
    while let Some(top) = open.last_mut() {
        if *top == Some(0) {
            open.pop();
            continue;
        }
        let initial = *frame.get(pos).ok_or(shape("truncated"))?;
        pos += 1;
        if initial == 0xff {
            if top.is_some() {
                return Err(shape("unexpected break"));
            }
            open.pop();
            continue;
        }
        if let Some(n) = top {
            *n -= 1;
        }
        items += 1;
        if items > MAX_CBOR_ITEMS {
            return Err(shape("too many items"));
        }
        let (major, info) = (initial >> 5, initial & 0x1f);
        let argument = match info {
            0..=23 => Some(u64::from(info)),
            24..=27 => {
                let width = 1_usize << (info - 24);
                let bytes = frame.get(pos..pos + width).ok_or(shape("truncated"))?;
                pos += width;
                Some(bytes.iter().fold(0_u64, |acc, b| (acc << 8) | u64::from(*b)))
            }
            31 if matches!(major, 4 | 5) => None,
            _ => return Err(shape("unsupported encoding")),
        };
        match (major, argument) {
            (0 | 1 | 7, _) => {}
            (2 | 3, Some(len)) => {
                let end = usize::try_from(len).ok().and_then(|l| pos.checked_add(l)).filter(|e| *e <= frame.len());
                pos = end.ok_or(shape("a string is longer than the frame"))?;
            }
            (4, count) => open.push(count),
            (5, count) => open.push(count.map(|c| c.saturating_mul(2))),
            (6, _) => open.push(Some(1)),
            _ => return Err(shape("unsupported encoding")),
        }
        if open.len() > MAX_CBOR_DEPTH {
            return Err(shape("nested too deep"));
        }
        // A declared count larger than the bytes left cannot be honest (each item takes a byte).
        if let Some(Some(n)) = open.last()
            && *n > (frame.len() - pos) as u64
        {
            return Err(shape("more items declared than the frame holds"));
        }
    }
    Ok(())
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
        scan_cbor(frame)?;
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
            Some(Value::Text(t)) => {
                let max = if key.ends_with("Id") { MAX_ID_BYTES } else { MAX_TEXT_BYTES };
                if t.len() > max {
                    return Err(WireError::TooLong(key, max));
                }
                Ok(t.clone())
            }
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
                    // automerge-repo knows one version; a few are kept, the rest ignored.
                    Some(Value::Array(items)) => {
                        items.iter().filter_map(|v| v.as_text().map(str::to_owned)).take(MAX_VERSIONS).collect()
                    }
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
        assert!(matches!(WireMessage::decode(&[0xff, 0x00]), Err(WireError::Shape(_))));
        assert!(matches!(WireMessage::decode(&[0x01]), Err(WireError::NotAMap)));
        assert!(matches!(WireMessage::decode(&vec![0; MAX_FRAME_BYTES + 1]), Err(WireError::TooLarge(_))));
        let no_data = WireMessage::Other { kind: "sync".into() }.encode();
        assert_eq!(WireMessage::decode(&no_data), Err(WireError::Field("senderId")));
    }

    #[test]
    fn frames_that_would_expand_or_nest_are_refused_before_decoding() {
        // 3,000 nested arrays; an array declaring 2^60 items; 100,000 one-byte items.
        let deep = [vec![0x81_u8; 3_000], vec![0x00]].concat();
        assert!(matches!(WireMessage::decode(&deep), Err(WireError::Shape(_))));
        let huge = [0x9b, 0x10, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(WireMessage::decode(&huge), Err(WireError::Shape(_))));
        let wide = [vec![0x9a, 0, 1, 0x86, 0xa0], vec![0_u8; 100_000]].concat();
        assert!(matches!(WireMessage::decode(&wide), Err(WireError::Shape(_))));
        let string = [vec![0x7b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], vec![b'a'; 10]].concat();
        assert!(matches!(WireMessage::decode(&string), Err(WireError::Shape(_))));
        // Every prefix of a real message is an error, never a panic.
        let m =
            WireMessage::Sync { sender_id: "a".into(), target_id: "b".into(), document_id: "d".into(), data: vec![1] };
        let bytes = m.encode();
        for n in 0..bytes.len() {
            assert!(WireMessage::decode(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn ids_are_bounded() {
        let m = WireMessage::Sync {
            sender_id: "x".repeat(MAX_ID_BYTES + 1),
            target_id: "b".into(),
            document_id: "d".into(),
            data: vec![1],
        };
        assert_eq!(WireMessage::decode(&m.encode()), Err(WireError::TooLong("senderId", MAX_ID_BYTES)));
    }
}
