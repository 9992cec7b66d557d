//! Writes small MaxMind DB files (IPv4, 24-bit records) for the GeoIP tests, following the
//! format's specification: a binary search tree over address bits, 16 zero bytes, a data section
//! of typed values, then the metadata after the `\xAB\xCD\xEFMaxMind.com` marker.

use std::net::Ipv4Addr;

/// One network and the place it is in, as GeoIP2 City databases describe it.
pub struct GeoEntry<'a> {
    pub network: Ipv4Addr,
    pub prefix: u8,
    pub city: &'a str,
    pub country: &'a str,
    pub iso_code: &'a str,
}

#[derive(Clone, Copy)]
enum Record {
    Empty,
    Node(usize),
    Data(usize),
}

pub fn write(entries: &[GeoEntry<'_>]) -> Vec<u8> {
    let mut data = Vec::new();
    let mut nodes: Vec<[Record; 2]> = vec![[Record::Empty; 2]];
    for e in entries {
        let offset = data.len();
        map(&mut data, 2);
        string(&mut data, "city");
        map(&mut data, 1);
        string(&mut data, "names");
        map(&mut data, 1);
        string(&mut data, "en");
        string(&mut data, e.city);
        string(&mut data, "country");
        map(&mut data, 2);
        string(&mut data, "iso_code");
        string(&mut data, e.iso_code);
        string(&mut data, "names");
        map(&mut data, 1);
        string(&mut data, "en");
        string(&mut data, e.country);
        let bits = u32::from(e.network);
        let mut node = 0;
        for depth in 0..e.prefix {
            let bit = ((bits >> (31 - depth)) & 1) as usize;
            if depth + 1 == e.prefix {
                nodes[node][bit] = Record::Data(offset);
            } else {
                node = match nodes[node][bit] {
                    Record::Node(next) => next,
                    _ => {
                        nodes.push([Record::Empty; 2]);
                        nodes[node][bit] = Record::Node(nodes.len() - 1);
                        nodes.len() - 1
                    }
                };
            }
        }
    }
    let count = nodes.len();
    let mut out = Vec::new();
    for node in &nodes {
        for record in node {
            let value = match *record {
                Record::Empty => count,
                Record::Node(n) => n,
                Record::Data(offset) => count + 16 + offset,
            };
            out.extend_from_slice(&(value as u32).to_be_bytes()[1..]);
        }
    }
    out.extend_from_slice(&[0; 16]);
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
    map(&mut out, 9);
    string(&mut out, "binary_format_major_version");
    uint(&mut out, 5, 2);
    string(&mut out, "binary_format_minor_version");
    uint(&mut out, 5, 0);
    string(&mut out, "build_epoch");
    uint(&mut out, 9, 1_700_000_000);
    string(&mut out, "database_type");
    string(&mut out, "Crewdesk-Test-City");
    string(&mut out, "description");
    map(&mut out, 1);
    string(&mut out, "en");
    string(&mut out, "Crewdesk test database");
    string(&mut out, "ip_version");
    uint(&mut out, 5, 4);
    string(&mut out, "languages");
    control(&mut out, 11, 1);
    string(&mut out, "en");
    string(&mut out, "node_count");
    uint(&mut out, 6, count as u64);
    string(&mut out, "record_size");
    uint(&mut out, 5, 24);
    out
}

/// A control byte: type in the top 3 bits (extended types in a second byte), size below 29.
fn control(out: &mut Vec<u8>, kind: u8, size: usize) {
    assert!(size < 29, "test values stay short");
    if kind <= 7 {
        out.push((kind << 5) | size as u8);
    } else {
        out.push(size as u8);
        out.push(kind - 7);
    }
}

fn map(out: &mut Vec<u8>, entries: usize) {
    control(out, 7, entries);
}

fn string(out: &mut Vec<u8>, s: &str) {
    control(out, 2, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn uint(out: &mut Vec<u8>, kind: u8, value: u64) {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    control(out, kind, 8 - skip);
    out.extend_from_slice(&bytes[skip..]);
}
