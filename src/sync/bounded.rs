//! Bounded checks on a sync message from a client, made before automerge sees its bytes.
//!
//! The relay takes automerge sync messages from clients it cannot trust, and automerge's own
//! parser trusts some of the numbers it reads: a bloom filter with zero bits per entry makes it
//! divide by zero, a huge probe count burns minutes of CPU, a compressed change inflates without
//! limit and a column of a change can claim billions of rows that automerge walks one by one.
//! This module reads the same format (sync messages v1 and v2, change chunks, their columns)
//! without recursion, without allocating or looping beyond [`SyncLimits`] and without panicking,
//! and refuses anything outside the limits with a [`SyncRefusal`] that names the limit. Whole
//! documents (chunk type 0) are refused outright: a client only ever needs to send changes.

use sha2::{Digest, Sha256};
use std::io::Read;

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const HASH_BYTES: u64 = 32;
const CHUNK_DOCUMENT: u8 = 0;
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED: u8 = 2;
const COLUMN_DEFLATE: u32 = 0b1000;
const COLUMN_DELTA: u32 = 3;
const COLUMN_BOOLEAN: u32 = 4;
const COLUMN_STRING: u32 = 5;
const COLUMN_VALUE: u32 = 7;

/// Limits on what one sync message from a client may carry.
#[derive(Clone, Copy, Debug)]
pub struct SyncLimits {
    /// The whole encoded message, in bytes.
    pub max_message_bytes: usize,
    /// Hashes in each list: the heads, the needed changes, and each have's last sync.
    pub max_hashes: usize,
    /// Haves (summaries of what the client already has, each with a bloom filter).
    pub max_haves: usize,
    /// Entries a have's bloom filter may claim.
    pub max_bloom_entries: u32,
    /// Bits per entry of a bloom filter; it must also be at least 1 (automerge uses 10).
    pub max_bloom_bits_per_entry: u32,
    /// Probes per lookup in a bloom filter; it must also be at least 1 (automerge uses 7).
    pub max_bloom_probes: u32,
    /// Changes in one message.
    pub max_changes: usize,
    /// One change's body, in bytes, uncompressed.
    pub max_change_bytes: usize,
    /// All the changes of one message, in bytes, uncompressed.
    pub max_total_change_bytes: usize,
    /// Rows in any column of a change, that is operations (and pred entries); it also bounds how
    /// many other actors a change may name.
    pub max_ops_per_change: u64,
    /// Dependencies of one change.
    pub max_deps: usize,
    /// Length in bytes of the actor id of a change and of each other actor it names (automerge's
    /// actor ids are usually 16 bytes).
    pub max_actor_bytes: usize,
}

impl SyncLimits {
    /// The limits for a client of the relay: far above what an honest desk sends in one message.
    pub const CLIENT: SyncLimits = SyncLimits {
        max_message_bytes: 8 << 20,
        max_hashes: 1024,
        max_haves: 16,
        max_bloom_entries: 100_000,
        max_bloom_bits_per_entry: 32,
        max_bloom_probes: 32,
        max_changes: 2_000,
        max_change_bytes: 1 << 20,
        max_total_change_bytes: 8 << 20,
        max_ops_per_change: 100_000,
        max_deps: 256,
        max_actor_bytes: 64,
    };
}

