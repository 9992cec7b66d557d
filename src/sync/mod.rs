//! The sync protocol shared by replicas and the relay: automerge-repo's WebSocket wire format
//! (CBOR messages) and its document ids (bs58check of 16 bytes). Pure data in, data out.

pub mod document_id;
pub mod presence;
#[cfg(feature = "replica")]
pub mod session;
pub mod wire;

/// SHA-256 in lowercase hex (content addresses, token hashes, ids derived from other ids).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// An attachment's content address: sha256 in lowercase hex (messages say `sha256:<this>`).
pub fn blob_hash(bytes: &[u8]) -> String {
    sha256_hex(bytes)
}

/// How a message names a file: `sha256:<content address>`.
pub fn blob_reference(hash: &str) -> String {
    format!("sha256:{hash}")
}

/// The content address a message's file reference names (the reference itself when it has no
/// `sha256:` prefix; [`is_blob_hash`] tells whether that names a file).
pub fn blob_hash_of(reference: &str) -> &str {
    reference.strip_prefix("sha256:").unwrap_or(reference)
}

/// True for a well-formed content address (64 lowercase hex digits); anything else names no file.
pub fn is_blob_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}
