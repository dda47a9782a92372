//! Validation errors with per-field details, shared by every parse/validate step in the core.

use std::collections::BTreeMap;

/// Field path (e.g. `items[0].start`) → human message. Ordered so responses are stable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldErrors(BTreeMap<String, String>);

impl FieldErrors {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn single(field: impl Into<String>, message: impl Into<String>) -> Self {
        let mut errors = Self::new();
        errors.add(field, message);
        errors
    }
    /// Keeps the first message for a field: it is usually the most basic problem.
    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.entry(field.into()).or_insert_with(|| message.into());
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }
    /// Re-roots every field under `prefix` (`start` → `items[2].start`).
    pub fn prefixed(self, prefix: &str) -> Self {
        Self(
            self.0
                .into_iter()
                .map(|(k, v)| (if k.is_empty() { prefix.to_owned() } else { format!("{prefix}.{k}") }, v))
                .collect(),
        )
    }
    pub fn merge(&mut self, other: FieldErrors) {
        for (k, v) in other.0 {
            self.add(k, v);
        }
    }
    pub fn into_result(self) -> Result<(), ValidationError> {
        if self.is_empty() { Ok(()) } else { Err(ValidationError { fields: self }) }
    }
}

/// Input that is well-formed but breaks a rule of the model (misaligned slot, closed date, …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid request: {}", first_message(.fields))]
pub struct ValidationError {
    pub fields: FieldErrors,
}

impl ValidationError {
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { fields: FieldErrors::single(field, message) }
    }
    pub fn prefixed(self, prefix: &str) -> Self {
        Self { fields: self.fields.prefixed(prefix) }
    }
}

fn first_message(fields: &FieldErrors) -> String {
    fields.iter().next().map(|(k, v)| format!("{k}: {v}")).unwrap_or_default()
}
