//! The sync protocol shared by replicas and the relay: automerge-repo's WebSocket wire format
//! (CBOR messages) and its document ids (bs58check of 16 bytes). Pure data in, data out.

#[cfg(feature = "replica")]
pub mod bounded;
pub mod document_id;
pub mod presence;
#[cfg(feature = "replica")]
pub mod relay_doc;
#[cfg(feature = "replica")]
pub mod session;
pub mod wire;

/// SHA-256 in lowercase hex (content addresses, token hashes, ids derived from other ids).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
