//! The sync protocol shared by replicas and the relay: automerge-repo's WebSocket wire format
//! (CBOR messages) and its document ids (bs58check of 16 bytes). Pure data in, data out.

pub mod document_id;
pub mod presence;
#[cfg(feature = "replica")]
pub mod session;
pub mod wire;

/// An attachment's content address: sha256 in lowercase hex (messages say `sha256:<this>`).
pub fn blob_hash(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
