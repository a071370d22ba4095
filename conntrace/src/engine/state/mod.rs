//! The engine's facts about connections: each connection and attempt, and the table that owns
//! them and their indexes. No reason is decided here (that is `rules`).

pub mod attempt;
pub mod conn;
pub mod overflows;
pub mod rate;
pub mod route;
pub mod table;

pub use self::{
    attempt::{Attempt, DropContext, HandshakeDrop},
    conn::{Conn, Opening, Report, SocketError, Stall},
    overflows::Overflows,
    rate::RateWindows,
    route::Walk,
    table::{ConnId, Decided, OrphanError, Table},
};

/// The engine's look-ups run for every kernel event: a fast hash, still randomly keyed, since
/// remote addresses and ports are chosen by whoever sends SYNs.
pub type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