/// Why a sync message from a client was refused; the message says which limit or rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncRefusal {
    #[error("the sync message is {bytes} bytes (at most {limit})")]
    MessageTooLarge { bytes: usize, limit: usize },
    #[error("the sync message starts with byte {0:#04x}, not 0x42 or 0x43")]
    NotASyncMessage(u8),
    #[error("the sync message ends too early, in {0}")]
    Truncated(&'static str),
    #[error("the sync message is malformed: {0}")]
    Malformed(&'static str),
    #[error("the sync message carries {count} {list} (at most {limit})")]
    TooManyHashes { list: &'static str, count: u64, limit: usize },
    #[error("the sync message lists a change twice in its {list}")]
    DuplicateHash { list: &'static str },
    #[error("the sync message carries {count} haves (at most {limit})")]
    TooManyHaves { count: u64, limit: usize },
    #[error("a bloom filter in the sync message claims {count} entries (at most {limit})")]
    BloomEntries { count: u32, limit: u32 },
    #[error("a bloom filter in the sync message uses {count} bits per entry (from 1 to {limit})")]
    BloomBitsPerEntry { count: u32, limit: u32 },
    #[error("a bloom filter in the sync message uses {count} probes (from 1 to {limit})")]
    BloomProbes { count: u32, limit: u32 },
    #[error("a bloom filter in the sync message has {bits} bits (automerge handles fewer than 2^32)")]
    BloomTooLarge { bits: u64 },
    #[error("the sync message carries {count} changes (at most {limit})")]
    TooManyChanges { count: u64, limit: usize },
    #[error("the sync message carries a whole document; clients may only send changes")]
    DocumentChunk,
    #[error("the sync message carries a chunk of type {0}; clients may only send changes (types 1 and 2)")]
    UnsupportedChunk(u8),
    #[error("a change in the sync message does not start with automerge's magic bytes")]
    NotAChange,
    #[error("a change's checksum does not match its contents")]
    BadChecksum,
    #[error("a compressed change is not a valid DEFLATE stream")]
    BadCompression,
    #[error("a change is {bytes} bytes uncompressed (at most {limit})")]
    ChangeTooLarge { bytes: u64, limit: usize },
    #[error("a compressed change inflates to more than {limit} bytes")]
    CompressedChangeTooLarge { limit: usize },
    #[error("the changes of the sync message add up to more than {limit} bytes uncompressed")]
    ChangesTooLarge { limit: usize },
    #[error("a change has {count} dependencies (at most {limit})")]
    TooManyDeps { count: u64, limit: usize },
    #[error("a change names an actor id of {bytes} bytes (at most {limit})")]
    ActorTooLong { bytes: u64, limit: usize },
    #[error("a change names {count} other actors (at most {limit})")]
    TooManyActors { count: u64, limit: u64 },
    #[error("a change has a compressed column (only whole documents compress columns)")]
    CompressedColumn,
    #[error("a change claims at least {rows} operations in one column (at most {limit})")]
    TooManyOps { rows: u64, limit: u64 },
}

/// The change chunks of a checked sync message, each an uncompressed change chunk (type 1) ready
/// for `automerge::Change::try_from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedSync {
    pub changes: Vec<Vec<u8>>,
}

/// Checks an encoded sync message (v1 0x42 or v2 0x43 type byte, then heads, need, have, changes,
/// optional flags — exactly as automerge's `Message::parse` reads it) against the limits.
///
/// An entry of the changes list may hold several change chunks back to back (automerge packs all
/// the changes of a v2 message into one entry); each counts as one change.
pub fn check_sync_message(bytes: &[u8], limits: &SyncLimits) -> Result<CheckedSync, SyncRefusal> {
    if bytes.len() > limits.max_message_bytes {
        return Err(SyncRefusal::MessageTooLarge { bytes: bytes.len(), limit: limits.max_message_bytes });
    }
    let mut r = Reader { rest: bytes };
    match r.byte("the message type")? {
        0x42 | 0x43 => {}
        other => return Err(SyncRefusal::NotASyncMessage(other)),
    }
    skip_hashes(&mut r, "heads", limits)?;
    skip_hashes(&mut r, "needed changes", limits)?;
    let haves = r.uleb("the haves")?;
    if exceeds(haves, limits.max_haves) {
        return Err(SyncRefusal::TooManyHaves { count: haves, limit: limits.max_haves });
    }
    for _ in 0..haves {
        skip_hashes(&mut r, "last-sync hashes in a have", limits)?;
        let len = r.uleb("a bloom filter")?;
        check_bloom(r.take(len, "a bloom filter")?, limits)?;
    }
    let entries = r.uleb("the changes")?;
    if exceeds(entries, limits.max_changes) {
        return Err(SyncRefusal::TooManyChanges { count: entries, limit: limits.max_changes });
    }
    // First find and count the chunks, keeping no more than the limit allows.
    let mut chunks = Vec::new();
    let mut count: u64 = 0;
    for _ in 0..entries {
        let len = r.uleb("the changes")?;
        let mut entry = Reader { rest: r.take(len, "the changes")? };
        while !entry.rest.is_empty() {
            let chunk = next_chunk(&mut entry)?;
            count = count.saturating_add(1);
            if chunks.len() < limits.max_changes {
                chunks.push(chunk);
            }
        }
    }
    if exceeds(count, limits.max_changes) {
        return Err(SyncRefusal::TooManyChanges { count, limit: limits.max_changes });
    }
    // The flags are optional; automerge ignores anything after them.
    if !r.rest.is_empty() {
        let len = r.uleb("the message flags")?;
        r.take(len, "the message flags")?;
    }
    let mut changes = Vec::with_capacity(chunks.len());
    let mut total: usize = 0;
    for chunk in chunks {
        let change = check_change_chunk(chunk, limits)?;
        total = total.saturating_add(change.len());
        if total > limits.max_total_change_bytes {
            return Err(SyncRefusal::ChangesTooLarge { limit: limits.max_total_change_bytes });
        }
        changes.push(change);
    }
    Ok(CheckedSync { changes })
}

/// Checks one change chunk (magic, checksum, type 1 or 2, length, header, columns) against the
/// limits and returns it as an uncompressed change chunk (type 1).
///
/// A compressed chunk (type 2) carries the checksum of its uncompressed form; it is inflated to
/// at most `max_change_bytes` and rebuilt as that uncompressed chunk, which is what automerge
/// itself does, so the change keeps its hash.
pub fn check_change_chunk(chunk: &[u8], limits: &SyncLimits) -> Result<Vec<u8>, SyncRefusal> {
    let mut r = Reader { rest: chunk };
    if r.take(4, "a change's header")? != MAGIC {
        return Err(SyncRefusal::NotAChange);
    }
    let checksum = r.take(4, "a change's header")?;
    let kind = r.byte("a change's header")?;
    let len = r.uleb("a change's header")?;
    let data = r.take(len, "a change")?;
    if !r.rest.is_empty() {
        return Err(SyncRefusal::Malformed("bytes follow the end of a change"));
    }
    match kind {
        CHUNK_CHANGE => {
            if exceeds(len, limits.max_change_bytes) {
                return Err(SyncRefusal::ChangeTooLarge { bytes: len, limit: limits.max_change_bytes });
            }
            verify_checksum(checksum, data)?;
            check_change_body(data, limits)?;
            Ok(chunk.to_vec())
        }
        CHUNK_COMPRESSED => {
            let limit = limits.max_change_bytes;
            let at_most = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
            let mut inflated = Vec::new();
            flate2::bufread::DeflateDecoder::new(data)
                .take(at_most)
                .read_to_end(&mut inflated)
                .map_err(|_| SyncRefusal::BadCompression)?;
            if inflated.len() > limit {
                return Err(SyncRefusal::CompressedChangeTooLarge { limit });
            }
            verify_checksum(checksum, &inflated)?;
            check_change_body(&inflated, limits)?;
            let mut out = Vec::with_capacity(inflated.len().saturating_add(20));
            out.extend_from_slice(&MAGIC);
            out.extend_from_slice(checksum);
            out.push(CHUNK_CHANGE);
            push_uleb(&mut out, inflated.len() as u64);
            out.extend_from_slice(&inflated);
            Ok(out)
        }
        CHUNK_DOCUMENT => Err(SyncRefusal::DocumentChunk),
        other => Err(SyncRefusal::UnsupportedChunk(other)),
    }
}

/// True when a count read from the wire is above a limit.
fn exceeds(count: u64, limit: usize) -> bool {
    !matches!(usize::try_from(count), Ok(count) if count <= limit)
}

/// Reads a length-prefixed list of 32-byte hashes.
fn skip_hashes(r: &mut Reader<'_>, list: &'static str, limits: &SyncLimits) -> Result<(), SyncRefusal> {
    let count = r.uleb(list)?;
    if exceeds(count, limits.max_hashes) {
        return Err(SyncRefusal::TooManyHashes { list, count, limit: limits.max_hashes });
    }
    let hashes = r.take(count.saturating_mul(HASH_BYTES), list)?;
    // A hash listed twice makes automerge 0.12 panic when it answers (`MissingOps` while collecting
    // the needed changes): found by fuzzing the relay's chain.
    let mut seen = std::collections::HashSet::new();
    if !hashes.chunks_exact(HASH_BYTES as usize).all(|h| seen.insert(h)) {
        return Err(SyncRefusal::DuplicateHash { list });
    }
    Ok(())
}

/// A bloom filter: empty, or entries, bits per entry, probes and then ceil(entries * bits / 8)
/// bytes (automerge ignores any bytes after those).
fn check_bloom(bytes: &[u8], limits: &SyncLimits) -> Result<(), SyncRefusal> {
    if bytes.is_empty() {
        return Ok(());
    }
    let mut r = Reader { rest: bytes };
    let entries = r.uleb_u32("a bloom filter")?;
    let bits_per_entry = r.uleb_u32("a bloom filter")?;
    let probes = r.uleb_u32("a bloom filter")?;
    if entries > limits.max_bloom_entries {
        return Err(SyncRefusal::BloomEntries { count: entries, limit: limits.max_bloom_entries });
    }
    if bits_per_entry == 0 || bits_per_entry > limits.max_bloom_bits_per_entry {
        let limit = limits.max_bloom_bits_per_entry;
        return Err(SyncRefusal::BloomBitsPerEntry { count: bits_per_entry, limit });
    }
    if probes == 0 || probes > limits.max_bloom_probes {
        return Err(SyncRefusal::BloomProbes { count: probes, limit: limits.max_bloom_probes });
    }
    // Automerge takes its modulus as 8 * bytes in a u32: keep it from wrapping to zero.
    let bits = u64::from(entries) * u64::from(bits_per_entry);
    if bits >= 1 << 32 {
        return Err(SyncRefusal::BloomTooLarge { bits });
    }
    r.take(bits.div_ceil(8), "a bloom filter")?;
    Ok(())
}

/// Finds the end of the chunk at the start of `r` (without checking it) and returns it whole.
fn next_chunk<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], SyncRefusal> {
    let start = r.rest;
    if r.take(4, "a change's header")? != MAGIC {
        return Err(SyncRefusal::NotAChange);
    }
    r.take(5, "a change's header")?;
    let len = r.uleb("a change's header")?;
    r.take(len, "a change")?;
    start.get(..start.len().saturating_sub(r.rest.len())).ok_or(SyncRefusal::Truncated("a change"))
}

/// The first four bytes of sha256 over the type byte, the length and the body of the uncompressed
/// chunk.
fn verify_checksum(checksum: &[u8], body: &[u8]) -> Result<(), SyncRefusal> {
    let mut prefix = vec![CHUNK_CHANGE];
    push_uleb(&mut prefix, body.len() as u64);
    let hash = Sha256::new().chain_update(&prefix).chain_update(body).finalize();
    if hash.iter().take(4).eq(checksum.iter()) { Ok(()) } else { Err(SyncRefusal::BadChecksum) }
}

/// The body of a change chunk: dependencies, actor, seq, start op, time, message, other actors,
/// column metadata, column data, then any extra bytes.
fn check_change_body(body: &[u8], limits: &SyncLimits) -> Result<(), SyncRefusal> {
    let mut r = Reader { rest: body };
    let deps = r.uleb("a change's dependencies")?;
    if exceeds(deps, limits.max_deps) {
        return Err(SyncRefusal::TooManyDeps { count: deps, limit: limits.max_deps });
    }
    r.take(deps.saturating_mul(HASH_BYTES), "a change's dependencies")?;
    skip_actor(&mut r, limits)?;
    r.uleb("a change's sequence number")?;
    if r.uleb("a change's start op")? == 0 {
        return Err(SyncRefusal::Malformed("a change's start op is zero"));
    }
    r.sleb("a change's time")?;
    let len = r.uleb("a change's message")?;
    std::str::from_utf8(r.take(len, "a change's message")?)
        .map_err(|_| SyncRefusal::Malformed("a change's message is not UTF-8"))?;
    let others = r.uleb("a change's other actors")?;
    if others > limits.max_ops_per_change {
        return Err(SyncRefusal::TooManyActors { count: others, limit: limits.max_ops_per_change });
    }
    for _ in 0..others {
        skip_actor(&mut r, limits)?;
    }
    // The column metadata is read twice: once to sum the lengths, once to walk each column.
    let columns = r.uleb("a change's columns")?;
    let mut metadata = r;
    let mut data_len: u64 = 0;
    for _ in 0..columns {
        if r.uleb_u32("a change's columns")? & COLUMN_DEFLATE != 0 {
            return Err(SyncRefusal::CompressedColumn);
        }
        let len = r.uleb("a change's columns")?;
        data_len = data_len.checked_add(len).ok_or(SyncRefusal::Truncated("a change's columns"))?;
    }
    // Whatever follows the column data is the change's extra bytes, which automerge keeps as is.
    let mut data = Reader { rest: r.take(data_len, "a change's columns")? };
    for _ in 0..columns {
        let spec = metadata.uleb_u32("a change's columns")?;
        let len = metadata.uleb("a change's columns")?;
        count_rows(spec & 0b111, data.take(len, "a change's columns")?, limits.max_ops_per_change)?;
    }
    Ok(())
}

fn skip_actor(r: &mut Reader<'_>, limits: &SyncLimits) -> Result<(), SyncRefusal> {
    let len = r.uleb("an actor id")?;
    if exceeds(len, limits.max_actor_bytes) {
        return Err(SyncRefusal::ActorTooLong { bytes: len, limit: limits.max_actor_bytes });
    }
    r.take(len, "an actor id")?;
    Ok(())
}

/// Counts the rows of a column by walking its runs without decoding values. Run-length encoded
/// columns are runs of a signed count: n > 0 is one value repeated n times, n < 0 is -n literal
/// values, 0 is followed by the length of a run of nulls. Boolean columns are unsigned run
/// lengths, alternating false and true. Raw value columns have no rows of their own.
fn count_rows(column_type: u32, column: &[u8], limit: u64) -> Result<(), SyncRefusal> {
    const WHAT: &str = "a column of a change";
    if column_type == COLUMN_VALUE {
        return Ok(());
    }
    let mut r = Reader { rest: column };
    let mut rows: u64 = 0;
    while !r.rest.is_empty() {
        let (run, values) = if column_type == COLUMN_BOOLEAN {
            (r.uleb(WHAT)?, 0)
        } else {
            match r.sleb(WHAT)? {
                0 => (r.uleb(WHAT)?, 0),
                n if n > 0 => (n.unsigned_abs(), 1),
                n => (n.unsigned_abs(), n.unsigned_abs()),
            }
        };
        rows = rows.saturating_add(run);
        if rows > limit {
            return Err(SyncRefusal::TooManyOps { rows, limit });
        }
        // At most `limit` values, and each takes at least a byte.
        for _ in 0..values {
            match column_type {
                COLUMN_STRING => {
                    let len = r.uleb(WHAT)?;
                    r.take(len, WHAT)?;
                }
                COLUMN_DELTA => {
                    r.sleb(WHAT)?;
                }
                _ => {
                    r.uleb(WHAT)?;
                }
            }
        }
    }
    Ok(())
}

fn push_uleb(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The unread rest of some bytes. Every read checks its length first; `what` names the part being
/// read for the error.
#[derive(Clone, Copy)]
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: u64, what: &'static str) -> Result<&'a [u8], SyncRefusal> {
        let len = usize::try_from(len).map_err(|_| SyncRefusal::Truncated(what))?;
        let (taken, rest) = self.rest.split_at_checked(len).ok_or(SyncRefusal::Truncated(what))?;
        self.rest = rest;
        Ok(taken)
    }

    fn byte(&mut self, what: &'static str) -> Result<u8, SyncRefusal> {
        let (&byte, rest) = self.rest.split_first().ok_or(SyncRefusal::Truncated(what))?;
        self.rest = rest;
        Ok(byte)
    }

    /// An unsigned LEB128 number of at most 64 bits, read as the `leb128` crate (which automerge
    /// uses for columns) reads it.
    fn uleb(&mut self, what: &'static str) -> Result<u64, SyncRefusal> {
        let mut value = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.byte(what)?;
            if shift == 63 && byte > 1 {
                return Err(SyncRefusal::Malformed("a number is larger than 64 bits"));
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(SyncRefusal::Malformed("a number is larger than 64 bits"))
    }

    fn uleb_u32(&mut self, what: &'static str) -> Result<u32, SyncRefusal> {
        u32::try_from(self.uleb(what)?).map_err(|_| SyncRefusal::Malformed("a number is larger than 32 bits"))
    }

    /// A signed LEB128 number of at most 64 bits, read as the `leb128` crate reads it.
    fn sleb(&mut self, what: &'static str) -> Result<i64, SyncRefusal> {
        let mut value = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.byte(what)?;
            if shift == 63 && byte != 0 && byte != 0x7f {
                return Err(SyncRefusal::Malformed("a number is larger than 64 bits"));
            }
            value |= i64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                if shift < 57 && byte & 0x40 != 0 {
                    value |= -1 << (shift + 7);
                }
                return Ok(value);
            }
        }
        Err(SyncRefusal::Malformed("a number is larger than 64 bits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::{ChunkList, Message, MessageVersion, State, SyncDoc};
    use automerge::transaction::Transactable;
    use automerge::{ActorId, AutoCommit, Change, ObjType, ROOT};
    use std::io::Write;

    fn message(version: MessageVersion, changes: Vec<Vec<u8>>) -> Vec<u8> {
        let changes = ChunkList::from(changes);
        Message { heads: vec![], need: vec![], have: vec![], changes, flags: None, version }.encode()
    }

    /// A conversation edited by two agents: a map, a list, text, a long transcript and a merge.
    fn conversation() -> AutoCommit {
        let mut doc = AutoCommit::new().with_actor(ActorId::from([1u8; 16]));
        doc.put(ROOT, "subject", "Refund request").unwrap();
        let messages = doc.put_object(ROOT, "messages", ObjType::List).unwrap();
        for i in 0..200 {
            doc.insert(&messages, i, format!("message {i}")).unwrap();
        }
        doc.commit();
        let draft = doc.put_object(ROOT, "draft", ObjType::Text).unwrap();
        doc.splice_text(&draft, 0, 0, "Hello, how can we help you today?").unwrap();
        doc.commit();
        doc.splice_text(&draft, 7, 3, "what").unwrap();
        doc.put(ROOT, "transcript", "the customer said: it arrived broken. ".repeat(1000)).unwrap();
        doc.commit();
        let mut other = doc.fork().with_actor(ActorId::from([2u8; 16]));
        other.put(ROOT, "subject", "Refund approved").unwrap();
        other.delete(&messages, 0).unwrap();
        other.commit();
        doc.put(ROOT, "subject", "Refund pending").unwrap();
        doc.commit();
        doc.merge(&mut other).unwrap();
        doc.put(ROOT, "subject", "Refund sent").unwrap();
        doc.splice_text(&draft, 0, 5, "Hi").unwrap();
        doc.commit();
        doc
    }

    fn assert_same_change(checked: &[u8], original: &Change) {
        let parsed = Change::try_from(checked).expect("automerge accepts the checked change");
        assert_eq!(parsed.hash(), original.hash());
        assert_eq!(checked, original.raw_bytes());
    }

    #[test]
    fn accepts_every_change_automerge_writes_in_both_forms() {
        let mut doc = conversation();
        let mut changes = doc.get_changes(&[]);
        assert!(changes.iter().any(|c| !c.other_actor_ids().is_empty() && c.deps().len() == 2));
        let mut compressed_seen = false;
        for change in &mut changes {
            // raw_bytes is always the uncompressed chunk (type 1); bytes() compresses big ones.
            assert_eq!(change.raw_bytes().get(8), Some(&CHUNK_CHANGE));
            let raw = check_change_chunk(change.raw_bytes(), &SyncLimits::CLIENT).unwrap();
            assert_same_change(&raw, change);
            let bytes = change.bytes().into_owned();
            compressed_seen |= bytes.get(8) == Some(&CHUNK_COMPRESSED);
            let inflated = check_change_chunk(&bytes, &SyncLimits::CLIENT).unwrap();
            assert_same_change(&inflated, change);
        }
        assert!(compressed_seen, "the transcript change is big enough for automerge to compress");
    }

    #[test]
    fn counts_rows_exactly_on_a_change_with_many_ops() {
        // More than 10_000 ops: automerge encodes these row by row rather than column by column.
        let mut doc = AutoCommit::new();
        let text = doc.put_object(ROOT, "transcript", ObjType::Text).unwrap();
        doc.splice_text(&text, 0, 0, &"abc".repeat(4_000)).unwrap();
        doc.commit();
        let change = doc.get_last_local_change().unwrap();
        let limits = |ops| SyncLimits { max_ops_per_change: ops, ..SyncLimits::CLIENT };
        assert_same_change(&check_change_chunk(change.raw_bytes(), &limits(12_001)).unwrap(), &change);
        let refused = check_change_chunk(change.raw_bytes(), &limits(12_000)).unwrap_err();
        assert!(matches!(refused, SyncRefusal::TooManyOps { limit: 12_000, .. }), "{refused}");
    }

    /// Syncs a client with the relay until both are quiet and returns every message the client
    /// sent. Unless the relay advertises its capabilities (automerge puts flags on every message
    /// it generates), the client sends v1 messages of plain changes.
    fn sync(client: &mut AutoCommit, relay: &mut AutoCommit, states: &mut [State; 2], flags: bool) -> Vec<Vec<u8>> {
        let [client_state, relay_state] = states;
        let mut sent = Vec::new();
        for _ in 0..20 {
            let to_relay = client.sync().generate_sync_message(client_state);
            let quiet = to_relay.is_none();
            if let Some(message) = to_relay {
                let bytes = message.encode();
                relay.sync().receive_sync_message(relay_state, Message::decode(&bytes).unwrap()).unwrap();
                sent.push(bytes);
            }
            let Some(mut to_client) = relay.sync().generate_sync_message(relay_state) else {
                if quiet {
                    return sent;
                }
                continue;
            };
            if !flags {
                to_client.flags = None;
            }
            client.sync().receive_sync_message(client_state, to_client).unwrap();
        }
        panic!("the sync did not settle");
    }

    #[test]
    fn accepts_the_messages_automerge_sends_and_returns_their_changes() {
        let mut client = conversation();
        let mut relay = AutoCommit::new();
        let mut states = [State::new(), State::new()];
        let sent = sync(&mut client, &mut relay, &mut states, false);
        assert_eq!(client.get_heads(), relay.get_heads());
        let originals = client.get_changes(&[]);
        let mut carried = 0;
        for bytes in &sent {
            let checked = check_sync_message(bytes, &SyncLimits::CLIENT).unwrap();
            let decoded = Message::decode(bytes).unwrap();
            assert_eq!(checked.changes, decoded.changes.iter().map(<[u8]>::to_vec).collect::<Vec<_>>());
            for change in &checked.changes {
                let hash = Change::try_from(&change[..]).unwrap().hash();
                assert!(originals.iter().any(|c| c.hash() == hash));
                carried += 1;
            }
        }
        assert_eq!(carried, originals.len());
        // Later edits, on the same sync states after the round trip.
        client.put(ROOT, "status", "closed").unwrap();
        client.commit();
        let later = sync(&mut client, &mut relay, &mut states, false);
        let carried = later.iter().map(|bytes| check_sync_message(bytes, &SyncLimits::CLIENT).unwrap().changes.len());
        assert_eq!(carried.sum::<usize>(), 1);
        assert_eq!(client.get_heads(), relay.get_heads());
    }

    #[test]
    fn accepts_a_v2_message_with_several_changes_in_one_entry_and_compressed_changes() {
        let mut doc = conversation();
        let mut changes = doc.get_changes(&[]);
        let joined: Vec<u8> = changes.iter().flat_map(|c| c.raw_bytes().to_vec()).collect();
        let checked = check_sync_message(&message(MessageVersion::V2, vec![joined]), &SyncLimits::CLIENT).unwrap();
        let compressed: Vec<Vec<u8>> = changes.iter_mut().map(|c| c.bytes().into_owned()).collect();
        let inflated = check_sync_message(&message(MessageVersion::V1, compressed), &SyncLimits::CLIENT).unwrap();
        for checked in [checked, inflated] {
            assert_eq!(checked.changes.len(), changes.len());
            for (checked, original) in checked.changes.iter().zip(&changes) {
                assert_same_change(checked, original);
            }
        }
    }

    #[test]
    fn refuses_whole_documents() {
        let mut doc = conversation();
        let refused = check_sync_message(&message(MessageVersion::V2, vec![doc.save()]), &SyncLimits::CLIENT);
        assert_eq!(refused, Err(SyncRefusal::DocumentChunk));
        // What a client sends an empty relay that advertises v2: the whole document.
        let sent = sync(&mut doc, &mut AutoCommit::new(), &mut [State::new(), State::new()], true);
        assert!(sent.iter().any(|m| check_sync_message(m, &SyncLimits::CLIENT) == Err(SyncRefusal::DocumentChunk)));
    }

    fn with_bloom(bloom: &[u8]) -> Result<CheckedSync, SyncRefusal> {
        let mut bytes = vec![0x42, 0, 0, 1, 0];
        push_uleb(&mut bytes, bloom.len() as u64);
        bytes.extend_from_slice(bloom);
        bytes.push(0);
        check_sync_message(&bytes, &SyncLimits::CLIENT)
    }

    #[test]
    fn refuses_bloom_filters_automerge_cannot_survive() {
        assert!(with_bloom(&[1, 10, 7, 0, 0]).is_ok());
        let zero_bits = with_bloom(&[1, 0, 7]).unwrap_err();
        assert_eq!(zero_bits.to_string(), "a bloom filter in the sync message uses 0 bits per entry (from 1 to 32)");
        let many_probes = with_bloom(&[1, 10, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0]).unwrap_err();
        assert_eq!(many_probes, SyncRefusal::BloomProbes { count: u32::MAX, limit: 32 });
        assert_eq!(with_bloom(&[1, 10, 0, 0, 0]), Err(SyncRefusal::BloomProbes { count: 0, limit: 32 }));
        let entries = with_bloom(&[0x80, 0x80, 0x80, 0x80, 0x08, 10, 7]).unwrap_err();
        assert_eq!(entries, SyncRefusal::BloomEntries { count: 1 << 31, limit: 100_000 });
        assert_eq!(with_bloom(&[1, 10, 7, 0]), Err(SyncRefusal::Truncated("a bloom filter")));
    }

    /// A change chunk around `body`, with a correct checksum.
    fn chunk(kind: u8, body: &[u8], checksum_of: &[u8]) -> Vec<u8> {
        let mut prefix = vec![CHUNK_CHANGE];
        push_uleb(&mut prefix, checksum_of.len() as u64);
        let hash = Sha256::new().chain_update(&prefix).chain_update(checksum_of).finalize();
        let mut out = MAGIC.to_vec();
        out.extend(hash.iter().take(4));
        out.push(kind);
        push_uleb(&mut out, body.len() as u64);
        out.extend_from_slice(body);
        out
    }

    /// A change body by one 16-byte actor with the given columns.
    fn change_body(columns: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0, 16];
        body.extend([7; 16]);
        body.extend([1, 1, 0, 0, 0]); // seq 1, start op 1, time 0, no message, no other actors
        push_uleb(&mut body, columns.len() as u64);
        for (spec, data) in columns {
            push_uleb(&mut body, u64::from(*spec));
            push_uleb(&mut body, data.len() as u64);
        }
        columns.iter().for_each(|(_, data)| body.extend(data));
        body
    }

    #[test]
    fn refuses_columns_claiming_billions_of_rows() {
        let mut nulls = vec![0]; // a run of nulls in the action column (id 4, integer)
        push_uleb(&mut nulls, 1 << 40);
        let mut repeated = Vec::new(); // one key string repeated (id 1, string)
        push_uleb(&mut repeated, 1 << 40);
        repeated.extend([1, b'k']);
        let mut falses = Vec::new(); // the insert column (id 3, boolean)
        push_uleb(&mut falses, 1 << 40);
        for column in [(0x42, nulls), (0x15, repeated), (0x34, falses)] {
            let body = change_body(&[column]);
            let refused = check_change_chunk(&chunk(CHUNK_CHANGE, &body, &body), &SyncLimits::CLIENT);
            assert_eq!(refused, Err(SyncRefusal::TooManyOps { rows: 1 << 40, limit: 100_000 }));
        }
        let deflated = change_body(&[(0x42 | COLUMN_DEFLATE, vec![1, 1])]);
        let refused = check_change_chunk(&chunk(CHUNK_CHANGE, &deflated, &deflated), &SyncLimits::CLIENT);
        assert_eq!(refused, Err(SyncRefusal::CompressedColumn));
    }

    #[test]
    fn refuses_compressed_changes_that_inflate_beyond_the_limit() {
        let zeros = vec![0; 4 << 20];
        let mut deflate = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        deflate.write_all(&zeros).unwrap();
        let bomb = chunk(CHUNK_COMPRESSED, &deflate.finish().unwrap(), &zeros);
        assert!(bomb.len() < 10_000);
        let limit = SyncLimits::CLIENT.max_change_bytes;
        let refused = check_sync_message(&message(MessageVersion::V1, vec![bomb]), &SyncLimits::CLIENT);
        assert_eq!(refused, Err(SyncRefusal::CompressedChangeTooLarge { limit }));
        let garbage = chunk(CHUNK_COMPRESSED, &[0xff; 32], &[]);
        assert_eq!(check_change_chunk(&garbage, &SyncLimits::CLIENT), Err(SyncRefusal::BadCompression));
    }

    #[test]
    fn refuses_what_is_over_the_limits_of_real_changes() {
        let mut doc = conversation();
        let changes: Vec<Vec<u8>> = doc.get_changes(&[]).iter().map(|c| c.raw_bytes().to_vec()).collect();
        let bytes = message(MessageVersion::V1, changes.clone());
        let joined = message(MessageVersion::V2, vec![changes.concat()]);
        let check = |bytes: &[u8], limits| check_sync_message(bytes, &limits).map(|_| ()).unwrap_err().to_string();
        let count = changes.len();
        let few = SyncLimits { max_changes: count - 1, ..SyncLimits::CLIENT };
        let expected = format!("the sync message carries {count} changes (at most {})", count - 1);
        assert_eq!(check(&bytes, few), expected);
        assert_eq!(check(&joined, few), expected);
        let small = SyncLimits { max_message_bytes: 100, ..SyncLimits::CLIENT };
        assert!(check(&bytes, small).starts_with("the sync message is "));
        let total = SyncLimits { max_total_change_bytes: 1000, ..SyncLimits::CLIENT };
        assert!(check(&bytes, total).starts_with("the changes of the sync message add up"));
        let one = SyncLimits { max_change_bytes: 1000, ..SyncLimits::CLIENT };
        assert!(check(&bytes, one).starts_with("a change is "));
        let deps = SyncLimits { max_deps: 1, ..SyncLimits::CLIENT };
        assert_eq!(check(&bytes, deps), "a change has 2 dependencies (at most 1)");
        let actor = SyncLimits { max_actor_bytes: 8, ..SyncLimits::CLIENT };
        assert_eq!(check(&bytes, actor), "a change names an actor id of 16 bytes (at most 8)");
        let mut tampered = changes[0].clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(check_change_chunk(&tampered, &SyncLimits::CLIENT), Err(SyncRefusal::BadChecksum));
    }

    #[test]
    fn refuses_huge_list_lengths_without_allocating() {
        let mut bytes = vec![0x42];
        push_uleb(&mut bytes, 1 << 60);
        bytes.extend([0; 3]);
        let refused = check_sync_message(&bytes, &SyncLimits::CLIENT);
        assert_eq!(refused, Err(SyncRefusal::TooManyHashes { list: "heads", count: 1 << 60, limit: 1024 }));
        let unlimited = SyncLimits { max_hashes: usize::MAX, max_changes: usize::MAX, ..SyncLimits::CLIENT };
        assert_eq!(check_sync_message(&bytes, &unlimited), Err(SyncRefusal::Truncated("heads")));
        let mut changes = vec![0x42, 0, 0, 0];
        push_uleb(&mut changes, u64::MAX);
        assert_eq!(check_sync_message(&changes, &unlimited), Err(SyncRefusal::Truncated("the changes")));
        assert_eq!(check_sync_message(&[0x44], &SyncLimits::CLIENT), Err(SyncRefusal::NotASyncMessage(0x44)));
    }

    #[test]
    fn never_panics_on_a_truncated_or_corrupted_message() {
        let mut client = AutoCommit::new();
        client.put(ROOT, "subject", "Late parcel").unwrap();
        let text = client.put_object(ROOT, "draft", ObjType::Text).unwrap();
        client.commit();
        client.splice_text(&text, 0, 0, "We are sorry").unwrap();
        client.commit();
        let mut relay = AutoCommit::new();
        relay.put(ROOT, "agent", "sam").unwrap();
        relay.commit();
        let sent = sync(&mut client, &mut relay, &mut [State::new(), State::new()], false);
        let bytes = sent.iter().max_by_key(|m| m.len()).unwrap();
        assert!(check_sync_message(bytes, &SyncLimits::CLIENT).unwrap().changes.len() == 2);
        for end in 0..bytes.len() {
            let _ = check_sync_message(&bytes[..end], &SyncLimits::CLIENT);
        }
        for at in 0..bytes.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut corrupted = bytes.clone();
                corrupted[at] ^= flip;
                let _ = check_sync_message(&corrupted, &SyncLimits::CLIENT);
            }
        }
    }
}
