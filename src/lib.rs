//! Crewdesk core: the product's domain rules, the local replica (automerge documents in SQLite with
//! a conversation index) and demo data. No sockets and no UI; the domain builds for wasm.

pub mod desk;
pub mod domain;
pub mod sync;

#[cfg(feature = "replica")]
pub mod demo;
#[cfg(feature = "replica")]
pub mod replica;
