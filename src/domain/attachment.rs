//! What may be sent as an attachment (📎): the content decides the type, never the name or what
//! the sender declares. Checked where a file is picked (desktop) and again where it is stored
//! (relay).

use super::DomainError;

/// Largest attachment, in bytes (the relay's default limit; a relay may be configured lower).
pub const MAX_ATTACHMENT_BYTES: usize = 10 * 1024 * 1024;

/// What the bytes really are, from their first bytes (never from the name or the declared type).
pub fn sniff(bytes: &[u8]) -> Option<&'static str> {
    let starts = |magic: &[u8]| bytes.starts_with(magic);
    Some(if starts(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if starts(b"\xff\xd8\xff") {
        "image/jpeg"
    } else if starts(b"GIF87a") || starts(b"GIF89a") {
        "image/gif"
    } else if bytes.len() > 12 && starts(b"RIFF") && &bytes[8..12] == b"WEBP" {
        "image/webp"
    } else if starts(b"%PDF-") {
        "application/pdf"
    } else if starts(b"PK\x03\x04") {
        "application/zip"
    } else if !bytes.contains(&0) && std::str::from_utf8(bytes).is_ok() {
        "text/plain"
    } else {
        return None;
    })
}

/// The type an upload is stored and served with, or why it is refused. The declared type must
/// agree with the content; HTML, scripts and executables are never accepted.
pub fn accepted_type(declared: &str, bytes: &[u8]) -> Result<String, String> {
    let declared = declared.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let Some(actual) = sniff(bytes) else {
        return Err("this kind of file is not accepted (images, PDF, text and office documents are)".into());
    };
    let compatible = match declared.as_str() {
        "" | "application/octet-stream" => return Ok(actual.to_owned()),
        "text/plain" | "text/csv" | "text/markdown" | "application/json" => actual == "text/plain",
        d if d.starts_with("image/") || d == "application/pdf" => d == actual,
        "application/zip"
        | "application/epub+zip"
        | "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
        | "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
        | "application/vnd.openxmlformats-officedocument.presentationml.presentation"
        | "application/vnd.oasis.opendocument.text"
        | "application/vnd.oasis.opendocument.spreadsheet" => actual == "application/zip",
        other => return Err(format!("files of type {other} are not accepted")),
    };
    if compatible {
        Ok(declared)
    } else {
        Err(format!("the file's content is not {declared} (it looks like {actual})"))
    }
}

/// A file's content address: SHA-256 of its bytes in lowercase hex (64 digits). Messages name
/// files as `sha256:<address>` ([`BlobHash::reference`]); a reference is parsed into this type once,
/// where it enters, and every path to a stored file is built from it only, so no text from a
/// message or a request ever becomes part of a path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobHash(String);

/// How a message names a file: this prefix, then the content address.
pub const BLOB_REFERENCE_PREFIX: &str = "sha256:";

impl BlobHash {
    /// The content address of these bytes.
    pub fn of(bytes: &[u8]) -> BlobHash {
        BlobHash(crate::sync::sha256_hex(bytes))
    }

    /// A content address as written in a URL or a database: exactly 64 lowercase hex digits.
    pub fn parse(hex: &str) -> Result<BlobHash, DomainError> {
        let well_formed = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        match well_formed {
            true => Ok(BlobHash(hex.to_owned())),
            false => Err(DomainError::InvalidFileReference),
        }
    }

    /// A message's file reference: exactly `sha256:` and 64 lowercase hex digits.
    pub fn from_reference(reference: &str) -> Result<BlobHash, DomainError> {
        let hex = reference.strip_prefix(BLOB_REFERENCE_PREFIX).ok_or(DomainError::InvalidFileReference)?;
        BlobHash::parse(hex)
    }

    /// How a message names this file.
    pub fn reference(&self) -> String {
        format!("{BLOB_REFERENCE_PREFIX}{}", self.0)
    }

    /// The 64 hex digits: safe as a file name and in a URL.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first two digits (the relay spreads files over 256 folders by them).
    pub fn shard(&self) -> &str {
        &self.0[..2]
    }
}

impl std::fmt::Display for BlobHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_types_must_match_the_content() {
        assert_eq!(accepted_type("image/png", b"\x89PNG\r\n\x1a\nrest"), Ok("image/png".into()));
        assert_eq!(accepted_type("", b"%PDF-1.7 ..."), Ok("application/pdf".into()));
        assert_eq!(accepted_type("text/csv; charset=utf-8", b"a,b\n1,2\n"), Ok("text/csv".into()));
        assert!(accepted_type("image/png", b"%PDF-1.7").unwrap_err().contains("not image/png"));
        assert!(accepted_type("text/html", b"<script>alert(1)</script>").unwrap_err().contains("text/html"));
        assert!(accepted_type("application/octet-stream", b"\x7fELF\x02\x01\x01\0\0\0").is_err());
        assert!(accepted_type("text/plain", b"MZ\x90\0\x03\0").is_err());
    }

    #[test]
    fn a_file_reference_is_exactly_sha256_and_64_lowercase_hex_digits() {
        let h = BlobHash::of(b"hello");
        assert_eq!(BlobHash::from_reference(&h.reference()), Ok(h.clone()));
        assert_eq!(BlobHash::parse(h.as_str()), Ok(h.clone()));
        assert_eq!(h.shard(), &h.as_str()[..2]);
        for bad in [
            "sha256:../../../../etc/passwd",
            "sha256:/proc/self/environ",
            "sha256:/dev/zero",
            "sha256:a",
            "sha256:",
            "",
            h.as_str(),
            &format!("sha256:{}", h.as_str().to_uppercase()),
            &format!("sha256:{}0", h.as_str()),
            &format!("sha256:{}", &h.as_str()[..63]),
            &format!("sha1:{}", h.as_str()),
            &format!("sha256:{}/", &h.as_str()[..63]),
            &format!("sha256:{}é", &h.as_str()[..62]),
        ] {
            assert_eq!(BlobHash::from_reference(bad), Err(DomainError::InvalidFileReference), "{bad}");
        }
    }
}
