//! Errors from loading or checking policy files. A denial is not an error:
//! see [`crate::Decision`].

use std::path::PathBuf;

/// Why a policy set or entities file was refused. Every variant that comes
/// from a file names it, and, where the problem has a place, its line and
/// column (1-based), so `ferry policy check` output can be jumped to.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{}: cannot read", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The Cedar text does not parse.
    #[error("{}:{line}:{column}: syntax error: {message}", path.display())]
    Syntax { path: PathBuf, line: usize, column: usize, message: String },

    /// A policy parses but does not type-check against the schema (unknown
    /// attribute, entity type or action, wrong types, ...).
    #[error("{}:{line}:{column}: policy `{policy}` violates the schema: {message}", path.display())]
    Validation { path: PathBuf, line: usize, column: usize, policy: String, message: String },

    /// Two policies carry the same `@id`; decisions name policies by id, so
    /// ids must be unique across all files.
    #[error("{}: policy id `{id}` is already used in {}", path.display(), first.display())]
    DuplicateId { id: String, path: PathBuf, first: PathBuf },

    /// Templates need linking, which Ferry has no use for; refusing them keeps
    /// "what is in the file is what decides" true.
    #[error("{}: `{id}` is a template (has ?principal/?resource slots); only static policies are supported", path.display())]
    Template { path: PathBuf, id: String },

    /// The entities file is not JSON, or does not conform to the schema.
    #[error("{}{}: invalid entities: {message}", path.display(), location.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
    Entities {
        path: PathBuf,
        /// Line and column when known (JSON syntax errors).
        location: Option<(usize, usize)>,
        message: String,
    },

    /// The embedded schema does not parse: a build defect, reported rather
    /// than panicking so a daemon can say what is wrong.
    #[error("embedded Cedar schema is invalid: {0}")]
    Schema(String),

    /// The loader thread could not start or died.
    #[error("policy loader failed: {0}")]
    Loader(String),
}
