//! Reading policy and entities files into checked Cedar values.
//!
//! Everything here either returns fully validated values or an error that
//! names the file (and line:column where there is one); nothing is half
//! loaded, which is what lets [`crate::SharedPolicy::reload`] be atomic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{Effect, Entities, PolicyId, PolicySet, Schema, ValidationMode, Validator};
use miette::Diagnostic;

use crate::error::PolicyError;

/// What we remember about each policy, for reasons and `explain`.
#[derive(Clone, Debug)]
pub(crate) struct PolicyMeta {
    pub file: PathBuf,
    pub effect: Effect,
    /// The `@reason` annotation, shown to operators.
    pub reason: Option<String>,
    /// Actions the policy's scope names; `None` means any action.
    pub actions: Option<Vec<String>>,
}

/// A parsed and schema-validated policy set.
pub(crate) struct LoadedPolicies {
    pub set: PolicySet,
    /// Keyed by policy id (the `@id` annotation).
    pub meta: HashMap<String, PolicyMeta>,
    /// Ids in file order, for stable listings.
    pub order: Vec<String>,
    /// Validator warnings (e.g. a policy that can never apply), rendered.
    pub warnings: Vec<String>,
}

/// Parses the embedded schema. Schema warnings (shadowed names and the like)
/// are not actionable at run time and are dropped.
pub(crate) fn schema() -> Result<Schema, PolicyError> {
    Schema::from_cedarschema_str(crate::SCHEMA)
        .map(|(schema, _warnings)| schema)
        .map_err(|e| PolicyError::Schema(e.to_string()))
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path)
        .map_err(|source| PolicyError::Io { path: path.to_owned(), source })
}

/// 1-based line and column (in characters) of a byte offset.
/// Deepest bracket nesting a policy may use. Cedar's parser recurses per
/// level and overflows the stack on a few thousand (found by fuzzing), which
/// would abort the agent on a policy reload; real policies nest a handful.
pub const MAX_POLICY_NESTING: usize = 48;

