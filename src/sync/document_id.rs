//! automerge-repo document ids: bs58check (Bitcoin alphabet, 4-byte double-SHA-256 checksum) of 16
//! random bytes. Conversation ids are document ids, so any automerge-repo client can address them.

use sha2::{Digest, Sha256};

const ALPHABET: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentIdError {
    #[error("`{0}` is not a document id (expected base58check of 16 bytes)")]
    Invalid(String),
}

fn checksum(payload: &[u8]) -> [u8; 4] {
    let twice = Sha256::digest(Sha256::digest(payload));
    [twice[0], twice[1], twice[2], twice[3]]
}

/// bs58check-encodes 16 bytes.
pub fn encode(bytes: &[u8; 16]) -> String {
    let mut data = bytes.to_vec();
    data.extend_from_slice(&checksum(bytes));
    let zeros = data.iter().take_while(|b| **b == 0).count();
    // Repeated division of the big-endian number by 58.
    let mut digits: Vec<u8> = Vec::new();
    for &byte in &data {
        let mut carry = u32::from(byte);
        for d in digits.iter_mut() {
            carry += u32::from(*d) << 8;
            *d = (carry % 58) as u8;
            carry /= 58;
        }
        while carry > 0 {
            digits.push((carry % 58) as u8);
            carry /= 58;
        }
    }
    let mut out = String::with_capacity(zeros + digits.len());
    out.extend(std::iter::repeat_n('1', zeros));
    out.extend(digits.iter().rev().map(|d| ALPHABET[*d as usize] as char));
    out
}

/// Decodes and verifies a document id.
pub fn decode(id: &str) -> Result<[u8; 16], DocumentIdError> {
    let invalid = || DocumentIdError::Invalid(id.chars().take(64).collect());
    if id.is_empty() || id.len() > 64 {
        return Err(invalid());
    }
    let zeros = id.bytes().take_while(|b| *b == b'1').count();
    let mut bytes: Vec<u8> = Vec::new();
    for c in id.bytes() {
        let mut carry = ALPHABET.iter().position(|a| *a == c).ok_or_else(invalid)? as u32;
        for b in bytes.iter_mut() {
            carry += u32::from(*b) * 58;
            *b = (carry & 0xff) as u8;
            carry >>= 8;
        }
        while carry > 0 {
            bytes.push((carry & 0xff) as u8);
            carry >>= 8;
        }
    }
    let mut data = vec![0_u8; zeros];
    data.extend(bytes.iter().rev());
    if data.len() != 20 {
        return Err(invalid());
    }
    let (payload, check) = data.split_at(16);
    if checksum(payload) != check {
        return Err(invalid());
    }
    let mut out = [0_u8; 16];
    out.copy_from_slice(payload);
    Ok(out)
}

pub fn is_valid(id: &str) -> bool {
    decode(id).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_automerge_repo_test_vectors() {
        assert_eq!(encode(&[0; 16]), "11111111111111114Ki9Gx");
        let seq: [u8; 16] = std::array::from_fn(|i| i as u8);
        assert_eq!(encode(&seq), "1Bhh3pU9gLXZiNDL6PEa1Gs9fh");
        let bytes = decode("4NMNnkMhL8jXrdJ9jamS58PAVdXu").unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "f1c29c8474c84adeb800be47627d33bf");
        assert_eq!(decode("1Bhh3pU9gLXZiNDL6PEa1Gs9fh").unwrap(), seq);
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in ["", "conv-00001", "1Bhh3pU9gLXZiNDL6PEa1Gs9fj", "0OIl", "11111111111111114Ki9Gx1"] {
            assert!(decode(bad).is_err(), "{bad}");
        }
    }
}
