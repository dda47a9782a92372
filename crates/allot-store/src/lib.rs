//! Allot's storage: implementations of the app's [`allot_app::store::Store`] port.
//!
//! [`sqlite::SqliteStore`] keeps everything in one SQLite file (WAL). All writes go through one
//! writer task that applies many requests per transaction (group commit) and acknowledges each
//! only after its transaction is durably committed (I5). SQL lives only in this crate.

pub mod sqlite;
mod writer;

pub use sqlite::SqliteStore;
