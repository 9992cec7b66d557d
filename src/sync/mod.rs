//! The sync protocol shared by replicas and the relay: automerge-repo's WebSocket wire format
//! (CBOR messages) and its document ids (bs58check of 16 bytes). Pure data in, data out.

pub mod document_id;
pub mod presence;
#[cfg(feature = "replica")]
pub mod session;
pub mod wire;
