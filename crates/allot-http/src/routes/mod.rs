//! Handlers, one module per area of the API.

pub mod access;
pub mod auth;
pub mod bookings;
pub mod catalog;
