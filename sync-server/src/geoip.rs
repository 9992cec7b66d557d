//! Customer location from a GeoIP database (MaxMind DB format, e.g. GeoLite2-City.mmdb), looked up
//! by the address a web-widget customer connects from. Without a database, or for an address it
//! does not know, the location is unknown (the crew sees "unknown", not a guess).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

pub struct GeoIp {
    reader: maxminddb::Reader<Vec<u8>>,
}

#[derive(serde::Deserialize)]
struct Record {
    city: Option<Place>,
    country: Option<Place>,
}

#[derive(serde::Deserialize)]
struct Place {
    names: Option<BTreeMap<String, String>>,
}

impl Place {
    fn english(&self) -> Option<&str> {
        self.names.as_ref()?.get("en").map(String::as_str).filter(|n| !n.trim().is_empty())
    }
}

impl GeoIp {
    /// Opens and checks a database; a missing or corrupt file is an error that names it.
    pub fn open(path: &Path) -> anyhow::Result<GeoIp> {
        let reader = maxminddb::Reader::open_readfile(path)
            .map_err(|e| anyhow::anyhow!("cannot read the GeoIP database {}: {e}", path.display()))?;
        Ok(GeoIp { reader })
    }

    /// "City, Country", or just the country, or `None` when the database has nothing for `ip`.
    pub fn locate(&self, ip: IpAddr) -> Option<String> {
        let record: Record = self.reader.lookup(ip).ok()?.decode().ok()??;
        let city = record.city.as_ref().and_then(Place::english);
        let country = record.country.as_ref().and_then(Place::english);
        let text = match (city, country) {
            (Some(city), Some(country)) => format!("{city}, {country}"),
            (None, Some(place)) | (Some(place), None) => place.to_owned(),
            (None, None) => return None,
        };
        Some(text.chars().filter(|c| !c.is_control()).take(120).collect())
    }
}