/// The byte offset where `text` first nests brackets deeper than
/// [`MAX_POLICY_NESTING`], outside string literals and comments.
pub(crate) fn too_deep(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let (mut depth, mut i) = (0usize, 0usize);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_POLICY_NESTING {
                    return Some(i);
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    // A label can in principle point inside a multi-byte character; back up
    // to a boundary rather than panic on slicing.
    let mut cut = offset;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let before = &text[..cut];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Where a Cedar diagnostic points, as an offset into the text it was
/// parsed from (Cedar keeps the whole file as the source of every policy,
/// so offsets are relative to the file).
fn first_offset(diag: &dyn Diagnostic) -> Option<usize> {
    diag.labels().and_then(|mut labels| labels.next()).map(|label| label.offset())
}

/// Message plus miette's help text, which is often the useful half
/// ("did you mean ...").
fn message(diag: &(impl Diagnostic + ?Sized)) -> String {
    // Some Cedar errors keep the specifics in their source chain (entity
    // errors print only "error during entity deserialization"); transparent
    // wrappers repeat their inner text, so skip what is already said.
    let mut text = diag.to_string();
    let mut source = std::error::Error::source(diag);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    if let Some(help) = diag.help() {
        text.push_str(&format!(" ({help})"));
    }
    text
}

/// Parses every file, names each policy by its `@id` (falling back to
/// `<file name>#<index>`), and validates the whole set against `schema` in
/// strict mode.
///
/// Runs on a thread with [`LOADER_STACK`]: Cedar's parser and validator
/// recurse once per level of an expression, and the agent reloads policy
/// from a tokio worker with 2 MiB of stack. Brackets are capped by
/// [`too_deep`]; other nesting (if-then-else, member chains) is not, and
/// parsed 3,000 levels deep on 8 MiB.
pub(crate) fn load_policies(
    files: &[PathBuf],
    schema: &Schema,
) -> Result<LoadedPolicies, PolicyError> {
    let (files, schema) = (files.to_vec(), schema.clone());
    std::thread::Builder::new()
        .name("policy-loader".into())
        .stack_size(LOADER_STACK)
        .spawn(move || load_policies_here(&files, &schema))
        .map_err(|e| PolicyError::Loader(format!("cannot start: {e}")))?
        .join()
        .unwrap_or_else(|_| Err(PolicyError::Loader("panicked".into())))
}

/// Stack for parsing and validating policy text (see [`load_policies`]).
const LOADER_STACK: usize = 64 << 20;

fn load_policies_here(files: &[PathBuf], schema: &Schema) -> Result<LoadedPolicies, PolicyError> {
    let mut set = PolicySet::new();
    let mut meta: HashMap<String, PolicyMeta> = HashMap::new();
    let mut order = Vec::new();
    let mut texts: HashMap<PathBuf, String> = HashMap::new();

    for path in files {
        let text = read(path)?;
        if let Some(at) = too_deep(&text) {
            let (line, column) = line_col(&text, at);
            return Err(PolicyError::Syntax {
                path: path.clone(),
                line,
                column,
                message: format!("brackets nest deeper than {MAX_POLICY_NESTING} levels"),
            });
        }
        let parsed = PolicySet::from_str(&text).map_err(|e| {
            let (line, column) = first_offset(&e).map_or((1, 1), |o| line_col(&text, o));
            let more = e.iter().count().saturating_sub(1);
            let mut message = message(&e);
            if more > 0 {
                message.push_str(&format!(" (and {more} more error(s))"));
            }
            PolicyError::Syntax { path: path.clone(), line, column, message }
        })?;
        if let Some(t) = parsed.templates().next() {
            return Err(PolicyError::Template {
                path: path.clone(),
                id: t.annotation("id").map_or_else(|| t.id().to_string(), str::to_owned),
            });
        }
        let file_name = path
            .file_name()
            .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        // `policies()` iterates a hash map; sort by Cedar's generated ids
        // (policy0, policy1, ... in text order) so fallback names and the
        // listing follow the file.
        let mut policies: Vec<_> = parsed.policies().collect();
        policies.sort_by_key(|p| {
            p.id()
                .to_string()
                .strip_prefix("policy")
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(usize::MAX)
        });
        for (index, policy) in policies.into_iter().enumerate() {
            let id = match policy.annotation("id") {
                Some(id) if !id.is_empty() => id.to_owned(),
                _ => format!("{file_name}#{index}"),
            };
            if let Some(first) = meta.get(&id) {
                return Err(PolicyError::DuplicateId {
                    id,
                    path: path.clone(),
                    first: first.file.clone(),
                });
            }
            let actions = match policy.action_constraint() {
                cedar_policy::ActionConstraint::Any => None,
                cedar_policy::ActionConstraint::Eq(a) => Some(vec![a.id().unescaped().to_owned()]),
                cedar_policy::ActionConstraint::In(v) => {
                    Some(v.iter().map(|a| a.id().unescaped().to_owned()).collect())
                }
            };
            meta.insert(
                id.clone(),
                PolicyMeta {
                    file: path.clone(),
                    effect: policy.effect(),
                    reason: policy.annotation("reason").map(str::to_owned),
                    actions,
                },
            );
            // Renaming makes Cedar's own diagnostics (which policies decided,
            // which failed) speak in @id names with no translation table.
            let renamed = policy.new_id(PolicyId::new(&id));
            set.add(renamed).map_err(|e| PolicyError::Syntax {
                path: path.clone(),
                line: 1,
                column: 1,
                message: e.to_string(),
            })?;
            order.push(id);
        }
        texts.insert(path.clone(), text);
    }

    let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
    if let Some(err) = result.validation_errors().next() {
        let policy = err.policy_id().to_string();
        let file = meta.get(&policy).map(|m| m.file.clone()).unwrap_or_default();
        let (line, column) = match (texts.get(&file), first_offset(err)) {
            (Some(text), Some(offset)) => line_col(text, offset),
            _ => (1, 1),
        };
        return Err(PolicyError::Validation {
            path: file,
            line,
            column,
            policy,
            message: message(err),
        });
    }
    let warnings = result
        .validation_warnings()
        .map(|w| {
            let id = w.policy_id().to_string();
            let place = match (meta.get(&id), first_offset(w)) {
                (Some(m), Some(offset)) => match texts.get(&m.file) {
                    Some(text) => {
                        let (l, c) = line_col(text, offset);
                        format!("{}:{l}:{c}: ", m.file.display())
                    }
                    None => String::new(),
                },
                _ => String::new(),
            };
            format!("{place}policy `{id}`: {}", message(w))
        })
        .collect();

    Ok(LoadedPolicies { set, meta, order, warnings })
}

/// Reads an entities file (Cedar's entity JSON) and checks it against the
/// schema: wrong attribute types, missing or extra attributes and unknown
/// entity types are all refused.
/// Ids of the `Host` entities in an entities file, validated as at load:
/// lets an agent warn at start-up that the policy does not know it.
pub fn entity_hosts(path: &Path) -> Result<Vec<String>, PolicyError> {
    let entities = load_entities(path, &schema()?)?;
    let mut hosts: Vec<String> = entities
        .iter()
        .filter(|e| e.uid().type_name().to_string() == "Host")
        .map(|e| e.uid().id().unescaped().to_owned())
        .collect();
    hosts.sort();
    Ok(hosts)
}

pub(crate) fn load_entities(path: &Path, schema: &Schema) -> Result<Entities, PolicyError> {
    let text = read(path)?;
    // Parse the JSON ourselves first: serde_json reports line and column,
    // Cedar's entity parser does not.
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PolicyError::Entities {
            path: path.to_owned(),
            location: Some((e.line(), e.column())),
            message: e.to_string(),
        })?;
    Entities::from_json_value(value, Some(schema)).map_err(|e| PolicyError::Entities {
        path: path.to_owned(),
        location: None,
        message: message(&e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_is_one_based_and_counts_characters() {
        let text = "ab\ncdé\nx";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 3), (2, 1));
        assert_eq!(line_col(text, 5), (2, 3));
        // Inside the two-byte 'é': backs up to its start instead of panicking.
        assert_eq!(line_col(text, 6), (2, 3));
        assert_eq!(line_col(text, 8), (3, 1));
        assert_eq!(line_col(text, 1000), (3, 2));
    }

    #[test]
    fn embedded_schema_parses() {
        assert!(schema().is_ok());
    }
}
