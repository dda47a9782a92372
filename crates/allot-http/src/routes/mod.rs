//! Handlers, one module per area of the API.

pub mod audit;
pub mod auth;
pub mod bookings;
pub mod catalog;
