//! Fuzz entry points (as in ferry-channel): Cedar policy text and entities
//! JSON as an operator's files hand them to the loader, for the cargo-fuzz
//! targets in `fuzz/` and for `tests/fuzz_entries.rs`. Each must never panic.

use std::str::FromStr;
use std::sync::OnceLock;

use cedar_policy::{Entities, PolicySet, Schema, ValidationMode, Validator};

fn schema() -> Option<&'static Schema> {
    static SCHEMA: OnceLock<Option<Schema>> = OnceLock::new();
    SCHEMA.get_or_init(|| crate::load::schema().ok()).as_ref()
}

/// Parse policy text and validate it against Ferry's schema in strict
/// mode, as loading a policy file does. Returns whether it validated.
pub fn policy_text(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    // As the loader does: refuse what would overflow Cedar's parser.
    if crate::load::too_deep(text).is_some() {
        return false;
    }
    let Ok(set) = PolicySet::from_str(text) else { return false };
    let Some(schema) = schema() else { return false };
    Validator::new(schema.clone()).validate(&set, ValidationMode::Strict).validation_passed()
}

/// Parse an entities file against Ferry's schema, as loading one does.
pub fn entities_json(data: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return false };
    Entities::from_json_value(value, schema()).is_ok()
}
