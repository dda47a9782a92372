//! Allot's domain core: the unified inventory model (venues, resources with four time models,
//! events), the capacity rule that decides invariant I1, pricing, and the booking state machine.
//!
//! Nothing here does I/O, knows HTTP, SQL or JSON, or reads a clock: callers pass `now`.
//! Serde derives are present only so outer layers can persist and transmit these values;
//! no format is chosen here.

pub mod booking;
pub mod capacity;
pub mod error;
pub mod ids;
pub mod inventory;
pub mod schedule;
pub mod time_model;

pub use error::{FieldErrors, ValidationError};
