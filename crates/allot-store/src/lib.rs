//! Allot's storage: implementations of the app's [`allot_app::store::Store`] port.
//!
//! [`sqlite::SqliteStore`] keeps everything in one SQLite file (WAL); [`postgres::PgStore`]
//! keeps it in PostgreSQL, shared by many stateless nodes. Both send every write through one
//! writer task per process that applies many requests per transaction (group commit) and
//! acknowledges each only after its transaction is durably committed (I5). SQL lives only in
//! this crate.

mod access;
mod cache;
mod common;
pub mod inspect;
pub mod postgres;
pub mod sqlite;
pub mod testing;
mod writer;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;
