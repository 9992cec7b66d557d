//! What may be sent as an attachment (📎): the content decides the type, never the name or what
//! the sender declares. Checked where a file is picked (desktop) and again where it is stored
//! (relay).

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
}
